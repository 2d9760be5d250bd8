"""Polling helper shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, what: str | None = None, every: float = 0.05,
             detail: Callable[[], Any] | None = None) -> Any:
    """Poll pred until it returns something truthy; fail the test after timeout seconds, with what
    `detail()` shows then (e.g. the queue's job states) in the message."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    shown = f": {detail()}" if detail is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or pred}{shown}")
