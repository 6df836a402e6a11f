"""`tiny_train`: the real training loop (Ray Train + DeepSpeed) on generated rows, without the
data layer, for tests of what the loop guarantees; its loss can be made NaN at a chosen step,
and every rank can hold at a test's gate after a chosen step (a known point to kill it at).
Kept apart from `debug.py` so the cheap debug workloads' keys do not follow the training code.
"""

from __future__ import annotations

import os

from pydantic import Field

from orchestrator.plugin import StageContext
from orchestrator.plugin import WorkloadConfig, workload


class TinyTrainConfig(WorkloadConfig):
    steps: int = Field(5, ge=1, description="optimizer steps")
    workers: int = Field(1, ge=1, description="unused: Ray Train workers come from resources")
    nan_at_step: int | None = Field(None, ge=1, description="the first batch of this step has a NaN loss")
    nonfinite: str = Field("fail", pattern="^(fail|skip_batch)$")
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    rows: int = Field(32, ge=1, description="generated rows (the data set)")
    batch_size: int = Field(4, ge=1)
    checkpoint_every: int = Field(0, ge=0)
    step_seconds: float = Field(0.0, ge=0, description="sleep per micro-step")
    gate_dir: str | None = Field(None, description="a test's gate (mmkd_test_plugins.gates): every "
                                 "rank holds there after step `hold_after_step` until released")
    hold_after_step: int | None = Field(None, ge=0)


class _NanAtStep:
    """CausalLMLoss whose value is NaN for the first batch of optimizer step ``step``."""

    def __init__(self, step: int | None, seconds: float = 0.0, gate_dir: str | None = None,
                 hold_after_step: int | None = None):
        self.step = step
        self.seconds = seconds
        self.gate_dir, self.hold_after_step = gate_dir, hold_after_step
        self.fired = False

    def setup(self, model, sctx) -> None:
        # one line per worker start: shows whether Ray Train restarted the worker group
        ctx = sctx.stage
        folder = os.path.join(ctx.checkpoint_storage or ctx.output_dir, ctx.run_name or "run")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "worker_starts.txt"), "a") as f:
            f.write(f"{sctx.rank}\n")

    def __call__(self, model, batch, sctx):
        import time

        from mmkd_test_plugins.train_fixtures import hold_at_gate
        from workloads.train_loop_parts import CausalLMLoss

        hold_at_gate(self.gate_dir, self.hold_after_step, sctx)
        time.sleep(self.seconds)
        loss, extra = CausalLMLoss()(model, batch, sctx)
        if self.step is not None and sctx.step + 1 == self.step and not self.fired:
            self.fired = True
            loss = loss * float("nan")
            extra = {"ce": float("nan")}
        return loss, extra


def _fingerprint(config: TinyTrainConfig) -> dict[str, str]:
    """The default fingerprint, less the gate: a control channel (its markers come and go as a
    test holds and releases the run), not a file the stage reads."""
    from orchestrator.fingerprint import config_fingerprint

    return config_fingerprint(config.model_copy(update={"gate_dir": None}))


@workload("tiny_train", config=TinyTrainConfig, outputs=("model",), distributed=True,
          fingerprint=_fingerprint)
def tiny_train(config: TinyTrainConfig, ctx: StageContext) -> dict[str, float]:
    """Trains a tiny student on generated rows (no data layer); optionally turns its loss NaN."""
    import ray
    from transformers import AutoTokenizer

    from workloads.train_loop import run_training
    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer, shapes_rows
    from workloads.train_loop_parts import TrainParams

    tok_dir = build_tiny_tokenizer(os.path.join(ctx.output_dir, "_tokenizer"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = shapes_rows(tok, config.rows, seed=config.seed)
    return run_training(ctx, model_spec={"preset": "tiny-student"}, tokenizer_dir=tok_dir,
                        dataset=ray.data.from_items(rows),
                        loss_fn=_NanAtStep(config.nan_at_step, config.step_seconds,
                                           config.gate_dir, config.hold_after_step),
                        params=TrainParams(train=["projector", "llm"], lr=1e-3,
                                           batch_size=config.batch_size,
                                           checkpoint_every=config.checkpoint_every,
                                           max_steps=config.steps, seed=config.seed,
                                           max_failures=config.max_failures,
                                           nonfinite=config.nonfinite,
                                           pad_token_id=tok.pad_token_id))
