"""mmkd's Python API: ``import mmkd`` in a notebook; see ``orchestrator/api.py``.

The plugin contract for your own workloads is ``orchestrator.plugin`` (``workload``,
``WorkloadConfig``, ``StageContext``)."""

from orchestrator.api import (InvalidPipeline, PipelineError, RunResult, load, plan, run, runs,
                              show, validate)

__all__ = ["load", "validate", "plan", "run", "runs", "show", "RunResult", "InvalidPipeline",
           "PipelineError"]
