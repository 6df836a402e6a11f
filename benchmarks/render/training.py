"""The training loop's overhead against a plain PyTorch loop (``train_throughput.json``): the
table row and the `train-overhead` section."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from render.base import Results, para, pct, signed, span


TRAIN_BASE = "omp=PASSIVE"  # the configuration the overhead analysis starts from


DEFAULT_SETTING = "omp=default,zero=2,threads=1"  # pipelines/llava_kd.yaml's training stages


ONE_WORKER_ZERO0 = "b8f4eb5"  # from this commit one worker runs ZeRO-1/2 as ZeRO-0, no all-reduce


def descends(commit: str | None, ancestor: str) -> bool:
    import subprocess

    if not commit:
        return False
    out = subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, commit],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True)
    return out.returncode == 0


def train_label(key: str, run: dict | None = None) -> str:
    """``omp=PASSIVE,allreduce=off`` -> ``OMP_WAIT_POLICY=PASSIVE, DeepSpeed all-reduce off``;
    a ZeRO-1/2 entry measured after ``ONE_WORKER_ZERO0`` says it ran as ZeRO-0."""
    words = {"omp=default": "OMP_WAIT_POLICY unset", "allreduce=off": "DeepSpeed all-reduce off"}
    out = []
    for part in key.split(","):
        k, _, v = part.partition("=")
        out.append(words.get(part) or {"omp": f"OMP_WAIT_POLICY={v}", "zero": f"ZeRO-{v}",
                                       "rows": f"{v} rows",
                                       "threads": f"{v} thread{'s' if v != '1' else ''}"
                                       }.get(k, part))
        if k == "zero" and v in ("1", "2") and run is not None and descends(
                ((run.get("environment") or {}).get("git") or {}).get("commit"), ONE_WORKER_ZERO0):
            out[-1] += f" requested (one worker: runs as ZeRO-0, no all-reduce, since {ONE_WORKER_ZERO0})"
    return ", ".join(out)


def train_run_summary(run: dict) -> dict:
    reps = run["repetitions"]
    loads = [r[w]["load_1m_before"] for r in reps for w in ("plain", "mmkd")]
    return {"n": len(reps), "load": span(loads, lambda x: f"{x:.1f}"),
            "plain": span(run["plain_tokens_per_s"]["values"], lambda x: f"{x:.0f}"),
            "mmkd": span(run["mmkd_tokens_per_s"]["values"], lambda x: f"{x:.0f}"),
            "overhead": f"{signed(100 * run['overhead']['median'])}% "
                        f"({signed(100 * run['overhead']['min'])} to "
                        f"{signed(100 * run['overhead']['max'])})",
            "cpu": f"{signed(100 * run['cpu_overhead']['median'])}% "
                   f"({signed(100 * run['cpu_overhead']['min'])} to "
                   f"{signed(100 * run['cpu_overhead']['max'])})"}


def row_train_throughput(R: Results) -> str:
    runs = R.load("train_throughput")["runs"]
    out = []
    for key in (k for k in (DEFAULT_SETTING, "omp=default", TRAIN_BASE, f"{TRAIN_BASE},threads=1")
                if k in runs):
        s = train_run_summary(runs[key])
        out.append(f"{'the default pipeline setting: ' if key == DEFAULT_SETTING else ''}"
                   f"{train_label(key, runs[key])}, {s['n']} interleaved repetitions, load {s['load']}: "
                   f"plain {s['plain']} tok/s, mmkd {s['mmkd']} tok/s, **overhead "
                   f"{s['overhead']}**, CPU seconds per step {s['cpu']}")
    return ("<br>".join(out) + "; other configurations and where the time goes: "
            "[below](#the-training-loops-overhead)")


def median_phases(run: dict, loop: str) -> dict[str, tuple[float, float]]:
    """Per phase, the median over repetitions of the mean (wall, CPU) seconds per step."""
    reps = run["repetitions"]
    out = {k: (statistics.median(r[loop]["phase_wall_s"][k] for r in reps),
               statistics.median(r[loop]["phase_cpu_s"][k] for r in reps))
           for k in reps[0][loop]["phase_wall_s"]}
    out["whole"] = (statistics.median(r[loop]["step_wall_s"] for r in reps),
                    statistics.median(r[loop]["step_cpu_s"] for r in reps))
    return out


def default_epoch_steps(R: Results) -> int:
    """Optimizer steps per epoch of the default pipeline's SFT stages (one worker)."""
    stages = R.pipeline("pipelines/llava_kd.yaml")["stages"]
    return stages["shapes"]["params"]["num_instruct"] // stages["baseline_sft"]["params"][
        "batch_size"]


def ray_cpu_share(cpu: dict) -> float:
    """CPU seconds per second that the Ray processes other than the worker (the process that
    used the most) spent during a loop's measured steps."""
    worker = max(cpu["cpu_s_by_process"].values())
    return (cpu["process_tree_cpu_s"] - worker) / cpu["window_s"]


