"""Checkpoints are read as data, never as code (#23): worker state in JSON + safetensors, and
DeepSpeed's files through ``torch.load(weights_only=True)``; a planted pickle is refused in one
paragraph and its side effect never happens."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from workloads.checkpoints import (UnsafeCheckpointError, load_worker_state,
                                   refusing_pickled_code, save_worker_state)


class _Planted:
    """Unpickling this touches ``marker`` (what an attacker's payload would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"module": _Planted(str(marker))}, f)


def test_worker_state_round_trip_continues_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    save_worker_state(str(tmp_path), 0, {"epoch": 2, "rows": 48})
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)),
            float(np.random.randn()))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_worker_state(str(tmp_path), 0) == {"epoch": 2, "rows": 48}
    got = (random.random(), float(np.random.rand()), float(torch.rand(1)), float(np.random.randn()))
    assert got == want
    assert sorted(os.listdir(tmp_path)) == ["mmkd_worker_0.json", "mmkd_worker_0.safetensors"]


def test_a_legacy_pickled_worker_state_is_never_opened(tmp_path):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "mmkd_worker_0.pt", marker)
    assert load_worker_state(str(tmp_path), 0) == {"epoch": 0, "rows": 0}
    assert not marker.exists()


def test_refusing_pickled_code_names_the_file_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    _plant(bad, marker)
    with pytest.raises(UnsafeCheckpointError) as err, refusing_pickled_code("stage 'dft'"):
        torch.load(bad)  # what DeepSpeed calls, weights_only=False or not
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "stage 'dft'" in msg and "--force" in msg
    assert not marker.exists()
    # outside the block torch.load is torch's own again
    assert torch.load.__module__ == "torch.serialization"


DEEPSPEED_RESUME = textwrap.dedent("""
    import os, sys, shutil, torch, torch.distributed as dist, deepspeed
    from workloads.checkpoints import refusing_pickled_code
    root = sys.argv[1]
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=0, world_size=1)

    def engine(stage):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        cfg = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
               "zero_optimization": {"stage": stage}}
        return deepspeed.initialize(model=m, optimizer=opt, config=cfg)[0]

    for stage in (0, 2, 3):
        a = engine(stage)
        for _ in range(2):
            a.backward(a(torch.ones(1, 8)).sum()); a.step()
        d = os.path.join(root, f"ck{stage}")
        a.save_checkpoint(d, tag="ds")
        b = engine(stage)
        with refusing_pickled_code("test"):
            b.load_checkpoint(d, tag="ds")
        x = torch.ones(1, 8)
        assert torch.equal(a(x), b(x)), stage
        print("resumed", stage, flush=True)
    files = sorted(f for f in os.listdir(os.path.join(root, "ck2", "ds")) if f.endswith(".pt"))
    print("files", ",".join(files), flush=True)
""")


def test_deepspeed_checkpoints_resume_as_data_and_a_planted_one_is_refused(tmp_path):
    """Real DeepSpeed (ZeRO 0, 2, 3 on CPU/gloo) saves and resumes under the guard; then one of
    its files is replaced by a pickle with a side effect: the resume is refused."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.getcwd(), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    run = subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stdout.splitlines() if line.startswith("resumed")] == [
        "resumed 0", "resumed 2", "resumed 3"]
    ck = tmp_path / "ck2" / "ds"
    marker = tmp_path / "pwned"
    victim = next(p for p in sorted(ck.glob("*.pt")) if "optim" in p.name)
    _plant(victim, marker)
    plant_check = textwrap.dedent(f"""
        import torch, torch.distributed as dist, deepspeed
        from workloads.checkpoints import refusing_pickled_code, UnsafeCheckpointError
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store2", rank=0,
                                world_size=1)
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        e = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(m.parameters()),
            config={{"train_micro_batch_size_per_gpu": 1,
                     "zero_optimization": {{"stage": 2}}}})[0]
        try:
            with refusing_pickled_code("stage 'sft'"):
                e.load_checkpoint("{tmp_path / 'ck2'}", tag="ds")
        except UnsafeCheckpointError as err:
            print("REFUSED", err)
    """)
    run = subprocess.run([sys.executable, "-c", plant_check], env=env, capture_output=True,
                         text=True, timeout=600)
    assert "REFUSED" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    assert victim.name in run.stdout and "stage 'sft'" in run.stdout
    assert not marker.exists()
