"""Small workloads for checking a pipeline's wiring and measuring the orchestrator itself.

`noop` and `sleep` cost nothing but time; `fail` raises; `count` counts to N with an in-stage
checkpoint after every step, so it shows how an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time

from pydantic import Field

from orchestrator.plugin import StageContext
from orchestrator.plugin import WorkloadConfig, workload


class NoopConfig(WorkloadConfig):
    value: float = Field(0.0, description="a number copied into metrics.json (to vary the key)")
    fail_if_exists: str | None = Field(
        None, description="raise if this file exists (a stage that fails on its next run)")
    seed: int = 0


@workload("noop", config=NoopConfig, outputs=("result",))
def noop(config: NoopConfig, ctx: StageContext) -> dict[str, float]:
    """Does nothing; writes its inputs and value to result/ (for wiring tests)."""
    if config.fail_if_exists and os.path.exists(config.fail_if_exists):
        raise RuntimeError(f"{config.fail_if_exists} exists: failing on purpose")
    out = os.path.join(ctx.output_dir, "result")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "inputs.json"), "w") as f:
        json.dump({"inputs": ctx.inputs, "value": config.value}, f)
    return {"value": config.value}


class SleepConfig(WorkloadConfig):
    seconds: float = Field(1.0, ge=0, description="how long to sleep")
    seed: int = 0


@workload("sleep", config=SleepConfig, outputs=("result",))
def sleep(config: SleepConfig, ctx: StageContext) -> dict[str, float]:
    """Sleeps; records start and end times (to check that stages overlap)."""
    start = time.time()
    time.sleep(config.seconds)
    end = time.time()
    os.makedirs(os.path.join(ctx.output_dir, "result"), exist_ok=True)
    return {"start_time": start, "end_time": end}


class FailConfig(WorkloadConfig):
    message: str = "this stage fails on purpose"
    seed: int = 0


@workload("fail", config=FailConfig, outputs=("result",))
def fail(config: FailConfig, ctx: StageContext) -> None:
    """Raises RuntimeError(message) (to test failure handling)."""
    raise RuntimeError(config.message)


class CountConfig(WorkloadConfig):
    steps: int = Field(10, ge=1, description="how many steps to count")
    step_seconds: float = Field(0.1, ge=0, description="time per step")
    seed: int = 0


@workload("count", config=CountConfig, outputs=("result",))
def count(config: CountConfig, ctx: StageContext) -> dict[str, float]:
    """Counts steps with a checkpoint after each; a restarted stage continues from it."""
    state_dir = os.path.join(ctx.checkpoint_storage or ctx.output_dir, ctx.run_name or "count")
    os.makedirs(state_dir, exist_ok=True)
    state_path = os.path.join(state_dir, "state.json")
    state = {"step": 0, "starts": 0}
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    state["starts"] += 1
    resumed_from = state["step"]
    while state["step"] < config.steps:
        time.sleep(config.step_seconds)
        state["step"] += 1
        tmp = state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, state_path)  # atomic: a kill never leaves half a checkpoint
        ctx.report({"loss": 1.0 / state["step"]}, step=state["step"], total_steps=config.steps)
    os.makedirs(os.path.join(ctx.output_dir, "result"), exist_ok=True)
    return {"steps": state["step"], "starts": state["starts"], "resumed_from": resumed_from,
            "resumed_from_step": resumed_from if resumed_from > 0 else -1}


class QuadraticConfig(WorkloadConfig):
    lr: float = Field(0.1, gt=0, description="gradient-descent step size")
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum")
    steps: int = Field(20, ge=1)
    step_seconds: float = Field(0.05, ge=0, description="time per step")
    target: float = 3.0
    seed: int = 0


@workload("quadratic", config=QuadraticConfig, outputs=("result",))
def quadratic(config: QuadraticConfig, ctx: StageContext) -> dict[str, float]:
    """Minimises (x - target)^2 by gradient descent; its loss curve depends on lr (for tuning).
    Starts at 0, or at the x of input ``init`` (another quadratic's result)."""
    x, velocity = 0.0, 0.0
    if ctx.inputs.get("init"):
        with open(os.path.join(ctx.input("init"), "x.json")) as f:
            x = json.load(f)["x"]
    loss = (x - config.target) ** 2
    for step in range(1, config.steps + 1):
        time.sleep(config.step_seconds)
        velocity = config.momentum * velocity - config.lr * 2 * (x - config.target)
        x += velocity
        loss = (x - config.target) ** 2
        ctx.report({"loss": loss, "x": x}, step=step, total_steps=config.steps)
    os.makedirs(os.path.join(ctx.output_dir, "result"), exist_ok=True)
    with open(os.path.join(ctx.output_dir, "result", "x.json"), "w") as f:
        json.dump({"x": x}, f)
    return {"loss": loss, "x": x}


class ScoreConfig(WorkloadConfig):
    target: float = 3.0


@workload("score", config=ScoreConfig, outputs=("result",))
def score(config: ScoreConfig, ctx: StageContext) -> dict[str, float]:
    """Scores a `quadratic` result: closeness of its x to target (an 'evaluation' stage)."""
    with open(os.path.join(ctx.input("fit"), "x.json")) as f:
        x = json.load(f)["x"]
    os.makedirs(os.path.join(ctx.output_dir, "result"), exist_ok=True)
    return {"closeness": -abs(x - config.target)}

