"""Where a results file's numbers came from: the machine, its load, the library versions and
the commit of the mmkd checkout (with a flag for uncommitted changes). Every benchmark results
JSON and every `evaluate` results.json records ``environment()``.

Versions are read from the installed packages' metadata, so nothing heavy is imported.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the mmkd checkout (editable install)
LIBRARIES = ("torch", "transformers", "ray", "deepspeed", "mlflow", "tokenizers", "numpy",
             "pyarrow")


def environment() -> dict:
    """Machine, load average, Python and library versions, git commit + dirty flag, time."""
    return {
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(), "memory_gib": _memory_gib(), "gpu": _gpu()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "git": git_state(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def git_state(root: Path = ROOT) -> dict:
    """``{"commit", "dirty"}`` of the mmkd checkout (None outside git, e.g. a wheel install)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu() -> str | None:
    # only when torch is already imported: importing it just to ask costs seconds
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None
