"""Running `mmkd` in a subprocess (env from the `cli_env` fixture in conftest.py)."""

from __future__ import annotations

import subprocess
import sys


def mmkd(args, env, cwd, timeout=300, check=False):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mmkd {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc
