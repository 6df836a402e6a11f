"""A worker process killed mid-stage: Ray Train restarts the worker group, which resumes from the
latest checkpoint (weights, optimizer, data position, RNG states) and finishes with the same
total number of steps and weights bit-identical to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

from orchestrator.plugin import Resources, StageContext
from workloads.train import run_training
from mmkd_test_plugins.train_fixtures import SlowLoss, build_tiny_tokenizer, shapes_rows
from workloads.train_setup import TrainParams


def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    tok_dir = build_tiny_tokenizer(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    storage = tmp_path / "ckpt"
    ctx = StageContext(pipeline="test", stage="student_sft", key="k", output_dir=str(tmp_path / "out"),
                       resources=Resources(num_workers=2, cpus_per_worker=1),
                       deepspeed={"zero_stage": 2}, checkpoint_storage=str(storage),
                       run_name="student_sft-k")
    total = 18  # leaves several seconds of training after the second checkpoint for the kill
    params = TrainParams(train=["projector", "llm"], lr=3e-3, batch_size=4, max_steps=total,
                         checkpoint_every=3, max_failures=2, pad_token_id=tok.pad_token_id)
    outcome: dict = {}

    def run():
        try:
            outcome["metrics"] = run_training(
                ctx, model_spec={"preset": "tiny-student"}, tokenizer_dir=tok_dir,
                dataset=ray_session.data.from_items(shapes_rows(tok, 48)), params=params,
                loss_fn=SlowLoss(0.4))
        except BaseException as e:  # surfaced by the assert below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    run_dir = storage / "student_sft-k"
    deadline = time.time() + 240
    # Wait until the Train controller has *registered* a checkpoint (a folder on disk is not
    # enough: registration is asynchronous, and a restart only sees registered ones), then kill
    # rank 1's process.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def registered() -> int:
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    while time.time() < deadline and registered() < 1:
        time.sleep(0.2)
    pid_file = run_dir / "worker_pids" / "rank_1.json"
    assert pid_file.exists(), "no checkpoint/pid file appeared"
    victim = json.loads(pid_file.read_text())["pid"]
    assert thread.is_alive(), "training finished before the worker could be killed"
    os.kill(victim, signal.SIGKILL)  # raises if the worker was already gone
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")

    m = outcome["metrics"]
    assert m["steps"] == total and m["total_steps"] == total
    assert m["resumed_from_step"] >= 3 and m["resumed_from_step"] % 3 == 0
    # The restarted group is new processes; the history has each step exactly once.
    assert json.loads(pid_file.read_text())["pid"] != victim
    steps = [e["step"] for e in ctx.local_metrics]
    assert steps == list(range(1, total + 1))
    LlavaForConditionalGeneration.from_pretrained(os.path.join(ctx.output_dir, "model"))

    # the same run without the kill: the resumed worker took the same batches from the same
    # place of its data stream, with the same RNG states, so the weights are bit-identical
    ref = StageContext(pipeline="test", stage="student_sft", key="k",
                       output_dir=str(tmp_path / "ref"), resources=ctx.resources,
                       deepspeed={"zero_stage": 2}, checkpoint_storage=str(tmp_path / "ref_ckpt"),
                       run_name="student_sft-ref")
    run_training(ref, model_spec={"preset": "tiny-student"}, tokenizer_dir=tok_dir,
                 dataset=ray_session.data.from_items(shapes_rows(tok, 48)), params=params,
                 loss_fn=SlowLoss(0.0))

    def digest(out: str) -> str:
        return hashlib.sha256(open(os.path.join(out, "model", "model.safetensors"), "rb")
                              .read()).hexdigest()

    assert digest(ctx.output_dir) == digest(ref.output_dir)
