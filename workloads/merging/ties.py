"""``ties`` (Yadav et al. 2023, TIES-Merging), per tensor, relative to the common base:

1. trim: keep the top ``density`` fraction (by magnitude) of each task vector τ_k = θ_k − θ_base;
2. elect: the sign of Σ_k w_k τ_k (total mass per sign) per entry;
3. disjoint mean: average only the trimmed entries that agree with the elected sign;
θ = θ_base + λ · merged τ.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.merging.registry import MergeMethod, register_merge_method

__all__ = ["TiesParams", "trim_top_k", "elect_and_mean", "ties_tensor"]


class TiesParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    lambda_: float = Field(1.0, description="scale λ of the merged task vector")
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector's "
                           "entries kept (top |τ|)")
    weights: list[float] | None = Field(None, description="per-model weights w_k; default 1")


def trim_top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``ceil(density·n)`` largest-magnitude entries of ``tau``."""
    if density >= 1.0:
        return tau
    n = tau.numel()
    k = int(torch.ceil(torch.tensor(density * n)).item())
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.abs().flatten()
    threshold = torch.topk(flat, k, largest=True, sorted=False).values.min()
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_and_mean(taus: torch.Tensor) -> torch.Tensor:
    """TIES steps 2-3 on stacked (weighted, sparsified) task vectors ``(K, ...)``: elect the sign
    of Σ_k τ_k per entry, then average only the non-zero entries that agree with it."""
    sign = torch.sign(taus.sum(dim=0))
    agree = (torch.sign(taus) == sign.unsqueeze(0)) & (taus != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (taus * agree).sum(dim=0) / count


def ties_tensor(base: torch.Tensor, tensors: list[torch.Tensor], density: float,
                lambda_: float = 1.0, weights: list[float] | None = None) -> torch.Tensor:
    w = weights or [1.0] * len(tensors)
    b = base.float()
    taus = torch.stack([float(wi) * trim_top_k(t.float() - b, density)
                        for wi, t in zip(w, tensors)])
    return (b + lambda_ * elect_and_mean(taus)).to(base.dtype)


def _ties(tensors, base, params: TiesParams, name, generator) -> torch.Tensor:
    return ties_tensor(base, tensors, params.density, params.lambda_, params.weights)


register_merge_method(MergeMethod("ties", "tensor", _ties,
                                  "trim top-density task-vector entries, elect sign, disjoint "
                                  "mean; base + λ·τ", params=TiesParams, min_models=1,
                                  needs_base=True))
