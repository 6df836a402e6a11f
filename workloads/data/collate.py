"""Batching preprocessed rows into model inputs (right-padded tensors)."""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from workloads.data.preprocess import (IGNORE_INDEX, REPLY_GROUP, TEACHER_PREFIX,
                                       unpack_image_inputs)

__all__ = ["collate", "make_collate_fn", "batch_family", "DIGEST_KEY"]

DIGEST_KEY = "mm_digest"  # (B, 16) uint8: per-row digest of a family row's image inputs


def _rows(column: np.ndarray) -> list[np.ndarray]:
    # Ray hands variable-length columns over as an object array of 1-D arrays, but a batch
    # whose rows happen to share one length arrives as a 2-D array: accept both.
    return list(column) if column.dtype == object or column.ndim == 2 else [column]


def batch_family(batch: dict[str, Any]) -> str | None:
    """The family of a batch of preprocessed rows: None for LLaVA rows (no ``mm`` column)."""
    if "mm" not in batch:
        return None
    if "family" not in batch or len(batch["family"]) == 0:
        raise ValueError("rows with an `mm` column but no `family` column: pass collate(..., "
                         "family=...) with the processor's family")
    return str(batch["family"][0])


def collate(batch: dict[str, np.ndarray], pad_token_id: int,
            pad_to_multiple_of: int | None = None, family: str | None = None
            ) -> dict[str, torch.Tensor]:
    """Pad a batch of preprocessed rows (B rows of length T_i) to (B, T), T = max T_i.

    LLaVA rows (``family`` None or ``"llava"`` and no ``mm`` column) give ``input_ids`` (B,T)
    long padded with ``pad_token_id``, ``attention_mask`` (B,T) long (1 = real token),
    ``labels`` (B,T) long padded with -100, ``pixel_values`` (B,3,H,W) float32 and
    ``has_image`` (B,) bool.

    Rows of another family (an ``mm`` column; ``family`` defaults to the rows' ``family``
    column) are batched by ``workloads.families.collate``: the same text tensors plus the
    family's token-type ids, ``pixel_values`` of the rows with an image in the family's pixel
    layout (concatenated, tile-padded, or one padded row per sample for Idefics3/SmolVLM) and
    its extra inputs (``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``); plus
    ``has_image`` and ``mm_digest`` (B,16) uint8, a digest of each row's image inputs (what
    ``teacher.payload.row_digests`` uses, since pixels no longer index by row). A batch without
    images gets an empty ``pixel_values`` (``model_inputs`` leaves it out). Every value is a
    tensor, so ``{k: v.to(device)}`` works on the whole batch.

    Rows that also carry the teacher's own encoding (``teacher_`` columns, see
    ``preprocess.py``) get it collated by the same rules (its own family, the same padding) and
    returned under ``teacher_`` keys: ``teacher_input_ids``, ``teacher_attention_mask``,
    ``teacher_labels``, ``teacher_pixel_values``, the family's extra inputs, ``teacher_has_image``
    and ``teacher_mm_digest`` — what ``distill_loss`` reads with ``teacher_inputs="own"``; rows
    of a teacher with another tokenizer also give ``reply_group`` and ``teacher_reply_group``
    (B, T) long, padded with -1 (``teacher_inputs="cross"``).
    """
    if any(k.startswith(TEACHER_PREFIX) for k in batch):
        n = len(TEACHER_PREFIX)
        own = {k: v for k, v in batch.items() if not k.startswith(TEACHER_PREFIX)}
        teacher = {k[n:]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
        teacher.setdefault("has_image", batch["has_image"])
        out = collate(own, pad_token_id, pad_to_multiple_of, family)
        # The family is the rows' own. One tokenizer: one pad id; another tokenizer (rows
        # with reply groups) pads with id 0, a token of every vocabulary (the attention mask
        # hides padding either way)
        t_pad = 0 if REPLY_GROUP in teacher else pad_token_id
        t_out = collate(teacher, t_pad, pad_to_multiple_of)
        out.update({TEACHER_PREFIX + k: v for k, v in t_out.items()})
        return out
    if REPLY_GROUP in batch:  # padded like the labels, with -1 (no group)
        groups = _rows(batch[REPLY_GROUP])
        out = collate({k: v for k, v in batch.items() if k != REPLY_GROUP}, pad_token_id,
                      pad_to_multiple_of, family)
        padded = torch.full(out["input_ids"].shape, -1, dtype=torch.long)
        for i, row in enumerate(groups):
            padded[i, :len(row)] = torch.as_tensor(np.asarray(row, dtype=np.int64))
        out[REPLY_GROUP] = padded
        return out
    if family is None:
        family = batch_family(batch)
    if family is not None and family != "llava":
        return _collate_family(batch, pad_token_id, pad_to_multiple_of, family)
    ids = _rows(batch["input_ids"])
    labels = _rows(batch["labels"])
    longest = max((len(r) for r in ids), default=0)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out_ids = torch.full((len(ids), longest), pad_token_id, dtype=torch.long)
    out_labels = torch.full((len(ids), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        n = len(row_ids)
        out_ids[i, :n] = torch.as_tensor(np.asarray(row_ids, dtype=np.int64))
        out_labels[i, :n] = torch.as_tensor(np.asarray(row_labels, dtype=np.int64))
        mask[i, :n] = 1
    pixels = np.asarray(batch["pixel_values"], dtype=np.float32)
    return {"input_ids": out_ids, "attention_mask": mask, "labels": out_labels,
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)),
            "has_image": torch.as_tensor(np.asarray(batch["has_image"], dtype=bool))}


def _digest(inputs: dict[str, np.ndarray]) -> bytes:
    if not inputs:
        return bytes(16)
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(inputs):
        value = np.ascontiguousarray(inputs[key])
        h.update(f"{key}:{value.dtype.str}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.digest()


def _collate_family(batch: dict[str, np.ndarray], pad_token_id: int,
                    pad_to_multiple_of: int | None, family: str) -> dict[str, torch.Tensor]:
    from workloads import families

    fam = families.get_family(family)
    ids, labels = _rows(batch["input_ids"]), _rows(batch["labels"])
    has_image = np.asarray(batch["has_image"], dtype=bool)
    if not len(ids):
        raise ValueError("collate: an empty batch")
    samples, digests = [], []
    for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        row_ids = np.asarray(row_ids, dtype=np.int64)
        inputs = unpack_image_inputs(batch["mm"][i]) if has_image[i] else {}
        sample = {"input_ids": row_ids, "labels": np.asarray(row_labels, dtype=np.int64)}
        if fam.token_type_key and not inputs:  # text-only: no image token (preprocess checks)
            sample[fam.token_type_key] = np.zeros(len(row_ids), np.int64)
        elif fam.token_type_key and fam.token_type_key not in inputs:
            # zeros would silently change the model (Qwen's M-RoPE positions, Gemma 3's mask)
            raise ValueError(f"collate: row {i} has an image but its `mm` inputs lack "
                             f"{fam.token_type_key!r}; pack every families.encode output but "
                             f"input_ids and labels (as Preprocessor does)")
        sample.update(inputs)
        samples.append(sample)
        digests.append(_digest(inputs))
    out = families.collate(fam, samples, pad_token_id)
    if pad_to_multiple_of:
        width = out["input_ids"].shape[1]
        extra = -(-width // pad_to_multiple_of) * pad_to_multiple_of - width
        fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        if fam.token_type_key:
            fill[fam.token_type_key] = 0
        for key, value in fill.items():
            out[key] = torch.nn.functional.pad(out[key], (0, extra), value=value)
    out.setdefault("pixel_values", torch.zeros(0, dtype=torch.float32))
    out["has_image"] = torch.as_tensor(has_image)
    digest = np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 16)
    out[DIGEST_KEY] = torch.as_tensor(digest.copy())
    return out


def make_collate_fn(pad_token_id: int, pad_to_multiple_of: int | None = None,
                    family: str | None = None
                    ) -> Callable[[dict[str, np.ndarray]], dict[str, Any]]:
    """``collate`` with the padding settings (and the family, None: from the rows) bound, for
    ``iter_torch_batches(collate_fn=...)``."""
    return partial(collate, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                   family=family)
