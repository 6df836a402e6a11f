"""Where a merge finds things in a VLM of any family (``workloads.families``): the family of a
model, its text decoder's prefix and module, and the check that K parents are one family."""

from __future__ import annotations

from typing import Any

from workloads.families import Family, family_of
from workloads.merging.registry import MergeInputError

__all__ = ["model_family", "text_prefix", "language_model", "describe", "check_same_family"]


def model_family(model: Any) -> Family:
    """The family of a loaded model (by ``config.model_type``); MergeInputError if none."""
    try:
        return family_of(model.config)
    except ValueError as e:
        raise MergeInputError(f"cannot merge {type(model).__name__}: {e}") from None


def text_prefix(family: Family) -> str:
    """The state-dict prefix of the text decoder body, e.g. ``model.language_model.``."""
    prefixes = [p for p in dict(family.parts)["llm"] if not p.startswith("lm_head")]
    return prefixes[0]


def language_model(model: Any) -> Any:
    """The text decoder module (the one holding ``layers`` and the final ``norm``)."""
    return model.get_submodule(text_prefix(model_family(model)).rstrip("."))


def describe(model: Any) -> str:
    """``qwen2_vl (Qwen2VLForConditionalGeneration)``."""
    return f"{getattr(model.config, 'model_type', '?')} ({type(model).__name__})"


def check_same_family(method: str, models: list[Any], names: list[str]) -> Family:
    """The parents' common family; MergeInputError naming the first parent of another one."""
    family = model_family(models[0])
    for model, name in zip(models[1:], names[1:]):
        if model_family(model) is not family or type(model) is not type(models[0]):
            raise MergeInputError(
                f"merge method {method!r} merges models of one family; {names[0]} is "
                f"{describe(models[0])} but {name} is {describe(model)}")
    return family
