"""``pretrain`` and ``sft``: the same loop (``workloads.train_loop``) with different defaults.

Inputs (``ctx.inputs``, local paths):
  tokenizer  tokenizer dir, needed when the model comes from a preset
  init       upstream model dir (``<stage>.model``) to start from instead of ``config.model``
  data       upstream shards dir; otherwise ``config.data`` (a DataSource)
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.plugin import StageContext
from workloads.data.preflight import validate_config_sources
from workloads.data.source import DataSource
from workloads.models import ModelSpec, save_processor
from orchestrator.plugin import WorkloadConfig, workload
from workloads.train_loop import run_training
from workloads.train_loop_parts import TrainParams

__all__ = ["TrainConfig", "PretrainConfig", "SFTConfig", "pretrain", "sft", "resolve_model_spec",
           "resolve_data_source", "train_params"]

Part = Literal["vision", "projector", "llm", "bridges"]
_FORMAT_BY_EXT = {".tar": "webdataset", ".json": "llava_json", ".jsonl": "llava_json",
                  ".parquet": "parquet"}


class TrainConfig(WorkloadConfig):
    """Hyperparameters shared by pretrain / sft (and the base of distill's config)."""

    model: ModelSpec | None = Field(None, description="model to train; omit to start from input `init`")
    data: DataSource | None = Field(None, description="training set; omit to use input `data`")
    train: list[Part] = Field(default_factory=lambda: ["projector"],
                              description="parts whose weights are updated; the rest are frozen "
                                          "(`bridges`: the new layers of a JAM-Cross merge)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    batch_size: int = Field(8, ge=1, description="samples per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (wins over epochs)")
    epochs: float | None = Field(1.0, gt=0, description="passes over the data when max_steps is unset")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="linear warmup share of the steps")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    max_length: int = Field(256, ge=8, description="tokens per sample after truncation")
    max_samples: int | None = Field(
        None, ge=1, description="train on at most this many samples: the first ones of the "
                                "seeded file order, the same on every run")
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between checkpoints (0: none)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    seed: int | None = Field(None, description="defaults to the pipeline seed")
    deterministic: bool = Field(
        True, description="on GPU, use torch's deterministic algorithms (cuBLAS workspace, no "
                          "cuDNN autotuning); kernels without a deterministic version are "
                          "logged. CPU runs are deterministic by construction either way")
    nonfinite: Literal["fail", "skip_batch"] = Field(
        "fail", description="a NaN/Inf loss term: `fail` the stage at that step (nothing is "
                            "published) or `skip_batch` (no update from that batch; counted "
                            "as nonfinite/skipped_batches). A non-finite gradient norm always fails")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="error budget: the stage fails if more than this fraction "
                                      "of samples is unusable (corrupt image, bad JSON, ...)")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainConfig":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give `max_steps` or `epochs`")
        return self


class PretrainConfig(TrainConfig):
    """Pretraining (alignment): only the projector learns, at a high lr."""


class SFTConfig(TrainConfig):
    """Instruction tuning: projector + LLM learn, at a low lr."""

    train: list[Part] = Field(default_factory=lambda: ["projector", "llm"])
    lr: float = Field(2e-5, gt=0)


def resolve_model_spec(config: TrainConfig, ctx: StageContext) -> tuple[dict[str, Any], str | None]:
    """The model to start from (input ``init`` wins over ``config.model``) and the tokenizer dir."""
    tokenizer = ctx.inputs.get("tokenizer")
    if ctx.inputs.get("init"):
        return ModelSpec(path=ctx.inputs["init"]).model_dump(), tokenizer
    if config.model is None:
        raise ValueError(f"stage {ctx.stage!r}: set `params.model` (e.g. `{{preset: tiny-student}}`) "
                         f"or give input `init: <stage>.model`")
    if config.model.path is None and not tokenizer:
        raise ValueError(f"stage {ctx.stage!r}: model {config.model.preset or 'parts'} needs input "
                         f"`tokenizer: <stage>.tokenizer`")
    return config.model.model_dump(), tokenizer


def resolve_data_source(config: TrainConfig, ctx: StageContext) -> Any:
    """The training DataSource: input ``data`` (a shards dir) wins over ``config.data``."""
    path = ctx.inputs.get("data")
    if path:
        path = path[0] if isinstance(path, list) else path
        exts = {os.path.splitext(f)[1] for f in os.listdir(path)} if os.path.isdir(path) \
            else {os.path.splitext(path)[1]}
        formats = {_FORMAT_BY_EXT[e] for e in exts if e in _FORMAT_BY_EXT}
        if len(formats) != 1:
            raise ValueError(f"stage {ctx.stage!r}: input data {path} holds no single known format "
                             f"({sorted(exts)}); expected .tar, .json/.jsonl or .parquet files")
        return DataSource(format=formats.pop(), paths=[path])
    if config.data is None:
        raise ValueError(f"stage {ctx.stage!r}: set `params.data` or give input `data: <stage>.shards`")
    return config.data


