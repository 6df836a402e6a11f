"""Where the teacher runs (``teacher_service.json``, ``teacher_service_tune.json``): the
table rows and the two README sections."""

from __future__ import annotations

import re
import statistics

from render.base import Results, load_range, mm_range


def row_teacher_service(R: Results) -> str:
    d = R.load("teacher_service")
    parts = []
    for name, pair in d["pairs"].items():
        r = pair["summary"]["ratios"]
        parts.append(f"{name} ({pair['summary']['teacher_params'] / 1e6:.1f}M-parameter teacher): "
                     f"service {mm_range(r['service_over_floor'])}, online on 2 threads "
                     f"{mm_range(r['online_2threads_over_floor'])}")
    reps = next(iter(d["pairs"].values()))["summary"]["repeats"]
    return (f"DFT step / (student step + teacher forward), median (min-max) of {reps} "
            f"repetitions: " + "; ".join(parts) + f" (load {load_range(d)}); "
            "[details](../README.md#where-the-teacher-runs)")


def teacher_service(R: Results) -> str:
    """The teacher modes side by side (teacher_service.json)."""
    d = R.load("teacher_service")
    lines = ["| pair | teacher parameters | student step | teacher forward | online KD step "
             "(2 threads) | service KD step (1 + 1 CPU) | service / floor | online / floor | "
             "student peak RSS, service / online |", "|---|---|---|---|---|---|---|---|---|"]
    for name, pair in d["pairs"].items():
        s = pair["summary"]
        sec = {k: f"{1e3 * v['median']:.0f} ms" for k, v in s["seconds"].items()}
        rss = s["peak_rss_mb"]
        lines.append(f"| {name} | {s['teacher_params'] / 1e6:.1f}M | {sec['student_step']} | "
                     f"{sec['teacher_forward']} | {sec['online_kd_step']} | "
                     f"{sec['service_kd_step']} | {mm_range(s['ratios']['service_over_floor'])} | "
                     f"{mm_range(s['ratios']['online_2threads_over_floor'])} | "
                     f"{rss['service']['median']:.0f} / {rss['online']['median']:.0f} MB |")
    s = next(iter(d["pairs"].values()))["summary"]
    a = d["args"]
    best = {n: p["summary"]["ratios"]["teacher_forward_share_of_floor"]["median"]
            for n, p in d["pairs"].items()}
    bound = ", ".join(f"{n} {max(v, 1 - v):.2f}" for n, v in best.items())
    return ("\n".join(lines) + "\n\n"
            f"`benchmarks/teacher_service.py`: median seconds per DFT step over {a['steps']} steps "
            f"(after {a['warmup']} untimed), batch {a['batch_size']}, every row new to the "
            f"service; {s['repeats']} repetitions, pairs interleaved; load {load_range(d)} on "
            f"{d['environment']['machine']['cpu_count']} cores. Floor: the student's CE step plus "
            "the teacher's forward, 1 thread each, one after the other. Overlap cannot beat "
            f"max(student, teacher) / (student + teacher) ({bound}), and each request costs a Ray "
            "round trip. The overlap works (the service step approaches that bound when the "
            "student's step is not negligible: balanced), but on one machine a colocated teacher "
            "that gets both threads is as fast (its forward parallelizes too); the service pays "
            "off in the student's memory (last column), when the teacher is shared (the tune "
            "below) or lives on other devices.\n")


def row_teacher_service_tune(R: Results) -> str:
    d = R.load("teacher_service_tune")
    parts = []
    for name, pair in d["pairs"].items():
        r = pair["summary"]["ratios"]
        parts.append(f"{name} ({pair['teacher_params'] / 1e6:.0f}M-parameter teacher): memory "
                     f"{mm_range(r['model_processes_mb_service_over_online'])}, wall "
                     f"{mm_range(r['wall_s_service_over_online'])}")
    return (f"{d['args']['trials']}-trial tune, service / a teacher per trial: "
            + "; ".join(parts) + f" (load {load_range(d)}); "
            "[details](../README.md#where-the-teacher-runs)")


def teacher_service_tune(R: Results) -> str:
    """A tune sharing one teacher service vs a teacher per trial (teacher_service_tune.json)."""
    d = R.load("teacher_service_tune")
    a = d["args"]
    lines = ["| teacher | mode | wall | memory of the model processes | Ray instance peak above "
             "idle | teacher loads | rows forwarded / asked |", "|---|---|---|---|---|---|---|"]
    for name, pair in d["pairs"].items():
        s = pair["summary"]
        for mode in ("online", "service"):
            m = s[mode]
            if mode == "service":
                svc = [r["service"] for r in pair["runs"]["service"]]
                loads = ", ".join(f"{x['loads']:.0f}" for x in svc)
                rows = ", ".join(f"{x['rows_forwarded']:.0f} / {x['rows_requested']:.0f}"
                                 for x in svc)
            else:
                loads, rows = f"{a['trials']} (one per trial)", "-"
            lines.append(f"| {name} ({pair['teacher_params'] / 1e6:.0f}M) | {mode} | "
                         f"{mm_int(m['wall_s'], 's')} | {mm_int(m['model_processes_mb'], ' MB')} | "
                         f"{mm_int(m['tree_peak_above_idle_mb'], ' MB')} | {loads} | {rows} |")
    return ("\n".join(lines) + "\n\n"
            f"`benchmarks/teacher_service_tune.py`: `run_tune` of a {a['trials']}-trial grid "
            f"(learning rates) over a 1-worker DFT stage of {a['steps']} steps, all trials at "
            f"once on {a['cpus']} logical CPUs ({d['environment']['machine']['cpu_count']} cores, "
            f"load {load_range(d)}); median (min-max) of {a['repeats']} repetitions (per run where "
            "listed), modes interleaved, each tune in a fresh Ray instance, nothing cached. "
            "Memory: PSS, the sum of each process's peak over the trials' Ray Train workers and "
            "(service) the replica and its coordinator. A teacher per trial holds one copy per "
            "trial; the service holds one and forwards each row once for all trials (they read "
            "the same rows), the rest are cache hits. Service / online: " + "; ".join(
                f"{n} memory {mm_range(p['summary']['ratios']['model_processes_mb_service_over_online'])}"
                f", wall {mm_range(p['summary']['ratios']['wall_s_service_over_online'])}"
                for n, p in d["pairs"].items()) + ". The service's replica and coordinator "
            "took " + ", ".join(f"{statistics.median(svc_mb(p)):.0f} MB ({n})"
                                for n, p in d["pairs"].items())
            + ": the service saves memory once the teacher copies it replaces outweigh its own "
            "processes.\n")


def svc_mb(pair: dict) -> list[float]:
    return [r["roles"]["teacher_service"]["sum_of_peaks_mb"] for r in pair["runs"]["service"]]


def mm_int(x: dict, unit: str) -> str:
    return f"{x['median']:.0f}{unit} ({x['min']:.0f}-{x['max']:.0f})"
