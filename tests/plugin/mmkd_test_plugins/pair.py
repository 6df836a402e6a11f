"""A workload: two randomly initialised tiny models (a user's own extension, found by mmkd through its entry-point group alone)."""

from __future__ import annotations

import os

from pydantic import Field

from orchestrator.plugin import StageContext, WorkloadConfig, workload


class TinyPairConfig(WorkloadConfig):
    preset: str = Field("tiny-student", description="model preset of both models")
    family: str | None = Field(None, description="model family (default: LLaVA-1.5)")
    seed: int = 0


@workload("tiny_pair", config=TinyPairConfig, outputs=("first", "second"))
def tiny_pair(config: TinyPairConfig, ctx: StageContext) -> dict[str, float]:
    """Two randomly initialised models of one preset (seeds seed and seed + 1)."""
    import torch

    from workloads.models import build_model, save_model

    for i, out in enumerate(("first", "second")):
        torch.manual_seed(config.seed + i)
        spec = {"preset": config.preset, **({"family": config.family} if config.family else {})}
        model, processor = build_model(spec, ctx.input("tokenizer"))
        save_model(model, processor, os.path.join(ctx.output_dir, out))
    return {"models": 2.0}
