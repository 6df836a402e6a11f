"""Greedy generation for merged wrappers (``cross``, ``ensemble``) that are not HF
``GenerationMixin`` models. Same call shape as HF: ``generate(input_ids=, attention_mask=,
pixel_values=, max_new_tokens=, do_sample=False)`` → prompt + new ids, so
``workloads/evaluation/evaluate.py``'s ``generate_answer`` works unchanged. No KV cache: every step
re-runs the whole sequence (fine for short VQA answers; cost O(T²)). The image token is never
generated (``suppress``): the re-run would read it as an image placeholder.

A family's extra forward inputs (``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``,
``token_type_ids`` / ``mm_token_type_ids``) are passed to every step; the per-token ones
(``TOKEN_TYPE_KEYS``) grow by a 0 (text) per generated token."""

from __future__ import annotations

from typing import Any, Callable

import torch

from workloads.families import image_token_id

__all__ = ["greedy_generate", "eos_ids", "TOKEN_TYPE_KEYS"]

TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


def eos_ids(generation_config: Any) -> list[int]:
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def greedy_generate(logits_fn: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None,
                    pixel_values: torch.Tensor | None = None, max_new_tokens: int = 8,
                    eos: list[int] | None = None, pad_token_id: int | None = None,
                    do_sample: bool = False, suppress: list[int] | None = None,
                    **extra: Any) -> torch.Tensor:
    if do_sample:
        raise NotImplementedError("merged wrappers only generate greedily (do_sample=False)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = eos or []
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    # model inputs only (tensors); generation settings such as num_beams are not forwarded
    extra = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _step in range(max_new_tokens):
        logits = logits_fn(input_ids=input_ids, attention_mask=attention_mask,
                           pixel_values=pixel_values, **extra)
        last = logits[:, -1].clone()
        if suppress:
            last[:, suppress] = float("-inf")
        nxt = last.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        input_ids = torch.cat([input_ids, nxt[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
        for key in TOKEN_TYPE_KEYS:
            if key in extra:
                extra[key] = torch.cat([extra[key], extra[key].new_zeros(len(nxt), 1)], dim=1)
        if eos:
            done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
            if bool(done.all()):
                break
    return input_ids


class GreedyGenerationMixin:
    """`generate` for wrapper models whose `forward(**inputs).logits` is a full next-token
    distribution (cross, ensemble): greedy, never emitting the image token. Needs
    `generation_config` and the image token id in `config` on the model."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, max_new_tokens: int = 8,
                 **kwargs: Any) -> torch.Tensor:
        return greedy_generate(lambda **kw: self.forward(**kw).logits, input_ids, attention_mask,
                               pixel_values, max_new_tokens, eos_ids(self.generation_config),
                               self.generation_config.pad_token_id,
                               suppress=[image_token_id(self.config)], **kwargs)
