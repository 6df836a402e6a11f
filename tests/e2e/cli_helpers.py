"""Running `mmkd` in a subprocess (env from the `cli_env` fixture in conftest.py)."""

from __future__ import annotations

import contextlib
import subprocess
import sys


def mmkd(args, env, cwd, timeout=300, check=False):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mmkd {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on return: nothing listens there


@contextlib.contextmanager
def mlflow_ui(env, cwd, timeout=120):
    """`mmkd ui` on a free port, as a user starts it; yields its base URL, then stops it (only
    the process group started here)."""
    import os
    import signal
    import time
    import urllib.request

    port = closed_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)],
                          env=env, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while True:
            assert ui.poll() is None, ui.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline, "mmkd ui never answered"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)
            try:
                ui.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)  # only the group we started
                ui.wait()
