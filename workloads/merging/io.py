"""Loading anything ``merge`` writes or reads: a plain checkpoint of any VLM family
(``workloads.families``; ``uniform``, ``linear``, ``task_arithmetic``, ``ties``, ``dare``,
``width``) or a wrapper dir with ``mmkd_merged.json`` (``cross``, ``ensemble``). Every merged
dir also holds the first parent's processor files (``copy_processor_files``)."""

from __future__ import annotations

import json
import os
import shutil
from fnmatch import fnmatch
from typing import Any

__all__ = ["MERGED_META", "PROCESSOR_FILES", "is_wrapper", "merged_kind", "load_plain",
           "load_merged", "load_any_model", "copy_processor_files", "dir_model_type"]

MERGED_META = "mmkd_merged.json"
# What save_pretrained of a tokenizer / image processor / processor writes (never weights).
PROCESSOR_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "*.tiktoken", "spiece.model", "chat_template.*",
                   "processor_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json")


def is_wrapper(path: str) -> bool:
    return os.path.exists(os.path.join(path, MERGED_META))


def merged_kind(path: str) -> str | None:
    """``"cross"`` / ``"ensemble"`` for a wrapper dir, None for a plain checkpoint."""
    if not is_wrapper(path):
        return None
    with open(os.path.join(path, MERGED_META)) as f:
        return json.load(f)["kind"]


def dir_model_type(path: str) -> str | None:
    """``config.json``'s ``model_type`` of a plain dir, or of a wrapper's first decoder/expert."""
    for sub in ("", "decoder_0", "expert_0"):
        cfg = os.path.join(path, sub, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                return json.load(f).get("model_type")
    return None


def load_plain(path: str) -> Any:
    """A plain checkpoint of any family with ``AutoModelForImageTextToText`` (LLaVA-1.5 dirs
    load as ``LlavaForConditionalGeneration``), in eval mode."""
    from transformers import AutoModelForImageTextToText

    if is_wrapper(path):
        raise ValueError(f"{path} is a {merged_kind(path)!r} merge (a wrapper of several "
                         f"models), not a checkpoint; merge its parents instead")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"{path} has no config.json; a merge input must be a model dir written "
                         f"by save_pretrained (e.g. a train stage's `model/`)")
    return AutoModelForImageTextToText.from_pretrained(path).eval()


def load_merged(path: str) -> Any:
    """The model in ``path`` in eval mode: the family's ``*ForConditionalGeneration``,
    ``CrossMergedModel`` or ``EnsembleModel`` (all have ``__call__`` → ``.logits`` and a greedy
    ``.generate(**processor_outputs, max_new_tokens=, do_sample=False)``)."""
    if merged_kind(path) is None:
        return load_plain(path)
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
    """``(model, processor)`` for any model dir mmkd writes: ``AutoProcessor`` for LLaVA-1.5,
    the family's ``FamilyProcessor`` (no torchvision needed) for the other families."""
    from transformers import AutoProcessor

    model = load_merged(path)
    if dir_model_type(path) in (None, "llava"):
        return model, AutoProcessor.from_pretrained(path)
    from workloads.families.adapter import FamilyProcessor

    return model, FamilyProcessor.from_pretrained(path, _family_name(path))


def _family_name(path: str) -> str:
    from workloads.families import family_of

    return family_of(dir_model_type(path)).name


def copy_processor_files(src: str, dst: str) -> list[str]:
    """Copy the processor / tokenizer files of model dir ``src`` into ``dst`` byte for byte
    (no processor class is instantiated: those of Qwen, InternVL, OneVision and SmolVLM need
    torchvision). Returns the copied names; raises if ``src`` has no tokenizer."""
    names = sorted(n for n in os.listdir(src) if os.path.isfile(os.path.join(src, n))
                   and any(fnmatch(n, p) for p in PROCESSOR_FILES))
    if not any(n.startswith("tokenizer") for n in names):
        raise ValueError(f"{src} has no tokenizer files; the merge copies the first parent's "
                         f"processor into its output, so save the parent with its processor")
    os.makedirs(dst, exist_ok=True)
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
    return names
