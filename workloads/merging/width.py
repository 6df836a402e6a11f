"""``width`` (JAM-Width): a NEW model twice as wide, initialised from two parents side by side.

The text decoder gets 2× hidden size, 2× attention heads (2× KV heads, same head_dim) and 2× FFN
width. Linear maps are block-diagonal, so stream k of the doubled residual stream is computed
from stream k only:

- exact: every q/k/v/o and gate/up/down projection (block-diagonal; biases concatenated),
  attention (softmax is per head, head_dim and RoPE unchanged, GQA groups stay within a
  parent: heads [0,H) use KV heads [0,G), heads [H,2H) use [G,2G)), SiLU gating, embeddings
  (concatenated along hidden: [E_1 | E_2]), and the projector (linear_1 stacks both parents'
  rows on the shared vision features, linear_2 is block-diagonal; GELU is element-wise);
- NOT exact: RMSNorm normalises over the doubled width, i.e. by sqrt((ms_1 + ms_2)/2) instead
  of each parent's own RMS (weights are concatenated; equal when the two halves have equal RMS);
- lm_head: [w_1 W_1 | w_2 W_2] with w = weights (default ½, ½), so logits = Σ w_k logits_k
  = the parents' average when the hidden state is the concatenation.
- vision tower: parent 1's, shared (``vision: first``). Exact when the parents share the tower
  (experts fine-tuned from one base with the tower frozen); otherwise parent 2's projector
  sees parent 1's features. Concatenating two towers is not implemented.

Net: the merged model at init = the two parents run side by side with their logits averaged,
up to the RMSNorm coupling. It is a plain ``LlavaForConditionalGeneration`` checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.merging.registry import (MergeInputError, MergeMethod, method_params,
                                        register_merge_method)

__all__ = ["WidthParams", "width_config", "width_state_dict", "width_merge"]


class WidthParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weights: list[float] | None = Field(None, description="lm_head weights of the two parents; "
                                        "default ½, ½")
    normalize: bool = Field(True, description="divide the weights by their sum")
    vision: Literal["first"] = Field("first", description="keep parent 1's vision tower")

_TEXT = "model.language_model."
_PROJ = "model.multi_modal_projector."
_VISION = "model.vision_tower."
_BLOCK_DIAG = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
               "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def width_config(config: Any) -> Any:
    """The LlavaConfig of the doubled model (text sizes ×2, head_dim unchanged)."""
    cfg = copy.deepcopy(config)
    t = cfg.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    t.hidden_size *= 2
    t.intermediate_size *= 2
    t.num_attention_heads *= 2
    t.num_key_value_heads *= 2
    if getattr(t, "head_dim", None) is not None:
        t.head_dim = head_dim
    return cfg


def _block_diag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(a, b)


def width_state_dict(sd1: dict[str, torch.Tensor], sd2: dict[str, torch.Tensor],
                     weights: tuple[float, float] = (0.5, 0.5)) -> dict[str, torch.Tensor]:
    """Pure: the doubled model's state dict from two same-architecture LLaVA state dicts."""
    out = {}
    for key, a in sd1.items():
        b = sd2[key]
        if key.startswith(_VISION):
            out[key] = a.clone()
        elif key == _PROJ + "linear_1.weight":
            out[key] = torch.cat([a, b], dim=0)
        elif key.startswith(_PROJ) and key.endswith("bias"):
            out[key] = torch.cat([a, b], dim=0)
        elif key == _PROJ + "linear_2.weight":
            out[key] = _block_diag(a, b)
        elif key == _TEXT + "embed_tokens.weight":
            out[key] = torch.cat([a, b], dim=1)
        elif key == "lm_head.weight":
            out[key] = torch.cat([weights[0] * a, weights[1] * b], dim=1)
        elif key.startswith(_TEXT) and key.endswith(_BLOCK_DIAG):
            out[key] = _block_diag(a, b)
        elif key.startswith(_TEXT) and a.dim() == 1:  # q/k/v biases, RMSNorm weights
            out[key] = torch.cat([a, b], dim=0)
        else:
            raise MergeInputError(f"merge method 'width': does not know how to widen parameter "
                                  f"{key!r} {tuple(a.shape)}; it supports LLaVA with a Qwen2/"
                                  f"Llama-style text decoder")
    return out


def width_merge(models: list[Any], base: Any = None,
                params: WidthParams | Mapping[str, Any] | None = None) -> Any:
    """Build the JAM-Width model from two ``LlavaForConditionalGeneration`` parents."""
    from transformers import LlavaForConditionalGeneration

    params = method_params("width", params)
    if len(models) != 2:
        raise MergeInputError(f"merge method 'width' needs exactly K=2 models, got K={len(models)}")
    weights = params.weights or [0.5, 0.5]
    if params.normalize:
        weights = [w / sum(weights) for w in weights]
    cfg = width_config(models[0].config)
    merged = LlavaForConditionalGeneration(cfg)
    sd = width_state_dict(models[0].state_dict(), models[1].state_dict(), tuple(weights))
    missing, unexpected = merged.load_state_dict(sd, strict=False)
    # lm_head may be tied in some configs; everything else must be set.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise MergeInputError(f"merge method 'width': widened state dict does not fit the "
                              f"doubled config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    merged.generation_config = copy.deepcopy(models[0].generation_config)
    return merged


register_merge_method(MergeMethod("width", "model", width_merge,
                                  "JAM-Width: new 2× wide model, parents block-diagonal",
                                  params=WidthParams, min_models=2, max_models=2))
