"""``width`` (JAM-Width): a NEW model twice as wide, initialised from two parents side by side.

The text decoder gets 2× hidden size, 2× attention heads (2× KV heads, same head_dim) and 2× FFN
width. Linear maps are block-diagonal, so stream k of the doubled residual stream is computed
from stream k only:

- exact: every q/k/v/o and gate/up/down projection (block-diagonal; biases concatenated),
  attention (softmax is per head, head_dim and RoPE unchanged, GQA groups stay within a
  parent: heads [0,H) use KV heads [0,G), heads [H,2H) use [G,2G)), SiLU gating, embeddings
  (concatenated along hidden: [E_1 | E_2]), and the projector: its first layer stacks both
  parents' rows on the shared vision features, later layers are block-diagonal, element-wise
  activations and ``image_newline`` (NeXT/OneVision) are concatenated; a LayerNorm *on the
  shared input* (InternVL's projector) is folded into each parent's first linear layer;
- NOT exact: an RMSNorm/LayerNorm over the doubled width normalises by both halves together,
  e.g. sqrt((ms_1 + ms_2)/2) instead of each parent's own RMS (weights are concatenated; equal
  when the two halves have equal statistics, e.g. a model merged with itself);
- lm_head: [w_1 W_1 | w_2 W_2] with w = weights (default ½, ½), so logits = Σ w_k logits_k
  = the parents' average when the hidden state is the concatenation (tied embeddings are untied).

Vision (``vision``):
- ``first``: parent 1's tower, shared. Exact when the parents share the tower (experts
  fine-tuned from one base with the tower frozen); otherwise parent 2's projector sees parent
  1's features. LLaVA-1.5/NeXT/OneVision, InternVL, Idefics3/SmolVLM.
- ``both``: the vision tower is widened too (patch embedding concatenated, blocks
  block-diagonal, the same norm coupling as the text side). Qwen2-VL / Qwen2.5-VL need it: their
  projector (``model.visual.merger``) is inside the vision module and its hidden layer is sized by
  the tower's width, so two projectors only fit side by side in a widened tower.
- ``auto`` (default): ``both`` for Qwen2/2.5-VL, ``first`` for the others.

Refused (``width_refusal``): decoders with per-layer ``q_norm``/``k_norm`` (Qwen3-VL, Gemma 3,
InternVL3.5): one norm weight of size head_dim is shared by every head of a layer, so the doubled
layer cannot give each parent's heads their own. The result is a plain checkpoint of the parents'
family (``save_pretrained``; reloads with ``AutoModelForImageTextToText``).
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.families import Family, get_family, parameter_part
from workloads.merging.anatomy import check_same_family, describe, text_prefix
from workloads.merging.registry import (MergeInputError, MergeMethod, method_params,
                                        register_merge_method)
from workloads.merging.state_dict import check_same_shapes

__all__ = ["WidthParams", "width_config", "width_state_dict", "width_merge", "width_refusal",
           "vision_mode"]

Tensors = dict[str, torch.Tensor]


class WidthParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    weights: list[float] | None = Field(None, description="lm_head weights of the two parents; "
                                        "default ½, ½")
    normalize: bool = Field(True, description="divide the weights by their sum")
    vision: Literal["auto", "first", "both"] = Field(
        "auto", description="first: keep parent 1's vision tower; both: widen the tower too "
                            "(needed by Qwen2/2.5-VL); auto: both for Qwen2/2.5-VL, else first")


_BLOCK_DIAG = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
               "gate_proj.weight", "up_proj.weight", "down_proj.weight")
_QWEN_WIDENABLE = ("qwen2_vl", "qwen2_5_vl")
_MORE_REASONS = {
    "gemma3": "; besides, Gemma 3 scales its embeddings by sqrt(hidden_size), which doubles",
    "qwen3_vl": "; besides, Qwen3-VL adds DeepStack vision features into early decoder layers",
}


def width_refusal(family: Family, sd: Mapping[str, torch.Tensor]) -> str | None:
    """Why no exact JAM-Width model of this family exists (None when one does)."""
    text = text_prefix(family)
    qk = [k for k in sd if k.startswith(text) and k.endswith(("q_norm.weight", "k_norm.weight"))]
    if not qk:
        return None
    return (f"merge method 'width' cannot build an exact JAM-Width model of {family.name} "
            f"({family.model_class}): its decoder layers normalise queries and keys with one "
            f"q_norm/k_norm weight of size head_dim shared by all heads of the layer ({qk[0]} "
            f"{tuple(sd[qk[0]].shape)}), so in the doubled layer both parents' heads would share "
            f"one parent's norm and the other parent's attention would change"
            f"{_MORE_REASONS.get(family.name, '')}. Use a parameter average (uniform, linear, "
            f"task_arithmetic, ties, dare) or cross instead")


def vision_mode(family: Family, requested: str) -> str:
    if requested == "auto":
        return "both" if family.name in _QWEN_WIDENABLE else "first"
    if requested == "first" and family.name in _QWEN_WIDENABLE:
        raise MergeInputError(
            f"merge method 'width' (vision: first) cannot be exact for {family.name}: its "
            f"projector (model.visual.merger) lives in the vision module and its hidden layer is "
            f"sized by the tower's width, so the two parents' projectors only fit side by side "
            f"in a widened tower; use vision: both (or auto)")
    if requested == "both" and family.name not in _QWEN_WIDENABLE:
        raise MergeInputError(
            f"merge method 'width': vision: both (widening the vision tower) is implemented for "
            f"{', '.join(_QWEN_WIDENABLE)}, not {family.name}; use vision: first (parent 1's "
            f"tower, exact when the parents share it)")
    return requested


def width_config(config: Any, family: Family | str = "llava", vision: str = "first") -> Any:
    """The config of the doubled model (text sizes ×2, head_dim unchanged; the vision tower's
    output width ×2, and its width too with ``vision="both"``)."""
    family = get_family(family) if isinstance(family, str) else family
    cfg = copy.deepcopy(config)
    t = cfg.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    t.hidden_size *= 2
    t.intermediate_size *= 2
    t.num_attention_heads *= 2
    t.num_key_value_heads *= 2
    if getattr(t, "head_dim", None) is not None:
        t.head_dim = head_dim
    # [w_1 W_1 | w_2 W_2] is not the embedding [E_1 | E_2]: the lm_head must be its own tensor
    for c in (cfg, t):
        if getattr(c, "tie_word_embeddings", None):
            c.tie_word_embeddings = False
    v = getattr(cfg, "vision_config", None)
    if family.name == "qwen2_vl":
        v.hidden_size *= 2  # the merger's output = the text width
        if vision == "both":
            v.embed_dim *= 2
            v.num_heads *= 2
    elif family.name == "qwen2_5_vl":
        v.out_hidden_size *= 2
        if vision == "both":
            v.hidden_size *= 2
            v.intermediate_size *= 2
            v.num_heads *= 2
    return cfg


def _cat(a: torch.Tensor, b: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.cat([a, b], dim=dim)


def _projector(family: Family, sd1: Tensors, sd2: Tensors) -> Tensors:
    """The widened projector tensors (non-Qwen families; Qwen's is in ``_qwen_visual``)."""
    name, out = family.name, {}
    if name in ("idefics3", "smolvlm"):
        key = "model.connector.modality_projection.proj.weight"  # no bias
        return {key: _cat(sd1[key], sd2[key])}
    p = "model.multi_modal_projector."
    w1, b1 = [sd[p + "linear_1.weight"] for sd in (sd1, sd2)], [sd[p + "linear_1.bias"]
                                                              for sd in (sd1, sd2)]
    if name == "internvl":
        # LN_k(x) = x̂ g_k + β_k on the shared input x̂: fold each parent's affine into its rows
        g = [sd[p + "layer_norm.weight"] for sd in (sd1, sd2)]
        beta = [sd[p + "layer_norm.bias"] for sd in (sd1, sd2)]
        b1 = [w @ be + b for w, be, b in zip(w1, beta, b1)]
        w1 = [w * gk[None, :] for w, gk in zip(w1, g)]
        out[p + "layer_norm.weight"] = torch.ones_like(g[0])
        out[p + "layer_norm.bias"] = torch.zeros_like(beta[0])
    elif name not in ("llava", "llava_next", "llava_onevision"):
        raise MergeInputError(f"merge method 'width' has no projector rule for {name}")
    out[p + "linear_1.weight"] = _cat(*w1)
    out[p + "linear_1.bias"] = _cat(*b1)
    out[p + "linear_2.weight"] = torch.block_diag(sd1[p + "linear_2.weight"],
                                                  sd2[p + "linear_2.weight"])
    out[p + "linear_2.bias"] = _cat(sd1[p + "linear_2.bias"], sd2[p + "linear_2.bias"])
    if "model.image_newline" in sd1:
        out["model.image_newline"] = _cat(sd1["model.image_newline"], sd2["model.image_newline"])
    return out


def _merger_first_layer(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """Qwen's merger reads ``merge²`` consecutive tokens of the widened tower, each [x_1 | x_2]
    (``width`` = one parent's tower width): parent k's columns for token t sit at
    t·2·width + k·width."""
    tokens = a.shape[1] // width
    out = a.new_zeros(a.shape[0] + b.shape[0], 2 * a.shape[1])
    for t in range(tokens):
        out[: a.shape[0], 2 * t * width: (2 * t + 1) * width] = a[:, t * width:(t + 1) * width]
        out[a.shape[0]:, (2 * t + 1) * width: (2 * t + 2) * width] = b[:, t * width:(t + 1) * width]
    return out


def _qwen_visual(key: str, a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """One tensor of a Qwen2/2.5-VL vision tower + merger, widened (``vision: both``)."""
    rest = key[len("model.visual."):]
    if rest == "merger.mlp.0.weight":
        return _merger_first_layer(a, b, width)
    if rest.endswith("attn.qkv.weight"):  # [q; k; v], each block-diagonal over the parents
        return torch.cat([torch.block_diag(x, y) for x, y in zip(a.chunk(3), b.chunk(3))])
    if rest.endswith("attn.qkv.bias"):
        return torch.cat([_cat(x, y) for x, y in zip(a.chunk(3), b.chunk(3))])
    if rest.startswith("patch_embed.") or a.dim() == 1:  # conv out channels, norms, biases
        return _cat(a, b)
    if a.dim() == 2 and rest.startswith(("blocks.", "merger.mlp.")):
        return torch.block_diag(a, b)
    raise MergeInputError(f"merge method 'width' does not know how to widen {key!r} "
                          f"{tuple(a.shape)}")


def width_state_dict(sd1: Tensors, sd2: Tensors, weights: tuple[float, float] = (0.5, 0.5),
                     family: Family | str = "llava", vision: str = "first") -> Tensors:
    """Pure: the doubled model's state dict from two same-architecture state dicts of
    ``family`` (``vision``: ``first`` | ``both``, see the module docstring)."""
    family = get_family(family) if isinstance(family, str) else family
    text = text_prefix(family)
    qwen = family.name in _QWEN_WIDENABLE
    out = {} if qwen else _projector(family, sd1, sd2)
    tower_width = sd1["model.visual.merger.ln_q.weight"].shape[0] if qwen else 0
    for key, a in sd1.items():
        b = sd2[key]
        if key in out:
            continue
        if key == "lm_head.weight":
            out[key] = torch.cat([weights[0] * a, weights[1] * b], dim=1)
        elif key == text + "embed_tokens.weight":
            out[key] = _cat(a, b, dim=1)
        elif key.startswith(text) and key.endswith(_BLOCK_DIAG):
            out[key] = torch.block_diag(a, b)
        elif key.startswith(text) and a.dim() == 1:  # q/k/v biases, RMSNorm weights
            out[key] = _cat(a, b)
        elif qwen and key.startswith("model.visual."):
            out[key] = a.clone() if vision == "first" else _qwen_visual(key, a, b, tower_width)
        elif not key.startswith(text) and parameter_part(family, key) == "vision":
            out[key] = a.clone()
        else:
            raise MergeInputError(f"merge method 'width' does not know how to widen parameter "
                                  f"{key!r} {tuple(a.shape)} of {family.name}")
    return out


def width_merge(models: list[Any], base: Any = None,
                params: WidthParams | Mapping[str, Any] | None = None,
                names: list[str] | None = None) -> Any:
    """Build the JAM-Width model from two parents of one family (same architecture)."""
    params = method_params("width", params)
    if len(models) != 2:
        raise MergeInputError(f"merge method 'width' needs exactly K=2 models, got K={len(models)}")
    names = names or ["model 0", "model 1"]
    family = check_same_family("width", models, names)
    sds = [m.state_dict() for m in models]
    check_same_shapes("width", sds, names, describe(models[0]))
    reason = width_refusal(family, sds[0])
    if reason:
        raise MergeInputError(reason)
    vision = vision_mode(family, params.vision)
    weights = params.weights or [0.5, 0.5]
    if params.normalize:
        weights = [w / sum(weights) for w in weights]
    merged = type(models[0])(width_config(models[0].config, family, vision))
    sd = width_state_dict(sds[0], sds[1], tuple(weights), family, vision)
    missing, unexpected = merged.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise MergeInputError(f"merge method 'width': widened state dict does not fit the "
                              f"doubled {family.name} config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    merged.generation_config = copy.deepcopy(models[0].generation_config)
    return merged.to(next(models[0].parameters()).dtype)


register_merge_method(MergeMethod("width", "model", width_merge,
                                  "JAM-Width: new 2× wide model, parents block-diagonal",
                                  params=WidthParams, min_models=2, max_models=2))
