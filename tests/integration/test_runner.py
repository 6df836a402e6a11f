"""The DAG runner on a real local Ray with real MLflow (sqlite), using the debug workloads."""

from __future__ import annotations

import json
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.runner import PipelineRunner
from orchestrator.loader import load_pipeline


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def pipeline(tmp_path, text, overrides=()):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return load_pipeline(path, list(overrides))


def client(home) -> MlflowClient:
    return MlflowClient(f"sqlite:///{home / 'mlflow.db'}")


# left and right each write a marker as they start and finish only once the other's marker
# exists: they can both succeed only if they ran at the same time (else the first one fails after
# waiting 120 s for the other's marker, naming it), whatever the machine's load.
PIPE = """
name: runner_test
stages:
  left: {workload: sleep, params: {seconds: 0, started_marker: MARKS/left, await_marker: MARKS/right}}
  right: {workload: sleep, params: {seconds: 0, started_marker: MARKS/right, await_marker: MARKS/left}}
  join: {workload: noop, inputs: {a: left.result, b: right.result}, params: {value: 1}}
  counter: {workload: count, inputs: {x: join.result}, params: {steps: 4, step_seconds: 0.05}}
"""


def pipe(tmp_path, overrides=()):
    """PIPE with its stages' markers in a folder of this test."""
    return pipeline(tmp_path, PIPE.replace("MARKS", str(tmp_path / "marks")), overrides)


def test_independent_stages_overlap_then_rerun_is_fully_cached(ray_session, tmp_path, home):
    rec = PipelineRunner(pipe(tmp_path)).run()
    assert rec.status == "success", rec.error  # a stage that ran alone fails naming the marker
    left, right = rec.stages["left"].metrics, rec.stages["right"].metrics
    # each finished only after it saw the other's start marker: their runs overlap
    assert left["saw_marker"] == right["saw_marker"] == 1.0, (left, right)
    # join saw both upstream outputs as local paths
    inputs = json.load(open(f"{rec.stages['join'].uri}/result/inputs.json"))["inputs"]
    assert inputs["a"].endswith("/result") and inputs["b"].endswith("/result")

    rerun = PipelineRunner(pipe(tmp_path))
    again = rerun.run()
    assert not rerun.ray_started  # a fully cached rerun does not even need Ray
    assert again.status == "success"
    assert {s.status for s in again.stages.values()} == {"cached"}
    assert again.stages["counter"].metrics["starts"] == 1  # nothing re-executed

    # MLflow: one parent per run, a child per stage with params, metrics and tags
    c = client(home)
    exp = c.get_experiment_by_name("runner_test")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mmkd.kind") == "pipeline"]
    assert {p.data.tags["mmkd.run_id"] for p in parents} == {rec.run_id, again.run_id}
    first_parent = next(p for p in parents if p.data.tags["mmkd.run_id"] == rec.run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id]
    assert sorted(r.data.tags["mmkd.stage"] for r in children) == ["counter", "join", "left", "right"]
    counter = next(r for r in children if r.data.tags["mmkd.stage"] == "counter")
    assert counter.data.params["steps"] == "4" and counter.data.tags["mmkd.cached"] == "false"
    assert counter.data.tags["mmkd.key"] == rec.stages["counter"].key
    assert [m.step for m in c.get_metric_history(counter.info.run_id, "loss")][-4:] == [1, 2, 3, 4]
    assert counter.info.status == "FINISHED"
    arts = {a.path for a in c.list_artifacts(counter.info.run_id)}
    assert {"metrics.json", "stage.json"} <= arts
    # the cached rerun's children link to the run that produced the result
    second_parent = next(p for p in parents if p.data.tags["mmkd.run_id"] == again.run_id)
    cached = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second_parent.info.run_id]
    cc = next(r for r in cached if r.data.tags["mmkd.stage"] == "counter")
    assert cc.data.tags["mmkd.cached"] == "true"
    assert cc.data.tags["mmkd.source_run"] == counter.info.run_id


