"""Per-account warning / trip / close levels, their calibration, and the vectorised band evaluation.

An account is in one of four states::

    0 NORMAL   balance above warning 1
    1 WARNED_1 at or below warning 1
    2 WARNED_2 at or below warning 2
    3 TRIP     at or below the trip level (0, or minus the overdraft limit)

It moves down as soon as the balance reaches a lower band, and back up only
once the balance clears the level by the hysteresis (out of TRIP: the trip
level plus the hysteresis, and the close level), so a balance wobbling around
a level yields one decision, not one per reading or payment.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NORMAL, WARNED_1, WARNED_2, TRIP = 0, 1, 2, 3
BAND_NAMES = ("normal", "warning_1", "warning_2", "trip")


@dataclass(frozen=True)
class ThresholdPolicy:
    warn1_days: int = 7  # warning 1 when the balance covers this many days of average use
    warn2_days: int = 3
    warn1_min_fen: int = 2_000
    warn1_max_fen: int = 50_000
    warn2_min_fen: int = 1_000
    warn2_max_fen: int = 20_000
    default_warn1_fen: int = 5_000  # before the account has history
    default_warn2_fen: int = 2_000
    hysteresis_fen: int = 500
    close_margin_fen: int = 0  # close once the balance is above trip level + this
    calibration_window_days: int = 30
    recalibrate_every_s: int = 86_400  # the schedule: warnings follow each customer's recent use
    # local mode: a purse rise within this of the pending payments means the top-up reached the meter
    # (the purse rises by the top-up less what was used between the payment and the poll)
    local_topup_tolerance_fen: int = 1_000

    def __post_init__(self) -> None:
        for name in ("warn1_days", "warn2_days", "calibration_window_days", "recalibrate_every_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"thresholds.{name} must be positive, got {getattr(self, name)}")
        if self.warn2_days > self.warn1_days:
            raise ValueError("thresholds.warn2_days must not exceed warn1_days (warning 2 comes after warning 1)")
        for lo, hi in (("warn1_min_fen", "warn1_max_fen"), ("warn2_min_fen", "warn2_max_fen")):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(f"thresholds.{lo} must not exceed thresholds.{hi}")
        if self.hysteresis_fen < 0 or self.close_margin_fen < 0:
            raise ValueError("thresholds.hysteresis_fen and close_margin_fen must not be negative")


@dataclass
class Levels:
    """Per-account levels as arrays (fen)."""

    warn1: np.ndarray
    warn2: np.ndarray
    trip: np.ndarray
    close: np.ndarray

    @classmethod
    def empty(cls, n: int = 0) -> "Levels":
        z = np.zeros(n, dtype=np.int64)
        return cls(z.copy(), z.copy(), z.copy(), z.copy())

    def resize(self, n: int) -> None:
        for name in ("warn1", "warn2", "trip", "close"):
            arr = getattr(self, name)
            grown = np.zeros(n, dtype=np.int64)
            grown[: len(arr)] = arr
            setattr(self, name, grown)


def calibrate(avg_daily_fen: np.ndarray, overdraft_fen: np.ndarray, policy: ThresholdPolicy) -> Levels:
    """Levels from average daily cost (negative = no history yet), within the policy's bounds."""
    avg = np.asarray(avg_daily_fen, dtype=np.int64)
    known = avg >= 0
    trip = -np.asarray(overdraft_fen, dtype=np.int64)
    w1 = np.where(known, np.clip(avg * policy.warn1_days, policy.warn1_min_fen, policy.warn1_max_fen),
                  policy.default_warn1_fen)
    w2 = np.where(known, np.clip(avg * policy.warn2_days, policy.warn2_min_fen, policy.warn2_max_fen),
                  policy.default_warn2_fen)
    # keep the order warning 1 >= warning 2 > trip whatever the bounds say
    w2 = np.maximum(w2, trip + 1)
    w1 = np.maximum(w1, w2)
    return Levels(w1.astype(np.int64), w2.astype(np.int64), trip, trip + policy.close_margin_fen)


def evaluate(balance: np.ndarray, state: np.ndarray, levels: Levels, hysteresis_fen: int,
             idx: np.ndarray | None = None) -> np.ndarray:
    """New states: pure array arithmetic, no Python per account.

    ``balance`` and ``state`` are for every account, or already for the accounts ``idx``
    selects; ``levels`` are always whole (they are indexed here).
    """
    b, s = balance, state
    if idx is None:
        w1, w2, tr, cl = levels.warn1, levels.warn2, levels.trip, levels.close
    else:
        w1, w2, tr, cl = levels.warn1[idx], levels.warn2[idx], levels.trip[idx], levels.close[idx]
    down = (b <= w1).view(np.int8) + (b <= w2).view(np.int8) + (b <= tr).view(np.int8)
    h = hysteresis_fen
    # Leaving a band needs its level plus the hysteresis; leaving TRIP also needs the close level. The
    # conditions are nested so that a close level above warning 2 still holds the account in TRIP.
    up3 = b <= np.maximum(tr + h, cl)
    up2 = (b <= w2 + h) | up3
    up1 = (b <= w1 + h) | up2
    up = up1.view(np.int8) + up2.view(np.int8) + up3.view(np.int8)
    return np.where(down > s, down, np.where(up < s, up, s)).astype(np.int8)
