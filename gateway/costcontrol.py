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

import dataclasses
import hashlib
import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

import numpy as np

from gateway.accounting import Accounting, IngestResult
from gateway.cluster import LeaseLost, NotHeld, log_failure
from gateway.core.commands import RelayAction, RelayExplanation, RelayStatus, ReconnectMode, explain
from gateway.core.control import (
    AuditRecord,
    BusWork,
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
from gateway.core.dispatch import FieldStatus, FieldUpdate
from gateway.core.notices import ReceiptOutcome, split_request_id
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
        #: several instances on one database (gateway/cluster.py): the leases this instance acts for; None:
        #: this instance acts for everything
        self.cluster = None
        self.controller = self._load_controller(now)
        self._stale = False  # a failed transaction whose rebuild failed too: rebuild before any more work

    def attach(self, cluster, now: float | None = None) -> None:
        """Act only for the accounts on channels ``cluster`` holds: every transaction fenced by its leases,
        decisions for others dropped, the controller restored with owned accounts only."""
        self.cluster = cluster
        self.store.fence = self._fence
        if hasattr(self.store, "limit_idle_transactions"):  # frozen inside a transaction: the server ends it
            self.store.limit_idle_transactions(cluster.ttl_s)
        cluster.writer_committed_at = lambda: self.store.committed_at
        self.accounting.owned = lambda: cluster.owned_accounts(self.engine)
        self.reload(now)

    def _fence(self, store) -> None:
        """The cluster's fence, first in every transaction. A lease found lost makes memory stale (it still has
        that channel's notices, cases and commands): rebuilt before any more work, whichever path failed."""
        try:
            self.cluster.fence(store)
        except LeaseLost:
            self._stale = True
            raise

    def rescope(self, acting: dict[str, int], now: float) -> bool:
        """The leases to act for changed, or one was lost: engine and controller rebuilt from the store, AFTER
        the leases were taken (so what the previous holder committed is seen; its commands in flight are read
        back first). True if it reloaded (False: already loaded for exactly these)."""
        if acting == self.cluster.acting and not self._stale:
            return False
        self.cluster.acting = dict(acting)
        self.reload(now)
        return True

    def owns_channel(self, channel: str) -> bool:
        return self.cluster is None or channel in self.cluster.acting

    def owns_account(self, account_id: str) -> bool:
        return self._account_owner()(account_id)

    def _account_owner(self):
        """``owns_account`` for many accounts at a time: the cluster's mask looked up once."""
        if self.cluster is None:
            return lambda account_id: True
        mask, numbers = self.cluster.owned_accounts(self.engine), self.engine.account_no

        def owns(account_id: str) -> bool:
            no = numbers.get(account_id)
            return no is None or (no < len(mask) and bool(mask[no]))
        return owns

    def _account_channel(self, account_id: str) -> str:
        return self.cluster.account_channel(self.engine, account_id)

    @property
    def engine(self) -> Engine:
        return self.accounting.engine

    def _load_controller(self, now: float | None) -> Controller:
        c = Controller(self.config, self.engine, self._new_id)
        now = datetime.now().timestamp() if now is None else now
        state = self.store.control_state(now, self.config.keep_terminal_s,
                                         self.config.trips.notice_max_age_s + self.config.keep_terminal_s,
                                         c.calendar.day(int(now)).isoformat())
        if self.cluster is not None:
            state = self._owned_state(state)
        c.restore(now, **state)
        return c

    def _owned_state(self, state: dict) -> dict:
        """Only the owned accounts' notices, cases, commands and orders: the others' are their owner's."""
        e, owns_account = self.engine, self._account_owner()
        owns_meter = lambda m: m in e.meter_no and self.owns_channel(e.meter(m).channel)  # noqa: E731
        return {**state,
                "notices": [n for n in state["notices"] if owns_account(n.account_id)],
                "cases": [c for c in state["cases"] if owns_account(c.account_id)],
                "commands": [c for c in state["commands"] if owns_meter(c.meter_id)],
                "orders": [o for o in state["orders"] if owns_meter(o.meter_id)]}

    def reload(self, now: float | None = None) -> None:
        """Rebuild the engine and the controller from the store (after a failed transaction)."""
        self.accounting.reload()
        self.controller = self._load_controller(now)
        self._stale = False

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

        def tell() -> None:
            for listener in self.listeners:
                try:
                    listener(done)
                except Exception:
                    log.exception("a commit listener failed")

        self.store.after_commit(tell)  # in a group: once its COMMIT is done, never for one that failed

    @contextmanager
    def group(self, now: float):
        """The writer's group commit (:class:`gateway.writer.Writer`): the calls made inside share one
        transaction, each of them a savepoint. A COMMIT that fails leaves memory ahead of the store: both
        halves are rebuilt from it, as after any failed transaction."""
        self._fresh(now)
        try:
            with self.store.group():
                yield
        except BaseException:
            log_failure(log, "group commit failed; rebuilding from the store")
            self._rebuild_after_failure(now)
            raise

    def _with_engine(self, call, now: float, *args, credit_role: str = "billing", what: str = "engine",
                     size: int = 0, also=None) -> IngestResult:
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
            if also is not None:
                also(result.credits.conflicts if result.credits else [])

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

    def _control(self, work, now: float, what: str = "control", size: int = 1, also=None) -> Effects:
        """A controller input in one transaction; on failure both halves are rebuilt from the store."""
        started = time.perf_counter()
        self._fresh(now)
        try:
            with self.store.transaction():
                work()
                fx = self._flush(now)
                if also is not None:
                    also(fx.rejected)
        except BaseException:
            log_failure(log, "control transaction failed; rebuilding from the store")
            self._rebuild_after_failure(now)
            raise
        self._committed(what, fx, None, size, started, now)
        return fx

    # -- inputs -----------------------------------------------------------------------------------------
    def ingest_readings(self, batch: ReadingBatch, now: float,
                        relays: list[tuple[str, RelayStatus, float]] = ()) -> IngestResult:
        """A batch of readings and, from the same poll, the relays' positions with when each was read. With
        several instances only those of channels this instance acts for count (a poll cycle that ends just
        after its channel was handed over is dropped: its new holder reads them again)."""
        if self.cluster is not None:
            ours = self.cluster.acting_meters(self.engine)
            known = (batch.meter >= 0) & (batch.meter < len(ours))
            keep = np.zeros(len(batch), bool)
            keep[known] = ours[batch.meter[known]]
            if not keep.all():
                batch = batch.take(np.flatnonzero(keep))
                relays = [r for r in relays if r[0] in self.engine.meter_no and ours[self.engine.meter_no[r[0]]]]

        def call(then):
            def both(outcome, result):
                if relays:
                    self.controller.observe_relays(list(relays), now)
                then(outcome, result)
            return self.accounting.ingest_readings(batch, int(now), both)

        return self._with_engine(call, now, what="readings", size=len(batch))

    def ingest_credits(self, items: list[Payment | Adjustment], now: float, role: str = "billing",
                       consumed: "Drained | None" = None) -> IngestResult:
        """Payments and adjustments: committed once, and any close they cause committed with them; each new
        adjustment audited (``role``: of the operators who made them). With several instances, those for
        accounts another instance acts for go to the inbox, in the same transaction; ``consumed``: the inbox
        rows these items came from, deleted in it (and what is refused dead-lettered in it)."""
        mine, theirs = self._route(items, lambda i: i.account_id, self._account_channel)
        return self._with_engine(self.accounting.ingest_credits, now, mine, int(now), credit_role=role,
                                 what="credits", size=len(items), also=self._to_inbox(theirs, consumed, now))

    def _check_held(self, meter_ids: list[str]) -> None:
        """An operator's command acts on a meter only on the instance holding its channel
        (:class:`~gateway.cluster.NotHeld`, the API's 409, names the channel and its holder)."""
        if self.cluster is None:
            return
        for m in meter_ids:
            if m in self.engine.meter_no and not self.owns_channel(channel := self.engine.meter(m).channel):
                raise NotHeld(m, channel, self.cluster.holder(channel))

    # -- several instances: the inbox ---------------------------------------------------------------
    def _route(self, items: list, account_of, channel_of) -> tuple[list, list[tuple[object, str]]]:
        """``(mine, theirs)``: the items for accounts this instance acts for (or that name no known account:
        those are refused on the normal path), and the others with their account's channel."""
        if self.cluster is None:
            return list(items), []
        mine, theirs, owns = [], [], self._account_owner()
        for item in items:
            account = account_of(item)
            if account is None or account not in self.engine.account_no or owns(account):
                mine.append(item)
            else:
                theirs.append((item, channel_of(account)))
        return mine, theirs

    def _to_inbox(self, theirs: list[tuple[object, str]], consumed: "Drained | None", now: float):
        """The step, inside the input's transaction (given what it refused), that takes ``consumed`` rows out
        of the inbox, with a dead letter for each refused, and puts ``theirs`` in (after the delete: a row
        taken may go straight back, under the same key)."""
        if not theirs and consumed is None:
            return None

        def step(refused: list[tuple[object, str]]) -> None:
            if consumed is not None:
                self.store.consume_inbox(consumed.keys)
                self.store.add_events(consumed.dead_letters(refused, now))
            rows = []
            for item, channel in theirs:
                body = _inbox_body(item)
                credit = (item.account_id, _credit_id(item), item.amount_fen) \
                    if isinstance(item, (Payment, Adjustment)) else ()
                rows.append((inbox_key(item, body), channel, _INBOX_KIND[type(item)], body, now, *credit))
            self.store.put_inbox(rows)

        return step

    def _inbox_paid(self, account_id: str) -> int:
        """Payments and adjustments for the account waiting in the inbox, not in the ledger yet (fen)."""
        return 0 if self.cluster is None else self.store.inbox_credits_fen(account_id)

    def drain_inbox(self, now: float, limit: int = 500) -> int:
        """The inbox rows for the channels this instance acts for, ingested through the normal paths, each
        batch in the transaction that deletes its rows; what the domain refuses becomes a dead letter."""
        if self.cluster is None or not self.cluster.acting:
            return 0
        n = 0
        channels = sorted(self.cluster.acting)
        if self.cluster.home in self.cluster.acting:
            channels.append("")  # (rows for accounts without meters queued before they had a channel)
        for kind, ingest in (("credit", self.ingest_credits), ("adjustment", self.ingest_credits),
                             ("receipt", self.ingest_receipts),
                             ("field_update", self.ingest_field_updates)):
            while True:
                rows = self.store.inbox(channels, kind, limit)
                if not rows:
                    break
                items = [_from_inbox(kind, body) for _, body in rows]
                ingest(items, now, consumed=Drained(kind, items, rows))
                n += len(rows)
                if len(rows) < limit:
                    break
        return n

    def change_tariffs(self, tariffs: dict, now: float) -> IngestResult:
        """New tariff versions: stored, levels recalibrated, every account re-evaluated (decisions handled)."""
        return self._with_engine(self.accounting.change_tariffs, now, tariffs, int(now), what="tariffs",
                                 size=len(tariffs))

    def add_events(self, events: list[Event]) -> None:
        """Events from the edges (dead letters), committed on their own; an id already there is kept."""
        self._store_only(lambda: self.store.add_events(events), max((e.at for e in events), default=None))

    def mark_published(self, seqs: list[int], at: float) -> None:
        self._store_only(lambda: self.store.mark_published(seqs, at), at)

    def _store_only(self, work, now: float | None) -> None:
        """A transaction that changes nothing in memory; a lease it finds lost still rebuilds memory."""
        try:
            with self.store.transaction():
                work()
        except LeaseLost:
            self._rebuild_after_failure(now)
            raise

    def ingest_receipts(self, receipts: list[NoticeReceiptIn], now: float,
                        consumed: "Drained | None" = None) -> Effects:
        mine, theirs = self._route(receipts, self._receipt_account, self._account_channel)
        return self._control(lambda: self.controller.on_receipts(mine, now), now, "receipts", len(receipts),
                             also=self._to_inbox(theirs, consumed, now))

    def ingest_field_updates(self, updates: list[FieldUpdate], now: float,
                             consumed: "Drained | None" = None) -> Effects:
        mine, theirs = self._route(updates, self._order_account, self._account_channel)
        fresh = [u for u in mine if not self.store.field_update_seen(u.update_id)]
        return self._control(lambda: self.controller.on_field_updates(fresh, now), now, "field_updates",
                             len(updates), also=self._to_inbox(theirs, consumed, now))

    def _receipt_account(self, r: NoticeReceiptIn) -> str | None:
        """The account of the notice a receipt answers: ours in memory, else as the store has it."""
        try:
            nid = split_request_id(r.request_id)
        except ValueError:
            return None
        if nid in self.controller.notices:
            return self.controller.notices[nid].account_id
        return self.store.notice_account(nid)

    def _order_account(self, u: FieldUpdate) -> str | None:
        if u.order_id in self.controller.orders:
            return self.controller.orders[u.order_id].account_id
        found = self.store.order(u.order_id)
        return found.account_id if found is not None else None

    def set_area_flag(self, flag: AreaFlag, now: float, role: str = "area_flag") -> Effects:
        return self._control(lambda: self.controller.set_area_flag(flag, now, role), now, "area_flag")

    def set_forecast(self, forecast: Forecast, now: float) -> Effects:
        return self._control(lambda: self.controller.set_forecast(forecast, now), now, "forecast")

    def tick(self, now: float) -> Effects:
        """Time passing: recalibration when due (its decisions handled with it), then notices, gates, dispatch."""
        self._with_engine(self.accounting.tick, now, int(now), what="tick")

        def work():
            self._adopt_conditions(now)
            self.controller.tick(now)

        return self._control(work, now, "tick", 0)

    def _adopt_conditions(self, now: float) -> None:
        """Several instances: area flags and forecasts another instance recorded (an operator's flag through
        its API) count here too, at every tick and before every trip."""
        if self.cluster is not None:
            flags, forecasts = self.store.area_conditions(self.controller.calendar.day(int(now)).isoformat())
            self.controller.adopt_conditions(flags, forecasts, now)

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
        self._check_held(meter_ids)
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
            self._check_held([found.meter_id])
            raise ValueError(f"command {command_id} is {found.state.value}: nothing to cancel")
        problem: list[str] = []
        self._control(lambda: problem.append(self.controller.cancel(command_id, operator, role, reason, now)), now,
                      "cancel")
        if problem[0]:
            raise ValueError(problem[0])
        return self.controller.commands[command_id]

    # -- the executor's side ------------------------------------------------------------------------------
    def steps(self, now: float, bus: str | None = None) -> list[Step]:
        self._fresh(now)
        return self.controller.steps(now, bus)

    def due_buses(self, now: float) -> set[str]:
        self._fresh(now)
        return self.controller.due_buses(now)

    def bus_work(self, now: float, bus: str, limit: int, soon_s: float) -> BusWork:
        self._fresh(now)
        return self.controller.bus_work(now, bus, limit, soon_s)

    def authorize(self, command_id: str, now: float) -> Permit | Block:
        return self.authorize_many([command_id], now)[0]

    def authorize_many(self, command_ids: list[str], now: float) -> list[Permit | Block]:
        """Commit SENDING (or the block that stops the command) before any frame goes out; several commands
        in one transaction. Automatic trips see a fresh balance: the store's credits for the account, so
        every committed payment counts (with several instances, also those another instance received and put
        in the inbox, not drained yet)."""
        result: list = []

        commands = [self.controller.commands[i] for i in command_ids]

        def work():
            if any(c.action == RelayAction.TRIP for c in commands):
                self._adopt_conditions(now)
            for c in commands:
                balance = trip = None
                if c.action == RelayAction.TRIP:
                    credits = self.store.account_credits_fen(self.engine.account_no[c.account_id])
                    balance, trip = self.engine.fresh_balance(c.account_id, credits + self._inbox_paid(c.account_id))
                result.append(self.controller.authorize(c.command_id, now, balance, trip))

        self._control(work, now, "authorize", len(commands))
        return result

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


# -- inbox rows: the domain's inputs as JSON ----------------------------------------------------------------
_INBOX_KIND = {Payment: "credit", Adjustment: "adjustment", NoticeReceiptIn: "receipt",
               FieldUpdate: "field_update"}


def _credit_id(item: Payment | Adjustment) -> str:
    return item.payment_id if isinstance(item, Payment) else item.adjustment_id


def _inbox_body(item) -> str:
    return json.dumps(dataclasses.asdict(item), sort_keys=True, default=lambda v: v.value)


def inbox_key(item, body: str) -> str:
    """The inbox row's key: the item's own id with a digest of its content (a conflicting re-use of an id
    reaches the owner, which refuses it as it would have)."""
    own = next(getattr(item, k) for k in ("payment_id", "adjustment_id", "update_id", "request_id")
               if hasattr(item, k))
    return f"{_INBOX_KIND[type(item)]}:{own}:{hashlib.sha256(body.encode()).hexdigest()[:16]}"


def _from_inbox(kind: str, body: str):
    d = json.loads(body)
    if kind == "credit":
        return Payment(**d)
    if kind == "adjustment":
        return Adjustment(**d)
    if kind == "receipt":
        return NoticeReceiptIn(d["request_id"], ReceiptOutcome(d["outcome"]), d["at"], d["detail"])
    return FieldUpdate(d["update_id"], d["order_id"], FieldStatus(d["status"]), d["at"], d["crew"], d["note"])


class Drained:
    """Inbox rows of one kind taken for ingestion: deleted, and what the domain refuses dead-lettered, in the
    transaction that ingests them (a dead letter committed later could be lost)."""

    def __init__(self, kind: str, items: list, rows: list[tuple[str, str]]) -> None:
        self.kind = kind
        self.keys = [key for key, _ in rows]
        self._rows = {id(item): row for item, row in zip(items, rows)}

    def dead_letters(self, refused: list[tuple[object, str]], now: float) -> list[Event]:
        return [_inbox_dead_letter(self.kind, *self._rows[id(item)], reason, now)
                for item, reason in refused if id(item) in self._rows]


def _inbox_dead_letter(kind: str, key: str, body: str, reason: str, now: float) -> Event:
    return Event(f"dead_letter/inbox/{key}", "dead_letter", f"inbox/{kind}", now,
                 {"topic": f"inbox/{kind}", "reason": reason, "payload": body, "encoding": "utf-8"})
