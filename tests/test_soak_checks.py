"""The soak's end checks (tests/soak/checks.py) on evidence written by hand: a story that keeps every rule
passes, and each way of breaking a rule fails its check with a message naming what was wrong."""
from dataclasses import replace
from datetime import datetime

import pytest

from gateway.core.commands import Command, RelayAction
from gateway.core.control import TripCase
from gateway.core.dispatch import OrderKind, OrderState, WorkOrder
from gateway.core.notices import Notice, NoticePurpose
from tests.soak.checks import METER_ZONE, Evidence, run_checks

T0 = 1_800_000_000
GW = "00000000"  # the operator code the gateway's frames carry


def local(t: float) -> str:
    """An instant as a meter logs it: the utility's local time, naive."""
    return datetime.fromtimestamp(t, METER_ZONE).replace(tzinfo=None).isoformat()


def sent_record(action: str, meter: str, at: float, command_id: str) -> dict:
    return {"at": at, "actor": "engine", "role": "engine", "action": f"relay_{action}_sent", "subject": meter,
            "detail": {"command_id": command_id, "attempt": 1}}


@pytest.fixture
def story() -> Evidence:
    """A1 (meter M1) runs out, is warned, reminded, tripped, pays up and is closed; A2 (M2) is protected."""
    clear = 5_000_000
    return Evidence(
        sent={"PAY-1": ("A1", 1000, T0), "CLEAR-A1": ("A1", clear, T0 + 100), "CLEAR-A2": ("A2", clear, T0 + 100)},
        cleared={"A1": T0 + 100, "A2": T0 + 100},
        confirmations=[("e1", "PAY-1", "A1", 1000), ("e2", "CLEAR-A1", "A1", clear), ("e2", "CLEAR-A2", "A2", clear)],
        ledger=[("PAY-1", "A1", "payment", 1000, T0), ("CLEAR-A1", "A1", "payment", clear, T0 + 101),
                ("CLEAR-A2", "A2", "payment", clear, T0 + 101)],
        commands=[Command("T1", "M1", "A1", RelayAction.TRIP, "engine", "engine", "arrears", "A1#3", T0 + 25, T0 + 900),
                  Command("K1", "M1", "A1", RelayAction.CLOSE, "engine", "engine", "paid", "A1#4", T0 + 101, T0 + 900)],
        cases={"A1#3": TripCase("A1#3", "A1", T0 + 5, -10, final_notice_id="N2")},
        notices=[Notice("N1", "A1", NoticePurpose.WARNING_1, T0 + 1, ("sms",), delivered_at=T0 + 10),
                 Notice("N2", "A1", NoticePurpose.FINAL_REMINDER, T0 + 15, ("sms",), delivered_at=T0 + 20)],
        orders=[],
        audit=[sent_record("trip", "M1", T0 + 30, "T1"), sent_record("close", "M1", T0 + 102, "K1")],
        records={"M1": {"relay_open": False, "relay_log": [[local(T0 + 30.2), "trip", GW],
                                                      [local(T0 + 102.3), "direct_close", GW]]},
                 "M2": {"relay_open": False, "relay_log": []}},
        faulty={}, account_of={"M1": "A1", "M2": "A2"}, classes={"A1": "residential", "A2": "protected"},
        decisions=[("A2", "account_manager_task")],
        policies={"notice_lead_s": 3.0, "notice_max_age_s": 3600.0, "final_reminder_s": 2.0,
                  "final_reminder_confirmed": True, "reconnect_deadline_s": 180.0},
        ended_at=T0 + 200)


def failures(ev: Evidence) -> dict[str, list[str]]:
    return {r.name: r.failures for r in run_checks(ev) if not r.passed}


def only_failure(ev: Evidence, check: str) -> str:
    found = failures(ev)
    assert list(found) == [check], found
    return "\n".join(found[check])


def test_a_story_that_keeps_every_rule_passes_every_check(story):
    assert failures(story) == {}
    assert {r.name: r.checked for r in run_checks(story)} == {
        "payments_exactly_once": 3, "trips_gated": 1, "protected_never_tripped": 1, "paid_reconnected": 2,
        "no_action_twice": 2}
    assert story.counts()["protected_ran_out"] == 1


def test_a_payment_missing_from_the_ledger_is_lost(story):
    ev = replace(story, ledger=story.ledger[1:])
    assert "payment PAY-1 (A1, 1000 fen): not in the ledger (lost)" in only_failure(ev, "payments_exactly_once")


def test_a_payment_with_another_amount_or_confirmed_twice_fails(story):
    wrong = replace(story, ledger=[("PAY-1", "A1", "payment", 100, T0), *story.ledger[1:]])
    assert "ledger has ('A1', 'payment', 100)" in only_failure(wrong, "payments_exactly_once")
    twice = replace(story, confirmations=[*story.confirmations, ("e9", "PAY-1", "A1", 1000)])
    assert "confirmed by 2 different events" in only_failure(twice, "payments_exactly_once")
    stranger = replace(story, ledger=[*story.ledger, ("X-1", "A1", "payment", 5, T0)])
    assert "X-1" in only_failure(stranger, "payments_exactly_once")


