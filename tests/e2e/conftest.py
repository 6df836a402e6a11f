"""e2e tests run `mmkd` in subprocesses attached to the test session's Ray."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def cli_env(ray_session, tmp_path):
    import ray

    env = {**os.environ, "MMKD_HOME": str(tmp_path / "home"),
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
