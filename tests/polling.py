"""Wait for an engine running on the test's reactor thread (or in another process) to get somewhere."""

from __future__ import annotations

import time


def wait_for(fn, timeout: float, what: str = ""):
    """Poll *fn* until it returns something truthy and return that; AssertionError after *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or fn}")
        time.sleep(0.05)
