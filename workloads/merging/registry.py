"""The merge-method registry: every method registered by name (mergekit style).

A method is either
- ``tensor``: a pure per-tensor function ``fn(tensors, base, params, name, generator) -> Tensor``
  applied to every floating-point parameter of K same-shaped state dicts (``uniform``,
  ``linear``, ``task_arithmetic``, ``ties``, ``dare``): ``tensors`` the K models' values,
  ``base`` the base model's (or None), ``params`` the method's own validated params model,
  ``name`` the parameter's name and ``generator`` a CPU ``torch.Generator`` seeded from the
  stage seed and that name (``tensor_generator``): random methods are reproducible and do not
  depend on the order tensors are visited in;
- ``model``: a builder ``fn(models, base, params, **extra) -> merged`` that makes a new
  architecture (``width``, ``cross``) or a wrapper (``ensemble``).

``MergeMethod`` also carries its parameters' pydantic model (``params``; the ``merge`` stage's
config is ``method`` plus exactly these fields) and what the method needs (number of models, a
base, a partition), so ``check_merge_inputs`` can refuse incompatible inputs before any weight
is read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from workloads.extensions import NoParams, validate_own_params

__all__ = ["MergeMethod", "MergeInputError", "MERGE_METHODS", "register_merge_method",
           "get_merge_method", "list_merge_methods", "check_merge_inputs", "method_params",
           "tensor_generator"]


class MergeInputError(ValueError):
    """Inputs a merge method cannot take; the message names the method and what it needs."""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kind: str  # "tensor" | "model"
    fn: Callable[..., Any]
    description: str
    params: type[BaseModel] = NoParams  # the method's own parameters (extra="forbid")
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


def method_params(name: str, params: BaseModel | Mapping[str, Any] | None) -> BaseModel:
    """``params`` as method ``name``'s params model (validated; None = all defaults). A
    ValidationError names the method and the field; an instance passes through."""
    model = get_merge_method(name).params
    if isinstance(params, model):
        return params
    if isinstance(params, BaseModel):
        params = params.model_dump()
    return validate_own_params(f"merge method {name!r}", model, params or {}, model.__name__)


def tensor_generator(seed: int, name: str) -> Any:
    """A CPU ``torch.Generator`` for parameter ``name``: seeded with the first 8 bytes
    (little-endian, top bit cleared) of sha256(f"{seed}:{name}") — stable across processes
    and Python versions (unlike ``hash``), distinct per name, independent of visiting order."""
    import torch

    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(
        int.from_bytes(digest[:8], "little") & (2**63 - 1))


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
