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


def start_ui(env, cwd, timeout=120):
    """`mmkd ui` on a free port in its own process group, as a user starts it; returns the
    process and its base URL once the server answers."""
    import time
    import urllib.request

    port = closed_port()
    ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", str(port)],
                          env=env, cwd=cwd, start_new_session=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while True:
        if ui.poll() is not None:
            raise AssertionError(ui.stdout.read())
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return ui, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline:
                stop_group(ui)
                raise AssertionError("mmkd ui never answered") from None
            time.sleep(0.5)


def stop_group(proc) -> None:
    """SIGKILL the process group we started (only that one)."""
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def mlflow_ui(env, cwd, timeout=120):
    """``start_ui`` as a context: yields the base URL, then stops the UI (SIGTERM, then the
    group)."""
    import signal

    ui, url = start_ui(env, cwd, timeout)
    try:
        yield url
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)
            try:
                ui.wait(60)
            except subprocess.TimeoutExpired:
                stop_group(ui)
