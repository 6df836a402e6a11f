"""``ensemble`` (decentralized): keep the K experts; the next-token distribution is

    p(y | x) = Σ_k w_k(x) p_k(y | x),   w(x) = route_weights(embed(image), centroids)

where embed is the frozen router vision tower (the one the partition stage clustered with),
mean-pooled, and the centroids are the partition's. ``top1`` (as in the paper's code) runs only
the nearest expert per sample; ``soft`` mixes by softmax(cos/τ). A sample without an image gets
uniform weights 1/K.

``forward`` returns ``.logits = log p`` (a normalised log-distribution), so cross-entropy and
argmax on it are the mixture's; ``generate`` is greedy (see ``generation.py``).
"""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace
from typing import Any, Literal, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workloads.merging.anatomy import check_same_family
from workloads.merging.generation import GreedyGenerationMixin
from workloads.merging.registry import (MergeInputError, MergeMethod, method_params,
                                        register_merge_method)
from workloads.merging.router import embed_images, route_weights

__all__ = ["EnsembleParams", "EnsembleModel", "ensemble_merge", "load_ensemble"]


class EnsembleParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    router: Literal["top1", "soft"] = Field("top1", description="top1: only the nearest expert "
                                            "runs; soft: mix by softmax(cos/τ)")
    temperature: float = Field(0.1, gt=0.0, description="soft routing: τ of softmax(cos/τ)")


class EnsembleModel(GreedyGenerationMixin, nn.Module):
    def __init__(self, experts: list[Any], router_vision: Any, centroids: torch.Tensor,
                 mode: str, temperature: float):
        super().__init__()
        if centroids.shape[0] != len(experts):
            raise MergeInputError(f"merge method 'ensemble': {centroids.shape[0]} centroids for "
                                  f"{len(experts)} experts; give one expert per partition, in "
                                  f"partition order (part_0 … part_{{K-1}})")
        self.experts = nn.ModuleList(experts)
        self.router_vision = router_vision
        self.register_buffer("centroids", centroids.float())
        self.mode, self.temperature = mode, float(temperature)
        self.config = experts[0].config
        self.generation_config = copy.deepcopy(experts[0].generation_config)

    def routing(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(B, K) weights; rows without an image get 1/K."""
        b, k = input_ids.shape[0], len(self.experts)
        w = torch.full((b, k), 1.0 / k)
        if pixel_values is None:
            return w
        routed = route_weights(embed_images(self.router_vision, pixel_values), self.centroids,
                               self.mode, self.temperature)
        if pixel_values.shape[0] == b:
            return routed
        # model_inputs() passes only the images of rows that have one, in row order.
        has = (input_ids == self.config.image_token_id).any(dim=1)
        w[has] = routed
        return w

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **kwargs: Any) -> Any:
        w = self.routing(input_ids, pixel_values)
        probs = None
        for k, expert in enumerate(self.experts):
            if not bool((w[:, k] > 0).any()):
                continue  # top-1: experts nobody was routed to do not run
            logits = expert(input_ids=input_ids, attention_mask=attention_mask,
                            pixel_values=pixel_values).logits
            p = w[:, k, None, None].to(logits.dtype) * torch.softmax(logits.float(), dim=-1)
            probs = p if probs is None else probs + p
        return SimpleNamespace(logits=torch.log(probs.clamp_min(1e-30)), routing=w)

    def save(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        for k, expert in enumerate(self.experts):
            expert.save_pretrained(os.path.join(out_dir, f"expert_{k}"), safe_serialization=True)
        self.router_vision.save_pretrained(os.path.join(out_dir, "router_vision"),
                                           safe_serialization=True)
        np.save(os.path.join(out_dir, "centroids.npy"), self.centroids.numpy())
        with open(os.path.join(out_dir, "mmkd_merged.json"), "w") as f:
            json.dump({"kind": "ensemble", "num_experts": len(self.experts),
                       "router": {"mode": self.mode, "temperature": self.temperature}}, f,
                      indent=2)


def load_ensemble(path: str, meta: dict[str, Any]) -> EnsembleModel:
    from transformers import AutoModel, AutoModelForImageTextToText

    experts = [AutoModelForImageTextToText.from_pretrained(os.path.join(path, f"expert_{k}"))
               for k in range(meta["num_experts"])]
    router = AutoModel.from_pretrained(os.path.join(path, "router_vision"))
    centroids = torch.from_numpy(np.load(os.path.join(path, "centroids.npy")))
    return EnsembleModel(experts, router, centroids, **meta["router"]).eval()


def ensemble_merge(models: list[Any], base: Any = None,
                   params: EnsembleParams | Mapping[str, Any] | None = None,
                   centroids: np.ndarray | torch.Tensor | None = None) -> EnsembleModel:
    """Experts = ``models`` in partition order; router tower = ``base``'s if given (pass the
    model the partition stage embedded with), else expert 0's."""
    params = method_params("ensemble", params)
    family = check_same_family("ensemble", list(models),
                               [f"model {i}" for i in range(len(models))])
    if family.name != "llava":
        raise MergeInputError(
            f"merge method 'ensemble' routes by the vision tower's embedding of a [B, 3, H, W] "
            f"image batch (model.vision_tower), which is LLaVA-1.5's layout; {family.name} "
            f"({family.model_class}) batches its images as {family.pixel_layout!r} and is not "
            f"supported yet. Use a parameter average (uniform, linear, ties) instead")
    if centroids is None:
        raise MergeInputError("merge method 'ensemble' needs input `partition` (centroids.npy "
                              "from the partition stage)")
    c = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
    router = copy.deepcopy((base if base is not None else models[0]).model.vision_tower).eval()
    for p in router.parameters():
        p.requires_grad_(False)
    if c.shape[1] != router.config.hidden_size:
        raise MergeInputError(f"merge method 'ensemble': centroids have dim {c.shape[1]} but the "
                              f"router vision tower has hidden size {router.config.hidden_size}; "
                              f"pass the partition stage's `model` as input `base`")
    return EnsembleModel(list(models), router, c, params.router, params.temperature).eval()


register_merge_method(MergeMethod("ensemble", "model", ensemble_merge,
                                  "K experts mixed per sample by an image router over the "
                                  "partition centroids (top1 | soft)", params=EnsembleParams,
                                  min_models=1,
                                  needs_partition=True, same_shapes=False))
