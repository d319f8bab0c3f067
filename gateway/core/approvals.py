"""The two-person rule for manual disconnects: one person requests, another (a supervisor) approves or rejects.

A manual disconnect of one meter, or a batch disconnect plan of many, is an :class:`ApprovalRequest` made by
an operator (or above). A supervisor or admin who is not the requester decides it, with a reason, before it
expires; only an approval makes trip commands (the shell makes them in the transaction that records the
approval, keyed by the request id, so an approval sent twice trips once). Pure: times are passed in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

REQUESTER_ROLES = ("operator", "supervisor", "admin")
APPROVER_ROLES = ("supervisor", "admin")
DEFAULT_TTL_S = 24 * 3600
MAX_PLAN_METERS = 10_000


class RequestState(str, Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"  # pending past its expiry: never stored as such, seen as such (``state_at``)


class RequestKind(str, Enum):
    DISCONNECT = "disconnect"  # one meter
    DISCONNECT_PLAN = "disconnect_plan"  # a batch


class ApprovalError(Exception):
    """The request cannot be made or decided as asked: ``why`` says what is wrong."""


class NotPermitted(ApprovalError, PermissionError):
    """This person may not do this (the requester deciding their own request, a role without the right)."""


class NotPending(ApprovalError):
    """The request was decided already, or expired."""


class KeyInUse(ApprovalError):
    """An idempotency key given again for a different request."""


@dataclass(frozen=True)
class ApprovalRequest:
    request_id: str
    kind: RequestKind
    meter_ids: tuple[str, ...]
    requested_by: str
    requested_role: str
    reason: str
    created_at: float
    expires_at: float
    state: RequestState = RequestState.PENDING
    decided_by: str = ""
    decided_role: str = ""
    decided_at: float | None = None
    decision_reason: str = ""
    command_ids: tuple[str, ...] = ()

    def state_at(self, now: float) -> RequestState:
        if self.state == RequestState.PENDING and now >= self.expires_at:
            return RequestState.EXPIRED
        return self.state


def new_request(request_id: str, meter_ids: list[str] | tuple[str, ...], actor: str, role: str, reason: str,
                now: float, ttl_s: float = DEFAULT_TTL_S) -> ApprovalRequest:
    meters = tuple(dict.fromkeys(meter_ids))  # the same meter twice is one disconnect
    if not actor.strip():
        raise NotPermitted("an identity is required")
    if role not in REQUESTER_ROLES:
        raise NotPermitted(f"role {role!r} may not request disconnects; allowed: {', '.join(REQUESTER_ROLES)}")
    if not reason.strip():
        raise ApprovalError("a reason is required")
    if not meters:
        raise ApprovalError("at least one meter is required")
    if len(meters) > MAX_PLAN_METERS:
        raise ApprovalError(f"a plan has at most {MAX_PLAN_METERS} meters, got {len(meters)}")
    if ttl_s <= 0:
        raise ApprovalError("the request's time to live must be positive")
    kind = RequestKind.DISCONNECT if len(meters) == 1 else RequestKind.DISCONNECT_PLAN
    return ApprovalRequest(request_id, kind, meters, actor, role, reason, now, now + ttl_s)


def decide(req: ApprovalRequest, approve: bool, actor: str, role: str, reason: str, now: float) -> ApprovalRequest:
    """The request approved or rejected by ``actor``; raises what stands in the way."""
    state = req.state_at(now)
    if state != RequestState.PENDING:
        by = f" by {req.decided_by}" if req.decided_by else ""
        raise NotPending(f"request {req.request_id} is {state.value}{by}: only a pending request can be decided")
    if role not in APPROVER_ROLES:
        raise NotPermitted(f"role {role!r} may not decide disconnect requests; allowed: {', '.join(APPROVER_ROLES)}")
    if actor.casefold() == req.requested_by.casefold():  # "Sam" and "sam" are one person
        raise NotPermitted(f"{actor} made request {req.request_id}: a second person must decide it")
    if not reason.strip():
        raise ApprovalError("a reason is required")
    return dataclasses.replace(req, state=RequestState.APPROVED if approve else RequestState.REJECTED,
                               decided_by=actor, decided_role=role, decided_at=now, decision_reason=reason)
