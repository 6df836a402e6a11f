"""A 4-trial `mmkd tune` of DFT with one shared teacher service vs a teacher in every trial.

    python benchmarks/teacher_service_tune.py [--trials 4] [--steps 10] [--repeats 2]
                                              [--pairs wide,large] [--out PATH]

The same tune (``run_tune``: a grid of ``--trials`` learning rates, every trial a 1-worker DFT
stage of ``--steps`` steps on the same rows), run twice per repetition in a fresh MMKD_HOME
each time (nothing cached), modes interleaved:

* ``online``: every trial's Ray Train worker loads its own teacher (``teacher: online``);
* ``service``: one teacher service (1 replica, 1 CPU) serves all trials
  (``teacher: service``); the trials send the same rows, so the service forwards each row once
  and answers the other trials from its cache (``dedup_hits``).

Each tune in a fresh local Ray instance with ``--cpus`` logical CPUs (default 9: 4 trials x
(worker + data pipeline) + the replica, so both modes run all trials at once; on a 2-core
machine they then share the cores). Measured, from PSS (shared pages split between the processes that
map them) sampled every 0.5 s: the memory of the processes that hold a model (each trial's Ray
Train worker, the service's replica and coordinator; the sum of each one's peak), and the peak
of the whole Ray instance's summed PSS above the idle instance (every Ray Data, Tune and Train
helper process too: noisier). And the tune's wall time. Pairs: ``wide`` (the 32M-parameter
teacher of ``teacher_service.py``) and ``large`` (a ~190M-parameter teacher text model, so the
teacher copies outweigh the processes' own ~0.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import threading
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.teacher_service import WIDE_TEXT, build_teacher  # noqa: E402  (same teachers)

LARGE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=8)
TEXTS = {"tiny": None, "wide": WIDE_TEXT, "large": LARGE_TEXT}

PIPE = """
name: tune_teacher_{mode}
stages:
  teacher: {{workload: hub_model, params: {{repo: {teacher}}}}}
  dft:
    workload: distill
    inputs: {{teacher: teacher.model}}
    resources: {{num_workers: 1, cpus_per_worker: 1}}
    params: {{teacher: {mode}, {service}train: [projector, llm], max_steps: {steps},
             model: {{path: {student}}}, data: {{format: webdataset, paths: [{data}]}},
             batch_size: 8, checkpoint_every: 0}}
"""
TUNE = """
pipeline: pipe.yaml
stage: dft
space:
  lr: {{grid: {grid}}}
metric: ce
mode: min
num_samples: 1
max_concurrent_trials: {trials}
scheduler: {{type: none}}
"""


# the processes that hold a model, by a part of their Ray process titles
ROLES = {"RayTrainWorker": "student_workers", "TeacherReplica": "teacher_service",
         "TeacherService": "teacher_service"}


class TreeMemory:
    """PSS of this process's descendants (the local Ray instance), sampled every
    ``period_s``: the peak of their sum, and each process's own peak (by role: the trials'
    Ray Train workers, the teacher service's processes)."""

    def __init__(self, period_s: float = 0.5) -> None:
        import psutil

        self.me, self.period = psutil.Process(), period_s
        self.peak, self.samples, self.stop = 0.0, 0, threading.Event()
        self.by_pid: dict[int, tuple[set, float]] = {}  # pid -> (names seen, peak MB)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now_mb(self) -> float:
        import psutil

        from benchmarks._env import _process_name

        total = 0.0
        for p in self.me.children(recursive=True):
            try:
                mb = p.memory_full_info().pss / 2**20
                name = _process_name(p)
            except psutil.Error:
                continue
            total += mb
            names, peak = self.by_pid.get(p.pid, (set(), 0.0))
            self.by_pid[p.pid] = (names | {name}, max(peak, mb))
        return total

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self.peak = max(self.peak, self.now_mb())
            self.samples += 1

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join()
        roles: dict[str, dict] = {}
        for names, mb in self.by_pid.values():  # a process's title changes with its calls
            role = next((r for part, r in ROLES.items() if any(part in n for n in names)), None)
            if role:
                r = roles.setdefault(role, {"processes": 0, "sum_of_peaks_mb": 0.0})
                r["processes"] += 1
                r["sum_of_peaks_mb"] = round(r["sum_of_peaks_mb"] + mb, 1)
        return {"tree_peak_mb": round(self.peak, 1), "roles": roles, "samples": self.samples}


def _models(root: str, text: dict | None) -> dict:
    import torch

    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model

    data = build_tiny_data(os.path.join(root, "data"), num_samples=200, vocab_size=320)
    teacher, proc = build_teacher(data["tokenizer"], text)
    params = sum(p.numel() for p in teacher.parameters())
    out = {"teacher": save_model(teacher, proc, os.path.join(root, "teacher")),
           "teacher_params": params, "data": data["instruct"]}
    torch.manual_seed(1)
    out["student"] = save_model(*build_model({"preset": "tiny-student"}, data["tokenizer"]),
                                os.path.join(root, "student"))
    return out


