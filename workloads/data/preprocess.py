"""Preprocessing: normalized reader rows -> model-ready training rows.

Output row contract of a LLaVA-1.5 processor dir (what the training loop and ``collate`` rely on):
    input_ids     int64[T_i]      chat-template rendering, each ``<image>`` expanded to N tokens
    labels        int64[T_i]      token ids on assistant replies (incl. their end-of-turn token),
                                  -100 everywhere else (user/system turns, role markers, image)
    pixel_values  float32[3,H,W]  processed image; zeros when ``has_image`` is False
    has_image     bool

Any other family (``spec.family != "llava"``, see ``workloads.families``) encodes with its own
chat template, image-token expansion (a count per image) and image processor; its rows are
    input_ids     int64[T_i]      as above, the family's expansion of each image
    labels        int64[T_i]      as above
    has_image     bool
    mm            bytes           the row's image inputs as ``.npz`` (``pixel_values`` and the
                                  family's extra inputs: ``image_grid_thw``, ``image_sizes``,
                                  ``pixel_attention_mask``, the token-type ids), shapes varying
                                  per family and image; ``b""`` for a text-only row
    family        str             the family name (``collate`` batches by its rules)
so every family's rows share one schema on Ray Data.

Image/``<image>`` policy (LLaVA data carries at most one image per sample):
    * one image + exactly one ``<image>`` in a human turn: fine;
    * one image and no ``<image>``: ``<image>\\n`` is prepended to the first human turn, as
      LLaVA's own preprocessing does (not counted as bad);
    * ``<image>`` without an image, two or more ``<image>``, or ``<image>`` in a reply:
      skipped as ``image_token_mismatch``; so is a family's own image token written in the
      text (e.g. ``<|image_pad|>``), which would give image tokens without image features.
Over-long samples are truncated to ``max_length`` (counted as ``truncated``) unless that cuts
through the image tokens or leaves no label token: then they are skipped as ``too_long``.

The teacher's own encoding (``Preprocessor(..., teacher_dir=...)``: a distill teacher that
tokenizes images differently, ``teacher_inputs="own"``, or has another tokenizer, ``"cross"``):
every row is encoded a second time with the teacher's processor, its columns added with a
``teacher_`` prefix; a row bad for either processor is dropped and counted once. One tokenizer:
both encodings' reply tokens are paired one by one (``alignment.pair_reply_labels``). Another:
rows get ``reply_group`` and ``teacher_reply_group`` (each reply token's aligned text span,
``alignment.align_reply_tokens``).
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workloads.data.alignment import align_reply_tokens, at_labels, pair_reply_labels
from workloads.data.processor import LLAVA, ProcessorSpec, load_processor
from workloads.data.quality import (CORRUPT_IMAGE, IMAGE_TOKEN_MISMATCH, MALFORMED_JSON,
                                    MAX_IMAGE_PIXELS, OVERSIZE_IMAGE, TOO_LONG, TRUNCATED,
                                    SampleQuality)
from workloads.data.readers import bad_detail

IGNORE_INDEX = -100
TEACHER_PREFIX = "teacher_"  # columns of the teacher's own encoding (distill_loss's prefix)
REPLY_GROUP = "reply_group"  # cross-tokenizer rows: each position's aligned group (-1: none)
_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}

GENERIC_IMAGE = "<image>"  # LLaVA data's image marker, whatever the family's own token

__all__ = ["IGNORE_INDEX", "TEACHER_PREFIX", "REPLY_GROUP", "Encoded", "encode_conversation",
           "encode_family_sample", "Preprocessor", "decode_image", "preprocess_batch",
           "pack_image_inputs", "unpack_image_inputs"]


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
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # a family's image inputs
    # spans=True: each reply token's (turn, start, end) in its turn's label text
    reply_spans: list[tuple[int, int, int]] = field(default_factory=list)
    reply_texts: list[str] = field(default_factory=list)


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
                        spec: ProcessorSpec, max_length: int, spans: bool = False) -> Encoded:
    """Token ids and labels of one conversation; raises ``SampleError`` for a bad sample.
    ``spans``: also each kept reply token's character span (``Encoded.reply_spans``)."""
    segments = _segments(conversation_messages(conversations, has_image, spec.image_token), spec.tokenizer)
    enc = spec.tokenizer([t for t, _ in segments], add_special_tokens=False,
                         return_offsets_mapping=spans)
    ids: list[int] = []
    labels: list[int] = []
    reply_spans: list[tuple[int, int, int]] = []
    reply_texts: list[str] = []
    for k, ((text, is_label), seg_ids) in enumerate(zip(segments, enc["input_ids"])):
        if is_label and spans:
            reply_texts.append(text)
        for j, tok in enumerate(seg_ids):
            if tok == spec.image_token_id:
                # Expand here rather than in the text: the count is exactly what
                # LlavaForConditionalGeneration checks against the vision features.
                ids += [tok] * spec.num_image_tokens
                labels += [IGNORE_INDEX] * spec.num_image_tokens
            else:
                ids.append(tok)
                labels.append(tok if is_label else IGNORE_INDEX)
                if is_label and spans:
                    start, end = enc["offset_mapping"][k][j]
                    reply_spans.append((len(reply_texts) - 1, int(start), int(end)))
    ids_arr, labels_arr = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    keep = _kept_length(ids_arr, labels_arr, spec.image_token_id, max_length)
    kept_replies = int((labels_arr[:keep] != IGNORE_INDEX).sum())
    return Encoded(ids_arr[:keep], labels_arr[:keep], keep < len(ids_arr), segments,
                   reply_spans=reply_spans[:kept_replies], reply_texts=reply_texts)


