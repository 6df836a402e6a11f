"""Online vs offline teacher for DFT: quality (held-out accuracy) and cost (DFT wall time,
teacher pass, stored bytes) at top-k 8 / 64 / 512 (= the tiny vocabulary: exact KL).

Runs pipelines/kd_offline_teacher.yaml with the DFT stages at each seed (the upstream student
is the default pipeline's, seed 0) and reads the run record and evaluate table.

    python benchmarks/kd_offline.py [--seeds 0] [--home DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from seeded import ROOT, latest_record, machine, run_seed, summary

DFT = ["student_dft", "dft_offline"]
ROWS = {"dft_online": "student_dft",
        **{f"dft_offline_top{k}": f"dft_offline_teacher_logits-teacher-logits-top-k-{k}"
           for k in (8, 64, 512)}}


def _wall(home: Path, key: str) -> float | None:
    """Wall seconds of the run that computed stage ``key`` (a cached stage ran in an earlier
    run record), with that run's start time."""
    for f in (home / "runs").glob("*/run.json"):
        for s in json.loads(f.read_text())["stages"].values():
            if s["key"] == key and s["status"] == "done":
                return round(s["ended"] - s["started"], 1)
    return None


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--home", default=str(ROOT / ".mmkd"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kd_offline.json"))
    args = ap.parse_args()
    home = Path(args.home).resolve()
    runs = []
    for seed in args.seeds:
        run = run_seed("pipelines/kd_offline_teacher.yaml", DFT, seed, home, [])
        record = latest_record(home, "pipelines/kd_offline_teacher.yaml")
        stages = record["stages"]
        rows = {}
        for name, stage in ROWS.items():
            s = stages[stage]
            rows[name] = {"accuracy": run["table"][name]["accuracy"], "status": s["status"],
                          "dft_wall_s": _wall(home, s["key"])}
        for k in (8, 64, 512):
            s = stages[f"teacher_logits_top_k-{k}"]
            rows[f"dft_offline_top{k}"]["logits_bytes"] = _bytes(s["uri"])
            rows[f"dft_offline_top{k}"]["teacher_pass_wall_s"] = _wall(home, s["key"])
        rows["kd_dpt_sft"] = {"accuracy": run["table"]["kd_dpt_sft"]["accuracy"]}
        runs.append({"seed": seed, "rows": rows})
        print(json.dumps(runs[-1]), flush=True)
    report = {
        "what": "DFT with the teacher online vs offline (stored top-k logits), "
                "pipelines/kd_offline_teacher.yaml; wall times from the run record (includes "
                "Ray Train start-up; the machine was shared, see load_average)",
        "runs": runs,
        "accuracy": {r: summary([x["rows"][r]["accuracy"] for x in runs])
                     for r in ["kd_dpt_sft", *ROWS]},
        "machine": machine(),
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["accuracy"], indent=2))


if __name__ == "__main__":
    main()
