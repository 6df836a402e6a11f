"""``cross`` (JAM-Cross): keep both parent decoders and bridge them with NEW cross-attention
layers after every ``cross_every``-th decoder layer, in both directions (A attends to B, B to A,
causally: position t sees the other stream's positions ≤ t).

- shared input embedding: parent A's (first model) token embedding + vision tower + projector
  build the multimodal input embeddings both decoders read;
- shared output projection: parent A's ``lm_head`` over a NEW fusion layer
  ``Linear(2h → h)`` applied to [norm_A(h_A) ; norm_B(h_B)], initialised to the average;
- bridge output projections are zero-initialised, so at init the model = the fused parents
  and training starts from there; the follow-up fine-tune trains only ``new_parameters()``
  (bridges + fusion), the parents are frozen (``requires_grad=False``).

Any family whose decoder can be stepped by hand (every family of ``workloads.families`` but
Qwen3-VL, ``cross_refusal``): the layers' arguments (attention masks — Gemma 3's sliding and
image-bidirectional ones too —, rotary / M-RoPE position embeddings, position ids) are not
rebuilt here but captured from parent A's own forward, with its decoder layers recording their
call instead of computing (``_recording_layers``); both parents' layers then run on them. B gets
A's positions, so the parents must agree on the position/mask fields of their text configs.

Saved as ``decoder_0/``, ``decoder_1/`` (HF checkpoints), ``bridge.safetensors`` (new layers) and
``mmkd_merged.json``; ``workloads.merging.io.load_merged`` loads it back. Parent B's embedding,
vision tower, projector and lm_head are kept in ``decoder_1/`` but unused.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workloads.families import Family
from workloads.merging.anatomy import check_same_family, language_model
from workloads.merging.generation import GreedyGenerationMixin
from workloads.merging.registry import (MergeInputError, MergeMethod, method_params,
                                        register_merge_method)

__all__ = ["CrossParams", "CrossBridge", "CrossMergedModel", "cross_merge", "load_cross",
           "cross_refusal"]


class CrossParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cross_every: int = Field(2, ge=1, description="a bridge after every n-th decoder layer")


class CrossBridge(nn.Module):
    """Pre-norm causal cross-attention x ← x + o(attn(q(x), k(y), v(y))), o zero-initialised."""

    def __init__(self, hidden: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden {hidden} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_q, self.norm_kv = nn.RMSNorm(hidden, eps=eps), nn.RMSNorm(hidden, eps=eps)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.o = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.o.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x, y: (B, T, h); key_mask: (B, T) bool, True = real token."""
        b, t, h = x.shape
        split = lambda z: z.view(b, t, self.num_heads, h // self.num_heads).transpose(1, 2)  # noqa
        q = split(self.q(self.norm_q(x)))
        k, v = split(self.k(self.norm_kv(y))), split(self.v(self.norm_kv(y)))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=x.device)  # no all-masked rows (padding)
        allowed = (causal[None, None] & key_mask[:, None, None, :]) | eye[None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return x + self.o(out.transpose(1, 2).reshape(b, t, h))


# Text-config fields that decide positions and masks: the layer arguments captured from parent
# A (rotary embeddings, masks) are only valid for parent B when these agree.
_POSITION_FIELDS = ("rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
                    "head_dim", "layer_types", "sliding_window", "max_position_embeddings",
                    "use_bidirectional_attention", "_attn_implementation")
# Families whose language model does more between decoder layers than ``h = layer(h, ...)``.
_NOT_STEPPABLE = {
    "qwen3_vl": "its language model adds DeepStack visual features to the hidden states between "
                "decoder layers (model.language_model._deepstack_process), which a decoder "
                "stepped layer by layer would skip",
}


def cross_refusal(family: Family) -> str | None:
    """Why JAM-Cross cannot step this family's decoder by hand (None when it can)."""
    reason = _NOT_STEPPABLE.get(family.name)
    if reason is None:
        return None
    return (f"merge method 'cross' runs both parents' decoder layers by hand and cannot do so for "
            f"{family.name} ({family.model_class}): {reason}. Use a parameter average "
            f"(uniform, linear, task_arithmetic, ties, dare) instead")


@contextmanager
def _recording_layers(layers: Any, calls: list[tuple[torch.Tensor, tuple, dict]]):
    """While active, each decoder layer records its call ``(hidden_states, args, kwargs)`` and
    returns its input unchanged, so running the parent captures every layer's arguments (masks,
    position embeddings, position ids, as its own forward builds them) without computing them."""
    def recorder(*args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append((hidden, args[1:], kwargs))
        return hidden

    for layer in layers:
        layer.forward = recorder  # instance attribute: nn.Module.__call__ still runs hooks
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class CrossMergedModel(GreedyGenerationMixin, nn.Module):
    def __init__(self, parent_a: Any, parent_b: Any, cross_every: int,
                 freeze_parents: bool = True):
        super().__init__()
        family = check_same_family("cross", [parent_a, parent_b], ["parent A", "parent B"])
        reason = cross_refusal(family)
        if reason:
            raise MergeInputError(reason)
        ta, tb = parent_a.config.get_text_config(), parent_b.config.get_text_config()
        if (ta.hidden_size, ta.num_hidden_layers) != (tb.hidden_size, tb.num_hidden_layers):
            raise MergeInputError(f"merge method 'cross' needs two decoders with the same hidden "
                                  f"size and depth, got ({ta.hidden_size}, {ta.num_hidden_layers})"
                                  f" and ({tb.hidden_size}, {tb.num_hidden_layers})")
        differ = [f for f in _POSITION_FIELDS if getattr(ta, f, None) != getattr(tb, f, None)]
        if differ:
            raise MergeInputError(f"merge method 'cross' feeds parent B the positions and masks "
                                  f"parent A builds, so their text configs must agree on them; "
                                  f"{family.name} parents differ in {differ[0]}: "
                                  f"{getattr(ta, differ[0], None)!r} vs "
                                  f"{getattr(tb, differ[0], None)!r}")
        n_layers = ta.num_hidden_layers
        if not 1 <= cross_every <= n_layers:
            raise MergeInputError(f"merge method 'cross': cross_every must be in [1, {n_layers}] "
                                  f"(the decoders have {n_layers} layers), got {cross_every}")
        self.family = family
        self.decoders = nn.ModuleList([parent_a, parent_b])
        self.cross_every = cross_every
        self.bridge_layers = [i for i in range(n_layers) if (i + 1) % cross_every == 0]
        h, heads = ta.hidden_size, ta.num_attention_heads
        eps = getattr(ta, "rms_norm_eps", 1e-6)
        self.bridges_ab = nn.ModuleDict({str(i): CrossBridge(h, heads, eps)
                                         for i in self.bridge_layers})
        self.bridges_ba = nn.ModuleDict({str(i): CrossBridge(h, heads, eps)
                                         for i in self.bridge_layers})
        self.fusion = nn.Linear(2 * h, h)
        with torch.no_grad():
            eye = torch.eye(h)
            self.fusion.weight.copy_(torch.cat([eye, eye], dim=1) / 2)
            self.fusion.bias.zero_()
        if freeze_parents:
            for p in self.decoders.parameters():
                p.requires_grad_(False)
        self.config = parent_a.config
        self.generation_config = copy.deepcopy(parent_a.generation_config)

    def new_parameters(self) -> list[nn.Parameter]:
        return [*self.bridges_ab.parameters(), *self.bridges_ba.parameters(),
                *self.fusion.parameters()]

    def _layer_calls(self, inputs: dict[str, Any]) -> list[tuple[torch.Tensor, tuple, dict]]:
        """Run parent A's own model (embeddings, vision tower, projector, positions, masks) with
        its decoder layers recording instead of computing: one ``(hidden, args, kwargs)`` per
        layer; layer 0's hidden is the multimodal input embedding both decoders start from."""
        a = self.decoders[0]
        layers = language_model(a).layers
        calls: list[tuple[torch.Tensor, tuple, dict]] = []
        with _recording_layers(layers, calls):
            a.model(**inputs, use_cache=False)
        if len(calls) != len(layers):
            raise RuntimeError(f"cross: captured {len(calls)} decoder-layer calls of "
                               f"{self.family.name}, expected {len(layers)}")
        return calls

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {k: v for k, v in kwargs.items()
                 if k in self.family.forward_inputs and v is not None}
        calls = self._layer_calls({"input_ids": input_ids, "attention_mask": attention_mask,
                                   "pixel_values": pixel_values, **extra})
        a, b = self.decoders
        lms = [language_model(a), language_model(b)]
        hs = [calls[0][0], calls[0][0]]
        key_mask = attention_mask.bool()
        for i, (_, args, kw) in enumerate(calls):
            hs = [lm.layers[i](h, *args, **kw) for lm, h in zip(lms, hs)]
            if str(i) in self.bridges_ab:
                ha, hb = hs
                hs = [self.bridges_ab[str(i)](ha, hb, key_mask),
                      self.bridges_ba[str(i)](hb, ha, key_mask)]
        fused = self.fusion(torch.cat([lms[0].norm(hs[0]), lms[1].norm(hs[1])], dim=-1))
        logits = a.lm_head(fused)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:  # Gemma: as its own forward does
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)

    def save(self, out_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        for k, d in enumerate(self.decoders):
            d.save_pretrained(os.path.join(out_dir, f"decoder_{k}"), safe_serialization=True)
        new = {k: v.detach().contiguous() for k, v in self.state_dict().items()
               if not k.startswith("decoders.")}
        save_file(new, os.path.join(out_dir, "bridge.safetensors"))
        with open(os.path.join(out_dir, "mmkd_merged.json"), "w") as f:
            json.dump({"kind": "cross", "cross_every": self.cross_every,
                       "bridge_layers": self.bridge_layers}, f, indent=2)


def load_cross(path: str, meta: dict[str, Any]) -> CrossMergedModel:
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    parents = [AutoModelForImageTextToText.from_pretrained(os.path.join(path, f"decoder_{k}"))
               for k in range(2)]
    model = CrossMergedModel(*parents, cross_every=meta["cross_every"])
    missing, unexpected = model.load_state_dict(
        load_file(os.path.join(path, "bridge.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("decoders.")]
    if missing or unexpected:
        raise ValueError(f"{path}/bridge.safetensors does not match cross_every="
                         f"{meta['cross_every']}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def cross_merge(models: list[Any], base: Any = None,
                params: CrossParams | Mapping[str, Any] | None = None) -> CrossMergedModel:
    params = method_params("cross", params)
    if len(models) != 2:
        raise MergeInputError(f"merge method 'cross' needs exactly K=2 models, got K={len(models)}")
    return CrossMergedModel(models[0], models[1], params.cross_every)


register_merge_method(MergeMethod("cross", "model", cross_merge,
                                  "JAM-Cross: two decoders bridged by new cross-attention every "
                                  "n-th layer + fusion layer", params=CrossParams,
                                  min_models=2, max_models=2,
                                  same_shapes=False))
