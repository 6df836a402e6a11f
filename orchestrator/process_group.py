"""A child command (the MLflow UI server) in its own process group, ended with everything it
started when mmkd is interrupted or terminated."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

__all__ = ["run_in_own_group"]


def run_in_own_group(cmd: list[str], grace_s: float = 10.0) -> int:
    """Run ``cmd`` in its own process group and end that group — the MLflow server, its web
    workers and job runner — on SIGINT or SIGTERM, so that nothing outlives `mmkd ui`."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    stopping = []

    def stop(signum, _frame):
        stopping.append(signum)
        _signal_group(proc.pid, signal.SIGTERM)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _end_group(proc.pid, grace_s)
    if stopping:
        return 130 if stopping[0] == signal.SIGINT else 128 + stopping[0]
    return code


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end_group(pgid: int, grace_s: float) -> None:
    """SIGTERM what is left of the group, then SIGKILL it after ``grace_s``."""
    import time

    _signal_group(pgid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the group; its orphans may wait to be
    reaped by an init that never does, so `killpg(pgid, 0)` alone would not tell."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in entries:
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()  # state ppid pgrp ...
            if fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False
