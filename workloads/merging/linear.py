"""``uniform`` and ``linear``: (weighted) parameter averages.

    linear(θ_1..θ_K; w) = Σ_k w_k θ_k / Σ_k w_k      (normalize=True, the default)
                        = Σ_k w_k θ_k                 (normalize=False)

``uniform`` is ``linear`` with w_k = 1/K. Normalization makes ``weights: [2, 1]`` mean 2/3, 1/3;
turn it off to use the weights as given (e.g. model soups that deliberately scale).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.merging.registry import MergeInputError, MergeMethod, register_merge_method

__all__ = ["LinearParams", "linear_tensor", "uniform_tensor"]


class LinearParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weights: list[float] | None = Field(None, description="per-model weights; default equal")
    normalize: bool = Field(True, description="divide the weights by their sum")


def linear_tensor(tensors: list[torch.Tensor], weights: list[float] | None = None,
                  normalize: bool = True) -> torch.Tensor:
    """Weighted mean of same-shaped tensors, computed in float32, returned in the first's dtype."""
    k = len(tensors)
    w = [1.0 / k] * k if weights is None else [float(x) for x in weights]
    if len(w) != k:
        raise MergeInputError(f"merge method 'linear': {len(w)} weights for {k} models")
    if normalize:
        total = sum(w)
        if total == 0:
            raise MergeInputError("merge method 'linear': weights sum to 0; cannot normalize "
                                  "(set normalize: false to use them as given)")
        w = [x / total for x in w]
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for wi, t in zip(w, tensors):
        if wi != 0.0:
            out += wi * t.float()
    return out.to(tensors[0].dtype)


def uniform_tensor(tensors: list[torch.Tensor]) -> torch.Tensor:
    return linear_tensor(tensors, None, normalize=True)


def _linear(tensors, base, params: LinearParams, name, generator) -> torch.Tensor:
    return linear_tensor(tensors, params.weights, params.normalize)


def _uniform(tensors, base, params, name, generator) -> torch.Tensor:
    return uniform_tensor(tensors)


register_merge_method(MergeMethod("uniform", "tensor", _uniform,
                                  "mean of the K models' parameters", min_models=1))
register_merge_method(MergeMethod("linear", "tensor", _linear,
                                  "weighted mean Σ w_k θ_k (weights normalized unless "
                                  "normalize: false)", params=LinearParams, min_models=1))
