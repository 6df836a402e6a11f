"""Running a tune: upstream stages through the normal runner, then Ray Tune over one stage.

Trials execute the stage with the same task as `mmkd run` (artifact store, key, checkpoints), and
a small loop in the trial forwards the stage's per-step metrics to `tune.report`, so schedulers
such as ASHA can stop a trial between steps. When Tune stops a trial, its stage task (and any Ray
Train run inside it) dies with the trial actor that owns it; the driver frees the placement group
that run leaves behind (orchestrator/placement.py).

MLflow: one parent run per tune, a child per trial, written only by the driver (a Tune callback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.artifact_store import compute_keys, mmkd_home
from orchestrator.placement import Reaper
from orchestrator.console import RAY_OUTPUT_ENV
from orchestrator.executor import progress_hub_class, release_sides, stage_payload, stage_task
from orchestrator.plan import code_fingerprints, fingerprints, store_for
from orchestrator.ray_setup import ensure_ray
from orchestrator.runner import PipelineRunner
from orchestrator.spec import Pipeline
from orchestrator.tracking import Tracker, default_tracking_uri, driver_tag
from orchestrator.tune_spec import (TuneSpec, default_concurrency, param_space, select_chain,
                                 tune_name, upstream_pipeline)

logger = logging.getLogger("mmkd.tune")

# Keys Tune adds to every result; everything else a trial reports is the stage's own metric.
_TUNE_KEYS = {"time_this_iter_s", "time_total_s", "timestamp", "training_iteration", "pid",
              "iterations_since_restore", "time_since_restore", "done", "config", "trial_id",
              "date", "hostname", "node_ip", "experiment_tag", "checkpoint_dir_name",
              "should_checkpoint", "mmkd_completed", "mmkd_step"}


def _trial(config: dict[str, Any], *, base: dict[str, Any]) -> None:
    """One trial: run the tuned stage with the trial's params; forward its metrics to Tune."""
    import ray
    from ray import tune

    from orchestrator.artifact_store import ArtifactStore, stage_key
    from orchestrator.spec import Stage

    stage: Stage = base["stage"]
    params = {**stage.params, **config}
    stage = Stage(**{**stage.__dict__, "config": type(stage.config).model_validate(params)})
    keys = dict(base["keys"])
    keys[stage.name] = stage_key(stage, keys, base["fingerprint"], base["codes"][stage.name])
    store = ArtifactStore(base["store_root"], base["local_cache"])
    metric = base["metric"]
    last: dict[str, float] = {}
    recent: deque[float] = deque(maxlen=base["smooth"])  # the metric's last N per-step values
    last_step = 0
    # the key's lease, as `mmkd run` takes it: a trial whose params another trial, sweep or run
    # is computing waits for that result instead of training into the same checkpoint folder
    lease = _lease_or_result(store, stage, keys[stage.name])
    if lease is None:  # same params seen before
        final = _numeric(store.read_json(stage.workload, keys[stage.name], "metrics.json") or {})
    else:
        payload = stage_payload(base["pipeline"], stage, keys, store, lease_token=lease.token,
                                run_id=base["run_id"], side_later=base["side_later"])
        hub = progress_hub_class().remote()
        ref = stage_task(stage).remote(payload, hub)
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            lease.heartbeat()
            for kind, event in ray.get(hub.drain.remote()):
                if kind == "metrics" and metric in event["metrics"]:
                    recent.append(float(event["metrics"][metric]))
                    last = {**event["metrics"], f"{metric}_step": recent[-1],
                            metric: sum(recent) / len(recent)}
                    last_step = event["step"] or last_step
                    tune.report({**last, "mmkd_step": last_step})
            if ready:
                break
        try:
            result = ray.get(ref)  # raises if the stage failed: Tune marks the trial errored
        finally:
            lease.release()
        final = {**_numeric(result["metrics"]), **last} if recent else _numeric(result["metrics"])
    # Tune rejects a result without its metric; a stage cached before it reported the metric in
    # its final metrics (only per step) has no value for it: NaN, and it ranks by `select`.
    final.setdefault(metric, float("nan"))
    # select: run the stages from this one to the evaluation stage on this trial's output
    # (e.g. SFT → DFT → evaluate after a tuned DPT); the last one's metrics rank the trials.
    for down in base["chain"]:
        keys[down.name] = stage_key(down, keys, base["fingerprints"].get(down.name),
                                    base["codes"][down.name])
        # under the key's lease, as every publish: two trials (or a run) reaching the same
        # downstream key never train into one checkpoint folder or publish over each other
        down_lease = _lease_or_result(store, down, keys[down.name])
        if down_lease is None:
            done = store.read_json(down.workload, keys[down.name], "metrics.json") or {}
        else:
            try:
                done = ray.get(stage_task(down).remote(stage_payload(
                    base["pipeline"], down, keys, store, lease_token=down_lease.token)))["metrics"]
            finally:
                down_lease.release()
        if down is base["chain"][-1]:
            final.update(_numeric(done))
    # the final result belongs to the stage's last step (not one past it in the MLflow curve)
    tune.report({**final, "mmkd_completed": 1, "mmkd_step": int(final.get("steps") or last_step),
                 "mmkd_key": keys[stage.name]})


