"""A real two-node Ray cluster on 127.0.0.1 with token auth, an MLflow server, and `mmkd submit`.

The cluster is started with `ray start --block` in its own process groups and torn down by
killing exactly those groups (plus any process that carries our unique temp dir), never with
`ray stop`, which would stop other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): it is up
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError(url)


def _kill_group(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _sweep(marker: str) -> None:
    """Kill leftovers of *our* cluster: processes whose command line names our temp dir."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(marker in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="mmkdc-", dir="/tmp")
    gcs, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the test session's Ray, not this cluster
    env.pop("RAY_ADDRESS", None)
    logs = tmp_path_factory.mktemp("cluster_logs")
    common = ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]

    def own_ports() -> list[str]:
        # Not the defaults: another Ray on this machine (the test session's own) already holds
        # them, and a node whose dashboard agent cannot bind never accepts jobs.
        return [f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", *common,
         *own_ports()],
        env=env, start_new_session=True, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)
    procs = [head]
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_http(f"{address}/api/version", 120, head)
        worker = subprocess.Popen(
            ["ray", "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1", *common, *own_ports()],
            env=env, start_new_session=True, stdout=open(logs / "worker.log", "w"),
            stderr=subprocess.STDOUT)
        procs.append(worker)
        deadline = time.time() + 120
        while time.time() < deadline:
            out = subprocess.run(["ray", "status", f"--address=127.0.0.1:{gcs}"], env=env,
                                 capture_output=True, text=True)
            if out.stdout.count("node_") >= 2 or "3.0 CPU" in out.stdout or "0.0/3.0 CPU" in out.stdout:
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"second node never joined:\n{out.stdout}\n{out.stderr}")

        mlflow_port = free_port()
        mlflow_dir = tmp_path_factory.mktemp("mlflow_server")
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(mlflow_port), "--backend-store-uri", f"sqlite:///{mlflow_dir / 'm.db'}",
             "--artifacts-destination", (mlflow_dir / "artifacts").as_uri(), "--workers", "1"],
            start_new_session=True, stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT)
        procs.append(server)
        mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
        wait_http(f"{mlflow_uri}/health", 120, server)
        yield {"address": address, "token": token, "mlflow": mlflow_uri,
               "store": str(tmp_path_factory.mktemp("shared_store"))}
    finally:
        for p in reversed(procs):
            _kill_group(p)
        for p in procs:
            try:
                p.wait(3)  # `ray start --block` stops its node on SIGTERM; do not wait out a slow one
            except subprocess.TimeoutExpired:
                _kill_group(p, signal.SIGKILL)
        _sweep(temp_dir)


