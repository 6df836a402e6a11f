"""Local records of pipeline runs (`.mmkd/runs/<run_id>/run.json`).

MLflow is where users compare runs; this record is what the driver itself relies on to show
`mmkd runs` / `mmkd show`, to resume, and to re-log when MLflow was down. It is rewritten
atomically after every state change, so a killed driver leaves a readable record behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.artifact_store import mmkd_home

STATUSES = ("pending", "waiting", "running", "cached", "done", "failed", "skipped")


RUN_ID = re.compile(r"run-[0-9a-f]{8}")  # RunRecord.new_id; nothing else names a run folder

@dataclass
class StageRecord:
    name: str
    workload: str
    key: str
    status: str = "pending"
    uri: str = ""
    started: float | None = None
    ended: float | None = None
    step: int | None = None
    total_steps: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    mlflow_run_id: str | None = None
    source_run: str | None = None
    run_name: str = ""  # the Ray Train run (checkpoint folder) this stage uses
    waiting_for: str = ""  # another driver holding this key's lease


@dataclass
class RunRecord:
    run_id: str
    pipeline: str
    path: str
    overrides: list[str]
    started: float
    driver: str
    status: str = "running"
    ended: float | None = None
    tracking_uri: str = ""
    mlflow_run_id: str | None = None
    error: str = ""
    stages: dict[str, StageRecord] = field(default_factory=dict)

    @staticmethod
    def new_id() -> str:
        return f"run-{secrets.token_hex(4)}"

    @staticmethod
    def directory(run_id: str) -> Path:
        if not RUN_ID.fullmatch(str(run_id)):
            raise FileNotFoundError(
                f"{run_id!r} is not a run id (run ids look like run-1a2b3c4d); `mmkd runs` "
                f"lists the recorded runs")
        return mmkd_home() / "runs" / run_id

    @property
    def dir(self) -> Path:
        return self.directory(self.run_id)

    @property
    def journal(self) -> Path:
        return self.dir / "tracking_journal.jsonl"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "run.json.tmp"
        from orchestrator.secret_env import redact

        tmp.write_text(json.dumps(redact(asdict(self)), indent=2, default=str))
        os.replace(tmp, self.dir / "run.json")

    @classmethod
    def load(cls, run_id: str) -> "RunRecord":
        path = cls.directory(run_id) / "run.json"
        if not path.exists():
            raise FileNotFoundError(f"no run {run_id!r} under {mmkd_home() / 'runs'}; "
                                    "`mmkd runs` lists the recorded runs")
        data = json.loads(path.read_text())
        data["stages"] = {k: StageRecord(**v) for k, v in data.get("stages", {}).items()}
        record = cls(**data)
        record._reconcile()
        return record

    def _reconcile(self) -> None:
        """A record still 'running' whose driver died on this host is 'killed'."""
        if self.status != "running":
            return
        host, _, pid = self.driver.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                self.status = "killed"
                for s in self.stages.values():
                    if s.status == "running":
                        s.status = "failed"
                        s.error = s.error or "driver was killed"
            except PermissionError:
                pass


def list_runs(pipeline: str | None = None, limit: int = 20) -> list[RunRecord]:
    root = mmkd_home() / "runs"
    if not root.exists():
        return []
    records = []
    for d in root.iterdir():
        if (d / "run.json").exists():
            try:
                r = RunRecord.load(d.name)
            except (json.JSONDecodeError, TypeError):
                continue
            if pipeline is None or r.pipeline == pipeline:
                records.append(r)
    records.sort(key=lambda r: r.started, reverse=True)
    return records[:limit]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def now() -> float:
    return time.time()
