"""`mmkd tune` on a real local Ray: ASHA stops bad trials, MLflow has a child per trial."""

from __future__ import annotations

import json
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tune_runner import run_tune
from orchestrator.tune_spec import TuneError, load_tune

PIPE = """
name: tune_me
stages:
  prep: {workload: noop, params: {value: 1}}
  fit:
    workload: quadratic
    inputs: {x: prep.result}
    params: {steps: 12, step_seconds: 0.15}
"""

TUNE = """
pipeline: pipe.yaml
stage: fit
space:
  lr: {grid: [0.45, 0.3, 0.001, 0.0005]}
metric: loss
mode: min
num_samples: 1
scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
max_concurrent_trials: 1
smooth: 3
"""
# ASHA decides when a trial reaches a rung, against the trials recorded there before it: with
# trials running side by side, which one arrives first is a race (slow trials first, it may cut
# none). One at a time, in the listed order, its decisions are fixed by the losses alone: 0.45
# reaches every rung first (never cut), and each later rate reaches rung 2 with a worse mean
# loss than the rung's cutoff (the median of those before it: 0.45's, then 0.45's and 0.3's...).


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "pipe.yaml").write_text(textwrap.dedent(PIPE))
    (tmp_path / "tune.yaml").write_text(textwrap.dedent(TUNE))
    return tmp_path


def test_asha_tune_logs_trials_and_saves_best_params(ray_session, files):
    spec, pipeline = load_tune(str(files / "tune.yaml"))
    out = run_tune(spec, pipeline, str(files / "tune.yaml"))

    assert len(out.trials) == 4
    # Tune made (and, one at a time, ran) the trials in the listed order: ids count up
    assert [t["params"]["lr"] for t in sorted(out.trials, key=lambda t: t["trial"])] \
        == [0.45, 0.3, 0.001, 0.0005], out.trials
    best = json.loads(out.best_params_file.read_text())
    assert best["params"] == out.best_params
    assert best["params"]["lr"] == 0.45  # the fastest-converging rate, the one ASHA kept
    assert best["value"] == min(t["loss"] for t in out.trials if t["loss"] is not None)
    by_lr = {t["params"]["lr"]: t for t in out.trials}
    assert by_lr[0.45]["completed"] and by_lr[0.45]["steps"] == 12, out.trials
    for lr in (0.3, 0.001, 0.0005):  # ASHA cut each at its first rung (the grace period, 2)
        assert not by_lr[lr]["completed"] and by_lr[lr]["steps"] == 2, (lr, out.trials)
    assert out.stopped_early == 3, out.trials
    assert out.steps_run == 12 + 3 * 2 < out.steps_budget == 4 * 12
    assert "--set stages.fit.params.lr=" in out.run_line

    client = MlflowClient(f"sqlite:///{files / 'home' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune_me")
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    assert len(runs) == 4
    assert sorted(float(r.data.params["lr"]) for r in runs) == [0.0005, 0.001, 0.3, 0.45]
    stopped = [r for r in runs if r.data.tags.get("mmkd.stopped_early") == "true"]
    assert len(stopped) == out.stopped_early
    assert all(len(client.get_metric_history(r.info.run_id, "loss")) >= 2 for r in runs)
    for r in runs:  # ASHA saw the mean of the last 3 steps; MLflow keeps the raw curve too
        raw = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "loss_step")}
        seen = {m.step: m.value for m in client.get_metric_history(r.info.run_id, "loss")}
        steps = sorted(raw)
        assert steps and set(seen) == set(raw)
        if r.data.tags["mmkd.stopped_early"] == "false":  # the final result is at the last step
            assert steps[-1] == 12, steps
        for i, step in enumerate(steps):
            window = [raw[s] for s in steps[max(0, i - 2):i + 1]]
            assert seen[step] == pytest.approx(sum(window) / len(window)), (step, raw, seen)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mmkd.best_trial"] == best["trial"]

    # the best trial's stage output is cached: applying the best params reruns nothing
    from orchestrator.runner import PipelineRunner
    from orchestrator.loader import load_pipeline

    sets = [f"stages.fit.params.lr={best['params']['lr']}"]
    rec = PipelineRunner(load_pipeline(files / "pipe.yaml", sets)).run()
    assert {s.status for s in rec.stages.values()} == {"cached"}


