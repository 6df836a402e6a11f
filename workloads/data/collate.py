"""Batching preprocessed rows into model inputs (right-padded tensors)."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from workloads.data.preprocess import IGNORE_INDEX

__all__ = ["collate", "make_collate_fn"]


def _rows(column: np.ndarray) -> list[np.ndarray]:
    # Ray hands variable-length columns over as an object array of 1-D arrays, but a batch
    # whose rows happen to share one length arrives as a 2-D array: accept both.
    return list(column) if column.dtype == object or column.ndim == 2 else [column]


def collate(batch: dict[str, np.ndarray], pad_token_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch of preprocessed rows (B rows of length T_i) to (B, T), T = max T_i.

    Returns ``input_ids`` (B,T) long padded with ``pad_token_id``, ``attention_mask`` (B,T)
    long (1 = real token), ``labels`` (B,T) long padded with -100, ``pixel_values``
    (B,3,H,W) float32 and ``has_image`` (B,) bool.
    """
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


def make_collate_fn(pad_token_id: int, pad_to_multiple_of: int | None = None
                    ) -> Callable[[dict[str, np.ndarray]], dict[str, Any]]:
    """``collate`` with the padding settings bound, for ``iter_torch_batches(collate_fn=...)``."""
    return partial(collate, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
