"""Waiting on a state, never on the clock: poll until something holds, with a generous deadline."""

from __future__ import annotations

from typing import Callable, TypeVar

from mmkd_test_plugins.gates import wait_until

T = TypeVar("T")


def wait_for(found: Callable[[], T], what: str | Callable[[], str], timeout_s: float = 120.0,
             poll_s: float = 0.1) -> T:
    """Poll ``found()`` every ``poll_s`` until it returns something truthy, and return that;
    after ``timeout_s``, fail naming what was awaited (``gates.wait_until``)."""
    return wait_until(what, found, timeout_s, poll_s)