def test_bad_search_space_names_the_entry(files):
    bad = files / "bad.yaml"
    bad.write_text(TUNE.replace("lr: {grid: [0.45, 0.3, 0.001, 0.0005]}",
                                "lr: {uniform: [1.0, 0.1]}\n  speed: {choice: [1]}"))
    with pytest.raises(TuneError) as e:
        load_tune(str(bad))
    msg = str(e.value)
    assert "bad.yaml" in msg and "space.lr.uniform" in msg and "low < high" in msg
    assert "space.speed" in msg and "no param 'speed'" in msg
    bad.write_text(TUNE.replace("lr: {grid: [0.45, 0.3, 0.001, 0.0005]}", "lr: {grid: [-1.0]}"))
    with pytest.raises(TuneError, match=r"space.lr: value -1.0 is invalid"):
        load_tune(str(bad))
    bad.write_text(TUNE.replace("stage: fit", "stage: fitt"))
    with pytest.raises(TuneError, match="no stage 'fitt'"):
        load_tune(str(bad))


def test_select_picks_the_best_trial_by_a_downstream_evaluation(ray_session, files):
    # the judge is two stages below the tuned one: each finished trial runs refine, then judge
    pipe = PIPE + """  refine:
    workload: quadratic
    inputs: {init: fit.result}
    params: {lr: 0.001, steps: 2, step_seconds: 0.0}
  judge:
    workload: score
    inputs: {fit: refine.result}
    params: {target: 1.0}
"""
    (files / "pipe.yaml").write_text(textwrap.dedent(pipe))
    tune_file = files / "select.yaml"
    tune_file.write_text(textwrap.dedent(TUNE).replace(
        "num_samples: 1", "num_samples: 1\nselect: {stage: judge, metric: closeness, mode: max}")
        .replace("{grid: [0.45, 0.3, 0.001, 0.0005]}", "{grid: [0.02, 0.06]}")
        .replace("type: asha", "type: none")
        .replace("max_concurrent_trials: 1", "max_concurrent_trials: 4"))
    spec, pipeline = load_tune(str(tune_file))
    out = run_tune(spec, pipeline, str(tune_file))
    # after 12 steps lr=0.06 gets x close to 3 (loss lower), but the judge wants x near 1:
    # lr=0.02 stops nearer 1 (x=1.16 vs 2.35), so selection by the judge disagrees with selection by loss.
    by_loss = min(out.trials, key=lambda t: t["loss"])["params"]["lr"]
    assert by_loss == 0.06
    assert out.best_params == {"lr": 0.02}
    assert json.loads(out.best_params_file.read_text())["metric"] == "closeness"
    # the same sweep again: every trial's stage is cached, and each is still judged by `select`
    again = run_tune(spec, pipeline, str(tune_file))
    assert again.best_params == {"lr": 0.02}
    assert sorted(t["closeness"] for t in again.trials) == sorted(t["closeness"] for t in out.trials)
    bad = files / "bad_select.yaml"
    bad.write_text(tune_file.read_text().replace("stage: judge", "stage: prep"))
    with pytest.raises(TuneError, match="'prep' does not depend on 'fit'"):
        load_tune(str(bad))


# the ASHA sweep, one trial at a time and run to the end
RESUME_TUNE = TUNE.replace("scheduler: {type: asha, grace_period: 2, reduction_factor: 2}",
                           "scheduler: {type: none}")


def _tune_trial_status(home) -> dict[str, str]:
    """Trial id -> status in Tune's saved experiment state (what `--resume` restores); {} while
    there is none (or it is being written)."""
    out: dict[str, str] = {}
    for path in home.glob("tune/*/ray_tune/experiment_state-*.json"):
        try:
            saved = json.loads(path.read_text())
        except ValueError:  # half written
            continue
        for trial_json, _ in saved.get("trial_data", []):
            trial = json.loads(trial_json)
            out[trial["trial_id"]] = trial["status"]
    return out


