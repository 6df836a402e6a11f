"""Cost of a LLaVA-KD distillation step against its floor.

    python benchmarks/kd_step.py [--steps 30] [--warmup 5] [--batch-size 8] [--threads 1]

In one process (no Ray, no DeepSpeed), on tiny-teacher / tiny-student and one fixed batch, time:

* ``sft``: student forward + backward + AdamW step (``CausalLMLoss``);
* ``teacher_fwd``: teacher forward under ``no_grad``;
* ``dft_online``: the ``distill`` loss (``DistillLoss``, online teacher, alpha=beta=1,
  gamma=0.5) forward + backward + step;
* ``dft_offline``: the same with stored top-k (k=64) teacher logits.

Ratios: ``dft_online / (sft + teacher_fwd)`` (the floor: a KD step cannot be cheaper than a
student step plus a teacher forward; target <= 1.15) and ``dft_offline / sft``. The four are
measured round-robin each iteration so machine-load drift hits them alike; medians of wall time
(``perf_counter``) and of CPU time (``process_time``) are both reported — the machine is shared,
CPU time is the less noisy one. Writes benchmarks/results/kd_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kd_step.json")


def _batch(tok, n):
    import numpy as np

    from workloads.data.collate import collate
    from mmkd_test_plugins.train_fixtures import shapes_rows

    rows = shapes_rows(tok, n, seed=0)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    for k in ("input_ids", "labels"):
        arr = np.empty(n, dtype=object)
        arr[:] = [np.asarray(x, dtype=np.int64) for x in cols[k]]
        cols[k] = arr
    return collate(cols, tok.pad_token_id)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()

    import torch

    from orchestrator.plugin import StageContext
    from workloads.distill_loss import DistillLoss
    from workloads.teacher.offline import INDEX, MANIFEST, ShardWriter
    from workloads.teacher.payload import row_digests, teacher_entries
    from workloads.models import build_model, save_model
    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer
    from workloads.train_loop_parts import CausalLMLoss, StepContext, model_inputs

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="kd-step-")
    tok_dir = build_tiny_tokenizer(os.path.join(tmp, "tok"))
    torch.manual_seed(0)
    teacher, proc = build_model({"preset": "tiny-teacher"}, tok_dir)
    teacher_dir = save_model(teacher, proc, os.path.join(tmp, "teacher"))
    tok = proc.tokenizer
    batch = _batch(tok, args.batch_size)
    image_id = tok.convert_tokens_to_ids("<image>")

    # Offline teacher logits for this batch, written the way `teacher_logits` writes them.
    logits_dir = os.path.join(tmp, "logits")
    with torch.no_grad():
        t_logits = teacher.eval()(**model_inputs(batch)).logits
    writer = ShardWriter(logits_dir, shard_size=1024)
    for d, e in zip(row_digests(batch), teacher_entries(t_logits, batch, len(tok), image_id,
                                                         args.top_k)):
        writer.add(d, d, e)
    writer.flush()
    json.dump({"rows": writer.index, "keys": writer.keys}, open(os.path.join(logits_dir, INDEX), "w"))
    json.dump({"top_k": min(args.top_k, len(tok))}, open(os.path.join(logits_dir, MANIFEST), "w"))

    def student():
        torch.manual_seed(1)
        m = build_model({"preset": "tiny-student"}, tok_dir)[0]
        m.requires_grad_(True)
        m.model.vision_tower.requires_grad_(False)  # DFT: projector + LLM
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

    common = dict(vocab_size=len(tok), image_token_id=image_id)
    stage = StageContext(pipeline="bench", stage="kd_step", key="k", output_dir=tmp)
    losses = {"sft": CausalLMLoss(), "dft_online": DistillLoss(teacher_dir=teacher_dir, **common),
              "dft_offline": DistillLoss(offline_dir=logits_dir, **common)}
    runners = {}
    for name, loss_fn in losses.items():
        model, opt = student()
        sctx = StepContext(step=0, total_steps=10**9, rank=0, world_size=1,
                           device=torch.device("cpu"), dtype=torch.float32, stage=stage)
        loss_fn.setup(model, sctx)

        def step(model=model, opt=opt, loss_fn=loss_fn, sctx=sctx):
            loss, _ = loss_fn(model, batch, sctx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runners[name] = step

    def teacher_fwd():
        with torch.no_grad():
            teacher(**model_inputs(batch))
    runners["teacher_fwd"] = teacher_fwd

    wall = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for i in range(args.warmup + args.steps):
        for name, fn in runners.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)

    def med(d):
        return {k: statistics.median(v) for k, v in d.items()}

    mw, mc = med(wall), med(cpu)
    ratios = {}
    for label, m in (("wall", mw), ("cpu", mc)):
        ratios[f"dft_online_over_floor_{label}"] = m["dft_online"] / (m["sft"] + m["teacher_fwd"])
        ratios[f"dft_offline_over_sft_{label}"] = m["dft_offline"] / m["sft"]
    result = {
        "what": "median seconds per step, in one process, tiny-teacher -> tiny-student, one fixed "
                "batch; floor = sft step + teacher forward",
        "args": vars(args), "median_wall_s": mw, "median_cpu_s": mc, "ratios": ratios,
        "target": {"dft_online_over_floor": 1.15},
        "note": "shared, loaded machine: wall times include other people's load; process_time "
                "(CPU time of this process) is the steadier measure",
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads,
                    "loadavg": os.getloadavg()},
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({"median_wall_s": mw, "median_cpu_s": mc, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
