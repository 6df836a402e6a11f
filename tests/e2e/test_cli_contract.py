"""The CLI contract: every command the README shows exits 0 on tiny inputs and, on a typical
mistake, 2 (or 1 for a failed stage) with one paragraph and never a traceback.

The cluster commands' successes need a cluster: tests/integration/test_cluster.py has them. Here
they meet an address where nothing listens, and `submit` a secret-looking `--env`.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import pytest

from cli_helpers import mmkd, reserved_port, start_ui, stop_group
from mmkd_test_plugins.gates import wait_until

LONG = "a_stage_name_longer_than_twelve_characters"
GOOD = f"""
name: contract
stages:
  {LONG}: {{workload: noop, params: {{value: 1}}}}
  b: {{workload: noop, inputs: {{x: {LONG}.result}}}}
"""
FAILING = """
name: contract_fails
stages:
  a: {workload: noop, params: {value: 2}}
  b: {workload: fail, inputs: {x: a.result}}
"""
BAD_REF = "name: bad\nstages:\n  a: {workload: noop, inputs: {x: nowhere.result}}\n"
# an object store where nothing listens: what `validate` meets without network
UNREACHABLE_S3 = """
name: s3data
stages:
  pt:
    workload: pretrain
    params:
      model: {preset: tiny-student}
      data:
        format: webdataset
        paths: "s3://nobucket/shards?endpoint_override=127.0.0.1:PORT&scheme=http"
"""
TUNE = """
pipeline: tune_pipe.yaml
stage: fit
space:
  lr: {grid: [0.1, 0.3]}
metric: loss
mode: min
num_samples: 1
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
smooth: 1
"""
TUNE_PIPE = """
name: tune_contract
stages:
  fit: {workload: quadratic, params: {steps: 3, step_seconds: 0}}
"""


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    """Pipeline files, an env attached to the session's Ray, and one finished run."""
    import ray

    root = tmp_path_factory.mktemp("contract")
    env = {**os.environ, "MMKD_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_DASHBOARD_ADDRESS", None)
    # two ports that stay closed for the whole module: bound here, never listening
    with reserved_port() as port, reserved_port() as nowhere:
        files = {"good.yaml": GOOD, "failing.yaml": FAILING, "bad.yaml": BAD_REF,
                 "s3data.yaml": UNREACHABLE_S3.replace("PORT", str(port)), "tune.yaml": TUNE,
                 "tune_pipe.yaml": TUNE_PIPE, "bad_tune.yaml": TUNE.replace("grid", "gird")}
        for name, text in files.items():
            (root / name).write_text(textwrap.dedent(text))
        out = mmkd(["run", "good.yaml"], env, root, check=True)
        run_id = json.loads(next((root / "home" / "runs").glob("*/run.json")).read_text())[
            "run_id"]
        yield {"root": root, "env": env, "run": run_id, "first_run": out,
               "nowhere": f"http://127.0.0.1:{nowhere}"}


# (command line, exit code, text the output must contain); RUN, NOWHERE, RELOG_DB are filled in
CASES = [
    (["data", "shapes", "--out", "shapes", "--num-captions", "8", "--num-instruct", "8",
      "--num-eval", "4", "--shard-size", "8"], 0, "shapes/eval_samples"),
    (["data", "shapes", "--out", "shapes2", "--num-captions", "-3"], 2, "num_captions"),
    (["data", "shapes"], 2, "--out"),
    (["validate", "good.yaml"], 0, "2 stage(s)"),
    (["validate", "bad.yaml"], 2, "no stage 'nowhere'"),
    (["validate", "missing.yaml"], 2, "missing.yaml"),
    (["validate", "s3data.yaml"], 2, "use --offline"),
    (["validate", "s3data.yaml", "--offline"], 0, "ok"),
    (["plan", "good.yaml"], 0, LONG),
    (["plan", "good.yaml", "--force", "nosuchstage"], 2, "nosuchstage"),
    (["plan", "good.yaml", "--set", "stages.nosuch.params.x=1"], 2, "nosuch"),
    (["run", "failing.yaml"], 1, "this stage fails on purpose"),
    (["run", "bad.yaml"], 2, "no stage 'nowhere'"),
    # a teacher service that leaves the data pipeline no CPU fails before any stage runs
    (["run", "LLAVA_KD", "--set", "stages.student_dft.params.teacher=service", "--set",
      "stages.student_dft.params.teacher_resources={replicas: 4}"], 1,
     "`teacher_resources`"),
    (["runs"], 0, "contract"),
    (["runs", "--limit", "many"], 2, "--limit"),
    (["show", "RUN"], 0, LONG),
    (["show", "run-nosuchrun"], 2, "mmkd runs"),
    (["workloads"], 0, "noop"),
    (["workloads", "extra"], 2, "unrecognized"),
    (["relog", "RUN", "--uri", "RELOG_DB"], 0, "re-logged"),
    (["relog", "run-nosuchrun"], 2, "mmkd runs"),
    (["tune", "tune.yaml"], 0, "best"),
    (["tune", "bad_tune.yaml"], 2, "invalid tune spec"),
    (["ui", "--port", "notaport"], 2, "--port"),
    (["ui", "--workers", "0"], 2, "--workers: '0': give a whole number, 1 or more"),
    (["submit", "good.yaml", "--address", "NOWHERE"], 2, "cannot reach the Ray dashboard"),
    (["submit", "good.yaml", "--address", "NOWHERE", "--env", "AWS_SECRET_ACCESS_KEY=x"], 2,
     "--allow-secret-env"),
    (["submit", "good.yaml", "--address", "NOWHERE", "--env", "NO_EQUALS_SIGN"], 2, "NAME=VALUE"),
    (["jobs", "--address", "NOWHERE"], 2, "cannot reach the Ray dashboard"),
    (["status", "somejob", "--address", "NOWHERE"], 2, "cannot reach the Ray dashboard"),
    (["logs", "somejob", "--address", "NOWHERE"], 2, "cannot reach the Ray dashboard"),
    (["stop", "somejob", "--address", "NOWHERE"], 2, "cannot reach the Ray dashboard"),
]