def _kept_length(ids: np.ndarray, labels: np.ndarray, image_token_id: int,
                 max_length: int) -> int:
    """How many tokens the truncation rule keeps; raises ``SampleError(too_long)`` when
    truncating would cut through the image tokens or leave no label token."""
    if len(ids) <= max_length:
        return len(ids)
    image_pos = np.flatnonzero(ids == image_token_id)
    if len(image_pos) and image_pos[-1] >= max_length:
        raise SampleError(TOO_LONG, f"{len(ids)} tokens; max_length={max_length} would "
                                    f"cut through the image tokens")
    if (labels[:max_length] == IGNORE_INDEX).all():
        raise SampleError(TOO_LONG, f"no assistant token left within "
                                    f"max_length={max_length}")
    return max_length


def encode_family_sample(conversations: list[dict[str, str]], image: Any, spec: ProcessorSpec,
                         max_length: int, spans: bool = False) -> Encoded:
    """Token ids, labels and image inputs of one conversation for a non-LLaVA family: the same
    ``<image>`` policy, then the family's own chat template and expansion
    (``workloads.families.encode``), then the same truncation rule. Text-aligned inputs (the
    token-type ids) are truncated with the tokens. Raises ``SampleError`` for a bad sample."""
    from workloads.families import encode

    family = spec.parts.family
    own = {family.image_placeholder, family.image_token} - {GENERIC_IMAGE}
    for turn in conversations:
        for token in own:
            if token in turn["value"]:
                raise SampleError(IMAGE_TOKEN_MISMATCH, f"{token} ({family.name}'s image token) "
                                                        f"written in the text")
    messages = conversation_messages(conversations, image is not None, GENERIC_IMAGE)
    out = encode(family, spec.parts, messages, image, reply_spans=spans)
    ids, labels = out.pop("input_ids"), out.pop("labels")
    reply_spans, reply_texts = out.pop("reply_spans", []), out.pop("reply_texts", [])
    if image is None:
        if (ids == spec.image_token_id).any():
            raise SampleError(IMAGE_TOKEN_MISMATCH, f"{spec.image_token} in a sample without "
                                                    f"an image")
        out = {}  # text-only: collate fills the token types with zeros
    keep = _kept_length(ids, labels, spec.image_token_id, max_length)
    if family.token_type_key in out:
        out[family.token_type_key] = out[family.token_type_key][:keep]
    kept_replies = int((labels[:keep] != IGNORE_INDEX).sum())
    return Encoded(ids[:keep], labels[:keep], keep < len(ids), inputs=out,
                   reply_spans=[tuple(map(int, r)) for r in reply_spans[:kept_replies]],
                   reply_texts=[str(t) for t in reply_texts])


def pack_image_inputs(inputs: dict[str, np.ndarray]) -> bytes:
    """One row's image inputs as ``.npz`` bytes (``b""`` for none): one binary column holds
    every family's variable shapes."""
    if not inputs:
        return b""
    buf = io.BytesIO()
    np.savez(buf, **inputs)
    return buf.getvalue()


