"""workloads.models for every VLM family (issue #15): tiny presets per family built, saved,
reloaded; FamilyProcessor's input_ids against families.encode and the HF processors; freezing by
part; left-padded batched generation; LLaVA-1.5 specs (and their cache keys) unchanged. CPU, no
Ray, no hub."""

from __future__ import annotations

import json

import numpy as np
import pytest
from family_fixtures import random_image
import torch

from workloads.families import (FAMILIES, FamilyProcessor, encode, hf_processor, parameter_part,
                                render, tiny_processor_parts)
from workloads.models import (ModelCompatError, ModelSpec, build_model, check_compat,
                              count_params, describe_model, load_model, save_model,
                              save_processor, set_trainable)

NAMES = sorted(FAMILIES)
FAMILY_NAMES = [n for n in NAMES if n != "llava"]  # llava is the family-less LLaVA-1.5 path
QUESTION = "What color is the shape?"


def _ids(processor, question: str, image) -> list[int]:
    text = processor.prompt([{"role": "user", "content": question}], image is not None)
    return processor(images=[image] if image is not None else None, text=text,
                     return_tensors="pt")["input_ids"][0].tolist()


def test_llava_specs_dump_as_before_and_family_is_checked():
    old = {"preset": "tiny-student", "path": None, "parts": None}
    assert ModelSpec(preset="tiny-student").model_dump() == old
    assert ModelSpec(preset="tiny-student").model_dump_json() == \
        json.dumps(old, separators=(",", ":"))
    # `family: llava` is the same spec (same cache key) as no family
    assert ModelSpec(preset="tiny-student", family="llava").model_dump() == old
    assert ModelSpec(preset="tiny-student", family="qwen2_vl").model_dump() == {
        **old, "family": "qwen2_vl"}
    with pytest.raises(ValueError, match=r"unknown family 'qwen9'; did you mean 'qwen3_vl'\? known: \['gemma3'"):
        ModelSpec(preset="tiny-student", family="qwen9")
    with pytest.raises(ValueError, match="`parts` builds a LLaVA-1.5 model"):
        ModelSpec(parts={"vision": "a", "llm": "b"}, family="internvl")
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(family="gemma3")
    assert describe_model({"preset": "tiny-student", "family": "llava"}, vocab_size=300) == \
        describe_model({"preset": "tiny-student"}, vocab_size=300)


@pytest.mark.parametrize("name", NAMES)
def test_processor_input_ids_equal_encode_and_the_hf_processor(name, tok_dir):
    parts = tiny_processor_parts(name, tok_dir)
    processor = FamilyProcessor(parts)
    family = FAMILIES[name]
    conv = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == \
        render(parts, conv, add_generation_prompt=True)
    for h, w in [(30, 50), (100, 120)]:
        image = random_image(h, w, seed=h)
        ref = encode(name, parts, conv, image, add_generation_prompt=True)
        # no marker in the question: the image goes first, as for LLaVA's eval prompts
        text = processor.prompt([{"role": "user", "content": QUESTION}], has_image=True)
        assert text == processor.prompt(conv, has_image=True) == \
            processor.prompt([{"role": "user", "content": f"{processor.image_token}\n{QUESTION}"}],
                             has_image=True)
        out = processor(images=[image], text=text, return_tensors="pt")
        assert out["input_ids"][0].tolist() == ref["input_ids"].tolist()
        assert out["attention_mask"].all()
        for key in ("pixel_values",) + family.forward_inputs:
            np.testing.assert_array_equal(out[key].numpy().reshape(-1),
                                          np.asarray(ref[key]).reshape(-1), err_msg=key)
        if family.processor_loads_on_cpu:
            hf = hf_processor(parts)(text=[text], images=[image], add_special_tokens=False,
                                     return_tensors="np")
            assert hf["input_ids"][0].tolist() == ref["input_ids"].tolist()
    text_only = [{"role": "user", "content": QUESTION}]
    assert _ids(processor, QUESTION, None) == \
        encode(name, parts, text_only, add_generation_prompt=True)["input_ids"].tolist()
    with pytest.raises(ValueError, match=f"{name}: the text has 1 .* but 0 image"):
        processor(text=processor.prompt(text_only, has_image=True))


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    stop = next((j for j, t in enumerate(ids) if t in eos), None)
    return ids if stop is None else ids[:stop + 1]


