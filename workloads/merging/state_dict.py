"""Apply a per-tensor merge method to whole state dicts."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from pydantic import BaseModel

from workloads.merging.registry import (MergeInputError, get_merge_method, method_params,
                                        tensor_generator)

__all__ = ["check_same_shapes", "merge_state_dicts"]


def check_same_shapes(method: str, state_dicts: list[dict[str, torch.Tensor]],
                      names: list[str] | None = None, family: str | None = None) -> None:
    """Raise MergeInputError naming the method, the models' family (``family``, e.g.
    ``qwen2_vl (Qwen2VLForConditionalGeneration)``), the first tensor whose name or shape
    differs, and the models."""
    names = names or [f"model {i}" for i in range(len(state_dicts))]
    of = f" (both {family})" if family else ""
    ref = state_dicts[0]
    for name, sd in zip(names[1:], state_dicts[1:]):
        if sd.keys() != ref.keys():
            only_ref = [k for k in ref if k not in sd]
            first = (f"{only_ref[0]!r} is in {names[0]} but not in {name}" if only_ref else
                     f"{next(k for k in sd if k not in ref)!r} is in {name} but not in "
                     f"{names[0]}")
            raise MergeInputError(f"merge method {method!r} averages parameters and needs models "
                                  f"of the same architecture; {names[0]} and {name}{of} differ "
                                  f"in parameter names: {first} "
                                  f"({len(set(sd) ^ set(ref))} names differ)")
        for k, v in ref.items():
            if sd[k].shape != v.shape:
                raise MergeInputError(f"merge method {method!r} needs models with identical "
                                      f"shapes; {k} is {tuple(v.shape)} in {names[0]} but "
                                      f"{tuple(sd[k].shape)} in {name}{of}")


def merge_state_dicts(method: str, state_dicts: list[dict[str, torch.Tensor]],
                      base: dict[str, torch.Tensor] | None = None,
                      params: BaseModel | Mapping[str, Any] | None = None,
                      seed: int = 0, names: list[str] | None = None,
                      family: str | None = None) -> dict[str, torch.Tensor]:
    """Apply tensor method ``method`` to every floating-point parameter. ``params``: the
    method's params model or a mapping validated by it (None = defaults); ``seed``: the
    stage seed each parameter's generator is derived from (``tensor_generator``); ``names``
    (the models', then the base's) and ``family`` only word the errors."""
    m = get_merge_method(method)
    if m.kind != "tensor":
        raise MergeInputError(f"merge method {method!r} builds a new model; call its builder")
    if m.needs_base and base is None:
        raise MergeInputError(f"merge method {method!r} needs a base model (input `base`)")
    check_same_shapes(method, state_dicts + ([base] if base is not None else []), names,
                      family)
    params = method_params(method, params)
    out = {}
    for k, ref in state_dicts[0].items():
        if not torch.is_floating_point(ref):
            out[k] = ref.clone()  # integer buffers are not averaged
            continue
        out[k] = m.fn([sd[k] for sd in state_dicts], None if base is None else base[k], params,
                      k, tensor_generator(seed, k))
    return out