def test_param_change_reruns_exactly_downstream_and_force(ray_session, tmp_path, home):
    PipelineRunner(pipe(tmp_path)).run()
    rec = PipelineRunner(pipe(tmp_path, ["stages.join.params.value=2"])).run()
    status = {n: s.status for n, s in rec.stages.items()}
    assert status == {"left": "cached", "right": "cached", "join": "done", "counter": "done"}

    # right runs alone now: left's marker is still there from the first run
    rec = PipelineRunner(pipe(tmp_path), force=["right"]).run()
    status = {n: s.status for n, s in rec.stages.items()}
    assert status == {"left": "cached", "right": "done", "join": "done", "counter": "done"}
    assert rec.stages["counter"].metrics["resumed_from"] == 0  # --force drops checkpoints too


def test_failure_skips_downstream_keeps_independent_work(ray_session, tmp_path, home):
    text = """
    name: failing
    stages:
      boom: {workload: fail, params: {message: "disk on fire"}}
      after: {workload: noop, inputs: {x: boom.result}}
      other: {workload: noop, params: {value: 5}}
    """
    rec = PipelineRunner(pipeline(tmp_path, text)).run()
    assert rec.status == "failed"
    assert rec.stages["boom"].status == "failed" and "disk on fire" in rec.stages["boom"].error
    assert rec.stages["after"].status == "skipped"
    assert rec.stages["other"].status == "done"
    assert "stage 'boom' failed" in rec.error and "RuntimeError: disk on fire" in rec.error
    c = client(home)
    runs = c.search_runs([c.get_experiment_by_name("failing").experiment_id])
    by_stage = {r.data.tags.get("mmkd.stage"): r for r in runs}
    assert by_stage["boom"].info.status == "FAILED"
    assert "disk on fire" in by_stage["boom"].data.tags["mmkd.error"]
    parent = next(r for r in runs if r.data.tags.get("mmkd.kind") == "pipeline")
    assert parent.info.status == "FAILED"


def test_too_many_workers_fails_before_running(ray_session, tmp_path, home):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    text = f"""
    name: greedy
    stages:
      big: {{workload: sleep, resources: {{cpus_per_worker: {cpus + 8}}}}}
    """
    rec = PipelineRunner(pipeline(tmp_path, text)).run()
    assert rec.status == "failed"
    err = rec.stages["big"].error
    assert f"but the Ray cluster has {cpus} CPU" in err and "resources.num_workers" in err


def test_unreachable_tracking_server_keeps_results_and_relogs(ray_session, tmp_path, home):
    from orchestrator.tracking import replay

    text = """
    name: offline
    stages:
      a: {workload: count, params: {steps: 3, step_seconds: 0.01}}
    """
    runner = PipelineRunner(pipeline(tmp_path, text), tracking_uri="http://127.0.0.1:9")
    rec = runner.run()
    assert rec.status == "success" and rec.stages["a"].status == "done"
    assert not runner.tracker.online and "unreachable" in runner.tracker.offline_reason
    assert rec.journal.exists()
    # the server is back (here: the local sqlite store): replay everything
    tracker = replay(rec.journal, f"sqlite:///{home / 'mlflow.db'}")
    c = client(home)
    runs = c.search_runs([c.get_experiment_by_name("offline").experiment_id])
    assert {r.data.tags.get("mmkd.stage") for r in runs} == {None, "a"}
    child = next(r for r in runs if r.data.tags.get("mmkd.stage") == "a")
    assert child.data.tags["mlflow.parentRunId"] == tracker.run_id()
    assert [m.step for m in c.get_metric_history(child.info.run_id, "loss")][-3:] == [1, 2, 3]


def test_runs_left_running_by_a_dead_driver_are_reconciled(ray_session, tmp_path, home):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    c = client(home)
    (home).mkdir(parents=True, exist_ok=True)
    exp = c.create_experiment("reconcile", artifact_location=(home / "mla").as_uri())
    stale = c.create_run(exp, tags={"mmkd.driver": f"{socket.gethostname()}:{dead.pid}"})
    text = """
    name: reconcile
    stages:
      a: {workload: noop}
    """
    PipelineRunner(pipeline(tmp_path, text)).run()
    assert c.get_run(stale.info.run_id).info.status == "KILLED"
