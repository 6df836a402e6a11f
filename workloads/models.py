"""Build a LLaVA-style MLLM (vision tower → mlp2x_gelu projector → causal LLM) with transformers'
own classes, so every model mmkd writes loads with plain ``from_pretrained`` + ``AutoProcessor``.

Three mutually exclusive ways to name a model (``ModelSpec``):

- ``preset``: a random-init tiny config (``tiny-teacher``, ``tiny-student``) sized for CPU tests;
- ``path``: a LLaVA-format HF checkpoint directory (e.g. an upstream stage's ``model/``);
- ``parts``: a vision tower and an LLM by hub id or path, joined by a fresh projector. Hub ids are
  only resolved when the model is built, never by ``describe_model`` (``mmkd plan`` stays offline).

``family`` (``workloads.families``) names another Hugging Face VLM family: with ``preset`` a
random-init tiny model of that family (``families.tiny_model``); with ``path`` a check that the
checkpoint is of that family. ``family: llava`` (or none) is the LLaVA-1.5 path above, unchanged
(cache keys too: a spec without a family dumps without the field). A ``path`` of any family loads
by its ``config.json`` ``model_type``, with ``AutoModelForImageTextToText`` and a
``FamilyProcessor`` (``workloads/families/adapter.py``; no torchvision needed).

Part names used by ``set_trainable``: ``vision``, ``projector``, ``llm`` (LLM body + lm_head; in a
family model each parameter by ``families.parameter_part``), and for a JAM-Cross merge
(``workloads.merging.cross``) also ``bridges`` — its new cross-attention and fusion layers; there
``vision``/``projector``/``llm`` name those parts of both parent decoders.
"""

from __future__ import annotations

import os
from typing import Any

from workloads.model_parts import count_params, model_parts, part_parameters, set_trainable
from workloads.model_spec import (PARTS, PRESETS, ModelCompatError, ModelSpec, PartsSpec,
                                  check_family, checkpoint_family, is_local)

__all__ = [
    "PRESETS", "PARTS", "ModelSpec", "PartsSpec", "ModelCompatError", "describe_model",
    "build_model", "build_processor", "load_model", "set_trainable", "model_parts",
    "part_parameters", "count_params", "check_compat", "save_model", "save_processor",
    "checkpoint_family",
]

