"""A worker process killed mid-stage: Ray Train restarts the worker group, which resumes from the
latest checkpoint (weights, optimizer, data position, RNG states) and finishes with the same
total number of steps and weights bit-identical to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading

from orchestrator.plugin import Resources, StageContext
from workloads.train_loop import run_training
from mmkd_test_plugins.gates import Gate, pid_gone, wait_until
from mmkd_test_plugins.train_fixtures import SlowLoss, build_tiny_tokenizer, shapes_rows
from workloads.train_loop_parts import TrainParams


def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    tok_dir = build_tiny_tokenizer(str(tmp_path / "tok"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    storage = tmp_path / "ckpt"
    ctx = StageContext(pipeline="test", stage="student_sft", key="k", output_dir=str(tmp_path / "out"),
                       resources=Resources(num_workers=2, cpus_per_worker=1),
                       deepspeed={"zero_stage": 2}, checkpoint_storage=str(storage),
                       run_name="student_sft-k")
    total = 18
    params = TrainParams(train=["projector", "llm"], lr=3e-3, batch_size=4, max_steps=total,
                         checkpoint_every=3, max_failures=2, pad_token_id=tok.pad_token_id)
    # every rank holds after step 4 (the checkpoint of step 3 is written) until released: the
    # kill lands mid-training, between two checkpoints, however fast or slow the machine
    gate = Gate(tmp_path / "gate")
    outcome: dict = {}

    def run():
        try:
            outcome["metrics"] = run_training(
                ctx, model_spec={"preset": "tiny-student"}, tokenizer_dir=tok_dir,
                dataset=ray_session.data.from_items(shapes_rows(tok, 48)), params=params,
                loss_fn=SlowLoss(0.0, gate_dir=gate.folder, hold_after_step=4))
        except BaseException as e:  # surfaced by the assert below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    run_dir = storage / "student_sft-k"
    # Wait until the Train controller has *registered* a checkpoint (a folder on disk is not
    # enough: registration is asynchronous, and a restart only sees registered ones) and both
    # ranks hold at the gate, then kill rank 1's process.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def registered() -> int:
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    def both_ranks_held():
        assert thread.is_alive(), f"training ended before it held at the gate: {outcome}"
        held = gate.held()
        return held if len(held) == 2 else None

    def checkpoint_registered():
        assert thread.is_alive(), f"training ended before the kill: {outcome}"
        return registered() >= 1

    try:
        held = wait_until("both ranks to hold at the gate after step 4", both_ranks_held,
                          timeout=300)
        wait_until(f"a registered checkpoint in {snapshot}", checkpoint_registered)
        pid_file = run_dir / "worker_pids" / "rank_1.json"
        victim = json.loads(pid_file.read_text())["pid"]
        assert victim in {h["pid"] for h in held if h["rank"] == 1}, (victim, held)
        os.kill(victim, signal.SIGKILL)  # raises if the worker was already gone
        # let the restarted group through once the killed group is gone (rank 0 included)
        wait_until("the killed worker group's processes to exit",
                   lambda: all(pid_gone(h["pid"]) for h in held))
    finally:
        gate.release()  # on a failure too: the run ends instead of holding the workers
        thread.join(timeout=600)
    assert not thread.is_alive(), "training did not finish within 600 s of the release"
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
