"""Pieces of the training loop that are pure or nearly so: hyperparameters, the DeepSpeed config,
optimizer + schedule, batch collation, the loss strategy and the resource pre-flight check.

Kept apart from ``train_loop.py`` so the loop there reads top to bottom; also how many steps a run
has (``plan_total_steps``), seeding (``seed_all``, ``deterministic_algorithms``), the
DeepSpeed import (``import_deepspeed``) and Ray Train's trainer as mmkd runs it
(``trainer_class``).
"""

from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["TrainParams", "LossFn", "CausalLMLoss", "StepContext", "model_inputs",
           "deepspeed_config", "build_optimizer", "warmup_cosine",
           "check_resources", "ResourceError",
           "plan_total_steps", "deterministic_algorithms", "seed_all", "import_deepspeed",
           "trainer_class", "TRAIN_CALLBACKS_ENV", "lean_ray_train", "ordered_ingest_options",
           "whole_dataset"]

# "ray" keeps Ray Train's own callbacks and dataset hand-over (``trainer_class``): to compare
# (benchmarks/train_stage_overhead.py), or should mmkd's setting ever misbehave
TRAIN_CALLBACKS_ENV = "MMKD_RAY_TRAIN_CALLBACKS"


@dataclass
class TrainParams:
    """Everything the loop needs besides model, data and the stage context (picklable)."""

    train: list[str] = field(default_factory=lambda: ["projector"])
    lr: float = 1e-3
    batch_size: int = 8              # per worker, per micro-step
    grad_accum: int = 1
    max_steps: int | None = None     # optimizer steps; wins over epochs when both are given
    epochs: float | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0        # optimizer steps; 0 = only the final model
    max_failures: int = 1            # worker-group restarts from the latest checkpoint
    seed: int = 0
    pad_token_id: int = 0
    collective_timeout_s: int = 600  # a hung collective fails the stage instead of hanging it
    min_lr_ratio: float = 0.0
    nonfinite: str = "fail"          # "fail" | "skip_batch": a NaN/Inf loss fails the stage or is skipped
    deterministic: bool = True       # GPU: torch's deterministic algorithms (CPU is by construction)


@dataclass
class StepContext:
    """What a loss function may look at besides the model and the batch."""

    step: int               # optimizer steps done so far
    total_steps: int
    rank: int
    world_size: int
    device: Any
    dtype: Any
    stage: Any              # the StageContext (output dir, inputs, ...)
    state: dict[str, Any] = field(default_factory=dict)  # set up once per worker by LossFn.setup


class LossFn(Protocol):
    """The strategy the shared loop calls each micro-step. ``setup`` runs once per worker after
    the student is built (load a teacher there); ``__call__`` runs the forward pass(es)."""

    def setup(self, model: Any, sctx: StepContext) -> None: ...

    def __call__(self, model: Any, batch: dict[str, Any], sctx: StepContext
                 ) -> tuple[Any, dict[str, float]]: ...


_NOT_MODEL_INPUTS = ("labels", "has_image", "mm_digest", "reply_group")  # reply_group: cross KD


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs for a collated batch. Text-only rows carry no image tokens, so only the
    images of rows with ``has_image`` go in (the models check image tokens == image features).

    LLaVA batches hold one image row per sample: the rows with ``has_image`` are picked here.
    Other families' batches (``collate`` marks them with ``mm_digest``) already hold only the
    images of the rows that have one (Idefics3/SmolVLM: an all-zero tile row for a text-only
    sample, which the model drops), with the family's extra inputs (token-type ids,
    ``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``): all go in as collated."""
    has = batch["has_image"].bool()
    if "mm_digest" in batch:
        out = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
        if not bool(has.any()):
            out.pop("pixel_values", None)
        return out
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if bool(has.any()):
        out["pixel_values"] = batch["pixel_values"][has]
    return out


class CausalLMLoss:
    """Next-token cross-entropy on the unmasked labels (pretrain / SFT)."""

    def setup(self, model: Any, sctx: StepContext) -> None:
        pass

    def __call__(self, model: Any, batch: dict[str, Any], sctx: StepContext):
        out = model(**model_inputs(batch), labels=batch["labels"])
        return out.loss, {"ce": float(out.loss.detach())}


def deepspeed_config(ds: dict[str, Any], p: TrainParams, world_size: int) -> dict[str, Any]:
    """DeepSpeed config from the stage's ``deepspeed`` dict (zero_stage, precision, offload_*).

    One worker with ZeRO-1/2 and no offload runs as ZeRO-0: there is nothing to partition, and
    the partitioned path only adds flatten/copy work per step (measured in
    benchmarks/train_throughput.py)."""
    stage = int(ds.get("zero_stage", 0))
    precision = ds.get("precision", "fp32")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0-3, got {stage}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"deepspeed.precision must be fp32, bf16 or fp16, got {precision!r}")
    if world_size == 1 and stage in (1, 2) and not ds.get("offload_optimizer"):
        stage = 0
    zero: dict[str, Any] = {"stage": stage}
    if ds.get("offload_optimizer"):
        if stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.get("offload_params"):
        if stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": p.batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.batch_size * p.grad_accum * world_size,
        "gradient_clipping": p.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Our torch AdamW also works with ZeRO-Offload (no compiled DeepSpeedCPUAdam needed).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: Any, p: TrainParams, total_steps: int):
    """AdamW over trainable params only (frozen parts get no optimizer state); no decay on
    biases and norms. Returns ``(optimizer, lr_scheduler)``."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": p.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = int(round(p.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, warmup, p.min_lr_ratio))
    return opt, sched