def test_tune_resume_after_the_driver_is_killed(ray_session, files):
    """SIGKILL `mmkd tune` after a trial finished, then `mmkd tune --resume`: the finished
    trials are not run again, the rest are, and MLflow keeps one parent with 4 trial runs.
    A trial's stage starts only with a ticket: one is there, so exactly one trial finishes
    and the next waits for a ticket until the kill; the resume opens the gate."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    tickets = files / "tickets"
    tickets.mkdir()
    (tickets / "ticket-1").write_text("")
    (files / "pipe.yaml").write_text(textwrap.dedent(PIPE).replace(
        "step_seconds: 0.15}", f"step_seconds: 0.15, tickets: {tickets}}}"))
    (files / "tune.yaml").write_text(textwrap.dedent(RESUME_TUNE))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "0.5"}  # Tune saves its experiment state this often
    cmd = [sys.executable, "-m", "orchestrator.cli", "tune", "tune.yaml"]
    home = files / "home"
    proc = subprocess.Popen(cmd, env=env, cwd=files, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    client = None
    deadline = time.monotonic() + 240
    finished: list[str] = []
    saved: dict[str, str] = {}
    try:
        while not finished:  # the ticketed trial's MLflow run is FINISHED
            assert proc.poll() is None, f"tune ended before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no trial's MLflow run FINISHED in 240 s"
            time.sleep(0.25)
            # the parent run exists (so the sqlite schema is complete) once the state is saved
            if client is None and list(home.glob("tune/*/tune_state.json")):
                client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
            if client is not None and client.get_experiment_by_name("tune_me"):
                exp = client.get_experiment_by_name("tune_me")
                runs = client.search_runs([exp.experiment_id], "tags.`mmkd.kind` = 'trial'")
                finished = [r.data.tags["mmkd.trial"] for r in runs
                            if r.info.status == "FINISHED"]
        # Tune saved its experiment state with that trial TERMINATED: --resume will skip it
        while any(saved.get(t) != "TERMINATED" for t in finished):
            assert proc.poll() is None, f"tune ended before it was killed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, (
                f"Tune's saved experiment state never showed the finished trials {finished} "
                f"as TERMINATED in 240 s: {saved}")
            time.sleep(0.1)
            saved = _tune_trial_status(home)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (state_file,) = home.glob("tune/*/tune_state.json")
    before = json.loads(state_file.read_text())
    exp = client.get_experiment_by_name("tune_me")
    done = [r for r in client.search_runs([exp.experiment_id], "tags.`mmkd.kind` = 'trial'")
            if r.info.status == "FINISHED"]
    # one ticket: one trial finished, the next one was waiting for a ticket when killed
    assert len(done) == len(finished) == 1, (finished, [r.data.tags for r in done])
    (tickets / "open").write_text("")  # the resumed trials run without tickets

    again = subprocess.run([*cmd, "--resume"], env=env, cwd=files, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    after = json.loads(state_file.read_text())
    assert after["parent_run_id"] == before["parent_run_id"]
    assert len(after["starts"]) == 4, (after, again.stdout[-3000:], again.stderr[-3000:])
    for trial in finished:  # finished before the kill: never started again
        assert after["starts"][trial] == 1, (trial, after["starts"])
    assert json.loads(next(home.glob("tune/*/best_params.json")).read_text())["params"]["lr"] \
        in (0.3, 0.45)

    parents = client.search_runs([exp.experiment_id], "tags.`mmkd.kind` = 'tune'")
    assert [p.info.run_id for p in parents] == [before["parent_run_id"]]
    assert parents[0].info.status == "FINISHED"
    runs = client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{before['parent_run_id']}'")
    assert sorted(r.data.tags["mmkd.trial"] for r in runs) == sorted(after["starts"])
    assert {r.info.status for r in runs} == {"FINISHED"}


TRAIN_PIPE = """
name: tune_train
stages:
  fit:
    workload: pretrain
    resources: {num_workers: 1, cpus_per_worker: 3}
    params:
      model: {path: MODEL}
      data: {format: webdataset, paths: [DATA]}
      max_steps: 3
      batch_size: 4
      checkpoint_every: 0
"""

TRAIN_TUNE = """
pipeline: pipe.yaml
stage: fit
space:
  lr: {grid: [0.001, 0.003]}
