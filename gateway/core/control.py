"""Disconnect and reconnect, done right: the pure controller between the engine's decisions and the relays.

Inputs (each with the time, from an injected clock): the engine's decisions, notice receipts, field
updates, relay read-backs and observations, area flags and forecasts, operators' requests, and time passing.
Outputs: the entities that changed (notices, disconnect cases, relay commands, work orders), events for the
outbox, audit records and verified relay states, collected in :class:`Effects`, which the shell commits in
the transaction that carried the input. Nothing here does I/O.

A trip request opens a **disconnect case** for the account. The case passes the gates in order: customer
class, meter keep-power, grace period, a confirmed notice at least the lead time old and not stale (sending a
notice of disconnection through every channel when there is none), the forbidden windows, weather and the
daily cap per area (which spreads trips over the permitted hours), then a final reminder, confirmed, at least
its lead before the cut. Only then are trip commands made; at the moment of sending every gate is checked
again, with a fresh balance that sees every committed payment. A payment that clears the arrears cancels the
case and every trip not yet in flight, and closes (ahead of any trip) every relay that is open or may be.
"""
from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Callable, Iterable, NamedTuple, Protocol

from .commands import (
    Command,
    CommandMachine,
    CommandPolicy,
    CommandState,
    Failure,
    ReconnectMode,
    RelayAction,
    RelayStatus,
    StepKind,
)
from .dispatch import DispatchPolicy, Dispatcher, FieldUpdate, OrderKind, OrderState, WorkOrder
from .engine import Decision, DecisionKind
from .model import Account, CostControlMode, Meter, RelayStateChanged
from .notices import (
    DISCONNECT_NOTICES,
    Notice,
    NoticePolicy,
    NoticePurpose,
    NoticeRequest,
    NoticeState,
    Notifier,
    ReceiptOutcome,
    split_request_id,
)
from .policy import AreaFlag, Block, Conditions, Forecast, Gate, Gates, PolicyError, TripPolicy, WorkCalendar

ENGINE = "engine"  # the actor (and role) of automatic commands
PRUNE_EVERY_S = 60  # how often finished entities are looked for to forget (a scan of everything in memory)
ROLES = ("viewer", "operator", "supervisor", "admin")


class AuthorityError(PermissionError):
    """A manual relay command refused: no identity, a role that does not allow it, or no reason."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class AuthorityPolicy:
    manual_trip_roles: tuple[str, ...] = ("operator", "supervisor", "admin")
    manual_close_roles: tuple[str, ...] = ("operator", "supervisor", "admin")
    protected_trip_roles: tuple[str, ...] = ("supervisor", "admin")  # manual trips of protected and VIP accounts

    def __post_init__(self) -> None:
        for name in ("manual_trip_roles", "manual_close_roles", "protected_trip_roles"):
            unknown = [r for r in getattr(self, name) if r not in ROLES]
            if unknown:
                raise PolicyError(f"{name}: unknown role(s) {unknown}; allowed: {', '.join(ROLES)}")


@dataclass(frozen=True)
class CalendarPolicy:
    utc_offset_s: int = 8 * 3600
    country: str = "CN"
    extra_holidays: tuple[str, ...] = ()  # ISO dates announced before the holidays package caught up
    extra_workdays: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not -12 * 3600 <= self.utc_offset_s <= 14 * 3600:
            raise PolicyError(f"utc_offset_s {self.utc_offset_s} is not a time zone offset (-12h..+14h)")
        self.calendar()  # the country is known and the dates are dates

    def calendar(self) -> WorkCalendar:
        return WorkCalendar(self.utc_offset_s, self.country, tuple(self.extra_holidays), tuple(self.extra_workdays))


@dataclass(frozen=True)
class ControlConfig:
    trips: TripPolicy = field(default_factory=TripPolicy)
    notices: NoticePolicy = field(default_factory=NoticePolicy)
    commands: CommandPolicy = field(default_factory=CommandPolicy)
    dispatch: DispatchPolicy = field(default_factory=DispatchPolicy)
    authority: AuthorityPolicy = field(default_factory=AuthorityPolicy)
    calendar: CalendarPolicy = field(default_factory=CalendarPolicy)
    final_reminder_margin_s: int = 900  # the reminder is requested this long before it is needed
    notice_retry_s: int = 24 * 3600  # after every channel failed, a new notice of disconnection this much later
    balance_recheck_s: int = 3600  # a case held by a balance above the trip level is looked at again this often
    keep_terminal_s: int = 24 * 3600  # finished commands and cases stay in memory this long (the store keeps all)

    def __post_init__(self) -> None:
        if self.final_reminder_margin_s < 0:
            raise PolicyError("final_reminder_margin_s must not be negative")
        for name in ("notice_retry_s", "balance_recheck_s", "keep_terminal_s"):
            if getattr(self, name) <= 0:
                raise PolicyError(f"{name} must be positive")


class Directory(Protocol):
    """Who is who: the engine's registry serves (accounts, meters, which meters an account has)."""

    def account(self, account_id: str) -> Account: ...

    def meter(self, meter_id: str) -> Meter: ...

    def meters_of_account(self, account_id: str) -> list[Meter]: ...

    def has_area(self, area: str) -> bool: ...  # some account is in it

    def balance_and_level(self, account_id: str) -> tuple[int, int]: ...  # balance and trip level, fen

    def in_trip_band(self, account_id: str) -> bool: ...


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Event:
    """An outgoing event (outbox): ``event_id`` is unique, for consumers to de-duplicate on."""

    event_id: str
    kind: str
    subject: str  # the account or meter it is about
    at: float
    payload: dict


@dataclass(frozen=True)
class AuditRecord:
    at: float
    actor: str
    role: str
    action: str
    subject: str
    reason: str
    detail: dict


@dataclass
class Effects:
    notices: dict = field(default_factory=dict)  # id -> Notice, changed
    cases: dict = field(default_factory=dict)
    commands: dict = field(default_factory=dict)
    orders: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    audit: list = field(default_factory=list)
    relay_states: list = field(default_factory=list)  # verified relay positions, for the engine and the store
    flags: list = field(default_factory=list)  # AreaFlag changes
    forecasts: list = field(default_factory=list)
    field_updates: list = field(default_factory=list)  # applied or stale: recorded so re-deliveries are known
    rejected: list = field(default_factory=list)  # (input, reason): dead-letter with the reason

    def __bool__(self) -> bool:
        return any((self.notices, self.cases, self.commands, self.orders, self.events, self.audit,
                    self.relay_states, self.flags, self.forecasts, self.field_updates, self.rejected))


@dataclass(frozen=True)
class Step:
    """Work for the executor: read a meter's relay, or send a command's frame."""

    kind: StepKind
    subject: str  # "command" or "order"
    subject_id: str
    meter_id: str
    priority: int
    due_at: float


class BusWork(NamedTuple):
    """A bus's worker's next batch (:meth:`Controller.bus_work`)."""

    steps: list[Step]  # due now, for the executor to do back to back
    soon: list[Step]  # read-backs falling due shortly, not yet due
    due_at: float | None  # when the bus's next step falls due


@dataclass(frozen=True)
class Permit:
    """Send now: the command's action, reconnect mode and the frame's validity deadline."""

    command_id: str
    meter_id: str
    action: RelayAction
    mode: ReconnectMode
    valid_until: float


class SendResult(str, Enum):
    ACKNOWLEDGED = "acknowledged"
    NO_ANSWER = "no_answer"  # timeout or link lost after writing: the outcome is unknown
    REFUSED = "refused"  # an abnormal reply with an error word
    NOT_SENT = "not_sent"  # the link could not be opened: nothing went out


@dataclass(frozen=True)
class NoticeReceiptIn:
    """A receipt from upstream for one notice request."""

    request_id: str
    outcome: ReceiptOutcome
    at: float
    detail: str = ""


# --------------------------------------------------------------------------- disconnect cases


class CaseState(str, Enum):
    WAITING = "waiting"  # a gate holds it: see gate, gate_reason, next_check_at
    SCHEDULED = "scheduled"  # a slot in the day's plan; final reminder and cut to come
    TRIPPING = "tripping"  # trip commands made
    TRIPPED = "tripped"
    BLOCKED = "blocked"  # keep-power, or no channel reached the customer: waits for an event or a retry
    CANCELLED = "cancelled"  # the customer paid, or an operator intervened
    FAILED = "failed"  # the trip failed remotely

    @property
    def active(self) -> bool:
        return self in (CaseState.WAITING, CaseState.SCHEDULED, CaseState.TRIPPING, CaseState.BLOCKED)


@dataclass
class TripCase:
    case_id: str  # the trip request decision's id
    account_id: str
    opened_at: float
    balance_fen: int
    state: CaseState = CaseState.WAITING
    gate: str = ""  # the gate holding the case now ("" when none)
    gate_reason: str = ""
    next_check_at: float | None = None
    plan_day: str = ""  # ISO local date of the planned cut
    planned_at: float | None = None
    notice_id: str = ""  # the notice of disconnection this case asked for, if it had to
    final_notice_id: str = ""
    command_ids: list = field(default_factory=list)
    rounds: int = 0  # times trip commands were made (a gate at send time sends the case back to planning)
    notices_made: int = 0  # notices this case asked for (their ids count on from here, never reused)
    closed_at: float | None = None
    closed_reason: str = ""
    updated_at: float = 0.0


# --------------------------------------------------------------------------- the controller


