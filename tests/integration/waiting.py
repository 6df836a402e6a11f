"""Waiting on a state, never on the clock: poll until something holds, with a generous deadline."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(found: Callable[[], T], what: str | Callable[[], str], timeout_s: float = 120.0,
             poll_s: float = 0.1) -> T:
    """Poll ``found()`` every ``poll_s`` until it returns something truthy, and return that;
    after ``timeout_s``, fail naming what was awaited (``what``, or ``what()`` then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = found()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what() if callable(what) else what}")
        time.sleep(poll_s)
