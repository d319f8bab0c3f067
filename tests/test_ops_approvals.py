"""The approvals shell on both stores: an approval and the trip commands it makes commit together or not at all,
a restart does not trip twice, and requests survive a restart."""
import pytest

from gateway.core.approvals import RequestState
from gateway.core.commands import RelayAction
from gateway.costcontrol import CostControl
from gateway.ops.approvals import Approvals
from gateway.ops.audit import verify_chain
from gateway.store import open_store

from .control_fixtures import MONDAY, Ids
from .core_fixtures import POLICY
from .test_costcontrol import setup as cost_control


def trips(cc) -> list[str]:
    return sorted(c.command_id for m in ("M0", "M1", "M2") for c in cc.store.meter_commands(m)
                  if c.action == RelayAction.TRIP)


def test_an_approval_that_fails_to_commit_leaves_no_trip_and_the_request_pending(store_url, monkeypatch):
    cc = cost_control(store_url)
    approvals = Approvals(cc)
    req = approvals.request(["M0", "M1"], "olga", "operator", "feeder works", MONDAY)
    real = cc.store.append_audit

    def failing(records):
        if any(r.action == "disconnect_plan_approved" for r in records):
            raise RuntimeError("disk full")
        real(records)

    monkeypatch.setattr(cc.store, "append_audit", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        approvals.approve(req.request_id, "sue", "supervisor", "ok", MONDAY + 60)
    monkeypatch.setattr(cc.store, "append_audit", real)
    assert trips(cc) == [] and not cc.controller.commands  # the memory rebuilt from the store too
    assert approvals.get(req.request_id).state == RequestState.PENDING
    done, refused = approvals.approve(req.request_id, "sue", "supervisor", "ok", MONDAY + 120)
    assert done.state == RequestState.APPROVED and refused == {}
    assert trips(cc) == [f"manual:{req.request_id}:M0", f"manual:{req.request_id}:M1"] == sorted(done.command_ids)
    assert verify_chain(cc.store).ok


def test_after_a_restart_the_request_is_there_and_its_approval_trips_once(store_url):
    cc = cost_control(store_url)
    req = Approvals(cc).request(["M2"], "olga", "operator", "tampering", MONDAY)
    Approvals(cc).approve(req.request_id, "sue", "supervisor", "seen", MONDAY + 60)
    cc.store.close()
    again = CostControl(open_store(store_url), policy=POLICY, now=MONDAY + 120, new_id=Ids())
    approvals = Approvals(again)
    back = approvals.get(req.request_id)
    assert (back.state, back.decided_by, back.meter_ids) == (RequestState.APPROVED, "sue", ("M2",))
    assert approvals.approve(req.request_id, "sue", "supervisor", "seen", MONDAY + 180)[0] == back
    # even through the shell directly, the request's key makes the same command
    made = again.manual_many(["M2"], RelayAction.TRIP, "x", "supervisor", "again", req.request_id, MONDAY + 200)
    assert [c.command_id for c in made] == list(back.command_ids) and trips(again) == list(back.command_ids)
    assert [r.request_id for r in again.store.approval_requests("approved", MONDAY + 200)] == [req.request_id]
    assert again.store.approval_requests("pending", MONDAY + 200) == []


def test_a_close_made_earlier_under_the_request_id_does_not_pass_for_the_approved_trip(store_url):
    """The review's case: an operator's close keyed ``req-K``, then request K approved. The approval must not
    report the close as its trip: the meter is refused (with the reason), and no trip is claimed."""
    cc = cost_control(store_url)
    close = cc.manual("M0", RelayAction.CLOSE, "oscar", "operator", "paid at the counter", "req-K", MONDAY)
    approvals = Approvals(cc)
    req = approvals.request(["M0"], "olga", "operator", "tampering", MONDAY + 10, key="K")
    assert req.request_id == "req-K"
    done, refused = approvals.approve(req.request_id, "sue", "supervisor", "seen", MONDAY + 60)
    assert "already names close command" in refused["M0"] and close.command_id not in done.command_ids
    assert trips(cc) == [] and cc.store.command(close.command_id).action == RelayAction.CLOSE
