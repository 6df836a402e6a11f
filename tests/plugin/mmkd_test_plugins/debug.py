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


def _await(found, what: str, timeout_s: float, poll_s: float = 0.1):
    """Poll ``found()`` until it returns something truthy (returned); fail naming ``what`` after
    ``timeout_s`` (tests wait on state, never on a sleep)."""
    from mmkd_test_plugins.gates import wait_until

    return wait_until(what, found, timeout_s, poll_s)


def _reads_no_files(config) -> dict[str, str]:
    """Fingerprint hook: the marker / ticket paths coordinate a test, they are no input; the
    default hook would key them by their (changing) state and the stage would never be cached."""
    return {}


def _touch(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)  # atomic: a waiter never sees half a marker


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
    started_marker: str | None = Field(
        None, description="a file written as the stage starts (another stage can await it)")
    await_marker: str | None = Field(
        None, description="after sleeping, wait until this file exists (another stage's "
        "started_marker): the stage finishes only once that one has started, so two stages "
        "awaiting each other's marker prove that they ran at the same time")
    await_timeout_s: float = Field(120.0, gt=0, description="how long to wait for await_marker")
    seed: int = 0


@workload("sleep", config=SleepConfig, outputs=("result",), fingerprint=_reads_no_files)
def sleep(config: SleepConfig, ctx: StageContext) -> dict[str, float]:
    """Sleeps; records start and end times. With markers, proves that stages overlap."""
    start = time.time()
    if config.started_marker:
        _touch(config.started_marker)
    time.sleep(config.seconds)
    saw = 0.0
    if config.await_marker:
        _await(lambda: os.path.exists(config.await_marker),
               f"{config.await_marker} (written when the stage this one must overlap starts; "
               f"missing: the two stages did not run concurrently)", config.await_timeout_s)
        saw = 1.0
    end = time.time()
    os.makedirs(os.path.join(ctx.output_dir, "result"), exist_ok=True)
    return {"start_time": start, "end_time": end, "saw_marker": saw}


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
    tickets: str | None = Field(
        None, description="a folder of ticket files: the stage takes one (renames it away) "
        "before its first step, waiting while there is none, unless <tickets>/open exists; "
        "lets a test hold a sweep's trials at a known point without timing them")
    ticket_timeout_s: float = Field(600.0, gt=0, description="how long to wait for a ticket")
    seed: int = 0


def _take_ticket(folder: str) -> str:
    """'open' when <folder>/open exists, else the name of a ticket this process took."""
    if os.path.exists(os.path.join(folder, "open")):
        return "open"
    for name in sorted(os.listdir(folder)):
        if name.startswith("ticket") and not name.endswith(".taken"):
            try:  # rename is atomic: of two stages taking one ticket, one wins
                os.rename(os.path.join(folder, name),
                          os.path.join(folder, f"{name}.{os.getpid()}.taken"))
            except FileNotFoundError:
                continue
            return name
    return ""


@workload("quadratic", config=QuadraticConfig, outputs=("result",),
          fingerprint=_reads_no_files)
def quadratic(config: QuadraticConfig, ctx: StageContext) -> dict[str, float]:
    """Minimises (x - target)^2 by gradient descent; its loss curve depends on lr (for tuning).
    Starts at 0, or at the x of input ``init`` (another quadratic's result)."""
    x, velocity = 0.0, 0.0
    if ctx.inputs.get("init"):
        with open(os.path.join(ctx.input("init"), "x.json")) as f:
            x = json.load(f)["x"]
    loss = (x - config.target) ** 2
    if config.tickets:
        _await(lambda: _take_ticket(config.tickets),
               f"a ticket file in {config.tickets} (or {config.tickets}/open)",
               config.ticket_timeout_s, poll_s=0.2)
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

