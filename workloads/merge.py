"""``merge``: combine K models with one method of ``workloads.merging.MERGE_METHODS``.

Params: ``method`` plus that method's own parameters, flat (each method declares them as a
pydantic model, ``MergeMethod.params``), and ``seed``::

    params: {method: dare, drop_rate: 0.9, lambda_: 1.0}      # seed: from defaults.params
    params: {method: ensemble, router: soft, temperature: 0.1}

Inputs:
  models     list of model dirs (K parents; for ``ensemble``: the experts in partition order)
  base       optional model dir: the common start for ``task_arithmetic``/``ties``/``dare``;
             for ``ensemble`` the model whose vision tower the partition stage embedded with
  partition  optional ``partition.partitions`` dir (``centroids.npy``), needed by ``ensemble``

Parents may be of any family of ``workloads.families`` (all of one family and, for parameter
averages, one architecture). Output ``model/``: a checkpoint of the parents' family (parameter
averages, ``width``) or a wrapper dir with ``mmkd_merged.json`` (``cross``, ``ensemble``); both
hold the first parent's processor files and load with ``workloads.merging.load_any_model``.
Before it is published, a coverage audit reads the written weights back and fails the merge if
any parent tensor is missing (``workloads/merging/audit.py``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from orchestrator.plugin import StageContext
from workloads.fsutil import atomic_dir
from workloads.lineage import write_lineage
from orchestrator.plugin import WorkloadConfig, workload

__all__ = ["MergeConfig", "merge", "run_merge"]


class MergeConfig(WorkloadConfig):
    """``method`` plus that method's own parameters, flat: ``{method: ties, density: 0.3}``.

    The parameters are validated by the method's params model (``MergeMethod.params``) and kept
    with their defaults filled in, so the stage key sees every value the merge used; a field the
    method does not declare is an error naming the method and its parameters.
    """

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    method: str = Field(description="a registered merge method: uniform | linear | "
                                    "task_arithmetic | ties | dare | width | cross | ensemble "
                                    "(`workloads/merging/`)")
    seed: int = Field(0, description="seeds the per-tensor generators of random methods (dare) "
                                     "and the new layers of cross")

    @model_validator(mode="wrap")
    @classmethod
    def _method_params(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("method"), str):
            from workloads.merging import MERGE_METHODS, method_params

            if data["method"] not in MERGE_METHODS:
                msg = (f"unknown merge method {data['method']!r}; known: "
                       f"{', '.join(sorted(MERGE_METHODS))} (a new one is a file in "
                       f"workloads/merging/)")
                raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                    type=PydanticCustomError("unknown_merge_method", msg), loc=("method",),
                    input=data["method"])])
            own = {k: v for k, v in data.items() if k not in cls.model_fields}
            params = method_params(data["method"], own)
            data = {**{k: v for k, v in data.items() if k in cls.model_fields},
                    **params.model_dump()}
        return handler(data)

    @property
    def params(self) -> BaseModel:
        """The selected method's params model instance."""
        from workloads.merging import method_params

        return method_params(self.method, self.model_extra or {})


def _validate(config: MergeConfig, inputs: dict[str, Any]) -> list[str]:
    from workloads.merging import check_merge_inputs

    return check_merge_inputs(config.method, len(inputs.get("models") or []),
                              bool(inputs.get("base")), bool(inputs.get("partition")),
                              getattr(config.params, "weights", None))


def _one(path: Any) -> str | None:
    if isinstance(path, (list, tuple)):
        return path[0] if path else None
    return path


def run_merge(config: MergeConfig, model_dirs: list[str], out_dir: str,
              base_dir: str | None = None, partition_dir: str | None = None) -> dict[str, float]:
    """Merge ``model_dirs`` into ``out_dir`` (atomically); returns metrics. Parents of any
    family load with ``AutoModelForImageTextToText``; the output gets the first parent's
    processor files and passes the coverage audit (``workloads.merging.audit``) before it is
    published."""
    import numpy as np
    import torch

    from workloads.merging import (MergeInputError, check_merge_inputs, check_same_shapes,
                                   get_merge_method, merge_state_dicts)
    from workloads.merging.anatomy import check_same_family, describe
    from workloads.merging.io import copy_processor_files, load_plain

    params = config.params
    problems = check_merge_inputs(config.method, len(model_dirs), base_dir is not None,
                                  partition_dir is not None, getattr(params, "weights", None))
    if problems:
        raise MergeInputError("; ".join(problems))
    method = get_merge_method(config.method)
    t0 = time.perf_counter()
    names = [f"models[{i}] ({p})" for i, p in enumerate(model_dirs)]
    models = [load_plain(p) for p in model_dirs]
    base = load_plain(base_dir) if base_dir else None
    t_loaded = time.perf_counter()
    # fork_rng + seed: a model method's new layers (cross) are initialised from the stage seed
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if method.kind == "tensor":
            everyone = models + ([base] if base is not None else [])
            every_name = names + ([f"base ({base_dir})"] if base is not None else [])
            check_same_family(config.method, everyone, every_name)
            sd = merge_state_dicts(config.method, [m.state_dict() for m in models],
                                   base.state_dict() if base is not None else None, params,
                                   seed=config.seed, names=every_name, family=describe(models[0]))
            merged = models[0]
            merged.load_state_dict(sd)
        elif config.method == "ensemble":
            cpath = os.path.join(partition_dir, "centroids.npy")
            if not os.path.exists(cpath):
                raise MergeInputError(f"merge method 'ensemble': {cpath} not found; input "
                                      f"`partition` must be a partition stage's `partitions`")
            merged = method.fn(models, base, params, centroids=np.load(cpath))
        else:
            if config.method in ("width", "cross"):
                check_same_family(config.method, models, names)
            if config.method == "width":  # here, so the error names the input paths
                check_same_shapes("width", [m.state_dict() for m in models], names,
                                  describe(models[0]))
            merged = method.fn(models, base, params)
    merge_s = time.perf_counter() - t_loaded
    with atomic_dir(out_dir) as tmp:
        if hasattr(merged, "save_pretrained"):
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            merged.save(tmp)
        copy_processor_files(model_dirs[0], tmp)
        audited = _audit(tmp, merged, models, names, same_shapes=method.kind == "tensor")
    n_params = sum(p.numel() for p in merged.parameters())
    n_new = (sum(p.numel() for p in merged.new_parameters())
             if hasattr(merged, "new_parameters") else 0)
    return {"params": float(n_params), "new_params": float(n_new), "num_models": len(models),
            "audited_tensors": float(audited), "merge_s": merge_s,
            "total_s": time.perf_counter() - t0}


def _audit(out_dir: str, merged: Any, models: list[Any], names: list[str],
           same_shapes: bool) -> int:
    """Coverage audit of what was written: a plain checkpoint must hold every tensor of every
    parent; a wrapper's ``decoder_k/`` (cross) or ``expert_k/`` (ensemble) every tensor of
    parent k. Returns the number of tensors checked."""
    from workloads.merging.audit import audit_coverage

    if hasattr(merged, "save_pretrained"):
        return audit_coverage(out_dir, merged, models, names, same_shapes=same_shapes)
    subs = [("decoder", getattr(merged, "decoders", None)),
            ("expert", getattr(merged, "experts", None))]
    checked = 0
    for sub, written in subs:
        for k, (model, name) in enumerate(zip(written or [], names)):
            checked += audit_coverage(os.path.join(out_dir, f"{sub}_{k}"), model, [models[k]],
                                      [name])
    return checked


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
