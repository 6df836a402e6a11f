"""``teacher: online``: the teacher model in every student worker, run each step — frozen, in
eval mode, without optimizer state; under ZeRO-3 wrapped in an optimizer-less DeepSpeed engine
so its parameters are partitioned like the student's (TRL's ``prepare_deepspeed`` trick)
instead of replicated as in LLaVA-KD's published code.

It runs on the student's batch (``model_inputs``: input_ids, pixels and the family's extra
inputs such as Qwen's ``image_grid_thw``), so every KD term compares the two models position by
position (``DenseRows``). A same-family pair whose processors tokenize images differently runs
it on its own encoding of each row instead (``inputs="own"``: the batch's ``teacher_``-prefixed
keys), pairing the two models' response positions (``PairedRows``: response terms only).

Guards: at the first step it must answer differently when its images are blanked (a teacher
whose vision weights were not loaded fails the stage there); its local parameters are hashed
at setup and again on the last step (``teacher_unchanged``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from workloads.families.pairing import DistillCompatError
from workloads.teacher.payload import own_batch

TEACHER_PREFIX = "teacher_"  # batch keys of the teacher's own encoding (data.preprocess's)

__all__ = ["OnlineTeacher", "TEACHER_PREFIX", "load_teacher", "teacher_state_digest",
           "config_image_token_id"]



class OnlineTeacher:
    """The ``online`` placement of the ``Teacher`` interface (``workloads/teacher``)."""

    def __init__(self, teacher_dir: str, sctx: Any, *, image_token_id: int, vocab_size: int,
                 inputs: Literal["student", "own", "cross"] = "student", verify: bool = True,
                 allow_blind: bool = False, grad_accum: int = 1,
                 teacher_vocab_size: int | None = None, shared_vocab: Any = None):
        self.dir, self.vocab_size, self.inputs = teacher_dir, vocab_size, inputs
        self.teacher_vocab_size, self.shared_vocab = teacher_vocab_size, shared_vocab
        self.verify, self.allow_blind, self.grad_accum = verify, allow_blind, grad_accum
        self.model = load_teacher(teacher_dir, sctx)
        module = getattr(self.model, "module", self.model)
        t_id = config_image_token_id(module, image_token_id)
        if inputs == "student" and t_id != image_token_id:
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: teacher {teacher_dir} marks image tokens with "
                f"id {t_id}, the student with {image_token_id}; teacher and student must "
                f"share the tokenizer and image token (build the student from the teacher's "
                f"tokenizer, or pick a teacher of the student's family and vocabulary)")
        local = sum(_local_param(p).numel() for p in module.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        self.numel = (float(local), float(full))
        self.digest = teacher_state_digest(module) if verify else None
        self.calls = 0

    def rows(self, student_logits: Any, batch: dict[str, Any], inputs: dict[str, Any],
             image_mask: Any, sctx: Any) -> tuple[Any, Any]:
        """The student's logits cut to the shared vocabulary, and the teacher's side of the
        batch: its logits on the student's batch, or paired rows of its own encoding."""
        import torch

        from workloads.kd_terms.teacher_rows import DenseRows
        from workloads.losses import align_vocab

        first, self.calls = self.calls == 0, self.calls + 1
        if self.inputs == "own":
            return self._own_inputs_rows(student_logits, batch, sctx)
        if self.inputs == "cross":
            return self._cross_rows(student_logits, batch, sctx, first)
        with torch.no_grad():
            t_logits = self.model(**inputs).logits
        if first and not self.allow_blind:
            self._probe_teacher_sees(self.model, inputs, t_logits, sctx)
        s, t = align_vocab(student_logits, t_logits, self.vocab_size)
        return s, DenseRows(t, batch["labels"], image_mask)

    def checks(self, sctx: Any, micro: int) -> dict[str, float]:
        """Metrics of every step: the teacher's parameter counts (local: this rank's ZeRO-3
        partition) and, on the last step, ``teacher_unchanged`` (min over ranks)."""
        local, full = self.numel
        out = {"teacher_local_numel": local, "teacher_numel": full}
        last_micro = micro % self.grad_accum == self.grad_accum - 1
        if self.verify and last_micro and sctx.step == sctx.total_steps - 1:
            import torch
            import torch.distributed as dist

            module = getattr(self.model, "module", self.model)
            same = torch.tensor([float(teacher_state_digest(module) == self.digest)])
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(same, op=dist.ReduceOp.MIN)
            out["teacher_unchanged"] = float(same)
        return out

    def _own_inputs_rows(self, student_logits: Any, batch: dict[str, Any], sctx: Any
                         ) -> tuple[Any, Any]:
        """The teacher on its own encoding of the same rows: both models' response positions
        (same tokenizer, so the same reply tokens per row) are paired in order."""
        import torch

        from workloads.kd_terms.teacher_rows import PairedRows
        from workloads.losses import align_vocab, response_mask
        from workloads.train_loop_parts import model_inputs

        t_batch = own_batch(batch, sctx.dtype)
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in t_batch]
        if missing:
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: teacher {self.dir} tokenizes images "
                f"differently from the student, so response KD runs it on its own encoding of "
                f"each row, but the batch has no {', '.join(TEACHER_PREFIX + k for k in missing)}; "
                f"the data path must add the teacher processor's encoding of every row, or give "
                f"the student the teacher's image processor settings")
        s_mask, t_mask = response_mask(batch["labels"]), response_mask(t_batch["labels"])
        s_reply = [row[row != -100] for row in batch["labels"]]
        t_reply = [row[row != -100] for row in t_batch["labels"]]
        if any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(s_reply, t_reply)):
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: the teacher's encoding of a row has other reply "
                f"tokens than the student's; both must come from the same rows and tokenizer")
        with torch.no_grad():
            t_logits = self.model(**model_inputs(t_batch)).logits
        _, t = align_vocab(student_logits[s_mask], t_logits[t_mask], self.vocab_size)
        s = student_logits[..., :self.vocab_size]
        return s, PairedRows(t, s_mask, f"teacher {self.dir}")

    def _cross_rows(self, student_logits: Any, batch: dict[str, Any], sctx: Any,
                    first: bool) -> tuple[Any, Any]:
        """A teacher with another tokenizer on its own encoding of each row; the two sides'
        reply tokens are matched by the aligned text spans the data path computed."""
        import numpy as np
        import torch

        from workloads.data.preprocess import REPLY_GROUP
        from workloads.kd_terms.teacher_rows import CrossRows
        from workloads.train_loop_parts import model_inputs

        t_batch = own_batch(batch, sctx.dtype)
        if REPLY_GROUP not in t_batch or REPLY_GROUP not in batch:
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: teacher {self.dir} has another tokenizer, so "
                f"cross-tokenizer KD runs it on its own encoding of each row, aligned with the "
                f"student's by text, but the batch has no `{REPLY_GROUP}` columns; the data "
                f"path must encode every row with both processors (distill does so for "
                f"`teacher: online`)")
        inputs = model_inputs(t_batch)
        with torch.no_grad():
            t_logits = self.model(**inputs).logits
        if first and not self.allow_blind:
            self._probe_teacher_sees(self.model, inputs, t_logits, sctx)
        shared = None
        if self.shared_vocab is not None:
            shared = tuple(np.asarray(ids, np.int64) for ids in self.shared_vocab)
        t = t_logits[..., :self.teacher_vocab_size or t_logits.shape[-1]]
        rows = CrossRows(t, t_batch["labels"], t_batch[REPLY_GROUP], batch["labels"],
                         batch[REPLY_GROUP], shared, f"teacher {self.dir}")
        return student_logits[..., :self.vocab_size], rows

    def _probe_teacher_sees(self, teacher: Any, inputs: dict[str, Any], logits: Any,
                            sctx: Any) -> None:
        """The teacher's logits on this batch with every image replaced by a flat one (pixel
        values 0.5; values that are exactly 0 stay 0, since some families, Idefics3's, mark
        padding images by all-zero pixels) must differ from its logits on the real images; a
        teacher that does not see (vision weights not loaded, a zeroed tower) fails the stage
        here, at start."""
        import torch

        pixels = inputs.get("pixel_values")
        if pixels is None or not torch.is_floating_point(pixels):
            return
        with torch.no_grad():
            flat = torch.where(pixels == 0, pixels, torch.full_like(pixels, 0.5))
            blank = teacher(**{**inputs, "pixel_values": flat}).logits
        change = float((blank.float() - logits.float()).abs().max())
        scale = max(1.0, float(logits.float().abs().max()))
        if change <= 1e-6 * scale:
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: teacher {self.dir} gives the same outputs "
                f"on the first batch when its images are blanked (largest change {change:.1e}): "
                f"it does not see the images, and distilling it would teach the student to "
                f"ignore them. Its vision weights may not be loaded (check the checkpoint's "
                f"vision tower and projector tensors, e.g. names that do not match the model "
                f"class) or may be zero. If a teacher that ignores images is intended, set "
                f"`allow_blind_teacher: true`.")


