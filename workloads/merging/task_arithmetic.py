"""``task_arithmetic`` (Ilharco et al. 2023): θ = θ_base + λ Σ_k w_k (θ_k − θ_base).

``weights`` default to 1 for every model (the paper's form; λ scales the sum).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.merging.registry import MergeMethod, register_merge_method

__all__ = ["TaskArithmeticParams", "task_arithmetic_tensor"]


class TaskArithmeticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    lambda_: float = Field(1.0, description="scale λ of the merged task vector")
    weights: list[float] | None = Field(None, description="per-model weights w_k; default 1")


def task_arithmetic_tensor(base: torch.Tensor, tensors: list[torch.Tensor], lambda_: float = 1.0,
                           weights: list[float] | None = None) -> torch.Tensor:
    w = weights or [1.0] * len(tensors)
    b = base.float()
    delta = torch.zeros_like(b)
    for wi, t in zip(w, tensors):
        delta += float(wi) * (t.float() - b)
    return (b + lambda_ * delta).to(base.dtype)


def _task_arithmetic(tensors, base, params: TaskArithmeticParams, name, generator):
    return task_arithmetic_tensor(base, tensors, params.lambda_, params.weights)


register_merge_method(MergeMethod("task_arithmetic", "tensor", _task_arithmetic,
                                  "base + λ Σ w_k (θ_k − base)", params=TaskArithmeticParams,
                                  min_models=1, needs_base=True))
