"""The distill loss strategy and its stage-start checks on hand-built tiny batches (no Ray)."""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.plugin import StageContext
from workloads.data.collate import collate
from workloads.distill import DistillCompatError, DistillConfig, validate_distill
from workloads.distill_loss import DistillLoss
from workloads.families.pairing import check_teacher_student
from workloads.teacher.offline import ShardWriter
from workloads.teacher.payload import row_digests, teacher_entries
from workloads.models import build_model, load_model, save_model
from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer, shapes_rows
from workloads.train_loop_parts import StepContext, model_inputs

TERMS = ("loss", "ce", "l_res", "l_vis", "l_rel")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_unit")
    tok_dir = build_tiny_tokenizer(str(root / "tok"))
    torch.manual_seed(0)
    teacher, proc = build_model({"preset": "tiny-teacher"}, tok_dir)
    teacher_dir = save_model(teacher, proc, str(root / "teacher"))
    tok = proc.tokenizer
    rows = shapes_rows(tok, 6, seed=0)  # row 4 is text-only
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    cols["input_ids"] = _ragged(cols["input_ids"])
    cols["labels"] = _ragged(cols["labels"])
    batch = collate(cols, tok.pad_token_id)
    return {"root": root, "tok_dir": tok_dir, "tok": tok, "teacher_dir": teacher_dir,
            "batch": batch}


def _ragged(seqs):
    import numpy as np

    out = np.empty(len(seqs), dtype=object)
    out[:] = [np.asarray(x, dtype=np.int64) for x in seqs]
    return out


def _sctx(deepspeed=None):
    stage = StageContext(pipeline="t", stage="distill", key="k", output_dir="/tmp/unused",
                         deepspeed=deepspeed or {})
    return StepContext(step=0, total_steps=1, rank=0, world_size=1, device=torch.device("cpu"),
                       dtype=torch.float32, stage=stage)


def _loss(tiny, **kw):
    tok = tiny["tok"]
    kw.setdefault("teacher_dir", tiny["teacher_dir"])
    return DistillLoss(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                       **kw)


def _run(loss_fn, student, batch):
    sctx = _sctx()
    loss_fn.setup(student, sctx)
    return loss_fn(student, batch, sctx)


def test_student_equal_to_teacher_has_zero_kd_terms(tiny):
    student = load_model(tiny["teacher_dir"])[0]
    total, m = _run(_loss(tiny), student, tiny["batch"])
    assert set(TERMS) <= set(m)
    assert m["l_res"] == pytest.approx(0, abs=1e-6)
    assert m["l_vis"] == pytest.approx(0, abs=1e-6)
    assert m["l_rel"] == pytest.approx(0, abs=1e-6)
    assert m["loss"] == pytest.approx(m["ce"], abs=1e-5)
    assert m["teacher_unchanged"] == 1.0  # the single step is the last one


def test_kd_terms_are_positive_and_weighted_and_backprop(tiny):
    torch.manual_seed(1)
    student = build_model({"preset": "tiny-student"}, tiny["tok_dir"])[0]
    total, m = _run(_loss(tiny, alpha=1.0, beta=2.0, gamma=0.5), student, tiny["batch"])
    assert m["l_res"] > 0 and m["l_vis"] > 0 and m["l_rel"] > 0
    assert m["loss"] == pytest.approx(m["ce"] + m["l_res"] + 2 * m["l_vis"] + 0.5 * m["l_rel"],
                                      rel=1e-5)
    total.backward()
    proj = student.model.multi_modal_projector
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_a_plugin_kd_term_is_added_with_its_weight_and_logged(tiny):
    torch.manual_seed(1)
    student = build_model({"preset": "tiny-student"}, tiny["tok_dir"])[0]
    _, base = _run(_loss(tiny), student, tiny["batch"])
    _, m = _run(_loss(tiny, terms={"argmax_ce": {"weight": 0.25, "min_confidence": 0.0}}),
                student, tiny["batch"])
    assert m["l_argmax_ce"] > 0 and {k: m[k] for k in TERMS if k != "loss"} == \
        {k: base[k] for k in TERMS if k != "loss"}  # the built-ins as without it
    assert m["loss"] == pytest.approx(base["loss"] + 0.25 * m["l_argmax_ce"], rel=1e-6)
    # terms only: not `sft`, so validate has nothing to say about the weights
    config = DistillConfig(max_steps=1, alpha=0, beta=0, gamma=0, terms={"argmax_ce": 1})
    assert not any("sft" in p for p in validate_distill(config, {"init": "a", "teacher": "b"}))


