"""``distill``: LLaVA-KD distillation (Cai et al. 2024) on the shared training loop.

    L = CE + alpha * L_res + beta * L_vis + gamma * L_rel        (paper: 1, 1, 0.5; tau = 1)
          [+ w * term for every other KD term named in `terms`: workloads/kd_terms/]

DPT (distilled pre-training) is ``train: [projector]`` — the KD gradients flow through the frozen
LLM into the projector; DFT (distilled fine-tuning) is ``train: [projector, llm]``.

Inputs (``ctx.inputs``, local paths):
  init            student model dir to start from (or ``params.model`` + input ``tokenizer``)
  tokenizer       tokenizer dir, needed when the student comes from a preset
  teacher         teacher model dir (``teacher: online`` or ``service``)
  teacher_logits  ``logits`` output of a ``teacher_logits`` stage (``teacher: offline``)
  data            training shards dir (or ``params.data``)

``teacher: service`` runs the teacher outside the student workers, in a shared Ray service
(``workloads/teacher/service``) that returns the offline stage's payload per batch, one step
ahead of the student; with ``top_k`` unset (full vocabulary) its losses equal ``online``'s.

Checked at stage start (``families/pairing.py``; ``mmkd validate`` only sees unresolved references, so it checks the
wiring, and the families where both sides are presets or local dirs): teacher and student are of
one family (``workloads.families``) with identical tokenizers (vocabulary and special tokens);
for L_vis / L_rel both processors give identical ``input_ids`` (and pixel inputs) for a few
synthetic images of different sizes and aspect ratios — response KD alone needs only the
tokenizer; an offline teacher's logits were computed on exactly this tokenization (processor +
max_length). LLaVA-1.5 pairs are compared by vision geometry (image size, patch size) as before.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator

from workloads import teacher_logits  # noqa: F401  (registers the `teacher_logits` stage)
from orchestrator.plugin import StageContext
from workloads.distill_loss import DistillLoss
from workloads.families.pairing import (DistillCompatError, check_family_pair,
                                        check_teacher_student, describe, family_mismatch,
                                        family_problem, model_dir_family, same_vocabulary,
                                        spec_family, student_processor_parts, student_vision)
from workloads.divergences import DivergenceSpec
from orchestrator.plugin import workload
from workloads.teacher.service.stage import (TeacherResources, serve, service_spec,
                                              side_resources)
from workloads.pretrain_sft import Part, TrainConfig, run_train_stage, resolve_model_spec

__all__ = ["DistillConfig", "distill", "validate_distill", "check_distill_pair",
           "build_distill_loss", "DistillCompatError", "TeacherResources", "service_spec"]


class DistillConfig(TrainConfig):
    """LLaVA-KD: CE + alpha*L_res + beta*L_vis + gamma*L_rel; DFT by default (projector + LLM)."""

    train: list[Part] = Field(default_factory=lambda: ["projector", "llm"],
                              description="[projector] = DPT, [projector, llm] = DFT")
    lr: float = Field(2e-5, gt=0)
    alpha: float = Field(1.0, ge=0, description="weight of L_res (response-token KD); 0 skips it")
    beta: float = Field(1.0, ge=0, description="weight of L_vis (image-token KD); 0 skips it")
    gamma: float = Field(0.5, ge=0, description="weight of L_rel (visual relation); 0 skips it")
    terms: dict[str, Any] = Field(
        default_factory=dict, description="KD terms beyond L_res/L_vis/L_rel (whose weights are "
        "alpha/beta/gamma): {name: weight} or {name: {weight: w, <its parameters>}}; a term is a "
        "file in workloads/kd_terms/ or a plugin's (entry-point group mmkd.kd_terms)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature tau of L_res/L_vis")
    divergence: DivergenceSpec = Field(
        default_factory=lambda: DivergenceSpec(name="fkl"),
        description="divergence of L_res / L_vis: a name (fkl, rkl, jsd, skew_kl, skew_rkl, or any "
                    "file in workloads/divergences/) or {name: skew_kl, alpha: 0.1} with its own "
                    "parameters")
    teacher: Literal["online", "offline", "service"] = Field(
        "online", description="online: run the teacher in every student worker each step "
                              "(input `teacher`); offline: read stored top-k logits (input "
                              "`teacher_logits`); service: a shared Ray service of teacher "
                              "replicas answers each batch, one step ahead (input `teacher`)")
    teacher_resources: TeacherResources = Field(
        default_factory=TeacherResources, description="`teacher: service`: replicas, their "
        "cpus/gpus, restarts, cache and lease; stages naming the same teacher, top_k, "
        "precision, replicas, cpus and gpus share one service")
    top_k: int | None = Field(None, ge=1, description="`teacher: service`: teacher logits kept "
                              "per position; omit for the full vocabulary (equals `online`)")
    chunk_size: int | None = Field(128, ge=1, description="positions per chunk of the KD "
                                   "divergences (online); None = unchunked reference")
    allow_blind_teacher: bool = Field(
        False, description="an online teacher whose outputs on the first batch do not change "
                           "when its images are blanked fails the stage at start (its vision "
                           "weights may not be loaded); true: accept such a teacher")


    @field_validator("terms")
    @classmethod
    def _known_terms(cls, terms: dict[str, Any]) -> dict[str, Any]:
        """Each term registered and its parameters valid; stored canonical (defaults filled
        in), so the stage key does not depend on how the YAML spelled them."""
        from pydantic_core import PydanticCustomError

        from workloads.kd_terms import KDTermError, term_spec

        try:
            return {name: term_spec(name, value) for name, value in terms.items()}
        except KDTermError as e:  # its own sentence, without pydantic's "Value error, "
            raise PydanticCustomError("kd_term", str(e)) from None  # no context: braces stay

    def kd_terms(self) -> dict[str, dict[str, Any]]:
        """Every term of weight > 0 as ``{name: {"weight", "params"}}``, built-ins first."""
        from workloads.kd_terms import builtin_weights, resolve_terms

        return resolve_terms(builtin_weights(self), self.terms)

    def across_tokenizers(self) -> bool:
        """Every active term aligns replies by text (``uld``, ``span``): the pair may have two
        tokenizers, two families."""
        from workloads.kd_terms import across_tokenizers

        terms = self.kd_terms()
        return bool(terms) and len(across_tokenizers(terms)) == len(terms)

    def image_kd(self) -> bool:
        """A term reads image positions: teacher and student must encode images alike."""
        from workloads.kd_terms import reading_images

        return bool(reading_images(self.kd_terms()))


def _ref(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def validate_distill(config: DistillConfig, inputs: dict[str, Any]) -> list[str]:
    """Wiring checks for ``mmkd validate`` (inputs are unresolved references here)."""
    problems = []
    need = "teacher_logits" if config.teacher == "offline" else "teacher"
    other = "teacher_logits" if need == "teacher" else "teacher"
    if not inputs.get(need):
        problems.append(f"distill with `teacher: {config.teacher}` needs input `{need}: <stage>."
                        f"{'model' if need == 'teacher' else 'logits'}`")
    if inputs.get(other):
        problems.append(f"distill with `teacher: {config.teacher}` does not use input `{other}`; "
                        f"remove it or set `teacher: {'offline' if other == 'teacher_logits' else 'online'}`")
    if not inputs.get("init") and config.model is None:
        problems.append("distill needs a student: input `init: <stage>.model` or `params.model`")
    if config.model is not None and config.model.path is None and not inputs.get("init") \
            and not inputs.get("tokenizer"):
        problems.append("distill: a preset/parts student needs input `tokenizer: <stage>.tokenizer` "
                        "(the teacher's tokenizer)")
    if not config.kd_terms():
        problems.append("distill: alpha, beta and gamma are all 0 and `terms` adds none — that "
                        "is `sft`; use the sft workload")
    if config.top_k is not None and config.teacher != "service":
        where = ("an online teacher uses the full vocabulary" if config.teacher == "online"
                 else "stored logits keep the `teacher_logits` stage's top_k")
        problems.append(f"distill: `top_k` applies to `teacher: service` only ({where}); "
                        f"remove it or set `teacher: service`")
    problem = _validate_families(config, inputs)
    if problem:
        problems.append(problem)
    return problems


def _local_dir(value: Any) -> str | None:
    """A literal local directory given as an input (stage references are tuples/`stage.out`)."""
    value = _ref(value)
    return value if isinstance(value, str) and os.path.isdir(value) else None


def _validate_families(config: DistillConfig, inputs: dict[str, Any]) -> str | None:
    """The family check, offline, where both sides are known without running anything: a preset
    (its `family`) or a local model dir (its config.json)."""
    teacher = _local_dir(inputs.get("teacher")) if config.teacher != "offline" else None
    student: Any = _local_dir(inputs.get("init"))
    if student is None and not inputs.get("init") and config.model is not None:
        student = config.model.model_dump()
    if teacher is None or student is None or config.across_tokenizers():
        return None
    return family_problem(teacher, student)


def check_distill_pair(config: DistillConfig, spec: dict[str, Any], tokenizer_dir: str | None,
                       teacher_dir: str, stage: str | None = None) -> str:
    """The stage-start check of an online teacher against the student ``spec``: LLaVA-1.5
    pairs by vision geometry (``check_teacher_student``), every other family by probing both
    processors (``check_family_pair``). Returns the teacher's inputs: ``"student"``, ``"own"``
    (response KD on its own encoding) or ``"cross"`` (another tokenizer or family, with terms
    that align replies by text only)."""
    where = f"stage {stage!r}: " if stage else ""
    try:
        tf, sf = model_dir_family(teacher_dir) or "llava", spec_family(spec) or "llava"
    except ValueError as e:
        raise DistillCompatError(f"{where}{e}") from None
    desc = describe(spec, tokenizer_dir)
    if config.across_tokenizers() and (
            tf != sf or not same_vocabulary(teacher_dir, _student_tokenizer(spec, tokenizer_dir))):
        return "cross"
    if tf != sf:
        raise DistillCompatError(where + family_mismatch(tf, sf, teacher_dir, desc))
    if sf == "llava":
        try:
            check_teacher_student(teacher_dir, spec.get("path") or tokenizer_dir,
                                  student_vision(spec))
        except DistillCompatError as e:
            raise DistillCompatError(where + str(e)) from None
        return "student"
    return check_family_pair(teacher_dir, student_processor_parts(spec, tokenizer_dir),
                             image_kd=config.image_kd(), student_desc=desc,
                             stage=stage)


def _student_tokenizer(spec: dict[str, Any], tokenizer_dir: str | None) -> Any:
    """The student's tokenizer as it encodes (a family's special tokens included)."""
    from transformers import AutoTokenizer

    if (spec_family(spec) or "llava") == "llava":
        return AutoTokenizer.from_pretrained(spec.get("path") or tokenizer_dir)
    return student_processor_parts(spec, tokenizer_dir).tokenizer


def build_distill_loss(config: DistillConfig, ctx: StageContext) -> DistillLoss:
    """Resolve and check inputs on the driver; return the picklable loss strategy."""
    from transformers import AutoTokenizer

    from workloads.models import save_processor

    spec, tokenizer_dir = resolve_model_spec(config, ctx)
    student_tok = spec.get("path") or tokenizer_dir
    if (spec_family(spec) or "llava") == "llava":
        tok = AutoTokenizer.from_pretrained(student_tok)
        image_token_id = tok.convert_tokens_to_ids("<image>")
    else:  # the family's tokenizer (its special tokens added to a preset's trained vocabulary)
        parts = student_processor_parts(spec, tokenizer_dir)
        tok, image_token_id = parts.tokenizer, parts.image_token_id
    common = dict(vocab_size=len(tok), image_token_id=image_token_id,
                  alpha=config.alpha, beta=config.beta, gamma=config.gamma, terms=config.terms,
                  temperature=config.temperature, divergence=config.divergence,
                  chunk_size=config.chunk_size,
                  grad_accum=config.grad_accum, allow_blind_teacher=config.allow_blind_teacher)
    if config.teacher in ("online", "service"):
        teacher_dir = _ref(ctx.input("teacher"))
        inputs = check_distill_pair(config, spec, tokenizer_dir, teacher_dir, stage=ctx.stage)
        if inputs == "cross":  # the vocabularies' shared tokens, once, on the driver
            from workloads.data.alignment import vocabulary_map

            t_tok = AutoTokenizer.from_pretrained(teacher_dir)
            s_ids, t_ids = vocabulary_map(tok, t_tok)
            common.update(teacher_vocab_size=len(t_tok), teacher_inputs=inputs,
                          shared_vocab=(s_ids.tolist(), t_ids.tolist()))
    if config.teacher == "online":
        return DistillLoss(teacher_dir=teacher_dir, **{"teacher_inputs": inputs, **common})
    if config.teacher == "service":  # the service is started by `distill`, around the loop
        if inputs == "cross":  # the data path encodes every row with the teacher's processor
            common["teacher_processor"] = save_processor(
                {"path": teacher_dir}, None, os.path.join(ctx.output_dir, "_teacher_processor"))
            return DistillLoss(service={}, **common)
        if inputs != "student":
            raise DistillCompatError(
                f"stage {ctx.stage!r}: teacher {teacher_dir} tokenizes images differently from "
                f"the student; `teacher: service` runs it on the student's batch, so it needs "
                f"identical encodings. Use `teacher: online` (response KD on the teacher's own "
                f"encoding) or give the student the teacher's image processor settings")
        return DistillLoss(service={}, **common)

    from workloads.teacher.offline import read_manifest, tokenization_fingerprint

    logits_dir = _ref(ctx.input("teacher_logits"))
    if os.path.isdir(os.path.join(logits_dir, "logits")):
        logits_dir = os.path.join(logits_dir, "logits")
    manifest = read_manifest(logits_dir)
    proc_dir = save_processor(spec, tokenizer_dir, os.path.join(ctx.output_dir, "_processor"))
    fp = tokenization_fingerprint(proc_dir, config.max_length)
    if fp != manifest["fingerprint"] and config.across_tokenizers():
        from workloads.teacher.offline import cross_loss_args

        common.update(cross_loss_args(logits_dir, manifest, tok, config.max_length, ctx.stage))
        return DistillLoss(offline_dir=logits_dir, teacher_inputs="cross", **common)
    if fp != manifest["fingerprint"]:
        raise DistillCompatError(
            f"stage {ctx.stage!r}: teacher logits in {logits_dir} were computed on a different "
            f"tokenization (processor of teacher {manifest['teacher']}, max_length "
            f"{manifest['max_length']}) than this stage's (student processor from {student_tok}, "
            f"max_length {config.max_length}). Rerun `teacher_logits` with the same tokenizer, "
            f"image processor and max_length.")
    return DistillLoss(offline_dir=logits_dir, **common)


def _validate(config: DistillConfig, inputs: dict | None = None) -> list[str]:
    from workloads.pretrain_sft import data_problems

    return validate_distill(config, inputs) + data_problems(config, inputs)


@workload("distill", config=DistillConfig, version="1", outputs=("model",), distributed=True,
          validate=_validate, side_resources=side_resources)
def distill(config: DistillConfig, ctx: StageContext) -> dict[str, Any]:
    """LLaVA-KD distillation of a student from a teacher (online or stored logits)."""
    problems = validate_distill(config, {k: v for k, v in ctx.inputs.items() if v})
    if problems:
        raise DistillCompatError(f"stage {ctx.stage!r}: " + "; ".join(problems))
    loss_fn = build_distill_loss(config, ctx)
    if config.teacher != "service":
        return run_train_stage(config, ctx, loss_fn=loss_fn)
    return serve(config, ctx, loss_fn, run_train_stage)