def _lease_or_result(store: Any, stage: Any, key: str) -> Any:
    """The key's lease once this trial holds it, or None when its result is (or becomes)
    published."""
    import time

    lease = store.lease(stage.workload, key, {"run_id": "tune", "stage": stage.name})
    while not store.is_complete(stage.workload, key):
        if lease.try_acquire():
            if store.is_complete(stage.workload, key):  # published just before we took it
                lease.release()
                return None
            return lease
        time.sleep(1.0)
    return None


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TuneState:
    """``tune_state.json`` beside the tune's results: the MLflow parent run, each trial's child
    run and how often Tune started each trial, so ``--resume`` continues the same MLflow runs."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data: dict[str, Any] = {"parent_run_id": None, "trials": {}, "starts": {}}
        if path.exists() and not fresh:
            self.data.update(json.loads(path.read_text()))

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


class MlflowTrials:
    """A Tune callback (created lazily so Ray is imported only when tuning)."""

    def __new__(cls, tracker: Tracker, stage: str, metric: str, state: TuneState):
        from ray.tune import Callback

        class _Callback(Callback):
            def __init__(self):
                self.completed: set[str] = set()
                self.results: dict[str, list[dict]] = {}
                # A stopped trial's Ray Train run leaves its placement group behind; free it,
                # or the next trial waits for those CPUs forever (orchestrator/placement.py).
                self.reaper = Reaper()

            def on_step_begin(self, iteration, trials, **info):
                self.reaper.maybe_reap()

            def on_trial_start(self, iteration, trials, trial, **info):
                tid = trial.trial_id
                if tid in tracker.ids:  # a trial of the interrupted tune, started again
                    tracker.reopen_stage(tid)
                else:
                    tracker.start_stage(tid, params=dict(trial.config), tags={
                        "mmkd.trial": tid, "mmkd.stage": stage, "mmkd.kind": "trial"})
                state.data["starts"][tid] = state.data["starts"].get(tid, 0) + 1
                if tracker.run_id(tid):
                    state.data["trials"][tid] = tracker.run_id(tid)
                state.save()

            def on_trial_result(self, iteration, trials, trial, result, **info):
                self.results.setdefault(trial.trial_id, []).append(result)
                metrics = {k: v for k, v in result.items()
                           if k not in _TUNE_KEYS and isinstance(v, (int, float))
                           and not isinstance(v, bool)}
                if result.get("mmkd_completed"):
                    self.completed.add(trial.trial_id)
                if trial.trial_id not in tracker.ids:
                    self.on_trial_start(iteration, trials, trial)
                tracker.log_metrics(trial.trial_id, metrics, int(result.get("mmkd_step") or
                                                                 result.get("training_iteration", 0)))

            def on_trial_complete(self, iteration, trials, trial, **info):
                if trial.trial_id not in tracker.ids:
                    return
                stopped = trial.trial_id not in self.completed
                tracker.set_tags(trial.trial_id, {"mmkd.stopped_early": str(stopped).lower()})
                tracker.end_stage(trial.trial_id, "KILLED" if stopped else "FINISHED")

            def on_trial_error(self, iteration, trials, trial, **info):
                if trial.trial_id in tracker.ids:
                    tracker.end_stage(trial.trial_id, "FAILED")

        return _Callback()


@dataclass
class TuneOutcome:
    name: str
    trials: list[dict[str, Any]]  # sorted best first
    best_params: dict[str, Any]
    best_params_file: Path
    run_line: str
    stopped_early: int
    steps_run: int
    steps_budget: int
    parent_run_id: str | None
    freed_groups: int = 0  # placement groups of stopped trials' Ray Train runs mmkd removed


def run_tune(spec: TuneSpec, pipeline: Pipeline, tune_file: str, *, resume: bool = False,
             overrides: list[str] = ()) -> TuneOutcome:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # 1. Upstream stages: the ordinary runner, so they are cached and reused by every trial.
    upstream = upstream_pipeline(pipeline, spec.stage, spec.select.stage if spec.select else None)
    if upstream.stages:
        record = PipelineRunner(upstream, overrides=list(overrides)).run()
        if record.status != "success":
            raise RuntimeError(f"upstream stages of {spec.stage!r} failed: {record.error}")
    ensure_ray()
    name = tune_name(spec, pipeline)
    out_dir = mmkd_home() / "tune" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = pipeline.stages[spec.stage]
    store = store_for(pipeline)
    prints, codes = fingerprints(pipeline), code_fingerprints(pipeline)
    base = {"stage": stage, "keys": compute_keys(pipeline.stages, prints, codes),
            "fingerprint": prints.get(spec.stage), "codes": codes, "pipeline": pipeline,
            "store_root": store.root if not store.is_local else store.base,
            "local_cache": str(store.local_cache), "metric": spec.metric, "smooth": spec.smooth,
            "chain": select_chain(pipeline, spec.stage, spec.select.stage)
            if spec.select else [], "fingerprints": prints,
            # the trials share the stage's side resources (a teacher service): each keeps them
            # for the next, and the tune's end frees them (release_sides below)
            "run_id": f"tune-{name}", "side_later": 1}
    budget = spec.scheduler.max_t or _stage_steps(stage)

    # 2. MLflow parent run for the tune; one writer (this process). A resumed tune continues
    #    the interrupted one's parent and trial runs (ids in tune_state.json).
    # Tune's experiment dir is a subfolder: Tune syncs that folder from a local staging copy
    # (restored with the experiment), which would overwrite mmkd's files written beside it.
    experiment = out_dir / "ray_tune"
    restoring = resume and tune.Tuner.can_restore(str(experiment))
    if resume and not restoring:
        logger.warning("--resume: no interrupted tune %s under %s; starting it from the beginning",
                       name, out_dir)
    state = TuneState(out_dir / "tune_state.json", fresh=not restoring)
    tracker = Tracker(pipeline.name, out_dir / "tracking_journal.jsonl", uri=default_tracking_uri())
    if state.data["parent_run_id"]:
        tracker.resume_pipeline(state.data["parent_run_id"], stages=state.data["trials"])
    else:
        tracker.start_pipeline(f"tune-{name}", params={"tune_file": os.path.abspath(tune_file),
                                                       **{f"space.{k}": json.dumps(v)
                                                          for k, v in spec.space.items()}},
                               tags={"mmkd.pipeline": pipeline.name, "mmkd.kind": "tune",
                                     "mmkd.tune": name, "mmkd.driver": driver_tag()})
    state.data["parent_run_id"] = tracker.run_id()
    state.save()
    callback = MlflowTrials(tracker, spec.stage, spec.metric, state)

    # A trial only waits on its stage task, which takes the stage's resources itself. It must
    # hold no CPU: with 0.1 CPU per trial, a 1-worker DFT on 2 CPUs left Ray Data 0.9 CPU and
    # its read tasks (1 CPU each) never started (seen). Ray wants a non-empty bundle: 1 MiB.
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base),
                                    {"cpu": 0, "memory": 2**20})
    if restoring:
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True,
                                   resume_errored=True)
        # Callbacks are not persisted with the experiment; attach ours to the restored config.
        tuner._local_tuner.get_run_config().callbacks = [callback]
    else:
        if spec.scheduler.type == "asha":
            # max_t one past the budget: ASHA stops any trial that reaches max_t, and a trial at
            # its last step must still report completion (and run its `select` evaluation).
            scheduler = ASHAScheduler(time_attr="mmkd_step", max_t=max(budget, 1) + 1,
                                      grace_period=spec.scheduler.grace_period,
                                      reduction_factor=spec.scheduler.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        search = None
        if spec.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search = OptunaSearch(seed=spec.seed)
        tuner = tune.Tuner(
            trainable, param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                search_alg=search, scheduler=scheduler,
                max_concurrent_trials=spec.max_concurrent_trials
                or default_concurrency(pipeline, spec.stage)),
            run_config=tune.RunConfig(name=experiment.name, storage_path=str(out_dir),
                                      callbacks=[callback],
                                      verbose=0))
    status = "FINISHED"
    try:
        with _quiet_stdout():
            grid = tuner.fit()
    except BaseException:
        status = "KILLED"
        raise
    finally:
        release_sides([stage], base["run_id"])
        if status != "FINISHED":
            tracker.end_pipeline(status)
    return _summarise(spec, pipeline, grid, callback, tracker, out_dir, name, budget, tune_file)


@contextlib.contextmanager
def _quiet_stdout():
    """Ray Tune prints its configuration box and result paths with print(): into the run's
    output.log when `mmkd tune` routes Ray's output there (not --verbose)."""
    target = os.environ.get(RAY_OUTPUT_ENV)
    if not target:
        yield
        return
    with open(target, "a", buffering=1) as stream, contextlib.redirect_stdout(stream):
        yield