def test_a_teacher_on_its_own_encoding_refuses_the_terms_that_read_images(tiny):
    with pytest.raises(DistillCompatError, match="the terms vis, rel read image positions"):
        _loss(tiny, teacher_inputs="own")
    _loss(tiny, teacher_inputs="own", beta=0, gamma=0, terms={"argmax_ce": 1})  # response only


def test_zero_weights_give_plain_ce_and_skip_the_teacher(tiny):
    torch.manual_seed(1)
    student = build_model({"preset": "tiny-student"}, tiny["tok_dir"])[0]
    _, m = _run(_loss(tiny, alpha=0, beta=0, gamma=0), student, tiny["batch"])
    ce = student(**model_inputs(tiny["batch"]), labels=tiny["batch"]["labels"]).loss
    assert m["loss"] == pytest.approx(float(ce.detach()), rel=1e-6) and m["ce"] == m["loss"]
    assert m["l_res"] == m["l_vis"] == m["l_rel"] == 0.0


def test_teacher_is_frozen_and_in_eval_mode(tiny):
    sctx = _sctx()
    _loss(tiny).setup(None, sctx)
    teacher = sctx.state["teacher"].model
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_vocab_mismatch_names_both_dirs_and_the_difference(tiny, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(tiny["tok"].get_vocab())
    vocab["zebra"] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    other = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>",
                                    pad_token="<|pad|>", unk_token="<unk>",
                                    additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"])
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(DistillCompatError) as e:
        check_teacher_student(tiny["teacher_dir"], str(tmp_path / "other"), (32, 16))
    msg = str(e.value)
    assert tiny["teacher_dir"] in msg and str(tmp_path / "other") in msg
    assert "zebra" in msg and "vocabularies differ" in msg


def test_image_token_count_mismatch_is_an_error(tiny):
    check_teacher_student(tiny["teacher_dir"], tiny["tok_dir"], (32, 16))  # matching: fine
    with pytest.raises(DistillCompatError, match="image tokens differ.*16 tokens.*64"):
        check_teacher_student(tiny["teacher_dir"], tiny["tok_dir"], (32, 64))


def test_validate_checks_the_wiring():
    cfg = DistillConfig(model={"preset": "tiny-student"}, max_steps=2)
    assert any("needs input `teacher" in p for p in validate_distill(cfg, {"data": "d.shards"}))
    assert validate_distill(cfg, {"teacher": "t.model", "tokenizer": "tok.tokenizer"}) == []
    off = DistillConfig(max_steps=2, teacher="offline")
    probs = validate_distill(off, {"init": "s.model", "teacher": "t.model"})
    assert any("teacher_logits" in p for p in probs) and any("does not use" in p for p in probs)
    assert validate_distill(DistillConfig(max_steps=1, alpha=0, beta=0, gamma=0),
                            {"init": "a", "teacher": "b"})


def test_offline_full_topk_equals_online(tiny, tmp_path):
    """k = vocab size: the stored-logits loss equals the online one up to float tolerance."""
    tok, batch = tiny["tok"], tiny["batch"]
    teacher = load_model(tiny["teacher_dir"])[0].eval()
    with torch.no_grad():
        logits = teacher(**model_inputs(batch)).logits
    entries = teacher_entries(logits, batch, len(tok), tok.convert_tokens_to_ids("<image>"),
                              top_k=10**6)
    writer = ShardWriter(str(tmp_path / "logits"), shard_size=4)
    for i, (d, e) in enumerate(zip(row_digests(batch), entries)):
        writer.add(d, f"k{i}", e)
    writer.flush()
    import json

    json.dump({"rows": writer.index, "keys": writer.keys}, open(tmp_path / "logits/index.json", "w"))
    json.dump({"top_k": len(tok), "teacher": tiny["teacher_dir"], "fingerprint": "x"},
              open(tmp_path / "logits/manifest.json", "w"))
    torch.manual_seed(1)
    student = build_model({"preset": "tiny-student"}, tiny["tok_dir"])[0]
    _, on = _run(_loss(tiny), student, batch)
    _, off = _run(_loss(tiny, teacher_dir=None, offline_dir=str(tmp_path / "logits")), student,
                  batch)
    for k in ("l_res", "l_vis", "l_rel"):
        assert off[k] == pytest.approx(on[k], rel=1e-4, abs=1e-6), k
    # A row the teacher never saw fails with a clear message.
    bad = dict(batch, pixel_values=batch["pixel_values"].clone())
    bad["pixel_values"][0] += 0.5
    with pytest.raises(KeyError, match="no stored teacher logits"):
        _run(_loss(tiny, teacher_dir=None, offline_dir=str(tmp_path / "logits")), student, bad)
    assert os.path.isdir(tmp_path / "logits" / "shard_00001")
