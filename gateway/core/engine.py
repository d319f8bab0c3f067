"""The balance-threshold engine: batches of events in, decisions and rows to persist out.

Pure code over NumPy arrays indexed by dense account and meter numbers. A batch
of readings is validated, priced and applied with array operations; only the
accounts whose band changes become Python objects (decisions). The engine does
no I/O: the service commits an :class:`Outcome` (rows and decisions) in one
transaction before anything is acknowledged, and after a crash rebuilds the
engine from the store with :meth:`Engine.restore`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from .model import (
    UFEN_PER_FEN,
    Account,
    Adjustment,
    CostControlMode,
    Meter,
    MeterReplaced,
    Payment,
    RelayStateChanged,
)
from .tariff import Tariff, TierCalendar, cost_ufen, split_interval
from .thresholds import NORMAL, TRIP, WARNED_1, WARNED_2, Levels, ThresholdPolicy, calibrate, evaluate

NO_BALANCE = np.iinfo(np.int64).min  # a local meter's reading without a purse value
UNKNOWN_BALANCE = 1 << 62  # far above any level: an unknown balance never crosses one
REG_SLACK_WH = 20  # two register steps (10 Wh each) of rounding between readings


class DecisionKind(str, Enum):
    NOTICE = "notice"  # level 1 or 2 warning
    TRIP = "trip_request"
    CLOSE = "close_request"
    CANCEL_TRIP = "cancel_trip"
    ACCOUNT_MANAGER = "account_manager_task"  # protected and VIP accounts are never tripped automatically


@dataclass(frozen=True)
class Decision:
    decision_id: str  # account id + per-account sequence: the idempotency key downstream
    account_id: str
    account_no: int
    kind: DecisionKind
    level: int  # band reached: 1, 2 (warnings), 3 (trip band), 0 (recovered)
    balance_fen: int
    at: int
    reason: str


class HoldReason(str, Enum):
    OUT_OF_ORDER = "out_of_order"
    BACKWARDS = "backwards"
    IMPLAUSIBLE = "implausible_jump"
    UNKNOWN_METER = "unknown_meter"


@dataclass
class ReadingBatch:
    """Columnar readings: ``meter`` numbers, times, registers (total, T1..T4 in Wh), local purse (fen)."""

    meter: np.ndarray  # int64 meter numbers
    t: np.ndarray  # int64 epoch seconds
    regs: np.ndarray  # int64, n x 5
    balance_fen: np.ndarray | None = None  # int64; NO_BALANCE where not read

    def __len__(self) -> int:
        return len(self.meter)

    def take(self, idx: np.ndarray) -> "ReadingBatch":
        return ReadingBatch(self.meter[idx], self.t[idx], self.regs[idx],
                            None if self.balance_fen is None else self.balance_fen[idx])

    @classmethod
    def from_rows(cls, rows) -> "ReadingBatch":
        """``(meter_no, t, total, sharp, peak, flat, valley[, balance_fen])`` tuples -> columns."""
        if not rows:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 5), np.int64))
        arr = np.array(rows, dtype=np.int64).reshape(len(rows), -1)
        bal = arr[:, 7].copy() if arr.shape[1] > 7 else None
        return cls(arr[:, 0].copy(), arr[:, 1].copy(), np.ascontiguousarray(arr[:, 2:7]), bal)


@dataclass
class Outcome:
    """What one batch changed: the service persists it in one transaction."""

    decisions: list[Decision] = field(default_factory=list)
    # accepted readings, columnar: meter, account, t, regs(n x 5), delta_wh, cost_ufen, balance_fen, credits_fen
    accepted: dict[str, np.ndarray] | None = None
    held: list[tuple[int, int, tuple[int, ...], str]] = field(default_factory=list)  # meter_no, t, regs, reason
    duplicates: int = 0
    state_rows: list[tuple] = field(default_factory=list)  # (account_no, state, seq)
    # relay positions that changed: (meter_no, open, at, commanded_open or None, keep_power)
    relay_rows: list[tuple] = field(default_factory=list)
    rejected: list[tuple[object, str]] = field(default_factory=list)  # events that named nothing we know

    @property
    def accepted_count(self) -> int:
        return 0 if self.accepted is None else len(self.accepted["meter"])


def _grow(arr: np.ndarray, n: int, fill=0) -> np.ndarray:
    if len(arr) >= n:
        return arr
    shape = (n,) + arr.shape[1:]
    out = np.full(shape, fill, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


class Engine:
    def __init__(self, tariffs: dict[str, Tariff], policy: ThresholdPolicy | None = None,
                 calendar: TierCalendar | None = None) -> None:
        self.tariffs = dict(tariffs)
        self._tariff_list = list(self.tariffs.values())
        self._tariff_no = {tid: i for i, tid in enumerate(self.tariffs)}
        self.policy = policy or ThresholdPolicy()
        self.calendar = calendar or TierCalendar()
        self.account_ids: list[str] = []
        self.accounts: list[Account] = []
        self.account_no: dict[str, int] = {}
        self.areas: set[str] = set()  # every account's area
        self.meter_ids: list[str] = []
        self.meters: list[Meter] = []
        self.meter_no: dict[str, int] = {}
        self.meters_of: list[list[int]] = []
        n = 0
        i64 = np.int64
        # per account
        self.credits = np.zeros(n, i64)
        self.cost = np.zeros(n, i64)  # cumulative micro-fen
        self.meter_bal = np.full(n, NO_BALANCE, i64)  # local mode: last purse the meter reported
        self.credits_at_read = np.zeros(n, i64)  # local mode: credits the meter's purse already contains
        self.local = np.zeros(n, bool)
        self.auto_trip = np.zeros(n, bool)
        self.tariff = np.zeros(n, np.int32)
        self.overdraft = np.zeros(n, i64)
        self.state = np.zeros(n, np.int8)
        self.seq = np.zeros(n, i64)
        self.ytd_wh = np.zeros(n, i64)
        self.ytd_year = np.zeros(n, i64)
        self.ytd_prev_wh = np.zeros(n, i64)  # last tier year's consumption, for late readings of it
        self.levels = Levels.empty(n)
        # per meter
        self.m_account = np.zeros(n, i64)
        self.m_last_t = np.full(n, -1, i64)
        self.m_regs = np.zeros((n, 5), i64)
        self.m_max_w = np.zeros(n, i64)
        self.m_relay_open = np.zeros(n, bool)
        self.m_keep_power = np.zeros(n, bool)
        self.m_commanded = np.full(n, -1, np.int8)  # -1 not reported, 0 closed, 1 open

    # ------------------------------------------------------------------ registry

    def account(self, account_id: str) -> Account:
        return self.accounts[self.account_no[account_id]]

    def meter(self, meter_id: str) -> Meter:
        return self.meters[self.meter_no[meter_id]]

    def meters_of_account(self, account_id: str) -> list[Meter]:
        return [self.meters[m] for m in self.meters_of[self.account_no[account_id]]]

    def has_area(self, area: str) -> bool:
        return area in self.areas

    def update_tariffs(self, tariffs: dict[str, Tariff]) -> None:
        """Replace tariffs in place and append new ones; accounts keep their tariff numbers."""
        for tid, tariff in tariffs.items():
            if tid in self._tariff_no:
                self._tariff_list[self._tariff_no[tid]] = tariff
            else:
                self._tariff_no[tid] = len(self._tariff_list)
                self._tariff_list.append(tariff)
            self.tariffs[tid] = tariff

    def add_accounts(self, accounts: list[Account]) -> None:
        new = [a for a in accounts if a.account_id not in self.account_no]
        for a in new:
            if a.tariff_id not in self._tariff_no:
                raise ValueError(f"account {a.account_id}: unknown tariff {a.tariff_id!r}; "
                                 f"known: {', '.join(self._tariff_no)}")
        start = len(self.account_ids)
        n = start + len(new)
        for name in ("credits", "cost", "credits_at_read", "overdraft", "seq", "ytd_wh", "ytd_year", "ytd_prev_wh"):
            setattr(self, name, _grow(getattr(self, name), n))
        self.meter_bal = _grow(self.meter_bal, n, NO_BALANCE)
        self.local = _grow(self.local, n)
        self.auto_trip = _grow(self.auto_trip, n)
        self.tariff = _grow(self.tariff, n)
        self.state = _grow(self.state, n)
        self.levels.resize(n)
        for i, a in enumerate(new, start):
            self.account_ids.append(a.account_id)
            self.accounts.append(a)
            self.account_no[a.account_id] = i
            self.areas.add(a.area)
            self.meters_of.append([])
            self.local[i] = a.mode == CostControlMode.LOCAL
            self.auto_trip[i] = a.customer_class.auto_trip_allowed
            self.tariff[i] = self._tariff_no[a.tariff_id]
            self.overdraft[i] = a.overdraft_limit_fen
        if new:
            idx = np.arange(start, n)
            fresh = calibrate(np.full(len(idx), -1), self.overdraft[idx], self.policy)
            for name in ("warn1", "warn2", "trip", "close"):
                getattr(self.levels, name)[idx] = getattr(fresh, name)

    def add_meters(self, meters: list[Meter]) -> None:
        new = [m for m in meters if m.meter_id not in self.meter_no]
        for m in new:
            if m.account_id not in self.account_no:
                raise ValueError(f"meter {m.meter_id}: unknown account {m.account_id!r}")
        start = len(self.meter_ids)
        n = start + len(new)
        self.m_account = _grow(self.m_account, n)
        self.m_last_t = _grow(self.m_last_t, n, -1)
        self.m_regs = _grow(self.m_regs, n)
        self.m_max_w = _grow(self.m_max_w, n)
        self.m_relay_open = _grow(self.m_relay_open, n)
        self.m_keep_power = _grow(self.m_keep_power, n)
        self.m_commanded = _grow(self.m_commanded, n, -1)
        for i, m in enumerate(new, start):
            self.meter_ids.append(m.meter_id)
            self.meters.append(m)
            self.meter_no[m.meter_id] = i
            a = self.account_no[m.account_id]
            self.m_account[i] = a
            self.m_max_w[i] = m.max_kw * 1000
            self.meters_of[a].append(i)

    # ------------------------------------------------------------------ balances

    def balance(self, idx: np.ndarray | None = None, credits: np.ndarray | None = None) -> np.ndarray:
        """Balance in fen: credits minus cost (rounded down once), or the local meter's purse plus the credits
        not yet topped up into it. ``credits`` replaces the engine's own (for the accounts ``idx`` selects)."""
        if idx is None:
            own, cost, local, mbal, cread = (self.credits, self.cost, self.local, self.meter_bal,
                                             self.credits_at_read)
        else:
            own, cost, local, mbal, cread = (self.credits[idx], self.cost[idx], self.local[idx],
                                             self.meter_bal[idx], self.credits_at_read[idx])
        credits = own if credits is None else credits
        remote = credits - cost // UFEN_PER_FEN
        known = mbal != NO_BALANCE
        local_bal = np.where(known, mbal, 0) + credits - cread
        # a local meter not read yet has no known balance: keep it clear of every level
        return np.where(local, np.where(known, local_bal, UNKNOWN_BALANCE), remote)

    def balance_of(self, account_id: str) -> int:
        return int(self.balance(np.array([self.account_no[account_id]]))[0])

    def balance_and_level(self, account_id: str) -> tuple[int, int]:
        """The account's balance and its trip level (fen), as this engine sees them."""
        return self.balance_of(account_id), int(self.levels.trip[self.account_no[account_id]])

    def in_trip_band(self, account_id: str) -> bool:
        return int(self.state[self.account_no[account_id]]) == TRIP

    def fresh_balance(self, account_id: str, committed_credits_fen: int) -> tuple[int, int]:
        """``(balance, trip level)`` with the credits the store holds now, which include payments committed
        after this engine last looked (by anyone): the check at the moment of sending a trip."""
        a = self.account_no[account_id]
        balance = self.balance(np.array([a]), np.array([committed_credits_fen], dtype=np.int64))
        return int(balance[0]), int(self.levels.trip[a])

    # ------------------------------------------------------------------ readings

    def apply_readings(self, batch: ReadingBatch, now: int) -> Outcome:
        out = Outcome()
        n = len(batch)
        if n == 0:
            return out
        known = (batch.meter >= 0) & (batch.meter < len(self.meter_ids))
        if not known.all():
            for i in np.flatnonzero(~known):
                out.held.append((int(batch.meter[i]), int(batch.t[i]), tuple(int(x) for x in batch.regs[i]),
                                 HoldReason.UNKNOWN_METER.value))
            batch = batch.take(np.flatnonzero(known))
            n = len(batch)
            if n == 0:
                return out
        acct = self.m_account[batch.meter]
        parts: list[dict[str, np.ndarray]] = []
        touched: list[np.ndarray] = []
        for rows in self._rounds(acct, batch.t):
            self._apply_round(batch, rows, acct[rows], out, parts, touched)
        if parts:
            out.accepted = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if touched:
            self._decide(np.unique(np.concatenate(touched)), now, out, "balance after readings")
        return out

    @staticmethod
    def _rounds(acct: np.ndarray, t: np.ndarray):
        """Row groups in which each account appears at most once, in time order per account."""
        n = len(acct)
        order = np.lexsort((t, acct))
        sa = acct[order]
        first = np.empty(n, bool)
        first[0] = True
        np.not_equal(sa[1:], sa[:-1], out=first[1:])
        if first.all():
            yield order
            return
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        rank = np.arange(n) - start
        for r in range(int(rank.max()) + 1):
            yield order[rank == r]

    def _apply_round(self, batch: ReadingBatch, rows: np.ndarray, a: np.ndarray, out: Outcome,
                     parts: list, touched: list) -> None:
        m = batch.meter[rows]
        t = batch.t[rows]
        regs = batch.regs[rows]
        last_t = self.m_last_t[m]
        last_regs = self.m_regs[m]
        has = last_t >= 0
        d = regs - last_regs
        same_t = t == last_t
        dup = has & same_t & (d == 0).all(axis=1)
        out.duplicates += int(dup.sum())
        ooo = has & (t <= last_t) & ~dup
        dt = t - last_t
        backwards = has & ~ooo & ~dup & (d < 0).any(axis=1)
        # every register is checked (time-of-use registers are what a TOU tariff prices), and the four
        # tariff registers cannot together have moved more than the total
        limit = (self.m_max_w[m] * dt + REG_SLACK_WH * 3600)[:, None]
        implausible = (has & ~ooo & ~dup & ~backwards
                       & ((d * 3600 > limit).any(axis=1)
                          | (d[:, 1:5].sum(axis=1) > d[:, 0] + 4 * REG_SLACK_WH)))
        for mask, reason in ((ooo, HoldReason.OUT_OF_ORDER), (backwards, HoldReason.BACKWARDS),
                             (implausible, HoldReason.IMPLAUSIBLE)):
            for i in np.flatnonzero(mask):
                out.held.append((int(m[i]), int(t[i]), tuple(int(x) for x in regs[i]), reason.value))
        ok = ~(dup | ooo | backwards | implausible)
        if not ok.any():
            return
        sel = np.flatnonzero(ok)
        m, t, regs, a, has, d, last_t = m[sel], t[sel], regs[sel], a[sel], has[sel], d[sel], last_t[sel]
        d = np.where(has[:, None], d, 0)  # a first reading only sets the baseline
        local = self.local[a]
        charged = has & ~local
        delta_wh = np.where(charged, d[:, 0], 0)
        cost = np.zeros(len(sel), np.int64)
        if charged.any():
            ci = np.flatnonzero(charged)
            cost[ci] = self._price(a[ci], last_t[ci], t[ci], d[ci])
        self.cost[a] += cost  # each account appears once per round (see _rounds)
        bal = np.full(len(sel), NO_BALANCE, np.int64)
        credits = np.zeros(len(sel), np.int64)
        if batch.balance_fen is not None:
            bal = batch.balance_fen[rows][sel]
            li = np.flatnonzero(local & (bal != NO_BALANCE))
            if len(li):
                al = a[li]
                old = self.meter_bal[al]
                first = old == NO_BALANCE
                # A payment counts at once, but the purse only contains it once the top-up has reached the
                # meter: credits stay pending until the purse rises by them. (Absorbing every credit at the
                # next reading would re-trip a customer who paid minutes before a poll.)
                # The purse rises by the top-up less what was used meanwhile: a rise within the tolerance of
                # everything pending counts as all of it.
                rise = np.where(first, 0, np.maximum(bal[li] - old, 0))
                pending = self.credits[al] - self.credits_at_read[al]
                tol = self.policy.local_topup_tolerance_fen
                absorbed = np.where(first | (rise >= pending - tol) & (rise > 0), pending,
                                    np.clip(rise, 0, np.maximum(pending, 0)))
                self.credits_at_read[al] += absorbed
                self.meter_bal[al] = bal[li]
                credits[li] = self.credits_at_read[al]
        self.m_last_t[m] = t
        self.m_regs[m] = regs
        # year-to-date after this reading: a restart resumes the tier blocks exactly from here
        parts.append({"meter": m, "account": a, "t": t, "regs": regs, "delta_wh": delta_wh, "cost_ufen": cost,
                      "ytd_wh": self.ytd_wh[a], "tier_year": self.ytd_year[a],
                      "balance_fen": bal, "credits_fen": credits})
        touched.append(a)

    def _price(self, a: np.ndarray, t0: np.ndarray, t1: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Cost (micro-fen) of intervals; updates the accounts' year-to-date consumption for tiers."""
        cost = np.zeros(len(a), np.int64)
        year1 = self.calendar.year(t1)
        year0 = self.calendar.year(t0)
        # a new tier year started since the account's last counted consumption (never backwards: a late
        # reading of last year, from another meter of the account, goes the slow way below)
        roll = (self.ytd_year[a] < year1) & (year0 == year1)
        ra = a[roll]
        self.ytd_prev_wh[ra] = np.where(self.ytd_year[ra] == year1[roll] - 1, self.ytd_wh[ra], 0)
        self.ytd_wh[ra] = 0
        self.ytd_year[ra] = year1[roll]
        late = year1 < self.ytd_year[a]
        tno = self.tariff[a]
        for k in np.unique(tno):
            tariff = self._tariff_list[int(k)]
            in_t = np.flatnonzero(tno == k)
            starts = np.asarray(tariff._starts, dtype=np.int64)
            # the first version also prices anything before it (see Tariff.version_index)
            v0 = np.maximum(np.searchsorted(starts, t0[in_t], side="right") - 1, 0)
            v1 = np.maximum(np.searchsorted(starts, t1[in_t], side="right") - 1, 0)
            simple = (v0 == v1) & (year0[in_t] == year1[in_t]) & ~late[in_t]
            for v in np.unique(v1[simple]):
                rows = in_t[simple & (v1 == v)]
                aa = a[rows]
                cost[rows] = cost_ufen(tariff.versions[int(v)], d[rows, 0], d[rows, 1:5], self.ytd_wh[aa])
                self.ytd_wh[aa] += d[rows, 0]
            for r in in_t[~simple]:
                cost[r] = self._price_straddling(tariff, int(a[r]), int(t0[r]), int(t1[r]), d[r])
        return cost

    def _price_straddling(self, tariff: Tariff, a: int, t0: int, t1: int, d: np.ndarray) -> int:
        """An interval across a tariff change or a tier-year start: split in proportion to time."""
        cuts = [v.effective_from for v in tariff.versions]
        y0, y1 = (int(x) for x in self.calendar.year(np.array([t0, t1])))
        cuts += [self.calendar.year_start(y) for y in range(y0 + 1, y1 + 1)]
        total = 0
        for start, end, share in split_interval(t0, t1, cuts, [int(x) for x in d]):
            version = tariff.version_at(start)
            year = int(self.calendar.year(np.array([start]))[0])
            if year > self.ytd_year[a]:
                self.ytd_prev_wh[a] = self.ytd_wh[a] if year == self.ytd_year[a] + 1 else 0
                self.ytd_year[a], self.ytd_wh[a] = year, 0
            sh = np.asarray(share, dtype=np.int64)
            if year == self.ytd_year[a]:
                ytd = self.ytd_wh
            elif year == self.ytd_year[a] - 1:  # late consumption of last year: last year's blocks
                ytd = self.ytd_prev_wh
            else:  # older still (a meter silent for years): priced from the first block
                ytd = np.zeros(len(self.ytd_wh), np.int64)
            total += int(cost_ufen(version, sh[:1], sh[None, 1:5], ytd[a:a + 1])[0])
            ytd[a] += sh[0]
        return total

    def replace_meter(self, event: MeterReplaced) -> Outcome:
        """New baseline for a swapped meter; the swap itself is never charged.

        A re-delivered swap (same instant, same registers as the meter's baseline) changes nothing; a swap at
        or before the meter's last reading is refused: it would roll accepted readings back.
        """
        m = self.meter_no[event.meter_id]
        regs = tuple(int(x) for x in event.registers_wh)
        if event.at <= self.m_last_t[m]:
            if event.at == self.m_last_t[m] and regs == tuple(int(x) for x in self.m_regs[m]):
                return Outcome(duplicates=1)
            raise ValueError(f"meter {event.meter_id}: replacement at {event.at} is not after its last reading "
                             f"at {int(self.m_last_t[m])}; record the swap with the time it happened")
        self.m_last_t[m] = event.at
        self.m_regs[m] = np.asarray(event.registers_wh, dtype=np.int64)
        a = int(self.m_account[m])
        out = Outcome()
        out.accepted = {"meter": np.array([m]), "account": np.array([a]), "t": np.array([event.at]),
                        "regs": self.m_regs[m:m + 1].copy(), "delta_wh": np.zeros(1, np.int64),
                        "cost_ufen": np.zeros(1, np.int64), "ytd_wh": self.ytd_wh[a:a + 1].copy(),
                        "tier_year": self.ytd_year[a:a + 1].copy(), "balance_fen": np.array([NO_BALANCE]),
                        "credits_fen": np.zeros(1, np.int64)}
        return out

    # ------------------------------------------------------------------ credits and other events

    def apply_credits(self, items: list[Payment | Adjustment], now: int) -> Outcome:
        """Payments, adjustments and refunds that the store has just committed as new (never duplicates)."""
        out = Outcome()
        if not items:
            return out
        idx = []
        for item in items:
            a = self.account_no.get(item.account_id)
            if a is None:
                raise KeyError(f"unknown account {item.account_id!r}")
            self.credits[a] += item.amount_fen
            idx.append(a)
        self._decide(np.unique(np.array(idx)), now, out, "balance after payment")
        return out

    def apply_relay_states(self, events: list[RelayStateChanged]) -> Outcome:
        """Verified relay positions (read-backs and polls); only changes become rows."""
        out = Outcome()
        for e in events:
            m = self.meter_no.get(e.meter_id)
            if m is None:
                out.rejected.append((e, f"unknown meter {e.meter_id!r}"))
                continue
            commanded = -1 if e.commanded_open is None else int(e.commanded_open)
            if (bool(self.m_relay_open[m]), bool(self.m_keep_power[m]), int(self.m_commanded[m])) == \
                    (e.open, e.keep_power, commanded):
                continue
            self.m_relay_open[m], self.m_keep_power[m], self.m_commanded[m] = e.open, e.keep_power, commanded
            out.relay_rows.append((m, e.open, e.at, e.commanded_open, e.keep_power))
        return out

    # ------------------------------------------------------------------ thresholds

    def recalibrate(self, avg_daily_fen: np.ndarray, now: int) -> Outcome:
        """New warning levels from average daily cost (-1: no history), then one vectorised re-evaluation."""
        fresh = calibrate(avg_daily_fen, self.overdraft, self.policy)
        self.levels = fresh
        return self.reevaluate(now, "recalibrated warning levels")

    def reevaluate(self, now: int, reason: str = "re-evaluation") -> Outcome:
        out = Outcome()
        self._decide(None, now, out, reason)
        return out

    def transitions(self, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Accounts whose band changes now, and their new states (the vectorised hot path)."""
        balance = self.balance(idx)
        new = evaluate(balance, self.state if idx is None else self.state[idx], self.levels,
                       self.policy.hysteresis_fen, idx)
        old = self.state if idx is None else self.state[idx]
        changed = np.flatnonzero(new != old)
        accounts = changed if idx is None else idx[changed]
        return accounts, new[changed]

    def _decide(self, idx: np.ndarray | None, now: int, out: Outcome, reason: str) -> None:
        accounts, new_states = self.transitions(idx)
        if not len(accounts):
            return
        balances = self.balance(accounts)
        for a, new, bal in zip(accounts.tolist(), new_states.tolist(), balances.tolist()):
            old = int(self.state[a])
            self.state[a] = new
            for kind, level in self._crossing_decisions(a, old, new):
                self.seq[a] += 1
                out.decisions.append(Decision(f"{self.account_ids[a]}#{int(self.seq[a])}", self.account_ids[a],
                                              a, kind, level, bal, now, reason))
            out.state_rows.append(self._state_row(a))

    def _crossing_decisions(self, a: int, old: int, new: int) -> list[tuple[DecisionKind, int]]:
        if new > old:  # downward: one decision per level crossed
            out = []
            for level in range(old + 1, new + 1):
                if level in (WARNED_1, WARNED_2):
                    out.append((DecisionKind.NOTICE, level))
                elif level == TRIP:
                    out.append((DecisionKind.TRIP if self.auto_trip[a] else DecisionKind.ACCOUNT_MANAGER, TRIP))
            return out
        if old == TRIP:  # back out of the trip band
            if any(self.m_relay_open[m] for m in self.meters_of[a]):
                return [(DecisionKind.CLOSE, new)]
            if self.auto_trip[a]:
                return [(DecisionKind.CANCEL_TRIP, new)]
        return []

    def _state_row(self, a: int) -> tuple:
        return (a, int(self.state[a]), int(self.seq[a]))

    # ------------------------------------------------------------------ restore

    def restore(self, snapshot: "Snapshot") -> None:
        """Load what the store says (after a restart): balances, baselines, states, relays."""
        s = snapshot
        self.credits[s.credit_accounts] = s.credit_sums
        self.cost[s.cost_accounts] = s.cost_sums
        self.ytd_wh[s.ytd_accounts] = s.ytd_sums
        self.ytd_year[s.ytd_accounts] = s.ytd_year
        self.ytd_prev_wh[s.ytd_prev_accounts] = s.ytd_prev
        self.m_last_t[s.last_meters] = s.last_t
        self.m_regs[s.last_meters] = s.last_regs
        pa = self.m_account[s.purse_meters]
        local = self.local[pa]
        self.meter_bal[pa[local]] = s.purse_balance[local]
        self.credits_at_read[pa[local]] = s.purse_credits[local]
        self.state[s.state_accounts] = s.states
        self.seq[s.state_accounts] = s.seqs
        self.m_relay_open[s.relay_meters] = s.relay_open
        self.m_keep_power[s.relay_meters] = s.relay_keep_power
        self.m_commanded[s.relay_meters] = s.relay_commanded
        self.set_levels(s.level_accounts, s.levels)

    def set_levels(self, accounts: np.ndarray, levels: np.ndarray) -> None:
        """Stored levels (n x 4: warning 1, warning 2, trip, close) for these account numbers."""
        for i, name in enumerate(("warn1", "warn2", "trip", "close")):
            getattr(self.levels, name)[accounts] = levels[:, i]


@dataclass
class Snapshot:
    """What the store hands the engine at start-up (all arrays)."""

    credit_accounts: np.ndarray
    credit_sums: np.ndarray
    cost_accounts: np.ndarray
    cost_sums: np.ndarray
    ytd_accounts: np.ndarray
    ytd_sums: np.ndarray
    ytd_year: np.ndarray
    ytd_prev_accounts: np.ndarray
    ytd_prev: np.ndarray
    last_meters: np.ndarray
    last_t: np.ndarray
    last_regs: np.ndarray
    purse_meters: np.ndarray  # local meters: the last reading that carried a purse value
    purse_balance: np.ndarray
    purse_credits: np.ndarray
    state_accounts: np.ndarray
    states: np.ndarray
    seqs: np.ndarray
    relay_meters: np.ndarray
    relay_open: np.ndarray
    relay_keep_power: np.ndarray
    relay_commanded: np.ndarray  # -1 not reported, 0 closed, 1 open
    level_accounts: np.ndarray
    levels: np.ndarray  # n x 4: warning 1, warning 2, trip, close (fen)


__all__ = ["Engine", "ReadingBatch", "Outcome", "Decision", "DecisionKind", "HoldReason", "Snapshot",
           "NO_BALANCE", "NORMAL", "WARNED_1", "WARNED_2", "TRIP"]
