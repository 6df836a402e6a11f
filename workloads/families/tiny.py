"""Random-init tiny models of every family, from configs alone (no hub).

Teacher and student of one family share the tokenizer and the *image geometry* (image size,
patch size, merge/pooling, tiling), so the same image gives the same image-token count and the
same ``input_ids`` in both; only widths and depths differ. Sizes suit CPU tests (hidden <= 64).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from workloads.families.table import Family, get_family, image_token_id

__all__ = ["TINY_SIZES", "tiny_config", "tiny_image_processor_kwargs", "tiny_model",
           "tiny_processor_parts", "build_tiny"]

Role = Literal["teacher", "student"]

# head_dim 16 in both roles (Qwen's M-RoPE sections below sum to head_dim / 2).
TINY_SIZES: dict[str, dict[str, int]] = {
    "teacher": dict(vision_hidden=64, vision_layers=2, vision_heads=4, text_hidden=64,
                    text_layers=2, text_heads=4, kv_heads=2),
    "student": dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32,
                    text_layers=1, text_heads=2, kv_heads=1),
}
HEAD_DIM = 16
IMAGE = 32          # tile / base image side in pixels
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # NeXT / OneVision any-res grids


def tiny_image_processor_kwargs(family: Family | str) -> dict[str, Any]:
    """Image processor settings matching the tiny vision towers (``IMAGE``-pixel tiles)."""
    name = (get_family(family) if isinstance(family, str) else family).name
    if name == "llava" or name == "gemma3":
        return {"size": {"height": IMAGE, "width": IMAGE}}
    if name == "llava_next":
        return {"size": {"shortest_edge": IMAGE}, "crop_size": {"height": IMAGE, "width": IMAGE},
                "image_grid_pinpoints": PINPOINTS}
    if name == "llava_onevision":
        return {"size": {"height": IMAGE, "width": IMAGE}, "image_grid_pinpoints": PINPOINTS}
    if name.startswith("qwen"):
        # patch 8 x merge 2: images resize to multiples of 16 px, between 32x32 and 64x64 pixels
        return {"patch_size": 8, "merge_size": 2, "temporal_patch_size": 2,
                "size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}}
    if name == "internvl":
        return {"size": {"height": IMAGE, "width": IMAGE}, "crop_to_patches": True,
                "min_patches": 1, "max_patches": 4}
    if name in ("idefics3", "smolvlm"):
        return {"size": {"longest_edge": 2 * IMAGE}, "max_image_size": {"longest_edge": IMAGE},
                "do_image_splitting": True}
    raise ValueError(f"no tiny image processor for family {name!r}")


def _ids(tokenizer: Any, family: Family) -> dict[str, int]:
    named = dict(family.named_tokens)
    return {k: tokenizer.convert_tokens_to_ids(v) for k, v in named.items()}


def _text(s: dict[str, int], tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=len(tokenizer), hidden_size=s["text_hidden"],
                intermediate_size=2 * s["text_hidden"], num_hidden_layers=s["text_layers"],
                num_attention_heads=s["text_heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **extra)


def _vision(s: dict[str, int], **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=s["vision_hidden"], intermediate_size=2 * s["vision_hidden"],
                num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"], **extra)


def tiny_config(family: Family | str, role: Role, tokenizer: Any) -> Any:
    """The config of a tiny ``role`` model of ``family`` for ``tokenizer`` (its vocab and ids)."""
    import transformers

    family = get_family(family) if isinstance(family, str) else family
    if role not in TINY_SIZES:
        raise ValueError(f"role must be one of {sorted(TINY_SIZES)}, got {role!r}")
    s, ids, name = TINY_SIZES[role], _ids(tokenizer, family), family.name
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}
    siglip = dict(model_type="siglip_vision_model", vision_use_head=False)
    if name in ("llava", "llava_next", "llava_onevision"):
        kw: dict[str, Any] = dict(
            vision_config=_vision(s, image_size=IMAGE, patch_size=8, **siglip),
            text_config=dict(model_type="qwen2", **_text(s, tokenizer)),
            image_token_index=ids["image_token"],
            # SigLIP has no CLS token: keep every patch of the last layer
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            tie_word_embeddings=False)
        if name != "llava":
            kw["image_grid_pinpoints"] = PINPOINTS
        if name == "llava_onevision":
            kw["video_token_index"] = ids["video_token"]
    elif name.startswith("qwen"):
        q = dict(image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                 vision_start_token_id=ids["vision_start_token"],
                 vision_end_token_id=ids["vision_end_token"], tie_word_embeddings=False)
        geometry = dict(patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
        vh, depth = s["vision_hidden"], s["vision_layers"]
        if name == "qwen2_vl":
            vision = dict(depth=depth, embed_dim=vh, hidden_size=s["text_hidden"],
                          num_heads=s["vision_heads"], mlp_ratio=2, **geometry)
        elif name == "qwen2_5_vl":
            vision = dict(depth=depth, hidden_size=vh, intermediate_size=2 * vh,
                          num_heads=s["vision_heads"], out_hidden_size=s["text_hidden"],
                          window_size=32, fullatt_block_indexes=[depth - 1], **geometry)
        else:
            vision = dict(depth=depth, hidden_size=vh, intermediate_size=2 * vh,
                          num_heads=s["vision_heads"], out_hidden_size=s["text_hidden"],
                          num_position_embeddings=16, deepstack_visual_indexes=[0], **geometry)
            mrope["mrope_interleaved"] = True
        kw = dict(vision_config=vision, text_config=_text(
            s, tokenizer, head_dim=HEAD_DIM, rope_parameters=mrope), **q)
    elif name == "internvl":
        kw = dict(vision_config=_vision(s, image_size=[IMAGE, IMAGE], patch_size=[4, 4]),
                  text_config=dict(model_type="qwen2", **_text(s, tokenizer)),
                  image_token_id=ids["context_image_token"], downsample_ratio=0.5,
                  image_seq_length=(IMAGE // 4) ** 2 // 4, tie_word_embeddings=False)
    elif name in ("idefics3", "smolvlm"):
        kw = dict(vision_config=_vision(s, image_size=IMAGE, patch_size=4),
                  text_config=dict(model_type="llama", **_text(s, tokenizer)),
                  image_token_id=ids["image_token"], scale_factor=2, tie_word_embeddings=False)
    elif name == "gemma3":
        kw = dict(vision_config=_vision(s, image_size=IMAGE, patch_size=4, **siglip),
                  text_config=dict(model_type="gemma3_text", **_text(
                      s, tokenizer, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                      sliding_window=64)),
                  mm_tokens_per_image=16, boi_token_index=ids["boi_token"],
                  eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"],
                  tie_word_embeddings=False)
    else:
        raise ValueError(f"no tiny config for family {name!r}")
    return getattr(transformers, family.config_class)(**kw)


def tiny_model(family: Family | str, role: Role, tokenizer: Any, seed: int = 0) -> Any:
    """A random-init tiny model; generation stops on eos and the family's end-of-turn tokens."""
    import torch
    import transformers

    family = get_family(family) if isinstance(family, str) else family
    config = tiny_config(family, role, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    if family.name == "gemma3":
        # Gemma 3 initialises its projection to zeros: such a model ignores the image.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            proj.normal_(0.0, config.initializer_range)
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    eos = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in family.end_of_turn]
    gc.eos_token_id = [e for e in dict.fromkeys(eos) if e is not None]
    if image_token_id(config) != tokenizer.convert_tokens_to_ids(family.image_token):
        raise ValueError(f"{family.name}: the tokenizer has no {family.image_token!r} token; build "
                         f"it with workloads.families.build_tokenizer")
    return model


