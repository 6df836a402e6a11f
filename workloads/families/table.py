"""The family table: everything mmkd needs to know about one Hugging Face VLM family, in one place.

A *family* is one ``*ForConditionalGeneration`` class of transformers (5.24) and its processor
rules. Facts checked here by building tiny models (``tests/unit/test_families.py``):

- parts: every parameter name maps to exactly one of vision / projector / llm by its longest
  matching prefix (Qwen's projector lives inside the vision module, ``model.visual.merger``;
  NeXT's ``model.image_newline`` belongs to the projector);
- the image mask uses ``config.image_token_id`` (``image_token_index`` in older configs) —
  Gemma3Processor's own ``image_token_id`` is the begin-of-image token, not the soft token;
- the processors of Qwen2/2.5/3-VL, InternVL, LLaVA-OneVision and SmolVLM need a video processor,
  hence torchvision (CUDA-only wheels on the registry): their inputs are built from the tokenizer
  + PIL image processor (``workloads.families.processing``), equal to the processor's own output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from workloads.families import expansion

__all__ = ["Family", "FAMILIES", "PART_NAMES", "PIXEL_LAYOUTS", "get_family", "family_of",
           "image_token_id", "parameter_part", "processor_settings"]

PART_NAMES = ("vision", "projector", "llm")

# How one sample's pixel values stack into a batch (workloads.families.processing.collate):
PIXEL_LAYOUTS = {
    "stack": "one fixed-size tensor per image: [n_images, 3, H, W]",
    "concat": "a variable number of rows per image, concatenated over the batch: Qwen "
              "[sum patches, C*T*P*P] with image_grid_thw, InternVL [sum tiles, 3, H, W]",
    "pad_tiles": "tiles per image padded to the batch's most: [n_images, max_tiles, 3, H, W] "
                 "with image_sizes (the model counts the real tiles from image_sizes)",
    "pad_sample_tiles": "tiles per sample padded to the batch's most: [batch, max_tiles, 3, H, W] "
                        "with pixel_attention_mask (all-zero tiles are dropped by the model)",
}


def _chatml(image_placeholder: str) -> str:
    # mmkd's tokenizer template (workloads/data/tokenizer.py), taking HF list-of-items content too.
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + image_placeholder +
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# Idefics3 / SmolVLM's own template (``User:<image>...<end_of_utterance>\nAssistant: ...``).
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_IDEFICS3_TOKENS = (("fake_image_token", "<fake_token_around_image>"), ("image_token", "<image>"),
                    ("global_image_token", "<global-img>"),
                    ("end_of_utterance_token", "<end_of_utterance>"))
_ROW_COL = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
_LLAVA_PARTS = (("vision", ("model.vision_tower.",)),
                ("projector", ("model.multi_modal_projector.",)),
                ("llm", ("model.language_model.", "lm_head.")))
_NEXT_PARTS = (("vision", ("model.vision_tower.",)),
               ("projector", ("model.multi_modal_projector.", "model.image_newline")),
               ("llm", ("model.language_model.", "lm_head.")))
_QWEN_PARTS = (("vision", ("model.visual.",)),
               ("projector", ("model.visual.merger.",)),
               ("llm", ("model.language_model.", "lm_head.")))
_QWEN_TOKENS = (("image_token", "<|image_pad|>"), ("video_token", "<|video_pad|>"),
                ("vision_start_token", "<|vision_start|>"), ("vision_end_token", "<|vision_end|>"))


@dataclass(frozen=True)
class Family:
    """One VLM family. Class names are transformers' (resolved lazily, so importing is cheap)."""

    name: str
    model_class: str                 # e.g. "Qwen2VLForConditionalGeneration"
    config_class: str                # e.g. "Qwen2VLConfig"
    model_types: tuple[str, ...]     # config.model_type values of this family
    parts: tuple[tuple[str, tuple[str, ...]], ...]  # (part, parameter-name prefixes); longest wins
    image_processor_class: str       # the PIL-backend class: loads without torchvision
    image_kwargs: tuple[tuple[str, Any], ...]  # what the processor passes the image processor
    processor_class: str             # the full HF processor
    processor_loads_on_cpu: bool     # False: it needs a video processor (torchvision)
    image_placeholder: str           # the token expansion replaces, one per image (the
                                     # processor's ``image_token``; Qwen's template writes it
                                     # between <|vision_start|> and <|vision_end|>)
    expand: expansion.Expansion      # placeholder -> expanded text for one image
    named_tokens: tuple[tuple[str, str], ...]  # tokenizer attributes the processor reads
    extra_tokens: tuple[str, ...]    # more special tokens the template or expansion writes
    chat_template: str
    end_of_turn: tuple[str, ...]     # ends an assistant turn: a label, and a generation stop
    forward_inputs: tuple[str, ...]  # model inputs besides input_ids, attention_mask, pixel_values
    token_type_key: str | None       # input marking image tokens with 1 (Qwen M-RoPE, Gemma 3 mask)
    pixel_layout: Literal["stack", "concat", "pad_tiles", "pad_sample_tiles"]
    image_tokens: Literal["fixed", "computed"]  # per image: fixed by config, or from the image

    @property
    def image_token(self) -> str:
        """The token repeated once per visual feature (the mask is ``input_ids == image_token_id``)."""
        return dict(self.named_tokens).get("image_token") or dict(self.named_tokens)[
            "context_image_token"]


