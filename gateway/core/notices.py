"""Notices to customers: requests through their channels in order, receipts, escalation. Pure, clock injected.

The gateway does not send SMS itself: it asks upstream notification systems to deliver a notice through one
channel at a time and waits for the receipt. Only a confirmed delivery counts: a failed receipt, an empty
one (nothing recorded as delivered) or none within the channel's timeout escalates to the next channel. A
channel for which the account has no address (no phone number, no app account) is skipped, with the reason
kept. Requests go out only inside each channel's permitted hours: a notice that falls outside waits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .policy import Hours, PolicyError, WorkCalendar


class NoticePurpose(str, Enum):
    WARNING_1 = "warning_1"  # balance at warning level 1
    WARNING_2 = "warning_2"
    DISCONNECT = "disconnect"  # the notice of disconnection, when no qualifying warning was confirmed
    FINAL_REMINDER = "final_reminder"  # the re-notice shortly before the cut
    PRESS_BUTTON = "press_button"  # reconnect by close-allowed: the customer presses the meter's button


#: Notices that tell the customer power will be disconnected: any of them, confirmed, satisfies the notice gate.
DISCONNECT_NOTICES = (NoticePurpose.WARNING_1, NoticePurpose.WARNING_2, NoticePurpose.DISCONNECT)


class NoticeState(str, Enum):
    WAITING = "waiting"  # due at due_at (next channel, or the channel's hours)
    REQUESTED = "requested"  # asked upstream to deliver on one channel; waiting for its receipt
    DELIVERED = "delivered"
    EXHAUSTED = "exhausted"  # every channel tried, none confirmed
    CANCELLED = "cancelled"  # no longer needed (the customer paid)

    @property
    def active(self) -> bool:
        return self in (NoticeState.WAITING, NoticeState.REQUESTED)


class ReceiptOutcome(str, Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # the channel says it could not deliver (wrong number, switched off, bounced)
    EMPTY = "empty"  # a receipt that records no delivery
    TIMEOUT = "timeout"  # no receipt within the channel's timeout
    SKIPPED = "skipped"  # the account has no address on this channel


#: Receipt outcomes upstream may report (timeouts and skips are the gateway's own).
UPSTREAM_OUTCOMES = (ReceiptOutcome.DELIVERED, ReceiptOutcome.FAILED, ReceiptOutcome.EMPTY)


@dataclass(frozen=True)
class ChannelPolicy:
    timeout_s: int
    hours: str = "08:00-21:00"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise PolicyError("timeout_s must be positive")
        Hours.parse(self.hours, "hours")


def _default_channels() -> dict:
    return {
        "sms": ChannelPolicy(3600),
        "voice": ChannelPolicy(2 * 3600, "09:00-20:00"),
        "app": ChannelPolicy(2 * 3600),
        "email": ChannelPolicy(12 * 3600),
        "paper": ChannelPolicy(72 * 3600, "09:00-17:00"),  # field staff deliver it by hand
    }


@dataclass(frozen=True)
class NoticePolicy:
    channels: dict[str, ChannelPolicy] = field(default_factory=_default_channels)  # channel -> ChannelPolicy
    #: appended to the account's own channels for the notice of disconnection (never for warnings)
    last_resort: tuple[str, ...] = ("paper",)
    #: a reminder minutes before the cut cannot wait for paper
    final_reminder_channels: tuple[str, ...] = ("sms", "voice", "app")

    def __post_init__(self) -> None:
        for name, ch in self.channels.items():
            if not isinstance(ch, ChannelPolicy):
                raise PolicyError(f"channels.{name} must be a channel policy (timeout_s, hours)")
        for what in ("last_resort", "final_reminder_channels"):
            unknown = [c for c in getattr(self, what) if c not in self.channels]
            if unknown:
                raise PolicyError(f"{what}: unknown channel(s) {unknown}; known: {', '.join(self.channels)}")

    def channels_for(self, purpose: NoticePurpose, account_channels: tuple[str, ...]) -> tuple[str, ...]:
        own = tuple(dict.fromkeys(c for c in account_channels if c in self.channels))
        if purpose == NoticePurpose.FINAL_REMINDER:
            return tuple(c for c in own if c in self.final_reminder_channels) or self.final_reminder_channels[:1]
        if purpose == NoticePurpose.DISCONNECT:
            return own + tuple(c for c in self.last_resort if c not in own)
        return own


@dataclass
class Attempt:
    request_id: str
    channel: str
    address: str
    requested_at: int
    timeout_at: int
    outcome: ReceiptOutcome = ReceiptOutcome.PENDING
    outcome_at: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class NoticeRequest:
    """Ask upstream to deliver ``notice_id`` on ``channel`` to ``address``; the receipt names ``request_id``."""

    request_id: str
    notice_id: str
    account_id: str
    purpose: NoticePurpose
    channel: str
    address: str
    params: dict
    requested_at: int
    timeout_at: int


@dataclass
class Notice:
    notice_id: str
    account_id: str
    purpose: NoticePurpose
    created_at: int
    channels: tuple[str, ...]
    params: dict = field(default_factory=dict)  # balance, level, planned trip time: for the message text
    state: NoticeState = NoticeState.WAITING
    due_at: int | None = None
    next_channel: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    delivered_at: int | None = None
    delivered_channel: str = ""
    closed_reason: str = ""
    updated_at: int = 0

    def __post_init__(self) -> None:
        if self.due_at is None and self.state == NoticeState.WAITING:
            self.due_at = self.created_at

    def attempt(self, request_id: str) -> Attempt | None:
        return next((a for a in self.attempts if a.request_id == request_id), None)


@dataclass
class NoticeStep:
    """What one call changed: requests to publish, and the other transitions (escalated, delivered,
    exhausted) as (event kind, detail, fields) for the event log; ``fields`` names the channel and the
    receipt outcome where a channel's attempt ended (metrics count them)."""

    requests: list[NoticeRequest] = field(default_factory=list)
    transitions: list[tuple[str, str, dict]] = field(default_factory=list)  # (event kind, detail, fields)


