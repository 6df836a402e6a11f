"""The family side of ``workloads.models``: an HF-processor-like ``FamilyProcessor`` around
``ProcessorParts`` (no torchvision needed), tiny presets per family, part grouping by parameter
name, the family compatibility check and an offline description.

Prompts. mmkd renders a prompt with the tokenizer's chat template first and hands the rendered
string to the processor (``workloads/evaluation/generation.py``), so ``FamilyProcessor.image_token`` is the
family's ``image_placeholder`` — the string a rendered prompt carries once per image and
``__call__`` expands (``<image>``, ``<|image_pad|>``, ``<IMG_CONTEXT>``, ``<start_of_image>``).
A plain-string user turn with that placeholder renders exactly like the family's own image item
for LLaVA-1.5/NeXT/OneVision, InternVL and Gemma 3, but not for Qwen (whose template wraps the
image in ``<|vision_start|>…<|vision_end|>``) nor Idefics3/SmolVLM (``User:<image>`` vs
``User: <image>``). ``FamilyProcessor.prompt(messages, has_image)`` renders any family exactly as
``families.encode(..., add_generation_prompt=True)`` does; callers that build prompts should use
it where the processor has it.
"""

from __future__ import annotations

from typing import Any, Sequence

from workloads.families.processing import (GENERIC_IMAGE, ProcessorParts, collate,
                                           expand_image_tokens, load_processor_parts, render,
                                           save_processor_parts)
from workloads.families.table import (FAMILIES, Family, family_of, get_family, image_token_id,
                                      parameter_part, processor_settings)

__all__ = ["FamilyProcessor", "ParameterGroup", "family_of_model", "part_parameters",
           "family_compat_problems", "build_family_preset", "sync_generation_config",
           "describe_family_preset", "describe_family_config", "IMAGE_TOKEN_RULES", "TINY_ROLES"]

TINY_ROLES = {"tiny-teacher": "teacher", "tiny-student": "student"}

# How many image tokens one image becomes (what ``describe_model`` reports, offline).
IMAGE_TOKEN_RULES = {
    "llava": "fixed: (image_size / patch_size)^2 per image",
    "llava_next": "per image: base tile + unpadded any-res grid + one newline per grid row",
    "llava_onevision": "per image: like llava_next, the grid pooled above anyres_max_N tiles",
    "qwen2_vl": "per image: prod(image_grid_thw) / merge_size^2",
    "qwen2_5_vl": "per image: prod(image_grid_thw) / merge_size^2",
    "qwen3_vl": "per image: prod(image_grid_thw) / merge_size^2",
    "internvl": "per image: image_seq_length x tiles, between <img> and </img>",
    "idefics3": "per image: image_seq_len x (rows x cols tiles + 1 global image)",
    "smolvlm": "per image: image_seq_len x (rows x cols tiles + 1 global image)",
    "gemma3": "fixed: mm_tokens_per_image per image, between <start_of_image> and <end_of_image>",
}


