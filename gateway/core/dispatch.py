"""Field work orders: when remote control keeps failing, a crew goes. Deadline, urgency, field updates, closure.

A reconnect order's deadline is the payment time plus the configured limit (24 h by default): the customer
paid, power must be back by then whatever the meter does. Orders are ranked by urgency: time left, brought
forward for customer classes that cannot wait (life support first). Field updates move an order forward
(accepted, on site, completed, failed); a completed order is verified by reading the meter when it is
reachable, and an order near its deadline escalates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .model import CustomerClass
from .policy import PolicyError


class OrderKind(str, Enum):
    RECONNECT = "reconnect"
    DISCONNECT = "disconnect"  # a trip that failed remotely (only when configured)


class OrderState(str, Enum):
    OPEN = "open"
    ACCEPTED = "accepted"
    ON_SITE = "on_site"
    FAILED = "failed"  # the visit failed (no access, meter damaged): needs another; still counts as open
    COMPLETED = "completed"
    CANCELLED = "cancelled"  # remote control succeeded after all

    @property
    def active(self) -> bool:
        return self not in (OrderState.COMPLETED, OrderState.CANCELLED)


class FieldStatus(str, Enum):
    ACCEPTED = "accepted"
    ON_SITE = "on_site"
    COMPLETED = "completed"
    FAILED = "failed"


_RANK = {OrderState.OPEN: 0, OrderState.FAILED: 0, OrderState.ACCEPTED: 1, OrderState.ON_SITE: 2,
         OrderState.COMPLETED: 3}


def _default_boost() -> dict:
    return {"protected": 12 * 3600, "vip": 4 * 3600, "commercial": 3600, "residential": 0}


@dataclass(frozen=True)
class DispatchPolicy:
    reconnect_deadline_s: int = 24 * 3600  # from the payment
    disconnect_deadline_s: int = 72 * 3600
    trip_failure_orders: bool = False  # failed remote trips also get (lower priority) field orders
    escalate_before_s: int = 4 * 3600  # escalate an order with less than this left
    # ranked as if the deadline were this much sooner
    class_boost_s: dict[str, int] = field(default_factory=_default_boost)
    verify_every_s: int = 300  # a completed order: read the meter until it answers...
    verify_window_s: int = 24 * 3600  # ...for this long

    def __post_init__(self) -> None:
        for name in ("reconnect_deadline_s", "disconnect_deadline_s", "verify_every_s", "verify_window_s"):
            if getattr(self, name) <= 0:
                raise PolicyError(f"{name} must be positive")
        if not 0 <= self.escalate_before_s < self.reconnect_deadline_s:
            raise PolicyError("escalate_before_s must be below reconnect_deadline_s")
        classes = {c.value for c in CustomerClass}
        unknown = set(self.class_boost_s) - classes
        if unknown:
            raise PolicyError(f"class_boost_s: unknown customer class(es) {sorted(unknown)}; "
                              f"allowed: {', '.join(sorted(classes))}")


@dataclass(frozen=True)
class FieldUpdate:
    update_id: str  # idempotency key from the work-order system
    order_id: str
    status: FieldStatus
    at: float
    crew: str = ""
    note: str = ""


@dataclass
class WorkOrder:
    order_id: str
    kind: OrderKind
    command_id: str
    meter_id: str
    account_id: str
    customer_class: str
    address: str
    lat: float | None
    lon: float | None
    reason: str
    attempts: list = field(default_factory=list)  # what was tried remotely: [{at, error}], newest last
    created_at: float = 0.0
    deadline_at: float = 0.0
    state: OrderState = OrderState.OPEN
    escalation: int = 0  # 0 none, 1 deadline at risk, 2 overdue
    visits: int = 0  # failed visits so far
    crew: str = ""
    note: str = ""
    verified: str = ""  # completed orders: "", pending, confirmed, contradicted, unreachable; cancelled ones:
    # "confirmed" when a remote command reached the order's state (a crew's completion is still taken)
    verify_next_at: float | None = None
    closed_at: float | None = None
    updated_at: float = 0.0


class Dispatcher:
    """Transitions of :class:`WorkOrder`. Stateless: every method takes the order and the time."""

    def __init__(self, policy: DispatchPolicy) -> None:
        self.policy = policy

    def urgency(self, o: WorkOrder) -> tuple:
        """Sort key, most urgent first: reconnects before disconnects, then the deadline brought forward by
        the customer class."""
        boost = self.policy.class_boost_s.get(o.customer_class, 0)
        return (o.kind != OrderKind.RECONNECT, o.deadline_at - boost, o.created_at, o.order_id)

    def apply(self, o: WorkOrder, u: FieldUpdate, now: float) -> str:
        """A field update. Returns what happened: 'applied', 'stale' (an older update arriving late: kept
        for the record, no effect). Raises ValueError for an update the order cannot take."""
        new = OrderState(u.status.value)
        if o.state == OrderState.CANCELLED and o.verified == "confirmed" and new == OrderState.COMPLETED:
            # the crew was on site while a remote retry did the same: their visit happened, record it (the
            # meter was already read in the order's state; no verification reads needed)
            o.state, o.crew, o.closed_at, o.updated_at = OrderState.COMPLETED, u.crew or o.crew, now, now
            o.note = f"{o.note}; completed on site as well" + (f": {u.note}" if u.note else "")
            return "applied"
        if not o.state.active:
            raise ValueError(f"order {o.order_id} is {o.state.value}: it takes no more field updates "
                             f"(got {u.status.value})")
        if new != OrderState.FAILED and o.state != OrderState.FAILED and _RANK[new] < _RANK[o.state]:
            return "stale"
        if new == o.state and new != OrderState.FAILED:  # another failed visit is news, not a repeat
            return "stale"
        o.state = new
        o.crew = u.crew or o.crew
        if u.note:
            o.note = u.note
        if new == OrderState.FAILED:
            o.visits += 1
        if new == OrderState.COMPLETED:
            o.closed_at = now
            o.verified, o.verify_next_at = "pending", now
        o.updated_at = now
        return "applied"

    def verified(self, o: WorkOrder, now: float, relay_open: bool | None) -> str:
        """A read of the meter after completion: ``relay_open`` None means unreachable."""
        if relay_open is None:
            if now - (o.closed_at or now) >= self.policy.verify_window_s:
                o.verified, o.verify_next_at = "unreachable", None
            else:
                o.verify_next_at = now + self.policy.verify_every_s
            o.updated_at = now
            return o.verified
        wanted_open = o.kind == OrderKind.DISCONNECT
        if relay_open == wanted_open:
            o.verified, o.verify_next_at = "confirmed", None
        else:
            # the crew reported done but the meter says otherwise: the order is not done
            o.verified, o.verify_next_at = "contradicted", None
            o.state, o.closed_at = OrderState.OPEN, None
            o.note = (o.note + "; " if o.note else "") + "reported completed but the meter disagrees"
        o.updated_at = now
        return o.verified

    def _escalates_at(self, o: WorkOrder) -> tuple[float, float]:
        """When the order reaches escalation level 1 (deadline at risk) and level 2 (overdue)."""
        return o.deadline_at - self.policy.escalate_before_s, o.deadline_at

    def escalation_due(self, o: WorkOrder, now: float) -> int:
        """The escalation level the order should be at now (only ever rises)."""
        if not o.state.active:
            return o.escalation
        level = sum(now >= t for t in self._escalates_at(o))
        return max(level, o.escalation)

    def next_escalation_at(self, o: WorkOrder) -> float | None:
        if not o.state.active or o.escalation >= 2:
            return None
        return self._escalates_at(o)[o.escalation]

    @staticmethod
    def cancel(o: WorkOrder, now: float, why: str, reached: bool = False) -> bool:
        """``reached``: the meter was read in the state the order asked for (a remote retry succeeded), so the
        order is also verified: a crew's completion crossing the cancellation is still recorded."""
        if not o.state.active:
            return False
        o.state, o.closed_at, o.note, o.updated_at = OrderState.CANCELLED, now, why, now
        if reached:
            o.verified = "confirmed"
        return True
