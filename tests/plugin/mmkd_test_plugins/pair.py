"""A workload: two randomly initialised tiny models (a user's own extension, found by mmkd through its entry-point group alone)."""

from __future__ import annotations

import os

from pydantic import Field

from orchestrator.plugin import StageContext, WorkloadConfig, workload


class TinyPairConfig(WorkloadConfig):
    preset: str = Field("tiny-student", description="model preset of both models")
    family: str | None = Field(None, description="model family (default: LLaVA-1.5)")
    seed: int = 0
    zero_vision: bool = Field(False, description="zero the first model's vision tower and "
                              "projector: a model that cannot see (a checkpoint whose vision "
                              "weights were not loaded)")


@workload("tiny_pair", config=TinyPairConfig, outputs=("first", "second"))
def tiny_pair(config: TinyPairConfig, ctx: StageContext) -> dict[str, float]:
    """Two randomly initialised models of one preset (seeds seed and seed + 1)."""
    import torch

    from workloads.models import build_model, save_model

    for i, out in enumerate(("first", "second")):
        torch.manual_seed(config.seed + i)
        spec = {"preset": config.preset, **({"family": config.family} if config.family else {})}
        model, processor = build_model(spec, ctx.input("tokenizer"))
        if config.zero_vision and out == "first":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "vision_tower" in name or "multi_modal_projector" in name:
                        p.zero_()
        save_model(model, processor, os.path.join(ctx.output_dir, out))
    return {"models": 2.0}
