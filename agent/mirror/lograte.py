"""A log line that may come thousands of times a second (one per evicted flow), at most once
per key and interval; the next line that is logged says how many were left out.

Not thread-safe: one thread logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """``info(event, key, ...)`` logs at most once per ``key`` every ``interval`` seconds; a
    line after some were left out carries ``not_logged`` (how many, since the last line)."""

    def __init__(self, logger: Any, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def info(self, event: str, key: str, **fields: object) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            fields["not_logged"] = left_out
        self._log.info(event, **fields)
