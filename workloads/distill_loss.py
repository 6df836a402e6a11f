"""The LLaVA-KD loss strategy plugged into the shared training loop (``train_loop_parts.LossFn``):

    L = CE + alpha * L_res + beta * L_vis + gamma * L_rel [+ w * term for each of `terms`]

Each micro-step: the student's forward and CE; the teacher's side of the batch from its
placement (``workloads/teacher``: ``online`` — the model in this worker, ``offline`` — entries a
``teacher_logits`` stage stored, ``service`` — the same entries from a shared Ray service, each
batch's request sent one step ahead by ``wrap_batches``); then every configured KD term
(``workloads/kd_terms/``, one file each) on it, added with its weight.

``DistillLoss`` travels to every Ray Train worker inside the loop's config dict (it must stay
picklable: only paths and numbers before ``setup``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from workloads.families.pairing import DistillCompatError
from workloads.teacher.online import TEACHER_PREFIX, config_image_token_id

__all__ = ["DistillLoss", "DistillCompatError", "TEACHER_PREFIX"]


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
    # "own": on the batch's `teacher_*` keys (its own tokenization; response KD only);
    # "cross": the same with another tokenizer (terms that align replies by text only)
    teacher_inputs: Literal["student", "own", "cross"] = "student"
    # "cross": len(teacher tokenizer), and the ids both vocabularies spell alike
    teacher_vocab_size: int | None = None
    shared_vocab: tuple[list[int], list[int]] | None = None
    # "own"/"cross" without a teacher model here (offline): the processor the data path
    # encodes every row with a second time (a `teacher_logits` output's `processor/`)
    teacher_processor: str | None = None
    # `teacher: service`: {"name": the service actor, "user": this stage's lease}
    service: dict[str, str] | None = None
    # at the first step, an online teacher must answer differently when its images are blanked
    allow_blind_teacher: bool = False
    # KD terms beyond the three built-ins: {name: weight | {weight, <params>}} (kd_terms/)
    terms: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from workloads.kd_terms import builtin_weights, reading_images, resolve_terms

        # {name: {"weight", "params"}} of every term with a weight > 0, built-ins first
        self.active = resolve_terms(builtin_weights(self), self.terms or {})
        visual = reading_images(self.active)
        if self.teacher_inputs == "cross":
            from workloads.families.pairing import CROSS_TOKENIZER_HINT
            from workloads.kd_terms import across_tokenizers

            other = [n for n in self.active if n not in across_tokenizers(self.active)]
            if other:
                raise DistillCompatError(
                    f"DistillLoss: the teacher has another tokenizer (teacher_inputs='cross'); "
                    f"the terms {', '.join(other)} compare the models token by token in one "
                    f"vocabulary (L_vis and L_rel also need identical image tokens): set their "
                    f"weights to 0, {CROSS_TOKENIZER_HINT}")
        if self.teacher_inputs == "own" and visual:
            raise DistillCompatError(
                f"DistillLoss: a teacher that tokenizes images differently from the student "
                f"(teacher_inputs='own') supports response KD only; the terms "
                f"{', '.join(visual)} read image positions: set their weights to 0 (beta: 0 "
                f"and gamma: 0 for the built-ins)")

    # ------------------------------------------------------------------ setup (per worker)

    def setup(self, model: Any, sctx: Any) -> None:
        """This worker's teacher placement, in ``sctx.state["teacher"]``."""
        state = sctx.state
        state["micro"] = 0
        # the image mask follows the model's own config (Gemma 3's processor reports the
        # begin-of-image token; the model replaces `config.image_token_id`)
        image_id = state["image_token_id"] = config_image_token_id(model, self.image_token_id)
        if self.offline_dir:
            from workloads.teacher.offline import OfflineTeacher

            state["teacher"] = OfflineTeacher(self.offline_dir, self.vocab_size, self._cross())
        elif self.service:
            from workloads.teacher.service import ServiceClient

            cross = self._cross()
            client = ServiceClient(self.service["name"], self.service["user"], self.vocab_size,
                                   cross=cross)
            if cross is None and client.info["image_token_id"] != image_id:
                raise DistillCompatError(
                    f"stage {sctx.stage.stage!r}: the service's teacher marks image tokens with "
                    f"id {client.info['image_token_id']}, the student with {image_id}; they "
                    f"must share the tokenizer and image token")
            state["teacher"] = client
        elif self.teacher_dir:
            from workloads.teacher.online import OnlineTeacher

            state["teacher"] = OnlineTeacher(
                self.teacher_dir, sctx, image_token_id=image_id, vocab_size=self.vocab_size,
                inputs=self.teacher_inputs, verify=self.verify_teacher,
                allow_blind=self.allow_blind_teacher, grad_accum=self.grad_accum,
                teacher_vocab_size=self.teacher_vocab_size, shared_vocab=self.shared_vocab)
        else:
            raise ValueError(f"stage {sctx.stage.stage!r}: distill needs input `teacher` (online) "
                             f"or `teacher_logits` (offline)")

    def _cross(self) -> tuple[int, Any] | None:
        """A stored or served teacher with another tokenizer: what its rows are read with."""
        if self.teacher_inputs != "cross":
            return None
        return self.teacher_vocab_size, self.shared_vocab

    # ------------------------------------------------------------------ one micro-step

    def __call__(self, engine: Any, batch: dict[str, Any], sctx: Any):
        from workloads.kd_terms import KDBatch, get_kd_term, objective
        from workloads.train_loop_parts import model_inputs

        state = sctx.state
        teacher = state["teacher"]
        # the teacher's own encoding (teacher_inputs="own") is no input of the student
        inputs = model_inputs({k: v for k, v in batch.items() if not k.startswith(TEACHER_PREFIX)})
        out = engine(**inputs, labels=batch["labels"])
        image_mask = batch["input_ids"] == state["image_token_id"]
        values: dict[str, Any] = {}
        if self.active:
            s, rows = teacher.rows(out.logits, batch, inputs, image_mask, sctx)
            x = KDBatch(s, rows, self.divergence, self.temperature, self.chunk_size)
            for name, term in self.active.items():
                x.term = name
                values[name] = get_kd_term(name).loss(x, **term["params"])
        total, logged = objective(out.loss, values,
                                  {n: t["weight"] for n, t in self.active.items()})
        metrics = {k: 0.0 for k in ("l_res", "l_vis", "l_rel")}
        metrics.update({k: float(v) for k, v in logged.items()})
        if hasattr(teacher, "checks"):
            metrics.update(teacher.checks(sctx, state["micro"]))
        state["micro"] += 1
        return total, metrics

    def wrap_batches(self, batches: Any, sctx: Any) -> Any:
        """The training loop's batches, each one's teacher request sent a step ahead
        (``teacher: service``); unchanged otherwise."""
        teacher = sctx.state.get("teacher")
        return teacher.ahead(batches) if hasattr(teacher, "ahead") else batches
