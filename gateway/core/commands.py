"""Relay commands: a durable state machine per command, retries with backoff, verification by read-back.

Pure, clock injected. The executor (``gateway.southbound.executor``) asks which step is due, performs it on
the wire and reports what happened; every transition is committed before the next step, and a command's
SENDING state is committed before its frame goes out. Only a read-back of the relay (run status word 3)
confirms: a meter that acknowledges but does not move has failed.

::

    QUEUED ──send──> SENDING ──ack / no answer──> VERIFYING ──relay at target──> CONFIRMED
       ^                │ refused                     │ not moved by settle time / unreadable
       │                v                             v
    RETRY_WAIT <──── failure (backoff + jitter, within the attempts and time budget) ──> FAILED
    DISPATCHED: a field order is open; remote retries go on at a slower pace until the budget ends
    CANCELLED: superseded, expired, stopped by a gate at send time;  BLOCKED: keep-power (保电) refused a trip

After a timeout the outcome is unknown, so the next attempt starts by reading the relay; after a crash a
command found in SENDING or VERIFYING is verified by reading before anything is re-sent.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from enum import Enum

from .policy import PolicyError


class RelayAction(str, Enum):
    TRIP = "trip"
    CLOSE = "close"


class ReconnectMode(str, Enum):
    DIRECT = "direct"  # direct close (直接合闸): success is the relay closed
    CLOSE_ALLOWED = "close_allowed"  # close allowed (合闸允许): the customer presses the button; success is the
    # meter accepting the close (commanded position closed), reported to the customer as "press the button"


class CommandState(str, Enum):
    QUEUED = "queued"
    SENDING = "sending"
    VERIFYING = "verifying"
    CONFIRMED = "confirmed"
    RETRY_WAIT = "retry_wait"
    FAILED = "failed"
    DISPATCHED = "dispatched"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"

    @property
    def active(self) -> bool:
        return self in _ACTIVE

    @property
    def in_flight(self) -> bool:
        """The frame may have reached the meter: it cannot be recalled, only followed."""
        return self in (CommandState.SENDING, CommandState.VERIFYING)


_ACTIVE = frozenset({CommandState.QUEUED, CommandState.SENDING, CommandState.VERIFYING, CommandState.RETRY_WAIT,
                     CommandState.DISPATCHED})


@dataclass(frozen=True)
class RelayStatus:
    """A read-back of a meter's relay (status word 3 on DL/T 645)."""

    open: bool  # the real contact position
    commanded_open: bool | None = None  # the position last commanded (None: the meter does not say)
    keep_power: bool = False  # 保电: the meter refuses trips


class StepKind(str, Enum):
    SEND = "send"
    READ = "read"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    max_elapsed_s: float
    backoff_s: float
    backoff_max_s: float
    jitter: float = 0.2  # +-20 %: commands failed together are not all retried together
    refusal_backoff_s: float = 600.0  # after an explicit refusal: do not hammer the meter
    settle_s: float = 5.0  # meters take a few seconds to report the real position
    verify_first_s: float = 0.5  # first read-back this long after the ack; then every verify_every_s
    verify_every_s: float = 1.0
    frame_validity_s: int = 600  # the deadline in the frame: a meter ignores it after this
    ttl_s: float = 24 * 3600  # an expired command is never sent
    dispatch_after_failures: int | None = None  # a field order after this many failed attempts...
    dispatch_after_s: float | None = None  # ...or this long after the command was made, whichever first
    dispatched_retry_s: float = 1800.0  # remote retries while a field order is open

    def check(self, what: str) -> None:
        if self.max_attempts < 1:
            raise PolicyError(f"{what}.max_attempts must be at least 1")
        for name in ("max_elapsed_s", "backoff_s", "backoff_max_s", "settle_s", "verify_every_s", "ttl_s",
                     "dispatched_retry_s", "frame_validity_s"):
            if getattr(self, name) <= 0:
                raise PolicyError(f"{what}.{name} must be positive")
        if not 0 <= self.jitter < 1:
            raise PolicyError(f"{what}.jitter must be in [0, 1)")
        if not 0 <= self.verify_first_s <= self.settle_s:
            raise PolicyError(f"{what}.verify_first_s must be between 0 and settle_s")
        if self.dispatch_after_failures is not None and self.dispatch_after_failures >= self.max_attempts:
            raise PolicyError(f"{what}.dispatch_after_failures ({self.dispatch_after_failures}) must be below "
                              f"max_attempts ({self.max_attempts}): the field order comes before the budget runs out")
        if self.dispatch_after_s is not None and self.dispatch_after_s >= self.max_elapsed_s:
            raise PolicyError(f"{what}.dispatch_after_s must be below max_elapsed_s")


