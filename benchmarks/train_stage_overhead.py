"""What a Ray Train stage costs beyond its training steps, under Ray Train's defaults and mmkd's.

A tiny `pretrain` stage (2 steps, tiny-teacher preset, one worker, ZeRO-2) is run again and
again in one local Ray instance, each run with a new seed so that it is never cached. Runs
alternate between four settings, so all see the same machine load: Ray Train's defaults
(controller poll interval 2 s, a preemption watcher, a placement group cleaner and a dataset
manager per run), mmkd's poll interval (0.5 s, `orchestrator.ray_setup.TRAIN_POLL_S`) with
the watcher, the same without the watcher (`PREEMPTION_WATCHER_ENV`, off on a local instance
mmkd starts), and mmkd's local setting: also without the cleaner and, for a one-worker run,
the dataset manager (`workloads.train_loop_parts.trainer_class`; the first three settings
keep them with `MMKD_RAY_TRAIN_CALLBACKS=ray`). All four keep a stage's bad-sample totals in
the run's progress hub. The stage's wall time (driver's record, submit
to published) and the pipeline's are reported per setting as median, min and max over the
repetitions, with the ratios of medians to Ray's defaults.

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
    from orchestrator.ray_setup import PREEMPTION_WATCHER_ENV, TRAIN_POLL_S, ensure_ray
    from orchestrator.runner import PipelineRunner
    from workloads.train_loop_parts import TRAIN_CALLBACKS_ENV

    ensure_ray()
    poll, watch, cbs = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", PREEMPTION_WATCHER_ENV, \
        TRAIN_CALLBACKS_ENV
    settings = {"ray_default": {poll: "2.0", watch: "1", cbs: "ray"},
                "poll_0.5": {poll: TRAIN_POLL_S, watch: "1", cbs: "ray"},
                "poll_0.5_no_watcher": {poll: TRAIN_POLL_S, watch: "0", cbs: "ray"},
                "mmkd_local": {poll: TRAIN_POLL_S, watch: "0", cbs: "mmkd"}}
    stage_s: dict[str, list[float]] = {k: [] for k in settings}
    pipeline_s: dict[str, list[float]] = {k: [] for k in settings}
    seed = 0
    # a warm-up run (data, tokenizer, first imports), not counted
    for rep in range(-1, args.reps):
        for name, env in settings.items():
            seed += 1
            os.environ.update(env)  # forwarded to the stage task (orchestrator.ray_setup)
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
    med = {k: statistics.median(v) for k, v in stage_s.items()}
    result = {
        "what": "wall seconds of a 2-step tiny pretrain stage (Ray Train, 1 worker, ZeRO-2) and "
                "of its pipeline run (data and tokenizer cached), alternating Ray Train's "
                "controller poll interval, its preemption watcher, and its placement group "
                "cleaner and dataset manager",
        "reps": args.reps,
        "settings": settings,
        "stage_seconds": {k: _spread(v) for k, v in stage_s.items()},
        "pipeline_seconds": {k: _spread(v) for k, v in pipeline_s.items()},
        "stage_ratio_of_medians": {k: round(med[k] / med["ray_default"], 3) for k in med},
        "stage_saving_seconds": {k: round(med["ray_default"] - med[k], 2) for k in med},
        "load_average_at_start": load_at_start,
        "environment": environment(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("stage_seconds", "stage_ratio_of_medians")},
                     indent=1))


if __name__ == "__main__":
    main()