metric: loss
mode: min
num_samples: 1
scheduler: {type: none}
"""


@pytest.mark.timeout(300)
def test_a_killed_trial_gives_its_training_resources_back(ray_session, files):
    """When ASHA stops a trial, Tune kills the trial actor and with it the stage task that owns
    the Ray Train run and its controller. Ray keeps the run's placement group while the driver's
    job lives, and Ray Train's own cleaner misses a run killed while starting its workers (this
    test kills it then; in CI the group leaked and the next trial would have waited forever).
    The tune driver frees such groups (`Reaper`, called from its loop, as here): every CPU of
    the session that was free before the run must come back."""
    import time

    import ray
    from ray.util import placement_group_table

    from orchestrator.artifact_store import compute_keys
    from orchestrator.placement import Reaper
    from orchestrator.executor import stage_payload, stage_task
    from orchestrator.plan import fingerprints, store_for
    from orchestrator.loader import load_pipeline
    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model

    data = build_tiny_data(files / "data", num_samples=32, vocab_size=320)
    model, proc = build_model({"preset": "tiny-student"}, data["tokenizer"])
    save_model(model, proc, str(files / "model"))
    (files / "pipe.yaml").write_text(textwrap.dedent(TRAIN_PIPE).replace(
        "MODEL", str(files / "model")).replace("DATA", data["captions"]).replace(
        "max_steps: 3", "max_steps: 100000"))
    pipeline = load_pipeline(files / "pipe.yaml")
    stage = pipeline.stages["fit"]
    payload = stage_payload(pipeline, stage, compute_keys(pipeline.stages, fingerprints(pipeline)),
                            store_for(pipeline))
    free = ray.available_resources().get("CPU", 0)  # before the run

    def train_groups():  # live groups holding the run's 3-CPU worker bundle
        return [pid for pid, pg in placement_group_table().items() if pg["state"] != "REMOVED"
                and any(b.get("CPU") == 3.0 for b in pg["bundles"].values())]

    @ray.remote(num_cpus=0)
    class Trial:  # stands in for a Tune trial actor: it owns the stage task
        def start(self, payload):
            self.ref = stage_task(stage).remote(payload, None)

    trial = Trial.remote()
    ray.get(trial.start.remote(payload))
    deadline = time.monotonic() + 120
    while not train_groups():
        assert time.monotonic() < deadline, "the training stage never reserved its workers"
        time.sleep(0.2)
    ray.kill(trial)  # as early as possible: before Ray Train's cleaner knows the group
    reaper = Reaper(every_s=1.0)
    deadline = time.monotonic() + 120
    while train_groups() or ray.available_resources().get("CPU", 0) < free:
        assert time.monotonic() < deadline, (
            f"the killed run kept its resources: groups {train_groups()}, "
            f"{ray.available_resources().get('CPU', 0)} CPUs free, {free} before it")
        reaper.maybe_reap()
        time.sleep(0.5)


SERVICE_PIPE = """
name: tune_service
stages:
  teacher: {workload: hub_model, params: {repo: TEACHER}}
  dft:
    workload: distill
    inputs: {teacher: teacher.model}
    resources: {num_workers: 1, cpus_per_worker: 2}
    params: {teacher: service, teacher_resources: {replicas: 1, cpus: 1}, train: [projector],
             model: {path: STUDENT}, data: {format: webdataset, paths: [DATA]},
             max_steps: 2, batch_size: 4, checkpoint_every: 0}
"""


@pytest.mark.timeout(420)
def test_tune_trials_share_one_teacher_service(ray_session, files):
    """`teacher: service` in a tune of a real training stage (Ray Train + DeepSpeed + Ray
    Data): the replica's CPU counts once, so on the session's 4 CPUs one trial (worker +
    data pipeline) runs at a time beside it; the tune holds the service between trials (one
    teacher load serves both) and frees it when it ends. The replica and the stage's worker
    take 3 of the 4 CPUs: its data pipeline needs the last one, so a trial must hold no CPU
    itself (with 0.1 CPU per trial the reads never started and the tune hung)."""
    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model
    from workloads.teacher.service.spec import SERVICE_PREFIX

    import ray

    data = build_tiny_data(files / "data", num_samples=16, vocab_size=320)
    paths = {}
    for name in ("teacher", "student"):
        paths[name.upper()] = save_model(*build_model({"preset": f"tiny-{name}"},
                                                      data["tokenizer"]), str(files / name))
    text = SERVICE_PIPE.replace("DATA", data["instruct"])
    for k, v in paths.items():
        text = text.replace(k, v)
    (files / "pipe.yaml").write_text(textwrap.dedent(text))
    (files / "tune.yaml").write_text(textwrap.dedent(TRAIN_TUNE).replace(
        "metric: loss", "metric: ce").replace("stage: fit", "stage: dft"))
    spec, pipeline = load_tune(str(files / "tune.yaml"))
    from orchestrator.tune_spec import default_concurrency

    assert default_concurrency(pipeline, "dft") == 1  # (4 CPUs - 1 replica) // (2 + 1)
    out = run_tune(spec, pipeline, str(files / "tune.yaml"))
    assert all(t["completed"] and not t["error"] for t in out.trials), out.trials
    finals = [json.loads(p.read_text())
              for p in (files / "home" / "artifacts" / "stages").glob("distill-*/metrics.json")]
    assert len(finals) == 2
    assert [f["teacher_service/loads"] for f in finals] == [1.0, 1.0], finals
    assert max(f["teacher_service/users_seen"] for f in finals) == 3  # trial, hold, trial
    deadline = time.monotonic() + 120  # the service ends itself a moment after the release
    while True:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(SERVICE_PREFIX)]
        if not names or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not names, f"the tune's end left teacher services running: {names}"
