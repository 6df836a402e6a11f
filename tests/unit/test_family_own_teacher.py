"""Response KD from a same-family teacher that tokenizes images differently (issue #15: SmolVLM2-
2.2B vs 256M/500M tile differently): the data path encodes every row with both processors, in
one Preprocessor call, and collate hands the teacher's encoding over under ``teacher_`` keys,
which ``DistillLoss(teacher_inputs="own")`` runs the teacher on. A tiny SmolVLM pair whose
student resizes images to one tile (the teacher splits them into 2x2 tiles + a global image)."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from family_fixtures import webdataset_shard
import torch

from orchestrator.plugin import StageContext
from workloads import families
from workloads.data.collate import collate
from workloads.data.preprocess import IGNORE_INDEX, Preprocessor, rows_to_columns
from workloads.data.processor import load_processor
from workloads.data.quality import SampleQuality
from workloads.distill_loss import DistillLoss
from workloads.train_loop_parts import StepContext

FAMILY = "smolvlm"
Q = {"from": "human", "value": "<image>\nWhat color is the shape?"}
A = {"from": "gpt", "value": "It is a red square."}
CONV = [Q, A]
NO_MARKER = [{"from": "human", "value": "What color is the shape?"}, A]  # <image> prepended
TEXT = [{"from": "human", "value": "Describe the picture."}, {"from": "gpt", "value": "A square."}]


def _png(h: int, w: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _row(key: str, conv, image: bytes | None, bad: str = "") -> dict:
    """A reader row (see workloads/data/readers.py)."""
    return {"key": key, "source": "shard-0.tar", "image": image,
            "conversations": json.dumps(conv), "bad": bad, "extra": "{}"}


ROWS = [_row("wide", CONV, _png(30, 50)), _row("text", TEXT, None),
        _row("tall", NO_MARKER, _png(64, 20, seed=2))]


def _quality() -> SampleQuality:
    return SampleQuality.create(max_bad_fraction=1.0, use_ray=False, name="unit")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """{"teacher": dir, "student": dir}: one tokenizer; the student's image processor resizes
    to a single 32 px tile where the teacher's splits a 64 px canvas into 32 px tiles."""
    from workloads.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("own")
    texts = [Q["value"], A["value"], TEXT[0]["value"], TEXT[1]["value"]] * 20
    tok = str(train_tokenizer(texts, root / "tok", vocab_size=320))
    teacher = families.build_tiny(FAMILY, "teacher", tok, str(root / "teacher"))
    student = families.build_tiny(FAMILY, "student", tok, str(root / "student"))
    parts = families.load_processor_parts(student)
    ip = families.build_image_processor(FAMILY, size={"longest_edge": 32},
                                        max_image_size={"longest_edge": 32},
                                        do_image_splitting=True)
    families.save_processor_parts(replace(parts, image_processor=ip), student)
    return {"teacher": teacher, "student": student}


def _assert_columns_equal(a: dict, b: dict, keys) -> None:
    for key in keys:
        assert len(a[key]) == len(b[key]), key
        for x, y in zip(a[key], b[key]):
            if isinstance(x, (bytes, str)):
                assert x == y, key
            else:
                np.testing.assert_array_equal(x, y, err_msg=key)


def test_the_pair_needs_the_teachers_own_encoding(pair):
    from workloads.distill import DistillConfig, check_distill_pair

    spec = {"path": pair["student"]}
    kd_res = DistillConfig(max_steps=1, beta=0, gamma=0)
    assert check_distill_pair(kd_res, spec, None, pair["teacher"]) == "own"


def test_every_row_is_encoded_by_both_processors(pair):
    rows = rows_to_columns(ROWS)
    both = Preprocessor(pair["student"], max_length=512, quality=None, keep_keys=True,
                        teacher_dir=pair["teacher"])(rows)
    student = Preprocessor(pair["student"], max_length=512, quality=None, keep_keys=True)(rows)
    teacher = Preprocessor(pair["teacher"], max_length=512, quality=None)(rows)
    # the student's columns (and their order) are exactly those without the teacher
    assert list(both)[:len(student) - 1] == [k for k in student if k != "key"]
    _assert_columns_equal(both, student, student)
    assert set(both) == set(student) | {"teacher_" + k for k in teacher if k != "has_image"}
    _assert_columns_equal(both, {"teacher_" + k: v for k, v in teacher.items()},
                          ["teacher_" + k for k in teacher if k != "has_image"])
    assert set(both["teacher_family"]) == {FAMILY}
    image_id = load_processor(pair["student"]).image_token_id
    for i, has in enumerate(both["has_image"]):
        s_ids, t_ids = both["input_ids"][i], both["teacher_input_ids"][i]
        n_s, n_t = int((s_ids == image_id).sum()), int((t_ids == image_id).sum())
        assert (n_s < n_t) if has else (n_s == n_t == 0)  # the teacher tiles, the student not
        s_lab, t_lab = both["labels"][i], both["teacher_labels"][i]
        # the same reply tokens in both: L_res pairs them in order
        np.testing.assert_array_equal(s_lab[s_lab != IGNORE_INDEX], t_lab[t_lab != IGNORE_INDEX])
        assert (s_lab != IGNORE_INDEX).any()


