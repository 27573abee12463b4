"""Failure logging for sinks: once per outage and reason, rate-limited, with the recovery.

A sink reports each failure with :meth:`OutageLog.failed` and each success with
:meth:`OutageLog.recovered`. The first failure of a reason starts an outage of that reason and
logs a warning; the ones after it only count. A success ends the outage and, if its start was
logged, logs the recovery with how many failed during it. So a second outage an hour later is
logged again, while a flapping target logs at most one warning per reason per ``interval``
(a later warning says how many failures went unlogged).

Not thread-safe: one thread (the sink's) reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

__all__ = ["OutageLog"]


@dataclass(slots=True)
class _Outage:
    started: float
    failures: int = 0
    announced: bool = False


class OutageLog:
    """Logs ``failure_event`` once per outage and reason, and ``recovery_event`` at its end.

    ``context`` is added to every line (for example the target). ``clock`` is injectable for
    tests.
    """

    def __init__(self, logger: Any, failure_event: str, recovery_event: str,
                 interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 **context: object) -> None:
        self._log = logger
        self._failure_event = failure_event
        self._recovery_event = recovery_event
        self._interval = interval
        self._clock = clock
        self._context = context
        self._outages: dict[str, _Outage] = {}  # reason → its current outage
        self._last_warning: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}  # reason → failures since its last warning

    @property
    def failing(self) -> frozenset[str]:
        """Reasons whose outage is going on."""
        return frozenset(self._outages)

    def failed(self, reason: str, count: int = 1, **detail: object) -> None:
        """``count`` failures of ``reason``; the first of an outage is logged (rate-limited)."""
        now = self._clock()
        outage = self._outages.get(reason)
        if outage is None:
            outage = self._outages[reason] = _Outage(now)
            last = self._last_warning.get(reason)
            if last is None or now - last >= self._interval:
                outage.announced = True
                self._last_warning[reason] = now
                earlier = self._unlogged.pop(reason, 0)
                extra = {"unlogged_earlier": earlier} if earlier else {}
                self._log.warning(self._failure_event, reason=reason, **self._context,
                                  **detail, **extra)
        outage.failures += count
        if not outage.announced:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + count

    def recovered(self, reasons: Container[str] | None = None) -> None:
        """A success: end the outages of ``reasons`` (default: all); log the announced ones."""
        ended = [r for r in self._outages if reasons is None or r in reasons]
        if not ended:
            return
        now = self._clock()
        outages = {r: self._outages.pop(r) for r in ended}
        shown = {r: o for r, o in outages.items() if o.announced}
        if shown:
            started = min(o.started for o in shown.values())
            self._log.info(self._recovery_event, **self._context,
                           failures={r: o.failures for r, o in shown.items()},
                           outage_seconds=round(now - started, 3))
