"""How a pipeline names a model (``ModelSpec``: a ``preset``, a ``path`` or ``parts``, optionally a
``family``), the tiny presets, and the checks that need no model built (``checkpoint_family``,
``config_problem``). Building, loading, describing and saving models is ``models.py``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, field_validator, model_serializer,
                      model_validator)

__all__ = ["PRESETS", "PARTS", "ModelSpec", "PartsSpec", "ModelCompatError", "checkpoint_family",
           "check_family", "config_problem", "is_local"]

PARTS = ("vision", "projector", "llm", "bridges")

# Tiny presets: 32×32 images, patch 8 → 16 image tokens for both, so visual-token KD can match
# positions. The teacher is ~10× the student so a few CPU minutes of training separate them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-teacher": {
        "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8),
        "text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    },
    "tiny-student": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2, image_size=32, patch_size=8),
        "text": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
    },
}


class ModelCompatError(ValueError):
    """A model, its tokenizer and its image processor disagree; the message says what to change."""

    deterministic = True  # Ray Train raises it at once (workloads/errors.py)


class PartsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vision: str = Field(description="hub id or local path of a SigLIP/CLIP vision tower")
    llm: str = Field(description="hub id or local path of a causal LM (e.g. Qwen2)")
    projector: Literal["mlp2x_gelu"] = Field("mlp2x_gelu", description="projector type")


class ModelSpec(BaseModel):
    """Exactly one of ``preset``, ``path`` or ``parts``; ``family`` with ``preset`` or ``path``.
    ``family: llava`` is stored as None (LLaVA-1.5), so it names the same model, with the same
    cache key, as no family; with ``path`` it therefore checks nothing."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny-teacher", "tiny-student"] | None = Field(
        None, description="random-init tiny model; vocab size = the tokenizer's")
    path: str | None = Field(None, description="HF checkpoint dir of a supported family "
                                                 "(its config.json model_type decides)")
    parts: PartsSpec | None = Field(None, description="vision tower + LLM joined by a new projector")
    family: str | None = Field(
        None, description="VLM family (workloads.families: qwen2_vl, internvl, gemma3, ...): with "
                          "`preset` a tiny model of that family; with `path` the family the "
                          "checkpoint must be of. None or `llava`: LLaVA-1.5")

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        from workloads.families import FAMILIES

        if value is not None and value not in FAMILIES:
            import difflib

            close = difflib.get_close_matches(value, FAMILIES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"model.family: unknown family {value!r}; {hint}known: "
                             f"{sorted(FAMILIES)}")
        return None if value == "llava" else value  # LLaVA-1.5 is the family-less path

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSpec":
        given = [k for k in ("preset", "path", "parts") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model: give exactly one of `preset`, `path` or `parts` (got {given or 'none'}); "
                f"e.g. `model: {{preset: tiny-student}}`")
        if self.family and self.parts:
            raise ValueError(f"model: `parts` builds a LLaVA-1.5 model; drop `family: "
                             f"{self.family}` or name a `preset` / `path` of that family")
        if self.path:
            problem = config_problem(self.path, "model.path")
            if problem:
                raise ValueError(problem)
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_family(self, handler: Any) -> dict[str, Any]:
        # A LLaVA spec dumps as before the field existed, so its stage cache keys do not change.
        data = handler(self)
        if self.family is None:
            data.pop("family", None)
        return data


def config_problem(model_dir: str, field: str) -> str | None:
    """Why the ``config.json`` of a local model directory does not load in this transformers
    (a field that fails its validation, say), or None; checked when a pipeline is validated,
    so such a file fails before any compute instead of inside a stage, where its exception
    may not survive the trip through Ray."""
    cfg_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_file):
        return None
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's to see
        import transformers

        detail = " ".join(str(e).split())[:400]
        return (f"{field}: {cfg_file} does not load in transformers {transformers.__version__} "
                f"({type(e).__name__}: {detail}); fix that field of the file, or re-save the "
                f"model with this transformers version")
    return None


def is_local(ref: str) -> bool:
    return os.path.isabs(ref) or ref.startswith(".") or os.path.isdir(ref)


def checkpoint_family(path: str) -> str | None:
    """The family of the checkpoint at ``path`` by its ``config.json`` ``model_type`` (``None``
    for LLaVA-1.5 and for a dir without config.json); ModelCompatError for any other type."""
    import json

    from workloads.families import FAMILIES, family_of

    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        return None
    with open(cfg_file) as f:
        model_type = json.load(f).get("model_type")
    try:
        name = family_of(model_type).name
    except ValueError:
        raise ModelCompatError(
            f"model path {path!r}: config.json model_type {model_type!r} is not a supported VLM "
            f"family; supported: {sorted(FAMILIES)} (model types "
            f"{sorted(t for f in FAMILIES.values() for t in f.model_types)})") from None
    return None if name == "llava" else name


def check_family(spec: ModelSpec, found: str | None) -> None:
    """``family`` given with ``path``: the checkpoint must be of that family."""
    if spec.family is not None and spec.family != found:
        raise ModelCompatError(f"model: `family: {spec.family}` but {spec.path!r} is a "
                               f"{found or 'llava'} checkpoint; drop `family` or fix `path`")