def run_mode(mode: str, models: dict, args) -> dict:
    """One tune in a fresh local Ray instance (nothing left over from the previous run)."""
    import ray

    from orchestrator.ray_setup import start_local_ray

    start_local_ray(num_cpus=args.cpus, _temp_dir=tempfile.mkdtemp(prefix="mmkdray-", dir="/tmp"),
                    log_to_driver=False, configure_logging=False)
    try:
        time.sleep(3)
        idle_mb = _idle()
        return _tune(mode, models, args, idle_mb)
    finally:
        ray.shutdown()


def _tune(mode: str, models: dict, args, idle_mb: float) -> dict:
    from orchestrator.tune_runner import run_tune
    from orchestrator.tune_spec import load_tune

    root = tempfile.mkdtemp(prefix=f"tune-{mode}-", dir=args.work)
    os.environ["MMKD_HOME"] = os.path.join(root, "home")
    service = "teacher_resources: {replicas: 1, cpus: 1}, " if mode == "service" else ""
    grid = [round(1e-3 * (i + 1), 4) for i in range(args.trials)]
    with open(os.path.join(root, "pipe.yaml"), "w") as f:
        f.write(textwrap.dedent(PIPE.format(mode=mode, service=service, steps=args.steps,
                                            **{k: models[k] for k in ("student", "teacher",
                                                                      "data")})))
    with open(os.path.join(root, "tune.yaml"), "w") as f:
        f.write(textwrap.dedent(TUNE.format(grid=grid, trials=args.trials)))
    spec, pipeline = load_tune(os.path.join(root, "tune.yaml"))
    mem = TreeMemory()
    t0 = time.perf_counter()
    out = run_tune(spec, pipeline, os.path.join(root, "tune.yaml"))
    wall = time.perf_counter() - t0
    memory = mem.finish()
    bad = [t for t in out.trials if not t["completed"] or t["error"]]
    if bad:
        raise RuntimeError(f"{mode}: trials failed: {bad}")
    finals = []
    stages = os.path.join(root, "home", "artifacts", "stages")
    for d in os.listdir(stages):
        if d.startswith("distill-"):
            with open(os.path.join(stages, d, "metrics.json")) as f:
                finals.append(json.load(f))
    roles = memory["roles"]
    result = {"wall_s": round(wall, 2), "idle_mb": round(idle_mb, 1),
              "tree_peak_mb": memory["tree_peak_mb"],
              "tree_peak_above_idle_mb": round(memory["tree_peak_mb"] - idle_mb, 1),
              "model_processes_mb": round(sum(r["sum_of_peaks_mb"] for r in roles.values()), 1),
              "roles": roles, "trials": len(out.trials)}
    if mode == "service":
        last = max(finals, key=lambda m: m.get("teacher_service/users_seen", 0))
        result["service"] = {k.split("/", 1)[1]: v for k, v in last.items()
                             if k.startswith("teacher_service/")}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pairs", default="wide,large")
    ap.add_argument("--cpus", type=int, default=9, help="logical CPUs of the local Ray")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "teacher_service_tune.json"))
    args = ap.parse_args()
    args.work = args.work or tempfile.mkdtemp(prefix="mmkd-tune-bench-")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    from benchmarks._env import environment

    load0 = os.getloadavg()
    pairs: dict[str, dict] = {}
    for name in args.pairs.split(","):
        models = _models(os.path.join(args.work, name), TEXTS[name])
        runs: dict[str, list] = {"online": [], "service": []}
        for rep in range(args.repeats):  # interleaved
            for mode in ("online", "service"):
                runs[mode].append(run_mode(mode, models, args))
                print(name, rep, mode, json.dumps(runs[mode][-1]), flush=True)
        pairs[name] = {"teacher_params": models["teacher_params"], "runs": runs,
                       "summary": _summary(runs)}
    result = {
        "what": f"`run_tune` of a {args.trials}-trial grid over DFT (1 worker each, all trials at "
                f"once on {args.cpus} logical CPUs): one shared teacher service (1 replica, 1 CPU) "
                f"vs a teacher in every trial's worker; wall time, the memory of the processes "
                f"that hold a model (sum of each one's peak PSS) and the Ray instance's peak "
                f"summed PSS above the idle instance",
        "args": vars(args), "pairs": pairs,
        "loadavg": {"start": load0, "end": os.getloadavg()}, "environment": environment(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({p: r["summary"] for p, r in pairs.items()}, indent=2))


def _idle() -> float:
    mem = TreeMemory(period_s=3600)
    value = mem.now_mb()
    mem.finish()
    return value


def _summary(runs: dict[str, list]) -> dict:
    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    keys = ("wall_s", "model_processes_mb", "tree_peak_above_idle_mb")
    out = {m: {k: spread([r[k] for r in rs]) for k in keys} for m, rs in runs.items()}
    pairs = list(zip(runs["service"], runs["online"]))
    out["ratios"] = {f"{k}_service_over_online": spread([s[k] / o[k] for s, o in pairs])
                     for k in keys}
    out["teacher_loads"] = [r["service"]["loads"] for r in runs["service"]]
    out["dedup_hits"] = [r["service"]["dedup_hits"] for r in runs["service"]]
    return out


if __name__ == "__main__":
    main()
