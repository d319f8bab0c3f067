"""The accounting shell around the pure engine: every input committed, with its consequences, before it counts.

One writer drives this (a dedicated thread in the service): each call is one
transaction that records the inputs, runs the engine over them and records the
outcome (readings and their charges, held readings, decisions, account states).
Only after the commit are the decisions handed on and the inputs acknowledged.
If a transaction fails, the engine is rebuilt from the store, so memory never
runs ahead of what is durable.

Every input method takes an optional ``then(outcome, result)``: called inside the same transaction after
the outcome is written, for a caller that commits its own consequences with it (the relay controller does).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from gateway.cluster import log_failure
from gateway.core.engine import Decision, Engine, Outcome, ReadingBatch
from gateway.core.model import Account, Adjustment, Meter, MeterReplaced, Payment, RelayStateChanged
from gateway.core.tariff import Tariff
from gateway.core.thresholds import ThresholdPolicy
from gateway.store.base import CreditResult, Store

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    decisions: list[Decision] = field(default_factory=list)
    accepted: int = 0
    held: int = 0
    duplicates: int = 0
    credits: CreditResult | None = None
    rejected: list[tuple[object, str]] = field(default_factory=list)  # for the dead-letter path, with reasons


Then = Callable[[Outcome, "IngestResult"], None] | None


class Accounting:
    def __init__(self, store: Store, policy: ThresholdPolicy | None = None) -> None:
        self.store = store
        self.policy = policy or ThresholdPolicy()
        self._stale = False
        #: several instances (gateway/cluster.py): ``owned()`` says, per account number, whether this instance
        #: acts for the account; the others' decisions and band states are neither written nor handed on
        #: (their owner's engine makes them). None: every account is ours.
        self.owned: Callable[[], np.ndarray] | None = None
        #: the calibration (its time, as the store records it) the engine's levels are from
        self.levels_at: int | None = None
        store.migrate()
        self.engine = self._load()

    def _load(self) -> Engine:
        engine = Engine(self.store.load_tariffs(), self.policy)
        engine.add_accounts(self.store.load_accounts())
        engine.add_meters(self.store.load_meters())
        self.levels_at = self.store.last_calibration()
        engine.restore(self.store.snapshot())
        return engine

    def reload(self) -> None:
        self.engine = self._load()

    # -- registry ------------------------------------------------------------------------
    def register(self, tariffs: dict[str, Tariff], accounts: list[Account], meters: list[Meter]) -> None:
        """Add or update tariffs and add accounts and meters (existing ids are left as they are)."""
        with self.store.transaction():
            self.store.save_tariffs(tariffs)
        self.engine.update_tariffs(tariffs)
        try:
            with self.store.transaction():
                self.engine.add_accounts(accounts)
                self.engine.add_meters(meters)
                self.store.save_accounts(accounts, self.engine.account_no)
                self.store.save_meters(meters, self.engine.meter_no, self.engine.account_no)
        except BaseException:
            self.reload()
            raise

    # -- inputs ----------------------------------------------------------------------------
    def ingest_readings(self, batch: ReadingBatch, now: int, then: Then = None) -> IngestResult:
        batch, redelivered = self._drop_redelivered(batch)
        return self._run(lambda: self.engine.apply_readings(batch, now), now, duplicates=redelivered, then=then)

    def ingest_credits(self, items: list[Payment | Adjustment], now: int, then: Then = None) -> IngestResult:
        """Payments and adjustments: committed exactly once, then applied; duplicates acknowledged, not counted."""
        result = IngestResult()

        def work():
            credits = self.store.insert_credits(items, self.engine.account_no, now)
            result.credits = credits
            return self.engine.apply_credits(credits.new, now)

        return self._run(work, now, result=result, then=then)

    def ingest_relay_states(self, events: list[RelayStateChanged], now: int, then: Then = None) -> IngestResult:
        return self._run(lambda: self.engine.apply_relay_states(events), now, then=then)

    def replace_meter(self, event: MeterReplaced, now: int) -> IngestResult:
        return self._run(lambda: self.engine.replace_meter(event), now)

    def recalibrate(self, now: int, then: Then = None) -> IngestResult:
        """Warning levels from each account's recent daily cost, stored, then every account re-evaluated."""
        days = self.policy.calibration_window_days
        avg = self.store.average_daily_cost_fen(len(self.engine.account_ids), now - days * 86400, now)

        def work():
            outcome = self.engine.recalibrate(avg, now)
            self.store.save_levels(self.engine.levels, now)
            self.levels_at = now
            return outcome

        return self._run(work, now, then=then)

    def tick(self, now: int, then: Then = None) -> IngestResult:
        """Time passing: recalibrate when the schedule says so (the clock is injected; tests fast-forward it).
        Levels another instance calibrated (the store's calibration is not the one loaded) are taken up, and
        every account re-evaluated against them."""
        last = self.store.last_calibration()
        if last is None or now - last >= self.policy.recalibrate_every_s:
            return self.recalibrate(now, then)
        if last != self.levels_at:  # (not "newer": the instances' clocks may differ)
            return self._adopt_levels(now, then)
        return IngestResult()

    def _adopt_levels(self, now: int, then: Then) -> IngestResult:
        def work():
            self.levels_at = self.store.last_calibration()
            self.engine.set_levels(*self.store.load_levels())
            return self.engine.reevaluate(now, "warning levels recalibrated by another instance")

        return self._run(work, now, then=then)

    def change_tariffs(self, tariffs: dict[str, Tariff], now: int, then: Then = None) -> IngestResult:
        """A new tariff version: future intervals are priced by it; levels (which are costs) are recalibrated
        and every account re-evaluated in one vectorised pass."""
        with self.store.transaction():
            self.store.save_tariffs(tariffs)
        self.engine.update_tariffs(tariffs)
        return self.recalibrate(now, then)

    def reevaluate(self, now: int, then: Then = None) -> IngestResult:
        return self._run(lambda: self.engine.reevaluate(now), now, then=then)

    # -- internals -------------------------------------------------------------------------
    def _run(self, work, now: int, result: IngestResult | None = None, duplicates: int = 0,
             then: Then = None) -> IngestResult:
        result = result or IngestResult()
        if self._stale:
            self.reload()  # an earlier rebuild failed: never work on an engine ahead of the store
            self._stale = False
        try:
            with self.store.transaction():
                outcome: Outcome = work()
                if self.owned is not None:
                    self._keep_owned(outcome)
                self.store.write_outcome(outcome, now)
                if then is not None:
                    then(outcome, result)
        except BaseException:
            log_failure(log, "transaction failed; rebuilding the engine from the store")
            self._stale = True
            try:
                self.reload()
                self._stale = False
            except Exception:
                log.exception("rebuilding the engine failed; the next call tries again before any work")
            raise
        result.decisions = outcome.decisions
        result.accepted = outcome.accepted_count
        result.held = len(outcome.held)
        result.duplicates = outcome.duplicates + duplicates
        result.rejected = outcome.rejected
        return result

    def _keep_owned(self, outcome: Outcome) -> None:
        mask = self.owned()

        def ours(no: int) -> bool:
            return no < len(mask) and bool(mask[no])

        outcome.decisions = [d for d in outcome.decisions if ours(d.account_no)]
        outcome.state_rows = [r for r in outcome.state_rows if ours(r[0])]

    def _drop_redelivered(self, batch: ReadingBatch) -> tuple[ReadingBatch, int]:
        """Readings before a meter's last accepted one may be re-deliveries of recorded (or held) readings.

        Only that (normally empty) subset is looked up in the store; the rest never costs a query.
        """
        e = self.engine
        known = (batch.meter >= 0) & (batch.meter < len(e.meter_ids))
        old = np.zeros(len(batch), bool)
        old[known] = batch.t[known] < e.m_last_t[batch.meter[known]]
        if not old.any():
            return batch, 0
        recorded = self.store.known_readings([(int(m), int(t)) for m, t in zip(batch.meter[old], batch.t[old])])
        drop = np.zeros(len(batch), bool)
        for i in np.flatnonzero(old):
            drop[i] = (int(batch.meter[i]), int(batch.t[i]), *(int(x) for x in batch.regs[i])) in recorded
        if not drop.any():
            return batch, 0
        return batch.take(np.flatnonzero(~drop)), int(drop.sum())
