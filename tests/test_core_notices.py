"""Notices: channels in order, only a confirmed delivery counts, escalation, permitted hours, re-deliveries."""
import pytest

from gateway.core.notices import (
    Notice,
    NoticePolicy,
    NoticePurpose,
    NoticeState,
    Notifier,
    ReceiptOutcome,
    split_request_id,
)
from gateway.core.policy import WorkCalendar

from .control_fixtures import at

CONTACTS = {"sms": "13800000001", "voice": "13800000001", "app": "app-1"}
N = Notifier(NoticePolicy(), WorkCalendar())


def notice(purpose=NoticePurpose.DISCONNECT, t=at(2026, 3, 2, 10), channels=("sms", "voice", "app")):
    return Notice("A1#7", "A1", purpose, t, NoticePolicy().channels_for(purpose, channels))


def test_disconnect_notices_end_with_paper_warnings_do_not():
    p = NoticePolicy()
    assert p.channels_for(NoticePurpose.DISCONNECT, ("sms", "app")) == ("sms", "app", "paper")
    assert p.channels_for(NoticePurpose.WARNING_1, ("sms", "app")) == ("sms", "app")
    assert p.channels_for(NoticePurpose.FINAL_REMINDER, ("email", "voice", "sms")) == ("voice", "sms")


def test_failed_empty_and_silent_channels_escalate_in_order():
    n = notice()
    t = n.created_at
    step = N.advance(n, t, CONTACTS, "1 Main St")
    assert [(r.channel, r.address) for r in step.requests] == [("sms", "13800000001")]
    assert n.state == NoticeState.REQUESTED and n.due_at == t + 3600
    # SMS: wrong number
    step = N.receipt(n, "A1#7/1", ReceiptOutcome.FAILED, t + 30, t + 30, "wrong number", CONTACTS, "1 Main St")
    assert [r.channel for r in step.requests] == ["voice"]
    assert n.attempts[0].outcome == ReceiptOutcome.FAILED and n.attempts[0].detail == "wrong number"
    # voice: an empty receipt is not a delivery
    step = N.receipt(n, "A1#7/2", ReceiptOutcome.EMPTY, t + 90, t + 90, "", CONTACTS, "1 Main St")
    assert [r.channel for r in step.requests] == ["app"]
    # app: nothing within its timeout (2 h)
    assert N.advance(n, t + 90 + 7199, CONTACTS, "1 Main St").requests == []
    step = N.advance(n, t + 90 + 7200, CONTACTS, "1 Main St")
    assert [(r.channel, r.address) for r in step.requests] == [("paper", "1 Main St")]
    assert n.attempts[2].outcome == ReceiptOutcome.TIMEOUT
    assert n.delivered_at is None
    # paper, delivered by field staff the next morning
    N.receipt(n, "A1#7/4", ReceiptOutcome.DELIVERED, t + 86400, t + 86400, "", CONTACTS, "1 Main St")
    assert n.state == NoticeState.DELIVERED and n.delivered_at == t + 86400 and n.delivered_channel == "paper"


def test_no_sms_at_three_in_the_morning():
    n = notice(t=at(2026, 3, 3, 3))
    assert N.advance(n, n.created_at, CONTACTS, "").requests == []
    assert n.state == NoticeState.WAITING and n.due_at == at(2026, 3, 3, 8)
    step = N.advance(n, at(2026, 3, 3, 8), CONTACTS, "")
    assert [r.channel for r in step.requests] == ["sms"]
    # an SMS failing at 20:59 escalates to voice, whose hours (09:00-20:00) are over: it waits for the morning
    n = notice(t=at(2026, 3, 3, 20, 58))
    N.advance(n, n.created_at, CONTACTS, "")
    N.receipt(n, "A1#7/1", ReceiptOutcome.FAILED, at(2026, 3, 3, 20, 59), at(2026, 3, 3, 20, 59), "", CONTACTS, "")
    assert n.state == NoticeState.WAITING and n.due_at == at(2026, 3, 4, 9)


