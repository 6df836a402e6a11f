"""DFT step time and student memory with ``teacher: service`` vs ``online``, same total CPUs.

    python benchmarks/teacher_service.py [--steps 20] [--warmup 3] [--batch-size 8]
                                         [--pairs tiny,wide,balanced] [--out PATH]

On a local Ray instance with 2 CPUs, each mode in fresh actors (processes), one after the other:

* ``online``: one student actor (2 CPUs, 2 torch threads) with the teacher resident in it
  (``DistillLoss(teacher_dir=...)``), as a colocated Ray Train worker runs it;
* ``service``: one student actor (1 CPU, 1 thread) + one teacher replica (1 CPU, 1 thread),
  ``DistillLoss(service=...)`` fed through ``ServiceClient.ahead``: batch i+1's teacher forward
  runs while the student computes step i;
* ``floor``: in a 1-thread actor, the student's CE step (forward + backward + AdamW) and the
  teacher's forward, each alone: a serial KD step costs at least their sum.

Every step uses a new batch of new rows (pixels shifted per row: no dedup, each step needs a
whole-batch teacher forward). Reported: median
step seconds, ``service / floor`` (aim <= 0.75: the overlap hides most of the teacher),
``online / floor``, and each student process's peak RSS (``ru_maxrss``). Pairs: ``tiny``
(tiny-teacher -> tiny-student), ``wide`` (a 4x wider, 2x deeper teacher text model, same
vision geometry) where the teacher forward dominates, and ``balanced`` (the wide teacher and a
bigger student whose step costs about half the teacher's forward, where overlapping the two
can hide a third of the floor). Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the tiny-teacher's vision tower (same image tokens) with a bigger language model
WIDE_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4)
# a student text model whose training step costs about half the wide teacher's forward (117 vs
# 224 ms here): a pair where overlapping the two has something to hide
MID_STUDENT_TEXT = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
PAIRS = {"tiny": (None, None), "wide": (WIDE_TEXT, None),
         "balanced": (WIDE_TEXT, MID_STUDENT_TEXT)}  # name: (teacher text, student text)


def _batches(tok, n, batch_size):
    import numpy as np
    import torch

    from mmkd_test_plugins.train_fixtures import shapes_rows
    from workloads.data.collate import collate

    out = []
    for i in range(n):
        rows = shapes_rows(tok, batch_size, seed=1000 + i)
        cols = {k: [r[k] for r in rows] for k in rows[0]}
        for k in ("input_ids", "labels"):
            arr = np.empty(batch_size, dtype=object)
            arr[:] = [np.asarray(x, dtype=np.int64) for x in cols[k]]
            cols[k] = arr
        batch = collate(cols, tok.pad_token_id)
        # the generator repeats rows; shift each row's pixels so that every row is new to the
        # service (no dedup: each step's teacher forward is a whole batch, as online)
        shift = torch.arange(i * batch_size, (i + 1) * batch_size, dtype=torch.float32) + 1
        batch["pixel_values"] = batch["pixel_values"] + 0.01 * shift[:, None, None, None]
        out.append(batch)
    return out


class Student:
    """A student process: builds the student, runs steps, reports times and peak RSS."""

    def __init__(self, tok_dir: str, threads: int, text: dict | None = None):
        import torch

        torch.set_num_threads(threads)
        self.tok_dir, self.text = tok_dir, text

    def run(self, loss_kw: dict, batches: list, warmup: int, mode: str) -> dict:
        import resource

        import torch

        from orchestrator.plugin import StageContext
        from workloads.distill_loss import DistillLoss
        from workloads.train_loop_parts import CausalLMLoss, StepContext, model_inputs

        model = build_llava("tiny-student", self.tok_dir, self.text, seed=1)[0]
        model.model.vision_tower.requires_grad_(False)  # DFT: projector + LLM
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        stage = StageContext(pipeline="bench", stage="teacher_service", key="k",
                             output_dir=tempfile.gettempdir())
        sctx = StepContext(step=0, total_steps=10**9, rank=0, world_size=1,
                           device=torch.device("cpu"), dtype=torch.float32, stage=stage)
        times: dict[str, list[float]] = {}
        if mode == "floor":  # the student's CE step, and the teacher's forward, each alone
            from workloads.models import load_model

            teacher = load_model(loss_kw["teacher_dir"])[0].eval()
            ce = CausalLMLoss()
            for i, b in enumerate(batches):
                t0 = time.perf_counter()
                loss, _ = ce(model, b, sctx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                with torch.no_grad():
                    teacher(**model_inputs(b))
                t2 = time.perf_counter()
                if i >= warmup:
                    times.setdefault("student_step", []).append(t1 - t0)
                    times.setdefault("teacher_forward", []).append(t2 - t1)
        else:
            loss_fn = DistillLoss(**loss_kw)
            loss_fn.setup(model, sctx)
            t0 = time.perf_counter()
            for i, b in enumerate(loss_fn.wrap_batches(iter(batches), sctx)):
                loss, _ = loss_fn(model, b, sctx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                if i >= warmup:
                    times.setdefault("kd_step", []).append(t1 - t0)
                t0 = t1
        return {"median_s": {k: statistics.median(v) for k, v in times.items()},
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def build_teacher(tok_dir: str, text: dict | None) -> tuple:
    """The tiny-teacher (seed 0), or with ``text``: a bigger language model behind the same
    vision tower (same image tokens). Returns (model, processor)."""
    return build_llava("tiny-teacher", tok_dir, text, seed=0)


def build_llava(preset: str, tok_dir: str, text: dict | None, seed: int) -> tuple:
    """A tiny preset, its text model replaced by ``text``'s sizes when given."""
    import copy

    import torch
    from transformers import LlavaForConditionalGeneration

    from workloads.models import build_model

    torch.manual_seed(seed)
    teacher, proc = build_model({"preset": preset}, tok_dir)
    if text is not None:
        config = copy.deepcopy(teacher.config)
        for k, v in text.items():
            setattr(config.text_config, k, v)
        config.text_config.head_dim = text["hidden_size"] // text["num_attention_heads"]
        config.text_config.layer_types = ["full_attention"] * text["num_hidden_layers"]
        teacher = LlavaForConditionalGeneration(config)
    return teacher, proc


