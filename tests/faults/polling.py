"""Waiting on a real process's state: polls with deadlines, never sleeps standing in for state."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

QUIET = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # a shared box: one thread per neuron


def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `check` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout:.0f}s")
        time.sleep(0.05)  # polling interval of a check with a deadline


def status_is(url: str, status: int = 200) -> bool:
    """GET url answers `status` (an unreachable server answers nothing)."""
    try:
        return httpx.get(url, timeout=2).status_code == status
    except httpx.TransportError:
        return False