def test_a_channel_without_an_address_is_skipped_with_the_reason():
    n = notice(channels=("sms", "voice"))
    step = N.advance(n, n.created_at, {"voice": "0571-555"}, "1 Main St")
    assert [r.channel for r in step.requests] == ["voice"]
    assert n.attempts[0].outcome == ReceiptOutcome.SKIPPED and "no sms address" in n.attempts[0].detail
    n = Notice("A2#1", "A2", NoticePurpose.WARNING_1, at(2026, 3, 2, 10), ())
    N.advance(n, n.created_at, {}, "")
    assert n.state == NoticeState.EXHAUSTED and n.closed_reason == "the account has no channel"


def test_late_delivery_counts_and_re_delivered_receipts_change_nothing():
    n = notice()
    t = n.created_at
    N.advance(n, t, CONTACTS, "")
    N.advance(n, t + 3600, CONTACTS, "")  # SMS timed out: voice requested
    assert [a.channel for a in n.attempts] == ["sms", "voice"]
    # the SMS receipt comes late: the customer did get it
    step = N.receipt(n, "A1#7/1", ReceiptOutcome.DELIVERED, t + 3000, t + 4000, "", CONTACTS, "")
    assert n.state == NoticeState.DELIVERED and n.delivered_at == t + 3000 and n.delivered_channel == "sms"
    # the notice is delivered; the SMS attempt keeps the end it had (counted once, as a timeout)
    assert [(kind, data["late"]) for kind, _, data in step.transitions] == [("notice_delivered", True)]
    assert n.attempts[0].outcome == ReceiptOutcome.TIMEOUT
    before = (n.state, n.delivered_at, [a.outcome for a in n.attempts])
    for outcome in (ReceiptOutcome.DELIVERED, ReceiptOutcome.FAILED):
        N.receipt(n, "A1#7/1", outcome, t + 5000, t + 5000, "", CONTACTS, "")
    assert (n.state, n.delivered_at) == before[:2]


def test_a_delivery_time_upstream_cannot_be_before_the_request_or_in_the_future():
    n = notice()
    t = n.created_at
    N.advance(n, t, CONTACTS, "")
    N.receipt(n, "A1#7/1", ReceiptOutcome.DELIVERED, t - 10 * 86400, t + 60, "", CONTACTS, "")
    assert n.delivered_at == t  # not ten days ago: the lead time cannot be cheated
    n = notice()
    N.advance(n, t, CONTACTS, "")
    N.receipt(n, "A1#7/1", ReceiptOutcome.DELIVERED, t + 86400, t + 60, "", CONTACTS, "")
    assert n.delivered_at == t + 60


def test_bad_receipts_are_refused_with_the_reason():
    n = notice()
    N.advance(n, n.created_at, CONTACTS, "")
    with pytest.raises(KeyError, match="no request 'A1#7/9'"):
        N.receipt(n, "A1#7/9", ReceiptOutcome.DELIVERED, 0, n.created_at, "", CONTACTS, "")
    with pytest.raises(ValueError, match="receipt outcome 'timeout'; allowed: delivered, failed, empty"):
        N.receipt(n, "A1#7/1", ReceiptOutcome.TIMEOUT, 0, n.created_at, "", CONTACTS, "")
    assert split_request_id("A/B#1/disconnect/2/3") == "A/B#1/disconnect/2"
    with pytest.raises(ValueError, match="not a notice request id"):
        split_request_id("nonsense")


def test_the_first_confirmed_delivery_counts_a_later_one_on_another_channel_does_not_move_it():
    n = notice()
    t = n.created_at
    N.advance(n, t, CONTACTS, "")
    N.advance(n, t + 3600, CONTACTS, "")  # SMS silent: voice requested
    N.receipt(n, "A1#7/1", ReceiptOutcome.DELIVERED, t + 100, t + 3700, "", CONTACTS, "")  # the SMS, late
    N.receipt(n, "A1#7/2", ReceiptOutcome.DELIVERED, t + 3800, t + 3800, "", CONTACTS, "")  # and the call
    assert (n.delivered_at, n.delivered_channel) == (t + 100, "sms")
    assert n.attempts[1].outcome == ReceiptOutcome.DELIVERED
