"""``merge``: combine K models with one method of ``workloads.merging.MERGE_METHODS``.

Inputs:
  models     list of model dirs (K parents; for ``ensemble``: the experts in partition order)
  base       optional model dir: the common start for ``task_arithmetic``/``ties``; for
             ``ensemble`` the model whose vision tower the partition stage embedded with
  partition  optional ``partition.partitions`` dir (``centroids.npy``), needed by ``ensemble``

Output ``model/``: a LLaVA checkpoint (parameter averages, ``width``) or a wrapper dir with
``mmkd_merged.json`` (``cross``, ``ensemble``); both hold the first parent's processor and load
with ``workloads.merging.load_any_model``.

Importing this module also registers the ``partition`` workload (``workloads/partition.py``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from pydantic import Field, field_validator

import workloads.partition  # noqa: F401  (registers the `partition` workload)
from workloads.context import StageContext
from workloads.fsutil import atomic_dir
from workloads.lineage import write_lineage
from workloads.registry import WorkloadConfig, workload

__all__ = ["MergeConfig", "merge", "run_merge"]


class MergeConfig(WorkloadConfig):
    method: str = Field(description="merge method: uniform | linear | task_arithmetic | ties | "
                                    "width | cross | ensemble")
    weights: list[float] | None = Field(None, description="per-model weights (linear, "
                                        "task_arithmetic, ties, width's lm_head); default equal")
    normalize: bool = Field(True, description="linear/width: divide weights by their sum")
    lambda_: float = Field(1.0, description="task_arithmetic/ties: scale of the merged task "
                                            "vector")
    density: float = Field(0.2, gt=0.0, le=1.0, description="ties: fraction of each task "
                                                             "vector's entries kept (top |τ|)")
    cross_every: int = Field(2, ge=1, description="cross: a bridge after every n-th layer")
    router: Literal["top1", "soft"] = Field("top1", description="ensemble: routing mode")
    temperature: float = Field(0.1, gt=0.0, description="ensemble soft routing: softmax(cos/τ)")
    vision: Literal["first"] = Field("first", description="width: keep parent 1's vision tower")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from workloads.merging import MERGE_METHODS

        if v not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(sorted(MERGE_METHODS))}")
        return v


def _validate(config: MergeConfig, inputs: dict[str, Any]) -> list[str]:
    from workloads.merging import check_merge_inputs

    return check_merge_inputs(config.method, len(inputs.get("models") or []),
                              bool(inputs.get("base")), bool(inputs.get("partition")),
                              config.weights)


def _one(path: Any) -> str | None:
    if isinstance(path, (list, tuple)):
        return path[0] if path else None
    return path


def run_merge(config: MergeConfig, model_dirs: list[str], out_dir: str,
              base_dir: str | None = None, partition_dir: str | None = None) -> dict[str, float]:
    """Merge ``model_dirs`` into ``out_dir`` (atomically); returns metrics."""
    import numpy as np
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from workloads.merging import (MergeInputError, check_merge_inputs, get_merge_method,
                                   merge_state_dicts)

    problems = check_merge_inputs(config.method, len(model_dirs), base_dir is not None,
                                  partition_dir is not None, config.weights)
    if problems:
        raise MergeInputError("; ".join(problems))
    method = get_merge_method(config.method)
    params = config.model_dump()
    load = lambda p: LlavaForConditionalGeneration.from_pretrained(p).eval()  # noqa: E731
    t0 = time.perf_counter()
    models = [load(p) for p in model_dirs]
    base = load(base_dir) if base_dir else None
    processor = AutoProcessor.from_pretrained(model_dirs[0])
    t_loaded = time.perf_counter()
    with torch.no_grad():
        if method.kind == "tensor":
            sd = merge_state_dicts(config.method, [m.state_dict() for m in models],
                                   base.state_dict() if base is not None else None, params)
            merged = models[0]
            merged.load_state_dict(sd)
        elif config.method == "ensemble":
            cpath = os.path.join(partition_dir, "centroids.npy")
            if not os.path.exists(cpath):
                raise MergeInputError(f"merge method 'ensemble': {cpath} not found; input "
                                      f"`partition` must be a partition stage's `partitions`")
            merged = method.fn(models, base, params, centroids=np.load(cpath))
        else:
            merged = method.fn(models, base, params)
    merge_s = time.perf_counter() - t_loaded
    with atomic_dir(out_dir) as tmp:
        if hasattr(merged, "save_pretrained"):
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            merged.save(tmp)
        processor.save_pretrained(tmp)
    n_params = sum(p.numel() for p in merged.parameters())
    n_new = (sum(p.numel() for p in merged.new_parameters())
             if hasattr(merged, "new_parameters") else 0)
    return {"params": float(n_params), "new_params": float(n_new), "num_models": len(models),
            "merge_s": merge_s, "total_s": time.perf_counter() - t0}


@workload("merge", config=MergeConfig, version="2", outputs=("model",), distributed=False,
          validate=_validate)
def merge(config: MergeConfig, ctx: StageContext) -> dict[str, float]:
    """Merge K models (parameter averages, JAM-Width/Cross, routed ensemble) into one model dir."""
    import torch

    torch.set_num_threads(max(1, int(ctx.resources.cpus_per_worker)))
    models = ctx.input("models")
    models = [models] if isinstance(models, str) else list(models)
    base = _one(ctx.inputs.get("base"))
    out = os.path.join(ctx.output_dir, "model")
    metrics = run_merge(config, models, out, base, _one(ctx.inputs.get("partition")))
    write_lineage(out, models + ([base] if base else []), ctx.key,
                  {"stage": ctx.stage, "samples": 0, "seconds": round(metrics["total_s"], 2)})
    ctx.log(f"{config.method}: {len(models)} models → {int(metrics['params'])} params in "
            f"{metrics['merge_s']:.2f}s")
    return metrics