def test_a_trip_resent_without_reading_back_is_applied_twice(story):
    log = story.records["M1"]["relay_log"]
    ev = replace(story, records={**story.records, "M1": {"relay_open": False,
                                                         "relay_log": [log[0], [local(T0 + 31), "trip", GW], log[1]]}},
                 audit=[*story.audit, sent_record("trip", "M1", T0 + 30.9, "T1")])
    assert "trip at" in (msg := only_failure(ev, "no_action_twice")) and "applied twice" in msg


def test_a_stuck_relay_may_be_retried_but_each_frame_needs_its_own_sent_record(story):
    log = story.records["M1"]["relay_log"]
    retried = {**story.records, "M1": {"relay_open": False,
                                       "relay_log": [log[0], [local(T0 + 33), "trip", GW], log[1]]}}
    stuck = replace(story, faulty={"M1": "stuck_relay"}, records=retried,
                    audit=[*story.audit, sent_record("trip", "M1", T0 + 32.5, "T1")])
    assert failures(stuck) == {}
    unrecorded = replace(stuck, audit=story.audit)
    assert "no relay_trip_sent record of the gateway before it" in only_failure(unrecorded, "trips_gated")


def test_a_trip_without_a_notice_confirmed_in_time_fails(story):
    late = replace(story, notices=[replace(story.notices[0], delivered_at=T0 + 29), story.notices[1]])
    assert "no disconnect notice confirmed 3 s before it" in only_failure(late, "trips_gated")
    no_reminder = replace(story, notices=story.notices[:1])
    assert "final reminder N2 was not confirmed" in only_failure(no_reminder, "trips_gated")


def test_a_trip_sent_after_a_clearing_payment_was_committed_fails(story):
    ev = replace(story, audit=[sent_record("trip", "M1", T0 + 110, "T1"), story.audit[1]],
                 records={**story.records, "M1": {"relay_open": False, "relay_log": [
                     [local(T0 + 102.3), "direct_close", GW], [local(T0 + 110.2), "trip", GW]]}})
    found = failures(ev)
    assert "clearing payment was committed" in "\n".join(found["trips_gated"])


def test_a_protected_meter_that_applied_a_trip_fails(story):
    ev = replace(story, records={**story.records,
                                 "M2": {"relay_open": True, "relay_log": [[local(T0 + 40), "trip", GW]]}})
    assert "meter M2 of protected account A2" in "\n".join(failures(ev)["protected_never_tripped"])


def test_a_paid_up_meter_left_open_needs_a_reconnect_order_whose_deadline_holds(story):
    opened = replace(story, classes={**story.classes, "A2": "residential"},  # a crew opened it (a disconnect order)
                     records={**story.records, "M2": {"relay_open": True, "relay_log": [
                         [local(T0 + 1), "trip", "field-crew"]]}})
    assert "meter M2's relay is open and it has no reconnect work order" in only_failure(opened, "paid_reconnected")
    order = WorkOrder("O1", OrderKind.RECONNECT, "K2", "M2", "A2", "protected", "2 Soak Road", None, None, "no answer",
                      created_at=T0 + 130, deadline_at=T0 + 280)
    assert failures(replace(opened, orders=[order])) == {}  # open, not due yet when the soak ended
    overdue = replace(opened, orders=[order], ended_at=T0 + 300)
    assert "past its deadline" in only_failure(overdue, "paid_reconnected")
    late_deadline = replace(opened, orders=[replace(order, deadline_at=T0 + 400)])
    assert "later than payment + 180 s" in only_failure(late_deadline, "paid_reconnected")
    completed_late = replace(opened, orders=[replace(order, state=OrderState.COMPLETED, closed_at=T0 + 290)])
    assert "after its deadline" in only_failure(completed_late, "paid_reconnected")


def test_a_remote_retry_that_races_a_crew_is_allowed_until_the_crew_is_reported(story):
    """M1's close went unanswered, a crew closed it by hand; the gateway's remote retry finds it closed."""
    log = story.records["M1"]["relay_log"]
    raced = {**story.records, "M1": {"relay_open": False, "relay_log": [
        log[0], [local(T0 + 100), "close", "field-crew"], [local(T0 + 102.3), "direct_close", GW]]}}
    order = WorkOrder("O1", OrderKind.RECONNECT, "K1", "M1", "A1", "residential", "1 Soak Road", None, None,
                      "no answer", created_at=T0 + 90, deadline_at=T0 + 280, state=OrderState.COMPLETED,
                      closed_at=T0 + 105)
    ev = replace(story, records=raced, orders=[order])
    assert failures(ev) == {}
    assert next(r for r in run_checks(ev) if r.name == "no_action_twice").raced_crew == 1
    reported = replace(ev, orders=[replace(order, closed_at=T0 + 101)])
    assert "after the gateway had recorded the order completed" in only_failure(reported, "no_action_twice")
