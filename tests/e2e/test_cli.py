"""The `mmkd` command line, end to end, in subprocesses attached to the test session's Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from cli_helpers import mmkd


def test_validate_plan_and_bad_file_exit_codes(tmp_path, cli_env):
    good = tmp_path / "good.yaml"
    good.write_text("name: g\nstages:\n  a: {workload: noop}\n  b: {workload: noop, inputs: {x: a.result}}\n")
    out = mmkd(["validate", str(good)], cli_env, tmp_path, check=True)
    assert "ok" in out.stdout and "2 stage(s)" in out.stdout
    out = mmkd(["plan", str(good)], cli_env, tmp_path, check=True)
    assert "2 stage(s) to run, 0 cached" in out.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nstages:\n  a: {workload: noop, inputs: {x: nowhere.result}}\n")
    out = mmkd(["validate", str(bad)], cli_env, tmp_path)
    assert out.returncode == 2
    assert "bad.yaml:3" in out.stderr and "stage 'a'" in out.stderr and "no stage 'nowhere'" in out.stderr
    out = mmkd(["run", str(bad)], cli_env, tmp_path)
    assert out.returncode == 2

    missing = tmp_path / "missing.yaml"
    missing.write_text("name: m\nstages:\n  pt:\n    workload: pretrain\n    params: {model: "
                       "{preset: tiny-student}, data: {format: webdataset, paths: /nowhere/shards}}\n")
    out = mmkd(["validate", str(missing)], cli_env, tmp_path)
    assert out.returncode == 2 and "stage 'pt'" in out.stderr and "/nowhere/shards" in out.stderr
    assert "ok" not in out.stdout

    out = mmkd(["workloads"], cli_env, tmp_path, check=True)
    for name in ("noop", "sleep", "count", "fail"):
        assert name in out.stdout


def test_killed_driver_resumes_without_redoing_finished_stages(tmp_path, cli_env):
    pipe = tmp_path / "long.yaml"
    pipe.write_text(textwrap.dedent("""
        name: resume_me
        stages:
          prep: {workload: noop, params: {value: 1}}
          long: {workload: count, inputs: {x: prep.result}, params: {steps: 60, step_seconds: 0.25}}
    """))
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(pipe), "--plain"],
                              env=cli_env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    home = Path(cli_env["MMKD_HOME"])
    state = None
    deadline = time.time() + 180
    while time.time() < deadline:
        found = list((home / "artifacts" / "checkpoints").glob("count-*/state.json"))
        if found:
            try:
                state = json.loads(found[0].read_text())
            except json.JSONDecodeError:
                state = None
            if state and state["step"] >= 5:
                break
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.2)
    assert state and state["step"] >= 5, "the long stage never got going"
    os.killpg(driver.pid, signal.SIGKILL)  # only the driver we started, by its process group
    driver.wait()

    out = mmkd(["runs"], cli_env, tmp_path, check=True)
    assert "resume_me" in out.stdout and "killed" in out.stdout

    out = mmkd(["run", str(pipe), "--resume", "--plain"], cli_env, tmp_path, timeout=300, check=True)
    runs = sorted((home / "runs").glob("*/run.json"))
    assert len(runs) == 1, "--resume continues the same run record"
    record = json.loads(runs[0].read_text())
    assert record["status"] == "success"
    assert record["stages"]["prep"]["status"] in ("done", "cached")
    long = record["stages"]["long"]["metrics"]
    assert long["starts"] == 2 and long["resumed_from"] >= 5 and long["steps"] == 60

    # ... and the same MLflow parent run, now FINISHED, with one child per stage
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = c.get_run(record["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = c.search_runs([parent.info.experiment_id],
                             f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["mmkd.stage"] for r in children if r.info.status == "FINISHED") \
        == ["long", "prep"]
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert [r.info.status for r in children if r.data.tags["mmkd.stage"] == "long"].count("KILLED") == 1
    # the resumed stage says so: MLflow tags and the published manifest
    [finished] = [r for r in children
                  if r.data.tags["mmkd.stage"] == "long" and r.info.status == "FINISHED"]
    assert finished.data.tags["mmkd.resumed"] == "true"
    assert int(finished.data.tags["mmkd.resumed_from_step"]) == long["resumed_from"]
    [manifest] = (home / "artifacts" / "stages").glob("count-*/_mmkd.json")
    assert json.loads(manifest.read_text())["resumed_from_step"] == long["resumed_from"]

    out = mmkd(["show", record["run_id"]], cli_env, tmp_path, check=True)
    assert "long" in out.stdout and "done" in out.stdout

    # and a plain rerun runs nothing
    out = mmkd(["run", str(pipe), "--plain"], cli_env, tmp_path, check=True)
    assert "2 cached" in out.stdout
