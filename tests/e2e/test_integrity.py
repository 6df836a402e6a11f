"""Results you can trust, through the CLI: a NaN loss fails its stage at its step and publishes
nothing (no retries); a failed `--force` keeps the previous result; `plan` says why a stage
reruns; two drivers on one store compute each key once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.e2e.cli_helpers import mmkd


def _records(home: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((home / "runs").glob("*/run.json"))]


def _published(store: Path) -> dict[str, dict[str, bytes]]:
    """Every published stage folder with the bytes of each file in it."""
    out = {}
    for d in sorted((store / "stages").iterdir()):
        out[d.name] = {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
                       if p.is_file()}
    return out


def test_a_nan_loss_fails_at_its_step_publishes_nothing_and_is_not_retried(tmp_path, cli_env):
    pipe = tmp_path / "nan.yaml"
    pipe.write_text(textwrap.dedent("""
        name: nan_guard
        stages:
          train: {workload: tiny_train, params: {steps: 6, nan_at_step: 3, max_failures: 2}}
    """))
    out = mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "the loss is not finite at step 3 (ce)" in text and "nonfinite: skip_batch" in text
    assert "Traceback" not in text and 'File "' not in text, "one paragraph, no traceback"
    home = Path(cli_env["MMKD_HOME"])
    stages = home / "artifacts" / "stages"
    assert not stages.exists() or not any(stages.iterdir()), "nothing is published"
    starts = list((home / "artifacts" / "checkpoints").glob("*/worker_starts.txt"))
    assert len(starts) == 1 and starts[0].read_text().split() == ["0"], \
        "a deterministic error is not retried (max_failures: 2)"
    [record] = _records(home)
    assert "NonFiniteLossError" in record["stages"]["train"]["error"]

    # skip_batch: the NaN batch is skipped and counted, the stage completes all its steps
    mmkd(["run", str(pipe), "--plain", "--set", "stages.train.params.nonfinite=skip_batch"],
         cli_env, tmp_path, timeout=600, check=True)
    [done] = [r for r in _records(home) if r["status"] == "success"]
    metrics = done["stages"]["train"]["metrics"]
    assert metrics["nonfinite/skipped_batches"] == 1 and metrics["steps"] == 6


def test_failed_force_keeps_the_previous_result_and_plan_says_why(tmp_path, cli_env):
    flag = tmp_path / "fail-now"
    pipe = tmp_path / "force.yaml"
    pipe.write_text(textwrap.dedent(f"""
        name: force_me
        stages:
          a: {{workload: noop, params: {{value: 1, fail_if_exists: {flag}}}}}
          b: {{workload: noop, inputs: {{x: a.result}}, params: {{value: 2}}}}
    """))
    mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, check=True)
    store = Path(cli_env["MMKD_HOME"]) / "artifacts"
    before = _published(store)
    assert len(before) == 2 and all("_SUCCESS" in files for files in before.values())

    flag.write_text("")
    out = mmkd(["run", str(pipe), "--plain", "--force", "a"], cli_env, tmp_path)
    assert out.returncode == 1 and "failing on purpose" in out.stdout + out.stderr
    assert _published(store) == before, "the previous results stay, byte for byte"
    flag.unlink()
    out = mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, check=True)
    assert "2 cached" in out.stdout

    out = mmkd(["plan", str(pipe), "--set", "stages.a.params.value=3"], cli_env, tmp_path,
               check=True)
    assert "params.value 1.0 -> 3.0" in out.stdout
    assert "upstream a changed" in out.stdout
    out = mmkd(["plan", str(pipe), "--force", "b"], cli_env, tmp_path, check=True)
    assert "--force" in out.stdout


def test_two_drivers_on_one_store_compute_each_key_once(tmp_path, cli_env):
    pipe = tmp_path / "twice.yaml"
    pipe.write_text(textwrap.dedent("""
        name: two_drivers
        stages:
          left: {workload: sleep, params: {seconds: 3}}
          right: {workload: sleep, params: {seconds: 2}}
          join: {workload: noop, inputs: {a: left.result, b: right.result}, params: {value: 1}}
    """))
    store = tmp_path / "shared_store"
    procs = []
    for i in range(2):
        env = {**cli_env, "MMKD_HOME": str(tmp_path / f"home{i}")}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(pipe), "--plain",
             "--store", str(store)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    records = [_records(tmp_path / f"home{i}")[0] for i in range(2)]
    for stage in ("left", "right", "join"):
        statuses = sorted(r["stages"][stage]["status"] for r in records)
        assert statuses == ["cached", "done"], (stage, statuses, outputs)
    for name, files in _published(store).items():
        assert {"_SUCCESS", "_mmkd.json", "metrics.json", "stage.json"} <= set(files), name
    assert not list((store / "leases").glob("*.lease")), "every lease is released"
