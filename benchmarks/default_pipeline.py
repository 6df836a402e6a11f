"""The default pipeline end to end: wall time, each stage's status and seconds, and the
evaluation table (accuracy per question type, caption perplexity, parameters) of a fresh
``mmkd run pipelines/llava_kd.yaml``.

    python benchmarks/default_pipeline.py                     # a fresh run (~8 min on 2 cores)
    python benchmarks/default_pipeline.py --from-run HOME/runs/RUN   # read a finished run

A fresh run uses an empty MMKD_HOME (``--home``, default a temporary folder), so nothing is
cached. ``--from-run`` reads the run record and its evaluate stage's ``results/results.json``
instead of running anything; the commit is then the newest one older than the run's start
(the tree may have had uncommitted changes) and the library versions are those in the
evaluate stage's key. Writes benchmarks/results/default_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _env import environment, git_state  # noqa: E402

PIPELINE = "pipelines/llava_kd.yaml"
RESULTS = HERE / "results" / "default_pipeline.json"
TRAINING_WORKLOADS = {"pretrain", "sft", "distill"}  # Ray Train + DeepSpeed stages


def fresh_run(home: Path) -> tuple[Path, dict]:
    """``mmkd run`` in ``home``; returns the run's folder and what only a fresh run knows."""
    env = {**os.environ, "MMKD_HOME": str(home), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / PIPELINE),
                           "--plain"], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{PIPELINE} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    runs = sorted((home / "runs").glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    # ru_maxrss of waited-for children: the largest is the `mmkd run` driver (KiB on Linux)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return runs[-1].parent, {"process_wall_s": round(wall, 1), "driver_peak_rss_mib": round(peak)}


def read_run(run_dir: Path) -> dict:
    """Stages, wall time and the evaluation table of a finished run of the default pipeline."""
    record = json.loads((run_dir / "run.json").read_text())
    if record.get("status") != "success":
        raise SystemExit(f"{run_dir}: run status is {record.get('status')!r}, not 'success'")
    stages = record["stages"]
    evaluate = Path(stages["evaluate"]["uri"])
    full = json.loads((evaluate / "results" / "results.json").read_text())
    table = full["results"]
    return {
        "run_id": record["run_id"],
        "run_wall_s": round(record["ended"] - record["started"], 1),
        "stages": {name: {"workload": s["workload"], "status": s["status"],
                          "wall_s": round(s["ended"] - s["started"], 1)}
                   for name, s in stages.items()},
        "training_stages": sum(s["workload"] in TRAINING_WORKLOADS for s in stages.values()),
        "tokenizer_vocab_size": int(stages["tokenizer"]["metrics"]["tokenizer/vocab_size"]),
        "results": table,
        "comparisons": full.get("comparisons", []),
        "answer_prior": answer_prior(evaluate / "results"),
        "libraries_in_stage_key": json.loads((evaluate / "_mmkd.json").read_text())
        .get("key_parts", {}).get("libraries"),
        "started_unix": record["started"],
    }


def answer_prior(results_dir: Path) -> dict:
    """Accuracy of answering each question type's most frequent answer, that answer chosen on
    the held-out questions themselves (so a slightly optimistic floor)."""
    preds = sorted(results_dir.glob("predictions_*.jsonl"))
    if not preds:
        return {}
    answers: dict[str, Counter] = defaultdict(Counter)
    n = 0
    for line in preds[0].read_text().splitlines():
        r = json.loads(line)
        answers[r["question_type"]][r["answer"]] += 1
        n += 1
    per_type = {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in sorted(answers.items())}
    return {"accuracy": sum(c.most_common(1)[0][1] for c in answers.values()) / n,
            "per_type": per_type, "questions": n}


def commit_before(unix_time: float) -> str | None:
    out = subprocess.run(["git", "log", "-1", f"--before=@{int(unix_time)}", "--format=%H"],
                         cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", type=Path, help="a finished run's folder (MMKD_HOME/runs/RUN)")
    ap.add_argument("--home", type=Path, help="MMKD_HOME of a fresh run (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    env = environment()
    if args.from_run:
        run = read_run(args.from_run)
        env["git"] = {"commit": commit_before(run["started_unix"]), "dirty": None,
                      "note": "--from-run: the newest commit older than the run's start; "
                              "uncommitted changes at that time are unknown"}
        env["libraries"] = {**env["libraries"], **(run["libraries_in_stage_key"] or {})}
        env["load_average"] = None  # unknown: the run is over
        extra = {"source": f"--from-run {args.from_run}"}
    else:
        home = args.home or Path(tempfile.mkdtemp(prefix="mmkd-default-"))
        env["git"] = git_state()
        run_dir, extra = fresh_run(home)
        run = read_run(run_dir)
        extra["source"] = f"fresh run in {home}"
    run.pop("started_unix")
    run.pop("libraries_in_stage_key")
    result = {"what": f"mmkd run {PIPELINE} from an empty store on this machine",
              "pipeline": PIPELINE, **extra, **run, "environment": env}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    acc = {m: round(r["accuracy"], 3) for m, r in run["results"].items()}
    print(f"{run['run_id']}: {run['run_wall_s']} s; accuracy {acc} -> {args.out}")


if __name__ == "__main__":
    main()
