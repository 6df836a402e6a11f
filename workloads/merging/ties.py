"""``ties`` (Yadav et al. 2023, TIES-Merging), per tensor, relative to the common base:

1. trim: keep the top ``density`` fraction (by magnitude) of each task vector τ_k = θ_k − θ_base;
2. elect: the sign of Σ_k w_k τ_k (total mass per sign) per entry;
3. disjoint mean: average only the trimmed entries that agree with the elected sign;
θ = θ_base + λ · merged τ.
"""

from __future__ import annotations

from typing import Any

import torch

from workloads.merging.registry import MergeMethod, register_merge_method

__all__ = ["trim_top_k", "ties_tensor"]


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


def ties_tensor(base: torch.Tensor, tensors: list[torch.Tensor], density: float = 0.2,
                lambda_: float = 1.0, weights: list[float] | None = None) -> torch.Tensor:
    w = weights or [1.0] * len(tensors)
    b = base.float()
    taus = torch.stack([float(wi) * trim_top_k(t.float() - b, density)
                        for wi, t in zip(w, tensors)])
    sign = torch.sign(taus.sum(dim=0))
    agree = (torch.sign(taus) == sign.unsqueeze(0)) & (taus != 0)
    count = agree.sum(dim=0).clamp(min=1)
    merged = (taus * agree).sum(dim=0) / count
    return (b + lambda_ * merged).to(base.dtype)


def _ties(tensors: list[torch.Tensor], base: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    return ties_tensor(base, tensors, params.get("density", 0.2), params.get("lambda_", 1.0),
                       params.get("weights"))


register_merge_method(MergeMethod("ties", "tensor", _ties,
                                  "trim top-density task-vector entries, elect sign, disjoint "
                                  "mean; base + λ·τ", min_models=1, needs_base=True))
