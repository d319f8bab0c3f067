"""The two-person rule, pure: who may request, who may decide, expiry."""
import pytest

from gateway.core.approvals import (
    ApprovalError,
    NotPending,
    NotPermitted,
    RequestKind,
    RequestState,
    decide,
    new_request,
)

T0 = 1_790_000_000.0


def req(meters=("M1",), actor="olga", role="operator", ttl_s=3600):
    return new_request("r1", list(meters), actor, role, "tampering", T0, ttl_s)


def test_a_request_for_one_meter_or_a_plan():
    one = req()
    assert (one.kind, one.meter_ids, one.state, one.expires_at) == (RequestKind.DISCONNECT, ("M1",),
                                                                     RequestState.PENDING, T0 + 3600)
    plan = req(["M1", "M2", "M1"])
    assert plan.kind == RequestKind.DISCONNECT_PLAN and plan.meter_ids == ("M1", "M2")


@pytest.mark.parametrize("kw,error,words", [
    (dict(role="viewer"), NotPermitted, "may not request"),
    (dict(actor=" "), NotPermitted, "identity"),
    (dict(meters=()), ApprovalError, "at least one meter"),
    (dict(ttl_s=0), ApprovalError, "positive"),
])
def test_what_a_request_needs(kw, error, words):
    with pytest.raises(error, match=words):
        req(**kw)
    with pytest.raises(ApprovalError, match="reason"):
        new_request("r1", ["M1"], "olga", "operator", "  ", T0)


def test_a_second_person_with_the_authority_decides_before_expiry():
    r = req()
    with pytest.raises(NotPermitted, match="role 'operator'"):
        decide(r, True, "oscar", "operator", "ok", T0 + 1)
    with pytest.raises(NotPermitted, match="second person"):
        decide(req(actor="sam", role="supervisor"), True, "sam", "supervisor", "mine", T0 + 1)
    with pytest.raises(NotPermitted, match="second person"):  # names differing only in case: one person
        decide(req(actor="Sam", role="supervisor"), True, "sAM", "supervisor", "mine", T0 + 1)
    with pytest.raises(ApprovalError, match="reason"):
        decide(r, True, "sue", "supervisor", "", T0 + 1)
    done = decide(r, True, "sue", "supervisor", "photos seen", T0 + 1)
    assert (done.state, done.decided_by, done.decided_role, done.decided_at) == (RequestState.APPROVED, "sue",
                                                                                 "supervisor", T0 + 1)
    assert r.state == RequestState.PENDING  # a new value: the stored one changes only when it is committed
    with pytest.raises(NotPending, match="approved by sue"):
        decide(done, False, "ada", "admin", "no", T0 + 2)
    assert decide(r, False, "ada", "admin", "not needed", T0 + 2).state == RequestState.REJECTED


def test_a_request_not_decided_in_time_expires():
    r = req(ttl_s=60)
    assert r.state_at(T0 + 59) == RequestState.PENDING and r.state_at(T0 + 60) == RequestState.EXPIRED
    with pytest.raises(NotPending, match="expired"):
        decide(r, True, "sue", "supervisor", "late", T0 + 60)
