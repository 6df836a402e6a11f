"""``distill`` (online DFT/DPT, offline via ``teacher_logits``, ZeRO-3 teacher) called as the
runner calls it, on the data layer's tiny shapes set with real Ray Train + DeepSpeed on CPU."""

from __future__ import annotations

import os

import pytest
import torch

from stage_helpers import files_digest, stage_ctx
from workloads.distill import DistillConfig, distill
from workloads.teacher.offline import read_manifest
from workloads.teacher_logits import TeacherLogitsConfig, teacher_logits

TERMS = ("loss", "ce", "l_res", "l_vis", "l_rel")


def _state(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def _series(ctx, name):
    return [e["metrics"][name] for e in ctx.local_metrics]


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model

    root = tmp_path_factory.mktemp("distill")
    data = build_tiny_data(root / "data", num_samples=32, vocab_size=320)
    torch.manual_seed(0)  # an untrained teacher still gives KD signal, and costs no training
    teacher_dir = save_model(*build_model({"preset": "tiny-teacher"}, data["tokenizer"]),
                             str(root / "teacher" / "model"))
    torch.manual_seed(1)
    student_dir = save_model(*build_model({"preset": "tiny-student"}, data["tokenizer"]),
                             str(root / "student" / "model"))
    return {"root": root, "data": data, "teacher": teacher_dir, "student": student_dir,
            "teacher_digest": files_digest(teacher_dir)}


def _changed(before, after, part):
    return {k: not torch.equal(before[k], after[k]) for k in before if part in k}


def test_dft_online_zero2_learns_logs_all_terms_and_keeps_teacher(setup):
    s = setup
    ctx = stage_ctx(s["root"], "dft", {"init": s["student"], "teacher": s["teacher"],
                                  "data": s["data"]["instruct"]})
    final = distill(DistillConfig(max_steps=8, batch_size=4, lr=3e-3, checkpoint_every=0), ctx)
    assert final["steps"] == 8
    loss = _series(ctx, "loss")
    assert sum(loss[-2:]) < 0.92 * sum(loss[:2]), loss
    for e in ctx.local_metrics:
        assert set(TERMS) <= set(e["metrics"])
        m = e["metrics"]
        assert m["l_res"] > 0 and m["l_vis"] > 0 and m["l_rel"] > 0, m
    assert ctx.local_metrics[-1]["metrics"]["teacher_unchanged"] == 1.0  # min over both workers
    assert files_digest(s["teacher"]) == s["teacher_digest"]
    before, after = _state(s["student"]), _state(os.path.join(ctx.output_dir, "model"))
    assert all(_changed(before, after, "multi_modal_projector").values())
    assert any(_changed(before, after, "language_model").values())
    assert not any(_changed(before, after, "vision_tower").values())


# One step over the whole set with one worker: the batch does not depend on the row order, so
# the online and offline runs see the same batch at step 0.
FULL = dict(max_steps=1, batch_size=32, lr=1e-3, checkpoint_every=0, warmup_ratio=0)


@pytest.fixture(scope="module")
def dpt_online(setup):
    s = setup
    ctx = stage_ctx(s["root"], "dpt", {"init": s["student"], "teacher": s["teacher"],
                                  "data": s["data"]["instruct"]}, workers=1)
    distill(DistillConfig(train=["projector"], **FULL), ctx)
    return ctx


def test_dpt_only_changes_the_projector(setup, dpt_online):
    before = _state(setup["student"])
    after = _state(os.path.join(dpt_online.output_dir, "model"))
    for k in before:
        assert torch.equal(before[k], after[k]) != ("multi_modal_projector" in k), k


def test_offline_teacher_matches_online_at_full_k(setup, dpt_online):
    """k = vocab size: the step-0 terms from stored logits equal the online ones."""
    s = setup
    tl = stage_ctx(s["root"], "tlogits", {"teacher": s["teacher"], "data": s["data"]["instruct"]},
              workers=1)
    out = teacher_logits(TeacherLogitsConfig(top_k=10**6, batch_size=16, max_length=256), tl)
    manifest = read_manifest(os.path.join(tl.output_dir, "logits"))
    assert out["samples"] == 32 and manifest["top_k"] == manifest["vocab_size"]
    off = stage_ctx(s["root"], "full_off", {"init": s["student"], "teacher_logits": tl.output_dir,
                                       "data": s["data"]["instruct"]}, workers=1)
    distill(DistillConfig(teacher="offline", train=["projector"], **FULL), off)
    m_on, m_off = dpt_online.local_metrics[0]["metrics"], off.local_metrics[0]["metrics"]
    for k in ("ce", "l_res", "l_vis", "l_rel"):
        assert m_off[k] == pytest.approx(m_on[k], rel=1e-4), (k, m_on, m_off)
    # Another max_length means another tokenization: refused before training starts.
    bad = stage_ctx(s["root"], "bad_off", dict(off.inputs), workers=1)
    with pytest.raises(ValueError, match="different tokenization"):
        distill(DistillConfig(teacher="offline", max_length=128, **FULL), bad)


def test_zero3_teacher_is_partitioned(setup):
    s = setup
    ctx = stage_ctx(s["root"], "z3", {"init": s["student"], "teacher": s["teacher"],
                                 "data": s["data"]["instruct"]}, zero=3)
    # the ZeRO-3 student too: gradient accumulation, a checkpoint between steps, and full-size
    # weights gathered before saving (the one ZeRO-3 training run of the suite)
    final = distill(DistillConfig(max_steps=2, batch_size=2, grad_accum=2, lr=1e-3,
                                  checkpoint_every=1), ctx)
    assert final["steps"] == 2 and final["samples"] == 2 * 2 * 2 * 2
    m = ctx.local_metrics[-1]["metrics"]
    assert m["teacher_local_numel"] < 0.75 * m["teacher_numel"], m
    assert m["teacher_unchanged"] == 1.0 and m["l_res"] > 0
    assert files_digest(s["teacher"]) == s["teacher_digest"]
    before, after = _state(s["student"]), _state(os.path.join(ctx.output_dir, "model"))
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert not any(_changed(before, after, "vision_tower").values())  # frozen: not trained
    assert all(_changed(before, after, "multi_modal_projector").values())
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
