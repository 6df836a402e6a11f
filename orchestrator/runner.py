"""Runs a pipeline's DAG on Ray.

Every stage whose upstreams are done runs as a Ray task as soon as it is ready, so independent
stages overlap as far as the cluster's resources allow (admission control keeps a CPU for each
running stage's data pipeline). Before running a key the driver takes its lease, so two drivers
on one store compute it once. Stages execute through ``orchestrator/executor.py``; their
progress and outcomes reach MLflow through ``orchestrator/stage_outcomes.py``.

A fully cached pipeline never starts Ray.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.artifact_store import mmkd_home
from orchestrator.dag import ready_stages
from orchestrator.executor import (DATA_CPUS, StageFailed, progress_hub_class, run_name_for,
                                   release_sides, side_later, stage_cpus, stage_payload,
                                   stage_task, stages_cpus)
from orchestrator.lease import Lease
from orchestrator.placement import Reaper
from orchestrator.plan import pipeline_keys, resolve_force, store_for
from orchestrator.ray_setup import ensure_ray
from orchestrator.run_records import RunRecord, StageRecord, list_runs
from orchestrator.spec import Pipeline, Stage
from orchestrator.stage_outcomes import StageOutcomes, error_text
from orchestrator.secret_env import redact_text
from orchestrator.tracking import Tracker, default_tracking_uri, driver_tag

logger = logging.getLogger("mmkd")


class PipelineRunner(StageOutcomes):
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
        same = redact_text(self.record.tracking_uri) == redact_text(self.tracker.uri)
        self._resume_parent = self.record.mlflow_run_id if same else None
        self.record.tracking_uri = self.tracker.uri
        self._last_save = 0.0
        self.ray_started = False  # a fully cached pipeline never needs Ray
        self._started: set[str] = set()  # stages of this run the loop has started
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
    def run(self, defer_tracking: bool = False) -> RunRecord:
        """Run the pipeline. ``defer_tracking`` (the CLI): when every stage is cached, journal
        the MLflow calls and let a detached `mmkd relog` write them, so the rerun returns
        without paying seconds for importing MLflow and opening its store."""
        deferred = (defer_tracking and not self._resume_parent
                    and all(self._cached(n) for n in self.pipeline.stages))
        if deferred:
            self.tracker.defer()
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
        if deferred:
            relog_in_background(self.record)
        return self.record

    def _start_parent(self) -> None:
        p = self.pipeline
        self.tracker.start_pipeline(
            parent_run_name(p, self.record.overrides, self.record.run_id),
            params={"pipeline_file": p.path, "overrides": self.record.overrides},
            tags={"mmkd.pipeline": p.name, "mmkd.run_id": self.record.run_id,
                  "mmkd.driver": self.record.driver, "mmkd.kind": "pipeline"})
        self.record.mlflow_run_id = self.tracker.run_id()
        if self.tracker.online or self.tracker.deferred:
            # the file as written, credentials masked (a copy beside the run record)
            copy = self.record.dir / "pipeline" / os.path.basename(p.path)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(redact_text(Path(p.path).read_text()))
            self.tracker.log_artifact("__pipeline__", str(copy), "pipeline")

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
        view, self.view = self.view, None  # a run that cannot start prints no stage table
        try:
            if self._misfit([s for n, s in p.stages.items() if n not in done]):
                return
        finally:
            self.view = view
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
            if self.ray_started:
                release_sides(list(p.stages.values()), self.record.run_id)
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

    def _pending(self) -> list[Stage]:
        """Stages of this run not started yet."""
        return [s for n, s in self.pipeline.stages.items() if n not in self._started]

    def _misfit(self, to_run: list[Stage]) -> bool:
        """Before anything runs: a stage that can never fit the cluster fails the run now,
        not after its upstream stages trained for an hour (True: the run has failed)."""
        if not to_run or os.environ.get("MMKD_SKIP_RESOURCE_CHECK"):
            return False
        ensure_ray()
        self.ray_started = True
        for stage in to_run:
            try:
                self._check_resources(stage)
            except StageFailed as e:  # no stage run or MLflow run exists yet: record it only
                rec = self.record.stages[stage.name]
                rec.status, rec.ended, rec.error = "failed", time.time(), str(e)
                for other in to_run:
                    if other is not stage:
                        self.record.stages[other.name].status = "skipped"
                self._finish("failed", f"stage {stage.name!r} failed: {e}")
                return True
        return False

    def _loop(self, done: set[str]) -> None:
        stages = self.pipeline.stages
        failed: set[str] = set()
        started = self._started = set(done)
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
                    self._stage_failed(name, error_text(e))
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
                                key_parts=self.key_parts[stage.name], run_id=self.record.run_id,
                                side_later=side_later(stage, self._pending()))
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
        return stages_cpus(running + [stage]) <= total + 1e-9

    def _check_resources(self, stage: Stage) -> None:
        import ray

        if os.environ.get("MMKD_SKIP_RESOURCE_CHECK"):
            return
        total = ray.cluster_resources()
        r = stage.resources
        side = stage.side if stage.side and (stage.side.cpus or stage.side.gpus) else None
        need_cpu = stage_cpus(stage)
        need_gpu = r.num_workers * r.gpus_per_worker + (side.gpus if side else 0.0)
        have_cpu, have_gpu = total.get("CPU", 0), total.get("GPU", 0)
        if need_cpu > have_cpu or need_gpu > have_gpu:
            parts = [f"{r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU, "
                     f"{r.gpus_per_worker:g} GPU"]
            if stage.streams_data:
                parts.append(f"{DATA_CPUS:g} CPU for its data pipeline (Ray Data's read and "
                             f"preprocess tasks: without a free CPU the stage waits forever)")
            if side:
                parts.append(f"{side.cpus:g} CPU, {side.gpus:g} GPU for its {side.what}")
            raise StageFailed(
                f"needs {need_cpu:g} CPU, {need_gpu:g} GPU ({' + '.join(parts)}) but the Ray "
                f"cluster has {have_cpu:g} CPU, {have_gpu:g} GPU. Lower `resources` of stage "
                f"{stage.name!r} (e.g. --set stages.{stage.base}.resources.num_workers=1)"
                + (f" or {side.hint}" if side and side.hint else "")
                + ", or add nodes (set MMKD_SKIP_RESOURCE_CHECK=1 for an autoscaling cluster).")


def relog_in_background(record: RunRecord) -> None:
    """A detached `mmkd relog RUN`: writes the run's journal into MLflow and its ids into the
    run record (output in the run's folder)."""
    import subprocess
    import sys

    with open(record.dir / "relog.log", "a") as log:  # the child keeps its own copy
        subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "relog", record.run_id,
                          "--deferred"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True,
                         env={**os.environ, "MMKD_HOME": str(mmkd_home())})


def parent_run_name(pipeline: Pipeline, overrides: list[str], run_id: str) -> str:
    """What a pipeline run is called in MLflow: the pipeline and what differs from its file
    (``llava_kd · seed 0``, ``llava_kd · student_dft.beta=0``), so the runs table reads
    without opening each run; the run id stays in the tag ``mmkd.run_id``."""
    shown = [o.removeprefix("stages.").replace(".params.", ".") for o in overrides]
    if not any("seed" in o for o in shown):
        seed = (pipeline.raw.get("defaults") or {}).get("params", {}).get("seed")
        if seed is not None:
            shown.insert(0, f"seed {seed}")
    return f"{pipeline.name} · {', '.join(shown)}" if shown else f"{pipeline.name} · {run_id}"

