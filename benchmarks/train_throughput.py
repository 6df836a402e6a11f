"""Tokens/s of the mmkd training loop (1 Ray Train worker, DeepSpeed ZeRO-0) next to a plain
single-process PyTorch loop on the same model, batches and thread count — several repetitions,
interleaved (plain, mmkd, mmkd, plain, ...), with the load and CPU time of each, and where each
loop's step time goes.

    python benchmarks/train_throughput.py [--reps 3] [--steps 40] [--preset tiny-teacher]

Both loops time each optimizer step including fetching its batch; the first ``--warmup`` steps
are dropped, and throughput is tokens / seconds summed over the rest (a cost paid once per
window or epoch, such as Ray Data fetching the next block, counts in full). The mmkd loop is
the real one (``workloads.train_loop.run_training``); its loss is ``CausalLMLoss`` plus timers
(``TimedLoss``): at ``setup`` it wraps the worker's dataset shard iterators, ``collate`` and the
DeepSpeed engine's ``backward``/``step``, so each step (from one ``engine.step`` return to the
next) splits into

    fetch     inside the Ray Data shard iterator's ``next()`` (blocked on, or formatting, data)
    collate   padding rows into tensors, when it runs on the training thread
    forward   the loss function (model forward + loss)
    backward  ``engine.backward``
    step      ``engine.step`` (clip, AdamW, LR schedule)
    other     the rest of the loop body (``.to(device)``, NaN checks, grad-norm check, metrics)

with wall and process-CPU seconds of each (process CPU counts torch's intra-op threads). The
plain loop splits into collate, forward, backward, step. Each loop also records the CPU seconds
of the whole local Ray instance (this process and all its descendants) and of the machine, and
the Ray Train worker its CPU seconds per thread. ``--py-spy`` also samples the worker with
py-spy (if installed). Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _env import TreeCPU, environment  # noqa: E402

RESULTS = os.path.join(HERE, "results", "train_throughput.json")
WHAT = ("tokens/s of the mmkd loop (1 Ray Train worker, DeepSpeed ZeRO-0, Ray Data iterator) vs "
        "a plain PyTorch loop on the same batches, one entry per configuration; per "
        "repetition, tokens / seconds summed over the measured steps; overhead = 1 - mmkd/plain; "
        "cpu_overhead = mmkd/plain process-CPU seconds per step - 1")
PHASES_MMKD = ("fetch", "collate", "forward", "backward", "step", "other")
PHASES_PLAIN = ("collate", "forward", "backward", "step")


# ----------------------------------------------------------------------------- plain loop


def plain_loop(rows, tok_dir, args, pad_id) -> list[dict]:
    """Per-step records of a bare PyTorch loop: same model, optimizer, schedule, batches."""
    import numpy as np
    import torch

    from workloads.data.collate import collate
    from workloads.models import build_model, set_trainable
    from workloads.train_loop_parts import TrainParams, build_optimizer, model_inputs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = build_model({"preset": args.preset}, tok_dir)
    set_trainable(model, ["projector", "llm"])
    params = TrainParams(lr=1e-3, batch_size=args.batch_size, max_steps=args.steps)
    opt, sched = build_optimizer(model, params, args.steps)
    model.train()
    steps, i = [], 0
    for _ in range(args.steps):
        clock = _Clock()
        chunk = rows[i: i + args.batch_size]
        i = (i + args.batch_size) % (len(rows) - args.batch_size)
        batch = collate({"input_ids": _objects([r["input_ids"] for r in chunk]),
                         "labels": _objects([r["labels"] for r in chunk]),
                         "pixel_values": np.stack([r["pixel_values"] for r in chunk]),
                         "has_image": np.array([r["has_image"] for r in chunk])}, pad_id)
        clock.lap("collate")
        out = model(**model_inputs(batch), labels=batch["labels"])
        clock.lap("forward")
        out.loss.backward()
        clock.lap("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.lap("step")
        steps.append({"tokens": int(batch["attention_mask"].sum()), **clock.record()})
    return steps


def _objects(arrays: list) -> Any:
    import numpy as np

    out = np.empty(len(arrays), dtype=object)
    out[:] = [np.asarray(a) for a in arrays]
    return out


class _Clock:
    """Wall and process-CPU seconds of consecutive phases of one step."""

    def __init__(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.c0 = self.c = time.process_time()
        self.phases: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.phases[name] = self.phases.get(name, 0.0) + t - self.t
        self.cpu[name] = self.cpu.get(name, 0.0) + c - self.c
        self.t, self.c = t, c

    def record(self) -> dict:
        return {"wall_s": self.t - self.t0, "cpu_s": self.c - self.c0, "phases": self.phases,
                "phases_cpu": self.cpu, "end": self.t}


# ----------------------------------------------------------------------------- mmkd loop


class TimedLoss:
    """``CausalLMLoss`` that also times the loop around it, from inside the Ray Train worker.

    ``setup`` (called once per worker, before the loop asks for its dataset shard) wraps
    ``ray.train.get_dataset_shard`` so that the shard's iterators are timed, ``collate``, and
    the engine's ``backward`` / ``step``; a step runs from one ``engine.step`` return to the
    next. After the last step the records go to ``out_path``."""

    def __init__(self, out_path: str, skip_allreduce: bool = False) -> None:
        self.out_path = out_path
        self.skip_allreduce = skip_allreduce

    def setup(self, engine: Any, sctx: Any) -> None:
        import threading

        import ray.train

        import workloads.data.collate as collate_module

        self.total = sctx.total_steps
        self.tid = threading.get_ident()
        self.steps: list[dict] = []
        self.background = {"collate_s": 0.0, "collate_calls": 0}
        self.cur: dict[str, dict[str, float]] = {"phases": {}, "phases_cpu": {}}
        self.mark = (time.perf_counter(), time.process_time())
        self.threads_start = _thread_cpu()
        get_shard = ray.train.get_dataset_shard
        loss = self

        class TimedShard:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

            def iter_batches(self, **kw: Any) -> Any:
                return loss._timed_iter(self._inner.iter_batches(**kw))

            def iter_torch_batches(self, **kw: Any) -> Any:
                return loss._timed_iter(self._inner.iter_torch_batches(**kw))

        ray.train.get_dataset_shard = lambda name=None: TimedShard(get_shard(name))
        collate_module.collate = self._timed(collate_module.collate, "collate")
        for name in ("backward", "step"):
            setattr(engine, name, self._timed(getattr(engine, name), name))
        if self.skip_allreduce and sctx.world_size == 1:
            # the proposed fix: one worker has nothing to all-reduce (DeepSpeed would flatten,
            # all-reduce over gloo and copy back every gradient each step)
            engine.enable_backward_allreduce = False

    def _add(self, name: str, wall: float, cpu: float) -> None:
        ph, pc = self.cur["phases"], self.cur["phases_cpu"]
        ph[name] = ph.get(name, 0.0) + wall
        pc[name] = pc.get(name, 0.0) + cpu

    def _timed_iter(self, iterable: Any) -> Any:
        it = iter(iterable)
        while True:
            t, c = time.perf_counter(), time.process_time()
            try:
                item = next(it)
            except StopIteration:
                self._add("fetch", time.perf_counter() - t, time.process_time() - c)
                return
            self._add("fetch", time.perf_counter() - t, time.process_time() - c)
            yield item

    def _timed(self, fn: Any, name: str) -> Any:
        import threading

        def wrapper(*a: Any, **kw: Any) -> Any:
            if threading.get_ident() != self.tid:  # e.g. Ray Data's prefetch thread collating
                t = time.perf_counter()
                out = fn(*a, **kw)
                self.background[f"{name}_s"] += time.perf_counter() - t
                self.background[f"{name}_calls"] += 1
                return out
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a, **kw)
            self._add(name, time.perf_counter() - t, time.process_time() - c)
            if name == "step":
                self._end_step()
            return out
        return wrapper

    def _end_step(self) -> None:
        t, c = time.perf_counter(), time.process_time()
        ph, pc = self.cur["phases"], self.cur["phases_cpu"]
        wall, cpu = t - self.mark[0], c - self.mark[1]
        ph["other"] = wall - sum(ph.values())
        pc["other"] = cpu - sum(pc.values())
        self.steps.append({"tokens": self._tokens, "wall_s": wall, "cpu_s": cpu, "phases": ph,
                           "phases_cpu": pc, "end": t})
        self.cur = {"phases": {}, "phases_cpu": {}}
        self.mark = (t, c)
        if len(self.steps) == self.total:
            with open(self.out_path, "w") as f:
                import torch

                json.dump({"steps": self.steps, "background": self.background,
                           "torch_threads": torch.get_num_threads(),
                           "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY",
                                                                  "OMP_NUM_THREADS")},
                           "step_end_times": [s["end"] for s in self.steps],
                           "threads": _thread_cpu_delta(self.threads_start, _thread_cpu()),
                           "pid": os.getpid()}, f)

    def __call__(self, engine: Any, batch: dict, sctx: Any):
        from workloads.train_loop_parts import model_inputs

        t, c = time.perf_counter(), time.process_time()
        out = engine(**model_inputs(batch), labels=batch["labels"])
        self._add("forward", time.perf_counter() - t, time.process_time() - c)
        self._tokens = int(batch["attention_mask"].sum())
        return out.loss, {"ce": float(out.loss.detach())}


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of this process, with the thread's name."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        except OSError:
            continue
    return out


def _thread_cpu_delta(start: dict, end: dict) -> dict[str, float]:
    """CPU seconds per thread name between two ``_thread_cpu`` snapshots (same names summed)."""
    by_name: Counter = Counter()
    for tid, (name, cpu) in end.items():
        by_name[name] += cpu - (start[tid][1] if tid in start else 0.0)
    return {k: round(v, 3) for k, v in by_name.most_common()}


def mmkd_loop(rows, tok_dir, args, pad_id, work: str, rep: int, py_spy: bool) -> dict:
    import ray

    from orchestrator.plugin import Resources, StageContext
    from workloads.train_loop import run_training
    from workloads.train_loop_parts import TrainParams

    name = f"throughput-{rep}"
    timings = f"{work}/timings-{rep}.json"
    ctx = StageContext(pipeline="bench", stage="throughput", key="bench",
                       output_dir=f"{work}/out{rep}",
                       resources=Resources(num_workers=1, cpus_per_worker=args.threads),
                       deepspeed={"zero_stage": args.zero_stage, "precision": "fp32"},
                       checkpoint_storage=f"{work}/ckpt", run_name=name)
    spy = _PySpy(f"{work}/ckpt/{name}/worker_pids/rank_0.json", f"{work}/spy-{rep}.txt") \
        if py_spy else None
    run_training(ctx, model_spec={"preset": args.preset}, tokenizer_dir=tok_dir,
                 dataset=ray.data.from_items(rows),
                 loss_fn=TimedLoss(timings, skip_allreduce=args.skip_allreduce),
                 params=TrainParams(train=["projector", "llm"], lr=1e-3, batch_size=args.batch_size,
                                    max_steps=args.steps, checkpoint_every=0, pad_token_id=pad_id))
    out = json.load(open(timings))
    for step, event in zip(out["steps"], ctx.local_metrics):
        # the loop's own tokens/s (its window starts after the previous step's bookkeeping)
        step["tokens_per_s_reported"] = event["metrics"]["tokens_per_s"]
    if spy is not None:
        out["py_spy"] = spy.finish()
    return out


class _PySpy:
    """``py-spy record`` of the Ray Train worker once it has written its pid file."""

    def __init__(self, pid_file: str, out: str) -> None:
        self.out, self.proc = out, None
        self.thread = threading.Thread(target=self._start, args=(pid_file,), daemon=True)
        self.thread.start()

    def _start(self, pid_file: str) -> None:
        for _ in range(600):
            if os.path.exists(pid_file):
                break
            time.sleep(0.1)
        else:
            return
        time.sleep(0.5)
        pid = json.load(open(pid_file))["pid"]
        exe = shutil.which("py-spy")
        if exe:
            self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200",
                                          "--format", "raw", "--threads",
                                          "--nonblocking", "--output", self.out],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self) -> dict | None:
        self.thread.join(timeout=5)
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=30)  # it stops by itself when the worker exits
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        return summarize_py_spy(self.out) if os.path.exists(self.out) else None


def summarize_py_spy(path: str, top: int = 12) -> dict:
    """Sample shares of a py-spy raw (collapsed) profile: per thread, and for the training
    thread's loop (``train_loop_per_worker`` after setup) by phase, by innermost function and
    by innermost DeepSpeed function."""
    per_thread: Counter = Counter()
    loop: Counter = Counter()
    leaf: Counter = Counter()
    ds: Counter = Counter()
    total = 0
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        per_thread[frames[0].split(": ", 1)[-1]] += n
        if "train_loop_per_worker" not in stack:
            continue
        phase = _loop_phase(frames)
        if phase == "setup":
            continue
        loop[phase] += n
        leaf[frames[-1]] += n
        inner_ds = [f for f in frames if "deepspeed/" in f]
        if inner_ds:
            ds[inner_ds[-1]] += n
    in_loop = sum(loop.values()) or 1
    share = lambda c: {k: round(v / in_loop, 3) for k, v in c.most_common(top)}  # noqa: E731
    return {"samples": total,
            "per_thread_share": {k: round(v / total, 3) for k, v in per_thread.most_common(top)},
            "loop_samples": sum(loop.values()),
            "loop_share_by_phase": share(loop),
            "loop_top_functions": share(leaf),
            "loop_top_deepspeed_functions": share(ds)}


def _loop_phase(frames: list[str]) -> str:
    text = ";".join(frames)
    for marker, phase in (("_timed_iter", "fetch (Ray Data iterator)"), ("collate", "collate"),
                          ("TimedLoss.__call__", "forward"), ("backward", "backward"),
                          ("_check_grad_norm", "other (grad-norm check)"),
                          ("_step_metrics", "other (metrics)"), ("_nonfinite", "other (NaN check)"),
                          ("step", "step"), ("build_model", "setup"),
                          ("initialize", "setup")):
        if marker in text:
            return phase
    return "other"


# ----------------------------------------------------------------------------- summary


def loop_summary(steps: list[dict], warmup: int, phases: tuple[str, ...], wall: float,
                 tree: TreeCPU) -> dict:
    """Sums over the measured steps (after ``warmup``), as per-step means, and the CPU seconds
    every process of the Ray instance (and the machine) spent during those steps."""
    t0, t1 = steps[warmup - 1]["end"] if warmup else None, steps[-1]["end"]
    steps = steps[warmup:]
    n = len(steps)
    mean = lambda key: sum(s[key] for s in steps) / n  # noqa: E731
    out = {"steps": n,
           "tokens_per_s": sum(s["tokens"] for s in steps) / sum(s["wall_s"] for s in steps),
           "tokens_per_s_median_step": statistics.median(s["tokens"] / s["wall_s"] for s in steps),
           "step_wall_s": mean("wall_s"), "step_cpu_s": mean("cpu_s"),
           "phase_wall_s": {p: sum(s["phases"].get(p, 0.0) for s in steps) / n for p in phases},
           "phase_cpu_s": {p: sum(s["phases_cpu"].get(p, 0.0) for s in steps) / n for p in phases},
           "max_step_wall_s": max(s["wall_s"] for s in steps),
           # steps that waited for data (Ray Data: a new window, or the dataset re-executing
           # at an epoch's start): [measured step index, fetch wall ms, fetch CPU ms]
           "fetch_stalls": [[i, round(1e3 * s["phases"]["fetch"], 1),
                             round(1e3 * s["phases_cpu"]["fetch"], 1)]
                            for i, s in enumerate(steps) if s["phases"].get("fetch", 0) > 0.005],
           "loop_wall_s": round(wall, 2), "measured_steps_cpu": tree.window(t0, t1)}
    if "tokens_per_s_reported" in steps[0]:
        out["tokens_per_s_reported_median"] = statistics.median(
            s["tokens_per_s_reported"] for s in steps)
    return out


def run_key(args: argparse.Namespace) -> str:
    """``omp=PASSIVE``, ``omp=default,zero=2``, ``omp=PASSIVE,allreduce=off,threads=1``, ..."""
    parts = [f"omp={args.omp_wait_policy}"]
    if args.zero_stage:
        parts.append(f"zero={args.zero_stage}")
    if args.skip_allreduce:
        parts.append("allreduce=off")
    if args.rows != 512:
        parts.append(f"rows={args.rows}")
    if args.threads != 2:
        parts.append(f"threads={args.threads}")
    return ",".join(parts)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-teacher")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of both loops, interleaved")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=512,
                    help="rows in the data set (512 at batch 8: the measured steps lie in one "
                         "epoch; fewer rows put an epoch restart inside them)")
    ap.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    ap.add_argument("--skip-allreduce", action="store_true",
                    help="mmkd loop with DeepSpeed's gradient all-reduce off (1 worker): the "
                         "proposed fix, measured")
    ap.add_argument("--omp-wait-policy", choices=("default", "PASSIVE", "ACTIVE"),
                    default="default", help="OMP_WAIT_POLICY for both loops (the driver and, "
                    "through the Ray instance it starts, the worker); default: leave it unset")
    ap.add_argument("--py-spy", action="store_true",
                    help="after the repetitions, one more mmkd run sampled with py-spy "
                         "(reported under `profile`, not in the spread)")
    ap.add_argument("--profile-steps", type=int, default=120, help="steps of the py-spy run")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.omp_wait_policy != "default":  # before torch (and its OpenMP runtime) loads
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    import ray
    from transformers import AutoTokenizer

    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer, shapes_rows

    env_start = environment()
    work = tempfile.mkdtemp(prefix="mmkd-bench-")
    tok_dir = build_tiny_tokenizer(f"{work}/tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = shapes_rows(tok, args.rows, seed=0)
    reps, profile = [], None
    try:
        ray.init(num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False,
                 _temp_dir=tempfile.mkdtemp(prefix="mmkdbr-", dir="/tmp"), configure_logging=False,
                 log_to_driver=False)
        try:
            for rep in range(args.reps):
                # alternate the order so that a drift in the machine's load hits both loops
                order = ("plain", "mmkd") if rep % 2 == 0 else ("mmkd", "plain")
                rec: dict[str, Any] = {"order": list(order)}
                for which in order:
                    load = os.getloadavg()[0]
                    cpu = TreeCPU()
                    t = time.perf_counter()
                    if which == "plain":
                        steps = plain_loop(rows, tok_dir, args, tok.pad_token_id)
                        extra = {}
                    else:
                        out = mmkd_loop(rows, tok_dir, args, tok.pad_token_id, work, rep, False)
                        steps = out["steps"]
                        extra = {"worker_torch_threads": out["torch_threads"],
                                 "worker_env": out["env"],
                                 "worker_thread_cpu_s": out["threads"],
                                 "collate_off_training_thread": out["background"]}
                    wall = time.perf_counter() - t
                    cpu.finish()
                    phases = PHASES_PLAIN if which == "plain" else PHASES_MMKD
                    rec[which] = {"load_1m_before": round(load, 2),
                                  **loop_summary(steps, args.warmup, phases, wall, cpu),
                                  **extra}
                rec["overhead"] = 1 - rec["mmkd"]["tokens_per_s"] / rec["plain"]["tokens_per_s"]
                rec["cpu_overhead"] = rec["mmkd"]["step_cpu_s"] / rec["plain"]["step_cpu_s"] - 1
                reps.append(rec)
                print(f"rep {rep}: plain {rec['plain']['tokens_per_s']:.0f} tok/s | mmkd "
                      f"{rec['mmkd']['tokens_per_s']:.0f} tok/s | overhead "
                      f"{100 * rec['overhead']:+.1f}% (CPU/step {100 * rec['cpu_overhead']:+.1f}%)"
                      f" | load {rec['plain']['load_1m_before']}", flush=True)
            if args.py_spy:
                load = os.getloadavg()[0]
                long_run = argparse.Namespace(**{**vars(args), "steps": args.profile_steps})
                profile = mmkd_loop(rows, tok_dir, long_run, tok.pad_token_id, work, args.reps,
                                    True)
                profile = {"steps": args.profile_steps, "load_1m_before": round(load, 2),
                           "py_spy": profile.get("py_spy")}
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": env_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "overhead": spread([r["overhead"] for r in reps]),
        "cpu_overhead": spread([r["cpu_overhead"] for r in reps]),
        "plain_tokens_per_s": spread([r["plain"]["tokens_per_s"] for r in reps]),
        "mmkd_tokens_per_s": spread([r["mmkd"]["tokens_per_s"] for r in reps]),
        "repetitions": reps,
        "profile": profile,
    }
    # one file, one entry per configuration (run_key): a run replaces only its own entry
    result = {"benchmark": "train_throughput", "what": WHAT, "runs": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if isinstance(old.get("runs"), dict):
            result["runs"] = old["runs"]
    result["runs"][run_key(args)] = run
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    o = run["overhead"]
    print(f"overhead median {100 * o['median']:+.1f}% (min {100 * o['min']:+.1f}%, max "
          f"{100 * o['max']:+.1f}%) over {len(reps)} repetitions -> {args.out}")


if __name__ == "__main__":
    main()