@pytest.mark.parametrize("args,code,expected", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_command_exit_code_and_one_paragraph(world, args, code, expected):
    fill = {"RUN": world["run"], "NOWHERE": world["nowhere"],
            "RELOG_DB": f"sqlite:///{world['root'] / 'relogged.db'}",
            "LLAVA_KD": str(Path(__file__).resolve().parents[2] / "pipelines" / "llava_kd.yaml")}
    args = [fill.get(a, a) for a in args]
    out = mmkd(args, world["env"], world["root"], timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == code, f"mmkd {args}: {out.returncode}\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    assert expected in text, text[-4000:]
    # Ray's own output (Tune's configuration box, the workers' lines) stays in output.log
    assert "Configuration for experiment" not in text and "pid=" not in text, text[-4000:]
    if code:
        # one paragraph: what went wrong and what to do, not pages of output
        assert len(out.stderr.strip().splitlines()) <= 25, out.stderr


def test_plan_piped_keeps_every_stage_name_whole(world):
    out = mmkd(["plan", "good.yaml"], world["env"], world["root"], check=True)
    assert LONG in out.stdout and "…" not in out.stdout, out.stdout


def test_run_without_a_tty_prints_stage_events_and_keeps_ray_in_a_file(world):
    first = world["first_run"]
    lines = first.stderr.strip().splitlines()
    assert "Traceback" not in first.stdout + first.stderr
    log_line = next(line for line in lines if "output.log" in line)
    path = Path(log_line.split(": ", 1)[1].split(" (", 1)[0])
    assert path.exists() and path.parent.name == world["run"]
    # one line per stage event (pending, running, done for each of 2 stages) plus the path
    events = [line for line in lines if line.startswith("[mmkd]")]
    assert len(events) == 6, first.stderr
    assert all(line.startswith("[mmkd]") or "output.log" in line for line in lines), first.stderr
    assert f"[mmkd] {LONG} done" in first.stderr
    assert "success" in first.stdout

    again = mmkd(["run", "good.yaml", "--verbose"], world["env"], world["root"], check=True)
    assert "output.log" not in again.stderr and "2 cached" in again.stdout


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid``, by walking /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stat(pid: int) -> list[str] | None:
    """state, ppid, pgrp, ... of ``pid``; None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Running, not a zombie left for an init that does not reap (as in containers)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _alive_in_groups(groups: set[int]) -> list[int]:
    """Live processes of these process groups, wherever they were reparented to."""
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and _alive(int(e)) and int(_stat(int(e))[2]) in groups]


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _server_tree(ui_pid: int) -> list[int] | None:
    """Every process under ``mmkd ui`` once its MLflow server runs its HTTP server (uvicorn or
    gunicorn, in a process group of its own); None before. (MLflow's job runner, where it has
    one, is started right after the HTTP server, in the same process group: a process it
    starts later is still found by its group.)"""
    started = _descendants(ui_pid)
    servers = [p for p in started
               if {"uvicorn", "gunicorn"} & {os.path.basename(a) for a in _argv(p)[:3]}]
    return started if servers else None


# Ctrl-C, as a user stops it; SIGTERM takes the same handler (tests/unit/test_process_group.py
# sends both to the same code over a cheap process tree)
@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_ui_stops_every_process_it_started(world, sig):
    # one server process (the default; with --workers 2 the UI never answered beside two CPU
    # burners: uvicorn's supervisor kills a worker that misses its 5 s health ping, as a
    # worker still importing MLflow's app does there): mlflow ui, its HTTP server and job
    # runner, grandchildren in another process group
    ui, _ = start_ui(world["env"], world["root"])
    try:
        # the MLflow server's process tree: wait for it, not for a guessed time
        started = wait_until("`mmkd ui`'s MLflow server processes",
                             lambda: _server_tree(ui.pid))
        assert len(started) >= 2, started
        groups = {int(_stat(p)[2]) for p in started if _stat(p)} - {ui.pid}
        ui.send_signal(sig)
        ui.wait(180)
        try:
            wait_until("every process `mmkd ui` started to exit",
                       lambda: not [p for p in started if _alive(p)]
                       and not _alive_in_groups(groups))
        except AssertionError:
            pass  # the asserts below say which processes outlived it
        assert not [p for p in started if _alive(p)], "processes outlived `mmkd ui`"
        assert not _alive_in_groups(groups), "processes of its server outlived `mmkd ui`"
        output = ui.stdout.read()
        assert "Traceback" not in output, output
    finally:
        stop_group(ui)


def test_an_unexpected_error_is_one_paragraph_with_its_traceback_in_a_file(tmp_path, monkeypatch):
    from orchestrator.cli import explain

    monkeypatch.setenv("MMKD_HOME", str(tmp_path))
    try:
        {}["missing"]
    except KeyError as e:
        code, text = explain(e)
    assert code == 1 and text.startswith("internal error: KeyError") and "\n" not in text
    log = next((tmp_path / "logs").glob("mmkd-error-*.log"))
    assert str(log) in text and "Traceback" in log.read_text()
