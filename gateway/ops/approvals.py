"""The two-person rule's shell: requests and decisions committed with their audit records.

Runs on the store's writer thread (the API calls it through ``gateway.writer.call``). A request is one
transaction (the request and its audit record); an approval is one transaction with the trip commands it makes
(:meth:`gateway.costcontrol.CostControl.manual_many`, keyed by the request id) and its audit record. The rule
itself is the pure :mod:`gateway.core.approvals`.
"""
from __future__ import annotations

import dataclasses
import uuid

from gateway.core.approvals import (
    DEFAULT_TTL_S,
    ApprovalRequest,
    KeyInUse,
    RequestState,
    decide,
    new_request,
)
from gateway.core.commands import Command, RelayAction
from gateway.core.control import AuditRecord
from gateway.costcontrol import CostControl


class Approvals:
    def __init__(self, control: CostControl, ttl_s: float = DEFAULT_TTL_S, new_id=None) -> None:
        self.control = control
        self.ttl_s = ttl_s
        self._new_id = new_id or (lambda: f"req-{uuid.uuid4().hex[:16]}")

    @property
    def store(self):
        return self.control.store

    def request(self, meter_ids: list[str], actor: str, role: str, reason: str, now: float,
                key: str | None = None) -> ApprovalRequest:
        """A disconnect asked for (one meter, or a plan of many). :class:`KeyError` names unknown meters.
        ``key``: the caller's idempotency key; the same request again under it is the request already made."""
        unknown = [m for m in meter_ids if m not in self.control.engine.meter_no]
        if unknown:
            raise KeyError(f"unknown meter(s): {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
        req = new_request(f"req-{key}" if key else self._new_id(), meter_ids, actor, role, reason, now, self.ttl_s)
        if key:
            old = self.store.approval_request(req.request_id)
            if old is not None:
                if (old.meter_ids, old.requested_by, old.reason) != (req.meter_ids, req.requested_by, req.reason):
                    raise KeyInUse(f"key {key!r} was already used for another request ({old.request_id})")
                return old
        with self.store.transaction():
            self.store.save_request(req)
            self.store.append_audit([AuditRecord(now, actor, role, f"{req.kind.value}_requested", req.request_id,
                                                 reason, {"meters": list(req.meter_ids),
                                                          "expires_at": req.expires_at})])
        return req

    def get(self, request_id: str, for_update: bool = False) -> ApprovalRequest:
        """``for_update``: its row locked until the transaction ends (another instance may decide it too)."""
        req = self.store.approval_request(request_id, for_update=for_update)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        return req

    def reject(self, request_id: str, actor: str, role: str, reason: str, now: float) -> ApprovalRequest:
        decide(self.get(request_id), False, actor, role, reason, now)  # refused before any transaction
        with self.store.transaction():
            # decided again on the row locked: another instance may have decided it meanwhile
            decided = decide(self.get(request_id, for_update=True), False, actor, role, reason, now)
            self.store.save_request(decided)
            self.store.append_audit([self._record(decided, now)])
        return decided

    def approve(self, request_id: str, actor: str, role: str, reason: str, now: float
                ) -> tuple[ApprovalRequest, dict[str, str]]:
        """Approved, and the trip commands made, in one transaction. Returns the request and, per meter the
        controller refused (authority), why. The same approver approving again gets the same answer and no
        second trip."""
        req = self.get(request_id)
        if req.state == RequestState.APPROVED and req.decided_by == actor:
            return req, {}
        decided = decide(req, True, actor, role, reason, now)
        refused: dict[str, str] = {}
        result: list[ApprovalRequest] = []

        def record(store, made: list) -> None:
            # the row locked and decided again, in the transaction with the commands: with several instances
            # on one database, a second approval of the same request (or a reject) waits here, then is refused
            decide(self.get(request_id, for_update=True), True, actor, role, reason, now)
            ids = tuple(c.command_id for c in made if isinstance(c, Command))
            refused.update({m: str(c) for m, c in zip(decided.meter_ids, made) if not isinstance(c, Command)})
            final = dataclasses.replace(decided, command_ids=ids)
            store.save_request(final)
            store.append_audit([self._record(final, now, commands=list(ids), refused=refused)])
            result.append(final)

        self.control.manual_many(list(decided.meter_ids), RelayAction.TRIP, f"{req.requested_by} (approved by "
                                 f"{actor})", role, req.reason, request_id, now, then=record)
        return result[0], refused

    @staticmethod
    def _record(req: ApprovalRequest, now: float, **detail) -> AuditRecord:
        return AuditRecord(now, req.decided_by, req.decided_role, f"{req.kind.value}_{req.state.value}",
                           req.request_id, req.decision_reason,
                           {"requested_by": req.requested_by, "meters": len(req.meter_ids), **detail})
