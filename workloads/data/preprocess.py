"""Preprocessing: normalized reader rows -> model-ready training rows.

Output row contract (what the training loop and ``collate`` rely on):
    input_ids     int64[T_i]      chat-template rendering, each ``<image>`` expanded to N tokens
    labels        int64[T_i]      token ids on assistant replies (incl. their end-of-turn token),
                                  -100 everywhere else (user/system turns, role markers, image)
    pixel_values  float32[3,H,W]  processed image; zeros when ``has_image`` is False
    has_image     bool

Image/``<image>`` policy (LLaVA data carries at most one image per sample):
    * one image + exactly one ``<image>`` in a human turn: fine;
    * one image and no ``<image>``: ``<image>\\n`` is prepended to the first human turn, as
      LLaVA's own preprocessing does (not counted as bad);
    * ``<image>`` without an image, two or more ``<image>``, or ``<image>`` in a reply:
      skipped as ``image_token_mismatch``.
Over-long samples are truncated to ``max_length`` (counted as ``truncated``) unless that cuts
through the image tokens or leaves no label token: then they are skipped as ``too_long``.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workloads.data.processor import ProcessorSpec, load_processor
from workloads.data.quality import (CORRUPT_IMAGE, IMAGE_TOKEN_MISMATCH, MALFORMED_JSON,
                                    MAX_IMAGE_PIXELS, OVERSIZE_IMAGE, TOO_LONG, TRUNCATED,
                                    SampleQuality)
from workloads.data.readers import bad_detail

IGNORE_INDEX = -100
_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}

__all__ = ["IGNORE_INDEX", "Encoded", "encode_conversation", "Preprocessor", "decode_image",
           "preprocess_batch"]


class SampleError(ValueError):
    """A sample that cannot be used; ``kind`` is its bad-sample kind."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


@dataclass
class Encoded:
    input_ids: np.ndarray
    labels: np.ndarray
    truncated: bool = False
    segments: list[tuple[str, bool]] = field(default_factory=list)


def conversation_messages(conversations: list[dict[str, str]], has_image: bool,
              image_token: str) -> list[dict[str, str]]:
    n_in_human = sum(t["value"].count(image_token) for t in conversations if t["from"] == "human")
    n_total = sum(t["value"].count(image_token) for t in conversations)
    if n_total != n_in_human:
        raise SampleError(IMAGE_TOKEN_MISMATCH, f"{image_token} in an assistant/system turn")
    if n_total > 1:
        raise SampleError(IMAGE_TOKEN_MISMATCH, f"{n_total} {image_token} tokens (max 1 image)")
    if n_total == 1 and not has_image:
        raise SampleError(IMAGE_TOKEN_MISMATCH, f"{image_token} but no image")
    messages = [{"role": _ROLE[t["from"]], "content": t["value"]} for t in conversations]
    if has_image and n_total == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError(IMAGE_TOKEN_MISMATCH, "an image but no human turn to put it in")
        first_user["content"] = f"{image_token}\n{first_user['content']}"
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError(MALFORMED_JSON, "no assistant (gpt) turn to learn from")
    return messages


