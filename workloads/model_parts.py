"""A model's parts — ``vision``, ``projector``, ``llm`` and, in a JAM-Cross merge, ``bridges`` —
as modules and as parameters, for freezing by part (``set_trainable``) and counting."""

from __future__ import annotations

from typing import Any

from workloads.model_spec import PARTS, ModelCompatError

__all__ = ["model_parts", "part_parameters", "set_trainable", "count_params"]


def model_parts(model: Any) -> dict[str, list[Any]]:
    """Part name → modules (transformers 5 attribute names). A JAM-Cross merge maps each part
    over both parent decoders and adds ``bridges`` (its new layers). A family model (any but
    LLaVA-1.5) has no module per part (Qwen's projector sits inside its vision module): each
    part is one ``.parameters()``-able group, by ``part_parameters``."""
    from workloads.families.adapter import ParameterGroup, family_of_model

    if hasattr(model, "new_parameters") and hasattr(model, "decoders"):
        per = [model_parts(d) for d in model.decoders]
        parts = {k: [m for p in per for m in p[k]] for k in ("vision", "projector", "llm")}
        parts["bridges"] = [model.bridges_ab, model.bridges_ba, model.fusion]
        return parts
    family = family_of_model(model)
    if family is not None and family.name != "llava":
        return {k: [ParameterGroup(v)] for k, v in part_parameters(model).items()}
    inner = model.model
    return {"vision": [inner.vision_tower], "projector": [inner.multi_modal_projector],
            "llm": [inner.language_model, model.lm_head]}


def part_parameters(model: Any) -> dict[str, list[Any]]:
    """Part name → its parameters. For a family model each parameter is in exactly one part
    (``families.parameter_part``; ModelCompatError names one that is in none)."""
    from workloads.families.adapter import family_of_model
    from workloads.families.adapter import part_parameters as by_name

    family = family_of_model(model)
    if family is not None and family.name != "llava" and not hasattr(model, "decoders"):
        try:
            return by_name(model, family)
        except ValueError as e:
            raise ModelCompatError(f"cannot freeze by part: {e}") from None
    out = {}
    for name, modules in model_parts(model).items():
        out[name] = list({id(p): p for m in modules for p in m.parameters()}.values())
    return out


def set_trainable(model: Any, train: list[str]) -> dict[str, int]:
    """Freeze every part not in ``train``; returns trainable parameter counts per part."""
    unknown = sorted(set(train) - set(PARTS))
    if unknown or not train:
        raise ValueError(f"train: parts must be a non-empty subset of {list(PARTS)}, got {train}")
    parts = part_parameters(model)
    if "bridges" in train and "bridges" not in parts:
        raise ValueError("train: `bridges` are the new layers of a JAM-Cross merge; start the "
                         "stage from one (input `init: <cross merge stage>.model`) or train "
                         "vision / projector / llm")
    counts = {}
    for name, params in parts.items():
        on = name in train
        for p in params:
            p.requires_grad_(on)
        counts[name] = sum(p.numel() for p in params) if on else 0
    return counts


def count_params(model: Any) -> dict[str, int]:
    out = {name: sum(p.numel() for p in params) for name, params in part_parameters(model).items()}
    out["total"] = sum(out.values())
    return out
