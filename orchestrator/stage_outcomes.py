"""The driver's side of running stages: progress events drained from the stages' hub into
MLflow and the live view, and each stage's outcome (done, cached, failed) recorded in the run
record, MLflow (the only writer) and the store's key index."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from orchestrator.plugin import HEADLINE_FILE, root_cause
from orchestrator.run_records import StageRecord
from orchestrator.spec import Stage

logger = logging.getLogger("mmkd")


class StageOutcomes:
    """Mixed into ``PipelineRunner``: uses its ``pipeline``, ``store``, ``keys``,
    ``key_parts``, ``record``, ``tracker`` and ``_save``."""

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
        self._headline(stage.name)

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
        self._headline(name)
        self._save(force=True)

    def _headline(self, name: str) -> None:
        """A stage's headline metrics (and tables/charts) onto the pipeline's own MLflow run."""
        rec = self.record.stages[name]
        try:
            head = self.store.read_json(rec.workload, rec.key, HEADLINE_FILE)
        except (OSError, ValueError) as e:  # a summary aid only: never fail a run over it
            logger.warning("could not read the headline of stage %s: %s", name, e)
            return
        if not isinstance(head, dict):
            return
        self.tracker.log_metrics("__pipeline__", _numeric(head.get("metrics") or {}))
        tags = head.get("tags")
        if isinstance(tags, dict) and tags:
            self.tracker.set_tags("__pipeline__", {str(k)[:250]: str(v)[:5000]
                                                   for k, v in tags.items()})
        if self.store.is_local:
            base = self.store.local_dir(rec.workload, rec.key)
            root = os.path.realpath(base)
            for rel in head.get("artifacts") or []:
                path = os.path.realpath(os.path.join(base, str(rel)))
                if not path.startswith(root + os.sep):  # confined to the stage's folder
                    logger.warning("stage %s: headline artifact %r lies outside its output "
                                   "folder; not logged", name, rel)
                    continue
                if os.path.isfile(path):
                    self.tracker.log_artifact("__pipeline__", path, name)

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


def error_text(e: BaseException) -> str:
    """The user-relevant part of a stage error: the workload's own exception, not Ray's
    wrapping of it (RayTaskError, WorkerGroupError, UserCodeException, a truncated snippet)."""
    e = root_cause(e)
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 4000 else text[:2000] + "\n...\n" + text[-2000:]