@pytest.mark.parametrize("name", ["qwen2_vl", "llava_next", "idefics3"])
def test_left_padded_batch_generates_as_one_by_one(name, tok_dir):
    """Prompts of different lengths, images of different sizes (ragged Qwen patches, padded
    tiles) and a text-only prompt in one left-padded batch: the greedy tokens of one by one."""
    model, processor = build_model({"preset": "tiny-student", "family": name}, tok_dir)
    model.eval()
    questions = [(QUESTION, random_image(30, 50)), ("Describe the picture: a blue circle", None),
                 ("A square.", random_image(64, 20, seed=2)), ("And its shape?", random_image(100, 120))]
    texts = [processor.prompt([{"role": "user", "content": q}], image is not None)
             for q, image in questions]
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        alone = []
        for text, (_, image) in zip(texts, questions):
            enc = processor(images=[image] if image else None, text=text, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=6, do_sample=False)
            alone.append(_until_eos(out[0, enc["input_ids"].shape[1]:].tolist(), eos))
        enc = processor(images=[image for _, image in questions if image], text=texts,
                        padding=True, padding_side="left", return_tensors="pt")
        mask = enc["attention_mask"]
        assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
        with pytest.raises(ValueError, match="need padding=True"):
            processor(images=[image for _, image in questions if image], text=texts)
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    width = enc["input_ids"].shape[1]
    assert [_until_eos(row[width:].tolist(), eos) for row in out] == alone


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_preset_builds_saves_reloads_and_freezes_by_part(name, tok_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    family = FAMILIES[name]
    spec = {"preset": "tiny-student", "family": name}
    model, processor = build_model(spec, tok_dir)
    assert type(model).__name__ == family.model_class and isinstance(processor, FamilyProcessor)
    stops = [processor.tokenizer.convert_tokens_to_ids(t) for t in family.end_of_turn]
    assert set(stops) <= set(model.generation_config.eos_token_id)
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id

    out = save_model(model, processor, str(tmp_path / "model"))
    loaded, proc2 = load_model(out)
    assert isinstance(loaded, AutoModelForImageTextToText._model_mapping[type(model.config)])
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    image = random_image(40, 24, seed=1)
    assert _ids(proc2, QUESTION, image) == _ids(processor, QUESTION, image)
    assert proc2.parts.settings == processor.parts.settings
    if family.processor_loads_on_cpu:  # and plain AutoProcessor reads what save_model wrote
        from transformers import AutoProcessor

        assert type(AutoProcessor.from_pretrained(out)).__name__ == family.processor_class
    # the processor alone (the data layer's), without building weights, and from the path
    for s in (spec, {"path": out}):
        proc_dir = save_processor(s, tok_dir, str(tmp_path / f"proc_{len(s)}"))
        assert _ids(FamilyProcessor.from_pretrained(proc_dir), QUESTION, image) == \
            _ids(processor, QUESTION, image)

    counts = set_trainable(loaded, ["projector"])
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in loaded.named_parameters()
                         if parameter_part(family, n) == "projector"}
    assert trainable and counts["vision"] == counts["llm"] == 0
    sizes = count_params(loaded)
    assert sizes["total"] == sum(p.numel() for p in loaded.parameters())
    assert all(sizes[part] > 0 for part in ("vision", "projector", "llm"))

    # offline: sizes of the preset from the vocabulary size alone, the checkpoint's config
    desc = describe_model(spec, vocab_size=len(processor.tokenizer))
    assert desc["family"] == name and desc["params"] == sizes
    assert desc["image_tokens"] and describe_model({"path": out})["family"] == name


def test_teacher_preset_is_larger_and_the_seed_decides_the_weights(tok_dir):
    spec = {"preset": "tiny-teacher", "family": "gemma3"}
    t = describe_model(spec, vocab_size=400)["params"]["total"]
    assert t > 2 * describe_model({**spec, "preset": "tiny-student"}, vocab_size=400)[
        "params"]["total"]
    weights = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        weights.append(build_model({"preset": "tiny-student", "family": "internvl"},
                                   tok_dir)[0].lm_head.weight)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_mismatches_are_explained(tok_dir, tmp_path):
    model, processor = build_model({"preset": "tiny-student", "family": "qwen2_vl"}, tok_dir)
    path = save_model(model, processor, str(tmp_path / "qwen"))
    with pytest.raises(ModelCompatError, match="`family: gemma3` but .* is a qwen2_vl checkpoint"):
        build_model({"path": path, "family": "gemma3"})
    other = FamilyProcessor(tiny_processor_parts("gemma3", tok_dir))
    with pytest.raises(ModelCompatError, match="qwen2_vl model but the processor is gemma3's"):
        check_compat(model, other)
    model.config.image_token_id = 1
    with pytest.raises(ModelCompatError, match=r"image token id is 1 but the tokenizer's "
                                               r"'<\|image_pad\|>'"):
        check_compat(model, processor)
    model.extra = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ModelCompatError, match="'extra' matches no part prefix"):
        set_trainable(model, ["llm"])

    unknown = tmp_path / "mllama"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(ModelCompatError, match=r"model_type 'mllama' is not a supported VLM "
                                               r"family; supported: \['gemma3'"):
        load_model(str(unknown))
    bare = tmp_path / "bare"
    model.save_pretrained(str(bare))
    with pytest.raises(ModelCompatError, match="has no tokenizer or processor files"):
        load_model(str(bare))
