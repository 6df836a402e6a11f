"""Shared by the seed benchmarks: run a pipeline with its *student* stages at one seed (data,
tokenizer and teacher stay at the pipeline seed, so they are trained once and cached) and read
the evaluate stage's results table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(pipeline: str, student_stages: list[str], seed: int, home: Path,
             extra: list[str], evaluate: str = "evaluate", args: list[str] = ()) -> dict:
    """``mmkd run PIPELINE`` with ``stages.S.params.seed=seed`` for each student stage; returns
    ``{"seed", "wall_seconds", "stages": {name: status}, "table": {model: metrics}}``."""
    sets = [f"stages.{s}.params.seed={seed}" for s in student_stages] + extra
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / pipeline), "--plain",
           *[a for s in sets for a in ("--set", s)], *args]
    env = {**os.environ, "MMKD_HOME": str(home), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{pipeline} seed {seed} failed:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    record = latest_record(home, pipeline)
    results = Path(record["stages"][evaluate]["uri"]) / "results" / "results.json"
    full = json.loads(results.read_text())
    return {"seed": seed, "wall_seconds": round(wall, 1), "run_id": record["run_id"],
            "results_dir": str(results.parent),
            "stages": {n: s["status"] for n, s in record["stages"].items()},
            "table": full["results"], "comparisons": full.get("comparisons", [])}


def latest_record(home: Path, pipeline: str) -> dict:
    """The newest run record of ``pipeline`` in ``home`` (other pipelines may share the home)."""
    import yaml

    name = yaml.safe_load((ROOT / pipeline).read_text())["name"]
    records = [json.loads(p.read_text()) for p in (home / "runs").glob("*/run.json")]
    records = [r for r in records if r.get("pipeline") == name]
    return max(records, key=lambda r: r.get("started") or 0)


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average": os.getloadavg()}
