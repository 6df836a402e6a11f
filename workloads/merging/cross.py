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

Saved as ``decoder_0/``, ``decoder_1/`` (HF checkpoints), ``bridge.safetensors`` (new layers) and
``mmkd_merged.json``; ``workloads.merging.io.load_merged`` loads it back. Parent B's embedding,
vision tower, projector and lm_head are kept in ``decoder_1/`` but unused.
"""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from workloads.merging.generation import GreedyGenerationMixin
from workloads.merging.registry import (MergeInputError, MergeMethod, method_params,
                                        register_merge_method)

__all__ = ["CrossParams", "CrossBridge", "CrossMergedModel", "cross_merge", "load_cross"]


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


def _input_embeddings(llava: Any, input_ids: torch.Tensor,
                      pixel_values: torch.Tensor | None) -> torch.Tensor:
    inner = llava.model
    emb = inner.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        feats = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        feats = torch.cat(list(feats), dim=0).to(emb.dtype)
        mask = inner.get_placeholder_mask(input_ids, inputs_embeds=emb, image_features=feats)
        emb = emb.masked_scatter(mask, feats)
    return emb


class CrossMergedModel(GreedyGenerationMixin, nn.Module):
    def __init__(self, parent_a: Any, parent_b: Any, cross_every: int,
                 freeze_parents: bool = True):
        super().__init__()
        ta, tb = parent_a.config.text_config, parent_b.config.text_config
        if (ta.hidden_size, ta.num_hidden_layers) != (tb.hidden_size, tb.num_hidden_layers):
            raise MergeInputError(f"merge method 'cross' needs two decoders with the same hidden "
                                  f"size and depth, got ({ta.hidden_size}, {ta.num_hidden_layers})"
                                  f" and ({tb.hidden_size}, {tb.num_hidden_layers})")
        n_layers = ta.num_hidden_layers
        if not 1 <= cross_every <= n_layers:
            raise MergeInputError(f"merge method 'cross': cross_every must be in [1, {n_layers}] "
                                  f"(the decoders have {n_layers} layers), got {cross_every}")
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        from transformers.masking_utils import create_causal_mask

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        a, b = self.decoders
        emb = _input_embeddings(a, input_ids, pixel_values)
        pos = torch.arange(emb.shape[1], device=emb.device)[None]
        lms = [a.model.language_model, b.model.language_model]
        mask = create_causal_mask(config=lms[0].config, inputs_embeds=emb,
                                  attention_mask=attention_mask, past_key_values=None,
                                  position_ids=pos)
        rope = [lm.rotary_emb(emb, pos) for lm in lms]
        hs = [emb, emb]
        key_mask = attention_mask.bool()
        for i in range(len(lms[0].layers)):
            hs = [lm.layers[i](h, attention_mask=mask, position_embeddings=pe, position_ids=pos,
                               past_key_values=None, use_cache=False)
                  for lm, h, pe in zip(lms, hs, rope)]
            if str(i) in self.bridges_ab:
                ha, hb = hs
                hs = [self.bridges_ab[str(i)](ha, hb, key_mask),
                      self.bridges_ba[str(i)](hb, ha, key_mask)]
        fused = self.fusion(torch.cat([lms[0].norm(hs[0]), lms[1].norm(hs[1])], dim=-1))
        logits = a.lm_head(fused)
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
    from transformers import LlavaForConditionalGeneration

    parents = [LlavaForConditionalGeneration.from_pretrained(os.path.join(path, f"decoder_{k}"))
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