def train_overhead(R: Results) -> str:
    """Where the mmkd loop's time goes next to the plain loop (train_throughput.json)."""
    runs = R.load("train_throughput")["runs"]
    lines = ["| configuration | repetitions | load (1 min) | plain tok/s | mmkd tok/s | overhead "
             "(wall), median (min to max) | CPU s per step, mmkd vs plain |",
             "|---|---|---|---|---|---|---|"]
    for key, run in sorted(runs.items()):
        s = train_run_summary(run)
        lines.append(f"| {train_label(key, run)} | {s['n']} | {s['load']} | {s['plain']} | "
                     f"{s['mmkd']} | {s['overhead']} | {s['cpu']} |")
    base = runs[TRAIN_BASE]
    ms = lambda x: f"{1e3 * x:.1f}"  # noqa: E731
    cols = ("fetch", "collate", "forward", "backward", "step", "other")
    lines += ["", f"Per step in {train_label(TRAIN_BASE)} (each repetition's mean, median over "
              "repetitions; ms wall / ms process CPU):", "",
              "| loop | load | fetch (Ray Data) | collate | forward | backward | optimizer step "
              "| other | whole step |", "|---|---|---|---|---|---|---|---|---|"]
    variants = [("plain", base, "plain"), ("mmkd", base, "mmkd")]
    off = f"{TRAIN_BASE},allreduce=off"
    if off in runs:
        variants.append(("mmkd, DeepSpeed all-reduce off", runs[off], "mmkd"))
    for name, run, loop in variants:
        ph = median_phases(run, loop)
        cells = [f"{ms(ph[k][0])} / {ms(ph[k][1])}" if k in ph else "—" for k in cols]
        lines.append(f"| {name} | {train_run_summary(run)['load']} | {' | '.join(cells)} | "
                     f"{ms(ph['whole'][0])} / {ms(ph['whole'][1])} |")
    plain, mmkd = median_phases(base, "plain"), median_phases(base, "mmkd")
    stalls = [st for r in base["repetitions"] for st in r["mmkd"]["fetch_stalls"]]
    spy = (base.get("profile") or {}).get("py_spy")
    fetch_share = mmkd["fetch"][0] / mmkd["whole"][0]
    text = (
        f"Ray Data is {'not ' if fetch_share < 0.05 else ''}where the steady-state time goes: "
        "fetching a batch takes "
        f"{ms(mmkd['fetch'][0])} ms of a {ms(mmkd['whole'][0])} ms step on average, with "
        f"{len(stalls)} waits of {span([st[1] for st in stalls], lambda x: f'{x:.0f}', ' ms')} "
        f"in {len(base['repetitions'])} repetitions (a new window of rows). The extra CPU is "
        f"DeepSpeed's: backward {signed(1e3 * (mmkd['backward'][1] - plain['backward'][1]))} ms, "
        f"optimizer step {signed(1e3 * (mmkd['step'][1] - plain['step'][1]))} ms per step over "
        "the plain loop.")
    if spy:
        ds = spy["loop_top_deepspeed_functions"]
        reduce = sum(v for k, v in ds.items() if "allreduce" in k or "all_reduce" in k)
        clip = sum(v for k, v in ds.items() if k.startswith("clip_grad_norm_"))
        text += (f" py-spy on the worker ({spy['loop_samples']} samples of the training loop): "
                 f"{pct(reduce)} in DeepSpeed's gradient all-reduce (flatten, all-reduce over "
                 "gloo, copy back: with one worker there is nothing to reduce), "
                 f"{pct(clip)} in its gradient clipping.")
    if off in runs:
        text += (f" With the all-reduce off ({train_label(off)}): overhead "
                 f"{train_run_summary(runs[off])['overhead']}, CPU per step "
                 f"{train_run_summary(runs[off])['cpu']}.")
    ray_share = [ray_cpu_share(r["mmkd"]["measured_steps_cpu"]) for r in base["repetitions"]]
    text += (" The rest is wall time: the worker's two threads share the two cores "
             "with Ray's own processes (Train controller, Data coordinator, stats and log "
             f"actors, raylet, GCS), which used {span(ray_share, lambda x: f'{x:.2f}')} CPU "
             "seconds per second during the measured steps.")
    one, one_off = f"{TRAIN_BASE},threads=1", f"{TRAIN_BASE},allreduce=off,threads=1"
    if one in runs:
        text += (" With one thread per loop (the default pipeline's `cpus_per_worker: 1`, which "
                 f"leaves a core to Ray): overhead {train_run_summary(runs[one])['overhead']}, "
                 f"CPU per step {train_run_summary(runs[one])['cpu']}")
        text += (f"; with the all-reduce off as well: overhead "
                 f"{train_run_summary(runs[one_off])['overhead']}, CPU per step "
                 f"{train_run_summary(runs[one_off])['cpu']}." if one_off in runs else ".")
    for key in (k for k in runs if "zero=" in k):
        ph = median_phases(runs[key], "mmkd")
        text += (f" With {train_label(key).split(', ')[-1]} (the default pipeline's "
                 f"`deepspeed` setting) and one worker: overhead "
                 f"{train_run_summary(runs[key])['overhead']}, CPU per step "
                 f"{train_run_summary(runs[key])['cpu']}; backward {ms(ph['backward'][1])} ms "
                 f"and optimizer step {ms(ph['step'][1])} ms of CPU (ZeRO-0: "
                 f"{ms(mmkd['backward'][1])} and {ms(mmkd['step'][1])}).")
    for key in (k for k in runs if "rows=" in k):
        st = [x for r in runs[key]["repetitions"] for x in r["mmkd"]["fetch_stalls"]]
        text += (f" With {train_label(key)} an epoch ends inside the measured steps and Ray Data "
                 f"executes the dataset again: {len(st)} waits of "
                 f"{span([x[1] for x in st], lambda x: f'{x:.0f}', ' ms')} "
                 f"(overhead {train_run_summary(runs[key])['overhead']}); the default pipeline "
                 f"pays this once per {default_epoch_steps(R)} steps.")
    if "omp=default" in runs:
        d = train_run_summary(runs["omp=default"])
        text += (" With `OMP_WAIT_POLICY` unset, torch's OpenMP threads spin while they wait, and "
                 f"on this shared machine throughput swung with the load: plain {d['plain']} "
                 f"tok/s at load {d['load']}, overhead {d['overhead']}.")
    return "\n".join(lines) + "\n\n" + para(text)
