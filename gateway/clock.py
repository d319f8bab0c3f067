"""Clocks: the service reads time through one of these, so tests can fast-forward days in milliseconds."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """Time that moves only when told to (tests, simulations)."""

    def __init__(self, t: float) -> None:
        self.t = float(t)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self.t += seconds

    def set(self, t: float) -> None:
        if t < self.t:
            raise ValueError("time does not run backwards")
        self.t = float(t)


def local_naive(clock: Clock, utc_offset_s: int = 8 * 3600):
    """A ``() -> datetime`` in the utility's local time without a zone: what meters keep, and what the
    simulators and the poller take as their clock."""
    zone = timezone(timedelta(seconds=utc_offset_s))
    return lambda: datetime.fromtimestamp(clock.now(), zone).replace(tzinfo=None)
