"""Tokens/s of the mmkd training loop (1 Ray Train worker, DeepSpeed ZeRO-0) next to a plain
single-process PyTorch loop on the same model, batches and thread count.

    python benchmarks/train_throughput.py [--steps 40] [--preset tiny-teacher] [--batch-size 8]

Both loops time each optimizer step including fetching its batch; the first ``--warmup`` steps
are dropped. Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_throughput.json")


def plain_loop(rows, tok_dir, args, pad_id) -> list[float]:
    """Tokens/s per step of a bare PyTorch loop: same model, optimizer, schedule, batches."""
    import numpy as np
    import torch

    from workloads.data.collate import collate
    from workloads.models import build_model, set_trainable
    from workloads.train_setup import TrainParams, build_optimizer, model_inputs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = build_model({"preset": args.preset}, tok_dir)
    set_trainable(model, ["projector", "llm"])
    params = TrainParams(lr=1e-3, batch_size=args.batch_size, max_steps=args.steps)
    opt, sched = build_optimizer(model, params, args.steps)
    model.train()
    rates, i = [], 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        chunk = rows[i: i + args.batch_size]
        i = (i + args.batch_size) % (len(rows) - args.batch_size)
        batch = collate({"input_ids": np.array([np.asarray(r["input_ids"]) for r in chunk] + [None],
                                               dtype=object)[:-1],
                         "labels": np.array([np.asarray(r["labels"]) for r in chunk] + [None],
                                            dtype=object)[:-1],
                         "pixel_values": np.stack([r["pixel_values"] for r in chunk]),
                         "has_image": np.array([r["has_image"] for r in chunk])}, pad_id)
        out = model(**model_inputs(batch), labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rates.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - t0))
    return rates


def mmkd_loop(rows, tok_dir, args, pad_id, work) -> list[float]:
    import ray

    from orchestrator.plugin import Resources, StageContext
    from workloads.train import run_training
    from workloads.train_setup import TrainParams

    ctx = StageContext(pipeline="bench", stage="throughput", key="bench", output_dir=f"{work}/out",
                       resources=Resources(num_workers=1, cpus_per_worker=args.threads),
                       deepspeed={"zero_stage": 0, "precision": "fp32"},
                       checkpoint_storage=f"{work}/ckpt", run_name="throughput")
    run_training(ctx, model_spec={"preset": args.preset}, tokenizer_dir=tok_dir,
                 dataset=ray.data.from_items(rows),
                 params=TrainParams(train=["projector", "llm"], lr=1e-3, batch_size=args.batch_size,
                                    max_steps=args.steps, checkpoint_every=0, pad_token_id=pad_id))
    return [e["metrics"]["tokens_per_s"] for e in ctx.local_metrics]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-teacher")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()

    import deepspeed
    import ray
    import torch
    import transformers
    from transformers import AutoTokenizer

    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer, shapes_rows

    work = tempfile.mkdtemp(prefix="mmkd-bench-")
    tok_dir = build_tiny_tokenizer(f"{work}/tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = shapes_rows(tok, 256, seed=0)
    try:
        load_before = os.getloadavg()
        plain = plain_loop(rows, tok_dir, args, tok.pad_token_id)[args.warmup:]
        ray.init(num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False,
                 _temp_dir=tempfile.mkdtemp(prefix="mmkdbr-", dir="/tmp"), configure_logging=False,
                 log_to_driver=False)
        try:
            mmkd = mmkd_loop(rows, tok_dir, args, tok.pad_token_id, work)[args.warmup:]
        finally:
            ray.shutdown()
        # Plain again, after: on a shared machine the load moves; take the better of the two.
        plain_after = plain_loop(rows, tok_dir, args, tok.pad_token_id)[args.warmup:]
        if statistics.median(plain_after) > statistics.median(plain):
            plain = plain_after
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "train_throughput",
        "config": vars(args) | {"out": None},
        "plain_torch_tokens_per_s": statistics.median(plain),
        "mmkd_tokens_per_s": statistics.median(mmkd),
        "overhead": 1 - statistics.median(mmkd) / statistics.median(plain),
        "ratio_mmkd_over_plain": statistics.median(mmkd) / statistics.median(plain),
        "steps_measured": {"plain": len(plain), "mmkd": len(mmkd)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "torch": torch.__version__, "ray": ray.__version__,
                    "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"plain torch {result['plain_torch_tokens_per_s']:.0f} tok/s | mmkd (Ray Train + "
          f"DeepSpeed ZeRO-0) {result['mmkd_tokens_per_s']:.0f} tok/s | overhead "
          f"{100 * result['overhead']:.1f}%")


if __name__ == "__main__":
    main()