def mmkd(args, env, cwd, timeout=400):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_cluster_yaml_passes_rays_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    assert any("mlflow server" in c for c in config["head_start_ray_commands"])
    # nothing listens beyond the head: the dashboard and MLflow bind to 127.0.0.1 (SSH tunnels)
    starts = " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in starts
    assert "--dashboard-host=127.0.0.1" in starts and "mlflow server --host 127.0.0.1" in starts
    # the nodes reach the bucket with an instance role, not with keys in the environment
    for node in config["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]
    assert "AWS_SECRET" not in (ROOT / "cluster.yaml").read_text()


def test_submit_runs_pipeline_on_the_cluster_and_logs_to_mlflow_server(cluster, tmp_path,
                                                                       monkeypatch):
    """The default pipeline, reduced and cut after the teacher's pre-training: data generation,
    tokenizer and a Ray Train + DeepSpeed stage run as a job on the two-node cluster."""
    sets = ["stages.shapes.params.num_captions=64", "stages.shapes.params.num_instruct=64",
            "stages.shapes.params.num_eval=16", "stages.tokenizer.params.vocab_size=320",
            "stages.teacher_pt.params.max_steps=2", "stages.teacher_pt.params.batch_size=4",
            "stages.teacher_pt.params.checkpoint_every=0"]
    # credentials in the submitting shell must not travel with the job (its runtime_env is shown
    # in plain text by the dashboard); the job does not need them here
    fake_secrets = {"AWS_ACCESS_KEY_ID": "AKIAMMKDTESTONLY0000",
                    "AWS_SECRET_ACCESS_KEY": "mmkd-test-secret-access-key-0123456789",
                    "AWS_SESSION_TOKEN": "mmkd-test-session-token-0123456789"}
    env = {**os.environ, "RAY_AUTH_TOKEN": cluster["token"], "HOME": str(tmp_path),
           **fake_secrets}
    env.pop("RAY_ADDRESS", None)
    args = ["submit", "pipelines/llava_kd.yaml", "--only", "teacher_pt", "--address",
            cluster["address"], "--wait", "600",
            "--env", f"MLFLOW_TRACKING_URI={cluster['mlflow']}",
            "--env", f"MMKD_HOME={tmp_path / 'job_home'}",
            "--store", cluster["store"], "--job-id", "mmkd-test-job"]
    out = mmkd(args + [a for s in sets for a in ("--set", s)], env, ROOT, timeout=700)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCEEDED" in out.stdout

    out = mmkd(["jobs", "--address", cluster["address"]], env, ROOT)
    assert out.returncode == 0 and "mmkd-test-job" in out.stdout and "SUCCEEDED" in out.stdout
    out = mmkd(["logs", "mmkd-test-job", "--address", cluster["address"]], env, ROOT)
    assert "llava_kd" in out.stdout and "success" in out.stdout
    out = mmkd(["status", "mmkd-test-job", "--address", cluster["address"]], env, ROOT)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout
    out = mmkd(["stop", "mmkd-test-job", "--address", cluster["address"]], env, ROOT)
    assert out.returncode == 0 and "already finished" in out.stdout
    out = mmkd(["status", "no-such-job", "--address", cluster["address"]], env, ROOT)
    assert out.returncode == 2 and "mmkd jobs" in out.stderr and "Traceback" not in out.stderr

    # the job's runtime_env and metadata, read back through Ray's job API, hold no secret
    from ray.job_submission import JobSubmissionClient

    from orchestrator.secret_env import looks_secret

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # they would override the address
        monkeypatch.delenv(var, raising=False)
    jobs = JobSubmissionClient(cluster["address"],
                               headers={"Authorization": f"Bearer {cluster['token']}"})
    info = jobs.get_job_info("mmkd-test-job")
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == cluster["mlflow"]
    shown = json.dumps([info.runtime_env, info.metadata, info.entrypoint])
    assert not [k for k in fake_secrets if k in shown or fake_secrets[k] in shown], shown
    assert not [k for k in info.runtime_env["env_vars"] if looks_secret(k)], shown

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name("llava_kd")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags.get("mmkd.stage", "") for r in runs) == \
        ["", "shapes", "teacher_pt", "tokenizer"]
    assert all(r.info.status == "FINISHED" for r in runs)
    pt = next(r for r in runs if r.data.tags.get("mmkd.stage") == "teacher_pt")
    assert len(client.get_metric_history(pt.info.run_id, "loss")) >= 1
    assert list(Path(cluster["store"]).glob("stages/pretrain-*/_SUCCESS"))
    assert list(Path(cluster["store"]).glob("stages/pretrain-*/model/model.safetensors"))


def test_missing_or_wrong_token_gives_a_clear_error(cluster, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}  # no ~/.ray/auth_token there
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    out = mmkd(["jobs", "--address", cluster["address"]], env, tmp_path)
    assert out.returncode == 2
    assert "no Ray auth token was sent" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr
    assert "Traceback" not in out.stderr

    env["RAY_AUTH_TOKEN"] = "not-the-token"
    out = mmkd(["jobs", "--address", cluster["address"]], env, tmp_path)
    assert out.returncode == 2
    assert "token was rejected" in out.stderr and "Traceback" not in out.stderr
