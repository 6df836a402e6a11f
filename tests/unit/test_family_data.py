"""The data path for every VLM family (issue #15, point 2): reader rows -> Preprocessor (the
family's chat template, image-token expansion, image processor; labels on assistant turns) ->
one binary ``mm`` column -> collate (the family's pixel layout) -> model_inputs -> a tiny model
of the family; the offline teacher's row digests; and one pass through real Ray Data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from family_fixtures import webdataset_shard
import torch

from workloads.data.collate import collate, make_collate_fn
from workloads.data.preprocess import (IGNORE_INDEX, Preprocessor, conversation_messages,
                                       rows_to_columns, unpack_image_inputs)
from workloads.data.processor import load_processor
from workloads.data.quality import SampleQuality
from workloads.teacher.payload import row_digests
from workloads.families import (FAMILIES, encode, load_processor_parts, save_processor_parts,
                                tiny_config, tiny_model, tiny_processor_parts)
from workloads.train_loop_parts import model_inputs

NAMES = sorted(FAMILIES)
Q = {"from": "human", "value": "<image>\nWhat color is the shape?"}
A = {"from": "gpt", "value": "It is a red square."}
CONV = [Q, A]
NO_MARKER = [{"from": "human", "value": "What color is the shape?"}, A]  # <image> prepended
TEXT = [{"from": "human", "value": "Describe the picture."}, {"from": "gpt", "value": "A square."}]
TWO_ROUNDS = CONV + [{"from": "human", "value": "And its shape?"},
                     {"from": "gpt", "value": "A square."}]


def _png(h: int, w: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _row(key: str, conv, image: bytes | None) -> dict:
    """A reader row (see workloads/data/readers.py)."""
    return {"key": key, "source": "shard-0.tar", "image": image,
            "conversations": json.dumps(conv), "bad": "", "extra": "{}"}


# two image sizes (different token counts / tiles / patches for the variable families) and a
# text-only row in between
ROWS = [_row("wide", CONV, _png(30, 50)), _row("text", TEXT, None),
        _row("tall", NO_MARKER, _png(64, 20, seed=2))]


def _image(data: bytes | None):
    from workloads.data.preprocess import decode_image

    return None if data is None else decode_image(data)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from workloads.data.tokenizer import train_tokenizer

    texts = [Q["value"], A["value"], TEXT[0]["value"], TEXT[1]["value"], "And its shape?"] * 20
    return str(train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=320))


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory, tok_dir):
    """family -> a processor dir as the family's model dirs carry it (no config.json)."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            out = str(tmp_path_factory.mktemp(f"proc_{name}"))
            cache[name] = save_processor_parts(tiny_processor_parts(name, tok_dir), out)
        return cache[name]

    return get


def _quality() -> SampleQuality:
    return SampleQuality.create(max_bad_fraction=1.0, use_ray=False, name="unit")


@pytest.mark.parametrize("name", NAMES)
def test_processor_spec_names_the_family_and_its_image_token(name, proc_dir, tok_dir):
    spec = load_processor(proc_dir(name))
    family = FAMILIES[name]
    assert spec.family == name and spec.image_token == family.image_token
    assert (spec.parts is None) == (name == "llava")
    config = tiny_config(name, "student", tiny_processor_parts(name, tok_dir).tokenizer)
    # the mask token is what the model replaces with features (config.image_token_id)
    assert spec.image_token_id == int(getattr(config, "image_token_id", None)
                                      or config.image_token_index)
    if family.image_tokens == "fixed":
        assert spec.num_image_tokens == 16 and spec.image_size == (32, 32)
    else:
        assert spec.num_image_tokens is None


