"""Merge methods, one file each, in the registry ``MERGE_METHODS`` (see ``registry.py``).

Importing this package imports every module in its folder, and each method's module registers
it. Parents may be of any VLM family of ``workloads.families`` (loaded with the Auto class; one
family per merge): parameter averages work for every family, ``width`` where an exact
construction exists (``width.width_refusal``), ``cross`` where the decoder can be stepped by hand
(``cross.cross_refusal``), ``ensemble`` for LLaVA-1.5. ``audit.py`` checks that what a merge wrote
holds every parent tensor; ``anatomy.py`` finds a family's decoder. A method declares its own typed parameters (a pydantic model); the ``merge`` stage's config
is ``method`` plus exactly those fields, validated by that model.

Extending — a new merge method is one new file here, e.g. ``workloads/merging/my_method.py``::

    from pydantic import BaseModel, ConfigDict, Field
    from workloads.merging.registry import MergeMethod, register_merge_method

    class MyParams(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        lambda_: float = Field(1.0, description="...")

    def _my_method(tensors, base, params: MyParams, name, generator):
        # tensors: the K models' values of parameter `name`; base: the base's (or None);
        # generator: a torch.Generator seeded from the stage seed and `name`
        ...

    register_merge_method(MergeMethod("my_method", "tensor", _my_method, "one line",
                                      params=MyParams, needs_base=True))

and a pipeline uses it as ``params: {method: my_method, lambda_: 0.5}``. ``dare.py`` is such a
file. A ``model`` method (a new architecture or wrapper) registers
``fn(models, base, params, **extra) -> merged`` instead; see ``width.py``.
"""

from workloads.merging.io import load_any_model, load_merged
from workloads.merging.registry import (MERGE_METHODS, MergeInputError, MergeMethod,
                                        check_merge_inputs, get_merge_method, list_merge_methods,
                                        method_params, tensor_generator)
from workloads.merging.state_dict import check_same_shapes, merge_state_dicts
from workloads.extensions import import_package_modules

import_package_modules(__name__, __path__, group="mmkd.merge_methods")

__all__ = ["MERGE_METHODS", "MergeInputError", "MergeMethod", "check_merge_inputs",
           "get_merge_method", "list_merge_methods", "merge_state_dicts", "check_same_shapes",
           "load_merged", "load_any_model", "method_params", "tensor_generator"]
