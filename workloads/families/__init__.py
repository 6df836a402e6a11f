"""Hugging Face VLM families mmkd can distil and merge (issue #15).

- ``table.py``: the family table (``FAMILIES``): classes, part prefixes, tokens, chat template,
  extra forward inputs, pixel layout, image-token rule;
- ``expansion.py``: each family's image-token expansion, ported from its processor;
- ``processing.py``: tokenizer + PIL image processor → ``encode`` / ``collate`` without
  torchvision;
- ``tiny.py``: random-init tiny teacher / student per family (``build_tiny``);
- ``adapter.py``: ``FamilyProcessor`` (an HF-processor-like object for ``workloads.models``),
  parameters by part, the model/processor check.

Importing this package does not import torch or transformers.
"""

from workloads.families.adapter import (FamilyProcessor, family_compat_problems,
                                        family_of_model, part_parameters)
from workloads.families.processing import (GENERIC_IMAGE, IGNORE_INDEX, ProcessorParts,
                                           build_image_processor, build_tokenizer, collate,
                                           encode, expand_image_tokens, hf_processor,
                                           load_processor_parts, make_processor_parts, render,
                                           save_processor_parts)
from workloads.families.table import (FAMILIES, PART_NAMES, PIXEL_LAYOUTS, Family, family_of,
                                      get_family, image_token_id, parameter_part,
                                      processor_settings)
from workloads.families.tiny import (TINY_SIZES, build_tiny, tiny_config,
                                     tiny_image_processor_kwargs, tiny_model, tiny_processor_parts)

__all__ = ["FAMILIES", "PART_NAMES", "PIXEL_LAYOUTS", "Family", "family_of", "get_family",
           "image_token_id", "parameter_part", "processor_settings", "ProcessorParts",
           "build_tokenizer", "build_image_processor", "make_processor_parts", "hf_processor",
           "save_processor_parts", "load_processor_parts", "render", "expand_image_tokens",
           "encode", "collate", "IGNORE_INDEX", "GENERIC_IMAGE", "TINY_SIZES", "tiny_config",
           "tiny_image_processor_kwargs", "tiny_model", "tiny_processor_parts", "build_tiny",
           "FamilyProcessor", "family_of_model", "part_parameters", "family_compat_problems"]
