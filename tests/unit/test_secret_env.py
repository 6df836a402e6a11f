"""Secrets stay out of Ray's metadata: what counts as one, what stage tasks and jobs get."""

from __future__ import annotations

import pytest

from orchestrator.cli_cluster import job_env
from orchestrator.console import explain_store_error
from orchestrator.ray_setup import forwarded_env
from orchestrator.secret_env import looks_secret
from orchestrator.submit import SubmitError


@pytest.mark.parametrize("name,secret", [
    ("AWS_ACCESS_KEY_ID", True), ("AWS_SECRET_ACCESS_KEY", True), ("AWS_SESSION_TOKEN", True),
    ("HF_TOKEN", True), ("MLFLOW_TRACKING_PASSWORD", True), ("OPENAI_API_KEY", True),
    ("DB_SECRETKEY", True), ("RAY_AUTH_TOKEN", True),
    ("AWS_DEFAULT_REGION", False), ("AWS_ENDPOINT_URL", False), ("AWS_PROFILE", False),
    ("AWS_SHARED_CREDENTIALS_FILE", False), ("RAY_AUTH_TOKEN_PATH", False),
    ("TOKENIZERS_PARALLELISM", False), ("MLFLOW_TRACKING_URI", False), ("MMKD_STORE", False),
])
def test_looks_secret(name, secret):
    assert looks_secret(name) is secret


def test_stage_tasks_get_settings_but_no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0k3n")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setenv("MMKD_STORE", "s3://bucket/store")
    env = forwarded_env()
    assert env["AWS_DEFAULT_REGION"] == "us-west-2" and env["MMKD_STORE"] == "s3://bucket/store"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert not {"AKIAEXAMPLE", "s3cr3t", "t0k3n"} & set(env.values())


def test_submit_env_refuses_secrets_unless_allowed():
    assert job_env(["MLFLOW_TRACKING_URI=http://127.0.0.1:5000"], False) == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    with pytest.raises(SubmitError, match="AWS_SESSION_TOKEN.*dashboard.*--allow-secret-env"):
        job_env(["A=1", "AWS_SESSION_TOKEN=x"], False)
    assert job_env(["AWS_SESSION_TOKEN=x=y"], True) == {"AWS_SESSION_TOKEN": "x=y"}
    with pytest.raises(SubmitError, match="NAME=VALUE"):
        job_env(["JUST_A_NAME"], False)


def test_store_errors_become_one_sentence():
    e = OSError("When resolving region for bucket 'mmkd-data': AWS Error NETWORK_CONNECTION "
                "during HeadBucket operation: curlCode: 6, Could not resolve hostname; Details: "
                "Could not resolve host: mmkd-data.s3.us-east-1.amazonaws.com")
    text = explain_store_error(e)
    assert text.startswith("could not reach s3://mmkd-data: Could not resolve host")
    assert "--offline" in text and "\n" not in text
    assert explain_store_error(OSError("disk full")) is None
    assert explain_store_error(ValueError("AWS Error")) is None
