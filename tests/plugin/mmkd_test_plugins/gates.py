"""Waiting on states instead of the clock, for tests that act on a running workload.

- ``wait_until(what, predicate)``: poll a state (a file, a process count, an actor's answer)
  until it holds, with a generous deadline and a failure that names what was awaited.
- ``Gate``: a marker-file gate. A workload calls ``gate.hold(...)`` at a known point (after a
  given step); it leaves a ``held/`` marker (rank, pid, step) and waits until the test calls
  ``gate.release()``. A test that must kill a run mid-training waits for the markers (and for
  whatever else it needs, e.g. a registered checkpoint), kills, and only then releases: the run
  cannot finish before the kill, however slow or fast the machine.
- ``GatedStageContext``: a ``StageContext`` whose ``report`` holds at a gate after a given step
  (for stages whose loss a test cannot swap, such as ``distill``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestrator.plugin import StageContext

T = TypeVar("T")

DEADLINE_S = 180.0


def wait_until(what: str | Callable[[], str], predicate: Callable[[], T],
               timeout: float = DEADLINE_S, interval: float = 0.2) -> T:
    """``predicate()``'s first truthy value, polled every ``interval`` s; AssertionError naming
    ``what`` (or ``what()``, computed then) after ``timeout`` s. ``predicate`` may raise to fail
    at once (a process that died). The one poll loop of the tests and the test workloads."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            shown = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {shown}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie left for an init that does not reap counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Gate:
    """A folder holding ``held/<who>.<pid>.json`` markers and, once released, ``release``."""

    def __init__(self, folder: str | os.PathLike, hold_timeout_s: float = 900.0):
        self.folder = str(folder)
        self.hold_timeout_s = hold_timeout_s

    @property
    def _release(self) -> str:
        return os.path.join(self.folder, "release")

    @property
    def _held(self) -> str:
        return os.path.join(self.folder, "held")

    # -- the workload's side --------------------------------------------------------------
    def hold(self, who: str, **info: Any) -> None:
        """Leave a marker and wait until the test releases the gate (at once if it already
        has). Raises after ``hold_timeout_s``, so a test that never releases cannot hang."""
        if self.released():
            return
        os.makedirs(self._held, exist_ok=True)
        marker = os.path.join(self._held, f"{who}.{os.getpid()}.json")
        with open(marker + ".tmp", "w") as f:
            json.dump({"who": who, "pid": os.getpid(), **info}, f)
        os.replace(marker + ".tmp", marker)  # whole or absent
        deadline = time.monotonic() + self.hold_timeout_s
        while not self.released():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {self.folder}: not released within "
                                   f"{self.hold_timeout_s:.0f} s")
            time.sleep(0.1)

    # -- the test's side ------------------------------------------------------------------
    def held(self) -> list[dict[str, Any]]:
        """The markers left so far (one per holding process)."""
        try:
            names = sorted(n for n in os.listdir(self._held) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                with open(os.path.join(self._held, name)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
        return out

    def released(self) -> bool:
        return os.path.exists(self._release)

    def release(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        open(self._release, "w").close()

    def close(self) -> None:
        """Back to holding: no release, no markers."""
        if self.released():
            os.unlink(self._release)
        for name in os.listdir(self._held) if os.path.isdir(self._held) else []:
            os.unlink(os.path.join(self._held, name))


@dataclass
class GatedStageContext(StageContext):
    """``report`` holds at ``Gate(gate_dir)`` once the step ``hold_after_step`` is reported
    (by rank 0, which is the rank that reports)."""

    gate_dir: str = ""
    hold_after_step: int = 0

    def report(self, metrics: dict[str, float], step: int | None = None,
               total_steps: int | None = None) -> None:
        super().report(metrics, step=step, total_steps=total_steps)
        if self.gate_dir and step == self.hold_after_step:
            Gate(self.gate_dir).hold("report", step=step)
