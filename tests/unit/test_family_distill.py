"""Distillation across any same-family pair (issue #15, point 3): the teacher/student probe of
both processors, the KD loss on a family's collated batch, and the messages of a mismatched
pair. Tiny random-init models of Qwen2-VL, Idefics3 (tiled) and Gemma 3 on CPU; no Ray."""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from orchestrator.plugin import StageContext
from workloads import families
from workloads.distill import (DistillCompatError, DistillConfig, check_distill_pair,
                               validate_distill)
from workloads.families.pairing import check_family_pair
from workloads.distill_loss import DistillLoss
from workloads.train_loop_parts import StepContext

NAMES = ["qwen2_vl", "idefics3", "gemma3"]
CONV = [{"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "It is a red square."}]
TEXT_ONLY = [{"role": "user", "content": "Describe the picture."},
             {"role": "assistant", "content": "A blue circle."}]
KD_TERMS = ("loss", "ce", "l_res", "l_vis", "l_rel")


def _image(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# A student processor that tokenizes images differently from the teacher's, per family: Qwen
# with a smaller pixel budget, Idefics3 with smaller tiles (SmolVLM2-2.2B vs 256M), Gemma 3
# with fewer soft tokens per image.
def _other_geometry(name: str, parts):
    if name == "qwen2_vl":
        ip = families.build_image_processor(
            name, patch_size=8, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32})
        return replace(parts, image_processor=ip)
    if name == "idefics3":
        ip = families.build_image_processor(name, size={"longest_edge": 64},
                                            max_image_size={"longest_edge": 16},
                                            do_image_splitting=True)
        return replace(parts, image_processor=ip)
    return replace(parts, settings={**parts.settings, "image_seq_length": 4})


def _sctx():
    stage = StageContext(pipeline="t", stage="dft", key="k", output_dir="/tmp/unused")
    return StepContext(step=0, total_steps=1, rank=0, world_size=1, device=torch.device("cpu"),
                       dtype=torch.float32, stage=stage)


def _batch(parts, rows, prefix: str = ""):
    """A training batch as the data path builds it (preprocessed rows -> data.collate)."""
    from workloads.data.collate import collate
    from workloads.data.preprocess import pack_image_inputs

    family = parts.family
    encoded = [families.encode(family, parts, conv, image) for conv, image in rows]
    drop = {"input_ids", "labels"}

    def column(values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    cols = {"input_ids": column([e["input_ids"] for e in encoded]),
            "labels": column([e["labels"] for e in encoded]),
            "has_image": np.asarray([image is not None for _, image in rows]),
            "mm": column([pack_image_inputs({k: v for k, v in e.items() if k not in drop})
                          for e in encoded]),
            "family": column([family.name] * len(rows))}
    batch = collate(cols, parts.tokenizer.pad_token_id)
    return {prefix + k: v for k, v in batch.items()}


def _student(path: str):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(path).train()


@pytest.mark.parametrize("name", NAMES)
def test_same_family_pair_passes_the_probe(name, built, tok_dir):
    dirs = built(name)
    student = families.load_processor_parts(dirs["student"])
    assert check_family_pair(dirs["teacher"], student, image_kd=True) == "student"
    cfg = DistillConfig(max_steps=1)
    # the student as a checkpoint dir (input `init`) and as a family preset (+ tokenizer)
    assert check_distill_pair(cfg, {"path": dirs["student"]}, None, dirs["teacher"]) == "student"
    preset = {"preset": "tiny-student", "family": name}
    assert check_distill_pair(cfg, preset, tok_dir, dirs["teacher"], stage="dft") == "student"


def test_build_distill_loss_takes_the_family_tokenizer_and_image_token(built, tok_dir, tmp_path):
    """The driver side: a Gemma 3 student (dir or preset) gets the family tokenizer's length
    (the trained vocabulary + the family's tokens) and the soft image token's id."""
    from workloads.distill import build_distill_loss

    dirs = built("gemma3")
    parts = families.load_processor_parts(dirs["student"])

    def build(config, **inputs):
        ctx = StageContext(pipeline="t", stage="dft", key="k", output_dir=str(tmp_path),
                           inputs={"teacher": dirs["teacher"], **inputs})
        return build_distill_loss(config, ctx)

    for loss in (build(DistillConfig(max_steps=1), init=dirs["student"]),
                 build(DistillConfig(max_steps=1, model={"preset": "tiny-student",
                                                         "family": "gemma3"}),
                       tokenizer=tok_dir)):
        assert loss.teacher_dir == dirs["teacher"] and loss.teacher_inputs == "student"
        assert loss.vocab_size == len(parts.tokenizer) > len(families.build_tokenizer("llava",
                                                                                      tok_dir))
        assert loss.image_token_id == parts.image_token_id == \
            parts.tokenizer.convert_tokens_to_ids("<image_soft_token>")


@pytest.mark.parametrize("name", NAMES)
def test_kd_terms_on_a_collated_family_batch(name, built):
    """An image row and a text-only row: every KD term finite, the image mask (the model
    config's image token) covers the image row's image tokens only, and gradients flow."""
    dirs = built(name)
    parts = families.load_processor_parts(dirs["student"])
    batch = _batch(parts, [(CONV, _image(50, 30)), (TEXT_ONLY, None)])
    student = _student(dirs["student"])
    # a wrong id on purpose: setup takes the id from the student's config
    loss = DistillLoss(vocab_size=len(parts.tokenizer), image_token_id=-1,
                       teacher_dir=dirs["teacher"], alpha=1.0, beta=1.0, gamma=0.5)
    sctx = _sctx()
    loss.setup(student, sctx)
    image_id = sctx.state["image_token_id"]
    assert image_id == families.image_token_id(student.config) == parts.image_token_id
    if name == "gemma3":  # the soft token, not the processor's begin-of-image token
        assert image_id != parts.tokenizer.convert_tokens_to_ids("<start_of_image>")
    mask = batch["input_ids"] == image_id
    assert int(mask[0].sum()) > 0 and int(mask[1].sum()) == 0
    total, m = loss(student, batch, sctx)
    assert set(KD_TERMS) <= set(m) and all(math.isfinite(m[k]) for k in KD_TERMS)
    assert m["l_res"] > 0 and m["l_vis"] > 0 and m["l_rel"] > 0
    assert m["loss"] == pytest.approx(m["ce"] + m["l_res"] + m["l_vis"] + 0.5 * m["l_rel"],
                                      rel=1e-5)
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert m["teacher_unchanged"] == 1.0


def test_teacher_equal_to_student_gives_zero_kd_terms(built):
    """The teacher fed the student batch's family inputs (Qwen's image_grid_thw and
    mm_token_type_ids): a student equal to the teacher has KD terms of exactly 0."""
    dirs = built("qwen2_vl")
    parts = families.load_processor_parts(dirs["teacher"])
    batch = _batch(parts, [(CONV, _image(64, 40)), (TEXT_ONLY, None), (CONV, _image(32, 32, 1))])
    sctx = _sctx()
    loss = DistillLoss(vocab_size=len(parts.tokenizer), image_token_id=parts.image_token_id,
                       teacher_dir=dirs["teacher"])
    student = _student(dirs["teacher"]).eval()
    loss.setup(student, sctx)
    _, m = loss(student, batch, sctx)
    for k in ("l_res", "l_vis", "l_rel"):
        assert m[k] == pytest.approx(0, abs=1e-6), k


def test_different_families_are_refused_with_both_names(built, tok_dir):
    qwen, gemma = built("qwen2_vl"), built("gemma3")
    gemma_parts = families.load_processor_parts(gemma["student"])
    with pytest.raises(DistillCompatError) as e:
        check_family_pair(qwen["teacher"], gemma_parts, image_kd=False, stage="dft")
    msg = str(e.value)
    assert msg.startswith("stage 'dft': teacher is qwen2_vl, student is gemma3: ")
    assert qwen["teacher"] in msg and "family: qwen2_vl" in msg and "\n" not in msg
    cfg = DistillConfig(max_steps=1)
    with pytest.raises(DistillCompatError, match="teacher is qwen2_vl, student is gemma3"):
        check_distill_pair(cfg, {"path": gemma["student"]}, None, qwen["teacher"])
    # a LLaVA-1.5 preset student (no family) against a Qwen2-VL teacher
    with pytest.raises(DistillCompatError, match="teacher is qwen2_vl, student is llava"):
        check_distill_pair(cfg, {"preset": "tiny-student"}, tok_dir, qwen["teacher"])


def test_validate_reports_a_family_mismatch_offline(built):
    """`mmkd validate`'s hook: both sides known without weights (a local dir's config.json, a
    preset's family) -> the mismatch; stage references -> only the wiring is checked."""
    qwen = built("qwen2_vl")
    cfg = DistillConfig(model={"preset": "tiny-student", "family": "gemma3"}, max_steps=1)
    problems = validate_distill(cfg, {"teacher": qwen["teacher"], "tokenizer": "tok.tokenizer"})
    assert any("teacher is qwen2_vl, student is gemma3" in p for p in problems), problems
    same = DistillConfig(model={"preset": "tiny-student", "family": "qwen2_vl"}, max_steps=1)
    assert validate_distill(same, {"teacher": qwen["teacher"], "tokenizer": "tok.tokenizer"}) == []
    assert validate_distill(cfg, {"teacher": [("t", "model")], "tokenizer": "tok.tokenizer"}) == []
    problems = validate_distill(DistillConfig(max_steps=1),
                               {"teacher": qwen["teacher"], "init": built("gemma3")["student"]})
    assert any("teacher is qwen2_vl, student is gemma3" in p for p in problems), problems


@pytest.mark.parametrize("name", NAMES)
def test_different_image_token_counts_name_the_size_and_counts(name, built):
    dirs = built(name)
    student = _other_geometry(name, families.load_processor_parts(dirs["student"]))
    with pytest.raises(DistillCompatError) as e:
        check_family_pair(dirs["teacher"], student, image_kd=True, student_desc="the student",
                          stage="dpt")
    msg = str(e.value)
    assert msg.startswith(f"stage 'dpt': {name} teacher {dirs['teacher']} and student (the "
                          f"student) tokenize images differently: a ")
    found = re.search(r"a (\d+)x(\d+) image becomes (\d+) image tokens for the teacher and (\d+) "
                      r"for the student", msg)
    assert found and found.group(3) != found.group(4), msg
    assert "`beta: 0` and `gamma: 0` for response KD only" in msg and "\n" not in msg
    # response KD alone needs only the tokenizer: the teacher then reads its own encoding
    assert check_family_pair(dirs["teacher"], student, image_kd=False) == "own"


def test_response_kd_only_runs_the_teacher_on_its_own_encoding(built, tmp_path):
    dirs = built("qwen2_vl")
    teacher_parts = families.load_processor_parts(dirs["teacher"])
    student_dir = str(tmp_path / "student")
    shutil.copytree(dirs["student"], student_dir)
    student_parts = _other_geometry("qwen2_vl", families.load_processor_parts(student_dir))
    families.save_processor_parts(student_parts, student_dir)
    spec = {"path": student_dir}
    with pytest.raises(DistillCompatError, match="image tokens for the teacher"):
        check_distill_pair(DistillConfig(max_steps=1), spec, None, dirs["teacher"])
    kd_res = DistillConfig(max_steps=1, beta=0, gamma=0)
    assert check_distill_pair(kd_res, spec, None, dirs["teacher"]) == "own"

    rows = [(CONV, _image(200, 120)), (TEXT_ONLY, None)]
    batch = {**_batch(student_parts, rows), **_batch(teacher_parts, rows, prefix="teacher_")}
    assert batch["input_ids"].shape != batch["teacher_input_ids"].shape
    loss = DistillLoss(vocab_size=len(student_parts.tokenizer),
                       image_token_id=student_parts.image_token_id, teacher_dir=dirs["teacher"],
                       beta=0, gamma=0, teacher_inputs="own")
    student = _student(student_dir)
    sctx = _sctx()
    loss.setup(student, sctx)
    total, m = loss(student, batch, sctx)
    assert math.isfinite(m["l_res"]) and m["l_res"] > 0 and m["l_vis"] == m["l_rel"] == 0.0
    total.backward()
    # without the teacher's encoding in the batch: what is missing, and who must add it
    plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    with pytest.raises(DistillCompatError, match="no teacher_input_ids"):
        loss(student, plain, sctx)
    with pytest.raises(DistillCompatError, match="response KD only"):
        DistillLoss(vocab_size=10, image_token_id=1, teacher_dir="t", teacher_inputs="own")


def test_own_encoding_of_the_teacher_itself_gives_zero_response_kd(built):
    dirs = built("qwen2_vl")
    parts = families.load_processor_parts(dirs["teacher"])
    rows = [(CONV, _image(64, 40)), (TEXT_ONLY, None)]
    batch = {**_batch(parts, rows), **_batch(parts, rows, prefix="teacher_")}
    loss = DistillLoss(vocab_size=len(parts.tokenizer), image_token_id=parts.image_token_id,
                       teacher_dir=dirs["teacher"], beta=0, gamma=0, teacher_inputs="own")
    sctx = _sctx()
    loss.setup(None, sctx)
    _, m = loss(_student(dirs["teacher"]).eval(), batch, sctx)
    assert m["l_res"] == pytest.approx(0, abs=1e-6)


def test_a_teacher_with_another_image_token_is_refused(built):
    dirs = built("gemma3")
    student = _student(dirs["student"])
    student.config.image_token_index = student.config.image_token_index + 1
    loss = DistillLoss(vocab_size=10, image_token_id=0, teacher_dir=dirs["teacher"])
    with pytest.raises(DistillCompatError, match="marks image tokens with id"):
        loss.setup(student, _sctx())


def test_same_tokens_but_other_pixels_are_refused_for_image_kd(built):
    """Idefics3 with half-size tiles on a smaller canvas: as many tiles and image tokens, but
    other pixels — the teacher would read the student's pixels, so L_vis/L_rel are refused."""
    dirs = built("idefics3")
    parts = families.load_processor_parts(dirs["student"])
    ip = families.build_image_processor("idefics3", size={"longest_edge": 32},
                                        max_image_size={"longest_edge": 16},
                                        do_image_splitting=True)
    with pytest.raises(DistillCompatError, match=r"preprocess images differently: a 32x32 image "
                                                 r"gives `pixel_attention_mask` of shape"):
        check_family_pair(dirs["teacher"], replace(parts, image_processor=ip), image_kd=True)
