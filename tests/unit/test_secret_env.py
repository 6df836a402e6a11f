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


def test_stage_tasks_poll_their_ray_train_workers_often_unless_the_user_says_otherwise(
        monkeypatch):
    # Ray Train's controller reads the interval from its environment (default 2 s): mmkd's
    # shorter one saves ~4 s per Ray Train stage (benchmarks/train_stage_overhead.py)
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert forwarded_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    assert forwarded_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    # the preemption watcher: off on a local instance (tests/integration/test_train.py); a
    # user's choice reaches the stage task, where Ray Train's driver reads it
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert forwarded_env()["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


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


# -- secrets by value (#23 item 6) -------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI@bucket/x", "s3://***@bucket/x"),
    ("http://bob:hunter2@mlflow:5000/", "http://***@mlflow:5000/"),
    ("https://acct.blob.core.windows.net/c?sv=2022&sig=abc%2Bdef&se=2030",
     "https://acct.blob.core.windows.net/c?sv=2022&sig=***&se=2030"),
    ("s3://b/x?region=us-east-1&session_token=FQoGZX", "s3://b/x?region=us-east-1&session_token=***"),
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc==;EndpointSuffix=x",
     "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=***;EndpointSuffix=x"),
    ("token hf_abcdefghijklmnopqrstuvwx here", "token *** here"),
    ("s3://bucket/plain/path?region=eu", "s3://bucket/plain/path?region=eu"),
    ("/home/user/data.tar", "/home/user/data.tar"),
])
def test_redact_text_masks_credentials_by_value(text, want):
    from orchestrator.secret_env import redact_text

    assert redact_text(text) == want


def test_redact_masks_secret_keys_overrides_and_env_values(monkeypatch):
    from orchestrator.secret_env import redact

    monkeypatch.setenv("SENTRY_DSN", "https://k3y@o1.ingest.example/42")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "EnvSecretValue456")
    got = redact({"params": {"hf_token": "abcdefgh1234", "image_token": "<image>", "lr": 1e-3,
                             "note": "uses EnvSecretValue456"},
                  "overrides": ["stages.x.params.api_key=zzzzzzzz", "stages.x.params.lr=0.1"],
                  "mmkd.key": "0123456789abcdef"})
    assert got == {"params": {"hf_token": "***", "image_token": "<image>", "lr": 1e-3,
                              "note": "uses ***"},
                   "overrides": ["stages.x.params.api_key=***", "stages.x.params.lr=0.1"],
                   "mmkd.key": "0123456789abcdef"}


@pytest.mark.parametrize("name", ["AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS",
                                  "SENTRY_DSN", "PIP_INDEX_URL", "GITHUB_PAT", "GCP_SA_JSON"])
def test_names_that_hold_credentials_are_secret(name):
    assert looks_secret(name)


@pytest.mark.parametrize("name", ["MMKD_KEY", "STAGE_KEY", "CACHE_KEY_PARTS", "HF_HOME"])
def test_key_alone_is_not_a_secret(name):
    assert not looks_secret(name)

