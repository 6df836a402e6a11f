"""Peak memory of reading a ~300 MB LLaVA JSON array: the streaming reader vs loading it whole.

    python benchmarks/data_memory.py              # ~300 MB file in a temp dir; ~2-4 min
    python benchmarks/data_memory.py --mb 50      # smaller, for a quick look

The file is one JSON list of LLaVA records (about 1.5 KB each; one in ten names a real PNG
under image_root, the rest are text-only). Every variant runs in a fresh subprocess: after its
imports it resets the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``), runs,
and reports ``peak_extra = VmHWM - RSS_before`` (on kernels without clear_refs, VmHWM includes
the imports and the number is an upper bound). Variants:

* ``stream_whole_file``: ``iter_file_rows`` over the whole file (what one read task, or eval
  code, does when the file is not split), rows counted and dropped;
* ``stream_one_range``: the largest of the byte ranges ``read_source`` gives Ray tasks
  (``SPLIT_BYTES``), read with ``read_llava_json(..., part)``;
* ``plan_ranges``: ``split_points``, the one vectorized pass that plans those ranges;
* ``validate_sample``: ``validate_source`` (the bounded sample ``mmkd validate`` reads);
* ``json_load_whole`` (the old reader's first step): ``json.loads(f.read())``.

The stated bound (``BOUND_MIB``) is for the streaming variants; it is reported, not asserted,
and is independent of the file size (a chunk, one block of rows, one record). Timing is
wall-clock on a shared 2-CPU machine: indicative only. Results go to
``benchmarks/results/data_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "data_memory.json"
BOUND_MIB = 128
VARIANTS = ("stream_whole_file", "stream_one_range", "plan_ranges", "validate_sample",
            "json_load_whole")


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def generate(path: Path, target_mb: int) -> dict:
    """Write the JSON array record by record (never held whole) and a few real PNGs."""
    import io

    from PIL import Image

    images = path.parent / "images"
    images.mkdir(exist_ok=True)
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (i * 16, 80, 160)).save(buf, format="PNG")
        (images / f"{i}.png").write_bytes(buf.getvalue())
    answer = ("The image shows a bus parked on the side of a street, with people waiting "
              "nearby and buildings in the background. ") * 6
    n, size = 0, 0
    with open(path, "w") as f:
        f.write("[\n")
        while size < target_mb * 1_000_000:
            rec = {"id": f"{n:09d}", "conversations": [
                {"from": "human", "value": f"<image>\nDescribe image {n} in detail."},
                {"from": "gpt", "value": answer},
                {"from": "human", "value": "What else is there? \"quoted\" [brackets] {x}"},
                {"from": "gpt", "value": answer[: 200 + n % 300]}]}
            if n % 10 == 0:
                rec["image"] = f"{n % 16}.png"
            else:
                rec["conversations"][0]["value"] = rec["conversations"][0]["value"][8:]
            text = ("" if n == 0 else ",\n") + json.dumps(rec)
            f.write(text)
            size += len(text)
            n += 1
        f.write("\n]\n")
    return {"records": n, "bytes": path.stat().st_size}


def child(variant: str, path: str) -> dict:
    import gc

    from workloads.data import json_records
    from workloads.data.readers import SPLIT_BYTES, read_llava_json, iter_file_rows
    from workloads.data.preflight import validate_source
    from workloads.data.source import DataSource

    src = DataSource(format="llava_json", paths=path, image_root=str(Path(path).parent / "images"))
    size = Path(path).stat().st_size
    gc.collect()
    exact = _reset_peak()
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    out: dict = {}
    if variant == "stream_whole_file":
        rows = bad = 0
        for row in iter_file_rows(src, path):
            rows += 1
            bad += bool(row["bad"])
        out.update(rows=rows, bad_rows=bad)
    elif variant == "stream_one_range":
        with open(path, "rb") as f:
            parts = json_records.split_points(f.read, size, -(-size // SPLIT_BYTES), jsonl=False)
        ends = [(r.end if r.end is not None else size) - r.start for r in parts]
        part = parts[ends.index(max(ends))]
        _reset_peak()
        before, t0 = _status()["VmRSS"], time.perf_counter()
        with open(path, "rb") as f:
            f.seek(part.start)
            rows = sum(1 for _ in read_llava_json(f, path, src, part))
        out.update(rows=rows, ranges=len(parts), range_bytes=max(ends))
    elif variant == "plan_ranges":
        with open(path, "rb") as f:
            parts = json_records.split_points(f.read, size, -(-size // SPLIT_BYTES), jsonl=False)
        out.update(ranges=len(parts))
    elif variant == "validate_sample":
        out.update(problems=validate_source(src))
    elif variant == "json_load_whole":
        with open(path, "rb") as f:
            out.update(rows=len(json.loads(f.read())))
    seconds = time.perf_counter() - t0
    st = _status()
    out.update(seconds=seconds, rss_before_mib=before / 2**20, peak_mib=st["VmHWM"] / 2**20,
               peak_extra_mib=(st["VmHWM"] - before) / 2**20, peak_is_exact=exact)
    return out


def _machine() -> dict:
    import numpy
    import pyarrow

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "workloads/data"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", None
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
            "memory_total_gib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
            "load_average_at_start": os.getloadavg(), "git_commit": commit,
            "workloads_data_uncommitted_changes": dirty}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300, help="size of the generated file")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], help="variants to leave out")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    machine = _machine()
    with tempfile.TemporaryDirectory(prefix="mmkd-datamem-") as d:
        path = Path(d) / "llava_big.json"
        t0 = time.perf_counter()
        made = generate(path, args.mb)
        made["generate_seconds"] = time.perf_counter() - t0
        print(f"generated {made['bytes'] / 1e6:.0f} MB, {made['records']} records", flush=True)
        results = {}
        for variant in VARIANTS:
            if variant in args.skip:
                continue
            proc = subprocess.run([sys.executable, __file__, "--child", variant, str(path)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                results[variant] = {"error": proc.stderr[-2000:]}
            else:
                results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(variant, json.dumps(results[variant]), flush=True)
    streaming = [results[v]["peak_extra_mib"] for v in
                 ("stream_whole_file", "stream_one_range", "plan_ranges", "validate_sample")
                 if v in results and "peak_extra_mib" in results[v]]
    out = {"description": __doc__.strip().splitlines()[0], "file": made,
           "split_bytes": __import__("workloads.data.readers", fromlist=["x"]).SPLIT_BYTES,
           "bound_mib": BOUND_MIB,
           "streaming_within_bound": bool(streaming) and max(streaming) < BOUND_MIB,
           "machine": machine, "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
