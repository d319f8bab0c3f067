"""Tariffs: flat, time-of-use (sharp/peak/flat/valley registers), annual tiered blocks; versions over time.

Costs are computed for whole arrays of reading intervals at once. An interval
that straddles a tariff change or the start of a tier year (rare) is split in
proportion to time and each part priced by the version in force for it.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from .model import kwh_to_wh, price_to_mfen

TOU_PERIODS = ("sharp", "peak", "flat", "valley")  # registers T1..T4


class TariffError(ValueError):
    pass


@dataclass(frozen=True)
class Tier:
    from_wh: int  # annual consumption at which this block starts
    surcharge_mfen: int  # added to the energy price for consumption inside the block


@dataclass(frozen=True)
class TariffVersion:
    effective_from: int  # epoch seconds
    kind: str  # "flat" or "tou"
    prices_mfen: tuple[int, ...]  # flat: (price,); tou: (sharp, peak, flat, valley)
    tiers: tuple[Tier, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "tou"):
            raise TariffError(f"tariff kind {self.kind!r} unknown; allowed: flat, tou")
        need = 1 if self.kind == "flat" else 4
        if len(self.prices_mfen) != need:
            raise TariffError(f"a {self.kind} tariff needs {need} price(s), got {len(self.prices_mfen)}")
        if any(p < 0 for p in self.prices_mfen):
            raise TariffError("prices must not be negative")
        if self.tiers:
            if any(t.surcharge_mfen < 0 for t in self.tiers):
                raise TariffError("tier surcharges must not be negative")
            starts = [t.from_wh for t in self.tiers]
            if starts[0] != 0 or starts != sorted(set(starts)):
                raise TariffError("tiers must start at 0 kWh and rise strictly")


@dataclass
class Tariff:
    tariff_id: str
    versions: list[TariffVersion] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.versions:
            raise TariffError(f"tariff {self.tariff_id} has no versions")
        self.versions.sort(key=lambda v: v.effective_from)
        self._starts = [v.effective_from for v in self.versions]

    def add_version(self, version: TariffVersion) -> None:
        self.versions.append(version)
        self.__post_init__()

    def version_index(self, t: int) -> int:
        """The version in force at ``t``; the first version also covers anything before it, so a
        reading older than the tariff's history is priced, never dropped."""
        return max(bisect_right(self._starts, t) - 1, 0)

    def version_at(self, t: int) -> TariffVersion:
        return self.versions[self.version_index(t)]

    @classmethod
    def from_config(cls, tariff_id: str, versions: list[dict], utc_offset_s: int = 8 * 3600) -> "Tariff":
        """Versions as configured: prices in yuan/kWh (strings), tiers as kWh per year; an ISO
        ``effective_from`` without an offset is in the utility's zone (UTC+8 by default)."""
        out = []
        for i, v in enumerate(versions):
            where = f"tariff {tariff_id} version {i}"
            try:
                kind = v.get("kind", "flat")
                if kind not in ("flat", "tou"):
                    raise TariffError(f"{where}: kind {kind!r} unknown; allowed: flat, tou")
                if kind == "flat":
                    prices = (price_to_mfen(str(v["price"])),)
                else:
                    prices = tuple(price_to_mfen(str(v["prices"][p])) for p in TOU_PERIODS)
                tiers = tuple(Tier(kwh_to_wh(str(t["from_kwh"])), price_to_mfen(str(t.get("surcharge", "0"))))
                              for t in v.get("tiers", ()))
                start = v["effective_from"]
                if isinstance(start, str):
                    when = datetime.fromisoformat(start)
                    if when.tzinfo is None:  # the utility's clock, not the host's
                        when = when.replace(tzinfo=timezone(timedelta(seconds=utc_offset_s)))
                    start = int(when.timestamp())
                out.append(TariffVersion(int(start), kind, prices, tiers))
            except TariffError:
                raise
            except KeyError as exc:
                raise TariffError(f"{where}: missing {exc}") from None
            except (ValueError, TypeError) as exc:
                raise TariffError(f"{where}: {exc}") from None
        return cls(tariff_id, out)


def tariffs_from_config(config: dict) -> dict[str, Tariff]:
    """``{tariff_id: [version, ...]}`` as in config/tariffs.example.json (keys starting with _ are comments)."""
    return {tid: Tariff.from_config(tid, versions) for tid, versions in config.items() if not tid.startswith("_")}


class TierCalendar:
    """Which tier year an instant falls in (calendar years in the utility's zone, UTC+8 by default)."""

    def __init__(self, utc_offset_s: int = 8 * 3600) -> None:
        self.offset = utc_offset_s

    def year(self, t: np.ndarray) -> np.ndarray:
        local = (np.asarray(t, dtype=np.int64) + self.offset).astype("datetime64[s]")
        return local.astype("datetime64[Y]").astype(np.int64) + 1970

    def year_start(self, year: int) -> int:
        tz = timezone(timedelta(seconds=self.offset))
        return int(datetime(year, 1, 1, tzinfo=tz).timestamp())


def tier_split(ytd_wh: np.ndarray, delta_wh: np.ndarray, tiers: tuple[Tier, ...]) -> np.ndarray:
    """Wh of each interval inside each tier (shape n x tiers): exact, however many boundaries it crosses."""
    out = np.empty((len(delta_wh), len(tiers)), dtype=np.int64)
    end = ytd_wh + delta_wh
    for k, tier in enumerate(tiers):
        lo = tier.from_wh
        hi = tiers[k + 1].from_wh if k + 1 < len(tiers) else np.iinfo(np.int64).max
        out[:, k] = np.clip(end, lo, hi) - np.clip(ytd_wh, lo, hi)
    return out


def cost_ufen(version: TariffVersion, d_total: np.ndarray, d_tou: np.ndarray, ytd_wh: np.ndarray) -> np.ndarray:
    """Exact cost in micro-fen of intervals priced wholly by ``version``.

    ``d_total`` is the total register's delta (Wh); ``d_tou`` the T1..T4 deltas (n x 4).
    """
    if version.kind == "flat":
        cost = d_total * version.prices_mfen[0]
    else:
        cost = d_tou @ np.asarray(version.prices_mfen, dtype=np.int64)
    if version.tiers:
        surcharges = np.asarray([t.surcharge_mfen for t in version.tiers], dtype=np.int64)
        cost = cost + tier_split(ytd_wh, d_total, version.tiers) @ surcharges
    return cost


def split_interval(t0: int, t1: int, cuts: list[int], wh: list[int]) -> list[tuple[int, int, list[int]]]:
    """Split an interval's energy at ``cuts`` (instants inside (t0, t1)) in proportion to time.

    Integer Wh per part; the remainder of each register goes to the last part so nothing is lost.
    """
    points = [t0] + sorted(c for c in cuts if t0 < c < t1) + [t1]
    span = t1 - t0
    parts, given = [], [0] * len(wh)
    for i in range(len(points) - 1):
        a, b = points[i], points[i + 1]
        if i == len(points) - 2:
            share = [w - g for w, g in zip(wh, given)]
        else:
            share = [w * (b - a) // span for w in wh]
            given = [g + s for g, s in zip(given, share)]
        parts.append((a, b, share))
    return parts
