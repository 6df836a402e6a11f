"""What a workload receives besides its config: where to write, what its upstreams produced,
which resources it may use, and a handle to report progress.

The context is a plain picklable dataclass: it travels into Ray tasks and into every Ray Train
worker inside the worker's config dict. Workloads never import the orchestrator.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("mmkd")


@dataclass(frozen=True)
class Resources:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class StageContext:
    pipeline: str
    stage: str
    key: str
    # Local directory the workload writes its outputs into (``model/``, data files, ...).
    # The runner moves it into the artifact store only after the workload returns.
    output_dir: str
    # Input name -> local path (or list of paths) of the referenced upstream outputs.
    inputs: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # Persistent storage for in-stage checkpoints (a local path or a pyarrow.fs URI). Together
    # with ``run_name`` (derived from the stage key) a restarted stage finds its checkpoints.
    checkpoint_storage: str = ""
    run_name: str = ""
    seed: int = 0
    # Ray actor handle of the driver's progress hub; None outside a pipeline run.
    reporter: Any = None
    # Metrics reported while running without a reporter (unit tests, local calls).
    local_metrics: list[dict[str, Any]] = field(default_factory=list)

    def report(self, metrics: dict[str, float], step: int | None = None,
               total_steps: int | None = None) -> None:
        """Send per-step metrics to the driver (MLflow + live view). Call from one rank only."""
        event = {"stage": self.stage, "step": step, "total_steps": total_steps,
                 "metrics": {k: float(v) for k, v in metrics.items()}, "time": time.time()}
        if self.reporter is None:
            self.local_metrics.append(event)
            return
        self.reporter.report.remote(event)

    def log(self, message: str, level: str = "info") -> None:
        """A line for the driver's console (warnings about skipped samples, etc.)."""
        getattr(logger, level)("[%s] %s", self.stage, message)
        if self.reporter is not None:
            self.reporter.log.remote({"stage": self.stage, "level": level, "message": message,
                                      "time": time.time()})

    def input(self, name: str) -> Any:
        try:
            return self.inputs[name]
        except KeyError:
            raise KeyError(
                f"stage {self.stage!r} needs input {name!r}; it has {sorted(self.inputs)}. "
                f"Add `inputs: {{{name}: <stage>.<output>}}` to the stage in the pipeline file."
            ) from None