def tiny_processor_parts(family: Family | str, tokenizer_file: str) -> Any:
    """The ``ProcessorParts`` of the tiny models of ``family`` (one for teacher and student)."""
    from workloads.families.processing import (build_image_processor, build_tokenizer,
                                               make_processor_parts)

    family = get_family(family) if isinstance(family, str) else family
    tokenizer = build_tokenizer(family, tokenizer_file)
    image_processor = build_image_processor(family, **tiny_image_processor_kwargs(family))
    # settings depend on the image geometry only, which both roles share
    return make_processor_parts(family, tokenizer, image_processor,
                                tiny_config(family, "student", tokenizer))


def build_tiny(family: Family | str, role: Role, tokenizer_file: str, out_dir: str,
               seed: int = 0) -> str:
    """Write a random-init tiny ``role`` model of ``family`` and its processor files to
    ``out_dir`` (``save_pretrained`` layout; reloads with ``AutoModelForImageTextToText``).
    ``tokenizer_file``: mmkd's trained tokenizer (its dir or its ``tokenizer.json``)."""
    from workloads.families.processing import save_processor_parts

    parts = tiny_processor_parts(family, tokenizer_file)
    model = tiny_model(parts.family, role, parts.tokenizer, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor_parts(parts, out_dir)
    return out_dir
