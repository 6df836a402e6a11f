"""What a Ray Train stage costs beyond its training steps, at two controller poll intervals.

A tiny `pretrain` stage (2 steps, tiny-teacher preset, one worker, ZeRO-2) is run again and
again in one local Ray instance, each run with a new seed so that it is never cached. Runs
alternate between Ray Train's default poll interval (2 s) and mmkd's (0.5 s,
`orchestrator.ray_setup.TRAIN_POLL_S`), so both see the same machine load; the stage's wall
time (driver's record, submit to published) and the pipeline's are reported per setting as
median, min and max over the repetitions, with the ratio of medians.

    python benchmarks/train_stage_overhead.py [--reps 5] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from _env import environment  # noqa: E402

PIPE = """
name: stage_overhead
defaults:
  resources: {{num_workers: 1, cpus_per_worker: 1}}
  deepspeed: {{zero_stage: 2}}
stages:
  shapes:
    workload: shapes
    params: {{num_captions: 32, num_instruct: 8, num_eval: 4}}
  tokenizer:
    workload: tokenizer
    inputs: {{corpus: shapes.captions}}
    params: {{vocab_size: 300}}
  train:
    workload: pretrain
    inputs: {{tokenizer: tokenizer.tokenizer, data: shapes.captions}}
    params: {{model: {{preset: tiny-teacher}}, batch_size: 4, max_steps: 2,
             checkpoint_every: 0, seed: {seed}}}
"""


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/train_stage_overhead.json"))
    args = ap.parse_args()
    load_at_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-"))
    os.environ["MMKD_HOME"] = str(work / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from orchestrator.loader import load_pipeline
    from orchestrator.ray_setup import TRAIN_POLL_S, ensure_ray
    from orchestrator.runner import PipelineRunner

    ensure_ray()
    settings = {"ray_default_2.0": "2.0", f"mmkd_{TRAIN_POLL_S}": TRAIN_POLL_S}
    stage_s: dict[str, list[float]] = {k: [] for k in settings}
    pipeline_s: dict[str, list[float]] = {k: [] for k in settings}
    seed = 0
    # a warm-up run (data, tokenizer, first imports), not counted
    for rep in range(-1, args.reps):
        for name, value in settings.items():
            seed += 1
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = value
            path = work / f"pipe{seed}.yaml"
            path.write_text(PIPE.format(seed=seed))
            t = time.perf_counter()
            runner = PipelineRunner(load_pipeline(path))
            record = runner.run()
            wall = time.perf_counter() - t
            assert record.status == "success", record.error
            stage = record.stages["train"]
            assert stage.status == "done" and stage.metrics["steps"] == 2, stage
            if rep >= 0:
                stage_s[name].append(stage.ended - stage.started)
                pipeline_s[name].append(wall)
            print(f"rep {rep} {name}: stage {stage.ended - stage.started:.1f} s", flush=True)
    import ray

    ray.shutdown()
    base, ours = settings
    result = {
        "what": "wall seconds of a 2-step tiny pretrain stage (Ray Train, 1 worker, ZeRO-2) and "
                "of its pipeline run (data and tokenizer cached), alternating the Ray Train "
                "controller's poll interval",
        "reps": args.reps,
        "stage_seconds": {k: _spread(v) for k, v in stage_s.items()},
        "pipeline_seconds": {k: _spread(v) for k, v in pipeline_s.items()},
        "stage_ratio_of_medians": round(statistics.median(stage_s[ours])
                                        / statistics.median(stage_s[base]), 3),
        "stage_saving_seconds": round(statistics.median(stage_s[base])
                                      - statistics.median(stage_s[ours]), 2),
        "load_average_at_start": load_at_start,
        "environment": environment(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("stage_seconds", "stage_ratio_of_medians")},
                     indent=1))


if __name__ == "__main__":
    main()
