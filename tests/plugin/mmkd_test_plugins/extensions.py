"""A user's own extensions as a plugin package declares them: a KD divergence (total variation
distance), a merge method (per-entry largest magnitude) and a workload (two random tiny
students), each found by mmkd through its entry-point group — no edit to mmkd itself."""

from __future__ import annotations

import os

import torch
from pydantic import Field

from orchestrator.plugin import StageContext, WorkloadConfig, workload
from workloads.divergences import register_divergence
from workloads.merging.registry import MergeMethod, register_merge_method


def tvd_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    """``(C, V)`` log-probabilities -> ``(C,)`` total variation 0.5 * sum |p_s - p_t|."""
    return 0.5 * (log_p_s.exp() - log_p_t.exp()).abs().sum(-1)


register_divergence("tvd", tvd_rows, description="total variation distance (test plugin)")


def max_magnitude(tensors, base, params, name, generator) -> torch.Tensor:
    """Per entry, the value of largest magnitude among the K models (first one on ties)."""
    stacked = torch.stack([t.float() for t in tensors])
    pick = stacked.abs().argmax(dim=0, keepdim=True)
    return stacked.gather(0, pick)[0].to(tensors[0].dtype)


register_merge_method(MergeMethod("max_magnitude", "tensor", max_magnitude,
                                  "per-entry largest magnitude (test plugin)", min_models=2))


class TinyPairConfig(WorkloadConfig):
    preset: str = Field("tiny-student", description="model preset of both models")
    seed: int = 0


@workload("tiny_pair", config=TinyPairConfig, outputs=("first", "second"))
def tiny_pair(config: TinyPairConfig, ctx: StageContext) -> dict[str, float]:
    """Two randomly initialised models of one preset (seeds seed and seed + 1)."""
    from workloads.models import build_model, save_model

    for i, out in enumerate(("first", "second")):
        torch.manual_seed(config.seed + i)
        model, processor = build_model({"preset": config.preset}, ctx.input("tokenizer"))
        save_model(model, processor, os.path.join(ctx.output_dir, out))
    return {"models": 2.0}