class _Due:
    """The ids of one kind of entity by when time alone moves it next (``time_of(id)``; None: not by time): a
    heap of (time, id). An id is looked at again once its entity was touched (its time read at the next look,
    after the change) or came due (it stays due while its time says so); an entry that is no longer its
    entity's time is dropped when met. So the tick costs what changed and what is due, not everything."""

    def __init__(self, time_of: Callable[[str], float | None]) -> None:
        self.time_of = time_of
        self.heap: list[tuple[float, str]] = []
        self.at: dict[str, float] = {}  # id -> its time on the heap
        self.changed: set[str] = set()

    def touch(self, key: str) -> None:
        self.changed.add(key)

    def due(self, now: float) -> list[str]:
        """The ids due at ``now``, earliest first."""
        for key in self.changed:
            t = self.time_of(key)
            if t == self.at.get(key):
                continue
            if t is None:
                del self.at[key]
                continue
            self.at[key] = t
            heapq.heappush(self.heap, (t, key))
        self.changed.clear()
        if len(self.heap) > 2 * len(self.at) + 64:  # mostly stale entries
            self.heap = [(t, k) for k, t in self.at.items()]
            heapq.heapify(self.heap)
        out = []
        while self.heap and self.heap[0][0] <= now:
            t, key = heapq.heappop(self.heap)
            if self.at.get(key) == t:
                out.append(key)
                del self.at[key]
                self.changed.add(key)  # still due next time unless what is done with it now moves its time
        return out