def _llava_like(name: str, cls: str, processor: str, image_processor: str, expand, parts,
                loads: bool, layout: str, image_tokens: str, forward_inputs=(),
                image_kwargs=(), named_tokens=(("image_token", "<image>"),)) -> Family:
    return Family(
        name=name, model_class=f"{cls}ForConditionalGeneration", config_class=f"{cls}Config",
        model_types=(name,), parts=parts, image_processor_class=image_processor,
        image_kwargs=image_kwargs, processor_class=processor, processor_loads_on_cpu=loads,
        image_placeholder="<image>", expand=expand, named_tokens=named_tokens,
        extra_tokens=_CHATML_TOKENS, chat_template=_chatml("<image>"), end_of_turn=("<|im_end|>",),
        forward_inputs=forward_inputs, token_type_key=None, pixel_layout=layout,
        image_tokens=image_tokens)


def _qwen(name: str, cls: str, parts) -> Family:
    return Family(
        name=name, model_class=f"{cls}ForConditionalGeneration", config_class=f"{cls}Config",
        model_types=(name,), parts=parts, image_processor_class="Qwen2VLImageProcessorPil",
        image_kwargs=(), processor_class=f"{cls}Processor", processor_loads_on_cpu=False,
        image_placeholder="<|image_pad|>", expand=expansion.qwen_vl,
        named_tokens=_QWEN_TOKENS, extra_tokens=_CHATML_TOKENS,
        chat_template=_chatml("<|vision_start|><|image_pad|><|vision_end|>"),
        end_of_turn=("<|im_end|>",), forward_inputs=("image_grid_thw", "mm_token_type_ids"),
        token_type_key="mm_token_type_ids", pixel_layout="concat", image_tokens="computed")


