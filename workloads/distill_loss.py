"""The LLaVA-KD loss strategy plugged into the shared training loop (``train.LossFn``):

    L = CE + alpha * L_res + beta * L_vis + gamma * L_rel [+ w * term for each of `terms`]

Each step: the student's forward and CE; the teacher's side of the batch in the form its
placement gives (``kd_terms/teacher_rows.py``: full logits online, stored top-k offline and from
the service); then every configured KD term (``workloads/kd_terms/``, one file each) on it.

``DistillLoss`` travels to every Ray Train worker inside the loop's config dict (it must stay
picklable: only paths and numbers before ``setup``). ``setup`` loads the teacher in every worker
— frozen, eval mode, no optimizer state — and under ZeRO-3 wraps it in an optimizer-less
DeepSpeed engine so its parameters are partitioned like the student's (TRL's
``prepare_deepspeed`` trick), instead of replicated as in LLaVA-KD's published code.

The teacher runs on the student's batch (``model_inputs``: input_ids, pixels and the family's
extra inputs such as Qwen's ``image_grid_thw``), so every KD term compares the two models
position by position. A same-family pair whose processors tokenize images differently can only
do response KD (``teacher_inputs="own"``): the batch then carries the teacher's own encoding of
each row under ``teacher_``-prefixed keys and L_res is taken over the response tokens of both.

With ``offline`` set, there is no teacher model: the teacher's top-k logits and relation matrices
come from a ``teacher_logits`` stage (see ``distill_offline.py``). With ``service`` set, neither:
a shared Ray service computes the same payload on demand (see ``teacher_service/``); each
batch's request is sent one step ahead (``wrap_batches``), so the teacher's forward of batch
i+1 overlaps the student's step i.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from workloads.families.pairing import DistillCompatError

__all__ = ["DistillLoss", "DistillCompatError", "teacher_state_digest", "TEACHER_PREFIX"]

TEACHER_PREFIX = "teacher_"  # batch keys of the teacher's own encoding (teacher_inputs="own")


@dataclass
class DistillLoss:
    vocab_size: int                  # len(tokenizer): logits are cut to it before any KD term
    image_token_id: int              # the student's; setup re-reads it from the model config
    teacher_dir: str | None = None   # online teacher (a model dir of any supported family)
    offline_dir: str | None = None   # offline teacher: a `teacher_logits` output dir
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.5
    temperature: float = 1.0
    # a registered divergence: "fkl", {"name": "skew_kl", "alpha": 0.1} or a DivergenceSpec
    divergence: Any = "fkl"
    chunk_size: int | None = 128
    grad_accum: int = 1
    # Hash the teacher's local parameters at setup and again on the last step, and log
    # `teacher_unchanged` (1.0/0.0, min over ranks): a guard that nothing ever updates the teacher.
    verify_teacher: bool = True
    # "student": the teacher runs on the student's batch (identical input_ids: every KD term);
    # "own": on the batch's `teacher_*` keys (its own tokenization; response KD only)
    teacher_inputs: Literal["student", "own"] = "student"
    # `teacher: service`: {"name": the service actor, "user": this stage's lease}
    service: dict[str, str] | None = None
    # at the first step, an online teacher must answer differently when its images are blanked
    allow_blind_teacher: bool = False
    # KD terms beyond the three built-ins: {name: weight | {weight, <params>}} (kd_terms/)
    terms: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from workloads.kd_terms import get_kd_term, resolve_terms

        # {name: {"weight", "params"}} of every term with a weight > 0, built-ins first
        self.active = resolve_terms({"res": self.alpha, "vis": self.beta, "rel": self.gamma},
                                    self.terms or {})
        visual = [n for n in self.active if get_kd_term(n).needs & {"image", "relation"}]
        if self.teacher_inputs == "own" and visual:
            raise DistillCompatError(
                f"DistillLoss: a teacher that tokenizes images differently from the student "
                f"(teacher_inputs='own') supports response KD only; the terms "
                f"{', '.join(visual)} read image positions: set their weights to 0 (beta: 0 "
                f"and gamma: 0 for the built-ins)")

    # ------------------------------------------------------------------ setup (per worker)

    def setup(self, model: Any, sctx: Any) -> None:
        state = sctx.state
        state["micro"] = 0
        # the image mask follows the model's own config (Gemma 3's processor reports the
        # begin-of-image token; the model replaces `config.image_token_id`)
        state["image_token_id"] = _config_image_token_id(model, self.image_token_id)
        if self.offline_dir:
            from workloads.distill_offline import OfflineTeacher

            state["offline"] = OfflineTeacher(self.offline_dir)
            return
        if self.service:
            from workloads.teacher_service import ServiceClient

            client = ServiceClient(self.service["name"], self.service["user"])
            if client.info["image_token_id"] != state["image_token_id"]:
                raise DistillCompatError(
                    f"stage {sctx.stage.stage!r}: the service's teacher marks image tokens with "
                    f"id {client.info['image_token_id']}, the student with "
                    f"{state['image_token_id']}; they must share the tokenizer and image token")
            state["service"] = client
            return
        if not self.teacher_dir:
            raise ValueError(f"stage {sctx.stage.stage!r}: distill needs input `teacher` (online) "
                             f"or `teacher_logits` (offline)")
        teacher = load_teacher(self.teacher_dir, sctx)
        state["teacher"] = teacher
        module = getattr(teacher, "module", teacher)
        t_id = _config_image_token_id(module, state["image_token_id"])
        if self.teacher_inputs == "student" and t_id != state["image_token_id"]:
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: teacher {self.teacher_dir} marks image tokens with "
                f"id {t_id}, the student with {state['image_token_id']}; teacher and student must "
                f"share the tokenizer and image token (build the student from the teacher's "
                f"tokenizer, or pick a teacher of the student's family and vocabulary)")
        local = sum(_local_param(p).numel() for p in module.parameters())
        full = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        state["teacher_numel"] = (float(local), float(full))
        if self.verify_teacher:
            state["teacher_digest"] = teacher_state_digest(module)

    # ------------------------------------------------------------------ one micro-step

    def __call__(self, engine: Any, batch: dict[str, Any], sctx: Any):
        from workloads.kd_terms import KDBatch, get_kd_term, objective
        from workloads.train_setup import model_inputs

        state = sctx.state
        # the teacher's own encoding (teacher_inputs="own") is no input of the student
        inputs = model_inputs({k: v for k, v in batch.items() if not k.startswith(TEACHER_PREFIX)})
        out = engine(**inputs, labels=batch["labels"])
        image_mask = batch["input_ids"] == state.get("image_token_id", self.image_token_id)
        values: dict[str, Any] = {}
        if self.active:
            s, rows = self._teacher_rows(out.logits, batch, inputs, image_mask, sctx)
            x = KDBatch(s, rows, self.divergence, self.temperature, self.chunk_size)
            for name, term in self.active.items():
                x.term = name
                values[name] = get_kd_term(name).loss(x, **term["params"])
        total, logged = objective(out.loss, values,
                                  {n: t["weight"] for n, t in self.active.items()})
        metrics = {k: 0.0 for k in ("l_res", "l_vis", "l_rel")}
        metrics.update({k: float(v) for k, v in logged.items()})
        metrics.update(self._teacher_checks(sctx))
        state["micro"] += 1
        return total, metrics

    def _teacher_rows(self, student_logits: Any, batch: dict[str, Any], inputs: dict[str, Any],
                      image_mask: Any, sctx: Any) -> tuple[Any, Any]:
        """The student's logits cut to the shared vocabulary, and the teacher's side of the
        batch in the form its placement gives (``kd_terms/teacher_rows.py``)."""
        import torch

        from workloads.kd_terms.teacher_rows import DenseRows
        from workloads.losses import align_vocab

        state = sctx.state
        if "offline" in state:
            return state["offline"].rows(student_logits, batch, image_mask, self.vocab_size)
        if "service" in state:  # the offline path's rows, on entries served just now
            served = state["service"].teacher_for(batch)
            return served.rows(student_logits, batch, image_mask, self.vocab_size)
        if self.teacher_inputs == "own":
            return self._own_inputs_rows(student_logits, batch, sctx)
        with torch.no_grad():
            t_logits = state["teacher"](**inputs).logits
        if state["micro"] == 0 and not self.allow_blind_teacher:
            self._probe_teacher_sees(state["teacher"], inputs, t_logits, sctx)
        s, t = align_vocab(student_logits, t_logits, self.vocab_size)
        return s, DenseRows(t, batch["labels"], image_mask)

    def wrap_batches(self, batches: Any, sctx: Any) -> Any:
        """The training loop's batches, each one's teacher request sent a step ahead
        (``teacher: service``); unchanged otherwise."""
        client = sctx.state.get("service")
        return client.ahead(batches) if client is not None else batches

    def _own_inputs_rows(self, student_logits: Any, batch: dict[str, Any], sctx: Any
                         ) -> tuple[Any, Any]:
        """The teacher on its own encoding of the same rows: both models' response positions
        (same tokenizer, so the same reply tokens per row) are paired in order."""
        import torch

        from workloads.kd_terms.teacher_rows import PairedRows
        from workloads.losses import align_vocab, response_mask
        from workloads.train_setup import model_inputs

        n = len(TEACHER_PREFIX)
        t_batch = {k[n:]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in t_batch]
        if missing:
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: teacher {self.teacher_dir} tokenizes images "
                f"differently from the student, so response KD runs it on its own encoding of "
                f"each row, but the batch has no {', '.join(TEACHER_PREFIX + k for k in missing)}; "
                f"the data path must add the teacher processor's encoding of every row, or give "
                f"the student the teacher's image processor settings")
        pixels = t_batch.get("pixel_values")
        if pixels is not None and torch.is_floating_point(pixels):
            t_batch["pixel_values"] = pixels.to(sctx.dtype)
        s_mask, t_mask = response_mask(batch["labels"]), response_mask(t_batch["labels"])
        s_reply = [row[row != -100] for row in batch["labels"]]
        t_reply = [row[row != -100] for row in t_batch["labels"]]
        if any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(s_reply, t_reply)):
            raise DistillCompatError(
                f"stage {sctx.stage.stage!r}: the teacher's encoding of a row has other reply "
                f"tokens than the student's; both must come from the same rows and tokenizer")
        with torch.no_grad():
            t_logits = sctx.state["teacher"](**model_inputs(t_batch)).logits
        _, t = align_vocab(student_logits[s_mask], t_logits[t_mask], self.vocab_size)
        s = student_logits[..., :self.vocab_size]
        return s, PairedRows(t, s_mask, f"teacher {self.teacher_dir}")

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
                f"stage {sctx.stage.stage!r}: teacher {self.teacher_dir} gives the same outputs "
                f"on the first batch when its images are blanked (largest change {change:.1e}): "
                f"it does not see the images, and distilling it would teach the student to "
                f"ignore them. Its vision weights may not be loaded (check the checkpoint's "
                f"vision tower and projector tensors, e.g. names that do not match the model "
                f"class) or may be zero. If a teacher that ignores images is intended, set "
                f"`allow_blind_teacher: true`.")

    def _teacher_checks(self, sctx: Any) -> dict[str, float]:
        state = sctx.state
        if "teacher" not in state:
            return {}
        local, full = state["teacher_numel"]
        out = {"teacher_local_numel": local, "teacher_numel": full}
        last_micro = state["micro"] % self.grad_accum == self.grad_accum - 1
        if self.verify_teacher and last_micro and sctx.step == sctx.total_steps - 1:
            import torch
            import torch.distributed as dist

            module = getattr(state["teacher"], "module", state["teacher"])
            same = torch.tensor([float(teacher_state_digest(module) == state["teacher_digest"])])
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(same, op=dist.ReduceOp.MIN)
            out["teacher_unchanged"] = float(same)
        return out


def _config_image_token_id(model: Any, default: int) -> int:
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
    import deepspeed

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
