"""The merge-method registry: every method registered explicitly by name (mergekit style).

A method is either
- ``tensor``: a pure per-tensor function ``fn(tensors, base, params) -> Tensor`` applied to every
  parameter of K same-shaped state dicts (``uniform``, ``linear``, ``task_arithmetic``, ``ties``);
- ``model``: a builder ``fn(models, base, params, **extra) -> merged`` that makes a new
  architecture (``width``, ``cross``) or a wrapper (``ensemble``).

``MergeMethod`` also carries what the method needs (number of models, a base, a partition), so
``check_merge_inputs`` can refuse incompatible inputs before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["MergeMethod", "MergeInputError", "MERGE_METHODS", "register_merge_method",
           "get_merge_method", "list_merge_methods", "check_merge_inputs"]


class MergeInputError(ValueError):
    """Inputs a merge method cannot take; the message names the method and what it needs."""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kind: str  # "tensor" | "model"
    fn: Callable[..., Any]
    description: str
    min_models: int = 1
    max_models: int | None = None
    needs_base: bool = False
    needs_partition: bool = False
    # tensor methods: every model (and the base) must have identical parameter names and shapes
    same_shapes: bool = True


MERGE_METHODS: dict[str, MergeMethod] = {}


def register_merge_method(method: MergeMethod) -> MergeMethod:
    if method.name in MERGE_METHODS and MERGE_METHODS[method.name].fn is not method.fn:
        raise ValueError(f"merge method {method.name!r} registered twice")
    MERGE_METHODS[method.name] = method
    return method


def get_merge_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise MergeInputError(f"unknown merge method {name!r}; known: "
                              f"{', '.join(sorted(MERGE_METHODS))}") from None


def list_merge_methods() -> list[MergeMethod]:
    return [MERGE_METHODS[k] for k in sorted(MERGE_METHODS)]


def check_merge_inputs(name: str, num_models: int, has_base: bool, has_partition: bool,
                       weights: list[float] | None = None) -> list[str]:
    """Problems with the inputs' *count/presence* for method ``name`` (shapes are checked when
    the weights are loaded, by ``check_same_shapes``)."""
    m = get_merge_method(name)
    problems = []
    if num_models < m.min_models:
        problems.append(f"merge method {name!r} needs at least {m.min_models} model(s) in input "
                        f"`models`, got {num_models}")
    if m.max_models is not None and num_models > m.max_models:
        problems.append(f"merge method {name!r} merges at most {m.max_models} models (K<="
                        f"{m.max_models}), got K={num_models}; use `ensemble` or a parameter "
                        f"average (`linear`, `ties`) for more")
    if m.needs_base and not has_base:
        problems.append(f"merge method {name!r} needs input `base` (the model the task vectors "
                        f"are relative to, e.g. the common pre-trained/SFT start of the experts)")
    if m.needs_partition and not has_partition:
        problems.append(f"merge method {name!r} needs input `partition` (the partition stage's "
                        f"`partitions` output, whose centroids.npy drives the router)")
    if weights is not None and len(weights) != num_models:
        problems.append(f"merge method {name!r}: `weights` has {len(weights)} entries for "
                        f"{num_models} models")
    return problems
