"""The VLM family table (workloads/families): tiny teacher/student per family built from configs,
saved, reloaded with the Auto classes and run; encode() checked against each family's own HF
processor class. Everything runs on CPU without torchvision or hub downloads."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from family_fixtures import random_image
import torch

from workloads.families import (FAMILIES, IGNORE_INDEX, PART_NAMES, collate, encode,
                                expand_image_tokens, family_of, get_family, load_processor_parts,
                                parameter_part, render, tiny_model, tiny_processor_parts)

NAMES = sorted(FAMILIES)
CONV = [{"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "It is a red square."}]
TWO_ROUNDS = CONV + [{"role": "user", "content": "And its shape?"},
                     {"role": "assistant", "content": "A square."}]


def _reference_processor(family, parts, monkeypatch):
    """The family's HF processor class run on our tokenizer + image processor. Where it needs a
    video processor (torchvision), its check is bypassed with an unused stub: no video is
    passed, so every line that runs is transformers' own image path."""
    import transformers
    from transformers.video_processing_utils import BaseVideoProcessor

    cls = getattr(transformers, family.processor_class)
    kwargs = dict(image_processor=parts.image_processor, tokenizer=parts.tokenizer,
                  chat_template=parts.tokenizer.chat_template, **parts.settings)
    if family.processor_loads_on_cpu:
        return cls(**kwargs)
    if family.name == "smolvlm":  # num2words is only used for video prompts
        monkeypatch.setattr("transformers.models.smolvlm.processing_smolvlm.num2words", str)

    class WithoutVideo(cls):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor":
                return type(arg)
            return super().check_argument_for_proper_class(name, arg)

    return WithoutVideo(video_processor=object.__new__(BaseVideoProcessor), **kwargs)


def _n_image_features(model, batch) -> int:
    """How many feature vectors the vision tower + projector produce for the batch's images."""
    wanted = inspect.signature(model.model.get_image_features).parameters
    with torch.no_grad():
        out = model.model.get_image_features(**{k: v for k, v in batch.items() if k in wanted})
    feats = out.pooler_output
    feats = feats if isinstance(feats, (list, tuple)) else [feats]
    return sum(f.numel() for f in feats) // model.config.text_config.hidden_size


