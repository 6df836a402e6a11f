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
    """A port nothing listened on a moment ago (for a server that binds it itself: see
    ``start_ui``'s retry on a collision). For a port that must stay closed, ``reserved_port``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on return: nothing listens there


@contextlib.contextmanager
def reserved_port():
    """A port the OS picked, kept bound (never listening) by this process while the context
    lasts: a connection to it is refused, and no other process can take it meanwhile."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def start_ui(env, cwd, timeout=300, attempts=5, extra=()):
    """`mmkd ui` on a free port in its own process group, as a user starts it; returns the
    process and its base URL once the server answers (within ``timeout`` s). The port is
    free when chosen, but the server binds it itself: if another process took it meanwhile
    the UI exits with "address already in use", and it is started again on another port."""
    import time
    import urllib.request

    for attempt in range(attempts):
        port = closed_port()
        ui = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port",
                               str(port), *extra], env=env, cwd=cwd, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while True:
            if ui.poll() is not None:
                output = ui.stdout.read()
                if "address already in use" in output.lower() and attempt + 1 < attempts:
                    break  # a port collision: another port
                raise AssertionError(f"mmkd ui exited ({ui.returncode}) before answering:\n"
                                     f"{output}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                return ui, f"http://127.0.0.1:{port}"
            except OSError:
                if time.monotonic() > deadline:
                    stop_ui(ui)
                    raise AssertionError(f"mmkd ui did not answer on port {port} within "
                                         f"{timeout} s") from None
                time.sleep(0.5)
    raise AssertionError("unreachable")


def stop_group(proc) -> None:
    """SIGKILL the process group we started (only that one)."""
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_ui(ui) -> None:
    """SIGTERM, as a user stops it (it stops its server's process group), then its own group."""
    import signal

    if ui.poll() is None:
        ui.send_signal(signal.SIGTERM)
        try:
            ui.wait(60)
        except subprocess.TimeoutExpired:
            stop_group(ui)


@contextlib.contextmanager
def mlflow_ui(env, cwd, timeout=300):
    """``start_ui`` as a context: yields the base URL, then stops the UI (SIGTERM, then the
    group)."""
    ui, url = start_ui(env, cwd, timeout)
    try:
        yield url
    finally:
        stop_ui(ui)
