"""Processors without torchvision: tokenizer + PIL image processor + the family's expansion rule.

``encode`` turns one conversation (+ its image) into the model's inputs exactly as the family's
HF processor would (``input_ids`` equal; checked against the processor classes in the tests),
plus ``labels`` on assistant turns only (reply text and its end-of-turn token).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workloads.data.tokenizer import EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN
from workloads.families.table import FAMILIES, Family, family_of, get_family, processor_settings

__all__ = ["ProcessorParts", "build_tokenizer", "build_image_processor", "make_processor_parts",
           "hf_processor", "save_processor_parts", "load_processor_parts", "render",
           "expand_image_tokens", "encode", "collate", "IGNORE_INDEX", "GENERIC_IMAGE"]

IGNORE_INDEX = -100
GENERIC_IMAGE = IMAGE_TOKEN  # mmkd's (LLaVA data's) image marker inside a string turn


@dataclass
class ProcessorParts:
    """What encoding needs: the family, its tokenizer and image processor, and the processor's
    settings (the kwargs its HF processor takes, e.g. ``image_seq_length``)."""

    family: Family
    tokenizer: Any
    image_processor: Any
    settings: dict[str, Any]

    @property
    def tokens(self) -> dict[str, str]:
        return dict(self.family.named_tokens)

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.family.image_token))


def _family(family: Family | str) -> Family:
    return get_family(family) if isinstance(family, str) else family


def build_tokenizer(family: Family | str, tokenizer_file: str) -> Any:
    """mmkd's trained tokenizer (its dir, or its ``tokenizer.json``) + the family's special tokens
    (appended in a fixed order, so every model of the family built from one tokenizer file gets
    the same ids) + the family's chat template."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    family, path = _family(family), Path(tokenizer_file)
    if path.is_dir():
        base = AutoTokenizer.from_pretrained(str(path))
    elif path.is_file():
        base = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN,
                                       pad_token=PAD_TOKEN)
    else:
        raise FileNotFoundError(f"tokenizer {tokenizer_file!r} does not exist; give the tokenizer "
                                f"stage's output dir or its tokenizer.json")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
        bos_token=base.bos_token, eos_token=base.eos_token, pad_token=base.pad_token or PAD_TOKEN,
        unk_token=base.unk_token, extra_special_tokens=dict(family.named_tokens),
        model_max_length=base.model_max_length, padding_side="right")
    extra = dict.fromkeys((*base.extra_special_tokens, *family.extra_tokens))
    tok.add_special_tokens({"extra_special_tokens": list(extra)}, replace_extra_special_tokens=False)
    tok.chat_template = family.chat_template
    return tok


def build_image_processor(family: Family | str, **kwargs: Any) -> Any:
    """The family's PIL image processor (no torchvision) with ``kwargs`` (sizes, tiling)."""
    import transformers

    return getattr(transformers, _family(family).image_processor_class)(**kwargs)


def make_processor_parts(family: Family | str, tokenizer: Any, image_processor: Any,
                         config: Any) -> ProcessorParts:
    family = _family(family)
    return ProcessorParts(family, tokenizer, image_processor, processor_settings(family, config))


def hf_processor(parts: ProcessorParts) -> Any:
    """The family's full HF processor, where it loads on CPU (no video processor needed)."""
    import transformers

    family = parts.family
    if not family.processor_loads_on_cpu:
        raise RuntimeError(f"{family.processor_class} needs a video processor, which needs "
                           f"torchvision; use workloads.families.encode (same input_ids)")
    cls = getattr(transformers, family.processor_class)
    return cls(image_processor=parts.image_processor, tokenizer=parts.tokenizer,
               chat_template=parts.tokenizer.chat_template, **parts.settings)