def _close_policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=10, max_elapsed_s=12 * 3600, backoff_s=10, backoff_max_s=1800,
                       refusal_backoff_s=300, ttl_s=48 * 3600, dispatch_after_failures=3, dispatch_after_s=1800)


def _trip_policy() -> RetryPolicy:
    return RetryPolicy(max_attempts=3, max_elapsed_s=3600, backoff_s=30, backoff_max_s=600,
                       refusal_backoff_s=900, ttl_s=2 * 3600)


@dataclass(frozen=True)
class CommandPolicy:
    close: RetryPolicy = field(default_factory=_close_policy)
    trip: RetryPolicy = field(default_factory=_trip_policy)

    def __post_init__(self) -> None:
        self.close.check("close")
        self.trip.check("trip")
        if self.close.dispatch_after_failures is None and self.close.dispatch_after_s is None:
            raise PolicyError("close needs dispatch_after_failures or dispatch_after_s: a failing "
                              "reconnect must reach a field crew")

    def for_action(self, action: RelayAction) -> RetryPolicy:
        return self.close if action == RelayAction.CLOSE else self.trip


@dataclass
class Command:
    command_id: str  # also the idempotency key: the same request twice is the same command
    meter_id: str
    account_id: str
    action: RelayAction
    actor: str  # "engine", or the operator's identity
    role: str  # "engine" or the operator's role
    reason: str
    origin: str  # the decision or the operator's request that made it
    created_at: float
    expires_at: float
    mode: ReconnectMode = ReconnectMode.DIRECT
    state: CommandState = CommandState.QUEUED
    next_at: float | None = None  # when the next step is due
    readback_first: bool = False  # the last attempt's outcome is unknown: read before sending again
    attempts: int = 0  # frames sent (or possibly sent)
    failures: int = 0
    refusals: int = 0
    sent_at: float | None = None
    verify_until: float | None = None
    confirmed_at: float | None = None
    outcome: str = ""  # open / closed / close_allowed / closed_by_field, or why it ended
    last_error: str = ""
    payment_at: float | None = None  # close: when the payment that cleared the arrears was made
    deadline_at: float | None = None  # close: reconnected by then, remotely or by a field crew
    order_id: str = ""
    superseded_by: str = ""
    history: list = field(default_factory=list)  # the last steps: [{at, event, detail}]; the audit log keeps all
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        if self.next_at is None and self.state == CommandState.QUEUED:
            self.next_at = self.created_at

    @property
    def acted(self) -> bool:
        """Confirmed by moving (or setting) the relay; not by finding it already where it wanted it."""
        return self.state == CommandState.CONFIRMED and not self.outcome.startswith("already_")

    @property
    def priority(self) -> int:
        """Lower runs first: closes before trips (a paid customer waits for no one)."""
        return 0 if self.action == RelayAction.CLOSE else 1

    def target_reached(self, status: RelayStatus) -> str | None:
        """The outcome if the relay is where this command wants it, else None."""
        if self.action == RelayAction.TRIP:
            return "open" if status.open else None
        if not status.open:
            return "closed"
        if self.mode == ReconnectMode.CLOSE_ALLOWED and status.commanded_open is False:
            return "close_allowed"  # the meter accepted: it closes when the customer presses the button
        return None


