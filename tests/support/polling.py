"""Waiting on real state in the tests: read until a condition holds or a deadline passes (an Event's
wait between reads, never a bare sleep standing in for synchronisation)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def poll(read: Callable[[], Any], done: Callable[[Any], bool], seconds: float, *, every: float = 0.05) -> Any:
    """Read real state until ``done`` holds or ``seconds`` pass; the last read."""
    pause, end = threading.Event(), time.monotonic() + seconds
    value = read()
    while not done(value) and time.monotonic() < end:
        pause.wait(every)
        value = read()
    return value
