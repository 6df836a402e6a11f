"""The HF processor directory as the single description of how samples are preprocessed.

A LLaVA-1.5 model directory carries a ``LlavaProcessor`` (tokenizer + image processor + patch
size); ``ProcessorSpec`` reads from it the few facts preprocessing needs, above all the number of
image tokens ``LlavaForConditionalGeneration`` will expect per ``<image>``.

Any other VLM family (``workloads.families``: LLaVA-NeXT/OneVision, Qwen-VL, InternVL,
Idefics3/SmolVLM, Gemma 3) is recognised by its ``config.json`` ``model_type`` or its
``processor_config.json`` ``processor_class`` and loaded with ``load_processor_parts`` (tokenizer
+ PIL image processor, no torchvision): ``spec.family`` names it and ``spec.parts`` encodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProcessorSpec", "load_processor", "processor_family", "save_llava_processor",
           "num_image_tokens", "LLAVA"]

LLAVA = "llava"  # LLaVA-1.5 dirs: today's LlavaProcessor path, unchanged


def num_image_tokens(image_height: int, image_width: int, patch_size: int,
                     num_additional_image_tokens: int = 0,
                     vision_feature_select_strategy: str = "full") -> int:
    """Image tokens per image, computed exactly as ``LlavaProcessor`` does."""
    n = (image_height // patch_size) * (image_width // patch_size) + num_additional_image_tokens
    # "default" drops the CLS feature of the vision tower.
    return n - 1 if vision_feature_select_strategy == "default" else n


def _image_size(image_processor: Any) -> tuple[int, int]:
    # Siglip resizes to `size`; CLIP-style processors center-crop to `crop_size`.
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if size is None:
            continue
        # A plain dict in older transformers, a SizeDict dataclass in 5.x.
        height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
        width = size.get("width") if isinstance(size, dict) else getattr(size, "width", None)
        if height and width:
            return int(height), int(width)
    raise ValueError(f"image processor {type(image_processor).__name__} has no height/width "
                     f"size; use a processor that resizes to a fixed size (e.g. Siglip)")


@dataclass
class ProcessorSpec:
    """What preprocessing needs from a processor dir (built once per worker process).

    ``image_size`` and ``num_image_tokens`` are None where they vary per image (any-res grids,
    Qwen's dynamic resolution, tiles). ``image_token`` / ``image_token_id``: the token repeated
    once per visual feature, the image mask is ``input_ids == image_token_id`` (for Gemma 3 the
    soft token, not ``<start_of_image>``). ``family``: ``"llava"`` for LlavaProcessor dirs, else
    the ``workloads.families`` name, whose ``ProcessorParts`` are in ``parts``.
    """

    processor_dir: str
    tokenizer: Any
    image_processor: Any
    image_size: tuple[int, int] | None
    num_image_tokens: int | None
    image_token: str
    image_token_id: int
    pad_token_id: int
    family: str = LLAVA
    parts: Any = None  # workloads.families.ProcessorParts for non-LLaVA families


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def processor_family(processor_dir: str) -> str:
    """``"llava"`` or the family name of a model / processor dir, from ``config.json``'s
    ``model_type`` or else ``processor_config.json``'s ``processor_class``. A dir that names
    neither is treated as LLaVA (today's dirs; ``load_processor`` then explains what is missing)."""
    from workloads.families import FAMILIES, family_of

    model_type = _read_json(Path(processor_dir, "config.json")).get("model_type")
    if model_type:
        if model_type == LLAVA:
            return LLAVA
        try:
            return family_of(model_type).name
        except ValueError as e:
            raise ValueError(f"{processor_dir}/config.json: {e}") from None
    processor_class = _read_json(Path(processor_dir, "processor_config.json")).get(
        "processor_class")
    by_class = {f.processor_class: f.name for f in FAMILIES.values()}
    return by_class.get(processor_class, LLAVA)


def load_processor(processor_dir: str) -> ProcessorSpec:
    """Load the processor of ``processor_dir`` and check it is usable: a ``LlavaProcessor``
    through ``AutoProcessor`` (LLaVA-1.5 dirs), any other family through
    ``workloads.families.load_processor_parts`` (no torchvision needed)."""
    if not Path(processor_dir, "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{processor_dir} is not an HF processor dir (no "
                                f"tokenizer_config.json); point processor_dir at a saved model")
    family = processor_family(processor_dir)
    if family != LLAVA:
        return _load_family_processor(processor_dir, family)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(processor_dir)
    tok = getattr(proc, "tokenizer", None)
    if tok is None or getattr(proc, "patch_size", None) is None:
        raise ValueError(f"{processor_dir}: expected a LlavaProcessor with a tokenizer and "
                         f"patch_size, got {type(proc).__name__}; save one with "
                         f"workloads.data.processor.save_llava_processor")
    if not tok.chat_template:
        raise ValueError(f"{processor_dir}: the tokenizer has no chat_template")
    if tok.pad_token_id is None:
        raise ValueError(f"{processor_dir}: the tokenizer has no pad token")
    height, width = _image_size(proc.image_processor)
    image_token = getattr(proc, "image_token", "<image>")
    image_token_id = tok.convert_tokens_to_ids(image_token)
    if image_token_id is None or image_token_id == tok.unk_token_id:
        raise ValueError(f"{processor_dir}: {image_token!r} is not a token of the tokenizer")
    return ProcessorSpec(
        processor_dir=str(processor_dir), tokenizer=tok, image_processor=proc.image_processor,
        image_size=(height, width),
        num_image_tokens=num_image_tokens(
            height, width, proc.patch_size, proc.num_additional_image_tokens or 0,
            proc.vision_feature_select_strategy or "full"),
        image_token=image_token, image_token_id=int(image_token_id),
        pad_token_id=int(tok.pad_token_id))


def _load_family_processor(processor_dir: str, family: str) -> ProcessorSpec:
    from workloads.families import image_token_id as config_image_token_id
    from workloads.families import load_processor_parts

    parts = load_processor_parts(processor_dir, family)
    tok, fam = parts.tokenizer, parts.family
    if tok.pad_token_id is None:
        raise ValueError(f"{processor_dir}: the tokenizer has no pad token")
    if not tok.chat_template:
        raise ValueError(f"{processor_dir}: the tokenizer has no chat_template")
    token_id = tok.convert_tokens_to_ids(fam.image_token)
    if token_id is None or token_id == tok.unk_token_id:
        raise ValueError(f"{processor_dir}: {family}'s image token {fam.image_token!r} is not a "
                         f"token of the tokenizer; build it with workloads.families."
                         f"build_tokenizer")
    if Path(processor_dir, "config.json").exists():
        from transformers import AutoConfig

        expected = config_image_token_id(AutoConfig.from_pretrained(processor_dir))
        if expected != token_id:
            raise ValueError(f"{processor_dir}: config.json's image_token_id is {expected} but "
                             f"the tokenizer's {fam.image_token!r} is {token_id}; the model and "
                             f"its processor were saved from different tokenizers")
    fixed = fam.image_tokens == "fixed"
    return ProcessorSpec(
        processor_dir=str(processor_dir), tokenizer=tok, image_processor=parts.image_processor,
        image_size=_image_size(parts.image_processor) if fam.pixel_layout == "stack" else None,
        num_image_tokens=int(parts.settings["image_seq_length"])
        if fixed and "image_seq_length" in parts.settings else None,
        image_token=fam.image_token, image_token_id=int(token_id),
        pad_token_id=int(tok.pad_token_id), family=fam.name, parts=parts)


def save_llava_processor(tokenizer_dir: str, out_dir: str, image_size: int = 32,
                         patch_size: int = 8) -> str:
    """Save a ``LlavaProcessor`` (the tokenizer of ``tokenizer_dir`` + a Siglip image
    processor resizing to ``image_size``) to ``out_dir``: ``(image_size // patch_size)**2``
    image tokens, no CLS token, ``vision_feature_select_strategy="full"``."""
    from transformers import AutoTokenizer, LlavaProcessor

    try:
        from transformers import SiglipImageProcessorPil as ImageProcessor
    except ImportError:  # transformers builds without the PIL backend split
        from transformers import SiglipImageProcessor as ImageProcessor
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    image_processor = ImageProcessor(size={"height": image_size, "width": image_size},
                                     do_resize=True, do_rescale=True, do_normalize=True,
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          chat_template=tok.chat_template)
    proc.save_pretrained(out_dir)
    return out_dir
