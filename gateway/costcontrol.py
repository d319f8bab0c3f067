"""The cost-control shell: the engine and the relay controller, every input one transaction.

Readings and payments go through :class:`~gateway.accounting.Accounting`; the decisions they cause are
handed to the pure :class:`~gateway.core.control.Controller` inside the same transaction, and everything it
changed (notices, disconnect cases, relay commands, work orders, outbox events, audit records, verified
relay positions) is written before the commit. So a payment is never acknowledged before its close command
exists, a command's state is committed before its frame is sent, and a crash at any point leaves the store
consistent: after a restart both the engine and the controller are rebuilt from it.

One writer drives this (a dedicated thread in the service: :class:`gateway.writer.Writer`).
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import numpy as np

from gateway.accounting import Accounting, IngestResult
from gateway.core.commands import RelayAction, RelayExplanation, RelayStatus, ReconnectMode, explain
from gateway.core.control import (
    AuditRecord,
    AuthorityError,
    ControlConfig,
    Controller,
    Effects,
    Event,
    NoticeReceiptIn,
    Permit,
    SendResult,
    Step,
)
from gateway.core.dispatch import FieldUpdate
from gateway.core.engine import Engine, ReadingBatch
from gateway.core.model import Adjustment, Payment
from gateway.core.policy import AreaFlag, Block, Forecast
from gateway.core.thresholds import BAND_NAMES, ThresholdPolicy
from gateway.store.base import Store
from protocols.mqtt.billing import fen_to_yuan

log = logging.getLogger(__name__)

#: rows per outgoing batch event (payments applied, readings): keeps each MQTT message well under a broker's
#: size limits
ROWS_PER_EVENT = 1000


@dataclass(frozen=True)
class Committed:
    """What one committed transaction changed, for observers (metrics): never seen for a rolled-back one."""

    input: str  # readings, credits, tariffs, tick, receipts, field_updates, area_flag, forecast, manual,
    #             cancel, authorize, send_result, read_result ("engine" or "control" for an input that names none)
    effects: Effects  # what the controller changed (entities, events, audit records), as committed
    result: IngestResult | None  # the engine's side, for the engine's inputs
    size: int  # inputs in the transaction (readings in the batch, payments and adjustments, receipts...)
    seconds: float  # the transaction's time, from its start to its commit
    now: float


class CostControl:
    def __init__(self, store: Store, config: ControlConfig | None = None, policy: ThresholdPolicy | None = None,
                 now: float | None = None, new_id=None) -> None:
        self.store = store
        self.config = config or ControlConfig()
        self._new_id = new_id
        #: called on the writer thread after every commit with what it committed (keep them quick; one that
        #: raises is logged and does not disturb the others or the caller)
        self.listeners: list[Callable[[Committed], None]] = []
        self.accounting = Accounting(store, policy)
        self.controller = self._load_controller(now)
        self._stale = False  # a failed transaction whose rebuild failed too: rebuild before any more work

    @property
    def engine(self) -> Engine:
        return self.accounting.engine

    def _load_controller(self, now: float | None) -> Controller:
        c = Controller(self.config, self.engine, self._new_id)
        now = datetime.now().timestamp() if now is None else now
        state = self.store.control_state(now, self.config.keep_terminal_s,
                                         self.config.trips.notice_max_age_s + self.config.keep_terminal_s,
                                         c.calendar.day(int(now)).isoformat())
        c.restore(now, **state)
        return c

    def reload(self, now: float | None = None) -> None:
        """Rebuild the engine and the controller from the store (after a failed transaction)."""
        self.accounting.reload()
        self.controller = self._load_controller(now)

    def _fresh(self, now: float) -> None:
        """Never work on memory ahead of the store: a rebuild that failed is retried first (and raises)."""
        if self._stale:
            self.reload(now)
            self._stale = False

    def _rebuild_after_failure(self, now: float) -> None:
        self._stale = True
        try:
            self.reload(now)
            self._stale = False
        except Exception:
            log.exception("rebuilding from the store failed; the next call tries again before any work")

    # -- the one way effects are committed ---------------------------------------------------------
    def _flush(self, now: float) -> Effects:
        fx = self.controller.take_effects()
        if fx.relay_states:
            self.store.write_outcome(self.engine.apply_relay_states(fx.relay_states), int(now))
        self.store.write_effects(fx, now)
        return fx

    def _committed(self, what: str, fx: Effects, result: IngestResult | None, size: int, started: float,
                   now: float) -> None:
        if not self.listeners:
            return
        done = Committed(what, fx, result, size, time.perf_counter() - started, now)
        for listener in self.listeners:
            try:
                listener(done)
            except Exception:
                log.exception("a commit listener failed")

    def _with_engine(self, call, now: float, *args, credit_role: str = "billing", what: str = "engine",
                     size: int = 0) -> IngestResult:
        """An accounting input; the decisions it causes go to the controller in the same transaction, and the
        adjustments it commits to the audit log (``credit_role``: the role of who made them)."""
        started = time.perf_counter()
        flushed: list[Effects] = []

        def then(outcome, result: IngestResult) -> None:
            paid_at: dict[str, float] = {}
            for item in (result.credits.new if result.credits else ()):
                at = item.paid_at if isinstance(item, Payment) else item.at
                paid_at[item.account_id] = max(paid_at.get(item.account_id, 0), min(at, now))
            self.controller.on_decisions(outcome.decisions, now, paid_at)
            flushed.append(self._flush(now))
            self.store.append_audit([  # an operator's money, with who and why, in the transaction that moves it
                AuditRecord(now, a.operator, credit_role, a.kind, a.account_id, a.reason,
                            {"adjustment_id": a.adjustment_id, "amount_fen": a.amount_fen, "at": a.at})
                for a in (result.credits.new if result.credits else ()) if isinstance(a, Adjustment)])
            self.store.add_events(self._report(outcome, result, now))

        self._fresh(now)
        try:
            result = call(*args, then=then)
        except BaseException:
            self._rebuild_after_failure(now)
            raise
        if flushed:  # an input that ran no transaction (no recalibration due) committed nothing
            self._committed(what, flushed[0], result, size, started, now)
        return result

    def _report(self, outcome, result: IngestResult, now: float) -> list[Event]:
        """Events for upstream, committed with the input, in chunks of rows (one message per payment was half
        the bridge's work at thousands of payments a second): the payments applied with the balance they left,
        the readings accepted and the balances they left."""
        e = self.engine
        paid = [p for p in (result.credits.new if result.credits else ()) if isinstance(p, Payment)]
        after = e.balance(np.array([e.account_no[p.account_id] for p in paid], dtype=np.int64)) if paid else ()
        rows = [[p.payment_id, p.account_id, fen_to_yuan(p.amount_fen), fen_to_yuan(int(b))]
                for p, b in zip(paid, after)]
        events = [Event(self._event_id(), "payments_applied", "", now, {"rows": rows[lo:lo + ROWS_PER_EVENT]})
                  for lo in range(0, len(rows), ROWS_PER_EVENT)]
        acc = outcome.accepted
        if acc is None or not len(acc["meter"]):
            return events
        total_wh = acc["regs"][:, 0]
        for lo in range(0, len(acc["meter"]), ROWS_PER_EVENT):
            hi = lo + ROWS_PER_EVENT
            rows = [[e.meter_ids[m], int(t), int(wh), int(b)] for m, t, wh, b in
                    zip(acc["meter"][lo:hi], acc["t"][lo:hi], total_wh[lo:hi], acc["balance_fen"][lo:hi])]
            events.append(Event(self._event_id(), "readings", "", now, {"rows": rows}))
        idx = np.unique(acc["account"])
        bands = e.state[idx]
        rows = [[e.account_ids[a], int(b), BAND_NAMES[int(s)]] for a, b, s in zip(idx, e.balance(idx), bands)]
        events.append(Event(self._event_id(), "balances", "", now, {"rows": rows}))
        return events

    def _event_id(self) -> str:
        return self._new_id() if self._new_id else uuid.uuid4().hex

    def _control(self, work, now: float, what: str = "control", size: int = 1) -> Effects:
        """A controller input in one transaction; on failure both halves are rebuilt from the store."""
        started = time.perf_counter()
        self._fresh(now)
        try:
            with self.store.transaction():
                work()
                fx = self._flush(now)
        except BaseException:
            log.exception("control transaction failed; rebuilding from the store")
            self._rebuild_after_failure(now)
            raise
        self._committed(what, fx, None, size, started, now)
        return fx

    # -- inputs -----------------------------------------------------------------------------------------
    def ingest_readings(self, batch: ReadingBatch, now: float,
                        relays: list[tuple[str, RelayStatus, float]] = ()) -> IngestResult:
        """A batch of readings and, from the same poll, the relays' positions with when each was read."""
        def call(then):
            def both(outcome, result):
                if relays:
                    self.controller.observe_relays(list(relays), now)
                then(outcome, result)
            return self.accounting.ingest_readings(batch, int(now), both)

        return self._with_engine(call, now, what="readings", size=len(batch))

    def ingest_credits(self, items: list[Payment | Adjustment], now: float, role: str = "billing") -> IngestResult:
        """Payments and adjustments: committed once, and any close they cause committed with them; each new
        adjustment audited (``role``: of the operators who made them)."""
        return self._with_engine(self.accounting.ingest_credits, now, items, int(now), credit_role=role,
                                 what="credits", size=len(items))

    def change_tariffs(self, tariffs: dict, now: float) -> IngestResult:
        """New tariff versions: stored, levels recalibrated, every account re-evaluated (decisions handled)."""
        return self._with_engine(self.accounting.change_tariffs, now, tariffs, int(now), what="tariffs",
                                 size=len(tariffs))

    def add_events(self, events: list[Event]) -> None:
        """Events from the edges (dead letters), committed on their own; an id already there is kept."""
        with self.store.transaction():
            self.store.add_events(events)

    def mark_published(self, seqs: list[int], at: float) -> None:
        with self.store.transaction():
            self.store.mark_published(seqs, at)

    def ingest_receipts(self, receipts: list[NoticeReceiptIn], now: float) -> Effects:
        return self._control(lambda: self.controller.on_receipts(receipts, now), now, "receipts", len(receipts))

    def ingest_field_updates(self, updates: list[FieldUpdate], now: float) -> Effects:
        fresh = [u for u in updates if not self.store.field_update_seen(u.update_id)]
        return self._control(lambda: self.controller.on_field_updates(fresh, now), now, "field_updates",
                             len(updates))

    def set_area_flag(self, flag: AreaFlag, now: float, role: str = "area_flag") -> Effects:
        return self._control(lambda: self.controller.set_area_flag(flag, now, role), now, "area_flag")

    def set_forecast(self, forecast: Forecast, now: float) -> Effects:
        return self._control(lambda: self.controller.set_forecast(forecast, now), now, "forecast")

    def tick(self, now: float) -> Effects:
        """Time passing: recalibration when due (its decisions handled with it), then notices, gates, dispatch."""
        self._with_engine(self.accounting.tick, now, int(now), what="tick")
        return self._control(lambda: self.controller.tick(now), now, "tick", 0)

    def manual(self, meter_id: str, action: RelayAction, operator: str, role: str, reason: str, key: str,
               now: float, mode: ReconnectMode | None = None):
        """An operator's trip or close. A refusal (authority) is audited, committed and raised."""
        made = self.manual_many([meter_id], action, operator, role, reason, key, now, mode)[0]
        if isinstance(made, AuthorityError):
            raise made
        return made

    def manual_many(self, meter_ids: list[str], action: RelayAction, operator: str, role: str, reason: str,
                    key: str, now: float, mode: ReconnectMode | None = None, then=None) -> list:
        """Operator commands for several meters under one request key, all in one transaction, with
        ``then(store, made)`` last in it (an approval recorded with the commands it makes). Each meter gets its
        command, or the :class:`AuthorityError` that refused it (audited, committed). The same key again, even
        after a restart, gives the same commands."""
        stored = {m: self.store.command(f"manual:{key}:{m}") for m in meter_ids}
        existing = {m: c for m, c in stored.items() if c is not None and c.action == action}
        if then is None and len(existing) == len(meter_ids):
            return list(existing.values())
        made: list = []

        def work():
            for m in meter_ids:
                if m in existing:
                    made.append(existing[m])
                    continue
                try:  # a key the other action used is refused by the controller (audited)
                    made.append(self.controller.manual(m, action, operator, role, reason, key, now, mode,
                                                       earlier=stored[m]))
                except AuthorityError as exc:  # the refusal is audited: commit that, hand it back
                    made.append(exc)
            if then is not None:
                then(self.store, made)

        self._control(work, now, "manual", len(meter_ids))
        return made

    def cancel(self, command_id: str, operator: str, role: str, reason: str, now: float):
        """An operator stops a relay command not yet on the wire: the command as it is now. Raises
        :class:`KeyError` for an unknown command and :class:`ValueError` for one that cannot be cancelled."""
        if command_id not in self.controller.commands:
            found = self.store.command(command_id)
            if found is None:
                raise KeyError(f"unknown command {command_id!r}")
            raise ValueError(f"command {command_id} is {found.state.value}: nothing to cancel")
        problem: list[str] = []
        self._control(lambda: problem.append(self.controller.cancel(command_id, operator, role, reason, now)), now,
                      "cancel")
        if problem[0]:
            raise ValueError(problem[0])
        return self.controller.commands[command_id]

    # -- the executor's side ------------------------------------------------------------------------------
    def steps(self, now: float, bus: str | None = None) -> list[Step]:
        return self.controller.steps(now, bus)

    def next_step(self, now: float, bus: str) -> Step | None:
        return self.controller.next_step(now, bus)

    def due_buses(self, now: float) -> set[str]:
        return self.controller.due_buses(now)

    def authorize(self, command_id: str, now: float) -> Permit | Block:
        """Commit SENDING (or the block that stops the command) before any frame goes out. Automatic trips
        see a fresh balance: the store's credits for the account, so every committed payment counts."""
        c = self.controller.commands[command_id]
        result: list = []

        def work():
            balance = trip = None
            if c.action == RelayAction.TRIP:
                balance, trip = self.engine.fresh_balance(
                    c.account_id, self.store.account_credits_fen(self.engine.account_no[c.account_id]))
            result.append(self.controller.authorize(command_id, now, balance, trip))

        self._control(work, now, "authorize")
        return result[0]

    def send_result(self, command_id: str, now: float, result: SendResult, detail: str = "",
                    errors: tuple[str, ...] = (), status: RelayStatus | None = None) -> Effects:
        return self._control(lambda: self.controller.on_send_result(command_id, now, result, detail, errors, status),
                             now, "send_result")

    def read_result(self, step: Step, now: float, status: RelayStatus | None, why: str = "") -> Effects:
        return self._control(lambda: self.controller.on_read_result(step, now, status, why), now, "read_result")

    # -- queries --------------------------------------------------------------------------------------------
    def why(self, meter_id: str) -> RelayExplanation:
        """Why is this meter off (or on)? From what the store says, for a call-centre agent."""
        if meter_id not in self.engine.meter_no:
            raise KeyError(f"unknown meter {meter_id!r}")
        fmt = self.controller.fmt
        return explain(meter_id, self.store.relay_row(meter_id), self.store.meter_commands(meter_id),
                       self.store.meter_orders(meter_id), fmt)