def bench_pair(name: str, args) -> dict:
    import ray

    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer
    from workloads.models import count_params, save_model
    from workloads.teacher.service import ServiceUse, ServiceSpec

    tmp = tempfile.mkdtemp(prefix=f"ts-bench-{name}-")
    tok_dir = build_tiny_tokenizer(os.path.join(tmp, "tok"))
    text, student_text = PAIRS[name]
    teacher, proc = build_teacher(tok_dir, text)
    teacher_dir = save_model(teacher, proc, os.path.join(tmp, "teacher"))
    n_params = count_params(teacher)["total"]
    tok = proc.tokenizer
    batches = _batches(tok, args.warmup + args.steps, args.batch_size)
    common = dict(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"))
    actor = ray.remote(Student)
    out = {"teacher_params": n_params}

    s = actor.options(num_cpus=1).remote(tok_dir, 1, student_text)
    out["floor"] = ray.get(s.run.remote({"teacher_dir": teacher_dir}, batches, args.warmup,
                                        "floor"))
    ray.kill(s)
    s = actor.options(num_cpus=2).remote(tok_dir, 2, student_text)
    out["online"] = ray.get(s.run.remote({"teacher_dir": teacher_dir, **common}, batches,
                                         args.warmup, "online"))
    ray.kill(s)
    spec = ServiceSpec(teacher_dir=teacher_dir, cpus=1, cache_mb=0)
    with ServiceUse(spec, stage=f"bench-{name}") as lease:
        s = actor.options(num_cpus=1).remote(tok_dir, 1, student_text)
        kw = {"service": {"name": lease.name, "user": lease.user}, **common}
        out["service"] = ray.get(s.run.remote(kw, batches, args.warmup, "service"))
        ray.kill(s)
    out["service_metrics"] = lease.final_metrics
    f = out["floor"]["median_s"]
    floor = f["student_step"] + f["teacher_forward"]
    out["ratios"] = {"service_over_floor": out["service"]["median_s"]["kd_step"] / floor,
                     "online_2threads_over_floor": out["online"]["median_s"]["kd_step"] / floor,
                     "teacher_forward_share_of_floor": f["teacher_forward"] / floor}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pairs", default="tiny,wide,balanced")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions of every pair")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "teacher_service.json"))
    args = ap.parse_args()

    import ray

    from benchmarks._env import environment
    from orchestrator.ray_setup import start_local_ray

    temp_dir = tempfile.mkdtemp(prefix="mmkdray-", dir="/tmp")
    start_local_ray(num_cpus=2, _temp_dir=temp_dir, log_to_driver=False, configure_logging=False)
    load0 = os.getloadavg()
    names = args.pairs.split(",")
    runs: dict[str, list[dict]] = {p: [] for p in names}
    try:
        for rep in range(args.repeats):  # interleaved: every pair once per repetition
            for p in names:
                runs[p].append(bench_pair(p, args))
                print(rep, p, json.dumps(runs[p][-1]["ratios"]), flush=True)
    finally:
        ray.shutdown()
    pairs = {p: _summary(r) for p, r in runs.items()}
    result = {
        "what": "per repetition, median seconds per DFT step (a new batch each step): teacher service (student "
                "1 CPU + replica 1 CPU, request sent a step ahead) vs online (one 2-thread "
                "process); floor = student CE step + teacher forward, 1 thread each, serial",
        "aim": {"service_over_floor": 0.75}, "args": vars(args), "pairs": pairs,
        "loadavg": {"start": load0, "end": os.getloadavg()}, "environment": environment(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({p: r["summary"] for p, r in pairs.items()}, indent=2))


def _summary(reps: list[dict]) -> dict:
    """Median and range over repetitions of each ratio and step time (and the raw runs)."""
    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    times = {"student_step": [r["floor"]["median_s"]["student_step"] for r in reps],
             "teacher_forward": [r["floor"]["median_s"]["teacher_forward"] for r in reps],
             "online_kd_step": [r["online"]["median_s"]["kd_step"] for r in reps],
             "service_kd_step": [r["service"]["median_s"]["kd_step"] for r in reps]}
    summary = {"repeats": len(reps), "teacher_params": reps[0]["teacher_params"],
               "ratios": {k: spread([r["ratios"][k] for r in reps]) for k in reps[0]["ratios"]},
               "seconds": {k: spread(v) for k, v in times.items()},
               "peak_rss_mb": {m: spread([r[m]["peak_rss_mb"] for r in reps])
                               for m in ("floor", "online", "service")},
               "teacher_loads": [r["service_metrics"]["loads"] for r in reps]}
    return {"summary": summary, "runs": reps}


if __name__ == "__main__":
    main()
