"""A real two-node Ray cluster on 127.0.0.1 with token auth, an MLflow server, and `mmkd submit`.

The cluster is started with `ray start --block` in its own process groups and torn down by
killing exactly those groups (plus any process that carries our unique temp dir), never with
`ray stop`, which would stop other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mmkd_test_plugins.gates import DEADLINE_S, wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 2 * DEADLINE_S,
              proc: subprocess.Popen | None = None) -> None:
    """Until ``url`` answers (any HTTP status: it is up); at once if ``proc`` exited. The
    deadline only bounds a hang: a node starting on a loaded machine takes what it takes."""

    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
        except urllib.error.HTTPError:
            return True  # it answers (401 without a token)
        except Exception:  # noqa: BLE001 - not up yet
            return False
        return True

    wait_until(f"{url} to answer", up, timeout=timeout, interval=0.5)


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


def _file_commands() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _shell(cmd: str, env: dict, log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", cmd], env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, **kw)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """cluster.yaml's own commands, read from the file, run on 127.0.0.1 with a fresh HOME per
    node: the token setup (AWS Secrets Manager served by moto), the head's and the worker's
    `ray start` and the supervised MLflow server. What differs from a cloud node: ports (another
    Ray on this machine holds the defaults), `--block` (so the test owns the processes), and the
    MLflow artifact root (a local folder instead of the bucket). `ray stop` and the pip installs
    are not run (the first would stop other people's Ray; this machine has mmkd installed)."""
    from moto_server import moto_s3

    config = _file_commands()
    base = tmp_path_factory.mktemp("nodes")
    temp_dir = tempfile.mkdtemp(prefix="mmkdc-", dir="/tmp")
    logs = tmp_path_factory.mktemp("cluster_logs")
    procs: list[subprocess.Popen] = []
    with moto_s3(base) as s3_uri:
        endpoint = s3_uri.split("endpoint_override=")[1].split("&")[0]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
                            "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(AWS_ENDPOINT_URL=f"http://{endpoint}", AWS_DEFAULT_REGION="us-west-2")
        homes = {n: base / n for n in ("head", "worker", "laptop")}
        for home in homes.values():
            home.mkdir()
        node_env = {n: {**env, "HOME": str(h)} for n, h in homes.items()}

        def setup(node: str, commands: list[str]) -> None:
            for cmd in commands:
                if cmd.startswith("mmkd "):  # pip and ~/.bashrc lines: done by this install
                    run = subprocess.run(["bash", "-c", cmd], env=node_env[node],
                                         capture_output=True, text=True, timeout=300)
                    assert run.returncode == 0, f"{node}: {cmd}\n{run.stdout}{run.stderr}"

        setup("head", config["head_setup_commands"])
        setup("worker", config["worker_setup_commands"])
        token = (homes["head"] / ".ray" / "auth_token").read_text()
        assert len(token) == 64 and (homes["worker"] / ".ray" / "auth_token").read_text() == token
        assert (homes["head"] / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600

        gcs, dash = free_port(), free_port()
        common = f" --block --node-ip-address=127.0.0.1 --temp-dir={temp_dir}"

        def own_ports() -> str:
            return (f" --dashboard-agent-listen-port={free_port()}"
                    f" --dashboard-agent-grpc-port={free_port()}"
                    f" --metrics-export-port={free_port()} --runtime-env-agent-port={free_port()}")

        (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
        head_start = (head_start.replace("--port=6379", f"--port={gcs}")
                      .replace("--object-manager-port=8076", f"--object-manager-port={free_port()}")
                      .replace("--autoscaling-config=~/ray_bootstrap_config.yaml", "")
                      + f" --dashboard-port={dash} --include-dashboard=true --num-cpus=2"
                      + common + own_ports())
        try:
            procs.append(_shell(head_start, node_env["head"], logs / "head.log"))
            address = f"http://127.0.0.1:{dash}"
            wait_http(f"{address}/api/version", proc=procs[-1])
            (worker_start,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
            worker_start = (worker_start.replace("$RAY_HEAD_IP:6379", f"127.0.0.1:{gcs}")
                            .replace("--object-manager-port=8076",
                                     f"--object-manager-port={free_port()}")
                            + " --num-cpus=1" + common + own_ports())
            procs.append(_shell(worker_start, node_env["worker"], logs / "worker.log"))
            status_env = {**node_env["head"], "RAY_AUTH_MODE": "token"}
            last = {}

            def joined() -> bool:
                for node, proc in zip(("head", "worker"), procs):
                    if proc.poll() is not None:
                        raise RuntimeError(f"the {node} node exited ({proc.returncode}); its "
                                           f"log: {logs / (node + '.log')}")
                out = subprocess.run(["ray", "status", f"--address=127.0.0.1:{gcs}"],
                                     env=status_env, capture_output=True, text=True)
                last["out"] = out.stdout + out.stderr
                return "3.0 CPU" in out.stdout

            wait_until(lambda: f"the second node to join:\n{last.get('out', '')}", joined,
                       timeout=2 * DEADLINE_S, interval=1.0)

            (mlflow_start,) = [c for c in config["head_start_ray_commands"] if "mlflow" in c]
            mlflow_port = free_port()
            artifacts = (base / "mlflow_artifacts").as_uri()
            mlflow_start = (mlflow_start.removeprefix("nohup ").split(" > /dev/null")[0]
                            .replace("--port 5000", f"--port {mlflow_port}")
                            .replace("s3://mmkd-artifacts/mlflow", artifacts)
                            + " --workers 1")
            procs.append(_shell(mlflow_start, node_env["head"], logs / "supervisor.log"))
            mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
            wait_http(f"{mlflow_uri}/health", proc=procs[-1])
            yield {"address": address, "token": token, "mlflow": mlflow_uri,
                   "supervisor": procs[-1], "mlflow_log": homes["head"] / "mlflow.log",
                   "store": str(tmp_path_factory.mktemp("shared_store")),
                   "laptop_env": node_env["laptop"]}
        finally:
            for p in reversed(procs):
                _kill_group(p)
            for p in procs:
                try:
                    p.wait(3)  # `ray start --block` stops its node on SIGTERM
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
    # a group of our own, not Ray's default one (which opens SSH to 0.0.0.0/0)
    assert config["provider"]["security_group"]["GroupName"] == "mmkd-cluster"
    # every node gets the token before `ray start`; the head makes it
    assert any("mmkd cluster token" in c and "--create" in c for c in config["head_setup_commands"])
    assert any("mmkd cluster token" in c for c in config["worker_setup_commands"])
    assert any("mmkd cluster supervise" in c and "mlflow server" in c
               for c in config["head_start_ray_commands"])


def test_security_group_allows_ssh_from_one_network_and_traffic_inside(tmp_path, monkeypatch):
    """`mmkd cluster security-group` on moto's EC2: SSH from the CIDR only, all protocols from
    the group itself; run again with another CIDR, the old rule is gone."""
    import boto3
    from moto_server import moto_s3

    from orchestrator.cluster_setup import ensure_security_group

    with moto_s3(tmp_path) as uri:
        endpoint = uri.split("endpoint_override=")[1].split("&")[0]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
        ec2 = boto3.session.Session().client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        gid = ensure_security_group("203.0.113.7/32", vpc_id=vpc)
        assert ensure_security_group("198.51.100.0/24", vpc_id=vpc) == gid
        (group,) = ec2.describe_security_groups(GroupIds=[gid])["SecurityGroups"]
        rules = group["IpPermissions"]
        ssh = [r for r in rules if r.get("FromPort") == 22]
        assert [ip["CidrIp"] for r in ssh for ip in r["IpRanges"]] == ["198.51.100.0/24"]
        inside = [r for r in rules if r["IpProtocol"] == "-1"]
        assert [p["GroupId"] for r in inside for p in r["UserIdGroupPairs"]] == [gid]
        assert not [ip for r in rules for ip in r.get("IpRanges", [])
                    if ip["CidrIp"] == "0.0.0.0/0"]
        with pytest.raises(ValueError):
            ensure_security_group("not-a-cidr", vpc_id=vpc)


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


def test_a_laptop_fetches_the_token_and_mlflow_comes_back_after_a_crash(cluster):
    """`mmkd cluster token` on a laptop with the same AWS access writes the cluster's token; the
    supervised MLflow server, killed, is started again and answers."""
    import psutil

    env = cluster["laptop_env"]
    run = subprocess.run([sys.executable, "-m", "orchestrator.cli", "cluster", "token"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (Path(env["HOME"]) / ".ray" / "auth_token").read_text() == cluster["token"]

    supervisor = psutil.Process(cluster["supervisor"].pid)
    servers = [p for p in supervisor.children(recursive=True) if "mlflow" in " ".join(p.cmdline())]
    assert servers, "no MLflow server under the supervisor"
    first = min(servers, key=lambda p: p.create_time())
    first.kill()
    first.wait(30)
    wait_until(lambda: f"the supervisor to restart MLflow:\n"
                       f"{cluster['mlflow_log'].read_text()[-2000:]}",
               lambda: "start 2:" in cluster["mlflow_log"].read_text(), interval=0.5)
    wait_http(f"{cluster['mlflow']}/health")
    assert supervisor.is_running()


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
