"""Runs a pipeline's DAG on Ray.

Every stage whose upstreams are done runs as a Ray task as soon as it is ready, so independent
stages overlap as far as the cluster's resources allow. A stage task loads its workload from the
registry, writes into a staging directory, and publishes the result under its key in the
artifact store. The driver is the only MLflow writer: stages send per-step metrics to a small
progress actor, which the driver drains into MLflow and the live view.

A fully cached pipeline never starts Ray.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.cache import ArtifactStore, compute_key_parts, mmkd_home
from orchestrator.keys import code_fingerprint, explain_change
from orchestrator.lease import Lease
from orchestrator.dag import ready_stages
from orchestrator.placement import Reaper
from orchestrator.runs import RunRecord, StageRecord, list_runs
from orchestrator.spec import Pipeline, Stage
from orchestrator.tracking import Tracker, default_tracking_uri, driver_tag
from orchestrator.fingerprint import config_fingerprint
from orchestrator.plugin import get_workload, missing_outputs

logger = logging.getLogger("mmkd")

# Environment a stage process needs to see what the driver sees (a cluster's workers don't
# inherit the driver's shell).
_FORWARD_ENV = ("MLFLOW_TRACKING_URI", "MMKD_HOME", "DS_ACCELERATOR", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "TOKENIZERS_PARALLELISM")


class StageFailed(RuntimeError):
    pass


@dataclass
class PlanRow:
    name: str
    workload: str
    key: str
    status: str  # "cached" | "run" | "forced"
    upstream: list[str]
    resources: str
    uri: str
    reason: str = ""  # why it runs: which key part changed since this stage's last result


def fingerprints(pipeline: Pipeline) -> dict[str, dict[str, str]]:
    """Per stage, the fingerprint of the external files it reads (the workload's hook)."""
    out = {}
    for name, stage in pipeline.stages.items():
        hook = get_workload(stage.workload).fingerprint or config_fingerprint
        found = hook(stage.config)
        out[name] = found if isinstance(found, dict) else {"data": str(found)}
    return out


def code_fingerprints(pipeline: Pipeline) -> dict[str, dict[str, str]]:
    """Per stage, the hashes of the workload's module and the project modules it imports."""
    by_workload: dict[str, dict[str, str]] = {}
    for stage in pipeline.stages.values():
        if stage.workload not in by_workload:
            by_workload[stage.workload] = code_fingerprint(get_workload(stage.workload).fn.__module__)
    return {name: by_workload[s.workload] for name, s in pipeline.stages.items()}


def pipeline_keys(pipeline: Pipeline, offline: bool = False
                  ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Keys and key parts of every stage; ``offline`` leaves out the external files."""
    return compute_key_parts(pipeline.stages, {} if offline else fingerprints(pipeline),
                             code_fingerprints(pipeline))


def store_for(pipeline: Pipeline, root: str | None = None) -> ArtifactStore:
    root = (root or os.environ.get("MMKD_STORE") or pipeline.spec.store
            or str(mmkd_home() / "artifacts"))
    return ArtifactStore(root)


def resolve_force(pipeline: Pipeline, force: list[str]) -> set[str]:
    """`--force` stages and everything downstream of them."""
    return pipeline.downstream_of(pipeline.match(force, "--force"))


def make_plan(pipeline: Pipeline, store: ArtifactStore | None, force: list[str] = (),
              offline: bool = False) -> list[PlanRow]:
    """The stages in order with their keys; ``store=None`` (offline) means cache unknown."""
    keys, parts = pipeline_keys(pipeline, offline)
    forced = resolve_force(pipeline, list(force))
    rows = []
    for name, s in pipeline.stages.items():
        cached = store is not None and store.is_complete(s.workload, keys[name])
        status = "forced" if name in forced and cached else ("cached" if cached else "run")
        r = s.resources
        res = (f"{r.num_workers}x({r.cpus_per_worker:g} cpu, {r.gpus_per_worker:g} gpu)"
               + (f" zero{s.deepspeed.zero_stage} {s.deepspeed.precision}" if s.distributed else ""))
        rows.append(PlanRow(name, s.workload, keys[name], status, list(s.upstream), res,
                            store.uri(s.workload, keys[name]) if store else "",
                            _reason(pipeline, s, status, keys[name], parts[name], store)))
    return rows


def _reason(pipeline: Pipeline, stage: Stage, status: str, key: str, parts: dict[str, Any],
            store: ArtifactStore | None) -> str:
    if status == "forced":
        return "--force"
    if status == "cached" or store is None:
        return ""
    previous = store.read_index(pipeline.name, stage.name)
    if previous is None:
        return "no earlier result of this stage"
    if previous.get("key") == key:
        return "its earlier result was removed or never completed"
    inputs = {n: [s for s, _ in refs] for n, refs in stage.resolved_inputs.items()}
    return explain_change(previous.get("parts") or {}, parts, inputs)


def forwarded_env() -> dict[str, str]:
    """The driver's settings a stage process must see — never its secrets: a task's runtime_env
    is shown in plain text by Ray's dashboard and logs. Stage tasks read the store's credentials
    on their node (the raylet's environment, ~/.aws, an instance role: secret_env.py)."""
    from orchestrator.console import RAY_OUTPUT_ENV
    from orchestrator.secret_env import looks_secret

    env = {k: v for k, v in os.environ.items()
           if (k in _FORWARD_ENV or k.startswith(("AWS_", "MMKD_"))) and not looks_secret(k)
           and k != RAY_OUTPUT_ENV}
    env.setdefault("MMKD_HOME", str(mmkd_home()))
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS"):  # `mmkd run` without --verbose
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"]
    return env


def ensure_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # No runtime_env here: every stage task carries the driver's environment itself
    # (`stage_task`), which also works when Ray was started by someone else or inside a job.
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        start_local_ray(configure_logging=False)
    from orchestrator.console import divert_worker_output

    divert_worker_output()  # workers' output to the run's output.log unless `--verbose`


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init`` of a new local instance, with its dashboard (the state API): Ray Train's
    PlacementGroupCleaner asks it whether a run's controller is still alive, and without it
    never frees the placement group of a run whose owner was killed — a Tune trial stopped by
    ASHA, say — so the next trial waits forever for CPUs (seen). A free port: another local
    Ray may hold 8265. RAY_API_SERVER_ADDRESS, set before Ray starts so its workers inherit it,
    points that state-API client at this instance even when the host runs another Ray."""
    import ray

    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=True, dashboard_port=port, **init_kwargs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def progress_hub_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressHub:
        def __init__(self):
            self._events: list[tuple[str, dict]] = []

        def report(self, event: dict) -> None:
            self._events.append(("metrics", event))

        def log(self, event: dict) -> None:
            self._events.append(("log", event))

        def drain(self) -> list[tuple[str, dict]]:
            events, self._events = self._events, []
            return events

    return ProgressHub


def execute_stage(payload: dict[str, Any], reporter: Any = None) -> dict[str, Any]:
    """Run one stage (inside a Ray task): inputs from the store, outputs published under its key."""
    from orchestrator.plugin import Resources, StageContext

    info = get_workload(payload["workload"])
    config = info.config.model_validate(payload["params"])
    store = ArtifactStore(payload["store_root"], payload["local_cache"])
    inputs: dict[str, Any] = {}
    for name, refs in payload["inputs"].items():
        paths = [os.path.join(store.local_dir(wl, key), out) for wl, key, out in refs]
        inputs[name] = paths if payload["input_is_list"][name] else paths[0]
    manifest = {"stage": payload["stage"], "pipeline": payload["pipeline"],
                "params": payload["params"], "source_run": payload.get("mlflow_run_id"),
                "inputs": payload["inputs"], "key_parts": payload.get("key_parts")}
    started = time.time()
    with store.writer(payload["workload"], payload["key"], manifest,
                      lease_token=payload.get("lease_token"),
                      replace=bool(payload.get("replace"))) as out_dir:
        ctx = StageContext(
            pipeline=payload["pipeline"], stage=payload["stage"], key=payload["key"],
            output_dir=out_dir, inputs=inputs, resources=Resources(**payload["resources"]),
            deepspeed=payload["deepspeed"], checkpoint_storage=store.checkpoint_storage(),
            run_name=payload["run_name"], seed=int(payload["params"].get("seed", 0) or 0),
            reporter=reporter)
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
        Path(out_dir, "stage.json").write_text(json.dumps(
            {k: payload[k] for k in ("stage", "workload", "params", "resources", "deepspeed",
                                     "inputs", "key")}, indent=2))
    return {"metrics": metrics, "uri": store.uri(payload["workload"], payload["key"])}


DATA_CPUS = 1.0  # a stage's Ray Data pipeline (read, decode, tokenize): Ray Train, teacher_logits


def stage_cpus(stage: Stage) -> float:
    """CPUs a running stage occupies, including its data pipeline."""
    r = stage.resources
    data = DATA_CPUS if stage.streams_data else 0.0
    if stage.distributed:
        return r.num_workers * r.cpus_per_worker + data
    return r.cpus_per_worker + data


def stage_payload(pipeline: Pipeline, stage: Stage, keys: dict[str, str], store: ArtifactStore,
                  mlflow_run_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """Everything a stage task needs, as plain data (it may run on another node). ``extra``:
    ``run_name`` (default: from the key), ``lease_token``, ``replace``, ``key_parts``."""
    key = keys[stage.name]
    return {
        "pipeline": pipeline.name, "stage": stage.name, "workload": stage.workload,
        "key": key, "params": stage.params, "run_name": run_name_for(stage, key), **extra,
        "resources": stage.resources.model_dump(), "deepspeed": stage.deepspeed.model_dump(),
        "store_root": store.root if not store.is_local else store.base,
        "local_cache": str(store.local_cache), "mlflow_run_id": mlflow_run_id,
        "input_is_list": stage.input_is_list,
        "inputs": {n: [(pipeline.stages[s].workload, keys[s], out) for s, out in refs]
                   for n, refs in stage.resolved_inputs.items()},
    }


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


class PipelineRunner:
    def __init__(self, pipeline: Pipeline, *, force: list[str] = (), resume: bool = False,
                 store_root: str | None = None, tracking_uri: str | None = None,
                 overrides: list[str] = (), view: Any = None):
        self.pipeline = pipeline
        self.store = store_for(pipeline, store_root)
        self.forced = resolve_force(pipeline, list(force))
        self.keys, self.key_parts = pipeline_keys(pipeline)
        self.view = view
        self.record = self._open_record(resume, list(overrides), tracking_uri)
        self.tracker = Tracker(pipeline.name, self.record.journal,
                               uri=tracking_uri or default_tracking_uri())
        # --resume continues the old MLflow parent run if it lives in the same store
        self._resume_parent = (self.record.mlflow_run_id
                               if self.record.tracking_uri == self.tracker.uri else None)
        self.record.tracking_uri = self.tracker.uri
        self._last_save = 0.0
        self.ray_started = False  # a fully cached pipeline never needs Ray
        self.leases: dict[str, Lease] = {}  # stage name -> the key lease this driver holds

    # -- setup ----------------------------------------------------------------------------
    def _open_record(self, resume: bool, overrides: list[str], uri: str | None) -> RunRecord:
        if resume:
            for prev in list_runs(self.pipeline.name):
                if prev.status in ("killed", "failed", "interrupted"):
                    prev.status, prev.driver, prev.ended, prev.error = "running", driver_tag(), None, ""
                    logger.info("resuming run %s", prev.run_id)
                    return self._sync_stages(prev)
                break
        record = RunRecord(run_id=RunRecord.new_id(), pipeline=self.pipeline.name,
                           path=os.path.abspath(self.pipeline.path), overrides=overrides,
                           started=time.time(), driver=driver_tag())
        return self._sync_stages(record)

    def _sync_stages(self, record: RunRecord) -> RunRecord:
        stages = {}
        for name, s in self.pipeline.stages.items():
            old = record.stages.get(name)
            if old is not None and old.key == self.keys[name] and old.status in ("done", "cached"):
                stages[name] = old
            else:
                stages[name] = StageRecord(name=name, workload=s.workload, key=self.keys[name])
                if old is not None and old.key == self.keys[name]:
                    stages[name].run_name = old.run_name  # a resumed forced run: its checkpoints
        record.stages = stages
        return record

    def _save(self, force: bool = False) -> None:
        if force or time.time() - self._last_save > 1.0:
            self.record.save()
            self._last_save = time.time()
        if self.view is not None:
            self.view.update(self.record)

    # -- main loop ------------------------------------------------------------------------
    def run(self) -> RunRecord:
        if self._resume_parent:
            self.tracker.resume_pipeline(self._resume_parent, {
                n: s.mlflow_run_id for n, s in self.record.stages.items() if s.mlflow_run_id})
        if self.tracker.run_id() is None:
            self._start_parent()
        try:
            self._run_stages()
        finally:
            for lease in self.leases.values():
                lease.release()
        return self.record

    def _start_parent(self) -> None:
        p = self.pipeline
        self.tracker.start_pipeline(
            self.record.run_id,
            params={"pipeline_file": p.path, "overrides": self.record.overrides},
            tags={"mmkd.pipeline": p.name, "mmkd.run_id": self.record.run_id,
                  "mmkd.driver": self.record.driver, "mmkd.kind": "pipeline"})
        self.record.mlflow_run_id = self.tracker.run_id()
        if self.tracker.online:
            self.tracker.log_artifact("__pipeline__", p.path, "pipeline")

    def _cached(self, name: str) -> bool:
        """The key's result exists and this run is not forcing it to be recomputed."""
        stage = self.pipeline.stages[name]
        return name not in self.forced and self.store.is_complete(stage.workload, self.keys[name])

    def _run_stages(self) -> None:
        p = self.pipeline
        done: set[str] = set()
        for name, stage in p.stages.items():
            rec = self.record.stages[name]
            if name not in self.forced and (rec.status in ("done", "cached") or self._cached(name)):
                self._mark_cached(stage, rec)
                done.add(name)
        self._save(force=True)
        if self.view is not None:
            self.view.start(self.record)
        try:
            self._loop(done)
        except KeyboardInterrupt:
            self._finish("interrupted", "interrupted by the user (Ctrl-C); run again with "
                         "--resume to continue")
            raise
        finally:
            if self.view is not None:
                self.view.stop(self.record)

    def _take_lease(self, name: str) -> bool:
        """Hold the stage key's lease, or record which driver does (the stage then waits)."""
        stage, key = self.pipeline.stages[name], self.keys[name]
        lease = self.leases.get(name) or self.store.lease(
            stage.workload, key, {"run_id": self.record.run_id, "stage": name,
                                  "pipeline": self.pipeline.name})
        rec = self.record.stages[name]
        if lease.try_acquire():
            self.leases[name] = lease
            rec.waiting_for = ""
            return True
        if not rec.waiting_for:
            rec.status, rec.waiting_for = "waiting", lease.describe_holder()
            logger.info("stage %s waits: its key is being computed by %s", name, rec.waiting_for)
        return False

    def _release(self, name: str) -> None:
        lease = self.leases.pop(name, None)
        if lease is not None:
            lease.release()

    def _loop(self, done: set[str]) -> None:
        stages = self.pipeline.stages
        failed: set[str] = set()
        started = set(done)
        inflight: dict[Any, str] = {}
        waiting: set[str] = set()
        hub = None
        reaper = Reaper()  # frees the groups of Ray Train runs whose stage task died
        while True:
            running_keys = {self.keys[n] for n in inflight.values()}
            waiting.clear()
            for name in ready_stages(stages, done, started, failed):
                stage, key = stages[name], self.keys[name]
                if key in running_keys:
                    continue  # an identical stage is running: reuse its result when it lands
                if inflight and not self._fits(stage, [stages[n] for n in inflight.values()]):
                    continue  # wait: starting it now would starve a running stage
                if self._cached(name):
                    started.add(name)
                    self._release(name)
                    self._mark_cached(stage, self.record.stages[name])
                    done.add(name)
                    continue
                if not self._take_lease(name):
                    waiting.add(name)  # another driver computes this key: look again soon
                    continue
                if self._cached(name):  # published between our check and the lease
                    continue
                if hub is None:
                    ensure_ray()
                    self.ray_started = True
                    hub = progress_hub_class().remote()
                started.add(name)
                running_keys.add(key)
                try:
                    inflight[self._submit(stage, hub)] = name
                except StageFailed as e:
                    self._stage_failed(name, str(e))
                    failed.add(name)
            for name in stages:  # downstream of a failure can never run
                if name not in started and any(u in failed for u in stages[name].upstream):
                    started.add(name)
                    self.record.stages[name].status = "skipped"
                    failed.add(name)
            self._heartbeat(inflight)
            if not inflight:
                if waiting:
                    self._save()
                    time.sleep(0.5)
                    continue
                if ready_stages(stages, done, started, failed):
                    continue  # twins of stages that just finished: now cached
                break
            import ray

            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            self._drain(hub)
            reaper.maybe_reap()
            for ref in ready:
                name = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - any stage error is reported, not raised
                    self._drain(hub)
                    self._stage_failed(name, _error_text(e))
                    failed.add(name)
                else:
                    self._drain(hub)
                    self._stage_done(name, result)
                    done.add(name)
                self._release(name)
            self._save()
        if failed:
            first = next(n for n in stages if n in failed and self.record.stages[n].error)
            self._finish("failed", f"stage {first!r} failed: {self.record.stages[first].error}")
        else:
            self._finish("success", "")

    def _heartbeat(self, inflight: dict[Any, str]) -> None:
        for name in list(self.leases):
            if not self.leases[name].heartbeat() and name in inflight.values():
                # its stage task will refuse to publish (the token check in the store)
                logger.warning("stage %s: lost its key's lease to another driver", name)

    def _submit(self, stage: Stage, hub: Any):
        key = self.keys[stage.name]
        rec = self.record.stages[stage.name]
        self._check_resources(stage)
        self.tracker.start_stage(stage.name, params=stage.params, tags={
            "mmkd.stage": stage.name, "mmkd.workload": stage.workload, "mmkd.key": key,
            "mmkd.cached": "false", "mmkd.pipeline": self.pipeline.name,
            "mmkd.forced": str(stage.name in self.forced).lower(),
            **{f"mmkd.matrix.{k}": str(v) for k, v in stage.matrix_values.items()}})
        self.tracker.log_metrics(stage.name, {}, 0)
        rec.mlflow_run_id = self.tracker.run_id(stage.name)
        rec.status, rec.started, rec.error = "running", time.time(), ""
        if not rec.run_name:
            # A forced rerun trains from scratch in a folder of its own: the previous run's
            # checkpoints (and result) stay until the new result replaces them.
            rec.run_name = run_name_for(stage, key) + (
                f"-force-{self.record.run_id.removeprefix('run-')}" if stage.name in self.forced
                else "")
        payload = stage_payload(self.pipeline, stage, self.keys, self.store, rec.mlflow_run_id,
                                run_name=rec.run_name, lease_token=self.leases[stage.name].token,
                                replace=stage.name in self.forced,
                                key_parts=self.key_parts[stage.name])
        self._save(force=True)
        return stage_task(stage).remote(payload, hub)

    def _fits(self, stage: Stage, running: list[Stage]) -> bool:
        """Admission control: launch a stage only if the CPUs it needs are not taken.

        Ray alone would start two Ray Train stages whose workers take every CPU, and then
        neither stage's Ray Data pipeline gets a CPU to read with: both hang (seen, also with two
        `teacher_logits` stages). So a stage that streams data counts one CPU for its pipeline
        beside its workers (or its own task).
        """
        import ray

        if os.environ.get("MMKD_SKIP_RESOURCE_CHECK"):
            return True
        total = ray.cluster_resources().get("CPU", 0)
        return sum(stage_cpus(s) for s in running) + stage_cpus(stage) <= total + 1e-9

    def _check_resources(self, stage: Stage) -> None:
        import ray

        if os.environ.get("MMKD_SKIP_RESOURCE_CHECK"):
            return
        total = ray.cluster_resources()
        r = stage.resources
        need_cpu = stage_cpus(stage)
        need_gpu = r.num_workers * r.gpus_per_worker
        have_cpu, have_gpu = total.get("CPU", 0), total.get("GPU", 0)
        if need_cpu > have_cpu or need_gpu > have_gpu:
            data = f" + {DATA_CPUS:g} CPU for its data pipeline" if stage.streams_data else ""
            raise StageFailed(
                f"asks for {r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU{data} / "
                f"{r.gpus_per_worker:g} GPU = {need_cpu:g} CPU, {need_gpu:g} GPU, but the Ray "
                f"cluster has {have_cpu:g} CPU, {have_gpu:g} GPU. Lower `resources` of stage "
                f"{stage.name!r} (e.g. --set stages.{stage.base}.resources.num_workers=1) or "
                f"add nodes (set MMKD_SKIP_RESOURCE_CHECK=1 for an autoscaling cluster).")

    def _drain(self, hub: Any) -> None:
        import ray

        if hub is None:
            return
        for kind, event in ray.get(hub.drain.remote()):
            rec = self.record.stages.get(event["stage"])
            if rec is None:
                continue
            if kind == "log":
                level = getattr(logging, event["level"].upper(), logging.INFO)
                logger.log(level, "[%s] %s", event["stage"], event["message"])
                continue
            rec.step, rec.total_steps = event["step"], event["total_steps"]
            rec.last_metrics = event["metrics"]
            self.tracker.log_metrics(event["stage"], event["metrics"], event["step"],
                                     event["time"])

    # -- stage outcomes -------------------------------------------------------------------
    def _mark_cached(self, stage: Stage, rec: StageRecord) -> None:
        key = self.keys[stage.name]
        manifest = self.store.read_json(stage.workload, key, "_mmkd.json") or {}
        metrics = self.store.read_json(stage.workload, key, "metrics.json") or {}
        if rec.status not in ("done", "cached") or rec.mlflow_run_id is None:
            self.tracker.start_stage(stage.name, params=stage.params, tags={
                "mmkd.stage": stage.name, "mmkd.workload": stage.workload, "mmkd.key": key,
                "mmkd.cached": "true", "mmkd.pipeline": self.pipeline.name,
                "mmkd.source_run": str(manifest.get("source_run")),
                **_resume_tags(manifest.get("resumed_from_step"))})
            self.tracker.log_metrics(stage.name, _numeric(metrics))
            self.tracker.end_stage(stage.name, "FINISHED")
            rec.mlflow_run_id = self.tracker.run_id(stage.name)
            rec.status = "cached"
        rec.source_run = manifest.get("source_run")
        rec.metrics = metrics
        rec.uri = self.store.uri(stage.workload, key)
        self._index(stage.name)

    def _index(self, name: str) -> None:
        """Remember the key parts this pipeline's stage used: `mmkd plan` diffs against them."""
        try:
            self.store.write_index(self.pipeline.name, name, self.keys[name], self.key_parts[name])
        except OSError as e:  # an explanation aid only: never fail a run over it
            logger.warning("could not write the key index of stage %s: %s", name, e)

    def _stage_done(self, name: str, result: dict[str, Any]) -> None:
        rec = self.record.stages[name]
        rec.status, rec.ended, rec.metrics, rec.uri = "done", time.time(), result["metrics"], result["uri"]
        self.tracker.log_metrics(name, _numeric(result["metrics"]), rec.step)
        tags = _resume_tags(result["metrics"].get("resumed_from_step"))
        if tags:
            self.tracker.set_tags(name, tags)
        self._index(name)
        if self.store.is_local:
            self._log_small_artifacts(name, self.store.local_dir(rec.workload, rec.key))
        self.tracker.end_stage(name, "FINISHED")
        self._save(force=True)

    def _stage_failed(self, name: str, error: str) -> None:
        rec = self.record.stages[name]
        rec.status, rec.ended, rec.error = "failed", time.time(), error
        if rec.mlflow_run_id:
            self.tracker.set_tags(name, {"mmkd.error": error[:5000]})
            self.tracker.end_stage(name, "FAILED")
        logger.error("stage %s failed: %s", name, error)
        self._save(force=True)

    def _log_small_artifacts(self, stage: str, directory: str) -> None:
        """Configs, metrics, tables and plots; never weights or shards."""
        skip = (".safetensors", ".bin", ".pt", ".pth", ".tar", ".parquet", ".npy", ".arrow")
        for root, _, files in os.walk(directory):
            for f in files:
                path = os.path.join(root, f)
                if f.startswith("_") or f.endswith(skip) or os.path.getsize(path) > 5_000_000:
                    continue
                rel = os.path.relpath(root, directory)
                self.tracker.log_artifact(stage, path, None if rel == "." else rel)

    def _finish(self, status: str, error: str) -> None:
        self.record.status, self.record.ended, self.record.error = status, time.time(), error
        for rec in self.record.stages.values():
            if rec.status == "running":
                rec.status, rec.error = "failed", rec.error or status
                if rec.mlflow_run_id:
                    self.tracker.end_stage(rec.name, "KILLED")
        mlflow_status = {"success": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self.tracker.end_pipeline(mlflow_status)
        self._save(force=True)


def _resume_tags(resumed_from_step: Any) -> dict[str, str]:
    """MLflow tags of a stage that continued from an in-stage checkpoint (none otherwise)."""
    if isinstance(resumed_from_step, (int, float)) and resumed_from_step >= 0:
        return {"mmkd.resumed": "true", "mmkd.resumed_from_step": str(int(resumed_from_step))}
    return {}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _error_text(e: BaseException) -> str:
    """The user-relevant part of a stage error: the original exception, not Ray's wrapping."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        e = cause
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 4000 else text[:2000] + "\n...\n" + text[-2000:]