@pytest.mark.parametrize("name", ["gemma3", "llava_next"])
def test_a_model_dir_is_recognised_by_its_config(name, tmp_path, tok_dir, proc_dir):
    """The family comes from config.json; the image mask token is config.image_token_id (Gemma 3:
    the soft token, not <start_of_image>); the offline teacher's tokenization fingerprint of
    the model dir equals that of a processor-only dir (what distill saves for the student)."""
    from workloads.teacher.offline import tokenization_fingerprint
    from workloads.families import build_tiny

    path = build_tiny(name, "student", tok_dir, str(tmp_path / name))
    spec = load_processor(path)
    config = json.load(open(tmp_path / name / "config.json"))
    config_id = config.get("image_token_id", config.get("image_token_index"))
    assert spec.family == name and spec.image_token_id == config_id
    if name == "gemma3":
        assert spec.image_token_id != spec.tokenizer.convert_tokens_to_ids("<start_of_image>")
    assert tokenization_fingerprint(path, 64) == tokenization_fingerprint(proc_dir(name), 64)
    assert tokenization_fingerprint(path, 64) != tokenization_fingerprint(path, 65)
    config["model_type"] = "mllama"
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: model_type 'mllama' is not a supported"):
        load_processor(path)


@pytest.mark.parametrize("name", NAMES)
def test_rows_encode_as_the_family_does(name, proc_dir):
    path = proc_dir(name)
    parts = load_processor_parts(path)
    out = Preprocessor(path, max_length=512, quality=None, keep_keys=True)(rows_to_columns(ROWS))
    columns = {"input_ids", "labels", "has_image", "key"}
    columns |= {"pixel_values"} if name == "llava" else {"mm", "family"}
    assert set(out) == columns and out["has_image"].tolist() == [True, False, True]
    eot = FAMILIES[name].end_of_turn[0]
    for i, row in enumerate(ROWS):
        image = _image(row["image"])
        messages = conversation_messages(json.loads(row["conversations"]), image is not None,
                                         "<image>")
        ref = encode(name, parts, messages, image)
        ids, labels = out["input_ids"][i], out["labels"][i]
        np.testing.assert_array_equal(ids, ref["input_ids"])
        np.testing.assert_array_equal(labels, ref["labels"])
        # labels: exactly the reply and its end-of-turn token, never an image token
        on = labels != IGNORE_INDEX
        assert np.array_equal(labels[on], ids[on]) and not (ids[on] == parts.image_token_id).any()
        reply = json.loads(row["conversations"])[1]["value"]
        assert parts.tokenizer.decode(ids[on].tolist()).strip() == reply + eot
        assert (int((ids == parts.image_token_id).sum()) > 0) == (image is not None)
        if name != "llava":
            inputs = unpack_image_inputs(out["mm"][i])
            key = FAMILIES[name].token_type_key
            if image is None:  # nothing stored; collate's zero token types are encode's
                assert inputs == {} and not (key and ref[key].any())
                continue
            assert set(inputs) == set(ref) - {"input_ids", "labels"}
            for key, value in inputs.items():
                np.testing.assert_array_equal(value, ref[key], err_msg=key)
    if name != "llava":
        assert out["mm"][1] == b"" and set(out["family"]) == {name}


