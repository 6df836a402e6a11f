"""Executing one stage: the plain-data payload a stage task gets, the Ray task that holds the
stage's resources, and ``execute_stage`` — load the workload, fetch inputs from the store, run
it into a staging folder, check its declared outputs, publish under its key. ``mmkd run`` and
every ``mmkd tune`` trial run stages through this same code."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.artifact_store import ArtifactStore
from orchestrator.plugin import get_workload, missing_outputs
from orchestrator.ray_setup import forwarded_env
from orchestrator.spec import Pipeline, Stage


class StageFailed(RuntimeError):
    pass


def progress_hub_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressHub:
        """The run's events for the driver, and small per-stage states its stages keep here
        rather than in an actor (a process) of their own each (a dataset's bad-sample totals:
        ``workloads.data.quality.SampleQuality``)."""

        def __init__(self):
            self._events: list[tuple[str, dict]] = []
            self._hosted: dict[str, Any] = {}

        def report(self, event: dict) -> None:
            self._events.append(("metrics", event))

        def log(self, event: dict) -> None:
            self._events.append(("log", event))

        def drain(self) -> list[tuple[str, dict]]:
            events, self._events = self._events, []
            return events

        def host(self, key: str, state: Any) -> None:
            self._hosted[key] = state

        def call(self, key: str, method: str, *args: Any) -> Any:
            return getattr(self._hosted[key], method)(*args)

    return ProgressHub


def execute_stage(payload: dict[str, Any], reporter: Any = None) -> dict[str, Any]:
    """Run one stage (inside a Ray task): inputs from the store, outputs published under its
    key. An exception the driver could not unpickle (a library's own class that needs
    arguments to rebuild, such as huggingface_hub's validation errors) crosses Ray as a plain
    ``StageError`` carrying its type and message, so the user reads the cause, not Ray's
    "Failed to deserialize exception"."""
    try:
        return _execute_stage(payload, reporter)
    except Exception as e:  # noqa: BLE001 - re-raised as is, or as a StageError that can travel
        if _travels(e):
            raise
        from orchestrator.plugin import StageError

        raise StageError(f"{type(e).__module__}.{type(e).__name__}: {e}") from None


def _travels(e: BaseException) -> bool:
    """The exception survives the trip to the driver (Ray pickles it with cloudpickle)."""
    try:
        from ray import cloudpickle

        back = cloudpickle.loads(cloudpickle.dumps(e))
        return type(back) is type(e)
    except Exception:  # noqa: BLE001 - any failure means the driver would not get it either
        return False


def _execute_stage(payload: dict[str, Any], reporter: Any = None) -> dict[str, Any]:
    from orchestrator.plugin import Resources, StageContext

    info = get_workload(payload["workload"])
    config = info.config.model_validate(payload["params"])
    store = ArtifactStore(payload["store_root"], payload["local_cache"])
    inputs: dict[str, Any] = {}
    for name, refs in payload["inputs"].items():
        paths = [os.path.join(store.local_dir(wl, key), out) for wl, key, out in refs]
        inputs[name] = paths if payload["input_is_list"][name] else paths[0]
    shown = payload.get("params_shown", payload["params"])
    manifest = {"stage": payload["stage"], "pipeline": payload["pipeline"],
                "params": shown, "source_run": payload.get("mlflow_run_id"),
                "inputs": payload["inputs"], "key_parts": payload.get("key_parts")}
    started = time.time()
    from orchestrator.secret_env import redact

    manifest = redact(manifest)  # the result's record: no credentials from params or paths
    with store.writer(payload["workload"], payload["key"], manifest,
                      lease_token=payload.get("lease_token"),
                      replace=bool(payload.get("replace"))) as out_dir:
        ctx = StageContext(
            pipeline=payload["pipeline"], stage=payload["stage"], key=payload["key"],
            output_dir=out_dir, inputs=inputs, resources=Resources(**payload["resources"]),
            deepspeed=payload["deepspeed"], checkpoint_storage=store.checkpoint_storage(),
            run_name=payload["run_name"], seed=int(payload["params"].get("seed", 0) or 0),
            reporter=reporter, input_stages=payload.get("input_stages", {}),
            run_id=payload.get("run_id", ""), side_later=int(payload.get("side_later", 0)))
        metrics = info.fn(config, ctx) or {}
        missing = missing_outputs(info, out_dir)
        if missing:
            raise RuntimeError(
                f"workload {info.name!r} ({info.source}) declares output(s) "
                f"{', '.join(missing)} but did not write them into its output folder; nothing "
                f"was published. Fix the workload or its `outputs=` declaration")
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        metrics["stage/wall_seconds"] = time.time() - started
        # A stage that continued from an in-stage checkpoint says so, in its manifest and
        # (through the driver) its MLflow tags: never indistinguishable from a clean run.
        resumed = metrics.get("resumed_from_step", -1)
        if isinstance(resumed, (int, float)) and resumed >= 0:
            manifest["resumed_from_step"] = int(resumed)
        Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
        Path(out_dir, "stage.json").write_text(json.dumps(redact(
            {**{k: payload[k] for k in ("stage", "workload", "resources", "deepspeed", "inputs",
                                        "key")}, "params": shown}), indent=2))
    return {"metrics": metrics, "uri": store.uri(payload["workload"], payload["key"])}


DATA_CPUS = 1.0  # a stage's Ray Data pipeline (read, decode, tokenize): Ray Train, teacher_logits


def own_cpus(stage: Stage) -> float:
    """CPUs a running stage occupies itself: its workers (or task) and its data pipeline."""
    r = stage.resources
    data = DATA_CPUS if stage.streams_data else 0.0
    if stage.distributed:
        return r.num_workers * r.cpus_per_worker + data
    return r.cpus_per_worker + data


def stage_cpus(stage: Stage) -> float:
    """CPUs a running stage occupies, including its data pipeline and what it holds beside
    its workers (``plugin.SideResources``, e.g. a teacher service's replicas)."""
    return own_cpus(stage) + (stage.side.cpus if stage.side else 0.0)


def stages_cpus(stages: list[Stage]) -> float:
    """CPUs of stages running at once: side resources with the same key counted once (stages
    sharing one teacher service share its replicas)."""
    sides = {s.side.key: s.side.cpus for s in stages if s.side}
    return sum(own_cpus(s) for s in stages) + sum(sides.values())


def stage_payload(pipeline: Pipeline, stage: Stage, keys: dict[str, str], store: ArtifactStore,
                  mlflow_run_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """Everything a stage task needs, as plain data (it may run on another node). ``extra``:
    ``run_name`` (default: from the key), ``lease_token``, ``replace``, ``key_parts``,
    ``run_id``, ``side_later`` (see ``StageContext``)."""
    from orchestrator.secret_env import redact

    key = keys[stage.name]
    if "key_parts" in extra:
        extra["key_parts"] = redact(extra["key_parts"])
    return {
        "pipeline": pipeline.name, "stage": stage.name, "workload": stage.workload,
        "key": key, "params": stage.params, "run_name": run_name_for(stage, key), **extra,
        # what the stage's records show: masked here, where the driver's environment (and so
        # its secret values) is known; the task itself gets the real params
        "params_shown": redact(stage.params),
        "resources": stage.resources.model_dump(), "deepspeed": stage.deepspeed.model_dump(),
        "store_root": store.root if not store.is_local else store.base,
        "local_cache": str(store.local_cache), "mlflow_run_id": mlflow_run_id,
        "input_is_list": stage.input_is_list,
        "inputs": {n: [(pipeline.stages[s].workload, keys[s], out) for s, out in refs]
                   for n, refs in stage.resolved_inputs.items()},
        "input_stages": {n: [s for s, _ in refs] for n, refs in stage.resolved_inputs.items()},
    }


def side_later(stage: Stage, pending: list[Stage]) -> int:
    """How many of ``pending`` (stages not started yet) share ``stage``'s side resources."""
    if stage.side is None:
        return 0
    return sum(1 for s in pending if s is not stage and s.side and s.side.key == stage.side.key)


def release_sides(stages: list[Stage], run_id: str) -> None:
    """The run has ended: free what its stages kept for later ones (``SideResources.release``),
    once per side; a release that fails is logged, never raised."""
    seen = set()
    for s in stages:
        if s.side is None or s.side.release is None or s.side.key in seen:
            continue
        seen.add(s.side.key)
        try:
            s.side.release(run_id)
        except Exception as e:  # noqa: BLE001 - they expire on their own (hold_s)
            logging.getLogger("mmkd").warning("stage %s: releasing its %s failed: %s",
                                              s.name, s.side.what, e)


def stage_task(stage: Stage):
    """``execute_stage`` as a Ray task holding the stage's resources."""
    import ray

    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    r = stage.resources
    # Never inside a caller's placement group (a Tune trial's): the stage needs its own resources.
    options: dict[str, Any] = {
        "max_retries": 0, "name": f"mmkd:{stage.name}",
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
        # per task, not only at ray.init: Ray may already run (a cluster, a test session)
        "runtime_env": {"env_vars": forwarded_env()}}
    if stage.distributed:
        options["num_cpus"] = 0  # its Ray Train workers hold the resources
    else:
        options["num_cpus"], options["num_gpus"] = r.cpus_per_worker, r.gpus_per_worker
    return ray.remote(execute_stage).options(**options)


def run_name_for(stage: Stage, key: str) -> str:
    """Deterministic per key, so a restarted stage finds its checkpoints; no timestamps."""
    return f"{stage.workload}-{key[:16]}"
