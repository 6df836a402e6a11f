"""MLflow tracking: a parent run per pipeline run, a nested child run per stage.

Only the driver writes to MLflow (stages report to it through Ray), so concurrent stages never
contend for one sqlite file. Every operation is first appended to a journal next to the run's
manifest; if the tracking server is unreachable the run goes on, the journal keeps everything,
and ``mmkd relog RUN`` replays it later.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from orchestrator.artifact_store import mmkd_home
from orchestrator.lease import pid_alive
from orchestrator.secret_env import redact_text

logger = logging.getLogger("mmkd")

PIPELINE = "__pipeline__"
_MAX_PARAM_LEN = 6000

# MLflow's client defaults are 120 s per request and 7 retries with backoff (~10 minutes for
# one call to a hung server); the driver bounds them, so tracking can slow a run but never hold
# it for long. (The journal keeps what could not be logged: `mmkd relog`.) A user's own values
# win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


# MLflow 3 opens an experiment on its GenAI traces overview unless its kind says model
# training ("custom_model_development" is what the UI calls "Machine learning"/model training).
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_TAGS = {EXPERIMENT_KIND: "custom_model_development"}


def default_tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{mmkd_home() / 'mlflow.db'}"


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
    return out


class Tracker:
    def __init__(self, experiment: str, journal: Path, uri: str | None = None,
                 replaying: bool = False):
        self.experiment = experiment
        self.uri = uri or default_tracking_uri()
        self.journal = journal
        self.replaying = replaying
        self.ids: dict[str, str] = {}  # logical name (PIPELINE or stage) -> MLflow run id
        self.online = True
        self.offline_reason = ""
        self.deferred = False  # journal only; a background `mmkd relog` writes it (defer())
        self._client = None
        self._experiment_id: str | None = None

    def defer(self) -> None:
        """Journal every call without touching MLflow (importing MLflow and opening its store
        costs seconds): for a fully cached rerun, a detached `mmkd relog` logs it right after."""
        self.online, self.deferred = False, True

    # -- plumbing -------------------------------------------------------------------------
    def _connect(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            from orchestrator.console import after_import

            after_import()  # MLflow's first import gives its loggers handlers of their own

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            elif self.uri.startswith(("http://", "https://")):
                self._probe_server()
            self._client = MlflowClient(self.uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:///"):
                    location = (Path(self.uri.removeprefix("sqlite:///")).parent
                                / "mlartifacts").as_uri()
                self._experiment_id = self._client.create_experiment(
                    self.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
            else:
                self._experiment_id = exp.experiment_id
                if EXPERIMENT_KIND not in exp.tags:  # made by an older mmkd: open on its runs
                    for k, v in EXPERIMENT_TAGS.items():
                        self._client.set_experiment_tag(exp.experiment_id, k, v)
        return self._client

    def _probe_server(self) -> None:
        import urllib.request

        try:
            urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            raise ConnectionError(f"MLflow server {self.uri} unreachable: {e}") from e

    def _do(self, op: str, **kw: Any) -> Any:
        from orchestrator.secret_env import redact

        if op != "log_metrics":  # numbers only: the per-step path skips the walk
            kw = redact(kw)  # credentials in params, tags or names never reach MLflow/journal
        if not self.replaying:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as f:
                f.write(json.dumps({"op": op, "time": time.time(), **kw}, default=str) + "\n")
        if not self.online:
            return None
        try:
            return getattr(self, f"_op_{op}")(**kw)
        except Exception as e:  # noqa: BLE001 - tracking must never kill a pipeline
            if self.replaying:
                raise
            self.online = False
            self.offline_reason = f"{type(e).__name__}: {e}"
            logger.warning(
                "MLflow at %s failed (%s). The pipeline goes on; results stay in the artifact "
                "store and tracking calls are journaled in %s. Re-log them once the server is "
                "back with: mmkd relog %s", redact_text(self.uri), redact_text(self.offline_reason),
                self.journal,
                self.journal.parent.name)
            return None

    # -- public API (journaled) -----------------------------------------------------------
    def start_pipeline(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._do("start_pipeline", run_name=run_name, params=params, tags=tags)

    def resume_pipeline(self, run_id: str, stages: dict[str, str]) -> None:
        """Continue an interrupted run's parent run (``--resume``) instead of opening a new one."""
        self._do("resume_pipeline", run_id=run_id, stages=stages)

    def start_stage(self, stage: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._do("start_stage", stage=stage, params=params, tags=tags)

    def reopen_stage(self, stage: str) -> None:
        """Set a known child run (from ``resume_pipeline``'s ``stages``) RUNNING again."""
        self._do("reopen_stage", stage=stage)

    def log_metrics(self, stage: str, metrics: dict[str, float], step: int | None = None,
                    timestamp: float | None = None) -> None:
        self._do("log_metrics", stage=stage, metrics=metrics, step=step,
                 timestamp=timestamp or time.time())

    def set_tags(self, stage: str, tags: dict[str, str]) -> None:
        self._do("set_tags", stage=stage, tags=tags)

    def log_artifact(self, stage: str, path: str, artifact_path: str | None = None) -> None:
        self._do("log_artifact", stage=stage, path=path, artifact_path=artifact_path)

    def end_stage(self, stage: str, status: str) -> None:
        self._do("end_run", stage=stage, status=status)

    def end_pipeline(self, status: str) -> None:
        self._do("end_run", stage=PIPELINE, status=status)

    def run_id(self, stage: str = PIPELINE) -> str | None:
        return self.ids.get(stage)

    # -- operations -----------------------------------------------------------------------
    def _create(self, name: str, run_name: str, params: dict, tags: dict) -> None:
        from mlflow.entities import Param

        client = self._connect()
        all_tags = dict(tags)
        if name != PIPELINE and PIPELINE in self.ids:
            all_tags["mlflow.parentRunId"] = self.ids[PIPELINE]
        run = client.create_run(self._experiment_id, run_name=run_name, tags=all_tags)
        self.ids[name] = run.info.run_id
        flat = [Param(k, v[:_MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            client.log_batch(run.info.run_id, params=flat[i:i + 100])

    def _op_start_pipeline(self, run_name, params, tags):
        self.reconcile()
        self._create(PIPELINE, run_name, params, tags)

    def _op_resume_pipeline(self, run_id, stages):
        self.reconcile()
        self._connect().update_run(run_id, status="RUNNING")
        self._connect().set_tag(run_id, "mmkd.driver", driver_tag())
        self.ids[PIPELINE] = run_id
        self.ids.update(stages)

    def _op_start_stage(self, stage, params, tags):
        self._create(stage, stage, params, tags)

    def _op_reopen_stage(self, stage):
        self._connect().update_run(self.ids[stage], status="RUNNING")

    def _op_log_metrics(self, stage, metrics, step, timestamp):
        from mlflow.entities import Metric

        items = [Metric(k, float(v), int(timestamp * 1000), step or 0)
                 for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self._connect().log_batch(self.ids[stage], metrics=items[i:i + 1000])

    def _op_set_tags(self, stage, tags):
        for k, v in tags.items():
            self._connect().set_tag(self.ids[stage], k, v)

    def _op_log_artifact(self, stage, path, artifact_path):
        client = self._connect()
        if os.path.isdir(path):
            client.log_artifacts(self.ids[stage], path, artifact_path)
        elif os.path.exists(path):
            client.log_artifact(self.ids[stage], path, artifact_path)

    def _op_end_run(self, stage, status):
        if stage in self.ids:
            self._connect().set_terminated(self.ids[stage], status=status)

    # -- recovery -------------------------------------------------------------------------
    def reconcile(self) -> list[str]:
        """Mark runs left RUNNING by a driver that no longer exists (on this host) KILLED."""
        client = self._connect()
        host = socket.gethostname()
        killed = []
        running = client.search_runs([self._experiment_id],
                                     filter_string="attributes.status = 'RUNNING'")
        for run in running:
            driver = run.data.tags.get("mmkd.driver", "")
            run_host, _, pid = driver.rpartition(":")
            if run_host == host and pid.isdigit() and not pid_alive(int(pid)):
                client.set_terminated(run.info.run_id, status="KILLED")
                killed.append(run.info.run_id)
        for run in running:  # the stages those drivers were running died with them
            if run.data.tags.get("mlflow.parentRunId") in killed:
                client.set_terminated(run.info.run_id, status="KILLED")
                killed.append(run.info.run_id)
        if killed:
            logger.info("marked %d MLflow run(s) of a killed driver as KILLED", len(killed))
        return killed


def replay(journal: Path, uri: str | None = None, tag: str = "mmkd.relogged") -> Tracker:
    """Re-log a journal (from a run whose tracking server was unreachable, or whose tracking
    was deferred) into MLflow; ``tag`` marks the parent run."""
    lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    experiment = next((e["tags"].get("mmkd.pipeline") for e in lines
                       if e["op"] == "start_pipeline"), None)
    if experiment is None:
        raise ValueError(f"{journal}: no pipeline start recorded; nothing to re-log")
    tracker = Tracker(experiment, journal, uri=uri, replaying=True)
    for entry in lines:
        op = entry.pop("op")
        entry.pop("time", None)
        if op == "start_pipeline":
            entry["tags"] = {**entry["tags"], tag: "true"}
        getattr(tracker, f"_op_{op}")(**entry)
    return tracker


def driver_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
