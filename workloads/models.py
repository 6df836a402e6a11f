"""Build a LLaVA-style MLLM (vision tower → mlp2x_gelu projector → causal LLM) with transformers'
own classes, so every model mmkd writes loads with plain ``from_pretrained`` + ``AutoProcessor``.

Three mutually exclusive ways to name a model (``ModelSpec``):

- ``preset``: a random-init tiny config (``tiny-teacher``, ``tiny-student``) sized for CPU tests;
- ``path``: a LLaVA-format HF checkpoint directory (e.g. an upstream stage's ``model/``);
- ``parts``: a vision tower and an LLM by hub id or path, joined by a fresh projector. Hub ids are
  only resolved when the model is built, never by ``describe_model`` (``mmkd plan`` stays offline).

Part names used by ``set_trainable``: ``vision``, ``projector``, ``llm`` (LLM body + lm_head), and
for a JAM-Cross merge (``workloads.merging.cross``) also ``bridges`` — its new cross-attention and
fusion layers; there ``vision``/``projector``/``llm`` name those parts of both parent decoders.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "PRESETS", "PARTS", "ModelSpec", "PartsSpec", "ModelCompatError", "describe_model",
    "build_model", "build_processor", "load_model", "set_trainable", "model_parts",
    "count_params", "check_compat", "save_model", "save_processor",
]

PARTS = ("vision", "projector", "llm", "bridges")
IMAGE_TOKEN = "<image>"

# Tiny presets: 32×32 images, patch 8 → 16 image tokens for both, so visual-token KD can match
# positions. The teacher is ~10× the student so a few CPU minutes of training separate them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-teacher": {
        "vision": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8),
        "text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    },
    "tiny-student": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2, image_size=32, patch_size=8),
        "text": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512),
    },
}

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelCompatError(ValueError):
    """A model, its tokenizer and its image processor disagree; the message says what to change."""

    deterministic = True  # Ray Train raises it at once (workloads/errors.py)


class PartsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vision: str = Field(description="hub id or local path of a SigLIP/CLIP vision tower")
    llm: str = Field(description="hub id or local path of a causal LM (e.g. Qwen2)")
    projector: Literal["mlp2x_gelu"] = Field("mlp2x_gelu", description="projector type")


class ModelSpec(BaseModel):
    """Exactly one of ``preset``, ``path`` or ``parts``."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["tiny-teacher", "tiny-student"] | None = Field(
        None, description="random-init tiny model; vocab size = the tokenizer's")
    path: str | None = Field(None, description="LLaVA-format HF checkpoint dir")
    parts: PartsSpec | None = Field(None, description="vision tower + LLM joined by a new projector")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSpec":
        given = [k for k in ("preset", "path", "parts") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model: give exactly one of `preset`, `path` or `parts` (got {given or 'none'}); "
                f"e.g. `model: {{preset: tiny-student}}`")
        return self


def _is_local(ref: str) -> bool:
    return os.path.isabs(ref) or ref.startswith(".") or os.path.isdir(ref)


def describe_model(spec: ModelSpec | dict, vocab_size: int | None = None) -> dict[str, Any]:
    """Sizes of the model ``spec`` names, without building weights or downloading anything."""
    spec = ModelSpec.model_validate(spec)
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

        cfg = AutoConfig.from_pretrained(spec.path)
        v, t = cfg.vision_config, cfg.text_config
        return {"kind": "path", "path": spec.path, "exists": True,
                "vision": {"model_type": v.model_type, "hidden_size": v.hidden_size,
                           "num_hidden_layers": v.num_hidden_layers, "image_size": v.image_size},
                "llm": {"model_type": t.model_type, "hidden_size": t.hidden_size,
                        "num_hidden_layers": t.num_hidden_layers, "vocab_size": t.vocab_size},
                "projector": "mlp2x_gelu"}
    parts = spec.parts
    return {"kind": "parts", "vision": {"ref": parts.vision, "local": _is_local(parts.vision)},
            "llm": {"ref": parts.llm, "local": _is_local(parts.llm)}, "projector": parts.projector}


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
        return load_model(spec.path, tokenizer_dir)
    if not tokenizer_dir:
        raise ModelCompatError("model: a preset or parts model needs a tokenizer; give the stage "
                               "input `tokenizer: <tokenizer stage>.tokenizer`")
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
    """Load a LLaVA-format checkpoint dir and its processor (saved beside it by ``save_model``)."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from workloads.merging.io import MERGED_META, load_merged, merged_kind

    if not os.path.exists(os.path.join(path, "config.json")) and \
            not os.path.exists(os.path.join(path, MERGED_META)):
        raise ModelCompatError(f"model path {path!r} has no config.json; point `model.path` (or the "
                               f"stage input `init`) at a directory written by save_pretrained")
    kind = merged_kind(path)
    if kind is not None:
        if kind != "cross":
            raise ModelCompatError(f"model path {path!r} is a {kind!r} merge, which has no "
                                   f"weights of its own to train; fine-tune its experts before "
                                   f"merging, or start from a plain checkpoint")
        model = load_merged(path)
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


def _sync_generation_config(model: Any, tokenizer: Any) -> None:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    eos = [tokenizer.eos_token_id]
    if "<|im_end|>" in tokenizer.get_vocab():
        eos.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    gc.eos_token_id = [e for e in eos if e is not None]


def check_compat(model: Any, processor: Any) -> None:
    """Raise ModelCompatError when model, tokenizer and image processor disagree."""
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


def model_parts(model: Any) -> dict[str, list[Any]]:
    """Part name → modules (transformers 5 attribute names). A JAM-Cross merge maps each part
    over both parent decoders and adds ``bridges`` (its new layers)."""
    if hasattr(model, "new_parameters") and hasattr(model, "decoders"):
        per = [model_parts(d) for d in model.decoders]
        parts = {k: [m for p in per for m in p[k]] for k in ("vision", "projector", "llm")}
        parts["bridges"] = [model.bridges_ab, model.bridges_ba, model.fusion]
        return parts
    inner = model.model
    return {"vision": [inner.vision_tower], "projector": [inner.multi_modal_projector],
            "llm": [inner.language_model, model.lm_head]}


def set_trainable(model: Any, train: list[str]) -> dict[str, int]:
    """Freeze every part not in ``train``; returns trainable parameter counts per part."""
    unknown = sorted(set(train) - set(PARTS))
    if unknown or not train:
        raise ValueError(f"train: parts must be a non-empty subset of {list(PARTS)}, got {train}")
    parts = model_parts(model)
    if "bridges" in train and "bridges" not in parts:
        raise ValueError("train: `bridges` are the new layers of a JAM-Cross merge; start the "
                         "stage from one (input `init: <cross merge stage>.model`) or train "
                         "vision / projector / llm")
    counts = {}
    for name, modules in parts.items():
        on = name in train
        n = 0
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(on)
                n += p.numel() if on else 0
        counts[name] = n
    return counts


def count_params(model: Any) -> dict[str, int]:
    out = {name: sum(p.numel() for m in mods for p in m.parameters())
           for name, mods in model_parts(model).items()}
    out["total"] = sum(out.values())
    return out


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