def test_collate_gives_the_teacher_batch_under_teacher_keys(pair):
    rows = rows_to_columns(ROWS)
    spec = load_processor(pair["student"])
    both = Preprocessor(pair["student"], max_length=512, quality=None,
                        teacher_dir=pair["teacher"])(rows)
    alone_s = Preprocessor(pair["student"], max_length=512, quality=None)(rows)
    alone_t = Preprocessor(pair["teacher"], max_length=512, quality=None)(rows)
    for multiple in (None, 8):
        batch = collate(both, spec.pad_token_id, pad_to_multiple_of=multiple)
        want_s = collate(alone_s, spec.pad_token_id, pad_to_multiple_of=multiple)
        want_t = collate(alone_t, spec.pad_token_id, pad_to_multiple_of=multiple)
        assert set(batch) == set(want_s) | {"teacher_" + k for k in want_t}
        for key in ("input_ids", "attention_mask", "labels", "pixel_values",
                    "pixel_attention_mask", "has_image", "mm_digest"):
            assert torch.equal(batch[key], want_s[key]), key
            assert torch.equal(batch["teacher_" + key], want_t[key]), key
        assert batch["teacher_input_ids"].shape[1] > batch["input_ids"].shape[1]
        assert batch["teacher_pixel_values"].shape[1] > batch["pixel_values"].shape[1]  # tiles


def test_a_row_bad_for_either_processor_is_dropped_and_counted_once(pair):
    """max_length=100: the wide image's 2x2 tiles + global image leave the teacher no reply
    token (too_long for the teacher only); a reader-flagged row is counted once too."""
    rows = rows_to_columns(ROWS + [_row("broken", CONV, None, bad="corrupt_image")])
    quality = _quality()
    out = Preprocessor(pair["student"], max_length=100, quality=quality, keep_keys=True,
                       teacher_dir=pair["teacher"])(rows)
    metrics = quality.metrics()
    assert [str(k) for k in out["key"]] == ["shard-0.tar/text", "shard-0.tar/tall"]
    assert len(out["teacher_input_ids"]) == 2
    assert metrics["data/skipped_too_long"] == 1 and metrics["data/skipped_corrupt_image"] == 1
    assert "wide (teacher processor: no assistant token left" in "\n".join(quality.warnings())
    alone = Preprocessor(pair["student"], max_length=100, quality=None)(rows)
    assert len(alone["input_ids"]) == 3  # the student alone keeps the wide row


def test_a_reply_cut_by_max_length_is_paired_on_its_common_prefix(pair):
    """The teacher's longer encoding cuts the reply at max_length: the student's surplus reply
    tokens are unlabelled so both carry the same reply tokens (counted as truncated once)."""
    rows = rows_to_columns([_row("wide", CONV, _png(30, 50))])
    full = Preprocessor(pair["teacher"], max_length=1024, quality=None)(rows)
    t_reply = np.flatnonzero(full["labels"][0] != IGNORE_INDEX)
    cut_at = int(t_reply[0]) + 3  # three reply tokens left for the teacher
    quality = _quality()
    out = Preprocessor(pair["student"], max_length=cut_at, quality=quality,
                       teacher_dir=pair["teacher"])(rows)
    assert quality.metrics()["data/truncated"] == 1
    s_lab, t_lab = out["labels"][0], out["teacher_labels"][0]
    assert len(out["teacher_input_ids"][0]) == cut_at
    assert int((t_lab != IGNORE_INDEX).sum()) == int((s_lab != IGNORE_INDEX).sum()) == 3
    np.testing.assert_array_equal(s_lab[s_lab != IGNORE_INDEX], t_lab[t_lab != IGNORE_INDEX])
    student = Preprocessor(pair["student"], max_length=cut_at, quality=None)(rows)
    np.testing.assert_array_equal(out["input_ids"][0], student["input_ids"][0])  # not cut


def _sctx():
    stage = StageContext(pipeline="t", stage="dft", key="k", output_dir="/tmp/unused")
    return StepContext(step=0, total_steps=1, rank=0, world_size=1, device=torch.device("cpu"),
                       dtype=torch.float32, stage=stage)


