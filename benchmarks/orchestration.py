"""Orchestration overhead: what the runner costs per stage, and what a fully cached rerun costs.

Measures, in one process with a fresh MMKD_HOME:
  * Ray start-up (ray.init) on its own;
  * a chain of N `noop` stages (no work): wall time / N = per-stage overhead of a sequential DAG;
  * N independent `sleep` stages of S seconds: wall time minus the ideal (S x N / slots);
  * a fully cached rerun of the chain (must not start Ray);
  * `mmkd run` of the default pipeline when it is fully cached (a fresh process, as a user runs it),
    if that pipeline has been run in this MMKD_HOME before (pass --default-home).

    python benchmarks/orchestration.py [--stages 20] [--default-home .mmkd]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chain_yaml(n: int) -> str:
    lines = ["name: bench_chain", "stages:"]
    for i in range(n):
        inp = f", inputs: {{x: s{i - 1}.result}}" if i else ""
        lines.append(f"  s{i}: {{workload: noop, params: {{value: {i}}}{inp}}}")
    return "\n".join(lines) + "\n"


def fan_yaml(n: int, seconds: float) -> str:
    lines = ["name: bench_fan", "stages:"]
    for i in range(n):
        lines.append(f"  s{i}: {{workload: sleep, params: {{seconds: {seconds + i * 1e-3}}}}}")
    return "\n".join(lines) + "\n"


def run_pipeline(path: Path) -> tuple[float, object]:
    from orchestrator.runner import PipelineRunner
    from orchestrator.loader import load_pipeline

    t = time.perf_counter()
    runner = PipelineRunner(load_pipeline(path))
    record = runner.run()
    wall = time.perf_counter() - t
    assert record.status == "success", record.error
    return wall, runner


def cli_reruns(pipeline: Path, env: dict, repeats: int, expect: str = " cached") -> dict:
    """Wall seconds of ``repeats`` fresh `mmkd run` processes of a fully cached pipeline."""
    walls = []
    for _ in range(repeats):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(pipeline),
                               "--plain"], env=env, capture_output=True, text=True, cwd=ROOT)
        walls.append(time.perf_counter() - t)
        assert proc.returncode == 0 and expect in proc.stdout, proc.stdout + proc.stderr
    walls.sort()
    return {"median": round(walls[len(walls) // 2], 3), "min": round(walls[0], 3),
            "max": round(walls[-1], 3), "runs": [round(w, 3) for w in walls]}


def versions() -> dict:
    import importlib.metadata as md

    out = {n: md.version(n) for n in ("ray", "mlflow", "torch", "transformers", "deepspeed")}
    out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=20)
    ap.add_argument("--fan", type=int, default=4)
    ap.add_argument("--sleep", type=float, default=2.0)
    ap.add_argument("--default-home", help="MMKD_HOME in which pipelines/llava_kd.yaml already ran")
    ap.add_argument("--repeats", type=int, default=5, help="cached reruns measured")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/orchestration.json"))
    args = ap.parse_args()
    load_at_start = os.getloadavg()

    work = Path(tempfile.mkdtemp(prefix="mmkd-bench-"))
    os.environ["MMKD_HOME"] = str(work / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), _temp_dir=tempfile.mkdtemp(prefix="mmkdb-", dir="/tmp"),
             include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    slots = int(ray.cluster_resources()["CPU"])

    chain = work / "chain.yaml"
    chain.write_text(chain_yaml(args.stages))
    chain_wall, _ = run_pipeline(chain)

    fan = work / "fan.yaml"
    fan.write_text(fan_yaml(args.fan, args.sleep))
    fan_wall, _ = run_pipeline(fan)
    waves = -(-args.fan // slots)
    ideal = waves * args.sleep

    cached_wall, cached = run_pipeline(chain)
    assert {s.status for s in cached.record.stages.values()} == {"cached"}
    cached_started_ray = cached.ray_started
    ray.shutdown()

    # A fully cached rerun as a user runs it: a fresh `mmkd run` process (imports included).
    env = {**os.environ, "RAY_ADDRESS": ""}
    cli_cached = cli_reruns(chain, env, args.repeats)

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_at_start": load_at_start},
        "versions": versions(),
        "ray_init_seconds": round(ray_start, 3),
        "chain": {"stages": args.stages, "wall_seconds": round(chain_wall, 3),
                  "overhead_per_stage_seconds": round(chain_wall / args.stages, 3)},
        "fan": {"stages": args.fan, "sleep_seconds": args.sleep, "cpu_slots": slots,
                "wall_seconds": round(fan_wall, 3), "ideal_seconds": ideal,
                "overhead_seconds": round(fan_wall - ideal, 3)},
        "cached_rerun_in_process_seconds": round(cached_wall, 3),
        "cached_rerun_cli_seconds": cli_cached,
        "cached_rerun_started_ray": cached_started_ray,
    }
    if args.default_home:
        env = {**os.environ, "MMKD_HOME": str(Path(args.default_home).resolve()), "RAY_ADDRESS": ""}
        result["default_pipeline_cached_rerun_cli_seconds"] = cli_reruns(
            ROOT / "pipelines/llava_kd.yaml", env, args.repeats, expect="10 cached")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