class FamilyProcessor:
    """Called like an HF processor — ``processor(images=[...] | None, text=str | list[str],
    padding=True, padding_side="left", return_tensors="pt")`` — on prompts already rendered by
    the chat template. Returns a ``BatchFeature`` with ``input_ids``, ``attention_mask``,
    ``pixel_values`` and the family's extra forward inputs (``image_grid_thw``,
    ``mm_token_type_ids``, ``token_type_ids``, ``image_sizes``, ``pixel_attention_mask``),
    batched as ``families.collate`` does; ``input_ids`` equal ``families.encode``'s."""

    def __init__(self, parts: ProcessorParts):
        self.parts = parts

    # --------------------------------------------------------------- HF-processor attributes
    @property
    def family(self) -> Family:
        return self.parts.family

    @property
    def tokenizer(self) -> Any:
        return self.parts.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.parts.image_processor

    @property
    def image_token(self) -> str:
        """The placeholder a rendered prompt carries once per image (see the module docstring)."""
        return self.family.image_placeholder

    @property
    def image_token_id(self) -> int:
        """The id the model replaces with image features (``config.image_token_id``)."""
        return self.parts.image_token_id

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def __repr__(self) -> str:
        return (f"FamilyProcessor(family={self.family.name!r}, tokenizer={len(self.tokenizer)} "
                f"tokens, image_processor={type(self.image_processor).__name__}, "
                f"settings={self.parts.settings})")

    # ------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str, **_: Any) -> str:
        return save_processor_parts(self.parts, str(save_directory))

    @classmethod
    def from_pretrained(cls, path: str, family: Family | str | None = None) -> "FamilyProcessor":
        return cls(load_processor_parts(str(path), family))

    # ----------------------------------------------------------------------------- prompts
    def apply_chat_template(self, conversation: list[dict[str, Any]],
                            add_generation_prompt: bool = False, tokenize: bool = False,
                            **_: Any) -> str:
        """The rendered text (HF messages; a string turn may carry mmkd's ``<image>``), with
        one family placeholder per image — what ``__call__`` takes."""
        if tokenize:
            raise ValueError("FamilyProcessor.apply_chat_template renders text only; pass the "
                             "text and its images to the processor itself to tokenize")
        return render(self.parts, conversation, add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: Sequence[dict[str, Any]], has_image: bool,
               add_generation_prompt: bool = True) -> str:
        """The generation prompt of ``messages`` (``{"role", "content"}``), rendered exactly as
        ``families.encode(..., add_generation_prompt=True)`` renders it. An image marker in a
        string turn may be mmkd's ``<image>`` or this family's placeholder; an image with no
        marker anywhere gets ``<image>\\n`` before the first user turn (as LLaVA's eval does)."""
        msgs = []
        for m in messages:
            content = m["content"]
            if isinstance(content, str) and self.image_token != GENERIC_IMAGE:
                content = content.replace(self.image_token, GENERIC_IMAGE)
            msgs.append({**m, "content": content})
        if has_image and not any(_has_marker(m["content"]) for m in msgs):
            first = next((m for m in msgs if m["role"] == "user"), None)
            if first is None:
                raise ValueError(f"{self.family.name}: an image needs a user turn to go in")
            c = first["content"]
            first["content"] = (f"{GENERIC_IMAGE}\n{c}" if isinstance(c, str)
                                else [{"type": "image"}, *c])
        return render(self.parts, msgs, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------------------ decode
    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    # ------------------------------------------------------------------------------ encode
    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None,
                 padding: bool | str = False, padding_side: str | None = None,
                 return_tensors: str | None = None, add_special_tokens: bool = False,
                 **kwargs: Any) -> Any:
        """Encode rendered prompts. ``images``: one image, a flat list (taken in placeholder
        order across the texts, as HF processors do) or one list per text. Special tokens are
        not added: the chat template writes any it needs (as ``families.encode``)."""
        import numpy as np
        from transformers import BatchFeature

        if kwargs:
            raise TypeError(f"FamilyProcessor got unsupported arguments {sorted(kwargs)}")
        if text is None:
            raise ValueError("FamilyProcessor needs `text` (the rendered prompt, one image "
                             f"placeholder {self.image_token!r} per image)")
        texts = [text] if isinstance(text, str) else list(text)
        per_text = self._images_per_text(images, texts)
        samples = []
        for t, imgs in zip(texts, per_text):
            expanded, image_inputs = expand_image_tokens(self.family, self.parts, t, imgs or None)
            ids = np.asarray(self.tokenizer(expanded, add_special_tokens=add_special_tokens)[
                "input_ids"], np.int64)
            sample = {"input_ids": ids, "labels": ids}
            if self.family.token_type_key:
                sample[self.family.token_type_key] = (ids == self.image_token_id).astype(np.int64)
            sample.update(image_inputs)
            samples.append(sample)
        lengths = {len(s["input_ids"]) for s in samples}
        if not padding and len(lengths) > 1:
            raise ValueError("FamilyProcessor: texts of different token lengths need padding=True")
        side = padding_side or getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad = self.tokenizer.pad_token_id
        if pad is None and len(lengths) > 1:
            raise ValueError(f"{self.family.name}: the tokenizer has no pad token to pad with")
        batch = collate(self.family, samples, pad if pad is not None else 0)
        batch.pop("labels")
        if side == "left":
            batch.update(_left_pad(samples, self.family.token_type_key, pad))
        if return_tensors != "pt":
            batch = {k: v.numpy() for k, v in batch.items()}
        return BatchFeature(data=batch, tensor_type=return_tensors)

    def _images_per_text(self, images: Any, texts: list[str]) -> list[list[Any]]:
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(i, (list, tuple)) or i is None for i in images):
            if len(images) != len(texts):
                raise ValueError(f"{self.family.name}: {len(images)} image lists for "
                                 f"{len(texts)} texts")
            return [list(i or []) for i in images]
        if sum(counts) != len(images):
            raise ValueError(f"{self.family.name}: the text has {sum(counts)} "
                             f"{self.image_token!r} placeholder(s) but {len(images)} image(s) "
                             f"were given")
        out, pos = [], 0
        for n in counts:
            out.append(list(images[pos:pos + n]))
            pos += n
        return out


