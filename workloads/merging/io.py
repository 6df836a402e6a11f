"""Loading anything ``merge`` writes: a plain LLaVA checkpoint (``uniform``, ``linear``,
``task_arithmetic``, ``ties``, ``width``) or a wrapper dir with ``mmkd_merged.json``
(``cross``, ``ensemble``). Every merged dir also holds the first parent's processor."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["MERGED_META", "is_wrapper", "merged_kind", "load_merged", "load_any_model"]

MERGED_META = "mmkd_merged.json"


def is_wrapper(path: str) -> bool:
    return os.path.exists(os.path.join(path, MERGED_META))


def merged_kind(path: str) -> str | None:
    """``"cross"`` / ``"ensemble"`` for a wrapper dir, None for a plain checkpoint."""
    if not is_wrapper(path):
        return None
    with open(os.path.join(path, MERGED_META)) as f:
        return json.load(f)["kind"]


def load_merged(path: str) -> Any:
    """The model in ``path`` in eval mode: ``LlavaForConditionalGeneration``,
    ``CrossMergedModel`` or ``EnsembleModel`` (all have ``__call__`` → ``.logits`` and a greedy
    ``.generate(**processor_outputs, max_new_tokens=, do_sample=False)``)."""
    if merged_kind(path) is None:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path).eval()
    with open(os.path.join(path, MERGED_META)) as f:
        meta = json.load(f)
    if meta["kind"] == "cross":
        from workloads.merging.cross import load_cross

        return load_cross(path, meta).eval()
    if meta["kind"] == "ensemble":
        from workloads.merging.ensemble import load_ensemble

        return load_ensemble(path, meta).eval()
    raise ValueError(f"{path}/{MERGED_META}: unknown kind {meta['kind']!r}")


def load_any_model(path: str) -> tuple[Any, Any]:
    """``(model, processor)`` for any model dir mmkd writes."""
    from transformers import AutoProcessor

    return load_merged(path), AutoProcessor.from_pretrained(path)
