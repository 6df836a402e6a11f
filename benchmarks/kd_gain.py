"""Does LLaVA-KD help? The default pipeline over several student seeds, teacher fixed.

For each seed S, runs `mmkd run pipelines/llava_kd.yaml` with every *student* stage's seed set
to S (the data, tokenizer and teacher stay at seed 0, so they are trained once and cached), then
reads the evaluate stage's table. Reports per seed and mean ± std over seeds:
  * teacher accuracy, baseline (PT-SFT), KD after DPT-SFT, KD after DPT-SFT-DFT;
  * gain = KD (DPT-SFT-DFT) - baseline, and gain of DPT-SFT alone.

    python benchmarks/kd_gain.py [--seeds 0 1 2] [--home DIR] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDENT_STAGES = ["baseline_pt", "baseline_sft", "student_dpt", "student_sft", "student_dft"]
MODELS = ["teacher", "baseline_pt_sft", "kd_dpt_sft", "kd_dpt_sft_dft"]


def run_seed(seed: int, home: Path, extra: list[str]) -> dict:
    sets = [f"stages.{s}.params.seed={seed}" for s in STUDENT_STAGES] + extra
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / "pipelines/llava_kd.yaml"),
           "--plain", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "MMKD_HOME": str(home), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    runs = sorted((home / "runs").glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    record = json.loads(runs[-1].read_text())
    results = Path(record["stages"]["evaluate"]["uri"]) / "results" / "results.json"
    table = json.loads(results.read_text())["results"]
    statuses = {n: s["status"] for n, s in record["stages"].items()}
    return {"seed": seed, "wall_seconds": round(wall, 1), "stages": statuses,
            "accuracy": {m: table[m]["accuracy"] for m in MODELS},
            "per_type": {m: {k.split("/", 1)[1]: v for k, v in table[m].items()
                             if k.startswith("accuracy/")} for m in MODELS}}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--home", default=str(ROOT / ".mmkd"), help="MMKD_HOME (reuses its cache)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every seed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kd_gain.json"))
    args = ap.parse_args()

    rows = [run_seed(s, Path(args.home).resolve(), args.set) for s in args.seeds]
    gain = [r["accuracy"]["kd_dpt_sft_dft"] - r["accuracy"]["baseline_pt_sft"] for r in rows]
    gain_dpt = [r["accuracy"]["kd_dpt_sft"] - r["accuracy"]["baseline_pt_sft"] for r in rows]
    report = {
        "what": "held-out shapes VQA exact-match accuracy of the default pipeline, teacher fixed "
                "(seed 0), student stages at each seed",
        "overrides": args.set, "seeds": args.seeds, "runs": rows,
        "summary": {m: summary([r["accuracy"][m] for r in rows]) for m in MODELS},
        "gain_dpt_sft_dft_over_pt_sft": summary(gain),
        "gain_dpt_sft_over_pt_sft": summary(gain_dpt),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_average": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("summary", "gain_dpt_sft_dft_over_pt_sft",
                                             "gain_dpt_sft_over_pt_sft")}, indent=2))


if __name__ == "__main__":
    main()