class ResourceError(RuntimeError):
    pass


def check_resources(stage: str, num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
                    cluster: dict[str, float]) -> None:
    """Fail before training when the stage asks for more than the whole cluster has."""
    need_cpu = num_workers * cpus_per_worker
    need_gpu = num_workers * gpus_per_worker
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    problems = []
    if need_cpu > have_cpu:
        problems.append(f"{num_workers} workers × {cpus_per_worker} CPUs = {need_cpu:g} CPUs but the "
                        f"cluster has {have_cpu:g}; lower `resources.num_workers` or "
                        f"`resources.cpus_per_worker`")
    if need_gpu > have_gpu:
        problems.append(f"{num_workers} workers × {gpus_per_worker} GPUs = {need_gpu:g} GPUs but the "
                        f"cluster has {have_gpu:g}; lower `resources.gpus_per_worker` (0 = CPU "
                        f"training) or add GPU nodes")
    if problems:
        raise ResourceError(f"stage {stage!r} cannot start: " + "; ".join(problems))


def plan_total_steps(p: TrainParams, num_rows: int | None, world_size: int) -> int:
    """Optimizer steps for the run: ``max_steps`` if given, else epochs over ``num_rows``."""
    if p.max_steps:
        return int(p.max_steps)
    if not p.epochs or num_rows is None:
        raise ValueError("train: give `max_steps` or `epochs` (epochs needs a data set of known size)")
    per_step = p.batch_size * p.grad_accum * world_size
    # Ray Train splits the rows equally across workers; the loop counts micro-batches across
    # epoch boundaries, so a partial accumulation window carries over into the next epoch.
    batches_per_epoch = math.ceil((num_rows // world_size) / p.batch_size)
    steps = int(batches_per_epoch * p.epochs) // p.grad_accum
    if steps < 1:
        raise ValueError(f"train: {num_rows} rows give no full optimizer step of {per_step} samples "
                         f"(batch_size × grad_accum × workers); lower batch_size or grad_accum")
    return int(steps)


def deterministic_algorithms(enabled: bool) -> set[str]:
    """On GPU: torch's deterministic algorithms, warn-only, so an op without a deterministic
    implementation runs anyway and is named; returns the set that collects those names."""
    import warnings

    import torch

    found: set[str] = set()
    if not enabled:
        return found
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    shown = warnings.showwarning

    def collect(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "deterministic" in text:
            found.add(text.split(" does not have a deterministic")[0].strip()[:120])
        return shown(message, category, filename, lineno, file, line)

    warnings.showwarning = collect
    return found


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def import_deepspeed():
    """``deepspeed``, imported without MLflow. ``deepspeed.autotuning`` imports ``mlflow`` at
    module level for an autotuner mmkd never runs: 1.0 s of every training worker's start here
    (2.3 s -> 1.3 s), paid again in every Ray Train stage. A training worker reports through Ray
    Train, never to MLflow; ``mlflow`` imports normally afterwards (``sys.modules`` is restored)."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: deepspeed skips it
    try:
        import deepspeed
    finally:
        if hide and "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def trainer_class() -> type:
    """Ray Train's ``TorchTrainer`` with three of its defaults changed (Ray 2.60 has no public
    hook for them; both methods overridden are its own):

    - deterministic stage errors (bad data, a NaN loss) are raised, not retried
      (``workloads.errors.no_retry_failure_policy``);
    - no ``PlacementGroupCleaner``: a detached actor per run (a process, ~1.8 s of CPU at
      every stage start on 2 cores) whose job mmkd's drivers do themselves, and for more
      cases (``orchestrator.placement.Reaper``: a run killed while starting its workers);
    - no ``DatasetManager`` actor (~1.5 s of CPU) for a run given no dataset to split (one
      worker iterates its whole dataset itself: ``train_loop.run_training``).

    The callbacks are matched by name: should Ray rename one, it is kept, nothing breaks."""
    from ray.train.torch import TorchTrainer

    from workloads.errors import no_retry_failure_policy

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            kwargs["failure_policy"] = no_retry_failure_policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if not lean_ray_train():
                return callbacks
            drop = {"PlacementGroupCleanerCallback"} | (set() if self.datasets
                                                        else {"DatasetsCallback"})
            return [c for c in callbacks if type(c).__name__ not in drop]

    return Trainer


def lean_ray_train() -> bool:
    """mmkd's Ray Train setting (``trainer_class``), unless ``TRAIN_CALLBACKS_ENV`` says "ray"."""
    return os.environ.get(TRAIN_CALLBACKS_ENV, "mmkd") != "ray"


def ordered_ingest_options() -> Any:
    """Ray Train's default ingest options with ``preserve_order``: every worker gets the same
    rows in the same order on every run (see ``workloads/data/dataset.py``)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def whole_dataset(dataset: Any) -> Any:
    """The dataset a run's one worker iterates itself, with the options Ray Train gives a
    shard (``DataConfig.configure``)."""
    dataset = dataset.copy(dataset)
    dataset.context.execution_options = ordered_ingest_options()
    return dataset