def save_processor_parts(parts: ProcessorParts, out_dir: str) -> str:
    """Save the processor files: the HF processor's own ``save_pretrained`` where it loads
    here; else tokenizer + image processor + a ``processor_config.json`` in its format."""
    if parts.family.processor_loads_on_cpu:
        hf_processor(parts).save_pretrained(out_dir)
        return out_dir
    parts.tokenizer.save_pretrained(out_dir)
    parts.image_processor.save_pretrained(out_dir)
    config = {"processor_class": parts.family.processor_class, **parts.settings}
    Path(out_dir, "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_processor_parts(path: str, family: Family | str | None = None) -> ProcessorParts:
    """Load ``ProcessorParts`` from a model or processor dir. Settings come from the model's
    ``config.json`` when there is one (what the model checks), else ``processor_config.json``."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    has_config = Path(path, "config.json").exists()
    proc_file = Path(path, "processor_config.json")
    saved = json.loads(proc_file.read_text()) if proc_file.exists() else {}
    config = AutoConfig.from_pretrained(path) if has_config else None
    if family is None:
        if config is not None:
            family = family_of(config)
        else:
            by_class = {f.processor_class: f for f in FAMILIES.values()}
            if saved.get("processor_class") not in by_class:
                raise ValueError(f"{path}: no config.json and no known processor_class in "
                                 f"processor_config.json; pass the family explicitly")
            family = by_class[saved["processor_class"]]
    family = _family(family)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = getattr(transformers, family.image_processor_class).from_pretrained(path)
    if config is not None:
        settings = processor_settings(family, config)
    else:
        settings = {k: v for k, v in saved.items() if k != "processor_class"}
    return ProcessorParts(family, tokenizer, image_processor, settings)


def _messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HF messages; a string turn's ``<image>`` markers become ``{"type": "image"}`` items so the
    family's template writes its own placeholder."""
    out = []
    for m in conversation:
        content = m["content"]
        if isinstance(content, str) and GENERIC_IMAGE in content:
            items: list[dict[str, str]] = []
            for i, piece in enumerate(content.split(GENERIC_IMAGE)):
                if i:
                    items.append({"type": "image"})
                if piece:
                    items.append({"type": "text", "text": piece})
            content = items
        out.append({**m, "content": content})
    return out


def render(parts: ProcessorParts, conversation: list[dict[str, Any]],
           add_generation_prompt: bool = False) -> str:
    """The chat-template text of ``conversation``, one placeholder per image (not expanded)."""
    return parts.tokenizer.apply_chat_template(_messages(conversation), tokenize=False,
                                               add_generation_prompt=add_generation_prompt)


def _segments(parts: ProcessorParts, messages: list[dict[str, Any]],
              add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_label) pieces: each assistant reply from the end
    of the generation prompt before it to the end of its own rendering (trailing whitespace
    excluded) — its text and end-of-turn token are labels, role markers are not."""
    def rend(msgs: list[dict[str, Any]], gen: bool) -> str:
        return parts.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = rend(messages, add_generation_prompt)
    pieces, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(rend(messages[:i], True))
        upto = rend(messages[: i + 1], False).rstrip()
        if not full.startswith(upto) or start > len(upto):
            raise ValueError(f"{parts.family.name}: the chat template does not render a "
                             f"conversation's prefix as a prefix of the whole; label masking "
                             f"needs that")
        pieces += [(full[pos:start], False), (full[start:len(upto)], True)]
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [(t, lab) for t, lab in pieces if t]


def _image_list(image: Any) -> list[Any]:
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _process_images(parts: ProcessorParts, images: list[Any]) -> dict[str, Any]:
    out = parts.image_processor(images, **dict(parts.family.image_kwargs), return_tensors="np")
    return dict(out)


def _image_inputs(parts: ProcessorParts, processed: dict[str, Any]) -> dict[str, np.ndarray]:
    # drop what only counts tokens (rows/cols, num_patches, num_crops, batch_num_images)
    keep = ("pixel_values",) + parts.family.forward_inputs
    return {k: np.asarray(v) for k, v in processed.items() if k in keep}


def _expander(parts: ProcessorParts, processed: dict[str, Any], n_images: int):
    """``text -> text`` replacing placeholders with the next images' expansions (in order)."""
    counter = iter(range(n_images))
    pattern = re.compile(re.escape(parts.family.image_placeholder))

    def expand(text: str) -> str:
        def one(_m: re.Match) -> str:
            idx = next(counter, None)
            if idx is None:
                raise ValueError(f"{parts.family.name}: more {parts.family.image_placeholder} "
                                 f"placeholders than the {n_images} image(s) given")
            return parts.family.expand(parts.tokens, parts.settings, parts.image_processor,
                                       processed, idx)
        return pattern.sub(one, text)

    return expand


def expand_image_tokens(family: Family | str, parts: ProcessorParts, text: str,
                        image: Any = None) -> tuple[str, dict[str, np.ndarray]]:
    """Replace each image placeholder of ``text`` (``family.image_placeholder``, one per image,
    in order) with its expansion; returns ``(text, image model inputs)`` — ``pixel_values``
    plus the family's extra image inputs (``image_grid_thw``, ``image_sizes``, ...)."""
    family = _family(family)
    images = _image_list(image)
    n = text.count(family.image_placeholder)
    if n != len(images):
        raise ValueError(f"{family.name}: {n} {family.image_placeholder} placeholder(s) in the "
                         f"text but {len(images)} image(s)")
    if not images:
        return text, {}
    processed = _process_images(parts, images)
    return _expander(parts, processed, len(images))(text), _image_inputs(parts, processed)


def encode(family: Family | str, parts: ProcessorParts, conversation: list[dict[str, Any]],
           image: Any = None, add_generation_prompt: bool = False,
           reply_spans: bool = False) -> dict[str, np.ndarray]:
    """Model inputs of one conversation (HF messages; a string turn may carry mmkd's
    ``<image>``): ``input_ids``, ``labels`` (-100 except assistant replies + end-of-turn),
    ``pixel_values`` and the family's extra inputs, each for this one sample (``collate``
    batches them). ``input_ids`` equal the family's HF processor on the rendered text.
    ``reply_spans``: also ``reply_spans`` ((n, 3): each label token's turn, start and end in its
    turn's label text) and ``reply_texts`` (the label texts), for cross-tokenizer alignment."""
    family = _family(family)
    images = _image_list(image)
    segments = _segments(parts, _messages(conversation), add_generation_prompt)
    n = sum(t.count(family.image_placeholder) for t, _ in segments)
    if n != len(images):
        raise ValueError(f"{family.name}: the conversation has {n} image(s) but {len(images)} "
                         f"were given")
    processed = _process_images(parts, images) if images else {}
    expand = _expander(parts, processed, len(images))
    texts, spans, pos = [], [], 0
    for text, is_label in segments:
        if is_label and family.image_placeholder in text:
            raise ValueError(f"{family.name}: an image in an assistant turn cannot be a label")
        text = expand(text)
        if is_label:
            spans.append((pos, pos + len(text)))
        texts.append(text)
        pos += len(text)
    enc = parts.tokenizer("".join(texts), add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    where: list[tuple[int, int, int]] = []
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        for turn, (a, b) in enumerate(spans):
            if a <= start < b:
                labels[i] = ids[i]
                where.append((turn, start - a, min(end, b) - a))
                break
    out: dict[str, np.ndarray] = {"input_ids": ids, "labels": labels}
    if reply_spans:
        out["reply_spans"] = np.asarray(where, np.int64).reshape(-1, 3)
        out["reply_texts"] = np.asarray([texts[k] for k, (t, is_label) in enumerate(segments)
                                         if is_label], dtype=object)
    if family.token_type_key:
        out[family.token_type_key] = (ids == parts.image_token_id).astype(np.int64)
    out.update(_image_inputs(parts, processed))
    return out


def collate(family: Family | str, samples: list[dict[str, np.ndarray]],
            pad_token_id: int) -> dict[str, Any]:
    """Batch ``encode`` outputs as torch tensors: text right-padded (labels with -100), pixels
    by the family's ``pixel_layout`` (see ``table.PIXEL_LAYOUTS``)."""
    import torch

    family = _family(family)
    width = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, value: int) -> torch.Tensor:
        rows = [np.pad(s[key], (0, width - len(s[key])), constant_values=value) for s in samples]
        return torch.as_tensor(np.stack(rows))

    batch: dict[str, Any] = {"input_ids": pad("input_ids", pad_token_id),
                             "labels": pad("labels", IGNORE_INDEX),
                             "attention_mask": torch.as_tensor(np.stack([
                                 (np.arange(width) < len(s["input_ids"])).astype(np.int64)
                                 for s in samples]))}
    if family.token_type_key:
        batch[family.token_type_key] = pad(family.token_type_key, 0)
    with_images = [s for s in samples if "pixel_values" in s]
    if not with_images:
        return batch
    layout = family.pixel_layout
    if layout in ("stack", "concat"):
        pixels = np.concatenate([s["pixel_values"] for s in with_images])
    elif layout == "pad_tiles":  # [n_images, tiles, 3, H, W] per sample
        tiles = max(s["pixel_values"].shape[1] for s in with_images)
        pixels = np.concatenate([_pad_axis1(s["pixel_values"], tiles) for s in with_images])
    else:  # pad_sample_tiles: [1, tiles, 3, H, W] per sample, every sample gets a row
        tiles = max(s["pixel_values"].shape[1] for s in with_images)
        shape = with_images[0]["pixel_values"].shape[2:]
        pixels = np.concatenate([
            _pad_axis1(s["pixel_values"], tiles) if "pixel_values" in s
            else np.zeros((1, tiles, *shape), np.float32) for s in samples])
        batch["pixel_attention_mask"] = torch.as_tensor(np.concatenate([
            _pad_axis1(s["pixel_attention_mask"], tiles) if "pixel_values" in s
            else np.zeros((1, tiles, *shape[1:]), np.int64) for s in samples]))
    batch["pixel_values"] = torch.as_tensor(pixels)
    for key in family.forward_inputs:
        if key not in batch and key != family.token_type_key:
            batch[key] = torch.as_tensor(np.concatenate([s[key] for s in with_images]))
    return batch


def _pad_axis1(x: np.ndarray, n: int) -> np.ndarray:
    return np.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
