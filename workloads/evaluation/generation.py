"""Batched greedy answers to ``EvalExample``s: the same answers as asking one question at a
time (``evaluate.generate_answer``), many times faster.

Two ways to batch, chosen per model (``batching``):

- ``left_padding`` — HF ``GenerationMixin`` models (plain LLaVA and the other transformers VLM
  families): prompts of different lengths are left-padded into one ``model.generate`` call.
  ``generate`` numbers positions from the attention mask (padding takes no position) and
  keeps the KV cache, so each row sees exactly the inputs it would see alone.
- ``same_length`` — everything else, i.e. the merged wrappers (``cross``, ``ensemble``): their
  greedy loop (``merging/generation.py``) numbers positions 0..T-1 whatever the mask, so a
  left-padded row would be read at shifted positions. They are batched only among prompts of
  the same token length (no padding at all); with all lengths different this is the
  one-by-one loop.

Prompts are sorted by length first, so batches hold little padding; answers come back in input
order. A row that stops early is cut at its first end-of-sequence token, as the one-by-one loop
stops there, so the padding ``generate`` appends to finished rows never reaches the answer.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

__all__ = ["prompt_text", "batching", "generate_answers"]

_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
LEFT_PADDING, SAME_LENGTH = "left_padding", "same_length"


def prompt_text(processor: Any, example: Any) -> str:
    """The chat-template rendering of ``example``'s question with the generation prompt; an
    image without an image token in the conversation gets ``<image>\\n`` before the first
    human turn (as LLaVA's own eval does)."""
    if hasattr(processor, "prompt"):  # a FamilyProcessor: the family's own placeholder rules
        messages = [{"role": _ROLE[t["from"]], "content": t["value"]}
                    for t in example.prompt_conversation]
        return processor.prompt(messages, example.image is not None)
    conv = [dict(t) for t in example.prompt_conversation]
    tok = processor.image_token
    if example.image is not None and not any(tok in t["value"] for t in conv):
        first = next(t for t in conv if t["from"] == "human")
        first["value"] = f"{tok}\n{first['value']}"
    messages = [{"role": _ROLE[t["from"]], "content": t["value"]} for t in conv]
    return processor.tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)


def batching(model: Any, processor: Any) -> str:
    """``"left_padding"`` when left padding cannot change ``model``'s greedy tokens (HF
    ``generate`` on a model that takes ``position_ids``, and a tokenizer with a pad token),
    else ``"same_length"`` (see the module docstring)."""
    from transformers import GenerationMixin

    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    if (isinstance(model, GenerationMixin) and takes_positions
            and processor.tokenizer.pad_token_id is not None):
        return LEFT_PADDING
    return SAME_LENGTH


def generate_answers(model: Any, processor: Any, examples: Sequence[Any], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to ``examples`` (``EvalExample``s; images and text-only mixed), in order,
    ``batch_size`` questions per ``generate`` call. ``model`` must be in eval mode."""
    import torch

    if batch_size < 1:
        raise ValueError(f"generate_answers: batch_size must be >= 1, got {batch_size}")
    if not examples:
        return []
    texts = [prompt_text(processor, ex) for ex in examples]
    answers: list[str | None] = [None] * len(examples)
    eos = _eos_ids(model)
    with torch.no_grad():
        for idx, enc in _batches(model, processor, examples, texts, batch_size):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            prompt_len = enc["input_ids"].shape[1]
            for row, i in enumerate(idx):
                answers[i] = processor.tokenizer.decode(_until_eos(out[row, prompt_len:], eos),
                                                        skip_special_tokens=True)
    return answers  # type: ignore[return-value]


def _batches(model: Any, processor: Any, examples: Sequence[Any], texts: list[str],
             batch_size: int):
    """``(example indices, processor outputs)`` per batch."""
    if batching(model, processor) == LEFT_PADDING:
        # Length of the text alone (image tokens expand later, the same for every image in
        # the fixed-count families): enough to keep similar prompts together.
        lengths = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: (examples[i].image is not None,
                                                         lengths[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            images = [examples[i].image for i in idx if examples[i].image is not None]
            yield idx, processor(images=images or None, text=[texts[i] for i in idx],
                                 padding=True, padding_side="left", return_tensors="pt")
        return
    # same_length: encode each prompt alone (exactly the one-by-one inputs), then stack
    # prompts of equal token length; a row's images come in row order, as the model expects.
    import torch

    encoded = [processor(images=[ex.image] if ex.image is not None else None, text=t,
                         return_tensors="pt") for ex, t in zip(examples, texts)]
    by_length: dict[int, list[int]] = {}
    for i, enc in enumerate(encoded):
        by_length.setdefault(int(enc["input_ids"].shape[1]), []).append(i)
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            idx = group[start:start + batch_size]
            keys = {k for i in idx for k in encoded[i]}
            yield idx, {k: torch.cat([encoded[i][k] for i in idx if k in encoded[i]])
                        for k in keys}


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _until_eos(ids: Any, eos: list[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token."""
    ids = ids.tolist()
    stop = next((j for j, t in enumerate(ids) if t in eos), None)
    return ids if stop is None else ids[:stop + 1]
