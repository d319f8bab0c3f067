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


def receipt(outcome: str, at: float, notice_id: str, purpose: str, account: str = "A1") -> tuple:
    """What the notification simulator recorded answering a notice request."""
    return (outcome, at, notice_id, purpose, account)


@pytest.fixture
def story() -> Evidence:
    """A1 (meter M1) runs out, is warned, reminded, tripped, pays up and is closed; A2 (M2) is protected."""
    clear = 5_000_000
    return Evidence(
        sent={"PAY-1": ("A1", 1000, T0), "CLEAR-A1": ("A1", clear, T0 + 100), "CLEAR-A2": ("A2", clear, T0 + 100)},
        confirmations=[("e1", "PAY-1", "A1", 1000), ("e2", "CLEAR-A1", "A1", clear), ("e2", "CLEAR-A2", "A2", clear)],
        ledger=[("PAY-1", "A1", "payment", 1000, T0), ("C-1", "A1", "charge", -1100, T0 + 20),
                ("CLEAR-A1", "A1", "payment", clear, T0 + 101), ("CLEAR-A2", "A2", "payment", clear, T0 + 101)],
        charges=[],
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
        protected={"A2"},
        receipts={"N1/1": receipt("delivered", T0 + 10, "N1", "warning_1"),
                  "N2/1": receipt("failed", T0 + 16, "N2", "final_reminder"),
                  "N2/2": receipt("delivered", T0 + 20, "N2", "final_reminder")},
        decisions=[("A2", "account_manager_task")],
        policies={"notice_lead_s": 3.0, "notice_max_age_s": 3600.0, "final_reminder_s": 2.0,
                  "final_reminder_confirmed": True, "reconnect_deadline_s": 45.0, "trip_level_fen": 0,
                  "close_margin_fen": 20},
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
        "payments_exactly_once": 3, "trips_gated": 1, "protected_never_tripped": 1, "paid_reconnected": 1,
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


def test_a_trip_without_a_notice_the_sim_delivered_in_time_fails(story):
    late = replace(story, receipts={**story.receipts, "N1/1": receipt("delivered", T0 + 29, "N1", "warning_1")})
    assert "delivered no disconnect notice of A1 3 s before" in only_failure(late, "trips_gated")
    no_reminder = replace(story, receipts={k: v for k, v in story.receipts.items() if k != "N2/2"})
    assert "final reminder N2 was not delivered" in only_failure(no_reminder, "trips_gated")


def test_the_gateways_own_delivered_at_is_not_evidence_of_a_delivery(story):
    """Finding 2: the store says N1 was delivered; the notification system never answered "delivered"."""
    ev = replace(story, receipts={**story.receipts, "N1/1": receipt("failed", T0 + 10, "N1", "warning_1")})
    assert ev.notices[0].delivered_at == T0 + 10
    assert "delivered no disconnect notice of A1" in only_failure(ev, "trips_gated")
    # the lead is measured to the frame the meter applied, by the meter's clock
    frame_late = replace(story, receipts={**story.receipts, "N1/1": receipt("delivered", T0 + 27.5, "N1", "warning_1")})
    assert failures(frame_late) == {}  # 27.5 + 3 <= 30.2 (+ slack)
    another_account = replace(story, receipts={**story.receipts, "N1/1": receipt("delivered", T0 + 10, "N1",
                                                                              "warning_1", "A2")})
    assert "delivered no disconnect notice of A1" in only_failure(another_account, "trips_gated")


def test_a_trip_sent_after_a_payment_that_cleared_the_arrears_was_committed_fails(story):
    """Finding 4: any payment counts (not only CLEAR- ones): the balance from the ledger committed before it."""
    paid = replace(story, ledger=[*story.ledger, ("PAY-2", "A1", "payment", 300, T0 + 25)],
                   sent={**story.sent, "PAY-2": ("A1", 300, T0 + 25)},
                   confirmations=[*story.confirmations, ("e3", "PAY-2", "A1", 300)])
    assert "the balance checked at the send missed a payment" in only_failure(paid, "trips_gated")
    too_little = replace(paid, ledger=[*story.ledger, ("PAY-2", "A1", "payment", 50, T0 + 25)],
                         sent={**story.sent, "PAY-2": ("A1", 50, T0 + 25)},
                         confirmations=[*story.confirmations, ("e3", "PAY-2", "A1", 50)])
    assert failures(too_little) == {}  # -100 + 50: still in arrears
    # the charges of readings (not ledger rows) count the same
    from_readings = replace(paid, ledger=[r for r in paid.ledger if r[0] != "C-1"],
                            charges=[("A1", T0 + 20, 1100_000_000)])
    assert "the balance checked at the send missed a payment" in only_failure(from_readings, "trips_gated")
    assert failures(replace(from_readings, charges=[("A1", T0 + 20, 1500_000_000)])) == {}
    same_second = replace(paid, ledger=[*story.ledger, ("PAY-2", "A1", "payment", 300, T0 + 30)])
    assert "trips_gated" not in failures(same_second)  # committed in the send's second: may have come after it


def test_a_trip_that_is_not_the_engines_fails(story):
    """Finding 4: the soak has no operators; an operator's trip is not skipped."""
    ev = replace(story, commands=[replace(story.commands[0], actor="op-1", role="operator"), story.commands[1]])
    assert "by op-1" in only_failure(ev, "trips_gated")


def test_a_crew_trip_needs_a_disconnect_order_and_arrears(story):
    """Finding 4: a crew's hand is gated through its disconnect order, before any payment clearing the arrears."""
    log = story.records["M1"]["relay_log"]
    crew = [[local(T0 + 60), "trip", "field-crew"], [local(T0 + 102.3), "close", "field-crew"]]
    records = {**story.records, "M1": {"relay_open": False, "relay_log": [log[0], [local(T0 + 50), "direct_close", GW],
                                                                          *crew]}}
    audit = [*story.audit, sent_record("close", "M1", T0 + 49, "K0")]
    order = WorkOrder("O1", OrderKind.DISCONNECT, "T1", "M1", "A1", "residential", "1 Soak Road", None, None,
                      "stuck", created_at=T0 + 40, deadline_at=T0 + 340, state=OrderState.COMPLETED, closed_at=T0 + 61)
    no_order = replace(story, records=records, audit=audit)
    assert "a crew tripped it at" in (msg := "\n".join(failures(no_order)["trips_gated"])) \
        and "with no disconnect work order" in msg
    ordered = replace(no_order, orders=[order])
    assert "trips_gated" not in failures(ordered)
    paid_first = replace(ordered, ledger=[*story.ledger, ("PAY-2", "A1", "payment", 500, T0 + 55)],
                         sent={**story.sent, "PAY-2": ("A1", 500, T0 + 55)},
                         confirmations=[*story.confirmations, ("e3", "PAY-2", "A1", 500)])
    assert "after payments leaving at least 400 fen were committed" in "\n".join(failures(paid_first)["trips_gated"])


def test_a_protected_meter_that_applied_a_trip_fails(story):
    ev = replace(story, records={**story.records,
                                 "M2": {"relay_open": True, "relay_log": [[local(T0 + 40), "trip", GW]]}})
    assert "meter M2 of protected account A2" in "\n".join(failures(ev)["protected_never_tripped"])


def test_protection_is_judged_by_the_harnesss_set_not_the_stores_class(story):
    """Finding 3: the store lost A2's class (residential): its trip still fails, and so does the disagreement."""
    ev = replace(story, classes={**story.classes, "A2": "residential"},
                 records={**story.records, "M2": {"relay_open": True, "relay_log": [[local(T0 + 40), "trip", GW]]}},
                 commands=[*story.commands, Command("T2", "M2", "A2", RelayAction.TRIP, "engine", "engine", "arrears",
                                                    "A2#1", T0 + 35, T0 + 900)],
                 audit=[*story.audit, sent_record("trip", "M2", T0 + 39.5, "T2")])
    msg = "\n".join(failures(ev)["protected_never_tripped"])
    assert "meter M2 of protected account A2" in msg and "the store has class residential" in msg
    assert "A2 is protected" in "\n".join(failures(ev)["trips_gated"])
    assert replace(story, classes={**story.classes, "A2": "residential"}).counts()["protected_ran_out"] == 1


def test_a_paid_up_meter_must_close_within_the_deadline_of_the_payment(story):
    """Finding 1: from the meter's log: closed at the end is not enough; it must close in time."""
    log = story.records["M1"]["relay_log"]
    late = replace(story, records={**story.records, "M1": {"relay_open": False, "relay_log": [
        log[0], [local(T0 + 160), "direct_close", GW]]}},
        audit=[story.audit[0], sent_record("close", "M1", T0 + 159, "K1")])
    assert "closed only at" in only_failure(late, "paid_reconnected")
    by_crew_in_time = replace(late, records={**story.records, "M1": {"relay_open": False, "relay_log": [
        log[0], [local(T0 + 140), "close", "field-crew"]]}}, audit=story.audit[:1])
    assert failures(by_crew_in_time) == {}
    open_not_due = replace(story, records={**story.records, "M1": {"relay_open": True, "relay_log": log[:1]}},
                           audit=story.audit[:1], ended_at=T0 + 140)
    assert failures(open_not_due) == {}
    overdue = replace(open_not_due, ended_at=T0 + 200)
    assert "still open when the soak ended" in only_failure(overdue, "paid_reconnected")
    order = WorkOrder("O1", OrderKind.RECONNECT, "K1", "M1", "A1", "residential", "1 Soak Road", None, None,
                      "no answer", created_at=T0 + 101, deadline_at=T0 + 200)
    late_deadline = replace(story, orders=[order])
    assert "with a deadline later than the payment + 45 s" in only_failure(late_deadline, "paid_reconnected")


def test_any_payment_that_clears_the_arrears_owes_a_close_and_a_stuck_relay_has_not_closed(story):
    """Finding 1: a PAY- payment clearing the arrears counts, not only CLEAR- ones; a stuck relay's close frame
    did not close it (a crew must, in time)."""
    log = story.records["M1"]["relay_log"]
    rows = [story.ledger[0], story.ledger[1], ("PAY-2", "A1", "payment", 500, T0 + 40), story.ledger[3]]
    small = replace(story, ledger=rows,
                    sent={"PAY-1": story.sent["PAY-1"], "PAY-2": ("A1", 500, T0 + 40),
                          "CLEAR-A2": story.sent["CLEAR-A2"]},
                    confirmations=[story.confirmations[0], ("e3", "PAY-2", "A1", 500), story.confirmations[2]])
    assert "closed only at 1800000102.3, after its deadline 1800000085" in only_failure(small, "paid_reconnected")
    # a stuck relay's frames do not move it: its trip opened nothing, so no close is owed (until a crew opens it)
    stuck = replace(small, faulty={"M1": "stuck_relay"})
    assert "paid_reconnected" not in failures(stuck)
    crew_opened = replace(stuck, records={**story.records, "M1": {"relay_open": False, "relay_log": [
        log[0], [local(T0 + 35), "trip", "field-crew"], log[1]]}},
        orders=[WorkOrder("O0", OrderKind.DISCONNECT, "T1", "M1", "A1", "residential", "1 Soak Road", None, None,
                          "stuck", created_at=T0 + 32, deadline_at=T0 + 400, state=OrderState.COMPLETED,
                          closed_at=T0 + 36)])
    assert "closed only at 1800000102.3" in only_failure(crew_opened, "paid_reconnected")


def test_a_remote_retry_that_races_a_crew_is_allowed_briefly_until_the_crew_is_reported(story):
    """M1's close went unanswered, a crew closed it by hand; the gateway's remote retry finds it closed."""
    log = story.records["M1"]["relay_log"]
    raced = {**story.records, "M1": {"relay_open": False, "relay_log": [
        log[0], [local(T0 + 100), "close", "field-crew"], [local(T0 + 102.3), "direct_close", GW]]}}
    order = WorkOrder("O1", OrderKind.RECONNECT, "K1", "M1", "A1", "residential", "1 Soak Road", None, None,
                      "no answer", created_at=T0 + 90, deadline_at=T0 + 145, state=OrderState.COMPLETED,
                      closed_at=T0 + 105)
    ev = replace(story, records=raced, orders=[order])
    assert failures(ev) == {}
    assert next(r for r in run_checks(ev) if r.name == "no_action_twice").raced_crew == 1
    reported = replace(ev, orders=[replace(order, closed_at=T0 + 101)])
    assert "after the gateway had recorded order O1 completed" in only_failure(reported, "no_action_twice")


def test_a_race_with_a_crew_is_bounded_in_time_and_tied_to_that_crews_order(story):
    """Finding 5: a frame long after the crew (its order never reported) fails; a race on a second crew visit
    is judged by that visit's order, not an earlier completed one."""
    log = story.records["M1"]["relay_log"]
    slow = {**story.records, "M1": {"relay_open": False, "relay_log": [
        log[0], [local(T0 + 60), "close", "field-crew"], [local(T0 + 100), "direct_close", GW]]}}
    never_reported = WorkOrder("O1", OrderKind.RECONNECT, "K1", "M1", "A1", "residential", "1 Soak Road", None, None,
                               "no answer", created_at=T0 + 50, deadline_at=T0 + 145, state=OrderState.COMPLETED,
                               closed_at=T0 + 200)
    ev = replace(story, records=slow, orders=[never_reported],
                 audit=[story.audit[0], sent_record("close", "M1", T0 + 99, "K1")])
    assert "more than 30 s after the crew, still racing it" in only_failure(ev, "no_action_twice")
    # a first visit (disconnect, completed at T0 + 41), then a second (reconnect) raced by a remote close
    first = WorkOrder("O0", OrderKind.DISCONNECT, "T1", "M1", "A1", "residential", "1 Soak Road", None, None,
                      "stuck", created_at=T0 + 35, deadline_at=T0 + 400, state=OrderState.COMPLETED, closed_at=T0 + 41)
    second = replace(never_reported, order_id="O2", created_at=T0 + 90, closed_at=T0 + 105)
    two_visits = {**story.records, "M1": {"relay_open": False, "relay_log": [
        [local(T0 + 40), "trip", "field-crew"], [local(T0 + 100), "close", "field-crew"],
        [local(T0 + 102.3), "direct_close", GW]]}}
    ev = replace(story, records=two_visits, orders=[first, second], audit=story.audit[1:])
    assert failures(ev) == {}
    assert next(r for r in run_checks(ev) if r.name == "no_action_twice").raced_crew == 1
