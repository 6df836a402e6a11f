"""``distill``: LLaVA-KD distillation (Cai et al. 2024) on the shared training loop.

    L = CE + alpha * L_res + beta * L_vis + gamma * L_rel        (paper: 1, 1, 0.5; tau = 1)

DPT (distilled pre-training) is ``train: [projector]`` — the KD gradients flow through the frozen
LLM into the projector; DFT (distilled fine-tuning) is ``train: [projector, llm]``.

Inputs (``ctx.inputs``, local paths):
  init            student model dir to start from (or ``params.model`` + input ``tokenizer``)
  tokenizer       tokenizer dir, needed when the student comes from a preset
  teacher         teacher model dir (``teacher: online``)
  teacher_logits  ``logits`` output of a ``teacher_logits`` stage (``teacher: offline``)
  data            training shards dir (or ``params.data``)

Checked at stage start (``mmkd validate`` only sees unresolved references, so it checks the
wiring): teacher and student tokenizers are identical (vocabulary and special tokens), both
models turn an image into the same number of tokens, and an offline teacher's logits were
computed on exactly this tokenization (processor + max_length).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from workloads import distill_offline  # noqa: F401  (registers `teacher_logits`)
from orchestrator.plugin import StageContext
from workloads.distill_loss import DistillLoss
from workloads.divergences import DivergenceSpec
from orchestrator.plugin import workload
from workloads.training import Part, TrainConfig, run_train_stage, resolve_model_spec

__all__ = ["DistillConfig", "distill", "validate_distill", "check_teacher_student",
           "build_distill_loss", "DistillCompatError"]


class DistillCompatError(ValueError):
    """Teacher and student (or stored teacher logits) cannot be distilled together."""

    deterministic = True  # Ray Train raises it at once (workloads/errors.py)


class DistillConfig(TrainConfig):
    """LLaVA-KD: CE + alpha*L_res + beta*L_vis + gamma*L_rel; DFT by default (projector + LLM)."""

    train: list[Part] = Field(default_factory=lambda: ["projector", "llm"],
                              description="[projector] = DPT, [projector, llm] = DFT")
    lr: float = Field(2e-5, gt=0)
    alpha: float = Field(1.0, ge=0, description="weight of L_res (response-token KD); 0 skips it")
    beta: float = Field(1.0, ge=0, description="weight of L_vis (image-token KD); 0 skips it")
    gamma: float = Field(0.5, ge=0, description="weight of L_rel (visual relation); 0 skips it")
    temperature: float = Field(1.0, gt=0, description="softmax temperature tau of L_res/L_vis")
    divergence: DivergenceSpec = Field(
        default_factory=lambda: DivergenceSpec(name="fkl"),
        description="divergence of L_res / L_vis: a name (fkl, rkl, jsd, skew_kl, skew_rkl, or any "
                    "file in workloads/divergences/) or {name: skew_kl, alpha: 0.1} with its own "
                    "parameters")
    teacher: Literal["online", "offline"] = Field(
        "online", description="online: run the teacher each step (input `teacher`); offline: read "
                              "stored top-k logits (input `teacher_logits`)")
    chunk_size: int | None = Field(128, ge=1, description="positions per chunk of the KD "
                                   "divergences (online); None = unchunked reference")


def _ref(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def validate_distill(config: DistillConfig, inputs: dict[str, Any]) -> list[str]:
    """Wiring checks for ``mmkd validate`` (inputs are unresolved references here)."""
    problems = []
    need = "teacher" if config.teacher == "online" else "teacher_logits"
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
    if config.alpha == config.beta == config.gamma == 0:
        problems.append("distill: alpha, beta and gamma are all 0 — that is `sft`; use the sft workload")
    return problems


# ----------------------------------------------------------------------------- stage-start checks


def _tokenizer_diff(a: Any, b: Any) -> list[str]:
    diffs = []
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))
        only_b = sorted(set(vb) - set(va))
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
        diffs.append(f"vocabularies differ (teacher {len(va)} tokens, student {len(vb)}; only in "
                     f"teacher: {only_a[:5]}, only in student: {only_b[:5]}, different ids: "
                     f"{moved[:5]})")
    sa, sb = a.special_tokens_map, b.special_tokens_map
    if sa != sb:
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        diffs.append("special tokens differ: " + ", ".join(
            f"{k}: teacher {sa.get(k)!r} vs student {sb.get(k)!r}" for k in keys))
    return diffs


def _vision_geometry(cfg: Any) -> tuple[int, int]:
    v = cfg.vision_config
    return int(v.image_size), (int(v.image_size) // int(v.patch_size)) ** 2


def _student_vision(spec: dict[str, Any]) -> tuple[int, int]:
    from workloads.models import PRESETS, ModelSpec

    s = ModelSpec.model_validate(spec)
    if s.preset:
        v = PRESETS[s.preset]["vision"]
        return v["image_size"], (v["image_size"] // v["patch_size"]) ** 2
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(s.path or s.parts.vision)
    v = getattr(cfg, "vision_config", cfg)
    return int(v.image_size), (int(v.image_size) // int(v.patch_size)) ** 2


def check_teacher_student(teacher_dir: str, student_tok_dir: str,
                          student_vision: tuple[int, int]) -> None:
    """Raise DistillCompatError unless the teacher at ``teacher_dir`` and the student share the
    tokenizer and produce the same number of image tokens from the same image size."""
    from transformers import AutoConfig, AutoTokenizer

    problems = _tokenizer_diff(AutoTokenizer.from_pretrained(teacher_dir),
                               AutoTokenizer.from_pretrained(student_tok_dir))
    t_size, t_tokens = _vision_geometry(AutoConfig.from_pretrained(teacher_dir))
    s_size, s_tokens = student_vision
    if (t_size, t_tokens) != (s_size, s_tokens):
        problems.append(f"image tokens differ: the teacher turns a {t_size}px image into {t_tokens} "
                        f"tokens, the student a {s_size}px image into {s_tokens}; L_vis/L_rel "
                        f"compare the models token by token, so they need equal counts (use a "
                        f"student vision tower with the teacher's image size and patch size)")
    if problems:
        raise DistillCompatError(
            f"teacher {teacher_dir} and student (tokenizer {student_tok_dir}) cannot be distilled: "
            + "; ".join(problems) + ". Build the student with the teacher's tokenizer "
            "(input `tokenizer`) and a matching vision geometry.")


def build_distill_loss(config: DistillConfig, ctx: StageContext) -> DistillLoss:
    """Resolve and check inputs on the driver; return the picklable loss strategy."""
    from transformers import AutoTokenizer

    from workloads.models import save_processor

    spec, tokenizer_dir = resolve_model_spec(config, ctx)
    student_tok = spec.get("path") or tokenizer_dir
    tok = AutoTokenizer.from_pretrained(student_tok)
    common = dict(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                  alpha=config.alpha, beta=config.beta, gamma=config.gamma,
                  temperature=config.temperature, divergence=config.divergence,
                  chunk_size=config.chunk_size,
                  grad_accum=config.grad_accum)
    if config.teacher == "online":
        teacher_dir = _ref(ctx.input("teacher"))
        check_teacher_student(teacher_dir, student_tok, _student_vision(spec))
        return DistillLoss(teacher_dir=teacher_dir, **common)

    from workloads.distill_offline import read_manifest, tokenization_fingerprint

    logits_dir = _ref(ctx.input("teacher_logits"))
    if os.path.isdir(os.path.join(logits_dir, "logits")):
        logits_dir = os.path.join(logits_dir, "logits")
    manifest = read_manifest(logits_dir)
    proc_dir = save_processor(spec, tokenizer_dir, os.path.join(ctx.output_dir, "_processor"))
    fp = tokenization_fingerprint(proc_dir, config.max_length)
    if fp != manifest["fingerprint"]:
        raise DistillCompatError(
            f"stage {ctx.stage!r}: teacher logits in {logits_dir} were computed on a different "
            f"tokenization (processor of teacher {manifest['teacher']}, max_length "
            f"{manifest['max_length']}) than this stage's (student processor from {student_tok}, "
            f"max_length {config.max_length}). Rerun `teacher_logits` with the same tokenizer, "
            f"image processor and max_length.")
    return DistillLoss(offline_dir=logits_dir, **common)


def _validate(config: DistillConfig, inputs: dict | None = None) -> list[str]:
    from workloads.training import data_problems

    return validate_distill(config, inputs) + data_problems(config, inputs)


@workload("distill", config=DistillConfig, version="1", outputs=("model",), distributed=True,
          validate=_validate)
def distill(config: DistillConfig, ctx: StageContext) -> dict[str, Any]:
    """LLaVA-KD distillation of a student from a teacher (online or stored logits)."""
    problems = validate_distill(config, {k: v for k, v in ctx.inputs.items() if v})
    if problems:
        raise DistillCompatError(f"stage {ctx.stage!r}: " + "; ".join(problems))
    return run_train_stage(config, ctx, loss_fn=build_distill_loss(config, ctx))