def _stage_steps(stage) -> int:
    for field in ("max_steps", "steps"):
        value = getattr(stage.config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def _summarise(spec, pipeline, grid, callback, tracker, out_dir, name, budget, tune_file) -> TuneOutcome:
    rank_metric, rank_mode = ((spec.select.metric, spec.select.mode) if spec.select
                              else (spec.metric, spec.mode))
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (result.path or "").rsplit("_", 1)[-1]
        history = callback.results.get(trial_id, [])
        steps = max([int(r.get("mmkd_step") or 0) for r in history] or [int(metrics.get("mmkd_step") or 0)])
        trials.append({"trial": trial_id, "params": {k: result.config[k] for k in spec.space},
                       spec.metric: metrics.get(spec.metric),
                       rank_metric: metrics.get(rank_metric),  # None for a stopped select trial
                       "steps": steps, "completed": bool(metrics.get("mmkd_completed")),
                       "error": str(result.error) if result.error else ""})
    ok = [t for t in trials if t[rank_metric] is not None and t[rank_metric] == t[rank_metric]
          and not t["error"]]  # (x == x: not NaN)
    ok.sort(key=lambda t: t[rank_metric], reverse=rank_mode == "max")
    if not ok:
        tracker.end_pipeline("FAILED")
        raise RuntimeError(f"no trial of {name} reported {rank_metric!r}; "
                           f"errors: {[t['error'][:200] for t in trials if t['error']]}")
    best = ok[0]
    best_file = out_dir / "best_params.json"
    best_file.write_text(json.dumps({"stage": spec.stage, "metric": rank_metric, "mode": rank_mode,
                                     "value": best[rank_metric], "params": best["params"],
                                     "trial": best["trial"]}, indent=2))
    sets = " ".join(f"--set stages.{pipeline.stages[spec.stage].base}.params.{k}={v}"
                    for k, v in best["params"].items())
    run_line = f"mmkd run {pipeline.path} {sets}"
    (out_dir / "trials.json").write_text(json.dumps(ok + [t for t in trials if t not in ok], indent=2))
    tracker.log_metrics("__pipeline__", {f"best_{rank_metric}": float(best[rank_metric])})
    tracker.set_tags("__pipeline__", {"mmkd.best_trial": best["trial"]})
    tracker.log_artifact("__pipeline__", str(best_file))
    tracker.end_pipeline("FINISHED")
    steps_run = sum(t["steps"] for t in trials)
    return TuneOutcome(name=name, trials=ok + [t for t in trials if t not in ok],
                       best_params=best["params"], best_params_file=best_file, run_line=run_line,
                       stopped_early=sum(not t["completed"] and not t["error"] for t in trials),
                       steps_run=steps_run, steps_budget=budget * len(trials),
                       parent_run_id=tracker.run_id(),
                       freed_groups=len(callback.reaper.removed))

