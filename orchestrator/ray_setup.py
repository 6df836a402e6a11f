"""Where stages run: connect to a Ray cluster (``RAY_ADDRESS``) or start a local one, and the
environment every stage task carries from the driver."""

from __future__ import annotations

import os
from typing import Any

from orchestrator.artifact_store import mmkd_home

# How often a Ray Train controller polls its workers (Ray's default: 2 s). The controller sees
# that training ended (or failed) only at a poll, so the default leaves every Ray Train stage
# idle for up to a poll interval at each state change; a poll is one small call per worker.
# benchmarks/train_stage_overhead.py measures both values side by side. A value the user sets
# is kept.
TRAIN_POLL_S = "0.5"
# Ray Train starts a preemption-watcher actor per run (a new process, ~1 s of a core, on every
# stage's start-up path) to react to a cluster draining a node. A local instance that mmkd
# starts itself has no node to drain, so there it is off (set before ray.init: every Ray process
# inherits it); a cluster (RAY_ADDRESS) keeps Ray's default, and a value the user sets is kept
# and forwarded. benchmarks/train_stage_overhead.py measures it.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Environment a stage process needs to see what the driver sees (a cluster's workers don't
# inherit the driver's shell).
_FORWARD_ENV = ("MLFLOW_TRACKING_URI", "MMKD_HOME", "DS_ACCELERATOR", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "RAY_TRAIN_COLLECTIVE_TIMEOUT_S", "TOKENIZERS_PARALLELISM",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", PREEMPTION_WATCHER_ENV)


def forwarded_env() -> dict[str, str]:
    """The driver's settings a stage process must see — never its secrets: a task's runtime_env
    is shown in plain text by Ray's dashboard and logs. Stage tasks read the store's credentials
    on their node (the raylet's environment, ~/.aws, an instance role: secret_env.py)."""
    from orchestrator.console import RAY_OUTPUT_ENV
    from orchestrator.secret_env import contains_secret, looks_secret

    env = {k: v for k, v in os.environ.items()
           if (k in _FORWARD_ENV or k.startswith(("AWS_", "MMKD_"))) and not looks_secret(k)
           and k != RAY_OUTPUT_ENV and not contains_secret(v)}
    env.setdefault("MMKD_HOME", str(mmkd_home()))
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    from orchestrator.plugin import plugin_env

    env.update(plugin_env())  # MMKD_PLUGINS modules importable in every stage process
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS"):  # `mmkd run` without --verbose
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"]
    return env


def ensure_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # No runtime_env here: every stage task carries the driver's environment itself
    # (`stage_task`), which also works when Ray was started by someone else or inside a job.
    address = address or os.environ.get("RAY_ADDRESS")
    from orchestrator.console import after_import

    after_import()  # quiet runs: Ray's import gave its logger a console handler (init notices)
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        start_local_ray(configure_logging=False)
    from orchestrator.console import divert_worker_output

    divert_worker_output()  # workers' output to the run's output.log unless `--verbose`


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init`` of a new local instance, with its dashboard (the state API): Ray Train's
    PlacementGroupCleaner asks it whether a run's controller is still alive, and without it
    never frees the placement group of a run whose owner was killed — a Tune trial stopped by
    ASHA, say — so the next trial waits forever for CPUs (seen). A free port: another local
    Ray may hold 8265. RAY_API_SERVER_ADDRESS, set before Ray starts so its workers inherit it,
    points that state-API client at this instance even when the host runs another Ray. No
    preemption watcher on a local instance (``PREEMPTION_WATCHER_ENV``)."""
    import ray

    port = free_port()
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=True, dashboard_port=port, **init_kwargs)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