class Controller:
    def __init__(self, config: ControlConfig, directory: Directory,
                 new_id: Callable[[], str] | None = None) -> None:
        self.cfg = config
        self.dir = directory
        self._new_id = new_id or (lambda: uuid.uuid4().hex)
        self.calendar = config.calendar.calendar()
        self.conditions = Conditions()
        self.gates = Gates(config.trips, self.calendar, self.conditions)
        self.notifier = Notifier(config.notices, self.calendar)
        self.machine = CommandMachine(config.commands)
        self.dispatcher = Dispatcher(config.dispatch)
        self.notices: dict[str, Notice] = {}
        self.cases: dict[str, TripCase] = {}
        self.commands: dict[str, Command] = {}
        self.orders: dict[str, WorkOrder] = {}
        self.relays: dict[str, RelayStatus] = {}  # meters whose relay is open, commanded open or in keep-power
        # when each meter's relay was last seen: a poll that read it before a read-back but is committed after
        # it must not put an old position back
        self._relay_seen_at: dict[str, float] = {}
        self._notices_of: dict[str, list[str]] = {}
        self._case_of: dict[str, str] = {}  # account -> its active case
        self._commands_of: dict[str, list[str]] = {}  # meter -> its commands in memory, oldest first
        # bus -> commands that may still be active (finished ones are dropped when met): the executor asks per
        # bus and per step, so a step costs what that bus has pending, not everything in memory
        self._pending_by_bus: dict[str, set[str]] = {}
        # the executor's index (due_buses, next_step_at): per meter, when a step of it falls due and when it
        # next has work; per bus, heaps of those (an entry no longer the meter's is dropped when met). Meters
        # are recomputed only once changed (touched), so a pass costs what changed and a look per bus, not a
        # scan of every pending command
        self._step_times: dict[str, tuple[float | None, float | None]] = {}  # meter -> (due_at, wake_at)
        self._timed_on: dict[str, set[str]] = {}  # bus -> meters with a time in _step_times
        self._heaps: tuple[dict[str, list], dict[str, list]] = ({}, {})  # bus -> [(due_at, meter)], [(wake_at, ..)]
        self._changed_meters: set[str] = set()
        self._orders_of: dict[str, set[str]] = {}  # meter -> its orders in memory
        # the tick's field-order check looks at the commands changed since its last look and those whose time
        # to get one (machine.order_time) came, not at every command in memory
        self._order_check: set[str] = set()
        self._order_times: list[tuple[float, str]] = []  # heap of (order_time, command id)
        self._notices_due = _Due(lambda i: n.due_at if (n := self.notices.get(i)) is not None and n.state.active
                                 else None)
        self._cases_due = _Due(lambda i: c.next_check_at if (c := self.cases.get(i)) is not None and c.state.active
                               else None)
        self._escalations_due = _Due(lambda i: self.dispatcher.next_escalation_at(o)
                                     if (o := self.orders.get(i)) is not None else None)
        self._pruned_at = float("-inf")
        self._plans: dict[tuple[str, str], dict[str, float]] = {}  # (area, day) -> case id -> slot
        self._fx = Effects()

    # ------------------------------------------------------------------ restore and effects

    def restore(self, now: float, notices: list[Notice], cases: list[TripCase], commands: list[Command],
                orders: list[WorkOrder], relays: dict[str, RelayStatus], relay_seen_at: dict[str, float],
                flags: list[AreaFlag], forecasts: list[Forecast]) -> None:
        """Load what the store says after a restart (active entities and the recent ones the gates need)."""
        for n in notices:
            self._add_notice(n)
        for c in sorted(cases, key=lambda c: c.opened_at):
            self._add_case(c)
        for c in sorted(commands, key=lambda c: c.created_at):
            if c.state == CommandState.SENDING:
                # the gateway stopped between committing SENDING and hearing back: the frame may have gone out,
                # so read the relay before anything is sent again
                settle = self.machine.policy.for_action(c.action).settle_s
                c.state, c.next_at, c.verify_until = CommandState.VERIFYING, now, now + settle
                c.last_error = "the gateway restarted while sending: outcome unknown, reading back"
            self._add_command(c)
        for o in orders:
            self._add_order(o)
        self.relays = dict(relays)
        self._relay_seen_at = dict(relay_seen_at)
        for f in flags:
            self.conditions.flags[(f.area, f.flag)] = f
        for fc in forecasts:
            self.conditions.forecasts[(fc.area, fc.day)] = fc
        self._fx = Effects()

    def take_effects(self) -> Effects:
        fx, self._fx = self._fx, Effects()
        return fx

    def _emit(self, kind: str, subject: str, now: float, /, **payload) -> None:
        self._fx.events.append(Event(self._new_id(), kind, subject, now, payload))

    def _audit(self, now: float, actor: str, role: str, action: str, subject: str, reason: str, **detail) -> None:
        self._fx.audit.append(AuditRecord(now, actor, role, action, subject, reason, detail))

    def _touch(self, obj) -> None:
        if isinstance(obj, Notice):
            self._fx.notices[obj.notice_id] = obj
            self._notices_due.touch(obj.notice_id)
        elif isinstance(obj, TripCase):
            self._fx.cases[obj.case_id] = obj
            self._cases_due.touch(obj.case_id)
        elif isinstance(obj, Command):
            self._fx.commands[obj.command_id] = obj
            self._changed_meters.add(obj.meter_id)
            self._order_check.add(obj.command_id)
        elif isinstance(obj, WorkOrder):
            self._fx.orders[obj.order_id] = obj
            self._changed_meters.add(obj.meter_id)
            self._escalations_due.touch(obj.order_id)

    def _add_order(self, o: WorkOrder) -> None:
        self.orders[o.order_id] = o
        self._orders_of.setdefault(o.meter_id, set()).add(o.order_id)
        self._escalations_due.touch(o.order_id)
        self._changed_meters.add(o.meter_id)

    def _add_notice(self, n: Notice) -> None:
        if n.notice_id not in self.notices:
            self._notices_of.setdefault(n.account_id, []).append(n.notice_id)
        self.notices[n.notice_id] = n
        self._notices_due.touch(n.notice_id)

    def _add_case(self, c: TripCase) -> None:
        self.cases[c.case_id] = c
        self._cases_due.touch(c.case_id)
        if c.state.active:
            self._case_of[c.account_id] = c.case_id
        if c.plan_day and c.planned_at is not None and c.state != CaseState.CANCELLED:
            self._plans.setdefault((self._area(c.account_id), c.plan_day), {})[c.case_id] = c.planned_at

    def _add_command(self, c: Command) -> None:
        if c.command_id not in self.commands:
            self._commands_of.setdefault(c.meter_id, []).append(c.command_id)
        self.commands[c.command_id] = c
        self._changed_meters.add(c.meter_id)
        self._order_check.add(c.command_id)
        if (at := self.machine.order_time(c)) is not None:
            heapq.heappush(self._order_times, (at, c.command_id))
        if c.state.active:
            self._pending_by_bus.setdefault(self.dir.meter(c.meter_id).channel, set()).add(c.command_id)

    def _pending(self, bus: str | None = None) -> list[Command]:
        """Active commands (of one bus, or all), forgetting finished ones on the way."""
        out = []
        for b in ([bus] if bus is not None else list(self._pending_by_bus)):
            ids = self._pending_by_bus.get(b)
            if not ids:
                continue
            done = [i for i in ids if not self.commands[i].state.active]
            ids.difference_update(done)
            out.extend(self.commands[i] for i in ids)
        return out

    def _area(self, account_id: str) -> str:
        return self.dir.account(account_id).area

    # ------------------------------------------------------------------ inputs: decisions

    def on_decisions(self, decisions: list[Decision], now: float, paid_at: dict[str, float] | None = None) -> None:
        """The engine's decisions, committed with the input that caused them. ``paid_at``: for accounts whose
        arrears a payment cleared, when it was paid (the reconnect deadline runs from then)."""
        paid_at = paid_at or {}
        # a balance that fell through several levels at once gets one notice, the most severe: the notice of
        # disconnection when it reached the trip level, else the highest warning
        worst: dict[str, Decision] = {}
        for d in decisions:
            if d.kind in (DecisionKind.NOTICE, DecisionKind.TRIP):
                w = worst.get(d.account_id)
                if w is None or (d.kind == DecisionKind.TRIP) > (w.kind == DecisionKind.TRIP) or \
                        (d.kind == w.kind and d.level > w.level):
                    worst[d.account_id] = d
        for d in decisions:
            if d.kind == DecisionKind.NOTICE and worst.get(d.account_id) is not d:
                continue
            if d.kind == DecisionKind.NOTICE:
                purpose = NoticePurpose.WARNING_1 if d.level == 1 else NoticePurpose.WARNING_2
                self._new_notice(d.account_id, purpose, d.decision_id, now,
                                 {"level": d.level, "balance_fen": d.balance_fen})
            elif d.kind == DecisionKind.TRIP:
                self._open_case(d, now)
            elif d.kind == DecisionKind.ACCOUNT_MANAGER:
                acct = self.dir.account(d.account_id)
                self._emit("account_manager_task", d.account_id, now, decision_id=d.decision_id,
                           customer_class=acct.customer_class.value, balance_fen=d.balance_fen,
                           reason=f"{acct.customer_class.value} account at the trip level: never tripped "
                                  f"automatically; an account manager contacts the customer")
            elif d.kind in (DecisionKind.CANCEL_TRIP, DecisionKind.CLOSE):
                self._recover(d, now, paid_at.get(d.account_id))

    def _open_case(self, d: Decision, now: float) -> None:
        if d.account_id in self._case_of:
            return  # one case per account at a time
        case = TripCase(d.decision_id, d.account_id, now, d.balance_fen, next_check_at=now, updated_at=now)
        self._add_case(case)
        self._touch(case)
        self._emit("disconnect_case_opened", d.account_id, now, case_id=case.case_id, balance_fen=d.balance_fen)
        self._evaluate(case, now)

    def _recover(self, d: Decision, now: float, paid_at: float | None) -> None:
        """Arrears cleared: cancel the case, its notices, every trip of ours not yet in flight and every
        disconnect order; close what is open or may be (a trip in flight cannot be recalled: the close follows
        it, ahead of everything else; a trip that got no answer may have acted: the close reads back first)."""
        why = f"arrears cleared: balance {d.balance_fen} fen ({d.reason})"
        case_id = self._case_of.get(d.account_id)
        if case_id:
            self._close_case(self.cases[case_id], now, CaseState.CANCELLED, why)
        self._cancel_disconnect_notices(d.account_id, now, why)
        paid = paid_at if paid_at is not None else d.at
        for meter in self.dir.meters_of_account(d.account_id):
            maybe_open = self._cancel_engine_trips(meter.meter_id, now, why)
            for o in list(self.orders.values()):
                if o.meter_id == meter.meter_id and o.kind == OrderKind.DISCONNECT:
                    self._cancel_order(o, now, "the customer paid")
            status = self.relays.get(meter.meter_id)
            is_open = status is not None and status.open
            if not (maybe_open or is_open):
                continue
            held = self._opened_by_operator(meter.meter_id)
            if held is not None and not maybe_open:
                # opened on purpose by an operator, not for arrears: the payment does not undo that
                self._emit("close_withheld", meter.meter_id, now, account_id=d.account_id, decision_id=d.decision_id,
                           command_id=held.command_id, actor=held.actor, reason=held.reason,
                           detail="the relay was opened by an operator; a manual close is needed")
                continue
            self._submit(self._close_command(meter, d.account_id, d.decision_id, f"arrears cleared: balance "
                                             f"{d.balance_fen} fen", now, paid, readback_first=not is_open), now)

    def _cancel_disconnect_notices(self, account_id: str, now: float, why: str) -> None:
        for nid in self._notices_of.get(account_id, []):
            n = self.notices[nid]
            if n.purpose in (NoticePurpose.DISCONNECT, NoticePurpose.FINAL_REMINDER) and \
                    self.notifier.cancel(n, now, why):
                self._touch(n)

    def _cancel_engine_trips(self, meter_id: str, now: float, why: str) -> bool:
        """Cancel our trips of this meter not yet in flight; True if one of them may have opened the relay
        (in flight, or sent without a verified outcome since the last close we confirmed)."""
        mine = [self.commands[i] for i in self._commands_of.get(meter_id, ())
                if self.commands[i].action == RelayAction.TRIP and self.commands[i].actor == ENGINE]
        last_close = max((c.confirmed_at or 0 for c in self._acted(meter_id) if c.action == RelayAction.CLOSE),
                         default=0)
        maybe_open = False
        for c in mine:
            if c.state.in_flight:
                maybe_open = True
            elif c.state.active:
                if self.machine.cancel(c, now, why):
                    maybe_open = maybe_open or c.attempts > 0
                    self._command_changed(c, now, "relay_cancelled")
            elif c.state != CommandState.CONFIRMED and c.attempts > 0 and c.created_at > last_close:
                maybe_open = True  # sent, failed or stopped without a verified position
        return maybe_open

    def _acted(self, meter_id: str) -> list[Command]:
        """Confirmed commands of the meter that moved (or set) its relay, newest first; a command confirmed by
        finding the relay already where it wanted it did nothing."""
        out = [self.commands[i] for i in self._commands_of.get(meter_id, ()) if self.commands[i].acted]
        return sorted(out, key=lambda c: c.confirmed_at or 0, reverse=True)

    def _opened_by_operator(self, meter_id: str) -> Command | None:
        """The operator's trip that opened this meter's relay, if the last command that acted is one."""
        acted = self._acted(meter_id)
        last = acted[0] if acted else None
        if last is not None and last.action == RelayAction.TRIP and last.actor != ENGINE:
            return last
        return None

    def _close_command(self, meter: Meter, account_id: str, origin: str, reason: str, now: float, paid: float,
                       readback_first: bool) -> Command:
        p = self.cfg.commands.close
        return Command(f"close:{origin}:{meter.meter_id}", meter.meter_id, account_id, RelayAction.CLOSE,
                       ENGINE, ENGINE, reason, origin, now, now + p.ttl_s, mode=ReconnectMode(meter.reconnect_mode),
                       readback_first=readback_first, payment_at=paid,
                       deadline_at=paid + self.cfg.dispatch.reconnect_deadline_s, updated_at=now)

    # ------------------------------------------------------------------ inputs: the world

    def on_receipts(self, receipts: list[NoticeReceiptIn], now: float) -> None:
        for r in receipts:
            try:
                nid = split_request_id(r.request_id)
            except ValueError as exc:
                self._fx.rejected.append((r, str(exc)))
                continue
            n = self.notices.get(nid)
            if n is None:
                self._fx.rejected.append((r, f"unknown notice request {r.request_id!r}"))
                continue
            acct = self.dir.account(n.account_id)
            try:
                step = self.notifier.receipt(n, r.request_id, r.outcome, r.at, now, r.detail, acct.contacts,
                                             acct.address)
            except (KeyError, ValueError) as exc:
                self._fx.rejected.append((r, str(exc).strip("'\"")))
                continue
            self._notice_step(n, step, now)
            self._notice_changed(n, now)

    def on_field_updates(self, updates: list[FieldUpdate], now: float) -> None:
        for u in updates:
            o = self.orders.get(u.order_id)
            if o is None:
                self._fx.rejected.append((u, f"unknown or closed work order {u.order_id!r}"))
                continue
            try:
                result = self.dispatcher.apply(o, u, now)
            except ValueError as exc:
                self._fx.rejected.append((u, str(exc)))
                continue
            self._fx.field_updates.append((u, result))
            if result == "applied":
                self._touch(o)
                self._emit("field_order_updated", o.meter_id, now, order_id=o.order_id, state=o.state.value,
                           crew=o.crew, note=u.note, update_id=u.update_id)
                self._audit(now, u.crew or "field", "field", f"field_{u.status.value}", o.meter_id,
                            u.note, order_id=o.order_id)

    def observe_relays(self, observations: list[tuple[str, RelayStatus, float]], now: float) -> None:
        """Relay positions read by the poller (status word 3 on every cycle), each with when it was read:
        keep-power changes reopen the gates, a reconnect the customer or a crew made confirms a close still
        waiting to retry. A position read before the last one known is history, not news."""
        for meter_id, status, seen_at in observations:
            old = self.relays.get(meter_id)
            if not self._relay_seen(meter_id, status, seen_at):
                continue  # no news: the same position, or one older than what is known
            for c in self._active_commands(meter_id):
                if c.state.in_flight:
                    continue
                if c.target_reached(status) and (c.action == RelayAction.CLOSE or c.attempts > 0):
                    self.machine.on_readback(c, now, status)
                    self._on_confirmed(c, now, via="poll")
            if old is not None and old.keep_power and not status.keep_power:
                self._reevaluate_meter_account(meter_id, now)
            if status.open and status.commanded_open and not (old is not None and old.open):
                self._close_unwarranted(meter_id, now)

    def _close_unwarranted(self, meter_id: str, now: float) -> None:
        """A relay newly seen commanded open on a remote-mode account that is not in arrears, that no operator
        opened and no command is working on: nothing warrants it (a trip of ours that acted unseen, before the
        customer paid), so it is closed. Local-mode meters open themselves on an empty purse: left to the
        engine's decisions."""
        meter = self.dir.meter(meter_id)
        acct = self.dir.account(meter.account_id)
        if acct.mode != CostControlMode.REMOTE or self.dir.in_trip_band(acct.account_id) or \
                self._active_commands(meter_id) or self._opened_by_operator(meter_id) is not None:
            return
        origin = f"poll-{int(now)}"
        c = self._submit(self._close_command(meter, acct.account_id, origin, "relay found commanded open while the "
                                             "account is not in arrears", now, now, readback_first=False), now)
        self._emit("relay_unwarranted_open", meter_id, now, account_id=acct.account_id, command_id=c.command_id)

    def set_area_flag(self, flag: AreaFlag, now: float, role: str = "area_flag") -> None:
        """The latest word on an area flag wins: one older than the flag in force (a late or re-ordered
        delivery) is refused, and the same one again changes nothing; one for an area no account is in is
        refused. ``role``: the setter's, for the audit."""
        if not self.dir.has_area(flag.area):
            # a misspelt area would protect no one while its setter believes it does
            self._fx.rejected.append((flag, f"area flag {flag.area}/{flag.flag}: unknown area {flag.area!r} (no "
                                            f"account is in it)"))
            return
        current = self.conditions.flags.get((flag.area, flag.flag))
        if current == flag:
            return
        if current is not None and flag.since < current.since:
            self._fx.rejected.append((flag, f"area flag {flag.area}/{flag.flag} since {flag.since} is older than "
                                            f"the one in force (since {current.since}): a late delivery"))
            return
        self.conditions.flags[(flag.area, flag.flag)] = flag
        self._fx.flags.append(flag)
        self._audit(now, flag.actor or "upstream", role, "area_flag_set" if flag.active else "area_flag_cleared",
                    flag.area, flag.reason, flag=flag.flag, until=flag.until)
        self._reevaluate_area(flag.area, now)

    def adopt_conditions(self, flags: list[AreaFlag], forecasts: list[Forecast], now: float) -> None:
        """Flags and forecasts another instance recorded (several instances on one store): taken as they are
        (the one that set them audited them), newer ones only, and the cases of the areas they change
        evaluated again."""
        areas = set()
        for f in flags:
            current = self.conditions.flags.get((f.area, f.flag))
            if current != f and (current is None or f.since >= current.since):
                self.conditions.flags[(f.area, f.flag)] = f
                areas.add(f.area)
        for fc in forecasts:
            if self.conditions.forecasts.get((fc.area, fc.day)) != fc:
                self.conditions.forecasts[(fc.area, fc.day)] = fc
                areas.add(fc.area)
        for area in sorted(areas):
            self._reevaluate_area(area, now)

    def set_forecast(self, forecast: Forecast, now: float) -> None:
        self.conditions.forecasts[(forecast.area, forecast.day)] = forecast
        self._fx.forecasts.append(forecast)
        self._reevaluate_area(forecast.area, now)

    def _reevaluate_area(self, area: str, now: float) -> None:
        for cid in list(self._case_of.values()):
            case = self.cases[cid]
            if self._area(case.account_id) == area and case.state in (CaseState.WAITING, CaseState.SCHEDULED):
                self._evaluate(case, now)

    def _reevaluate_meter_account(self, meter_id: str, now: float) -> None:
        cid = self._case_of.get(self.dir.meter(meter_id).account_id)
        if cid:
            self._evaluate(self.cases[cid], now)

    # ------------------------------------------------------------------ inputs: operators

    def manual(self, meter_id: str, action: RelayAction, operator: str, role: str, reason: str, key: str,
               now: float, mode: ReconnectMode | None = None, earlier: Command | None = None) -> Command:
        """An operator's trip or close. Needs an identity, a role that allows the action and a reason; a
        refusal is audited and raised. ``key`` is the request's idempotency key; ``earlier`` is the command
        already stored under it (the store keeps commands this controller has pruned): a key used for the
        other action is refused, never taken as this one done."""
        cid = f"manual:{key}:{meter_id}"
        earlier = earlier or self.commands.get(cid)
        meter = self.dir.meter(meter_id)
        acct = self.dir.account(meter.account_id)
        a = self.cfg.authority
        allowed = a.manual_trip_roles if action == RelayAction.TRIP else a.manual_close_roles
        problem = ""
        if not operator.strip():
            problem = "an operator identity is required"
        elif role not in allowed:
            problem = f"role {role!r} may not {action.value} relays; allowed: {', '.join(allowed)}"
        elif action == RelayAction.TRIP and not acct.customer_class.auto_trip_allowed and \
                role not in a.protected_trip_roles:
            problem = (f"{acct.customer_class.value} account: a manual trip needs one of the roles "
                       f"{', '.join(a.protected_trip_roles)}")
        elif not reason.strip():
            problem = "a reason is required"
        elif not key.strip():
            problem = "a request id (idempotency key) is required"
        elif earlier is not None and earlier.action != action:
            problem = (f"key {key!r} already names {earlier.action.value} command {cid}: "
                       f"a {action.value} needs a key of its own")
        if problem:
            self._audit(now, operator or "(none)", role, f"manual_{action.value}_refused", meter_id, reason,
                        problem=problem, request=key)
            raise AuthorityError(f"manual {action.value} of meter {meter_id} refused: {problem}")
        if cid in self.commands:
            return self.commands[cid]
        p = self.cfg.commands.for_action(action)
        c = Command(cid, meter_id, acct.account_id, action, operator, role, reason, key, now, now + p.ttl_s,
                    mode=mode or ReconnectMode(meter.reconnect_mode), updated_at=now)
        if action == RelayAction.CLOSE:
            c.payment_at, c.deadline_at = now, now + self.cfg.dispatch.reconnect_deadline_s
            case_id = self._case_of.get(acct.account_id)
            why = f"operator {operator} closed the relay manually: {reason}"
            if case_id:  # an operator who closes wants the customer on: the automatic case ends here
                self._close_case(self.cases[case_id], now, CaseState.CANCELLED, why)
            self._cancel_disconnect_notices(acct.account_id, now, why)
        made = self._submit(c, now)
        if made is not c:  # the same action is already underway: the request joins it
            self._audit(now, operator, role, f"manual_{action.value}_joined", meter_id, reason, request=key,
                        command_id=made.command_id)
        return made

    def cancel(self, command_id: str, operator: str, role: str, reason: str, now: float) -> str:
        """An operator stops a command that is not on the wire yet. Returns why it cannot be, or ""."""
        c = self.commands.get(command_id)
        if c is None or not c.state.active:
            return f"command {command_id} is {c.state.value if c else 'not active'}: nothing to cancel"
        if c.state.in_flight:
            return (f"command {command_id} is {c.state.value}: its frame may have reached the meter, so it "
                    f"cannot be recalled, only followed")
        if c.readback_first:  # waiting to retry after no answer: the last frame may have acted
            return (f"command {command_id} is waiting to read the relay back: its last frame got no answer and "
                    f"may have reached the meter; cancel it once the read-back has shown where the relay is")
        if not operator.strip() or not reason.strip():
            return "an operator identity and a reason are required"
        self.machine.cancel(c, now, f"cancelled by {operator}: {reason}")
        self._command_changed(c, now, "relay_cancelled")
        self._audit(now, operator, role, f"relay_{c.action.value}_cancelled", c.meter_id, reason,
                    command_id=command_id)
        return ""

    # ------------------------------------------------------------------ commands

    def _active_commands(self, meter_id: str) -> list[Command]:
        return [self.commands[i] for i in self._commands_of.get(meter_id, ()) if self.commands[i].state.active]

    def _submit(self, c: Command, now: float) -> Command:
        """Add a command: one intent per meter at a time. The same action already underway stands; a different
        one supersedes what is not yet in flight, and waits behind what is."""
        if c.command_id in self.commands:
            return self.commands[c.command_id]
        for other in self._active_commands(c.meter_id):
            # an operator's trip takes over from one of ours still waiting (the gates of arrears are not theirs);
            # otherwise the same action already underway stands
            takes_over = c.action == RelayAction.TRIP and c.actor != ENGINE and other.actor == ENGINE
            if other.action == c.action and (not takes_over or other.state.in_flight):
                return other
            if self.machine.cancel(other, now, f"superseded by {c.command_id}", c.command_id):
                self._command_changed(other, now, "relay_cancelled")
        self._add_command(c)
        self._touch(c)
        self._emit("relay_requested", c.meter_id, now, **self._command_payload(c))
        self._audit(now, c.actor, c.role, f"relay_{c.action.value}_requested", c.meter_id, c.reason,
                    command_id=c.command_id, account_id=c.account_id, origin=c.origin)
        return c

    @staticmethod
    def _command_payload(c: Command) -> dict:
        return {"command_id": c.command_id, "account_id": c.account_id, "action": c.action.value,
                "mode": c.mode.value, "state": c.state.value, "actor": c.actor, "reason": c.reason,
                "attempts": c.attempts, "outcome": c.outcome, "error": c.last_error,
                "deadline_at": c.deadline_at, "order_id": c.order_id}

    def _command_changed(self, c: Command, now: float, kind: str) -> None:
        self._touch(c)
        self._emit(kind, c.meter_id, now, **self._command_payload(c))
        if kind == "relay_cancelled" and c.order_id in self.orders:  # superseded or stopped: no crew for it
            self._cancel_order(self.orders[c.order_id], now, f"command {c.outcome}")

    def _cancel_order(self, o: WorkOrder, now: float, why: str, reached: bool = False) -> None:
        if self.dispatcher.cancel(o, now, why, reached):
            self._touch(o)
            self._emit("field_order_cancelled", o.meter_id, now, order_id=o.order_id, reason=o.note)

    def steps(self, now: float, bus: str | None = None) -> list[Step]:
        """Executor work due now (on one bus, or all), most urgent first. Commands of one meter run one at a
        time."""
        return sorted(self._due_steps(now, bus), key=_urgency)

    def next_steps(self, now: float, bus: str, limit: int) -> list[Step]:
        """The most urgent steps due now on ``bus``, at most ``limit`` and one per meter, for the executor to do
        back to back: reads, and sends of closes. A trip's send comes alone (and ends the list where it
        falls): the executor checks a trip's gates again right before its frame, and a payment landing
        between that check and the frame would trip a customer who has just paid, so nothing else may queue
        in between."""
        return self._batch(self._due_steps(now, bus), limit)

    def bus_work(self, now: float, bus: str, limit: int, soon_s: float) -> BusWork:
        """What a bus's worker needs, from one scan of the bus's commands: :meth:`next_steps`; the read-backs
        of its commands falling due within ``soon_s``, earliest first, at most ``limit`` (the worker does them
        when due without asking again: a read is always safe, and one the command no longer waits for is only
        noted); and when its next step of any kind falls due."""
        upcoming = list(self._due_steps(now + soon_s, bus))  # a step's due_at says when it is due
        soon = heapq.nsmallest(limit, [s for s in upcoming if s.due_at > now and s.kind == StepKind.READ
                                       and s.subject == "command"], key=lambda s: (s.due_at, s.subject_id))
        self._reindex()
        due_at = self._earliest(0, bus) if bus in self._heaps[0] else None
        return BusWork(self._batch([s for s in upcoming if s.due_at <= now], limit), soon, due_at)

    def _batch(self, due: Iterable[Step], limit: int) -> list[Step]:
        steps: list[Step] = []
        meters: set[str] = set()
        # twice the limit: a meter may have two steps due (a queued command's and an order's read-back)
        for s in heapq.nsmallest(limit * 2, due, key=_urgency):
            if s.kind == StepKind.SEND and self.commands[s.subject_id].action == RelayAction.TRIP:
                return steps or [s]
            if s.meter_id not in meters:
                meters.add(s.meter_id)
                steps.append(s)
                if len(steps) == limit:
                    break
        return steps

    def due_buses(self, now: float) -> set[str]:
        """The buses with a step due now."""
        self._reindex()
        return {bus for bus in list(self._heaps[0]) if (t := self._earliest(0, bus)) is not None and t <= now}

    def _due_steps(self, now: float, bus: str | None):
        pending = self._pending(bus)
        busy = {c.meter_id for c in pending if c.state.in_flight}
        for c in pending:
            if c.meter_id in busy and not c.state.in_flight:
                continue
            kind = self.machine.step_due(c, now)
            if kind is not None:
                yield Step(kind, "command", c.command_id, c.meter_id, c.priority, c.next_at or now)
        for o in self.orders.values():
            if o.verify_next_at is not None and now >= o.verify_next_at and o.meter_id not in busy and \
                    (bus is None or self.dir.meter(o.meter_id).channel == bus):
                yield Step(StepKind.READ, "order", o.order_id, o.meter_id, 0, o.verify_next_at)

    def next_step_at(self) -> float | None:
        """When the executor has work next: a command or a completed order's read, on a meter free to take it
        (time's other work, notices and gates, is the ticker's)."""
        self._reindex()
        return min((t for bus in list(self._heaps[1]) if (t := self._earliest(1, bus)) is not None), default=None)

    def _meter_step_times(self, meter_id: str) -> tuple[float | None, float | None]:
        """(when a step of the meter falls due, when it next has work): a meter with a command in flight takes
        no other step (of another command, or an order's read) until it lands."""
        active = [c for c in (self.commands[i] for i in self._commands_of.get(meter_id, ())) if c.state.active]
        busy = any(c.state.in_flight for c in active)
        free = [c for c in active if c.state.in_flight or not busy]
        due = [t for c in free if (t := self.machine.step_at(c)) is not None]
        wake = [c.next_at for c in free if c.next_at is not None]
        if not busy:
            reads = [t for t in (self.orders[i].verify_next_at for i in self._orders_of.get(meter_id, ()))
                     if t is not None]
            due += reads
            wake += reads
        return min(due, default=None), min(wake, default=None)

    def _reindex(self) -> None:
        for m in self._changed_meters:
            times = self._meter_step_times(m)
            if self._step_times.get(m) == times:
                continue
            bus = self.dir.meter(m).channel
            timed = self._timed_on.setdefault(bus, set())
            if times == (None, None):
                self._step_times.pop(m, None)
                timed.discard(m)
                continue
            self._step_times[m] = times
            timed.add(m)
            for which, t in enumerate(times):
                if t is None:
                    continue
                heap = self._heaps[which].setdefault(bus, [])
                heapq.heappush(heap, (t, m))
                if len(heap) > 2 * len(timed) + 64:  # mostly stale entries: rebuilt from the meters' times
                    heap[:] = [(tm[which], x) for x in timed if (tm := self._step_times[x])[which] is not None]
                    heapq.heapify(heap)
        self._changed_meters.clear()

    def _earliest(self, which: int, bus: str) -> float | None:
        """The earliest time on a bus's heap that is still its meter's (stale entries dropped)."""
        heap = self._heaps[which][bus]
        while heap and self._step_times.get(heap[0][1], (None, None))[which] != heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            del self._heaps[which][bus]
            return None
        return heap[0][0]

    def next_wakeup(self) -> float | None:
        """The earliest instant at which anything here is due (commands, notices, cases, orders)."""
        step = self.next_step_at()
        times = [step] if step is not None else []
        times += [n.due_at for n in self.notices.values() if n.state.active and n.due_at is not None]
        times += [c.next_check_at for c in self.cases.values() if c.state.active and c.next_check_at is not None]
        times += [t for t in (self.dispatcher.next_escalation_at(o) for o in self.orders.values()) if t is not None]
        return min(times) if times else None

    def authorize(self, command_id: str, now: float, balance_fen: int | None = None,
                  trip_level_fen: int | None = None) -> Permit | Block:
        """The moment of sending. Automatic trips pass every gate again, with a fresh balance (the shell reads
        it so that it sees every committed payment). On a block the command is cancelled, never sent."""
        c = self.commands[command_id]
        if self.machine.step_due(c, now) != StepKind.SEND:
            return Block(Gate.EXPIRED, f"command {command_id} is {c.state.value}: nothing to send now")
        block = None
        if self.machine.expired(c, now):
            block = Block(Gate.EXPIRED, f"expired at {c.expires_at:.0f}: an expired command is never sent")
        elif c.action == RelayAction.TRIP:
            status = self.relays.get(c.meter_id)
            if status is not None and status.keep_power:
                block = Block(Gate.KEEP_POWER, f"meter {c.meter_id} is in keep-power (保电)")
            elif c.actor == ENGINE:
                block = self._send_time_block(c, now, balance_fen, trip_level_fen)
        if block is not None:
            self.machine.cancel(c, now, f"{block.gate.value}: {block.reason}")
            self._command_changed(c, now, "relay_cancelled")
            self._after_ended(c, now, block)
            return block
        valid_until = self.machine.begin_send(c, now)
        self._note(c, now, "sending", f"attempt {c.attempts}")
        self._touch(c)
        self._audit(now, c.actor, c.role, f"relay_{c.action.value}_sent", c.meter_id, c.reason,
                    command_id=c.command_id, attempt=c.attempts)
        return Permit(c.command_id, c.meter_id, c.action, c.mode, valid_until)

    def _send_time_block(self, c: Command, now: float, balance_fen: int | None,
                         trip_level_fen: int | None) -> Block | None:
        case = self.cases.get(c.origin)
        if case is None or case.state != CaseState.TRIPPING:
            return Block(Gate.BALANCE, "its disconnect case is no longer open")
        acct = self.dir.account(c.account_id)
        if balance_fen is None or trip_level_fen is None:
            return Block(Gate.BALANCE, "no fresh balance to check: a trip is never sent without one")
        if balance_fen > trip_level_fen:
            return Block(Gate.BALANCE, f"fresh balance {balance_fen} fen is above the trip level {trip_level_fen} fen: "
                                       f"a payment landed before the send", now + self.cfg.balance_recheck_s)
        return (Gates.class_block(acct.customer_class) or self._notice_block(acct.account_id, now)
                or self._reminder_block(case, now) or self.gates.time_block(acct.area, now))

    def on_send_result(self, command_id: str, now: float, result: SendResult, detail: str = "",
                       errors: tuple[str, ...] = (), status: RelayStatus | None = None) -> None:
        """What the wire said to the frame. For a refusal, ``status`` is the relay read right after (if it could
        be read): keep-power makes it a gate, not a failure to retry."""
        c = self.commands[command_id]
        if c.state != CommandState.SENDING:
            return
        if status is not None:
            self._relay_seen(c.meter_id, status, now)
        if result in (SendResult.ACKNOWLEDGED, SendResult.NO_ANSWER):
            answered = result == SendResult.ACKNOWLEDGED
            self.machine.on_sent(c, now, answered, detail)
            self._note(c, now, "acknowledged" if answered else "no answer", detail)
            self._command_changed(c, now, "relay_sent")
            return
        if result == SendResult.REFUSED:
            if c.action == RelayAction.TRIP and status is not None and status.keep_power:
                why = f"meter in keep-power (保电) refused the trip ({', '.join(errors) or detail})"
                self.machine.block(c, now, why)
                self._note(c, now, "blocked", why)
                self._command_changed(c, now, "relay_blocked")
                self._after_ended(c, now, Block(Gate.KEEP_POWER, why))
                return
            final = "password_error_or_unauthorized" in errors
            why = f"refused by the meter: {', '.join(errors) or detail}" + (
                " (wrong password or operator: retrying would only lock the meter)" if final else "")
            self._failed(c, now, Failure(why, refused=True, final=final))
            return
        self._failed(c, now, Failure(f"not sent: {detail}"))

    def on_read_result(self, step: Step, now: float, status: RelayStatus | None, why: str = "") -> None:
        """A read of a meter's relay for ``step``; ``status`` None when the meter could not be read."""
        if status is not None:
            self._relay_seen(step.meter_id, status, now)
        if step.subject == "order":
            self._order_read(self.orders[step.subject_id], now, status)
            return
        c = self.commands[step.subject_id]
        if not c.state.active or (c.state != CommandState.VERIFYING and not c.readback_first):
            return  # a read this command no longer waits for (it moved on meanwhile): its position is noted above
        if status is None:
            result = self.machine.on_read_failed(c, now, why)
        else:
            result = self.machine.on_readback(c, now, status)
        if result == "confirmed":
            self._on_confirmed(c, now, via="read-back")
        elif result == "failed":
            self._failed(c, now, None)
        else:
            self._touch(c)

    def _failed(self, c: Command, now: float, f: Failure | None) -> None:
        if f is not None:
            self.machine.fail(c, now, f)
        self._note(c, now, c.state.value, c.last_error)
        kind = "relay_failed" if c.state == CommandState.FAILED else "relay_retry"
        self._command_changed(c, now, kind)
        if self.machine.needs_order(c, now):
            self._create_order(c, now)
        if c.state == CommandState.FAILED:
            self._audit(now, c.actor, c.role, f"relay_{c.action.value}_failed", c.meter_id, c.last_error,
                        command_id=c.command_id, attempts=c.attempts)
            self._after_ended(c, now, None)

    def _on_confirmed(self, c: Command, now: float, via: str) -> None:
        o = self.orders.get(c.order_id) if c.order_id else None
        if o is not None and o.state == OrderState.COMPLETED and o.verified == "pending":
            # the crew said done and this read agrees: the order is verified, the close was theirs
            c.outcome = "closed_by_field" if c.action == RelayAction.CLOSE else c.outcome
            self._order_verdict(o, now, relay_open=c.action == RelayAction.TRIP)
        self._note(c, now, "confirmed", f"{c.outcome} ({via})")
        self._command_changed(c, now, "relay_confirmed")
        self._audit(now, c.actor, c.role, f"relay_{c.action.value}_confirmed", c.meter_id, c.reason,
                    command_id=c.command_id, outcome=c.outcome, via=via)
        if o is not None:
            self._cancel_order(o, now, f"remote {c.action.value} succeeded ({via})", reached=True)
        if c.action == RelayAction.CLOSE and c.outcome == "close_allowed":
            # the meter allows the close: the customer must press the button
            self._new_notice(c.account_id, NoticePurpose.PRESS_BUTTON, f"{c.command_id}/press", now,
                             {"meter_id": c.meter_id})
        self._after_ended(c, now, None)

    def _after_ended(self, c: Command, now: float, block: Block | None) -> None:
        """A command ended (confirmed, failed, blocked, cancelled at send): move its disconnect case on."""
        if c.action != RelayAction.TRIP or c.actor != ENGINE:
            return
        case = self.cases.get(c.origin)
        if case is None or case.state != CaseState.TRIPPING:
            return
        cmds = [self.commands[i] for i in case.command_ids if i in self.commands]
        if any(x.state.active for x in cmds):
            return
        this_round = [x for x in cmds if x.command_id.startswith(f"trip:{case.case_id}:{case.rounds}:")]
        if any(x.state == CommandState.BLOCKED for x in this_round):
            why = next(x.outcome for x in this_round if x.state == CommandState.BLOCKED)
            self._unplan(case)
            self._wait(case, now, Block(Gate.KEEP_POWER, why), CaseState.BLOCKED)
        elif all(x.state == CommandState.CONFIRMED for x in this_round):
            self._close_case(case, now, CaseState.TRIPPED, "relay(s) verified open")
        elif any(x.state == CommandState.FAILED for x in this_round):
            failed = [x for x in this_round if x.state == CommandState.FAILED]
            self._close_case(case, now, CaseState.FAILED,
                             "remote trip failed: " + "; ".join(f"{x.meter_id}: {x.last_error}" for x in failed))
            if self.cfg.dispatch.trip_failure_orders:
                for x in failed:
                    self._create_order(x, now)
        else:  # stopped at the moment of sending by a gate, or expired: plan again
            blk = block or Block(Gate.EXPIRED, "a trip command ended unsent")
            self._unplan(case)
            self._wait(case, now, blk)
            if blk.retry_at is None or blk.retry_at <= now:
                self._evaluate(case, now)

    @staticmethod
    def _note(c: Command, now: float, event: str, detail: str) -> None:
        c.history.append({"at": now, "event": event, "detail": detail})
        del c.history[:-30]  # the last thirty steps; the audit log keeps everything

    def _relay_seen(self, meter_id: str, status: RelayStatus, at: float) -> bool:
        """Note a relay position read at ``at``. True if it changes what is known; False if it is the same, or
        older than the last one known (a poll committed after a later read-back)."""
        if at < self._relay_seen_at.get(meter_id, at):
            return False
        self._relay_seen_at[meter_id] = at
        notable = status if (status.open or status.keep_power or status.commanded_open) else None
        if self.relays.get(meter_id) == notable:  # meters closed and unremarkable are not kept
            return False
        if notable is None:
            del self.relays[meter_id]
        else:
            self.relays[meter_id] = notable
        self._fx.relay_states.append(RelayStateChanged(meter_id, status.open, int(at), status.commanded_open,
                                                       status.keep_power))
        return True

    # ------------------------------------------------------------------ field orders

    def _create_order(self, c: Command, now: float) -> None:
        acct = self.dir.account(c.account_id)
        close = c.action == RelayAction.CLOSE
        kind = OrderKind.RECONNECT if close else OrderKind.DISCONNECT
        deadline = c.deadline_at if close and c.deadline_at else now + (
            self.cfg.dispatch.reconnect_deadline_s if close else self.cfg.dispatch.disconnect_deadline_s)
        tried = [h for h in c.history if h["event"] in ("retry_wait", "failed", "dispatched", "no answer")]
        o = WorkOrder(f"WO-{c.command_id}", kind, c.command_id, c.meter_id, c.account_id,
                      acct.customer_class.value, acct.address, acct.lat, acct.lon,
                      f"remote {c.action.value} failed {c.failures} time(s): {c.last_error}", tried[-10:],
                      now, deadline, updated_at=now)
        self._add_order(o)
        self.machine.dispatched(c, o.order_id, now)
        self._touch(o)
        self._touch(c)
        self._emit("field_order_created", c.meter_id, now, order_id=o.order_id, kind=kind.value,
                   account_id=c.account_id, customer_class=o.customer_class, address=o.address, lat=o.lat,
                   lon=o.lon, reason=o.reason, attempts=o.attempts, deadline_at=o.deadline_at,
                   urgency=list(self.dispatcher.urgency(o)[:2]))
        self._audit(now, ENGINE, ENGINE, "field_order_created", c.meter_id, o.reason, order_id=o.order_id,
                    command_id=c.command_id, deadline_at=deadline)

    def _order_verdict(self, o: WorkOrder, now: float, relay_open: bool | None) -> str:
        verdict = self.dispatcher.verified(o, now, relay_open)
        self._touch(o)
        if verdict in ("confirmed", "contradicted", "unreachable"):
            self._emit("field_order_verified", o.meter_id, now, order_id=o.order_id, verified=verdict)
        return verdict

    def _order_read(self, o: WorkOrder, now: float, status: RelayStatus | None) -> None:
        verdict = self._order_verdict(o, now, None if status is None else status.open)
        c = self.commands.get(o.command_id)
        if verdict == "confirmed" and c is not None and c.state != CommandState.CONFIRMED and \
                not c.state.in_flight and o.kind == OrderKind.RECONNECT:
            self.machine.confirm_by_field(c, now)
            self._note(c, now, "confirmed", "closed by the field crew, verified by a read")
            self._command_changed(c, now, "relay_confirmed")
        if verdict == "contradicted":
            self._emit("field_order_escalated", o.meter_id, now, order_id=o.order_id, level=max(o.escalation, 1),
                       reason="reported completed but the meter disagrees", deadline_at=o.deadline_at)

    def orders_by_urgency(self) -> list[WorkOrder]:
        return sorted((o for o in self.orders.values() if o.state.active), key=self.dispatcher.urgency)

    # ------------------------------------------------------------------ time passing

    def tick(self, now: float) -> None:
        """Everything that time alone moves: notice timeouts and hours, case gates, dispatch, escalation."""
        for n in [n for n in map(self.notices.get, self._notices_due.due(now))
                  if n is not None and n.state.active and n.due_at is not None and now >= n.due_at]:
            acct = self.dir.account(n.account_id)
            self._notice_step(n, self.notifier.advance(n, now, acct.contacts, acct.address), now)
            self._notice_changed(n, now)
        for case in [c for c in map(self.cases.get, self._cases_due.due(now))
                     if c is not None and c.state.active and c.next_check_at is not None and now >= c.next_check_at]:
            self._evaluate(case, now)
        for c in self._order_candidates(now):
            if self.machine.needs_order(c, now):
                self._create_order(c, now)
        for o in [o for o in map(self.orders.get, self._escalations_due.due(now)) if o is not None]:
            level = self.dispatcher.escalation_due(o, now)
            if level > o.escalation:
                o.escalation, o.updated_at = level, now
                self._touch(o)
                self._emit("field_order_escalated", o.meter_id, now, order_id=o.order_id, level=level,
                           reason="deadline passed" if level == 2 else "deadline at risk",
                           deadline_at=o.deadline_at, time_left_s=o.deadline_at - now)
        if now - self._pruned_at >= PRUNE_EVERY_S:  # forgetting after a day needs no per-second precision
            self._prune(now)
            self._pruned_at = now

    def _order_candidates(self, now: float) -> list[Command]:
        """The commands that may need a field order now: changed since the last look, or come to their time;
        oldest first."""
        ids, self._order_check = self._order_check, set()
        while self._order_times and self._order_times[0][0] <= now:
            ids.add(heapq.heappop(self._order_times)[1])
        found = [c for c in (self.commands.get(i) for i in ids)
                 if c is not None and (c.state.active or c.state == CommandState.FAILED)]
        return sorted(found, key=lambda c: (c.created_at, c.command_id))

    def _prune(self, now: float) -> None:
        """Forget finished things the gates no longer need (the store keeps everything)."""
        keep = self.cfg.keep_terminal_s
        held = {c.command_id for c in (self._opened_by_operator(m) for m, st in self.relays.items() if st.open)
                if c is not None}
        for cid in [i for i, c in self.commands.items() if not c.state.active and now - c.updated_at > keep
                    and not (c.state == CommandState.FAILED and c.order_id in self.orders) and i not in held]:
            c = self.commands.pop(cid)
            self._commands_of[c.meter_id].remove(cid)
            self._pending_by_bus.get(self.dir.meter(c.meter_id).channel, set()).discard(cid)
        for oid in [i for i, o in self.orders.items() if not o.state.active and o.verify_next_at is None
                    and now - o.updated_at > keep]:
            o = self.orders.pop(oid)
            self._orders_of[o.meter_id].discard(oid)
        horizon = self.cfg.trips.notice_max_age_s + keep
        for nid in [i for i, n in self.notices.items() if not n.state.active and now - n.created_at > horizon]:
            n = self.notices.pop(nid)
            self._notices_of[n.account_id].remove(nid)
        today = self.calendar.day(int(now)).isoformat()
        for cid in [i for i, c in self.cases.items() if not c.state.active and now - c.updated_at > keep
                    and c.plan_day < today]:
            c = self.cases.pop(cid)
            self._plans.get((self._area(c.account_id), c.plan_day), {}).pop(cid, None)
        for key in [k for k in self._plans if k[1] < today]:
            del self._plans[key]

    # ------------------------------------------------------------------ notices

    def _new_notice(self, account_id: str, purpose: NoticePurpose, notice_id: str, now: float, params: dict) -> Notice:
        acct = self.dir.account(account_id)
        channels = self.cfg.notices.channels_for(purpose, tuple(acct.channels))
        n = Notice(notice_id, account_id, purpose, now, channels, params, updated_at=now)
        self._add_notice(n)
        self._notice_step(n, self.notifier.advance(n, now, acct.contacts, acct.address), now)
        self._touch(n)
        return n

    def _notice_step(self, n: Notice, step, now: float) -> None:
        for r in step.requests:
            self._emit("notice_request", n.account_id, now, **_request_payload(r))
        for kind, detail, fields in step.transitions:
            self._emit(kind, n.account_id, now, notice_id=n.notice_id, purpose=n.purpose.value, detail=detail,
                       **fields)

    def _notice_changed(self, n: Notice, now: float) -> None:
        self._touch(n)
        if n.purpose in DISCONNECT_NOTICES or n.purpose == NoticePurpose.FINAL_REMINDER:
            cid = self._case_of.get(n.account_id)
            if cid and self.cases[cid].state in (CaseState.WAITING, CaseState.SCHEDULED, CaseState.BLOCKED):
                self._evaluate(self.cases[cid], now)

    def _confirmed_notice(self, account_id: str, now: float) -> Notice | None:
        """The latest confirmed notice of disconnection that is not stale at ``now``."""
        best = None
        for nid in self._notices_of.get(account_id, ()):
            n = self.notices[nid]
            if n.purpose in DISCONNECT_NOTICES and n.delivered_at is not None and \
                    n.delivered_at > now - self.cfg.trips.notice_max_age_s:
                if best is None or n.delivered_at > best.delivered_at:
                    best = n
        return best

    def _notice_block(self, account_id: str, trip_at: float) -> Block | None:
        n = self._confirmed_notice(account_id, trip_at)
        if n is None:
            return Block(Gate.NOTICE, "no confirmed notice of disconnection that is not stale")
        ok_at = n.delivered_at + self.cfg.trips.notice_lead_s
        if trip_at < ok_at:
            return Block(Gate.NOTICE, f"notice {n.notice_id} confirmed on {n.delivered_channel}; the lead time "
                                      f"runs until {self.fmt(ok_at)}", ok_at)
        return None

    def _reminder_block(self, case: TripCase, now: float) -> Block | None:
        t = self.cfg.trips
        if t.final_reminder_s <= 0:
            return None
        r = self.notices.get(case.final_notice_id)
        when = self._reminder_time(r)
        if when is None:
            return Block(Gate.FINAL_REMINDER, "no final reminder confirmed")
        if now < when + t.final_reminder_s:
            return Block(Gate.FINAL_REMINDER, f"final reminder confirmed at {self.fmt(when)}; the cut waits until "
                                              f"{self.fmt(when + t.final_reminder_s)}", when + t.final_reminder_s)
        if now > when + t.final_reminder_max_age_s:
            return Block(Gate.FINAL_REMINDER, "the final reminder is no longer recent")
        return None

    def _reminder_time(self, r: Notice | None) -> float | None:
        """When the final reminder counts from: its confirmed delivery (or, where configured, its request)."""
        if r is None:
            return None
        if r.delivered_at is not None:
            return r.delivered_at
        if not self.cfg.trips.final_reminder_confirmed:
            sent = [a.requested_at for a in r.attempts if a.address]
            return sent[0] if sent else None
        return None

    # ------------------------------------------------------------------ disconnect cases

    def _close_case(self, case: TripCase, now: float, state: CaseState, why: str) -> None:
        if not case.state.active:
            return
        case.state, case.closed_at, case.closed_reason, case.next_check_at = state, now, why, None
        case.gate, case.gate_reason, case.updated_at = "", "", now
        if state == CaseState.CANCELLED:
            self._unplan(case)
        self._case_of.pop(case.account_id, None)
        self._touch(case)
        self._emit(f"disconnect_case_{state.value}", case.account_id, now, case_id=case.case_id, reason=why)

    def _unplan(self, case: TripCase) -> None:
        if case.plan_day:
            self._plans.get((self._area(case.account_id), case.plan_day), {}).pop(case.case_id, None)
        case.plan_day, case.planned_at = "", None

    def _wait(self, case: TripCase, now: float, block: Block, state: CaseState = CaseState.WAITING) -> None:
        changed = (case.gate, case.state) != (block.gate.value, state)
        retry = block.retry_at
        if retry is None and block.gate not in (Gate.KEEP_POWER, Gate.WEATHER):
            retry = now + self.cfg.balance_recheck_s  # nothing else would wake it: never wait on nothing
        case.state, case.gate, case.gate_reason, case.next_check_at = state, block.gate.value, block.reason, retry
        case.updated_at = now
        self._touch(case)
        if changed:  # one event per gate met, not one per look
            self._emit("trip_deferred", case.account_id, now, case_id=case.case_id, gate=block.gate.value,
                       reason=block.reason, next_check_at=block.retry_at)

    def _schedule(self, case: TripCase, now: float, why: str, next_check: float) -> None:
        """Nothing blocks: the case waits for its planned time."""
        case.state, case.gate, case.gate_reason, case.next_check_at = CaseState.SCHEDULED, "", why, next_check
        case.updated_at = now
        self._touch(case)

    def _evaluate(self, case: TripCase, now: float) -> None:
        """Take the case as far as the gates allow at ``now``."""
        if case.state not in (CaseState.WAITING, CaseState.SCHEDULED, CaseState.BLOCKED):
            return
        acct = self.dir.account(case.account_id)
        meters = self.dir.meters_of_account(case.account_id)
        t = self.cfg.trips
        b = Gates.class_block(acct.customer_class)
        if b is not None:
            self._close_case(case, now, CaseState.CANCELLED, b.reason)
            self._emit("account_manager_task", case.account_id, now, decision_id=case.case_id,
                       customer_class=acct.customer_class.value, balance_fen=case.balance_fen, reason=b.reason)
            return
        kp = [m.meter_id for m in meters if self.relays.get(m.meter_id, RelayStatus(False)).keep_power]
        if kp:
            self._unplan(case)
            return self._wait(case, now, Block(Gate.KEEP_POWER, f"meter(s) {', '.join(kp)} in keep-power (保电): "
                                                                f"the meter refuses trips"), CaseState.BLOCKED)
        balance, level = self.dir.balance_and_level(acct.account_id)
        if balance > level:
            # a partial payment put the balance above the trip level without leaving the trip band (hysteresis):
            # no cut, no reminder; looked at again until the balance is at the trip level again
            self._unplan(case)
            self._drop_reminder(case, now, None)
            return self._wait(case, now, Block(Gate.BALANCE, f"balance {balance} fen is above the trip level "
                                                             f"{level} fen", now + self.cfg.balance_recheck_s))
        eligible = case.opened_at + t.grace_for(acct.customer_class)
        if now < eligible:
            return self._wait(case, now, Block(Gate.GRACE, f"grace period until {self.fmt(eligible)}", eligible))
        notice = self._confirmed_notice(acct.account_id, now)
        if notice is None:
            return self._need_notice(case, acct, now)
        not_before = max(eligible, notice.delivered_at + t.notice_lead_s)
        earliest = max(now, not_before)
        slot, block = self._plan(case, acct.area, not_before, now)
        self._drop_reminder(case, now, slot)
        if slot is None:
            self._unplan(case)
            return self._wait(case, now, block)
        if case.planned_at != slot:
            self._unplan(case)
            case.plan_day, case.planned_at = self.calendar.day(int(slot)).isoformat(), slot
            self._plans.setdefault((acct.area, case.plan_day), {})[case.case_id] = slot
            self._emit("trip_planned", case.account_id, now, case_id=case.case_id, planned_at=slot,
                       plan_day=case.plan_day)
        if notice.delivered_at + t.notice_max_age_s <= slot:
            # the notice will be stale by the cut (a long holiday, a full plan): a fresh one, sent close enough
            # to the cut to be fresh then and early enough for its lead time
            renew_at = slot - t.notice_lead_s - t.renotice_before_s
            if now < renew_at:
                return self._wait(case, now, Block(Gate.NOTICE, f"notice {notice.notice_id} will be stale by the "
                                                                f"cut at {self.fmt(slot)}; a fresh one goes out at "
                                                                f"{self.fmt(renew_at)}", renew_at), CaseState.SCHEDULED)
            self._unplan(case)
            return self._need_notice(case, acct, now, stale=notice)
        if slot > now and block is not None and slot > earliest:
            # a gate pushed the cut later (window, holiday, weather, cap): say which
            reason = f"{block.reason}; planned for {self.fmt(slot)}"
            return self._wait(case, now, Block(block.gate, reason, self._reminder_due(slot)), CaseState.SCHEDULED)
        due = self._reminder_due(slot)
        if now < due:
            return self._schedule(case, now, f"cut planned for {self.fmt(slot)}" + (
                f"; final reminder at {self.fmt(due)}" if t.final_reminder_s > 0 else ""), due)
        if t.final_reminder_s > 0:
            blocked = self._final_reminder(case, acct, slot, now)
            if blocked is not None:
                return self._wait(case, now, blocked, CaseState.SCHEDULED)
        self._trip(case, acct, meters, now)

    def _drop_reminder(self, case: TripCase, now: float, slot: float | None) -> None:
        """A final reminder still being delivered for a cut that moved to another day (or off the plan) stops:
        the customer is not told a time that no longer holds."""
        r = self.notices.get(case.final_notice_id)
        if r is None or not r.state.active:
            return
        if slot is None or self.calendar.day(int(r.params["planned_at"])) != self.calendar.day(int(slot)):
            if self.notifier.cancel(r, now, "the cut it announced was moved to another day"):
                self._touch(r)

    def _reminder_due(self, slot: float) -> float:
        t = self.cfg.trips
        if t.final_reminder_s <= 0:
            return slot
        return slot - t.final_reminder_s - self.cfg.final_reminder_margin_s

    def _need_notice(self, case: TripCase, acct: Account, now: float, stale: Notice | None = None) -> None:
        pending = [self.notices[i] for i in self._notices_of.get(acct.account_id, ())
                   if self.notices[i].purpose in DISCONNECT_NOTICES and self.notices[i].state.active]
        if pending:
            n = pending[-1]
            where = n.channels[n.next_channel] if n.next_channel < len(n.channels) else "-"
            return self._wait(case, now, Block(Gate.NOTICE, f"waiting for notice {n.notice_id} to be delivered "
                                                            f"({n.state.value}, {where})", n.due_at))
        last = self.notices.get(case.notice_id)
        if last is not None and last.state == NoticeState.EXHAUSTED and now < last.updated_at + self.cfg.notice_retry_s:
            retry = last.updated_at + self.cfg.notice_retry_s
            return self._wait(case, now, Block(Gate.NOTICE, f"no channel confirmed the notice of disconnection "
                                                            f"{last.notice_id}; a new one at {self.fmt(retry)}", retry),
                              CaseState.BLOCKED)
        case.notices_made += 1
        n = self._new_notice(acct.account_id, NoticePurpose.DISCONNECT,
                             f"{case.case_id}/disconnect/{case.notices_made}", now, {"balance_fen": case.balance_fen})
        case.notice_id = n.notice_id
        if n.state == NoticeState.EXHAUSTED:  # no channel at all reaches this customer (no contact, no address)
            retry = now + self.cfg.notice_retry_s
            return self._wait(case, now, Block(Gate.NOTICE, f"no channel can reach the customer ({n.closed_reason}); "
                                                            f"tried again at {self.fmt(retry)}", retry),
                              CaseState.BLOCKED)
        why = "the last confirmed notice would be stale at the cut; a fresh one requested" if stale else \
            "no confirmed notice; the notice of disconnection requested"
        self._wait(case, now, Block(Gate.NOTICE, why, n.due_at))

    def _plan(self, case: TripCase, area: str, not_before: float, now: float) -> tuple[float | None, Block | None]:
        """The cut's slot: the first permitted instant >= ``not_before`` and now, with room under the area's
        daily cap, spaced from the day's last planned cut by (permitted hours / cap) so the trips spread over
        the day. A plan made earlier holds while its time (or, once it has passed, its day) is permitted."""
        p = case.planned_at
        if p is not None and p >= not_before:
            if p >= now and self.gates.time_block(area, int(p)) is None:
                return p, None
            if p < now and self.calendar.day(int(p)) == self.calendar.day(int(now)) and \
                    self.gates.time_block(area, int(now)) is None:
                return p, None
        t = int(max(not_before, now))
        last: Block | None = None
        capped: Block | None = None  # the cap, when it moved the cut to a later day, is the reason to give
        cap = self.cfg.trips.cap_for(area)
        for _ in range(400):
            t2, b = self.gates.next_permitted(area, t)
            last = b or last
            if t2 is None:
                return None, capped or last
            day = self.calendar.day(t2)
            start, end = self.gates.windows.window_of(t2)
            others = {k: v for k, v in self._plans.get((area, day.isoformat()), {}).items() if k != case.case_id}
            if len(others) >= cap:
                capped = Block(Gate.DAILY_CAP, f"{cap} trips already planned in area {area or '-'} on "
                                                       f"{day.isoformat()}")
                t = self.calendar.at(day + timedelta(days=1), 0)
                continue
            spacing = (end - start) / cap
            slot = max(t2, start + spacing * len(others), (max(others.values()) + spacing) if others else 0)
            if slot >= end:
                capped = Block(Gate.DAILY_CAP, f"the trips planned in area {area or '-'} fill "
                                                       f"{day.isoformat()}'s permitted hours")
                t = self.calendar.at(day + timedelta(days=1), 0)
                continue
            if self.gates.time_block(area, int(slot)) is not None:
                t = int(slot)
                continue
            return float(slot), capped or last
        raise PolicyError(f"no trip slot found for case {case.case_id}")

    def _final_reminder(self, case: TripCase, acct: Account, slot: float, now: float) -> Block | None:
        """Request the final reminder in time; hold the cut until it is confirmed and its lead has run."""
        t = self.cfg.trips
        due = self._reminder_due(slot)
        r = self.notices.get(case.final_notice_id)
        when = self._reminder_time(r)
        same_day = r is not None and self.calendar.day(int(r.params.get("planned_at", 0))) == \
            self.calendar.day(int(slot))  # a reminder announced a cut on its day, not on another
        usable = same_day and (r.state.active or when is not None) and \
            (when is None or now <= when + t.final_reminder_max_age_s)
        if not usable:
            if r is not None and r.state == NoticeState.EXHAUSTED and r.updated_at >= due:
                # every fast channel failed for this cut: not today; a new plan, a new reminder
                self._unplan(case)
                nxt = self.calendar.at(self.calendar.day(int(now)) + timedelta(days=1), 0)
                return Block(Gate.FINAL_REMINDER, "no channel confirmed the final reminder; re-planned", nxt)
            case.notices_made += 1
            r = self._new_notice(acct.account_id, NoticePurpose.FINAL_REMINDER,
                                 f"{case.case_id}/final/{case.notices_made}", now,
                                 {"planned_at": slot, "balance_fen": case.balance_fen})
            case.final_notice_id = r.notice_id
            if r.state == NoticeState.EXHAUSTED:  # no fast channel reaches this customer
                self._unplan(case)
                nxt = self.calendar.at(self.calendar.day(int(now)) + timedelta(days=1), 0)
                return Block(Gate.FINAL_REMINDER, f"no fast channel can reach the customer for the final reminder "
                                                  f"({r.closed_reason}); re-planned", nxt)
            when = self._reminder_time(r)
        if when is None:
            return Block(Gate.FINAL_REMINDER, f"waiting for the final reminder {r.notice_id} to be confirmed",
                         r.due_at)
        cut = max(slot, when + t.final_reminder_s)
        if now < cut:
            return Block(Gate.FINAL_REMINDER, f"final reminder confirmed at {self.fmt(when)}; cut at "
                                              f"{self.fmt(cut)}", cut)
        tb = self.gates.time_block(acct.area, int(now))
        if tb is not None:  # the reminder came too late for today's window
            self._unplan(case)
            return tb
        return None

    def _trip(self, case: TripCase, acct: Account, meters: list[Meter], now: float) -> None:
        _, window_end = self.gates.windows.window_of(int(now))
        expires = min(now + self.cfg.trips.trip_command_ttl_s, window_end)
        case.state, case.gate, case.gate_reason, case.next_check_at = CaseState.TRIPPING, "", "", None
        case.rounds += 1
        case.updated_at = now
        self._touch(case)
        self._emit("trip_started", case.account_id, now, case_id=case.case_id, round=case.rounds)
        for m in meters:
            c = Command(f"trip:{case.case_id}:{case.rounds}:{m.meter_id}", m.meter_id, acct.account_id,
                        RelayAction.TRIP, ENGINE, ENGINE,
                        f"arrears: balance {case.balance_fen} fen at or below the trip level (case {case.case_id})",
                        case.case_id, now, expires, updated_at=now)
            status = self.relays.get(m.meter_id)
            if status is not None and status.open:
                c.readback_first = True  # already open (by us in an earlier round, or by the meter): just confirm
            c = self._submit(c, now)
            if c.command_id not in case.command_ids:
                case.command_ids.append(c.command_id)

    def fmt(self, t: float) -> str:
        return f"{self.calendar.local(int(t)):%Y-%m-%d %H:%M}"


def _urgency(s: Step) -> tuple:
    return s.priority, s.due_at, s.subject_id


def _request_payload(r: NoticeRequest) -> dict:
    return {"request_id": r.request_id, "notice_id": r.notice_id, "account_id": r.account_id,
            "purpose": r.purpose.value, "channel": r.channel, "address": r.address, "params": r.params,
            "timeout_at": r.timeout_at}


__all__ = ["Controller", "ControlConfig", "AuthorityPolicy", "CalendarPolicy", "AuthorityError", "Effects",
           "Event", "AuditRecord", "Step", "Permit", "SendResult", "NoticeReceiptIn", "TripCase", "CaseState",
           "ENGINE", "ROLES"]