def test_response_kd_runs_the_teacher_on_its_own_encoding(pair):
    from transformers import AutoModelForImageTextToText

    spec = load_processor(pair["student"])
    rows = Preprocessor(pair["student"], max_length=512, quality=None,
                        teacher_dir=pair["teacher"])(rows_to_columns(ROWS))
    batch = collate(rows, spec.pad_token_id)
    torch.manual_seed(0)
    student = AutoModelForImageTextToText.from_pretrained(pair["student"]).train()
    loss = DistillLoss(vocab_size=len(spec.tokenizer), image_token_id=spec.image_token_id,
                       teacher_dir=pair["teacher"], beta=0, gamma=0, teacher_inputs="own")
    sctx = _sctx()
    loss.setup(student, sctx)
    total, m = loss(student, batch, sctx)
    assert math.isfinite(m["l_res"]) and m["l_res"] > 0 and m["l_vis"] == m["l_rel"] == 0.0
    assert math.isfinite(m["ce"]) and m["loss"] == pytest.approx(m["ce"] + m["l_res"], rel=1e-5)
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert m["teacher_unchanged"] == 1.0


@pytest.fixture(scope="module")
def shard_source(tmp_path_factory):
    from workloads.data.source import DataSource

    root = tmp_path_factory.mktemp("shards")
    webdataset_shard(root / "shard-0.tar", ROWS + [_row("square", CONV, _png(48, 48, seed=3))])
    return DataSource(format="webdataset", paths=str(root))


def test_ray_data_batches_carry_the_teacher_encoding(ray_session, pair, shard_source):
    """Through real map_batches: the batches with the teacher's encoding are the student-only
    batches (same rows, same order) plus teacher_ keys equal to the teacher's own collate."""
    from workloads.data.dataset import build_train_dataset, iter_train_batches
    from workloads.data.readers import iter_rows

    spec = load_processor(pair["student"])
    kw = dict(max_length=512, seed=0, keep_keys=True)

    def batches(ds):
        return list(iter_train_batches(ds, batch_size=2, pad_token_id=spec.pad_token_id,
                                       seed=0, epoch=0, shuffle_window=0))

    ds = build_train_dataset(shard_source, pair["student"], teacher_processor_dir=pair["teacher"],
                             **kw)
    got = batches(ds)
    plain = batches(build_train_dataset(shard_source, pair["student"], **kw))
    assert len(got) == len(plain) == 2
    # one shard: the dataset's order is the shard's; the `teacher_mm` bytes (digested into
    # teacher_mm_digest) and the ragged teacher ids come through Ray unchanged
    local = rows_to_columns(list(iter_rows(shard_source)))
    alone_t = Preprocessor(pair["teacher"], max_length=512, quality=None)(local)
    idx = np.arange(len(alone_t["input_ids"]))
    for b, (g, p) in enumerate(zip(got, plain)):
        assert set(g) == set(p) | {"teacher_" + k for k in p}
        for key in p:
            assert torch.equal(g[key], p[key]), key
        rows = idx[2 * b:2 * b + 2]
        want = collate({k: v[rows] for k, v in alone_t.items()}, spec.pad_token_id)
        for key, value in want.items():
            assert torch.equal(g["teacher_" + key], value), key


def test_run_train_stage_saves_the_teacher_processor_for_own_inputs(pair, shard_source,
                                                                   tmp_path, monkeypatch):
    """run_train_stage learns it from the loss: teacher_inputs="own" -> the teacher's processor
    is saved beside the student's and passed to the dataset; any other loss -> nothing."""
    import workloads.data.dataset as dataset_mod
    from workloads.distill import DistillConfig
    from workloads.pretrain_sft import run_train_stage

    seen = []

    class Stop(Exception):
        pass

    def fake_build(source, proc_dir, max_length, seed, **kw):
        seen.append((proc_dir, kw.get("teacher_processor_dir")))
        raise Stop

    monkeypatch.setattr(dataset_mod, "build_train_dataset", fake_build)
    monkeypatch.setattr(SampleQuality, "create",
                        classmethod(lambda cls, **kw: cls.__new__(cls)))
    config = DistillConfig(max_steps=1, beta=0, gamma=0, data=shard_source)
    spec = load_processor(pair["student"])
    own = DistillLoss(vocab_size=len(spec.tokenizer), image_token_id=spec.image_token_id,
                      teacher_dir=pair["teacher"], beta=0, gamma=0, teacher_inputs="own")
    same = DistillLoss(vocab_size=len(spec.tokenizer), image_token_id=spec.image_token_id,
                       teacher_dir=pair["teacher"], beta=0, gamma=0)
    for i, loss in enumerate((own, same, None)):
        ctx = StageContext(pipeline="t", stage="dft", key="k", output_dir=str(tmp_path / str(i)),
                           inputs={"init": pair["student"], "teacher": pair["teacher"]})
        with pytest.raises(Stop):
            run_train_stage(config, ctx, loss_fn=loss)
    (_, teacher_proc), (_, none1), (_, none2) = seen
    assert none1 is None and none2 is None
    assert teacher_proc == str(tmp_path / "0" / "_teacher_processor")
    # the saved processor encodes exactly as the teacher's model dir does
    rows = rows_to_columns(ROWS)
    a = Preprocessor(pair["student"], 512, None, teacher_dir=teacher_proc)(rows)
    b = Preprocessor(pair["student"], 512, None, teacher_dir=pair["teacher"])(rows)
    _assert_columns_equal(a, b, list(b))