@dataclass(frozen=True)
class Failure:
    """What ended an attempt, for the retry decision."""

    why: str
    refused: bool = False  # an explicit refusal (error word): back off harder
    unknown: bool = False  # the frame may have acted: read back before the next send
    final: bool = False  # retrying cannot help (wrong password): stop now


class CommandMachine:
    """Transitions of :class:`Command`. Stateless: every method takes the command and the time."""

    def __init__(self, policy: CommandPolicy) -> None:
        self.policy = policy

    def step_due(self, c: Command, now: float) -> StepKind | None:
        """SENDING has no step: it lasts from the commit to the wire's answer (after a restart the controller
        turns it into VERIFYING, so the relay is read before anything is sent again)."""
        at = self.step_at(c)
        if at is None or now < at:
            return None
        return StepKind.READ if c.state == CommandState.VERIFYING or c.readback_first else StepKind.SEND

    @staticmethod
    def step_at(c: Command) -> float | None:
        """When the command's next step falls due (None: it has none, as it stands)."""
        if c.state in (CommandState.VERIFYING, CommandState.QUEUED, CommandState.RETRY_WAIT,
                       CommandState.DISPATCHED):
            return c.next_at
        return None

    def expired(self, c: Command, now: float) -> bool:
        return now >= c.expires_at

    def begin_send(self, c: Command, now: float) -> float:
        """Mark the command SENDING (to be committed before the frame goes out); returns the frame's validity
        deadline, never beyond the command's expiry."""
        p = self.policy.for_action(c.action)
        c.state, c.attempts, c.sent_at, c.next_at = CommandState.SENDING, c.attempts + 1, now, None
        c.readback_first = False
        c.updated_at = now
        return min(c.expires_at, now + p.frame_validity_s)

    def on_sent(self, c: Command, now: float, answered: bool, note: str = "") -> None:
        """The meter acknowledged (``answered``), or nothing came back: either way only a read-back can tell."""
        p = self.policy.for_action(c.action)
        c.state = CommandState.VERIFYING
        c.next_at = now + p.verify_first_s
        c.verify_until = now + p.settle_s
        c.last_error = "" if answered else (note or "no answer: outcome unknown, reading back")
        c.updated_at = now

    def on_readback(self, c: Command, now: float, status: RelayStatus) -> str:
        """A read of the relay. Returns 'confirmed', 'waiting' (read again), 'send' (not there yet, go on)
        or 'failed' (an attempt failed; see the state)."""
        outcome = c.target_reached(status)
        if outcome is not None:
            if c.attempts == 0:  # there before any frame of ours: say so ("why is this meter off?" relies on it)
                outcome = f"already_{outcome}"
            c.state, c.confirmed_at, c.outcome, c.next_at = CommandState.CONFIRMED, now, outcome, None
            c.readback_first, c.last_error, c.updated_at = False, "", now
            return "confirmed"
        if c.state == CommandState.VERIFYING and c.verify_until is not None and now < c.verify_until:
            p = self.policy.for_action(c.action)
            c.next_at = min(now + p.verify_every_s, c.verify_until)
            c.updated_at = now
            return "waiting"
        if c.state == CommandState.VERIFYING:
            where = "open" if status.open else "closed"
            why = (f"the meter acknowledged but the relay is still {where}" if not c.last_error
                   else f"{c.last_error}; the relay is still {where}")
            self.fail(c, now, Failure(why))
            return "failed"
        # a read before re-sending: the earlier attempt did not act, so send again now
        c.readback_first, c.next_at, c.updated_at = False, now, now
        return "send"

    def on_read_failed(self, c: Command, now: float, why: str) -> str:
        """The relay could not be read. While verifying, read again until the settle time is up."""
        if c.state == CommandState.VERIFYING and c.verify_until is not None and now < c.verify_until:
            p = self.policy.for_action(c.action)
            c.next_at = min(now + p.verify_every_s, c.verify_until)
            c.updated_at = now
            return "waiting"
        self.fail(c, now, Failure(f"relay state unreadable: {why}", unknown=True))
        return "failed"

    def fail(self, c: Command, now: float, f: Failure) -> None:
        """An attempt failed: back off and retry within the budget, or give up."""
        p = self.policy.for_action(c.action)
        c.failures += 1
        c.refusals += f.refused
        c.last_error, c.updated_at = f.why, now
        c.readback_first = f.unknown
        out_of_budget = (c.attempts >= p.max_attempts or now - c.created_at >= p.max_elapsed_s
                         or self.expired(c, now))
        if f.final or out_of_budget:
            c.state, c.next_at = CommandState.FAILED, None
            c.outcome = "failed: " + (f.why if f.final else f"retry budget spent ({c.attempts} attempts)")
            return
        delay = self.backoff(c, p)
        if f.refused:
            delay = max(delay, p.refusal_backoff_s)
        if c.order_id:
            c.state, delay = CommandState.DISPATCHED, max(delay, p.dispatched_retry_s)
        else:
            c.state = CommandState.RETRY_WAIT
        c.next_at = now + delay

    @staticmethod
    def backoff(c: Command, p: RetryPolicy) -> float:
        """Exponential in the failures so far, capped, with deterministic jitter (same command, same delays:
        replays and tests are reproducible; different commands spread out)."""
        base = min(p.backoff_s * 2 ** max(c.failures - 1, 0), p.backoff_max_s)
        frac = zlib.crc32(f"{c.command_id}:{c.failures}".encode()) / 0xFFFFFFFF
        return base * (1 + p.jitter * (2 * frac - 1))

    def needs_order(self, c: Command, now: float) -> bool:
        """A reconnect that keeps failing gets a field order before its retry budget runs out."""
        if c.action != RelayAction.CLOSE or c.order_id or c.state in (CommandState.CONFIRMED,
                                                                       CommandState.CANCELLED):
            return False
        p = self.policy.close
        if c.state == CommandState.FAILED:
            return True
        if p.dispatch_after_failures is not None and c.failures >= p.dispatch_after_failures:
            return True
        return p.dispatch_after_s is not None and now - c.created_at >= p.dispatch_after_s

    def order_time(self, c: Command) -> float | None:
        """When time alone could make :meth:`needs_order` true (None: only a change of the command can)."""
        p = self.policy.close
        if c.action != RelayAction.CLOSE or p.dispatch_after_s is None:
            return None
        return c.created_at + p.dispatch_after_s

    def dispatched(self, c: Command, order_id: str, now: float) -> None:
        c.order_id = order_id
        if c.state == CommandState.RETRY_WAIT:
            p = self.policy.close
            c.state = CommandState.DISPATCHED
            c.next_at = max(c.next_at or now, now + min(p.dispatched_retry_s, self.backoff(c, p)))
        c.updated_at = now

    @staticmethod
    def cancel(c: Command, now: float, why: str, superseded_by: str = "") -> bool:
        if not c.state.active or c.state.in_flight:
            return False
        c.state, c.next_at, c.outcome, c.superseded_by, c.updated_at = (
            CommandState.CANCELLED, None, why, superseded_by, now)
        return True

    @staticmethod
    def block(c: Command, now: float, why: str) -> None:
        c.state, c.next_at, c.outcome, c.last_error, c.updated_at = CommandState.BLOCKED, None, why, why, now

    @staticmethod
    def confirm_by_field(c: Command, now: float) -> None:
        c.state, c.next_at, c.confirmed_at, c.outcome, c.updated_at = (
            CommandState.CONFIRMED, None, now, "closed_by_field", now)


