"""A merge method: per entry, the parent value of largest magnitude (a user's own extension, found by mmkd through its entry-point group alone)."""

from __future__ import annotations

from workloads.merging.registry import MergeMethod, register_merge_method


def max_magnitude(tensors, base, params, name, generator):
    """Per entry, the value of largest magnitude among the K models (first one on ties)."""
    import torch  # where the merge runs: naming the method in a pipeline needs no torch

    stacked = torch.stack([t.float() for t in tensors])
    pick = stacked.abs().argmax(dim=0, keepdim=True)
    return stacked.gather(0, pick)[0].to(tensors[0].dtype)


register_merge_method(MergeMethod("max_magnitude", "tensor", max_magnitude,
                                  "per-entry largest magnitude (test plugin)", min_models=2))