def _idefics3(name: str, cls: str, processor_loads: bool) -> Family:
    return Family(
        name=name, model_class=f"{cls}ForConditionalGeneration", config_class=f"{cls}Config",
        model_types=(name,),
        parts=(("vision", ("model.vision_model.",)), ("projector", ("model.connector.",)),
               ("llm", ("model.text_model.", "lm_head."))),
        image_processor_class=f"{cls}ImageProcessorPil", image_kwargs=(("return_row_col_info", True),),
        processor_class=f"{cls}Processor", processor_loads_on_cpu=processor_loads,
        image_placeholder="<image>", expand=expansion.idefics3, named_tokens=_IDEFICS3_TOKENS,
        extra_tokens=("<|im_start|>",) + _ROW_COL, chat_template=IDEFICS3_TEMPLATE,
        end_of_turn=("<end_of_utterance>",), forward_inputs=("pixel_attention_mask",),
        token_type_key=None, pixel_layout="pad_sample_tiles", image_tokens="computed")


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _llava_like("llava", "Llava", "LlavaProcessor", "SiglipImageProcessorPil", expansion.llava,
                _LLAVA_PARTS, True, "stack", "fixed"),
    _llava_like("llava_next", "LlavaNext", "LlavaNextProcessor", "LlavaNextImageProcessorPil",
                expansion.llava_next, _NEXT_PARTS, True, "pad_tiles", "computed",
                forward_inputs=("image_sizes",), image_kwargs=(("do_pad", True),)),
    _llava_like("llava_onevision", "LlavaOnevision", "LlavaOnevisionProcessor",
                "LlavaOnevisionImageProcessorPil", expansion.llava_onevision, _NEXT_PARTS, False,
                "pad_tiles", "computed", forward_inputs=("image_sizes",),
                named_tokens=(("image_token", "<image>"), ("video_token", "<video>"))),
    _qwen("qwen2_vl", "Qwen2VL", _QWEN_PARTS),
    _qwen("qwen2_5_vl", "Qwen2_5_VL", _QWEN_PARTS),
    _qwen("qwen3_vl", "Qwen3VL",
          (("vision", ("model.visual.",)),
           ("projector", ("model.visual.merger.", "model.visual.deepstack_merger_list.")),
           ("llm", ("model.language_model.", "lm_head.")))),
    Family(
        name="internvl", model_class="InternVLForConditionalGeneration",
        config_class="InternVLConfig", model_types=("internvl",), parts=_LLAVA_PARTS,
        image_processor_class="GotOcr2ImageProcessorPil", image_kwargs=(("crop_to_patches", True),),
        processor_class="InternVLProcessor", processor_loads_on_cpu=False,
        image_placeholder="<IMG_CONTEXT>", expand=expansion.internvl,
        named_tokens=(("start_image_token", "<img>"), ("end_image_token", "</img>"),
                      ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>")),
        extra_tokens=_CHATML_TOKENS, chat_template=_chatml("<IMG_CONTEXT>"),
        end_of_turn=("<|im_end|>",), forward_inputs=(), token_type_key=None,
        pixel_layout="concat", image_tokens="computed"),
    _idefics3("idefics3", "Idefics3", processor_loads=True),
    _idefics3("smolvlm", "SmolVLM", processor_loads=False),  # + num2words
    Family(
        name="gemma3", model_class="Gemma3ForConditionalGeneration", config_class="Gemma3Config",
        model_types=("gemma3",), parts=_LLAVA_PARTS, image_processor_class="Gemma3ImageProcessorPil",
        image_kwargs=(), processor_class="Gemma3Processor", processor_loads_on_cpu=True,
        image_placeholder="<start_of_image>", expand=expansion.gemma3,
        named_tokens=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                      ("image_token", "<image_soft_token>")),
        extra_tokens=("<start_of_turn>", "<end_of_turn>"), chat_template=GEMMA3_TEMPLATE,
        end_of_turn=("<end_of_turn>",), forward_inputs=("token_type_ids",),
        token_type_key="token_type_ids", pixel_layout="stack", image_tokens="fixed"),
)}

_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def family_of(config: Any) -> Family:
    """The family of a model config (or its ``model_type`` string)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"model_type {model_type!r} is not a supported VLM family; supported: "
                         f"{sorted(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


def image_token_id(config: Any) -> int:
    """The id the model replaces with image features (``image_token_id`` / ``image_token_index``)."""
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} has neither image_token_id nor image_token_index")


def parameter_part(family: Family | str, name: str) -> str:
    """``vision`` / ``projector`` / ``llm`` for a parameter name: the part whose prefix is the
    longest match. Raises ``KeyError`` for a name no prefix matches."""
    family = get_family(family) if isinstance(family, str) else family
    best, best_len = None, -1
    for part, prefixes in family.parts:
        for prefix in prefixes:
            if name.startswith(prefix) and len(prefix) > best_len:
                best, best_len = part, len(prefix)
    if best is None:
        raise KeyError(f"{family.name}: parameter {name!r} matches no part prefix "
                       f"({dict(family.parts)}); add its module to the family table")
    return best


def processor_settings(family: Family | str, config: Any) -> dict[str, Any]:
    """The processor kwargs expansion needs, derived from the model config (the numbers the
    model checks its image features against). Names are the HF processors' own."""
    family = get_family(family) if isinstance(family, str) else family
    name, v = family.name, getattr(config, "vision_config", None)
    if name in ("llava", "llava_next"):
        return {"patch_size": v.patch_size,
                "vision_feature_select_strategy": config.vision_feature_select_strategy,
                # CLIP towers prepend a CLS feature; SigLIP has none
                "num_additional_image_tokens": 1 if v.model_type == "clip_vision_model" else 0}
    if name == "llava_onevision":
        return {"num_image_tokens": (v.image_size // v.patch_size) ** 2,
                "vision_feature_select_strategy": config.vision_feature_select_strategy,
                "vision_aspect_ratio": config.vision_aspect_ratio}
    if name == "internvl":
        return {"image_seq_length": config.image_seq_length}
    if name in ("idefics3", "smolvlm"):
        return {"image_seq_len": int((v.image_size // v.patch_size) ** 2 / config.scale_factor**2)}
    if name == "gemma3":
        return {"image_seq_length": config.mm_tokens_per_image}
    return {}  # Qwen: merge_size and patch_size live in the image processor
