"""Submitting pipelines to a Ray cluster through the Ray Job Submission API.

Ray 2.60 protects the job API with token authentication. The token is read from where Ray keeps
it (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``) and
sent as a bearer header; a missing or wrong token is reported as one clear sentence.

No credentials travel with a job: its runtime_env and metadata are shown in plain text by the
dashboard, `ray job list` and Ray's logs. The cluster's nodes reach the object store with their
instance role (cluster.yaml); `--env` refuses secret-looking names (cli_cluster.job_env).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, Iterator

# Environment a submitted pipeline must see on the cluster: settings, never secrets.
_FORWARD = ("MLFLOW_TRACKING_URI", "MMKD_STORE", "MMKD_HOME", "HF_HUB_OFFLINE", "HF_HOME",
            "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "MMKD_SKIP_RESOURCE_CHECK")
_EXCLUDES = [".mmkd", ".git", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache",
             "*.egg-info", "benchmarks/results"]


class SubmitError(RuntimeError):
    """A user-facing problem talking to the cluster (address, token, job id)."""


def read_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if path.exists():
        return path.read_text().strip() or None
    return None


def _token_help(address: str) -> str:
    return (f"The Ray cluster at {address} uses token authentication. Copy the head node's "
            "token (~/.ray/auth_token there, or what `ray get-auth-token` prints on it) into "
            "RAY_AUTH_TOKEN or ~/.ray/auth_token on this machine and try again.")


def client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray lets RAY_API_SERVER_ADDRESS, then RAY_ADDRESS override the address it is given; here
    # the address the user named wins (mmkd sets the first for its own local Ray's workers, and
    # the second may name a local Ray for `mmkd run`).
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise SubmitError(_explain_auth(str(e), address, token)) from None
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({e}); check --address "
                          "(http://HEAD:8265) and that the cluster is up (`ray status` on it)") from None


def _explain_auth(text: str, address: str, token: str | None) -> str:
    if token is None or "Authentication required" in text:
        return f"no Ray auth token was sent. {_token_help(address)}"
    return f"the Ray auth token was rejected. {_token_help(address)}"


def _call(address: str, fn, *args, retry_s: float = 90.0, **kwargs):
    deadline = time.time() + retry_s
    while True:
        try:
            return _call_once(address, fn, *args, **kwargs)
        except RuntimeError as e:
            # A freshly started head answers 500 until its job agent is up: wait for it.
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def _call_once(address: str, fn, *args, **kwargs):
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError as e:
        raise SubmitError(_explain_auth(str(e), address, read_token())) from None
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise SubmitError(f"{e} (`mmkd jobs --address {address}` lists the jobs)") from None
        raise


def entrypoint(pipeline: str, overrides: list[str], extra: list[str] = ()) -> str:
    parts = ["python", "-m", "orchestrator.cli", "run", pipeline, "--plain"]
    for o in overrides:
        parts += ["--set", o]
    parts += list(extra)
    return " ".join(shlex.quote(p) for p in parts)


def submit(pipeline: str, address: str, overrides: list[str] = (), working_dir: str = ".",
           env: dict[str, str] | None = None, submission_id: str | None = None,
           only: list[str] = ()) -> str:
    """Upload ``working_dir`` (the project with the pipeline file) and run the pipeline there."""
    wd = Path(working_dir).resolve()
    path = Path(pipeline).resolve()
    try:
        rel = path.relative_to(wd)
    except ValueError:
        raise SubmitError(f"{pipeline} is not inside the working directory {wd}; run `mmkd "
                          "submit` from the project folder or pass --working-dir") from None
    env_vars = {k: os.environ[k] for k in _FORWARD if k in os.environ}
    env_vars.update(env or {})
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "env_vars": env_vars,
                                   "excludes": _EXCLUDES}
    c = client(address)
    extra = [a for stage in only for a in ("--only", stage)]
    return _call(address, c.submit_job, entrypoint=entrypoint(str(rel), list(overrides), extra),
                 runtime_env=runtime_env, submission_id=submission_id,
                 metadata={"mmkd.pipeline": str(rel)})


def list_jobs(address: str) -> list[Any]:
    c = client(address)
    return _call(address, c.list_jobs)


def status(address: str, job_id: str) -> Any:
    c = client(address)
    return _call(address, c.get_job_info, job_id)


def logs(address: str, job_id: str) -> str:
    c = client(address)
    return _call(address, c.get_job_logs, job_id)


def follow_logs(address: str, job_id: str, poll: float = 1.0) -> Iterator[str]:
    """Yield new log text until the job ends (polling; no websocket needed)."""
    seen = 0
    while True:
        text = logs(address, job_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if status(address, job_id).status.is_terminal():
            text = logs(address, job_id)
            if len(text) > seen:
                yield text[seen:]
            return
        time.sleep(poll)


def stop(address: str, job_id: str) -> bool:
    c = client(address)
    return _call(address, c.stop_job, job_id)


def wait(address: str, job_id: str, timeout: float = 600, poll: float = 2.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = status(address, job_id).status
        if st.is_terminal():
            return str(st)
        time.sleep(poll)
    raise SubmitError(f"job {job_id} still running after {timeout:.0f}s")
