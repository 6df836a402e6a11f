"""The one training loop that pretrain, SFT and distillation share: Ray Train V2 ``TorchTrainer``
with DeepSpeed inside ``train_loop_per_worker``.

Driver side (``run_training``): check resources, size the run, start the trainer with a
deterministic ``RunConfig(storage_path, name)`` so a restarted stage resumes from its latest
checkpoint, then move the final model into ``ctx.output_dir/model``.

Worker side (``train_loop_per_worker``): build the model from its spec, freeze parts, wrap in
DeepSpeed, resume if a checkpoint exists, loop. The loss is a strategy (``LossFn``), so distillation
plugs in a teacher-based loss without copying the loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orchestrator.plugin import StageContext
from workloads.checkpoints import load_worker_state, refusing_pickled_code, save_worker_state
from workloads.errors import NonFiniteLossError, StageError, root_stage_error
from workloads.lineage import write_lineage
from workloads.train_loop_parts import (CausalLMLoss, LossFn, StepContext, TrainParams,
                                        build_optimizer, check_resources, deepspeed_config,
                                        deterministic_algorithms, import_deepspeed, plan_total_steps,
                                        lean_ray_train, ordered_ingest_options, seed_all,
                                        trainer_class, whole_dataset)

__all__ = ["run_training", "train_loop_per_worker", "CKPT_META"]

CKPT_META = "mmkd_checkpoint.json"
MAX_SKIPPED_IN_A_ROW = 20  # `nonfinite: skip_batch` gives up after this many NaN batches
DS_TAG = "ds"


def run_training(ctx: StageContext, *, model_spec: dict[str, Any], tokenizer_dir: str | None,
                 dataset: Any, params: TrainParams, loss_fn: LossFn | None = None,
                 num_rows: int | None = None, quality: Any = None) -> dict[str, Any]:
    """Train on ``dataset`` (a Ray Dataset in the data row contract) and write
    ``ctx.output_dir/model``. Returns final metrics (loss, steps, samples, ...).

    ``quality`` (the data's SampleQuality): a worker whose shard yields nothing reports the
    data error behind it (every sample bad) rather than an empty shard."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    t_start = time.perf_counter()
    res = ctx.resources
    check_resources(ctx.stage, res.num_workers, res.cpus_per_worker, res.gpus_per_worker,
                    ray.cluster_resources())
    if params.max_steps is None and num_rows is None:
        num_rows = dataset.count()
    total_steps = plan_total_steps(params, num_rows, res.num_workers)
    use_gpu = res.gpus_per_worker > 0
    resources = {"CPU": res.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = res.gpus_per_worker
    storage = ctx.checkpoint_storage or os.path.join(ctx.output_dir, "_checkpoints")
    run_name = ctx.run_name or f"{ctx.stage}-{ctx.key[:12]}"
    whole = res.num_workers == 1 and lean_ray_train()
    trainer = trainer_class()(
        train_loop_per_worker,
        train_loop_config={"ctx": ctx, "params": params, "model_spec": model_spec,
                           "tokenizer_dir": tokenizer_dir, "total_steps": total_steps,
                           "loss_fn": loss_fn or CausalLMLoss(), "quality": quality,
                           "pid_dir": _pid_dir(storage, run_name),
                           "dataset": whole_dataset(dataset) if whole else None},
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                 timeout_s=params.collective_timeout_s),
        run_config=RunConfig(storage_path=storage, name=run_name,
                             failure_config=FailureConfig(max_failures=params.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        # several workers: Ray Train splits the dataset among them; one worker iterates the
        # whole dataset itself (no DatasetManager actor, a process per stage, to hand it over)
        datasets=None if whole else {"train": dataset},
        dataset_config=DataConfig(datasets_to_split="all" if res.num_workers > 1 else [],
                                  execution_options=ordered_ingest_options(),
                                  enable_shard_locality=False),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised: the stage's own error, unwrapped
        raise (root_stage_error(e) or e) from None
    if result.error:
        raise root_stage_error(result.error) or result.error
    if result.checkpoint is None:
        raise RuntimeError(f"stage {ctx.stage!r}: training ended without a final checkpoint")
    with result.checkpoint.as_directory() as d:
        meta = json.load(open(os.path.join(d, CKPT_META)))
        _copy_atomic(os.path.join(d, "model"), os.path.join(ctx.output_dir, "model"))
    init = ctx.inputs.get("init")
    write_lineage(os.path.join(ctx.output_dir, "model"), [init] if isinstance(init, str) else [],
                  ctx.key, {"stage": ctx.stage, "samples": int(meta["final"]["samples"]),
                            "seconds": round(time.perf_counter() - t_start, 2)})
    if ctx.reporter is None:  # no live hub: keep the per-step history on the driver's context
        ctx.local_metrics.extend({"stage": ctx.stage, "step": h["step"], "total_steps": total_steps,
                                  "metrics": {k: v for k, v in h.items() if k != "step"}}
                                 for h in meta["history"])
    return meta["final"]


def _pid_dir(storage: str, run_name: str) -> str | None:
    # Which processes work a stage (for ops and the worker-kill test); local storage only.
    return None if "://" in storage else os.path.join(storage, run_name, "worker_pids")


def _copy_atomic(src: str, dst: str) -> None:
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------- worker side


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    ctx: StageContext = config["ctx"]
    p: TrainParams = config["params"]
    total_steps: int = config["total_steps"]
    loss_fn: LossFn = config["loss_fn"]
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    # the shard first, in a thread: a split coordinator (a new process) starts while this
    # worker builds its model, not after
    pool = ThreadPoolExecutor(1, thread_name_prefix="mmkd-shard")
    whole = config.get("dataset")  # one worker: the whole dataset (``whole_dataset``)
    shard_future = pool.submit(whole.iterator) if whole is not None else \
        pool.submit(ray.train.get_dataset_shard, "train")
    pool.shutdown(wait=False)  # the call runs on; the thread ends with it
    on_gpu = torch.cuda.is_available() and ctx.resources.gpus_per_worker > 0
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
        torch.set_num_threads(max(1, int(ctx.resources.cpus_per_worker)))
    deepspeed = import_deepspeed()  # in the worker: picks the accelerator of this machine

    _write_pid(config.get("pid_dir"), rank)
    seed_all(p.seed)
    nondeterministic = deterministic_algorithms(on_gpu and p.deterministic)
    if on_gpu:
        from ray.train.torch import get_device

        device = get_device()
    else:
        device = torch.device("cpu")

    from workloads.data.dataset import iter_train_batches
    from workloads.models import build_model, set_trainable

    model, processor = build_model(config["model_spec"], config["tokenizer_dir"])
    set_trainable(model, p.train)
    optimizer, scheduler = build_optimizer(model, p, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(ctx.deepspeed, p, world))
    if world == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False  # one rank: nothing to average
    dtype = next(engine.module.parameters()).dtype
    sctx = StepContext(step=0, total_steps=total_steps, rank=rank, world_size=world,
                       device=device, dtype=dtype, stage=ctx)
    loss_fn.setup(engine, sctx)

    step, history, resumed_from = 0, [], None
    position = {"epoch": 0, "rows": 0}  # where this worker's data stream stands
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            meta = json.load(open(os.path.join(d, CKPT_META)))
            if meta["kind"] == "final":  # the run had finished: hand the same model back
                _report_final(d, meta, rank)
                return
            with refusing_pickled_code(f"stage {ctx.stage!r} (resuming)"):
                engine.load_checkpoint(d, tag=DS_TAG)
            step, history, resumed_from = meta["step"], meta["history"], meta["step"]
            position = load_worker_state(d, rank)

    zero3 = int(ctx.deepspeed.get("zero_stage", 0)) == 3
    shard = shard_future.result()
    window = {"loss": 0.0, "tokens": 0, "samples": 0, "micro": 0}
    extra: dict[str, float] = {}
    skipped = int(history[-1].get("nonfinite/skipped_batches", 0)) if history else 0
    in_a_row = 0
    t_window = time.perf_counter()
    epoch, skip_rows = position["epoch"], position["rows"]
    while step < total_steps:
        n_batches, rows = 0, skip_rows
        batches = iter_train_batches(shard, p.batch_size, p.pad_token_id, p.seed, epoch,
                                     rank=rank, skip_rows=skip_rows)
        if hasattr(loss_fn, "wrap_batches"):  # a loss that looks a batch ahead (teacher service)
            batches = loss_fn.wrap_batches(batches, sctx)
        for batch in batches:
            n_batches += 1
            rows += int(batch["input_ids"].shape[0])
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            sctx.step = step
            loss, extra = loss_fn(engine, batch, sctx)
            bad = _nonfinite_terms(loss, extra, agree=p.nonfinite == "skip_batch" and world > 1,
                                   device=device)
            if bad:
                if p.nonfinite != "skip_batch":
                    raise NonFiniteLossError(
                        f"stage {ctx.stage!r}: the loss is not finite at step {step + 1} "
                        f"({', '.join(bad)}); the stage stops and nothing is published. Lower "
                        f"`lr`, check the data, or set `nonfinite: skip_batch` to skip such "
                        f"batches")
                skipped += 1  # every rank skips it together: no backward, no update
                in_a_row += 1
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise NonFiniteLossError(
                        f"stage {ctx.stage!r}: the loss was not finite for {in_a_row} batches in "
                        f"a row at step {step + 1} ({', '.join(bad)}); skipping cannot help. "
                        f"Lower `lr` or check the data")
                continue
            in_a_row = 0
            engine.backward(loss)
            engine.step()  # DeepSpeed only steps the optimizer on accumulation boundaries
            window["loss"] += float(loss.detach())
            window["tokens"] += int(batch["attention_mask"].sum())
            window["samples"] += int(batch["input_ids"].shape[0])
            window["micro"] += 1
            if window["micro"] < p.grad_accum:
                continue
            step += 1
            _check_grad_norm(engine, ctx.stage, step)
            metrics = _step_metrics(window, t_window, scheduler, extra, device)
            metrics["epoch"] = epoch
            metrics["nonfinite/skipped_batches"] = skipped
            history.append({"step": step, **metrics})
            if rank == 0:
                ctx.report(metrics, step=step, total_steps=total_steps)
            window = {"loss": 0.0, "tokens": 0, "samples": 0, "micro": 0}
            t_window = time.perf_counter()
            if step >= total_steps:
                break
            if p.checkpoint_every and step % p.checkpoint_every == 0:
                _save_checkpoint(engine, step, history, metrics, rank,
                                 {"epoch": epoch, "rows": rows})
                t_window = time.perf_counter()
        if n_batches == 0 and not skip_rows:
            if config.get("quality") is not None:
                config["quality"].check()  # every sample bad: that is the error to report
            raise StageError(f"stage {ctx.stage!r}: worker {rank} got an empty data shard; "
                             f"give more samples than workers × batch_size")
        epoch, skip_rows = epoch + 1, 0

    if nondeterministic and rank == 0:
        ctx.log("deterministic: no deterministic implementation for "
                + "; ".join(sorted(nondeterministic)), level="warning")
    # the last step's own metrics (ce, l_res, ... of a distill stage) plus the run's totals
    final = {**{k: v for k, v in history[-1].items() if k not in ("step", "epoch")},
             "loss": history[-1]["loss"], "steps": step, "total_steps": total_steps,
             "samples": sum(h["samples"] for h in history),
             "tokens": sum(h["tokens"] for h in history),
             "mean_tokens_per_s": sum(h["tokens_per_s"] for h in history) / len(history),
             "resumed_from_step": resumed_from if resumed_from is not None else -1}
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    with tempfile.TemporaryDirectory(prefix="mmkd-final-") as d:
        if rank == 0:
            _save_final_model(engine.module, processor, state_dict, zero3, os.path.join(d, "model"),
                              config["model_spec"])
        meta = {"kind": "final", "step": step, "history": history, "final": final}
        _report_final(d, meta, rank)


def _nonfinite_terms(loss: Any, extra: dict[str, float], agree: bool, device: Any) -> list[str]:
    """Names of the loss terms that are NaN/Inf in this micro-batch (``agree``: on any rank,
    so that all ranks skip the same batch and no collective is left waiting)."""
    import torch

    bad = [k for k, v in extra.items()
           if (k in _LOSS_TERMS or k.startswith("l_")) and not math.isfinite(v)]
    if not bool(torch.isfinite(loss.detach()).all()) and not bad:
        bad = ["loss"]
    if agree:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if bad else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not bad:
            bad = ["loss (on another rank)"]
    return bad


_LOSS_TERMS = ("loss", "ce")  # and every KD term's `l_<name>`


def _check_grad_norm(engine: Any, stage: str, step: int) -> None:
    """A non-finite gradient norm has already reached the weights: the run cannot go on."""
    try:
        norm = engine.get_global_grad_norm()
    except (AttributeError, RuntimeError):
        return
    if norm is None:
        return
    value = float(norm)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"stage {stage!r}: the gradient norm is not finite ({value}) at step {step}; the "
            f"weights are no longer usable, the stage stops and nothing is published. Lower "
            f"`lr` or `max_grad_norm`, or check the data")


def _step_metrics(window: dict, t0: float, scheduler: Any, extra: dict, device: Any) -> dict:
    """Loss averaged over the accumulation window and all ranks; tokens/samples summed."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([window["loss"] / window["micro"], window["tokens"], window["samples"]],
                     dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t[0] /= dist.get_world_size()
    dt = max(time.perf_counter() - t0, 1e-9)
    m = {"loss": float(t[0]), "lr": float(scheduler.get_last_lr()[0]), "tokens": float(t[1]),
         "samples": float(t[2]), "tokens_per_s": float(t[1]) / dt, "samples_per_s": float(t[2]) / dt}
    m.update({k: float(v) for k, v in extra.items()})
    return m


def _save_checkpoint(engine: Any, step: int, history: list, metrics: dict, rank: int,
                     position: dict[str, int]) -> None:
    # Every rank saves its ZeRO shard, its data position and RNG states, and reports; a
    # rank-0-only save/report deadlocks.
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="mmkd-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG)
        save_worker_state(d, rank, position)
        if rank == 0:
            with open(os.path.join(d, CKPT_META), "w") as f:
                json.dump({"kind": "deepspeed", "step": step, "history": history}, f)
        ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(d))


def _save_final_model(module: Any, processor: Any, state_dict: dict | None, zero3: bool,
                      out: str, model_spec: dict[str, Any]) -> None:
    from workloads.models import save_model

    if zero3:  # the engine's own params are partitioned: save through a fresh full-size model
        if hasattr(module, "save_pretrained"):
            # the module's own class: LLaVA-1.5 or any family's (Qwen2-VL, Idefics3, ...)
            full = type(module)(module.config)
        else:  # a merged wrapper: the same structure, loaded again from where the stage began
            from workloads.merging.io import load_merged

            full = load_merged(model_spec["path"])
        full.load_state_dict(state_dict)
        full.generation_config = module.generation_config
        module = full
    save_model(module, processor, out)


def _report_final(d: str, meta: dict, rank: int) -> None:
    import ray.train
    from ray.train import Checkpoint

    ckpt = None
    if rank == 0:
        if not os.path.exists(os.path.join(d, CKPT_META)):
            with open(os.path.join(d, CKPT_META), "w") as f:
                json.dump(meta, f)
        ckpt = Checkpoint.from_directory(d)
    ray.train.report({**meta["final"], "step": meta["step"]}, checkpoint=ckpt)


def _write_pid(pid_dir: str | None, rank: int) -> None:
    if not pid_dir:
        return
    os.makedirs(pid_dir, exist_ok=True)
    with open(os.path.join(pid_dir, f"rank_{rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
    with open(os.path.join(pid_dir, "starts.log"), "a") as f:  # one line per worker (re)start
        f.write(f"{rank} {os.getpid()} {time.time():.3f}\n")
