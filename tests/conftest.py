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
# as every mmkd stage task gets it (orchestrator/ray_setup.py), for the tests that start Ray
# Train themselves: Ray Train hands it from this driver to its controller
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


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


# ------------------------------------------------------------------------------- tiers
# Two tiers, assigned mechanically (no marker per test): a test is `slow` when it uses the Ray
# session (directly or through a fixture such as `cli_env`), lives in tests/e2e (CLI runs), or
# is in a module below that starts its own Ray cluster or lmms-eval; every other test is
# `fast`. scripts/test.sh runs the fast tier first (`-m "not slow"`), then the slow one.
SLOW_MODULES = {
    "test_cluster.py",       # starts a Ray head + worker of its own
    "test_lmms_backend.py",  # runs lmms-eval
}


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        path = item.path
        if ("ray_session" in getattr(item, "fixturenames", ()) or "e2e" in path.parts
                or path.name in SLOW_MODULES):
            item.add_marker(slow)
    # within one invocation too: the fast tests first, so a unit failure shows in minutes
    items.sort(key=lambda it: it.get_closest_marker("slow") is not None)


# ------------------------------------------------------------------------ no silent skips
# In CI (CI=true) a skipped test is a failure unless its reason holds on every CI machine: CI
# has no GPU. Anything else a test skips for (a missing package, a missing tool) is a broken
# install there, and must show.
CI_SKIP_REASONS = ("CUDA", "GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(word in str(reason) for word in CI_SKIP_REASONS):
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI: {reason}. A skip in CI is a failure unless its "
                           f"reason holds on every CI machine (no GPU); install what the test "
                           f"needs in scripts/install.sh or the `test` extra")
