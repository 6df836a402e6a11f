"""Same pipeline, same seed, same machine: bit-identical weights and the same evaluation table,
whatever the scheduling (two workers, several read tasks, `max_samples`); and a stage resumed
after its driver was killed ends with the weights of a run that was never interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import mmkd
from mmkd_test_plugins.gates import Gate, pid_gone, wait_until

pytestmark = pytest.mark.slow

# A two-worker distillation (the training loop pretrain and SFT share) from a random tiny teacher
# (the test plugin's `tiny_pair`: a pre-training stage here cost ~15 s a run and exercised the same
# loop): the rerun is forced from the data on, so every stage is computed twice.
CHAIN = """
name: repro
defaults:
  resources: {num_workers: 1, cpus_per_worker: 1}
  deepspeed: {zero_stage: 2, precision: fp32}
  params: {seed: 3}
stages:
  shapes:
    workload: shapes
    params: {num_captions: 64, num_instruct: 64, num_eval: 12, shard_size: 16}
  tokenizer:
    workload: tokenizer
    inputs: {corpus: [shapes.captions, shapes.instruct]}
    params: {vocab_size: 320}
  teacher:
    workload: tiny_pair
    inputs: {tokenizer: tokenizer.tokenizer}
    params: {preset: tiny-teacher}
  student_dpt:
    workload: distill
    resources: {num_workers: 2}
    inputs: {tokenizer: tokenizer.tokenizer, teacher: teacher.first, data: shapes.captions}
    params: {model: {preset: tiny-student}, train: [vision, projector, llm], lr: 2.0e-3,
             batch_size: 4, max_steps: 6, max_samples: 40, checkpoint_every: 0}
  evaluate:
    workload: evaluate
    inputs: {models: [teacher.first, student_dpt.model], data: shapes.eval}
    params: {names: [teacher, student], max_samples: 12}
"""


def _stage_outputs(home: Path, run: dict) -> dict[str, Path]:
    """Published folder of every stage (``uri`` is a local path with the default store)."""
    return {name: Path(s["uri"].removeprefix("file://")) for name, s in run["stages"].items()}


def _latest_run(home: Path) -> dict:
    runs = sorted((home / "runs").glob("*/run.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_forced_rerun_gives_identical_weights_and_table(cli_env, tmp_path):
    pipe = tmp_path / "repro.yaml"
    pipe.write_text(CHAIN)
    home = Path(cli_env["MMKD_HOME"])

    def snapshot() -> dict[str, str]:
        run = _latest_run(home)
        assert run["status"] == "success"
        outs = _stage_outputs(home, run)
        got = {"teacher": _sha(outs["teacher"] / "first" / "model.safetensors"),
               "student_dpt": _sha(outs["student_dpt"] / "model" / "model.safetensors")}
        results = outs["evaluate"] / "results"
        table = json.loads((results / "results.json").read_text())
        # every score and count; only the wall seconds behind each model (`train_s`) may differ
        got["table"] = {m: {k: v for k, v in r.items() if k != "train_s"}
                        for m, r in table["results"].items()}
        got["comparisons"] = table["comparisons"]
        got["predictions"] = _sha(results / "predictions_student.jsonl")
        return got

    mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=900, check=True)
    first = snapshot()
    mmkd(["run", str(pipe), "--plain", "--force", "shapes"], cli_env, tmp_path, timeout=900,
         check=True)
    second = snapshot()
    assert second == first


TINY = """
name: resume_exact
stages:
  train:
    workload: tiny_train
    resources: {num_workers: 2, cpus_per_worker: 1}
    params: {steps: 16, rows: 40, batch_size: 4, checkpoint_every: 3, seed: 5,
             gate_dir: GATE, hold_after_step: 7}
"""


def test_killed_driver_resumes_to_the_uninterrupted_weights(cli_env, tmp_path):
    # every rank holds after step 7 (checkpoints 3 and 6 written) until the gate is released:
    # the driver is killed there, mid-training, however fast or slow the machine. The same
    # pipeline file (so the same stage key) in all three runs; the gate is open but for the
    # forced run.
    gate = Gate(tmp_path / "gate")
    pipe = tmp_path / "tiny.yaml"
    pipe.write_text(TINY.replace("GATE", gate.folder))
    home = Path(cli_env["MMKD_HOME"])
    gate.release()
    mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=600, check=True)
    run = _latest_run(home)
    uninterrupted = _sha(_stage_outputs(home, run)["train"] / "model" / "model.safetensors")

    # the same stage again from scratch (--force trains in a checkpoint folder of its own),
    # its driver killed while its workers hold after step 7, both checkpoints registered
    gate.close()
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(pipe),
                               "--plain", "--force", "train"], env=cli_env, cwd=tmp_path,
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def registered() -> int:
        n = 0
        for snap in (home / "artifacts" / "checkpoints").glob("*-force-*/"
                                                              "checkpoint_manager_snapshot.json"):
            try:
                n = max(n, len(json.loads(snap.read_text())["checkpoint_results"]))
            except (OSError, ValueError, KeyError):
                pass
        return n

    def both_ranks_held():
        assert driver.poll() is None, "the forced run ended before its workers held at the gate"
        held = gate.held()
        return held if len(held) == 2 else None

    def two_checkpoints_registered():
        assert driver.poll() is None, "the forced run ended before it could be killed"
        return registered() >= 2

    try:
        held = wait_until("both ranks of the forced run to hold at the gate after step 7",
                          both_ranks_held, timeout=300)
        wait_until("the forced run's checkpoints of steps 3 and 6 to be registered",
                   two_checkpoints_registered)
        os.killpg(driver.pid, signal.SIGKILL)  # only the driver we started, by its process group
        driver.wait()
        # the killed driver's workers end with it; the gate opens for the resumed run only
        wait_until("the killed run's workers to exit", lambda: all(pid_gone(h["pid"])
                                                                   for h in held))
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        gate.release()

    mmkd(["run", str(pipe), "--plain", "--force", "train", "--resume"], cli_env, tmp_path,
         timeout=600, check=True)
    run = _latest_run(home)
    metrics = run["stages"]["train"]["metrics"]
    assert metrics["resumed_from_step"] >= 6 and metrics["steps"] == 16
    assert _sha(_stage_outputs(home, run)["train"] / "model" / "model.safetensors") \
        == uninterrupted