IMAGE_TOKEN = "<image>"

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def describe_model(spec: ModelSpec | dict, vocab_size: int | None = None) -> dict[str, Any]:
    """Sizes of the model ``spec`` names, without building weights or downloading anything."""
    spec = ModelSpec.model_validate(spec)
    if spec.preset and spec.family:
        from workloads.families.adapter import describe_family_preset

        return describe_family_preset(spec.family, spec.preset, vocab_size)
    if spec.preset:
        p = PRESETS[spec.preset]
        out = {"kind": "preset", "name": spec.preset, "vision": dict(p["vision"]),
               "llm": dict(p["text"]), "projector": "mlp2x_gelu",
               "image_tokens": (p["vision"]["image_size"] // p["vision"]["patch_size"]) ** 2}
        if vocab_size:
            out["params"] = count_params(_preset_model(spec.preset, vocab_size, image_token_id=0,
                                                       meta=True))
        return out
    if spec.path:
        cfg_file = os.path.join(spec.path, "config.json")
        if not os.path.exists(cfg_file):
            return {"kind": "path", "path": spec.path, "exists": False}
        from transformers import AutoConfig

        family = checkpoint_family(spec.path)
        check_family(spec, family)
        cfg = AutoConfig.from_pretrained(spec.path)
        if family is not None:
            from workloads.families import get_family
            from workloads.families.adapter import describe_family_config

            return {"kind": "path", "path": spec.path, "exists": True,
                    **describe_family_config(get_family(family), cfg)}
        v, t = cfg.vision_config, cfg.text_config
        return {"kind": "path", "path": spec.path, "exists": True,
                "vision": {"model_type": v.model_type, "hidden_size": v.hidden_size,
                           "num_hidden_layers": v.num_hidden_layers, "image_size": v.image_size},
                "llm": {"model_type": t.model_type, "hidden_size": t.hidden_size,
                        "num_hidden_layers": t.num_hidden_layers, "vocab_size": t.vocab_size},
                "projector": "mlp2x_gelu"}
    parts = spec.parts
    return {"kind": "parts", "vision": {"ref": parts.vision, "local": is_local(parts.vision)},
            "llm": {"ref": parts.llm, "local": is_local(parts.llm)}, "projector": parts.projector}


def _llava_config(vision_cfg: Any, text_cfg: Any, image_token_id: int) -> Any:
    from transformers import LlavaConfig

    n_img = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_token_id,
        image_seq_length=n_img,
        # SigLIP has no CLS token: keep every patch; take the last layer's patch features.
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def _preset_model(name: str, vocab_size: int, image_token_id: int, pad_token_id: int | None = None,
                  eos_token_id: int | None = None, meta: bool = False) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    p = PRESETS[name]
    vision = SiglipVisionConfig(**p["vision"], vision_use_head=False)
    text = Qwen2Config(**p["text"], vocab_size=vocab_size, tie_word_embeddings=False,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)
    cfg = _llava_config(vision, text, image_token_id)
    if meta:
        with torch.device("meta"):
            return LlavaForConditionalGeneration(cfg)
    return LlavaForConditionalGeneration(cfg)


def build_processor(tokenizer: Any, image_size: int, patch_size: int) -> Any:
    """A LlavaProcessor that resizes to ``image_size`` and expands ``<image>`` to one token per patch."""
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ModelCompatError(
            f"tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token when training the "
            f"tokenizer (the model replaces each {IMAGE_TOKEN} with one image patch feature)")
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          chat_template=template, image_token=IMAGE_TOKEN)


def build_model(spec: ModelSpec | dict, tokenizer_dir: str | None = None) -> tuple[Any, Any]:
    """Return ``(model, processor)`` for ``spec``. Presets and parts need ``tokenizer_dir``."""
    spec = ModelSpec.model_validate(spec)
    if spec.path:
        check_family(spec, checkpoint_family(spec.path))
        return load_model(spec.path, tokenizer_dir)
    if not tokenizer_dir:
        raise ModelCompatError("model: a preset or parts model needs a tokenizer; give the stage "
                               "input `tokenizer: <tokenizer stage>.tokenizer`")
    if spec.family:
        return _family_preset(spec.family, spec.preset, tokenizer_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ModelCompatError(f"tokenizer {tokenizer_dir} has no {IMAGE_TOKEN!r} token; retrain it "
                               f"with {IMAGE_TOKEN} among its special tokens")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if spec.preset:
        model = _preset_model(spec.preset, len(tokenizer), image_token_id,
                              tokenizer.pad_token_id, tokenizer.eos_token_id)
    else:
        model = _from_parts(spec.parts, tokenizer, image_token_id)
    v = model.config.vision_config
    processor = build_processor(tokenizer, v.image_size, v.patch_size)
    _sync_generation_config(model, tokenizer)
    check_compat(model, processor)
    return model, processor


def _family_preset(family: str, preset: str, tokenizer_dir: str) -> tuple[Any, Any]:
    import torch

    from workloads.families.adapter import build_family_preset

    # Seeded from torch's RNG, as the LLaVA presets' init is: the stage seed decides the weights.
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    model, processor = build_family_preset(family, preset, tokenizer_dir, seed)
    check_compat(model, processor)
    return model, processor


def _from_parts(parts: PartsSpec, tokenizer: Any, image_token_id: int) -> Any:
    # Loads pretrained towers (downloads hub ids when the machine can); only the projector is new.
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlavaForConditionalGeneration

    vcfg = AutoConfig.from_pretrained(parts.vision)
    vcfg = getattr(vcfg, "vision_config", vcfg)
    tcfg = AutoConfig.from_pretrained(parts.llm)
    model = LlavaForConditionalGeneration(_llava_config(vcfg, tcfg, image_token_id))
    vision = AutoModel.from_pretrained(parts.vision)
    vision = getattr(vision, "vision_model", vision)
    model.model.vision_tower.load_state_dict(
        {k.removeprefix("vision_model."): v for k, v in vision.state_dict().items()}, strict=False)
    llm = AutoModelForCausalLM.from_pretrained(parts.llm)
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    return model


def load_model(path: str, tokenizer_dir: str | None = None) -> tuple[Any, Any]:
    """Load a checkpoint dir and its processor (saved beside it by ``save_model``): LLaVA-1.5
    (and JAM-Cross merges) as before; any other family by its config's ``model_type`` with
    ``AutoModelForImageTextToText`` + ``FamilyProcessor``."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from workloads.merging.io import MERGED_META, merged_kind

    if not os.path.exists(os.path.join(path, "config.json")) and \
            not os.path.exists(os.path.join(path, MERGED_META)):
        raise ModelCompatError(f"model path {path!r} has no config.json; point `model.path` (or the "
                               f"stage input `init`) at a directory written by save_pretrained")
    kind = merged_kind(path)
    family = checkpoint_family(path) if kind is None else None
    if family is not None:
        return _load_family(path, family)
    if kind is not None:
        if kind != "cross":
            raise ModelCompatError(f"model path {path!r} is a {kind!r} merge, which has no "
                                   f"weights of its own to train; fine-tune its experts before "
                                   f"merging, or start from a plain checkpoint")
        from workloads.merging.io import load_any_model

        model, processor = load_any_model(path)  # the family's processor for a family merge
        if not hasattr(processor, "prompt"):
            check_compat(model, processor)
        return model, processor
    else:
        model = LlavaForConditionalGeneration.from_pretrained(path)
    if os.path.exists(os.path.join(path, "processor_config.json")) or not tokenizer_dir:
        processor = AutoProcessor.from_pretrained(path)
    else:
        v = model.config.vision_config
        processor = build_processor(AutoTokenizer.from_pretrained(tokenizer_dir), v.image_size,
                                    v.patch_size)
    check_compat(model, processor)
    return model, processor


def _load_family(path: str, family: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText

    from workloads.families.adapter import FamilyProcessor

    if not any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelCompatError(f"model path {path!r} ({family}) has no tokenizer or processor "
                               f"files; save the model with save_model (or copy the processor "
                               f"files of the checkpoint it came from beside it)")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = FamilyProcessor.from_pretrained(path, family)
    _sync_generation_config(model, processor.tokenizer, processor.family)
    check_compat(model, processor)
    return model, processor


def _sync_generation_config(model: Any, tokenizer: Any, family: Any = None) -> None:
    """Pad with the tokenizer's pad token; stop on eos and the end-of-turn tokens (the
    family's; ``<|im_end|>`` for LLaVA-1.5). A family checkpoint keeps its own stop ids too."""
    if family is not None:
        from workloads.families.adapter import sync_generation_config

        return sync_generation_config(model, tokenizer, family)
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    eos = [tokenizer.eos_token_id]
    if "<|im_end|>" in tokenizer.get_vocab():
        eos.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    gc.eos_token_id = [e for e in eos if e is not None]


def check_compat(model: Any, processor: Any) -> None:
    """Raise ModelCompatError when model, tokenizer and image processor disagree."""
    from workloads.families.adapter import FamilyProcessor, family_compat_problems

    if isinstance(processor, FamilyProcessor):
        problems = family_compat_problems(model, processor)
        if problems:
            raise ModelCompatError(f"{processor.family.name} model/processor mismatch: "
                                   + "; ".join(problems))
        return
    problems = []
    tok, cfg = processor.tokenizer, model.config
    vocab = tok.get_vocab()
    if IMAGE_TOKEN not in vocab:
        problems.append(f"tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token")
    elif vocab[IMAGE_TOKEN] != cfg.image_token_id:
        problems.append(f"model.config.image_token_id={cfg.image_token_id} but the tokenizer's "
                        f"{IMAGE_TOKEN} id is {vocab[IMAGE_TOKEN]}; rebuild the model with this tokenizer")
    if len(tok) > cfg.text_config.vocab_size:
        problems.append(f"tokenizer has {len(tok)} tokens but the LLM's vocab_size is "
                        f"{cfg.text_config.vocab_size}; resize the embeddings or use the model's tokenizer")
    size = processor.image_processor.size
    vis = cfg.vision_config.image_size
    if (size.get("height"), size.get("width")) != (vis, vis):
        problems.append(f"image processor resizes to {size} but the vision tower expects {vis}×{vis}; "
                        f"set the processor size to {vis}")
    if getattr(processor, "patch_size", None) != cfg.vision_config.patch_size:
        problems.append(f"processor patch_size={getattr(processor, 'patch_size', None)} != vision "
                        f"tower patch_size={cfg.vision_config.patch_size}")
    if problems:
        raise ModelCompatError("model/processor mismatch: " + "; ".join(problems))


def save_model(model: Any, processor: Any, out_dir: str, state_dict: dict | None = None) -> str:
    """Write ``model`` (+ processor) to ``out_dir`` atomically: a temp dir beside it, then rename."""
    from workloads.fsutil import atomic_dir

    with atomic_dir(out_dir) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        else:  # a merged wrapper (JAM-Cross) writes its own layout
            if state_dict is not None:
                model.load_state_dict(state_dict)
            model.save(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def save_processor(spec: ModelSpec | dict, tokenizer_dir: str | None, out_dir: str) -> str:
    """Write the processor ``spec``'s model will use to ``out_dir`` without building weights
    (the data layer's preprocessing reads image size and image-token count from it)."""
    spec = ModelSpec.model_validate(spec)
    from transformers import AutoProcessor, AutoTokenizer

    family = checkpoint_family(spec.path) if spec.path else spec.family
    if spec.path:
        check_family(spec, family)
    if family is not None:
        from workloads.families import save_processor_parts, tiny_processor_parts
        from workloads.families.adapter import FamilyProcessor

        if spec.path:  # the checkpoint's own processor files
            FamilyProcessor.from_pretrained(spec.path, family).save_pretrained(out_dir)
            return out_dir
        if not tokenizer_dir:
            raise ModelCompatError(f"model: a {family} preset needs a tokenizer input")
        # the tiny models' image geometry, which teacher and student share
        return save_processor_parts(tiny_processor_parts(family, tokenizer_dir), out_dir)
    if spec.path and os.path.exists(os.path.join(spec.path, "processor_config.json")):
        processor = AutoProcessor.from_pretrained(spec.path)
    else:
        if not tokenizer_dir:
            raise ModelCompatError("model: a preset or parts model needs a tokenizer input")
        if spec.preset:
            v = PRESETS[spec.preset]["vision"]
            size, patch = v["image_size"], v["patch_size"]
        else:
            from transformers import AutoConfig

            ref = spec.path or spec.parts.vision
            vcfg = AutoConfig.from_pretrained(ref)
            vcfg = getattr(vcfg, "vision_config", vcfg)
            size, patch = vcfg.image_size, vcfg.patch_size
        processor = build_processor(AutoTokenizer.from_pretrained(tokenizer_dir), size, patch)
    processor.save_pretrained(out_dir)
    return out_dir