@pytest.mark.parametrize("name", NAMES)
def test_tiny_pair_reloads_and_runs(name, built):
    from transformers import AutoModelForImageTextToText

    family = get_family(name)
    dirs = built(name)
    image = random_image(30, 50)
    encoded, sizes = {}, {}
    for role, path in dirs.items():
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        assert type(model).__name__ == family.model_class
        assert family_of(model.config) is family
        parts = load_processor_parts(path)
        # reload is bit-identical to the model build_tiny made
        fresh = tiny_model(name, role, parts.tokenizer).state_dict()
        assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
        enc = encode(name, parts, CONV, image)
        batch = collate(name, [enc], parts.tokenizer.pad_token_id)
        with torch.no_grad():
            out = model(**batch)
        is_image = batch["input_ids"][0] == parts.image_token_id
        n = int(is_image.sum())
        assert n > 0 and n == _n_image_features(model, batch)
        assert out.logits.shape == (1, len(enc["input_ids"]), model.config.text_config.vocab_size)
        assert torch.isfinite(out.logits[0, is_image]).all() and torch.isfinite(out.loss)
        encoded[role], sizes[role] = enc, sum(p.numel() for p in model.parameters())
    assert sizes["teacher"] > 2 * sizes["student"]
    # same tokenizer and image geometry: identical input_ids and image inputs for the pair
    for key, value in encoded["teacher"].items():
        np.testing.assert_array_equal(value, encoded["student"][key], err_msg=key)


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].processor_loads_on_cpu])
def test_saved_processor_loads_with_auto_processor(name, built):
    """Where the HF processor loads without torchvision, AutoProcessor reads build_tiny's files
    and gives the same input_ids as encode()."""
    from transformers import AutoProcessor

    path = built(name)["student"]
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == FAMILIES[name].processor_class
    parts = load_processor_parts(path)
    image = random_image(40, 24, seed=1)
    ref = processor(text=[render(parts, CONV)], images=[image], add_special_tokens=False,
                    return_tensors="np")
    np.testing.assert_array_equal(ref["input_ids"][0], encode(name, parts, CONV, image)["input_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_maps_to_exactly_one_part(name, tok_dir):
    family = FAMILIES[name]
    parts = tiny_processor_parts(name, tok_dir)
    model = tiny_model(name, "teacher", parts.tokenizer)
    seen = {p: 0 for p in PART_NAMES}
    for pname, param in model.named_parameters():
        # the longest matching prefix decides; a tie between two parts would be ambiguous
        lengths = {part: max((len(x) for x in prefixes if pname.startswith(x)), default=-1)
                   for part, prefixes in family.parts}
        best = max(lengths.values())
        assert best >= 0, f"{pname} matches no part"
        assert sum(v == best for v in lengths.values()) == 1, f"{pname} is ambiguous: {lengths}"
        seen[parameter_part(family, pname)] += param.numel()
    assert all(seen.values()), seen
    with pytest.raises(KeyError, match="matches no part"):
        parameter_part(family, "not_a_module.weight")


@pytest.mark.parametrize("name", NAMES)
def test_encode_equals_the_family_processor(name, tok_dir, monkeypatch):
    family = FAMILIES[name]
    parts = tiny_processor_parts(name, tok_dir)
    processor = _reference_processor(family, parts, monkeypatch)
    text = render(parts, CONV)
    for h, w in [(30, 50), (64, 20), (32, 32), (100, 120)]:
        image = random_image(h, w, seed=h)
        ref = processor(text=[text], images=[image], add_special_tokens=False, return_tensors="np")
        enc = encode(name, parts, CONV, image)
        np.testing.assert_array_equal(ref["input_ids"][0], enc["input_ids"], err_msg=f"{h}x{w}")
        np.testing.assert_allclose(np.asarray(ref["pixel_values"]).reshape(-1),
                                   enc["pixel_values"].reshape(-1))
        for key in family.forward_inputs:
            ref_key = np.asarray(ref[key])
            np.testing.assert_array_equal(ref_key.reshape(-1), enc[key].reshape(-1), err_msg=key)
        expanded, inputs = expand_image_tokens(name, parts, text, image)
        assert parts.tokenizer(expanded, add_special_tokens=False)["input_ids"] == \
            enc["input_ids"].tolist()
        assert set(inputs) == {k for k in enc if k not in ("input_ids", "labels",
                                                            family.token_type_key)}


def test_onevision_pools_grids_above_anyres_max(tok_dir, monkeypatch):
    """The anyres_max_N pooling branch (a grid larger than N tiles) matches the processor."""
    from dataclasses import replace

    parts = tiny_processor_parts("llava_onevision", tok_dir)
    parts = replace(parts, settings={**parts.settings, "vision_aspect_ratio": "anyres_max_1"})
    processor = _reference_processor(FAMILIES["llava_onevision"], parts, monkeypatch)
    image = random_image(60, 64)
    ref = processor(text=[render(parts, CONV)], images=[image], add_special_tokens=False)
    enc = encode("llava_onevision", parts, CONV, image)
    assert ref["input_ids"][0] == enc["input_ids"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_labels_are_the_assistant_replies_and_their_end_of_turn(name, tok_dir):
    family = FAMILIES[name]
    parts = tiny_processor_parts(name, tok_dir)
    enc = encode(name, parts, TWO_ROUNDS, random_image(32, 32))
    ids, labels = enc["input_ids"], enc["labels"]
    on = labels != IGNORE_INDEX
    assert np.array_equal(labels[on], ids[on])
    assert not (on & (ids == parts.image_token_id)).any()
    runs, start = [], None
    for i, flag in enumerate(list(on) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(parts.tokenizer.decode(ids[start:i].tolist()).strip())
            start = None
    eot = family.end_of_turn[0]
    assert runs == [f"It is a red square.{eot}", f"A square.{eot}"]


@pytest.mark.parametrize("name", NAMES)
def test_batch_collation_keeps_each_sample_with_its_image(name, tok_dir):
    """Two images of different sizes and a text-only sample in one batch give each sample the
    logits it gets alone (pixels concatenated or padded by the family's layout)."""
    parts = tiny_processor_parts(name, tok_dir)
    model = tiny_model(name, "student", parts.tokenizer).eval()
    text_only = [{"role": "user", "content": "Describe the picture."},
                 {"role": "assistant", "content": "A blue circle."}]
    samples = [encode(name, parts, CONV, random_image(30, 50)), encode(name, parts, text_only),
               encode(name, parts, CONV, random_image(64, 20, seed=2))]
    pad = parts.tokenizer.pad_token_id
    with torch.no_grad():
        together = model(**collate(name, samples, pad)).logits
        for i, sample in enumerate(samples):
            alone = model(**collate(name, [sample], pad)).logits[0]
            torch.testing.assert_close(together[i, : len(alone)], alone, atol=1e-5, rtol=1e-4)


def test_mismatches_and_unknown_names_are_explained(tok_dir):
    parts = tiny_processor_parts("qwen2_vl", tok_dir)
    with pytest.raises(ValueError, match="qwen2_vl: the conversation has 1 image"):
        encode("qwen2_vl", parts, CONV)
    with pytest.raises(ValueError, match=r"qwen2_vl: 0 <\|image_pad\|> placeholder"):
        expand_image_tokens("qwen2_vl", parts, "no image here", random_image(32, 32))
    with pytest.raises(ValueError, match="unknown model family 'qwen9'"):
        get_family("qwen9")
    with pytest.raises(ValueError, match="'mllama' is not a supported VLM family"):
        family_of("mllama")


def test_tokenizer_dir_or_file_give_the_same_ids(tok_dir):
    from pathlib import Path

    from transformers import AutoTokenizer

    from workloads.families import build_tokenizer

    mmkd = AutoTokenizer.from_pretrained(tok_dir)
    # LLaVA's tokens are mmkd's own: its vocabulary (and so its presets) stays as it was
    assert build_tokenizer("llava", tok_dir).get_vocab() == mmkd.get_vocab()
    for name in ("qwen2_vl", "gemma3", "idefics3"):
        a = build_tokenizer(name, tok_dir)
        b = build_tokenizer(name, str(Path(tok_dir) / "tokenizer.json"))
        assert a.get_vocab() == b.get_vocab() and a.pad_token_id == b.pad_token_id
        # the family's tokens come after the trained vocabulary, whose ids are unchanged
        assert {t: a.get_vocab()[t] for t in mmkd.get_vocab()} == mmkd.get_vocab()
        new = [t for _, t in FAMILIES[name].named_tokens if t not in mmkd.get_vocab()]
        assert new and all(a.convert_tokens_to_ids(t) >= len(mmkd) for t in new)
