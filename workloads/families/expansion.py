"""Image-token expansion per family: what one image's placeholder becomes in the text.

Each function ports its processor's ``replace_image_token`` (transformers 5.24) so expansion runs
from the tokenizer and the (PIL) image processor alone — the full processors of Qwen-VL, InternVL,
LLaVA-OneVision and SmolVLM need a torchvision video processor. ``tests/unit/test_families.py``
checks every function against its processor class's own method.

Signature of each: ``(tokens, settings, image_processor, processed, idx) -> str`` where
``tokens`` maps a tokenizer attribute name (``image_token``, ...) to its string, ``settings`` are
the processor's own kwargs (``processor_config.json``), ``processed`` is the image processor's
output for all images of one sample and ``idx`` the image's index in it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

Expansion = Callable[[dict[str, str], dict[str, Any], Any, dict[str, Any], int], str]


def _hw(x: Any) -> tuple[int, int]:
    h, w = (x.tolist() if hasattr(x, "tolist") else list(x))[-2:]
    return int(h), int(w)


def llava(tokens, settings, image_processor, processed, idx) -> str:
    # LlavaProcessor: one token per patch of the resized image (+ CLS, minus it for "default").
    h, w = _hw(processed["pixel_values"][idx].shape)
    patch = settings["patch_size"]
    n = (h // patch) * (w // patch) + settings.get("num_additional_image_tokens", 0)
    if settings.get("vision_feature_select_strategy") == "default":
        n -= 1
    return tokens["image_token"] * n


def _unpadded(orig_h: int, orig_w: int, patches_h: int, patches_w: int, scale_h: int,
              scale_w: int) -> tuple[int, int, int]:
    """Grid rows/cols left after removing the padding of an any-res image (LLaVA-NeXT)."""
    cur_h, cur_w = patches_h * scale_h, patches_w * scale_w
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    return cur_h, cur_w, cur_h * cur_w


def _best_scale(image_processor, orig: tuple[int, int], tile: tuple[int, int]) -> tuple[int, int]:
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution(list(orig), image_processor.image_grid_pinpoints)
    return best_h // tile[0], best_w // tile[1]


def llava_next(tokens, settings, image_processor, processed, idx) -> str:
    # LlavaNextProcessor: base tile + the unpadded high-res grid + one newline token per grid row.
    orig = _hw(processed["image_sizes"][idx])
    tile = _hw(processed["pixel_values"][0][0].shape)
    scale_h, scale_w = _best_scale(image_processor, orig, tile)
    patch = settings["patch_size"]
    ph, pw = tile[0] // patch, tile[1] // patch
    rows, _, unpadded = _unpadded(*orig, ph, pw, scale_h, scale_w)
    n = unpadded + rows + ph * pw + settings.get("num_additional_image_tokens", 0)
    if settings.get("vision_feature_select_strategy") == "default":
        n -= 1
    return tokens["image_token"] * n


def llava_onevision(tokens, settings, image_processor, processed, idx) -> str:
    # LlavaOnevisionProcessor, single-image samples (mmkd's data has at most one image each);
    # like NeXT, but a grid larger than anyres_max_N tiles is pooled down.
    n_per_sample = processed.get("batch_num_images", [1])
    if list(n_per_sample) != [1] * len(n_per_sample):
        raise ValueError("llava_onevision: only one image per sample is supported (multi-image "
                         "samples take a different, unpadded layout)")
    orig = _hw(processed["image_sizes"][idx])
    tile = _hw(processed["pixel_values"][0][0].shape)
    scale_h, scale_w = _best_scale(image_processor, orig, tile)
    side = int(math.sqrt(settings["num_image_tokens"]))
    cur_h, cur_w, unpadded = _unpadded(*orig, side, side, scale_h, scale_w)
    rows = cur_h
    max_tiles = int(settings.get("vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
    if ratio > 1.1:
        unpadded = int(cur_h // ratio) * int(cur_w // ratio)
        rows = int(cur_h // ratio)
    n = unpadded + rows + settings["num_image_tokens"]
    if settings.get("vision_feature_select_strategy") == "default":
        n -= 1
    return tokens["image_token"] * n


def qwen_vl(tokens, settings, image_processor, processed, idx) -> str:
    # Qwen2/2.5/3-VL: one token per merge_size x merge_size block of patches.
    grid = processed["image_grid_thw"][idx]
    n = int(math.prod(int(v) for v in grid)) // image_processor.merge_size**2
    return tokens["image_token"] * n


def internvl(tokens, settings, image_processor, processed, idx) -> str:
    # InternVLProcessor: <img> + image_seq_length context tokens per tile + </img>.
    n = settings["image_seq_length"] * int(processed["num_patches"][idx])
    return tokens["start_image_token"] + tokens["context_image_token"] * n + tokens["end_image_token"]


def idefics3(tokens, settings, image_processor, processed, idx) -> str:
    # Idefics3Processor / SmolVLMProcessor: a <row_r_col_c> block per tile, then the global image.
    rows = [r for per_sample in processed["rows"] for r in per_sample][idx]
    cols = [c for per_sample in processed["cols"] for c in per_sample][idx]
    fake, image = tokens["fake_image_token"], tokens["image_token"]
    seq = image * settings["image_seq_len"]
    glob = f"{fake}{tokens['global_image_token']}{seq}{fake}"
    if rows == 0 and cols == 0:
        return glob
    text = ""
    for r in range(rows):
        text += "".join(f"{fake}<row_{r + 1}_col_{c + 1}>{seq}" for c in range(cols)) + "\n"
    return text + "\n" + glob


def gemma3(tokens, settings, image_processor, processed, idx) -> str:
    # Gemma3Processor: the begin-of-image placeholder becomes \n\n<boi> soft tokens <eoi>\n\n.
    full = (f"\n\n{tokens['boi_token']}{tokens['image_token'] * settings['image_seq_length']}"
            f"{tokens['eoi_token']}\n\n")
    crops = int(processed.get("num_crops", [0] * (idx + 1))[idx])
    if not crops:
        return full
    return (f"Here is the original image {full} and here are some crops to help you see better "
            + " ".join([full] * crops))
