"""Merge methods, one file each, behind the explicit registry ``MERGE_METHODS``.

Importing this package registers every method (the import list below is the registry's
source of truth; no file-system scanning)."""

from workloads.merging import cross, ensemble, linear, task_arithmetic, ties, width  # noqa: F401
from workloads.merging.io import load_any_model, load_merged
from workloads.merging.registry import (MERGE_METHODS, MergeInputError, MergeMethod,
                                        check_merge_inputs, get_merge_method, list_merge_methods)
from workloads.merging.state_dict import check_same_shapes, merge_state_dicts

__all__ = ["MERGE_METHODS", "MergeInputError", "MergeMethod", "check_merge_inputs",
           "get_merge_method", "list_merge_methods", "merge_state_dicts", "check_same_shapes",
           "load_merged", "load_any_model"]