def _has_marker(content: Any) -> bool:
    if isinstance(content, str):
        return GENERIC_IMAGE in content
    return any(item.get("type") == "image" for item in content)


def _left_pad(samples: list[dict[str, Any]], token_type_key: str | None,
              pad: int | None) -> dict[str, Any]:
    import numpy as np
    import torch

    width = max(len(s["input_ids"]) for s in samples)

    def left(key: str, value: int) -> torch.Tensor:
        return torch.as_tensor(np.stack([np.pad(s[key], (width - len(s[key]), 0),
                                                constant_values=value) for s in samples]))

    out = {"input_ids": left("input_ids", pad if pad is not None else 0),
           "attention_mask": torch.as_tensor(np.stack([
               (np.arange(width) >= width - len(s["input_ids"])).astype(np.int64)
               for s in samples]))}
    if token_type_key:
        out[token_type_key] = left(token_type_key, 0)
    return out


# ------------------------------------------------------------------------------ models


def family_of_model(model: Any) -> Family | None:
    """The family of an HF VLM (by ``config.model_type``), or None when it has none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return family_of(model_type)
    except ValueError:
        return None


class ParameterGroup:
    """A part of a family model as a parameter list that answers ``.parameters()``, like the
    modules ``workloads.models.model_parts`` lists (Qwen's projector sits inside its vision
    module, so a part is not always a module)."""

    def __init__(self, params: list[Any]):
        self.params = params

    def parameters(self) -> Any:
        return iter(self.params)


def part_parameters(model: Any, family: Family | str | None = None) -> dict[str, list[Any]]:
    """Part → parameters, each parameter in exactly one part by ``families.parameter_part``.
    Raises ``ValueError`` naming a parameter no part claims."""
    family = family_of_model(model) if family is None else (
        get_family(family) if isinstance(family, str) else family)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not a model of a known VLM family "
                         f"({sorted(FAMILIES)})")
    out: dict[str, list[Any]] = {part: [] for part, _ in family.parts}
    for name, param in model.named_parameters():
        try:
            out[parameter_part(family, name)].append(param)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    return out


def family_compat_problems(model: Any, processor: FamilyProcessor) -> list[str]:
    """What disagrees between a family model and its processor (empty when they agree)."""
    problems = []
    family, cfg = processor.family, model.config
    if family_of(cfg) is not family:
        return [f"the model is a {family_of(cfg).name} model but the processor is "
                f"{family.name}'s; save the model with its own processor"]
    tok = processor.tokenizer
    token = family.image_token
    want = image_token_id(cfg)
    if token not in tok.get_vocab():
        problems.append(f"tokenizer has no {token!r} token ({family.name}'s image token); build "
                        f"it with workloads.families.build_tokenizer")
    elif tok.convert_tokens_to_ids(token) != want:
        problems.append(f"model.config image token id is {want} but the tokenizer's {token!r} "
                        f"is {tok.convert_tokens_to_ids(token)}; rebuild the model with this "
                        f"tokenizer")
    text = getattr(cfg, "text_config", cfg)
    if len(tok) > text.vocab_size:
        problems.append(f"tokenizer has {len(tok)} tokens but the LLM's vocab_size is "
                        f"{text.vocab_size}; resize the embeddings or use the model's tokenizer")
    expected = processor_settings(family, cfg)
    got = {k: processor.parts.settings.get(k) for k in expected}
    if got != expected:
        problems.append(f"processor settings {got} differ from the model's {expected}; image "
                        f"features would not match the image tokens")
    return problems


def sync_generation_config(model: Any, tokenizer: Any, family: Family) -> None:
    """Pad with the tokenizer's pad token; stop on the model's own stop ids, the tokenizer's eos
    and the family's end-of-turn tokens."""
    gc, vocab = model.generation_config, tokenizer.get_vocab()
    if tokenizer.pad_token_id is not None:
        gc.pad_token_id = tokenizer.pad_token_id
    own = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
    eos = [*own, tokenizer.eos_token_id, *(vocab[t] for t in family.end_of_turn if t in vocab)]
    gc.eos_token_id = [e for e in dict.fromkeys(eos) if e is not None]


