"""The ``kd_step_gpu`` block of benchmarks/README.md: the KD loss and step tables of
``benchmarks/kd_step_gpu.py``, from ``results/kd_step_gpu.json`` (a GPU run) and
``results/kd_step_gpu_cpu.json`` (this machine, small sizes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAMES = {"fused": "mmkd fused", "chunked_128": "mmkd chunked (128 rows)",
         "reference": "autograd reference", "reference_compiled": "reference, torch.compile",
         "liger_jsd": "Liger-Kernel LigerJSD"}


def _ms(r: dict) -> str:
    return f"{r['ms']:.1f} ({r['ms_min']:.1f}–{r['ms_max']:.1f})"


def _gib(r: dict) -> str:
    return "" if r.get("peak_extra_gib") is None else f"{r['peak_extra_gib']:.2f}"


def _tables(res: dict[str, Any], where: str) -> list[str]:
    a, env = res["args"], res["environment"]
    dev = env.get("gpu") or f"CPU ({env.get('cpus')} cores, load {env.get('load_1m', 0):.1f})"
    lines = [f"**{where}** — {dev}, torch {env.get('torch')}, triton {env.get('triton')}; "
             f"N = {a['rows']:,} rows × V = {a['vocab']:,}, forward + backward, median (min–max) "
             f"of {a['reps']}:", "",
             "| divergence | implementation | ms | extra GiB |", "|---|---|---|---|"]
    for kind, d in res["divergence"].items():
        if not isinstance(d, dict) or "variants" not in d:
            continue
        for name, r in d["variants"].items():
            lines.append(f"| {kind} | {NAMES.get(name, name)} | {_ms(r)} | {_gib(r)} |")
    step = res.get("kd_step")
    if step:
        lines += ["", f"KD step, student {a['student']} ({step['student_params'] / 1e6:.1f}M) / "
                      f"teacher {a['teacher']} ({step['teacher_params'] / 1e6:.1f}M), B = "
                      f"{a['batch']}, T = {a['seq']}, {a['image_tokens']} image tokens; floor = "
                      f"student step + teacher forward = {step['floor_ms']:.1f} ms:", "",
                  "| step | ms | × floor | peak extra GiB |", "|---|---|---|---|"]
        for name, r in step["variants"].items():
            x = "" if r.get("x_floor") is None else f"{r['x_floor']:.2f}"
            lines.append(f"| {name} | {_ms(r)} | {x} | {_gib(r)} |")
    return lines


def kd_step_gpu_block(R: Any) -> str:
    lines = []
    gpu = Path(R.dir) / "kd_step_gpu.json"
    if gpu.exists():
        lines += _tables(R.load("kd_step_gpu"), "GPU")
    else:
        lines += ["**GPU**: not measured yet — no GPU was at hand in the session that wrote the "
                  "fused kernels; `python benchmarks/kd_step_gpu.py --device cuda` runs as is "
                  "(torch, transformers, pydantic; Triton and Liger-Kernel when installed) and "
                  "writes `results/kd_step_gpu.json`, which this block then shows."]
    lines += [""] + _tables(R.load("kd_step_gpu_cpu"), "CPU, small sizes (`--device cpu --small`)")
    return "\n".join(lines) + "\n"
