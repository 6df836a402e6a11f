"""Samples/s of the data path (read -> decode -> image processor -> tokenize -> batch).

Compares a plain single-process Python loop with the Ray Data pipeline at 1 and 2 CPUs, on the
same generated shapes shards, and writes ``benchmarks/results/data_throughput.json``.

    python benchmarks/data_throughput.py [--samples 4000] [--batch-size 64]

Each Ray measurement runs in its own subprocess (its own ``ray.init(num_cpus=N)``), so the CPU
limit is real. ``total`` includes Ray start-up and worker warm-up; ``steady`` starts at the
first batch, which is what a long training epoch sees.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def plain_loop(data: str, processor: str, batch_size: int, max_length: int) -> dict:
    from workloads.data.collate import collate
    from workloads.data.preprocess import Preprocessor, rows_to_columns
    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource

    start = time.perf_counter()
    pre = Preprocessor(processor, max_length, quality=None)
    n, rows = 0, []

    def flush() -> int:
        return collate(pre(rows_to_columns(rows)), pre.spec.pad_token_id)["input_ids"].shape[0]

    first = None
    for row in iter_rows(DataSource(format="webdataset", paths=data)):
        rows.append(row)
        if len(rows) == batch_size:
            n += flush()
            rows = []
            first = first or time.perf_counter()
    if rows:
        n += flush()
    end = time.perf_counter()
    return {"samples": n, "total_s": end - start, "samples_per_s": n / (end - start),
            "steady_samples_per_s": (n - batch_size) / (end - first) if first else None}


def ray_pipeline(data: str, processor: str, batch_size: int, max_length: int, cpus: int) -> dict:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=tempfile.mkdtemp(prefix="mmkdbench-", dir="/tmp"))
    from workloads.data.dataset import build_train_dataset, iter_train_batches
    from workloads.data.quality import SampleQuality
    from workloads.data.source import DataSource

    quality = SampleQuality.create(name="bench")
    ds = build_train_dataset(DataSource(format="webdataset", paths=data), processor, max_length,
                             seed=0, quality=quality, num_workers=cpus, batch_size=batch_size)
    n, first = 0, None
    for batch in iter_train_batches(ds, batch_size, pad_token_id=1, seed=0, epoch=0):
        n += batch["input_ids"].shape[0]
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    ray.shutdown()
    return {"samples": n, "total_s": end - start, "samples_per_s": n / (end - start),
            "steady_samples_per_s": (n - n_first) / (end - first)}


def training_consumption(data: str, processor: str, tokenizer: str, max_length: int,
                         batch_size: int = 16, steps: int = 30) -> dict:
    """Samples/s that one training step of each tiny preset consumes (forward + backward +
    AdamW, plain PyTorch, same preprocessed batches): what the data path has to keep up with."""
    import torch

    from workloads.data.collate import collate
    from workloads.data.preprocess import Preprocessor
    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource
    from workloads.models import ModelSpec, build_model
    from workloads.train_loop_parts import model_inputs

    import numpy as np

    pre = Preprocessor(processor, max_length, quality=None)
    rows = []
    for row in iter_rows(DataSource(format="webdataset", paths=data)):
        rows.append(row)
        if len(rows) >= batch_size:
            break
    raw = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
    batch = collate(pre(raw), pre.spec.pad_token_id)
    out = {}
    for preset in ("tiny-student", "tiny-teacher"):
        model, _ = build_model(ModelSpec(preset=preset), tokenizer)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        times = []
        for i in range(steps + 5):
            t = time.perf_counter()
            loss = model(**model_inputs(batch), labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= 5:
                times.append(time.perf_counter() - t)
        times.sort()
        out[preset] = batch_size / times[len(times) // 2]
    return out


def machine_info() -> dict:
    import ray
    import torch
    import transformers

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--_ray", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--_data", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_processor", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._ray:  # child process: one Ray measurement, printed as JSON
        print(json.dumps(ray_pipeline(args._data, args._processor, args.batch_size,
                                      args.max_length, args._ray)))
        return

    from workloads.data.shapes import ShapesConfig, write_split
    from mmkd_test_plugins.data_tiny import build_tiny_data

    work = Path(tempfile.mkdtemp(prefix="mmkd-data-bench-"))
    info = machine_info()
    tiny = build_tiny_data(work / "tiny", num_samples=100)
    data = str(work / "instruct")
    write_split(data, "instruct", args.samples, ShapesConfig(shard_size=250, seed=1))
    results = {"plain_python_1cpu": plain_loop(data, tiny["processor"], args.batch_size,
                                               args.max_length)}
    for cpus in (1, 2):
        out = subprocess.run(
            [sys.executable, __file__, f"--_ray={cpus}", f"--_data={data}",
             f"--_processor={tiny['processor']}", f"--batch-size={args.batch_size}",
             f"--max-length={args.max_length}"], capture_output=True, text=True, check=True)
        results[f"ray_data_{cpus}cpu"] = json.loads(out.stdout.strip().splitlines()[-1])
    consumption = training_consumption(data, tiny["processor"], tiny["tokenizer"], args.max_length)
    steady = min(r["steady_samples_per_s"] for r in results.values())
    report = {
        "description": "read webdataset shards -> decode PNG -> Siglip image processor -> "
                       "chat template + tokenize -> collate; shapes instruct split, 32x32 images,"
                       " 16 image tokens",
        "samples": args.samples, "batch_size": args.batch_size, "max_length": args.max_length,
        "machine": info, "results": results,
        # samples/s one training step consumes (median, torch default threads): the data path
        # must stay above it, or the step waits on data.
        "training_consumption_samples_per_s": consumption,
        "data_over_consumption_ratio": {k: steady / v for k, v in consumption.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