def build_family_preset(family: Family | str, preset: str, tokenizer_dir: str,
                        seed: int = 0) -> tuple[Any, FamilyProcessor]:
    """A random-init tiny ``preset`` (``tiny-teacher`` / ``tiny-student``) model of ``family``
    and its processor, for mmkd's tokenizer at ``tokenizer_dir`` plus the family's tokens."""
    from workloads.families.processing import (build_image_processor, build_tokenizer,
                                               make_processor_parts)
    from workloads.families.tiny import tiny_image_processor_kwargs, tiny_model

    family = get_family(family) if isinstance(family, str) else family
    tokenizer = build_tokenizer(family, tokenizer_dir)
    model = tiny_model(family, TINY_ROLES[preset], tokenizer, seed=seed)
    image_processor = build_image_processor(family, **tiny_image_processor_kwargs(family))
    processor = FamilyProcessor(make_processor_parts(family, tokenizer, image_processor,
                                                     model.config))
    sync_generation_config(model, tokenizer, family)
    return model, processor


class _VocabOnly:
    """Stands in for a tokenizer where only the vocabulary size matters (sizing, offline)."""

    pad_token_id = eos_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0


def describe_family_preset(family: Family | str, preset: str,
                           vocab_size: int | None = None) -> dict[str, Any]:
    """Sizes of a tiny family preset without a tokenizer or weights."""
    from workloads.families.tiny import TINY_SIZES, tiny_image_processor_kwargs

    family = get_family(family) if isinstance(family, str) else family
    role = TINY_ROLES[preset]
    out = {"kind": "preset", "name": preset, "family": family.name,
           "model_class": family.model_class, "sizes": dict(TINY_SIZES[role]),
           "image_processor": tiny_image_processor_kwargs(family),
           "image_tokens": IMAGE_TOKEN_RULES[family.name], "pixel_layout": family.pixel_layout}
    if vocab_size:
        import torch
        import transformers

        from workloads.families.tiny import tiny_config

        config = tiny_config(family, role, _VocabOnly(vocab_size))
        with torch.device("meta"):
            model = getattr(transformers, family.model_class)(config)
        counts = {k: sum(p.numel() for p in v) for k, v in part_parameters(model, family).items()}
        out["params"] = {**counts, "total": sum(counts.values())}
    return out


def describe_family_config(family: Family, cfg: Any) -> dict[str, Any]:
    """What ``describe_model`` reports for a family checkpoint's config (no weights read)."""
    v, t = getattr(cfg, "vision_config", None), getattr(cfg, "text_config", cfg)

    def first(obj: Any, *names: str) -> Any:
        return next((getattr(obj, n) for n in names if getattr(obj, n, None) is not None), None)

    return {"family": family.name, "model_class": family.model_class,
            "vision": {"model_type": getattr(v, "model_type", None),
                       "hidden_size": first(v, "hidden_size", "embed_dim"),
                       "num_hidden_layers": first(v, "num_hidden_layers", "depth"),
                       "image_size": first(v, "image_size")},
            "llm": {"model_type": t.model_type, "hidden_size": t.hidden_size,
                    "num_hidden_layers": t.num_hidden_layers, "vocab_size": t.vocab_size},
            "image_tokens": IMAGE_TOKEN_RULES[family.name],
            "image_token_id": image_token_id(cfg), "pixel_layout": family.pixel_layout}
