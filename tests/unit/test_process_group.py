"""`mmkd ui`'s child command in its own process group (``orchestrator.process_group``): SIGINT
and SIGTERM to mmkd end everything the child started, grandchildren included, and mmkd exits
with the shell's code for the signal. A cheap process tree stands in for the MLflow server here;
tests/e2e/test_cli_contract.py stops a real `mmkd ui` (its server and workers) with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from mmkd_test_plugins.gates import pid_gone, wait_until

# the "server": a process that starts a worker of its own and waits; both print their pids
TREE = ("import subprocess, sys, time; "
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "print(w.pid, flush=True); time.sleep(600)")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + 15)])
def test_a_signal_ends_the_child_group_and_sets_the_exit_code(tmp_path, sig, code):
    out = tmp_path / "worker.pid"
    runner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from orchestrator.process_group import run_in_own_group; "
         f"sys.exit(run_in_own_group([sys.executable, '-c', {TREE!r}], grace_s=10))"],
        stdout=out.open("w"), start_new_session=True)
    worker = None
    try:
        worker = wait_until("the child command's worker to start",
                            lambda: int(t) if (t := out.read_text().strip()) else None,
                            timeout=60, interval=0.05)
        runner.send_signal(sig)
        assert runner.wait(60) == code
        wait_until("the worker the child started to exit", lambda: pid_gone(worker), timeout=30)
    finally:  # only what this test started, by id
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        if worker is not None and not pid_gone(worker):
            os.kill(worker, signal.SIGKILL)