def _segments(messages: list[dict[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_label) pieces.

    Each assistant reply spans from the end of the generation prompt that precedes it to the
    end of its own rendering, trailing whitespace excluded: so the reply text and its
    end-of-turn token are labels while the role markers around it are not. This only needs
    the template to render a conversation's prefix as a prefix of the whole, which holds for
    ChatML-style templates; anything else is reported instead of silently mislabeled.
    """
    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    pieces, pos = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True))
        end = len(render(messages[: i + 1], False).rstrip())
        if not full.startswith(render(messages[: i + 1], False).rstrip()) or start > end:
            raise ValueError("the tokenizer's chat_template does not render a conversation's "
                             "prefix as a prefix of the whole; label masking needs that")
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    pieces.append((full[pos:], False))
    return [(text, is_label) for text, is_label in pieces if text]


def encode_conversation(conversations: list[dict[str, str]], has_image: bool,
                        spec: ProcessorSpec, max_length: int) -> Encoded:
    """Token ids and labels of one conversation; raises ``SampleError`` for a bad sample."""
    segments = _segments(conversation_messages(conversations, has_image, spec.image_token), spec.tokenizer)
    encoded = spec.tokenizer([t for t, _ in segments], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    labels: list[int] = []
    for (_, is_label), seg_ids in zip(segments, encoded):
        for tok in seg_ids:
            if tok == spec.image_token_id:
                # Expand here rather than in the text: the count is exactly what
                # LlavaForConditionalGeneration checks against the vision features.
                ids += [tok] * spec.num_image_tokens
                labels += [IGNORE_INDEX] * spec.num_image_tokens
            else:
                ids.append(tok)
                labels.append(tok if is_label else IGNORE_INDEX)
    truncated = len(ids) > max_length
    if truncated:
        image_pos = [i for i, t in enumerate(ids) if t == spec.image_token_id]
        if image_pos and image_pos[-1] >= max_length:
            raise SampleError(TOO_LONG, f"{len(ids)} tokens; max_length={max_length} would "
                                        f"cut through the image tokens")
        ids, labels = ids[:max_length], labels[:max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise SampleError(TOO_LONG, f"no assistant token left within "
                                        f"max_length={max_length}")
    return Encoded(np.asarray(ids, np.int64), np.asarray(labels, np.int64), truncated, segments)


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """PIL RGB image from encoded bytes; raises ``SampleError(corrupt_image)``, or
    ``SampleError(oversize_image)`` when the header declares more than ``max_pixels`` (checked
    before the pixels are decoded, so a decompression bomb costs nothing)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise SampleError(OVERSIZE_IMAGE, str(e))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise SampleError(CORRUPT_IMAGE, f"cannot decode image ({type(e).__name__}: {e})")
    w, h = img.size
    if w * h > max_pixels:
        raise SampleError(OVERSIZE_IMAGE, f"{w}x{h} pixels, over MAX_IMAGE_PIXELS={max_pixels}")
    try:
        img.load()  # force the full decode: truncated files fail here, not later
        return img.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise SampleError(CORRUPT_IMAGE, f"cannot decode image ({type(e).__name__}: {e})")


class Preprocessor:
    """``map_batches`` callable: builds the processor once per worker, then encodes batches.

    Bad rows are dropped and tallied into ``quality`` (see ``quality.py``).
    """

    def __init__(self, processor_dir: str, max_length: int, quality: SampleQuality | None,
                 keep_keys: bool = False):
        self.spec = load_processor(processor_dir)
        self.max_length = max_length
        self.quality = quality
        self.keep_keys = keep_keys

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        spec = self.spec
        counts: dict[str, int] = {}
        examples: list[tuple[str, str]] = []
        out_ids, out_labels, images, has_image, keys = [], [], [], [], []

        def skip(kind: str, i: int, detail: str) -> None:
            counts[kind] = counts.get(kind, 0) + 1
            examples.append((kind, f"{batch['source'][i]}:{batch['key'][i]} ({detail})"))

        for i in range(len(batch["key"])):
            if batch["bad"][i]:
                detail = bad_detail(batch["extra"][i]) if "extra" in batch else ""
                skip(str(batch["bad"][i]), i, detail or "flagged by the reader")
                continue
            try:
                raw = batch["image"][i]
                image = decode_image(raw) if raw is not None else None
                conv = json.loads(batch["conversations"][i])
                enc = encode_conversation(conv, image is not None, spec, self.max_length)
            except SampleError as e:
                skip(e.kind, i, str(e))
                continue
            if enc.truncated:
                counts[TRUNCATED] = counts.get(TRUNCATED, 0) + 1
            out_ids.append(enc.input_ids)
            out_labels.append(enc.labels)
            images.append(image)
            has_image.append(image is not None)
            keys.append(f"{batch['source'][i]}/{batch['key'][i]}")
        if self.quality is not None:
            self.quality.record(len(batch["key"]), counts, examples)
        return self._columns(out_ids, out_labels, images, has_image, keys)

    def _columns(self, ids: list, labels: list, images: list, has_image: list,
                 keys: list) -> dict[str, Any]:
        h, w = self.spec.image_size
        pixels = np.zeros((len(ids), 3, h, w), np.float32)
        real = [i for i, img in enumerate(images) if img is not None]
        if real:
            processed = self.spec.image_processor(images=[images[i] for i in real],
                                                  return_tensors="np")["pixel_values"]
            pixels[real] = processed.astype(np.float32)
        columns: dict[str, Any] = {
            # Object arrays of 1-D int64 arrays: Ray stores them as variable-shaped tensors.
            "input_ids": _ragged(ids), "labels": _ragged(labels),
            "pixel_values": pixels, "has_image": np.asarray(has_image, dtype=bool)}
        if self.keep_keys:
            columns["key"] = np.asarray(keys, dtype=object)
        return columns


@functools.lru_cache(maxsize=4)
def _cached_preprocessor(processor_dir: str, max_length: int, keep_keys: bool) -> Preprocessor:
    return Preprocessor(processor_dir, max_length, quality=None, keep_keys=keep_keys)


def rows_to_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Reader rows (dicts) → the numpy column batch ``Preprocessor`` takes (object arrays, so
    ragged values such as image bytes and conversations stay one entry per row)."""
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def preprocess_batch(batch: dict[str, np.ndarray], processor_dir: str, max_length: int,
                     quality: SampleQuality | None, keep_keys: bool = False) -> dict[str, Any]:
    """``map_batches`` function form of ``Preprocessor``, for Ray *tasks*.

    The processor is loaded once per worker process and cached: Ray reuses task workers, so
    later datasets (the next epoch, the next test) skip the transformers import and load that
    a fresh actor pool would pay again.
    """
    pre = _cached_preprocessor(processor_dir, max_length, keep_keys)
    pre.quality = quality
    return pre(batch)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
