"""Coverage audit: every tensor of every parent is in the merge's written weights.

mergekit silently drops what its architecture templates do not name (it wrote 25 of a tiny
LLaVA's 52 tensors: the vision tower was gone, and the checkpoint still loaded with random
vision weights). The audit reads the *written* safetensors headers back (names and shapes, no
data), maps each name to the model's own state-dict name with the renamings
``from_pretrained`` applies on load (``save_pretrained`` writes legacy names, e.g.
``language_model.model.layers.0...`` for ``model.language_model.layers.0...``), and requires
each parent state-dict name there with the expected shape. A tied tensor (``lm_head`` sharing
the embedding's storage) counts as present when the tensor it is tied to is.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping

from workloads.merging.registry import MergeInputError

__all__ = ["CoverageError", "saved_tensor_shapes", "expected_tensors", "coverage_problems",
           "audit_coverage"]


class CoverageError(MergeInputError):
    """The written merge lacks parent tensors (or has them with another shape)."""


def saved_tensor_shapes(model_dir: str, model: Any = None) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in ``model_dir``'s ``*.safetensors`` files, names mapped to
    ``model``'s state-dict names as ``from_pretrained`` would (unchanged when ``model`` is None)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise CoverageError(f"{model_dir}: no *.safetensors written")
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    if model is None:
        return shapes
    rename = _load_renamer(model)
    return {rename(k): s for k, s in shapes.items()}


def _load_renamer(model: Any):
    """The checkpoint-name → state-dict-name map of ``model.from_pretrained``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                 rename_source_key)

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    return lambda key: rename_source_key(key, renamings, converters, prefix, own)[0]


def expected_tensors(model: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """(name → shape of ``model``'s state dict, name → the names it shares storage with)."""
    sd = model.state_dict()
    by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, v in sd.items():
        if v.numel():
            by_storage.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)
    aliases = {k: [o for o in group if o != k] for group in by_storage.values() for k in group}
    return {k: tuple(v.shape) for k, v in sd.items()}, aliases


Shapes = Mapping[str, tuple[int, ...]]
Aliases = Mapping[str, list[str]]


def coverage_problems(expected: Shapes, saved: Shapes,
                      aliases: Aliases | None = None) -> tuple[list[str], list[str]]:
    """(missing names, ``name: expected vs written shape`` lines)."""
    aliases = aliases or {}
    missing, wrong = [], []
    for name, shape in expected.items():
        if name not in saved:
            if not any(a in saved for a in aliases.get(name, ())):
                missing.append(name)
        elif tuple(saved[name]) != tuple(shape):
            wrong.append(f"{name}: expected {tuple(shape)}, written {tuple(saved[name])}")
    return missing, wrong


def audit_coverage(model_dir: str, written: Any, parents: list[Any], parent_names: list[str],
                   same_shapes: bool = True) -> int:
    """Raise CoverageError unless every parent tensor name is in ``model_dir``'s written weights,
    with the parent's shape (``same_shapes``, parameter averages) or the merged model's own
    (``written``: the model that was saved; a new architecture such as JAM-Width keeps every name
    but widens shapes). Returns the number of tensors checked."""
    saved = saved_tensor_shapes(model_dir, written)
    own_shapes, _ = expected_tensors(written)
    checked = 0
    for parent, pname in zip(parents, parent_names):
        shapes, aliases = expected_tensors(parent)
        if not same_shapes:
            shapes = {k: own_shapes.get(k, s) for k, s in shapes.items()}
        missing, wrong = coverage_problems(shapes, saved, aliases)
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of {pname}'s {len(shapes)} tensors are missing "
                             f"(e.g. {', '.join(missing[:5])})")
            if wrong:
                parts.append(f"{len(wrong)} have another shape (e.g. {'; '.join(wrong[:3])})")
            raise CoverageError(f"merge coverage audit failed for {model_dir}: "
                                + " and ".join(parts) + "; the writer dropped parent weights, so "
                                "the checkpoint would reload with freshly initialised tensors in "
                                "their place (mergekit's silent drop). Nothing was published.")
        checked += len(shapes)
    return checked
