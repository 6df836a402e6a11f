"""The HF processor directory as the single description of how samples are preprocessed.

Every model directory carries a ``LlavaProcessor`` (tokenizer + image processor + patch size);
``ProcessorSpec`` reads from it the few facts preprocessing needs, above all the number of
image tokens ``LlavaForConditionalGeneration`` will expect per ``<image>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ProcessorSpec", "load_processor", "save_llava_processor", "num_image_tokens"]


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
    """What preprocessing needs from a processor dir (built once per worker process)."""

    processor_dir: str
    tokenizer: Any
    image_processor: Any
    image_size: tuple[int, int]
    num_image_tokens: int
    image_token: str
    image_token_id: int
    pad_token_id: int


def load_processor(processor_dir: str) -> ProcessorSpec:
    """Load ``AutoProcessor`` from ``processor_dir`` and check it is usable for LLaVA data."""
    from transformers import AutoProcessor

    if not Path(processor_dir, "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{processor_dir} is not an HF processor dir (no "
                                f"tokenizer_config.json); point processor_dir at a saved model")
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
