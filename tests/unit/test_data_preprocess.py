"""Preprocessing without Ray: label masking token by token, image tokens, bad samples, collate."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from workloads.data.collate import collate
from workloads.data.preprocess import IGNORE_INDEX, Preprocessor, SampleError, encode_conversation
from workloads.data.processor import load_processor
from workloads.data.quality import SampleQuality
from mmkd_test_plugins.data_tiny import build_tiny_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny"), num_samples=40)


@pytest.fixture(scope="module")
def spec(tiny):
    return load_processor(tiny["processor"])


def _png(color=(255, 0, 0)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buf, format="PNG")
    return buf.getvalue()


CONV = [{"from": "human", "value": "<image>\nWhat color is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many objects are there?"},
        {"from": "gpt", "value": "3"}]


def test_labels_cover_exactly_the_assistant_replies_and_their_end_token(spec):
    tok = spec.tokenizer
    enc = encode_conversation(CONV, True, spec, max_length=512)
    pieces = [tok.convert_ids_to_tokens(int(i)) for i in enc.input_ids]
    n = spec.num_image_tokens
    assert n == 16
    expected_text = ("<|im_start|>user\n" + "<image>" * n + "\nWhat color is the circle?<|im_end|>\n"
                     "<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\n"
                     "How many objects are there?<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n")
    assert tok.decode(enc.input_ids.tolist()) == expected_text
    labelled = [p for p, lab in zip(pieces, enc.labels) if lab != IGNORE_INDEX]
    assert tok.convert_tokens_to_string(labelled) == "red<|im_end|>3<|im_end|>"
    for i, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, i)
    # Token by token: the user role markers and the newline after a reply are not labels.
    assert pieces[:3] == ["<|im_start|>", "user", "Ċ"] and set(enc.labels[:3]) == {IGNORE_INDEX}
    end = tok.convert_tokens_to_ids("<|im_end|>")
    label_ends = [k for k, lab in enumerate(enc.labels) if lab == end]
    assert len(label_ends) == 2 and enc.labels[label_ends[0] + 1] == IGNORE_INDEX
    assert enc.input_ids.dtype == np.int64 and enc.labels.dtype == np.int64


def test_image_token_count_matches_llava_processor_and_model(spec, tiny):
    from PIL import Image
    from transformers import (AutoProcessor, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, SiglipVisionConfig)

    proc = AutoProcessor.from_pretrained(tiny["processor"])
    theirs = proc(text="<image>\nhi", images=Image.new("RGB", (20, 12)), return_tensors="pt")
    assert int((theirs["input_ids"] == spec.image_token_id).sum()) == spec.num_image_tokens

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(spec.tokenizer), hidden_size=16,
                                intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2),
        image_token_id=spec.image_token_id, vision_feature_select_strategy="full",
        vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).eval()
    pre = Preprocessor(tiny["processor"], max_length=128, quality=None)
    rows = pre({"key": np.array(["a", "b"], object), "source": np.array(["s", "s"], object),
                "image": np.array([_png(), _png((0, 0, 255))], object),
                "conversations": np.array([json.dumps(CONV), json.dumps(CONV[:2])], object),
                "extra": np.array(["{}", "{}"], object), "bad": np.array(["", ""], object)})
    batch = collate(rows, spec.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("conv,has_image,kind", [
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}], False,
     "image_token_mismatch"),
    ([{"from": "human", "value": "<image>\n<image>\nhi"}, {"from": "gpt", "value": "x"}], True,
     "image_token_mismatch"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], True,
     "image_token_mismatch"),
    ([{"from": "human", "value": "hi"}], False, "malformed_json"),
])
def test_bad_conversations_raise_their_kind(spec, conv, has_image, kind):
    with pytest.raises(SampleError) as e:
        encode_conversation(conv, has_image, spec, max_length=512)
    assert e.value.kind == kind


def test_image_without_token_gets_it_prepended(spec):
    conv = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "x"}]
    enc = encode_conversation(conv, True, spec, max_length=512)
    assert int((enc.input_ids == spec.image_token_id).sum()) == spec.num_image_tokens
    text_only = encode_conversation(conv, False, spec, max_length=512)
    assert spec.image_token_id not in text_only.input_ids


def test_truncation_keeps_labels_or_drops(spec):
    full = encode_conversation(CONV, True, spec, max_length=512)
    first_reply_end = int(np.nonzero(full.labels != IGNORE_INDEX)[0][1]) + 1
    cut = encode_conversation(CONV, True, spec, max_length=first_reply_end)
    assert cut.truncated and len(cut.input_ids) == first_reply_end
    assert (cut.labels == full.labels[:first_reply_end]).all()
    with pytest.raises(SampleError, match="no assistant token") as e:
        encode_conversation(CONV, True, spec, max_length=first_reply_end - 2)
    assert e.value.kind == "too_long"
    with pytest.raises(SampleError, match="image tokens"):
        encode_conversation(CONV, True, spec, max_length=10)


def test_preprocessor_counts_every_bad_kind_and_keeps_good_rows(tiny):
    quality = SampleQuality.create(max_bad_fraction=1.0, use_ray=False, name="unit")
    pre = Preprocessor(tiny["processor"], max_length=40, quality=quality)
    good = json.dumps(CONV[:2])
    long_conv = json.dumps([{"from": "human", "value": "<image>\n" + "word " * 60},
                            {"from": "gpt", "value": "x"}])
    rows = [("ok", _png(), good, ""), ("text", None, json.dumps(
                [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]), ""),
            ("corrupt", _png()[:40], good, ""), ("noimg", None, good, ""),
            ("flagged", None, "[]", "missing_image"), ("long", _png(), long_conv, "")]
    out = pre({"key": np.array([r[0] for r in rows], object),
               "source": np.array(["shard-0.tar"] * len(rows), object),
               "image": np.array([r[1] for r in rows], object),
               "conversations": np.array([r[2] for r in rows], object),
               "extra": np.array(["{}"] * len(rows), object),
               "bad": np.array([r[3] for r in rows], object)})
    assert out["has_image"].tolist() == [True, False]
    assert out["pixel_values"].shape == (2, 3, 32, 32) and out["pixel_values"].dtype == np.float32
    assert not out["pixel_values"][1].any() and out["pixel_values"][0].any()
    m = quality.metrics()
    assert m["data/seen"] == 6
    assert (m["data/skipped_corrupt_image"], m["data/skipped_image_token_mismatch"],
            m["data/skipped_missing_image"], m["data/skipped_too_long"]) == (1, 1, 1, 1)
    warnings = "\n".join(quality.warnings())
    for key in ("corrupt", "noimg", "flagged", "long"):
        assert f"shard-0.tar:{key}" in warnings


def test_collate_pads_right():
    batch = {"input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
             "labels": np.array([np.array([-100, 6, 7]), np.array([8])], dtype=object),
             "pixel_values": np.ones((2, 3, 4, 4), np.float32),
             "has_image": np.array([True, False])}
    out = collate(batch, pad_token_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["input_ids"].dtype == out["labels"].dtype == torch.long
    assert out["pixel_values"].shape == (2, 3, 4, 4) and out["has_image"].tolist() == [True, False]
    same_length = dict(batch, input_ids=np.array([[1, 2], [3, 4]]), labels=np.array([[1, 2], [3, 4]]))
    assert collate(same_length, 0)["input_ids"].shape == (2, 2)


def test_llava_rows_and_batches_keep_their_exact_columns(tiny, spec):
    """The family data path (tests/unit/test_family_data.py) leaves LLaVA dirs as they were:
    no `mm`/`family` columns, one pixel row per sample, images picked by has_image."""
    from workloads.train_loop_parts import model_inputs

    assert spec.family == "llava" and spec.parts is None
    pre = Preprocessor(tiny["processor"], max_length=128, quality=None)
    text = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    rows = pre({"key": np.array(["a", "b"], object), "source": np.array(["s", "s"], object),
                "image": np.array([None, _png()], object),
                "conversations": np.array([json.dumps(text), json.dumps(CONV)], object),
                "extra": np.array(["{}", "{}"], object), "bad": np.array(["", ""], object)})
    assert set(rows) == {"input_ids", "labels", "pixel_values", "has_image"}
    batch = collate(rows, spec.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "has_image"}
    inputs = model_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    assert torch.equal(inputs["pixel_values"], batch["pixel_values"][1:])