# --------------------------------------------------------------------------- why is this meter off?


@dataclass(frozen=True)
class RelayExplanation:
    """For a call-centre agent: where the relay is, and if open, which command opened it and why, or
    that the gateway did not open it (a fault or the meter's own protection, not arrears)."""

    meter_id: str
    relay: str  # open, closed, unknown (never read)
    verified_at: float | None
    opened_by_gateway: bool | None  # None unless open
    command_id: str = ""
    actor: str = ""
    role: str = ""
    reason: str = ""
    opened_at: float | None = None
    keep_power: bool = False
    waiting_for_button: bool = False
    pending: tuple = ()  # active commands: (command_id, action, state)
    order: dict | None = None  # the newest work order: id, kind, state, deadline
    summary: str = ""


def explain(meter_id: str, relay_row: tuple | None, commands: list[Command], orders: list,
            fmt=lambda t: f"{t:.0f}") -> RelayExplanation:
    """``relay_row``: (is_open, verified_at, commanded_open, keep_power) or None; ``commands`` and ``orders``
    newest first."""
    pending = tuple((c.command_id, c.action.value, c.state.value) for c in commands if c.state.active)
    order = None
    if orders:
        o = orders[0]
        order = {"order_id": o.order_id, "kind": o.kind.value, "state": o.state.value, "deadline_at": o.deadline_at,
                 "verified": o.verified}
    tail = ""
    if pending:
        tail += "; in progress: " + ", ".join(f"{a} {cid} ({s})" for cid, a, s in pending)
    if order and order["state"] not in ("completed", "cancelled"):
        tail += f"; field order {order['order_id']} {order['state']}, due {fmt(order['deadline_at'])}"
    if relay_row is None:
        return RelayExplanation(meter_id, "unknown", None, None, pending=pending, order=order,
                                summary="the relay position has never been read" + tail)
    is_open, at, commanded, keep = relay_row
    keep = bool(keep)
    if not is_open:
        return RelayExplanation(meter_id, "closed", at, None, keep_power=keep, pending=pending, order=order,
                                summary=f"closed (verified {fmt(at)})" + (", keep-power on" if keep else "") + tail)
    confirmed = [c for c in commands if c.state == CommandState.CONFIRMED]
    acted = sorted((c for c in confirmed if c.acted), key=lambda c: c.confirmed_at or 0, reverse=True)
    last = acted[0] if acted else None
    waiting = last is not None and last.action == RelayAction.CLOSE and last.outcome == "close_allowed"
    trip = next((c for c in acted if c.action == RelayAction.TRIP), None) if waiting else last
    if trip is not None and trip.action == RelayAction.TRIP:
        who = "the balance engine" if trip.actor == "engine" else f"operator {trip.actor} ({trip.role})"
        summary = f"opened by {who} with command {trip.command_id} at {fmt(trip.confirmed_at)}: {trip.reason}"
        if waiting:
            summary += (f"; close allowed at {fmt(last.confirmed_at)}: waiting for the customer to press "
                        f"the meter's button")
        return RelayExplanation(meter_id, "open", at, True, trip.command_id, trip.actor, trip.role, trip.reason,
                                trip.confirmed_at, keep, waiting, pending, order, summary + tail)
    summary = "not opened by the gateway: a fault, tampering or the meter's own protection, not arrears"
    found = next((c for c in confirmed if c.outcome == "already_open"), None)
    if found is not None and (last is None or (found.confirmed_at or 0) > (last.confirmed_at or 0)):
        summary = (f"not opened by the gateway: it was already open when trip command {found.command_id} came "
                   f"(the meter's own prepaid purse or protection)")
    if commanded:
        summary += " (the meter says it was commanded open: its own prepaid purse, or another system)"
    if last is not None:
        summary += f"; the gateway's last confirmed command was a {last.action.value} at {fmt(last.confirmed_at)}"
    return RelayExplanation(meter_id, "open", at, False, keep_power=keep, pending=pending, order=order,
                            summary=summary + tail)
