"""mmkd from Python — a notebook or a script — with the same guarantees as the command line,
which is a thin layer over these functions::

    import mmkd

    problems = mmkd.validate("pipelines/llava_kd.yaml")          # [] when the file is sound
    for row in mmkd.plan("pipelines/llava_kd.yaml", overrides=["stages.student_dft.params.alpha=0.5"]):
        print(row.name, row.status, row.reason)
    result = mmkd.run("pipelines/llava_kd.yaml")                  # validates first, then runs
    result.ok, result.metrics("evaluate"), result.summary("evaluate")
    result.read("evaluate", "results/results.json")
    mmkd.runs()[0].run_id

Errors: a pipeline file with mistakes raises ``PipelineError`` (every problem, with file:line);
problems found by opening data or models raise ``InvalidPipeline`` from ``run`` (``validate``
returns them). A failed stage does not raise: ``result.ok`` is False and ``result.error`` says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from orchestrator.loader import load_pipeline
from orchestrator.plugin import SUMMARY_FILE
from orchestrator.spec import Pipeline, PipelineError

__all__ = ["load", "validate", "plan", "run", "runs", "show", "RunResult", "InvalidPipeline",
           "PipelineError", "store_problems"]


class InvalidPipeline(ValueError):
    """A pipeline whose data, models or stage inputs fail their checks (nothing ran)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load(pipeline: str | os.PathLike | Pipeline, overrides: Sequence[str] = (),
         only: Sequence[str] = ()) -> Pipeline:
    """A loaded, validated, expanded pipeline (a ``Pipeline`` is returned as it is)."""
    if isinstance(pipeline, Pipeline):
        loaded = pipeline
    else:
        loaded = load_pipeline(pipeline, list(overrides))
    return loaded.only(list(only)) if only else loaded


def store_problems(pipeline: Pipeline) -> list[str]:
    """The workloads' own checks: data paths exist and are readable, models fit each other.
    A store that cannot be reached (no network, no credentials) is one sentence per store."""
    from orchestrator.console import explain_store_error, first_uri
    from orchestrator.plugin import get_workload

    problems = []
    unreachable: dict[str, list[str]] = {}  # one sentence per store, not one per stage
    for name, stage in pipeline.stages.items():
        info = get_workload(stage.workload)
        if info.validate is None:
            continue
        try:
            found = info.validate(stage.config, stage.resolved_inputs) or []
        except OSError as e:  # no network / no credentials for an s3:// or gs:// source
            where = first_uri(json.dumps(stage.params, default=str))
            unreachable.setdefault(explain_store_error(e, where) or f"{type(e).__name__}: {e}",
                                   []).append(name)
            continue
        problems += [f"{Path(pipeline.path).name}: stage {name!r}: {p}" for p in found]
    for text, stages in unreachable.items():
        names = ", ".join(repr(n) for n in stages)
        problems.append(f"{Path(pipeline.path).name}: stage(s) {names}: {text}")
    return problems


def validate(pipeline: str | os.PathLike | Pipeline, overrides: Sequence[str] = (),
             offline: bool = False) -> list[str]:
    """Problems of a pipeline ([] if none). The file's own mistakes raise PipelineError;
    ``offline`` opens no data or model files (a pipeline whose data lives on a cluster)."""
    loaded = load(pipeline, overrides)
    return [] if offline else store_problems(loaded)


def plan(pipeline: str | os.PathLike | Pipeline, overrides: Sequence[str] = (),
         force: Sequence[str] = (), store: str | None = None, offline: bool = False,
         only: Sequence[str] = ()) -> list[Any]:
    """The stages in order: key, cached or not, and why each one would run."""
    from orchestrator.plan import make_plan, store_for

    loaded = load(pipeline, overrides, only)
    return make_plan(loaded, None if offline else store_for(loaded, store), list(force),
                     offline=offline)


@dataclass
class RunResult:
    """What ``run`` returns: the run record, and readers of what its stages published."""

    record: Any  # orchestrator.run_records.RunRecord
    tracking_deferred: bool = False  # all cached: a background `mmkd relog` writes MLflow
    tracking_error: str = ""  # MLflow was unreachable: `mmkd relog RUN` once it is back

    @property
    def ok(self) -> bool:
        return self.record.status == "success"

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def error(self) -> str:
        return self.record.error

    def stage(self, name: str) -> Any:
        try:
            return self.record.stages[name]
        except KeyError:
            raise KeyError(f"no stage {name!r} in run {self.run_id}; stages: "
                           f"{', '.join(self.record.stages)}") from None

    def metrics(self, name: str) -> dict[str, Any]:
        """The stage's final metrics (``metrics.json``)."""
        return dict(self.stage(name).metrics or {})

    def path(self, name: str) -> str:
        """Where the stage's outputs are (a local path, or a URI on an object store)."""
        return self.stage(name).uri

    def read(self, name: str, relpath: str) -> Any:
        """A file a finished stage published (JSON parsed), or None: e.g.
        ``result.read("evaluate", "results/results.json")``. Local stores only."""
        record = self.stage(name)
        if record.status not in ("done", "cached") or not record.uri or "://" in record.uri:
            return None
        found = Path(record.uri) / relpath
        if not found.is_file():
            return None
        return json.loads(found.read_text()) if found.suffix == ".json" else found.read_text()

    def summary(self, name: str) -> str | None:
        """The markdown summary the stage wrote (``summary.md``: evaluate's results table)."""
        return self.read(name, SUMMARY_FILE)


def run(pipeline: str | os.PathLike | Pipeline, overrides: Sequence[str] = (),
        force: Sequence[str] = (), resume: bool = False, store: str | None = None,
        only: Sequence[str] = (), view: Any = None, on_start: Any = None,
        defer_tracking: bool = False) -> RunResult:
    """Validate, then run the pipeline: cached stages are skipped, keys are leased, results
    are published atomically, MLflow gets a parent run and a child per stage.

    ``on_start(record)`` is called once the run record exists; ``defer_tracking``: when every
    stage is cached, MLflow is written by a background process (what the CLI does)."""
    from orchestrator.runner import PipelineRunner

    loaded = load(pipeline, overrides, only)
    problems = store_problems(loaded)
    if problems:
        raise InvalidPipeline(problems)
    runner = PipelineRunner(loaded, force=list(force), resume=resume, store_root=store,
                            overrides=list(overrides), view=view)
    if on_start is not None:
        on_start(runner.record)
    record = runner.run(defer_tracking=defer_tracking)
    tracker = runner.tracker
    return RunResult(record, tracking_deferred=tracker.deferred,
                     tracking_error="" if tracker.online or tracker.deferred
                     else tracker.offline_reason)


def runs(pipeline: str | None = None, limit: int = 20) -> list[Any]:
    """Recent run records, newest first."""
    from orchestrator.run_records import list_runs

    return list_runs(pipeline, limit)


def show(run_id: str) -> RunResult:
    from orchestrator.run_records import RunRecord

    return RunResult(RunRecord.load(run_id))