@pytest.mark.parametrize("name", NAMES)
def test_a_mixed_batch_runs_the_family_model_row_by_row(name, proc_dir):
    """Image and text-only rows in one batch: every row gets the logits it gets alone (so
    model_inputs hands each image to its row in every pixel layout), and the offline teacher's
    row digest does not depend on the batch a row is in."""
    path = proc_dir(name)
    spec = load_processor(path)
    rows = Preprocessor(path, max_length=512, quality=None)(rows_to_columns(ROWS))
    batch = make_collate_fn(spec.pad_token_id, pad_to_multiple_of=8)(rows)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and batch["has_image"].tolist() == [True, False, True]
    for key in ("labels", "attention_mask", FAMILIES[name].token_type_key):
        if key:
            assert batch[key].shape == (3, width), key
    model = tiny_model(name, "student", spec.tokenizer).eval()
    with torch.no_grad():
        out = model(**model_inputs(batch), labels=batch["labels"])
    assert out.logits.shape == (3, width, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    digests = row_digests(batch)
    assert len(set(digests)) == 3
    for i in range(3):
        alone = collate({k: v[i:i + 1] for k, v in rows.items()}, spec.pad_token_id)
        assert "pixel_values" in alone  # empty for a text-only batch: the loop casts it
        n = alone["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**model_inputs(alone)).logits[0]
        torch.testing.assert_close(out.logits[i, :n], logits, atol=1e-5, rtol=1e-4)
        assert row_digests(alone) == [digests[i]]
    if name != "llava":  # the digest covers the image inputs: another image, another digest
        other = dict(rows, mm=rows["mm"][[2, 1, 0]])
        other_digests = row_digests(collate(other, spec.pad_token_id))
        assert other_digests[0] != digests[0] and other_digests[1] == digests[1]


@pytest.mark.parametrize("name", NAMES)
def test_truncation_keeps_labels_or_skips_as_too_long(name, proc_dir):
    path = proc_dir(name)
    spec = load_processor(path)
    rows = rows_to_columns([_row("two", TWO_ROUNDS, _png(30, 50))])
    full = Preprocessor(path, max_length=1024, quality=None)(rows)
    ids, labels = full["input_ids"][0], full["labels"][0]
    label_pos = np.flatnonzero(labels != IGNORE_INDEX)
    first_reply_end = int(label_pos[np.flatnonzero(np.diff(label_pos) > 1)[0]]) + 1
    last_image = int(np.flatnonzero(ids == spec.image_token_id)[-1])
    quality = _quality()
    cut = Preprocessor(path, max_length=first_reply_end, quality=quality)(rows)
    assert quality.metrics()["data/truncated"] == 1
    np.testing.assert_array_equal(cut["input_ids"][0], ids[:first_reply_end])
    np.testing.assert_array_equal(cut["labels"][0], labels[:first_reply_end])
    batch = collate(cut, spec.pad_token_id)
    key = FAMILIES[name].token_type_key
    if key:  # text-aligned image inputs are cut with the tokens
        assert batch[key].shape == batch["input_ids"].shape
        assert torch.equal(batch[key][0].bool(), batch["input_ids"][0] == spec.image_token_id)
    for max_length, why in ((last_image, "cut through the image tokens"),
                            (int(label_pos[0]), "no assistant token")):
        quality = _quality()
        out = Preprocessor(path, max_length=max_length, quality=quality)(rows)
        assert len(out["input_ids"]) == 0 and quality.metrics()["data/skipped_too_long"] == 1
        assert why in "\n".join(quality.warnings())


@pytest.mark.parametrize("name,conv,image,why", [
    ("qwen2_vl", [{"from": "human", "value": "<|image_pad|> hi"}, A], _png(32, 32),
     "<|image_pad|> (qwen2_vl's image token)"),
    ("gemma3", [{"from": "human", "value": "a <image_soft_token>"}, A], None,
     "<image_soft_token> (gemma3's image token)"),
    ("internvl", [Q, A], None, "<image> but no image"),
    ("idefics3", [Q, Q, A], _png(32, 32), "2 <image> tokens"),
])
def test_image_token_mismatches_are_skipped(name, conv, image, why, proc_dir):
    quality = _quality()
    out = Preprocessor(proc_dir(name), max_length=512, quality=quality)(
        rows_to_columns([_row("bad", conv, image), ROWS[1]]))
    assert out["has_image"].tolist() == [False]
    assert quality.metrics()["data/skipped_image_token_mismatch"] == 1
    assert why in "\n".join(quality.warnings())


def test_offline_teacher_full_topk_equals_online(proc_dir, tmp_path):
    """k = vocab size on a Qwen2-VL batch: stored top-k terms equal the online losses, found by
    row digest (pixels are concatenated over the batch, so the digest comes from collate)."""
    from workloads.teacher.offline import INDEX, MANIFEST, OfflineTeacher, ShardWriter
    from workloads.teacher.payload import teacher_entries
    from workloads.families import image_token_id
    from workloads.kd_terms import KDBatch, get_kd_term
    from workloads.losses import (align_vocab, relation_kd_loss, response_kd_loss,
                                  visual_kd_loss)

    path = proc_dir("qwen2_vl")
    spec = load_processor(path)
    batch = collate(Preprocessor(path, max_length=512, quality=None)(rows_to_columns(ROWS)),
                    spec.pad_token_id)
    teacher = tiny_model("qwen2_vl", "teacher", spec.tokenizer).eval()
    student = tiny_model("qwen2_vl", "student", spec.tokenizer, seed=1).eval()
    vocab, image_id = len(spec.tokenizer), image_token_id(teacher.config)
    with torch.no_grad():
        t = teacher(**model_inputs(batch)).logits
        s = student(**model_inputs(batch)).logits
    out_dir = tmp_path / "logits"
    writer = ShardWriter(str(out_dir), shard_size=2)
    for i, (d, e) in enumerate(zip(row_digests(batch),
                                   teacher_entries(t, batch, vocab, image_id, top_k=10**6))):
        writer.add(d, f"k{i}", e)
    writer.flush()
    json.dump({"rows": writer.index, "keys": writer.keys}, open(out_dir / INDEX, "w"))
    json.dump({"top_k": vocab}, open(out_dir / MANIFEST, "w"))
    mask = batch["input_ids"] == image_id
    stored = KDBatch(*OfflineTeacher(str(out_dir), vocab).rows(s, batch, None, mask), "fkl", 1.0, None)
    off = {f"l_{n}": get_kd_term(n).loss(stored) for n in ("res", "vis", "rel")}
    sa, ta = align_vocab(s, t, vocab)
    on = {"l_res": response_kd_loss(sa, ta, batch["labels"], kind="fkl"),
          "l_vis": visual_kd_loss(sa, ta, mask, kind="fkl"),
          "l_rel": relation_kd_loss(sa, ta, mask)}
    for key, value in on.items():
        assert float(off[key]) == pytest.approx(float(value), rel=1e-4, abs=1e-6), key


def test_qwen2_vl_rows_round_trip_through_ray_data(ray_session, proc_dir, tmp_path):
    """Ragged pixels through a real map_batches: the `mm` bytes, the ragged ids and the
    collated batch equal the in-process ones."""
    from workloads.data.dataset import build_train_dataset, iter_train_batches
    from workloads.data.readers import iter_rows
    from workloads.data.source import DataSource

    path = proc_dir("qwen2_vl")
    spec = load_processor(path)
    rows = ROWS + [_row("square", CONV, _png(48, 48, seed=3))]
    (tmp_path / "data").mkdir()
    webdataset_shard(tmp_path / "data" / "shard-0.tar", rows)
    source = DataSource(format="webdataset", paths=str(tmp_path / "data"))
    local = Preprocessor(path, max_length=512, quality=None, keep_keys=True)(
        rows_to_columns(list(iter_rows(source))))
    order = {str(k): i for i, k in enumerate(local["key"])}
    ds = build_train_dataset(source, path, max_length=512, seed=0, keep_keys=True)
    raw = next(iter(ds.iter_batches(batch_size=4, batch_format="numpy")))
    assert raw["mm"].dtype == object  # bytes objects, not NUL-stripped fixed-width strings
    remote = ds.take_all()
    assert sorted(r["key"] for r in remote) == sorted(order)
    for r in remote:
        i = order[str(r["key"])]
        assert isinstance(r["mm"], bytes) and r["mm"] == local["mm"][i]
        np.testing.assert_array_equal(r["input_ids"], local["input_ids"][i])
        assert r["family"] == "qwen2_vl" and r["has_image"] == local["has_image"][i]
    batches = list(iter_train_batches(ds, batch_size=4, pad_token_id=spec.pad_token_id, seed=0,
                                      epoch=0, shuffle_window=0))
    assert len(batches) == 1
    (got,) = batches
    idx = [order[str(r["key"])] for r in remote]  # the dataset's (file) order
    want = collate({k: v[idx] for k, v in local.items()}, spec.pad_token_id)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert got["image_grid_thw"].shape == (3, 3)
    assert got["pixel_values"].shape[0] == int(got["image_grid_thw"].prod(1).sum())


def test_an_image_row_without_its_token_types_is_refused(proc_dir):
    """Zero token types would silently move Qwen's M-RoPE positions: collate says what's missing."""
    from workloads.data.preprocess import pack_image_inputs

    path = proc_dir("qwen2_vl")
    rows = Preprocessor(path, max_length=512, quality=None)(rows_to_columns(ROWS))
    inputs = unpack_image_inputs(rows["mm"][0])
    del inputs["mm_token_type_ids"]
    rows["mm"][0] = pack_image_inputs(inputs)
    with pytest.raises(ValueError, match="row 0 has an image but its `mm` inputs lack "
                                         "'mm_token_type_ids'"):
        collate(rows, 0)
