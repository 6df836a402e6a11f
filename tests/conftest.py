"""Shared fixtures: one real local Ray instance per test session, in its own temp dir.

Never `ray stop`: that would stop other people's Ray on a shared machine. The instance started
here is shut down by `ray.shutdown()`, which ends only the processes this session started.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "300")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance shared by the whole test session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Short path: Ray's socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="mmkdray-", dir="/tmp")
    from orchestrator.ray_setup import start_local_ray

    # as `mmkd` starts Ray: with the dashboard Ray Train's placement-group cleaner needs
    start_local_ray(num_cpus=4, _temp_dir=temp_dir, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