def config_image_token_id(model: Any, default: int) -> int:
    """``config.image_token_id`` (or ``image_token_index``) of a model or DeepSpeed engine;
    ``default`` where there is no model or its config names none (a merged wrapper)."""
    from workloads.families import image_token_id

    config = getattr(getattr(model, "module", model), "config", None)
    if config is None:
        return default
    try:
        return image_token_id(config)
    except ValueError:
        return default


def _local_param(p: Any) -> Any:
    """This rank's storage of ``p``: the ZeRO-3 partition when partitioned, else ``p`` itself."""
    return getattr(p, "ds_tensor", p)


def teacher_state_digest(module: Any) -> str:
    """sha256 over this rank's (local) teacher parameters and buffers, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        t = _local_param(p).detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.view(-1).view(dtype=_bytes_dtype(t)).numpy().tobytes())
    return h.hexdigest()


def _bytes_dtype(t: Any) -> Any:
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def load_teacher(teacher_dir: str, sctx: Any) -> Any:
    """The frozen teacher for this worker: a plain module (ZeRO 0-2, replicated) or an
    optimizer-less ZeRO-3 DeepSpeed engine (partitioned across the workers)."""
    from workloads.models import load_model

    teacher, _ = load_model(teacher_dir)
    teacher.eval().requires_grad_(False)
    teacher.to(device=sctx.device, dtype=sctx.dtype)
    ds = sctx.stage.deepspeed or {}
    if int(ds.get("zero_stage", 0)) != 3:
        return teacher
    from workloads.train_loop_parts import import_deepspeed

    deepspeed = import_deepspeed()
    precision = ds.get("precision", "fp32")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": sctx.world_size,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
    }
    if ds.get("offload_params"):
        config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