class Notifier:
    """Drives notices through their channels. Stateless: every method takes the notice and the time."""

    def __init__(self, policy: NoticePolicy, calendar: WorkCalendar) -> None:
        self.policy = policy
        self.calendar = calendar
        self._hours = {name: Hours.parse(ch.hours) for name, ch in policy.channels.items()}

    def advance(self, n: Notice, now: int, contacts: dict, postal_address: str) -> NoticeStep:
        """Move ``n`` as far as ``now`` allows: time out a silent channel, escalate, request the next."""
        step = NoticeStep()
        for _ in range(len(n.channels) * 2 + 2):
            if n.state == NoticeState.REQUESTED and n.due_at is not None and now >= n.due_at:
                a = n.attempts[-1]
                a.outcome, a.outcome_at = ReceiptOutcome.TIMEOUT, now
                step.transitions.append(("notice_escalated", f"no receipt on {a.channel} within "
                                                             f"{self.policy.channels[a.channel].timeout_s}s",
                                         _ended(a)))
                n.next_channel += 1
                n.state, n.due_at = NoticeState.WAITING, now
                continue
            if n.state != NoticeState.WAITING or n.due_at is None or now < n.due_at:
                break
            if n.next_channel >= len(n.channels):
                n.state, n.due_at = NoticeState.EXHAUSTED, None
                n.closed_reason = "no channel confirmed delivery" if n.attempts else "the account has no channel"
                step.transitions.append(("notice_exhausted", n.closed_reason, {}))
                break
            channel = n.channels[n.next_channel]
            address = postal_address if channel == "paper" else str(contacts.get(channel) or "")
            if not address.strip():
                n.attempts.append(Attempt(f"{n.notice_id}/{len(n.attempts) + 1}", channel, "", now, now,
                                          ReceiptOutcome.SKIPPED, now, f"no {channel} address on the account"))
                step.transitions.append(("notice_escalated", f"no {channel} address on the account",
                                         _ended(n.attempts[-1])))
                n.next_channel += 1
                continue
            when = self.calendar.next_within(self._hours[channel], now, 2)  # hours are never empty: found
            if when > now:
                n.due_at = when  # outside the channel's hours: wait
                break
            timeout_at = now + self.policy.channels[channel].timeout_s
            a = Attempt(f"{n.notice_id}/{len(n.attempts) + 1}", channel, address, now, timeout_at)
            n.attempts.append(a)
            n.state, n.due_at = NoticeState.REQUESTED, timeout_at
            step.requests.append(NoticeRequest(a.request_id, n.notice_id, n.account_id, n.purpose, channel,
                                               address, dict(n.params), now, timeout_at))
        n.updated_at = now
        return step

    def receipt(self, n: Notice, request_id: str, outcome: ReceiptOutcome, at: int, now: int, detail: str,
                contacts: dict, postal_address: str) -> NoticeStep:
        """A receipt from upstream. Re-delivered receipts change nothing; a delivery confirmed late (after the
        gateway gave up on that channel) still counts: the customer did get the notice."""
        a = n.attempt(request_id)
        if a is None:
            raise KeyError(f"notice {n.notice_id} has no request {request_id!r}")
        if outcome not in UPSTREAM_OUTCOMES:
            raise ValueError(f"receipt outcome {outcome.value!r}; allowed: "
                             f"{', '.join(o.value for o in UPSTREAM_OUTCOMES)}")
        # the delivery time the channel reports, kept within what is possible (never before the request,
        # never in the future): a wrong clock upstream must not make a notice look older than it is
        at = min(max(at, a.requested_at), now)
        step = NoticeStep()
        if a.outcome != ReceiptOutcome.PENDING:
            if outcome == ReceiptOutcome.DELIVERED and n.delivered_at is None:
                a.detail = (a.detail + "; " if a.detail else "") + f"delivered late at {at}"
                self._delivered(n, a, at, step, late=True)
            n.updated_at = now
            return step
        a.outcome, a.outcome_at, a.detail = outcome, at, detail
        if outcome == ReceiptOutcome.DELIVERED:
            self._delivered(n, a, at, step)
            n.updated_at = now
            return step
        why = f"{a.channel}: {outcome.value}" + (f" ({detail})" if detail else "")
        step.transitions.append(("notice_escalated", why, _ended(a)))
        if n.state == NoticeState.REQUESTED and n.attempts[-1] is a:
            n.next_channel += 1
            n.state, n.due_at = NoticeState.WAITING, now
            more = self.advance(n, now, contacts, postal_address)
            step.requests += more.requests
            step.transitions += more.transitions
        n.updated_at = now
        return step

    @staticmethod
    def _delivered(n: Notice, a: Attempt, at: int, step: NoticeStep, late: bool = False) -> None:
        """``late``: the attempt had already ended (timed out, failed): the notice is delivered, but the attempt
        keeps the end it had."""
        if n.delivered_at is None or at < n.delivered_at:  # the first confirmed delivery is when they knew
            n.delivered_at, n.delivered_channel = at, a.channel
        if n.state.active:
            n.state, n.due_at = NoticeState.DELIVERED, None
        step.transitions.append(("notice_delivered", f"{a.channel} at {at}",
                                 {"channel": a.channel, "outcome": ReceiptOutcome.DELIVERED.value, "late": late}))

    @staticmethod
    def cancel(n: Notice, now: int, reason: str) -> bool:
        if not n.state.active:
            return False
        n.state, n.due_at, n.closed_reason, n.updated_at = NoticeState.CANCELLED, None, reason, now
        return True


def _ended(a: Attempt) -> dict:
    return {"channel": a.channel, "outcome": a.outcome.value}


def split_request_id(request_id: str) -> str:
    """The notice a request belongs to (request ids are ``NOTICE_ID/N``)."""
    notice_id, sep, n = request_id.rpartition("/")
    if not sep or not n.isdigit() or not notice_id:
        raise ValueError(f"{request_id!r} is not a notice request id (NOTICE_ID/N)")
    return notice_id