def unpack_image_inputs(data: Any) -> dict[str, np.ndarray]:
    """Inverse of ``pack_image_inputs``."""
    if data is None or len(data) == 0:
        return {}
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


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

    Bad rows are dropped and tallied into ``quality`` (see ``quality.py``). ``teacher_dir``: a
    second processor dir (the teacher's) whose encoding of every row is added as ``teacher_``
    columns (see the module docstring).
    """

    def __init__(self, processor_dir: str, max_length: int, quality: SampleQuality | None,
                 keep_keys: bool = False, teacher_dir: str | None = None):
        self.spec = load_processor(processor_dir)
        self.family = self.spec.family
        self.teacher_spec = load_processor(teacher_dir) if teacher_dir else None
        self.cross = (self.teacher_spec is not None and self.teacher_spec.tokenizer.get_vocab()
                      != self.spec.tokenizer.get_vocab())
        self.max_length = max_length
        self.quality = quality
        self.keep_keys = keep_keys

    def _encode(self, spec: ProcessorSpec, conv: list[dict[str, str]], image: Any) -> Encoded:
        if spec.family == LLAVA:
            return encode_conversation(conv, image is not None, spec, self.max_length,
                                       spans=self.cross)
        return encode_family_sample(conv, image, spec, self.max_length, spans=self.cross)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        spec, teacher = self.spec, self.teacher_spec
        counts: dict[str, int] = {}
        examples: list[tuple[str, str]] = []
        out_ids, out_labels, images, has_image, keys = [], [], [], [], []
        t_ids, t_labels, t_images, groups, t_groups = [], [], [], [], []  # groups: cross

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
                enc = self._encode(spec, conv, image)
            except SampleError as e:
                skip(e.kind, i, str(e))
                continue
            t_enc = None
            if teacher is not None:
                try:
                    t_enc = self._encode(teacher, conv, image)
                except SampleError as e:  # bad for the teacher: dropped, counted once
                    skip(e.kind, i, f"teacher processor: {e}")
                    continue
                if self.cross:
                    s_g, t_g = align_reply_tokens(enc.reply_spans, enc.reply_texts,
                                                  t_enc.reply_spans, t_enc.reply_texts)
                    groups.append(at_labels(enc.labels, s_g))
                    t_groups.append(at_labels(t_enc.labels, t_g))
                else:
                    pair_reply_labels(enc, t_enc, f"{batch['source'][i]}:{batch['key'][i]}")
            if enc.truncated or (t_enc is not None and t_enc.truncated):
                counts[TRUNCATED] = counts.get(TRUNCATED, 0) + 1
            out_ids.append(enc.input_ids)
            out_labels.append(enc.labels)
            images.append(image if self.family == LLAVA else enc.inputs)
            has_image.append(image is not None)
            keys.append(f"{batch['source'][i]}/{batch['key'][i]}")
            if t_enc is not None:
                t_ids.append(t_enc.input_ids)
                t_labels.append(t_enc.labels)
                t_images.append(image if teacher.family == LLAVA else t_enc.inputs)
        if self.quality is not None:
            self.quality.record(len(batch["key"]), counts, examples)
        columns = self._columns(spec, out_ids, out_labels, images, has_image)
        if teacher is not None:
            t_columns = self._columns(teacher, t_ids, t_labels, t_images, has_image)
            columns.update({TEACHER_PREFIX + k: v for k, v in t_columns.items()
                            if k != "has_image"})
            if self.cross:
                columns[REPLY_GROUP] = _ragged(groups)
                columns[TEACHER_PREFIX + REPLY_GROUP] = _ragged(t_groups)
        if self.keep_keys:
            columns["key"] = np.asarray(keys, dtype=object)
        return columns

    @staticmethod
    def _columns(spec: ProcessorSpec, ids: list, labels: list, images: list,
                 has_image: list) -> dict[str, Any]:
        if spec.family != LLAVA:
            return {
                "input_ids": _ragged(ids), "labels": _ragged(labels),
                "has_image": np.asarray(has_image, dtype=bool),
                "mm": _ragged([pack_image_inputs(x) for x in images]),
                "family": np.asarray([spec.family] * len(ids), dtype=object)}
        h, w = spec.image_size
        pixels = np.zeros((len(ids), 3, h, w), np.float32)
        real = [i for i, img in enumerate(images) if img is not None]
        if real:
            processed = spec.image_processor(images=[images[i] for i in real],
                                             return_tensors="np")["pixel_values"]
            pixels[real] = processed.astype(np.float32)
        # Object arrays of 1-D int64 arrays: Ray stores them as variable-shaped tensors.
        return {"input_ids": _ragged(ids), "labels": _ragged(labels),
                "pixel_values": pixels, "has_image": np.asarray(has_image, dtype=bool)}


@functools.lru_cache(maxsize=4)
def _cached_preprocessor(processor_dir: str, max_length: int, keep_keys: bool,
                         teacher_dir: str | None = None) -> Preprocessor:
    return Preprocessor(processor_dir, max_length, quality=None, keep_keys=keep_keys,
                        teacher_dir=teacher_dir)


def rows_to_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Reader rows (dicts) → the numpy column batch ``Preprocessor`` takes (object arrays, so
    ragged values such as image bytes and conversations stay one entry per row)."""
    return {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}


def preprocess_batch(batch: dict[str, np.ndarray], processor_dir: str, max_length: int,
                     quality: SampleQuality | None, keep_keys: bool = False,
                     teacher_dir: str | None = None) -> dict[str, Any]:
    """``map_batches`` function form of ``Preprocessor``, for Ray *tasks*.

    The processor is loaded once per worker process and cached: Ray reuses task workers, so
    later datasets (the next epoch, the next test) skip the transformers import and load that
    a fresh actor pool would pay again.
    """
    pre = _cached_preprocessor(processor_dir, max_length, keep_keys, teacher_dir)
    pre.quality = quality
    return pre(batch)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