def train_params(config: TrainConfig, ctx: StageContext, pad_token_id: int) -> TrainParams:
    return TrainParams(
        train=list(config.train), lr=config.lr, batch_size=config.batch_size,
        grad_accum=config.grad_accum, max_steps=config.max_steps, epochs=config.epochs,
        warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, checkpoint_every=config.checkpoint_every,
        max_failures=config.max_failures, nonfinite=config.nonfinite,
        deterministic=config.deterministic,
        seed=ctx.seed if config.seed is None else config.seed, pad_token_id=pad_token_id)


def run_train_stage(config: TrainConfig, ctx: StageContext, loss_fn: Any = None) -> dict[str, Any]:
    """Shared body of pretrain / sft (and distill): processor → dataset → loop."""
    from workloads.data.dataset import build_train_dataset  # read → preprocess, lazily
    from workloads.data.quality import SampleQuality

    spec, tokenizer_dir = resolve_model_spec(config, ctx)
    proc_dir = save_processor(spec, tokenizer_dir, os.path.join(ctx.output_dir, "_processor"))
    params_seed = ctx.seed if config.seed is None else config.seed
    source = resolve_data_source(config, ctx)
    if config.max_samples is not None:
        source = source.model_copy(update={"max_samples": config.max_samples})
    # Bad samples are dropped and counted by kind in the run's progress hub (an actor of its
    # own outside a run); the budget is applied while streaming (after enough samples) and
    # once more at the end of the stage.
    quality = SampleQuality.create(max_bad_fraction=config.max_bad_fraction,
                                   name=source.describe(), host=ctx.reporter)
    # A teacher that tokenizes images differently from the student (DistillLoss with
    # teacher_inputs="own": response KD only) reads its own encoding of each row: the data
    # path encodes every row with its processor too, into `teacher_` columns.
    teacher_proc = getattr(loss_fn, "teacher_processor", None)
    if getattr(loss_fn, "teacher_inputs", "student") in ("own", "cross") and not teacher_proc:
        teacher_dir = getattr(loss_fn, "teacher_dir", None)
        if not teacher_dir:
            raise ValueError(f"stage {ctx.stage!r}: the loss runs the teacher on its own "
                             f"encoding of each row (teacher_inputs='own') but names no "
                             f"teacher_dir")
        teacher_proc = save_processor({"path": teacher_dir}, None,
                                      os.path.join(ctx.output_dir, "_teacher_processor"))
    dataset = build_train_dataset(source, proc_dir, config.max_length, params_seed,
                                  quality=quality, teacher_processor_dir=teacher_proc)
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(proc_dir).pad_token_id
    num_rows = None
    if config.max_steps is None:  # plan the steps from an epoch's usable rows
        num_rows = dataset.count()
        quality.check()  # every sample bad: the data error, not "no steps" or an empty shard
        quality.reset()  # that pass only counted; the training pass reports what it skipped
    metrics = run_training(ctx, model_spec=spec, tokenizer_dir=tokenizer_dir, dataset=dataset,
                           params=train_params(config, ctx, pad), loss_fn=loss_fn,
                           num_rows=num_rows, quality=quality)
    for line in quality.warnings():
        ctx.log(line, level="warning")
    quality.check()  # raises DataQualityError naming the dominant cause and an example
    metrics.update(quality.metrics())
    return metrics


def data_problems(config: Any, inputs: dict | None = None) -> list[str]:
    """Registry hook for `mmkd validate`: a `data:` param that is missing, empty or unreadable."""
    return validate_config_sources(config, inputs) if getattr(config, "data", None) else []


@workload("pretrain", config=PretrainConfig, version="1", outputs=("model",), distributed=True,
          validate=data_problems)
def pretrain(config: PretrainConfig, ctx: StageContext) -> dict[str, Any]:
    """Align vision and language: train the projector on image-caption data."""
    return run_train_stage(config, ctx)


@workload("sft", config=SFTConfig, version="1", outputs=("model",), distributed=True,
          validate=data_problems)
def sft(config: SFTConfig, ctx: StageContext) -> dict[str, Any]:
    """Instruction-tune projector + LLM on conversations."""
    return run_train_stage(config, ctx)
