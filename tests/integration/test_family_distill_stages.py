"""``distill`` stages for families besides LLaVA (issue #15): Qwen2-VL (ragged patches,
``image_grid_thw``, M-RoPE token types) and Idefics3 (tiles + a global image, padded with a
``pixel_attention_mask``). Per family, as ``test_distill_workloads.py`` does for LLaVA: an online
DFT under ZeRO-2 with all three KD terms; for Qwen2-VL also offline teacher logits at k = V
equal to the online teacher, and a ZeRO-3-partitioned teacher; called as the runner calls them, with real Ray
Train + DeepSpeed on CPU. (The DPT -> SFT -> DFT -> evaluate chain: tests/e2e.)"""

from __future__ import annotations

import math
import os

import pytest
import torch

from stage_helpers import files_digest, stage_ctx
from workloads.distill import DistillConfig, distill
from workloads.teacher.offline import read_manifest
from workloads.teacher_logits import TeacherLogitsConfig, teacher_logits

FAMILIES = ["qwen2_vl", "idefics3"]
TERMS = ("loss", "ce", "l_res", "l_vis", "l_rel")
NUM_SAMPLES = 16  # instruct rows


def _state(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def _finite_terms(m):
    for k in TERMS:
        assert k in m and math.isfinite(m[k]), (k, m)


@pytest.fixture(scope="module")
def data(ray_session, tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data

    return build_tiny_data(tmp_path_factory.mktemp("fdata"), num_samples=NUM_SAMPLES,
                           vocab_size=320)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, data, tmp_path_factory):
    from workloads.models import build_model, save_model

    family = request.param
    root = tmp_path_factory.mktemp(f"fdistill_{family}")
    torch.manual_seed(0)  # an untrained teacher still gives KD signal, and costs no training
    teacher_dir = save_model(*build_model({"preset": "tiny-teacher", "family": family},
                                          data["tokenizer"]), str(root / "teacher" / "model"))
    torch.manual_seed(1)
    student_dir = save_model(*build_model({"preset": "tiny-student", "family": family},
                                          data["tokenizer"]), str(root / "student" / "model"))
    return {"family": family, "root": root, "data": data, "teacher": teacher_dir,
            "student": student_dir, "teacher_digest": files_digest(teacher_dir)}


# DFT, small batches and a few steps; the offline and ZeRO-3 runs repeat it with the same
# config. The data path deals rows to workers and orders them deterministically (by seed, epoch
# and rank), so every run sees the same batches at the same steps.
DFT = dict(max_steps=3, batch_size=2, lr=3e-3, checkpoint_every=0, max_length=256)


@pytest.fixture(scope="module")
def dft_online(setup):
    s = setup
    ctx = stage_ctx(s["root"], "dft", {"init": s["student"], "teacher": s["teacher"],
                                  "data": s["data"]["instruct"]})
    final = distill(DistillConfig(**DFT), ctx)
    return ctx, final


def test_dft_online_zero2_logs_all_terms_and_keeps_teacher(setup, dft_online):
    s, (ctx, final) = setup, dft_online
    assert final["steps"] == DFT["max_steps"] == len(ctx.local_metrics)
    for e in ctx.local_metrics:
        m = e["metrics"]
        _finite_terms(m)
        assert m["l_res"] > 0 and m["l_vis"] > 0 and m["l_rel"] > 0, (s["family"], m)
    assert ctx.local_metrics[-1]["metrics"]["teacher_unchanged"] == 1.0  # min over both workers
    assert files_digest(s["teacher"]) == s["teacher_digest"]
    from workloads.families import parameter_part

    before = _state(s["student"])
    after = _state(os.path.join(ctx.output_dir, "model"))
    assert before.keys() == after.keys()
    changed = {parameter_part(s["family"], k): False for k in before}
    for k in before:
        changed[parameter_part(s["family"], k)] |= not torch.equal(before[k], after[k])
    assert changed == {"vision": False, "projector": True, "llm": True}, changed


# Stored entries and a partitioned teacher are family-specific through the image tokens only:
# Qwen2-VL's ragged per-image counts are the case LLaVA's fixed count (test_distill_workloads)
# does not cover; Idefics3 runs the online DFT above (and every family in tests/e2e).
@pytest.mark.parametrize("setup", ["qwen2_vl"], indirect=True)
def test_offline_teacher_matches_online_at_full_k(setup, dft_online):
    """k = vocab size: every step's terms from stored logits equal the online teacher's."""
    s, (on, _) = setup, dft_online
    tl = stage_ctx(s["root"], "tlogits", {"teacher": s["teacher"], "data": s["data"]["instruct"]},
              workers=1)
    out = teacher_logits(TeacherLogitsConfig(top_k=10**6, batch_size=8,
                                             max_length=DFT["max_length"]), tl)
    manifest = read_manifest(os.path.join(tl.output_dir, "logits"))
    assert out["samples"] == NUM_SAMPLES and manifest["top_k"] == manifest["vocab_size"]
    off = stage_ctx(s["root"], "dft_off", {"init": s["student"], "teacher_logits": tl.output_dir,
                                      "data": s["data"]["instruct"]})
    distill(DistillConfig(teacher="offline", **DFT), off)
    assert len(off.local_metrics) == len(on.local_metrics) == DFT["max_steps"]
    for e_on, e_off in zip(on.local_metrics, off.local_metrics):
        m_on, m_off = e_on["metrics"], e_off["metrics"]
        for k in TERMS:
            assert m_off[k] == pytest.approx(m_on[k], rel=1e-4), (s["family"], e_on["step"], k,
                                                                   m_on, m_off)
    # Another max_length means another tokenization: refused before training starts.
    bad = stage_ctx(s["root"], "bad_off", dict(off.inputs), workers=1)
    with pytest.raises(ValueError, match="different tokenization"):
        distill(DistillConfig(teacher="offline", **{**DFT, "max_length": 128}), bad)


@pytest.mark.parametrize("setup", ["qwen2_vl"], indirect=True)
def test_zero3_teacher_is_partitioned(setup, dft_online):
    s, (on, _) = setup, dft_online
    ctx = stage_ctx(s["root"], "z3", {"init": s["student"], "teacher": s["teacher"],
                                 "data": s["data"]["instruct"]}, zero=3)
    final = distill(DistillConfig(**{**DFT, "max_steps": 2}), ctx)
    assert final["steps"] == 2
    for e in ctx.local_metrics:
        _finite_terms(e["metrics"])
    m = ctx.local_metrics[-1]["metrics"]
    assert m["teacher_local_numel"] < 0.75 * m["teacher_numel"], m
    assert m["teacher_unchanged"] == 1.0
    assert m["l_res"] > 0 and m["l_vis"] > 0 and m["l_rel"] > 0, (s["family"], m)
    assert files_digest(s["teacher"]) == s["teacher_digest"]
    # the gathered teacher gives the replicated one's logits: step 0 (same batch, same student)
    m3, m2 = ctx.local_metrics[0]["metrics"], on.local_metrics[0]["metrics"]
    for k in TERMS:
        assert m3[k] == pytest.approx(m2[k], rel=1e-4), (s["family"], k, m2, m3)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(os.path.join(ctx.output_dir, "model")).model_type == \
        s["family"]
