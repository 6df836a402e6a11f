"""``dare`` (Yu et al. 2024, "Language Models are Super Mario"): Drop And REscale each task
vector, then merge the sparse vectors by task arithmetic (or, with ``sign_elect``, by TIES'
sign election and disjoint mean: DARE-TIES). Per tensor, relative to the common base:

    δ_k = θ_k − θ_base
    m_k ~ Bernoulli(1 − p) element-wise          (drop each entry with probability p)
    δ̂_k = m_k ⊙ δ_k / (1 − p)                   (rescale: E[δ̂_k] = δ_k)
    θ   = θ_base + λ · Σ_k w_k δ̂_k      (sign_elect: θ_base + λ · elect_and_mean(w_k δ̂_k))

The masks come from the generator ``merge_state_dicts`` gives every parameter (seeded from the
stage seed and the parameter's name): ``m_k = rand(shape, generator, float32) < 1 − p``,
drawn for k = 0..K−1 in model order. The same seed, name and inputs give the same merge.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.merging.registry import MergeMethod, register_merge_method
from workloads.merging.ties import elect_and_mean

__all__ = ["DareParams", "dare_tensor"]


class DareParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="p: probability of dropping each "
                             "task-vector entry; kept entries are scaled by 1/(1 − p) (paper: "
                             "0.9 keeps SFT abilities; 0 = task arithmetic)")
    lambda_: float = Field(1.0, description="scale λ of the merged task vector")
    weights: list[float] | None = Field(None, description="per-model weights w_k; default 1")
    sign_elect: bool = Field(False, description="DARE-TIES: merge the rescaled task vectors by "
                             "TIES' sign election and disjoint mean instead of their sum")


def dare_tensor(base: torch.Tensor, tensors: list[torch.Tensor], drop_rate: float,
                generator: torch.Generator, lambda_: float = 1.0,
                weights: list[float] | None = None, sign_elect: bool = False) -> torch.Tensor:
    """DARE-merge same-shaped ``tensors`` onto ``base``; math in float32 (float64 stays)."""
    cdt = torch.float64 if base.dtype == torch.float64 else torch.float32
    w = weights or [1.0] * len(tensors)
    b = base.to(cdt)
    keep = 1.0 - drop_rate
    deltas = []
    for wi, t in zip(w, tensors):
        mask = torch.rand(b.shape, generator=generator, dtype=torch.float32) < keep
        deltas.append(float(wi) * torch.where(mask, (t.to(cdt) - b) / keep, 0.0))
    merged = elect_and_mean(torch.stack(deltas)) if sign_elect else torch.stack(deltas).sum(0)
    return (b + lambda_ * merged).to(base.dtype)


def _dare(tensors, base, params: DareParams, name, generator) -> torch.Tensor:
    return dare_tensor(base, tensors, params.drop_rate, generator, params.lambda_,
                       params.weights, params.sign_elect)


register_merge_method(MergeMethod("dare", "tensor", _dare,
                                  "drop each task-vector entry with prob. p, rescale by 1/(1−p), "
                                  "then task arithmetic (sign_elect: TIES)", params=DareParams,
                                  min_models=1, needs_base=True))
