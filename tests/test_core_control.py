"""The relay controller over simulated days: notices, gates, commands, retries, field orders, authority.

Pure tests: a virtual clock, an upstream that answers notice requests, fake relays. Days run in milliseconds.
"""
import dataclasses

import pytest

from gateway.core.commands import CommandState, ReconnectMode, RelayAction, RelayStatus
from gateway.core.control import AuthorityError, CaseState, ControlConfig, SendResult
from gateway.core.dispatch import DispatchPolicy, FieldStatus, FieldUpdate, OrderState
from gateway.core.engine import DecisionKind as K
from gateway.core.model import CostControlMode, CustomerClass
from gateway.core.notices import ReceiptOutcome
from gateway.core.policy import AreaFlag, Forecast, Gate, TripPolicy, TripWindowPolicy

from .control_fixtures import MONDAY, FakeRelay, Sim, account, at, controller, decision, utility

DAY = 86400


def trip_actions(sim, meter="M0"):
    return [t for t, a in sim.relay(meter).actions if a == "trip"]


def assert_trip_was_legitimate(sim, c, meter="M0", account_id="A0"):
    """Invariant 2 for every trip the meter saw: a notice confirmed at least the lead time before, a final
    reminder confirmed at least its lead before, inside the permitted window."""
    t = c.cfg.trips
    for cut in trip_actions(sim, meter):
        delivered = [n for n in sim.notices.values() if n.account_id == account_id and n.delivered_at is not None
                     and n.purpose.value in ("warning_1", "warning_2", "disconnect")]
        assert any(n.delivered_at + t.notice_lead_s <= cut <= n.delivered_at + t.notice_max_age_s
                   for n in delivered), "trip without a confirmed notice at least the lead time old"
        reminders = [n for n in sim.notices.values() if n.account_id == account_id and n.delivered_at is not None
                     and n.purpose.value == "final_reminder"]
        assert any(r.delivered_at + t.final_reminder_s <= cut <= r.delivered_at + t.final_reminder_max_age_s
                   for r in reminders), "trip without a confirmed final reminder"
        assert c.gates.time_block("north", cut) is None, "trip in a forbidden window"


# --------------------------------------------------------------------------- notices and the notice gate


def test_customer_runs_to_zero_sms_fails_voice_confirms_then_trip_after_lead_time_and_final_reminder():
    c = controller()
    sim = Sim(c, MONDAY, deliver=lambda r: (ReceiptOutcome.FAILED, 30) if r["channel"] == "sms"
              else (ReceiptOutcome.DELIVERED, 120))
    c.on_decisions([decision(K.TRIP)], MONDAY)
    sim.collect()
    sim.run(at(2026, 3, 3, 23))  # Tuesday night (finished cases stay in memory a day; the store keeps all)
    requests = sim.of("notice_request")
    assert [(r["purpose"], r["channel"]) for r in requests[:2]] == [("disconnect", "sms"), ("disconnect", "voice")]
    voice_delivered = MONDAY + 30 + 120
    cuts = trip_actions(sim)
    assert len(cuts) == 1
    assert cuts[0] >= voice_delivered + 24 * 3600  # the lead time, from the confirmed delivery
    assert cuts[0] < at(2026, 3, 3, 16)  # Tuesday, inside the window
    assert_trip_was_legitimate(sim, c)
    case = c.cases["A0#1"]
    assert case.state == CaseState.TRIPPED
    cmd = c.commands[case.command_ids[0]]
    assert (cmd.state, cmd.outcome, cmd.actor, cmd.attempts) == (CommandState.CONFIRMED, "open", "engine", 1)
    final = [r for r in requests if r["purpose"] == "final_reminder"]
    assert [r["channel"] for r in final] == ["sms", "voice"]  # the SMS fails again; voice confirms
    assert [e["gate"] for e in sim.of("trip_deferred")][:1] == ["notice"]
    assert any(a.action == "relay_trip_confirmed" for a in sim.audit)


def test_no_trip_while_no_channel_confirms_delivery():
    c = controller()
    sim = Sim(c, MONDAY, deliver=lambda r: (ReceiptOutcome.FAILED, 60))
    c.on_decisions([decision(K.TRIP)], MONDAY)
    sim.collect()
    sim.run(MONDAY + 6 * DAY)
    assert trip_actions(sim) == []
    case = c.cases["A0#1"]
    assert case.state == CaseState.BLOCKED and case.gate == "notice"
    # a new notice of disconnection each day, through every channel including paper
    notices = [n for n in c.notices.values() if n.purpose.value == "disconnect"]
    assert len(notices) >= 5
    assert notices[0].channels == ("sms", "voice", "app", "paper")
    assert sim.of("notice_exhausted")


def test_a_confirmed_warning_counts_and_a_stale_one_does_not():
    c = controller()
    sim = Sim(c, MONDAY)
    c.on_decisions([decision(K.NOTICE, level=1, balance=3000, seq=1)], MONDAY)
    sim.collect()
    sim.run(MONDAY + 2 * DAY)  # the warning was delivered on Monday
    c.on_decisions([decision(K.TRIP, seq=2, t=sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + DAY)
    assert len(trip_actions(sim)) == 1
    assert not [n for n in c.notices.values() if n.purpose.value == "disconnect"]  # the warning sufficed
    assert_trip_was_legitimate(sim, c)
    # another account warned ten days before reaching zero: that notice is stale, a fresh one goes out first
    c2 = controller()
    sim2 = Sim(c2, MONDAY)
    c2.on_decisions([decision(K.NOTICE, level=1, balance=3000, seq=1)], MONDAY)
    sim2.collect()
    sim2.run(MONDAY + 10 * DAY)
    c2.on_decisions([decision(K.TRIP, seq=2, t=sim2.now)], sim2.now)
    sim2.collect()
    sim2.run(sim2.now + 3 * DAY)
    assert [n.purpose.value for n in c2.notices.values()].count("disconnect") == 1
    assert len(trip_actions(sim2)) == 1
    assert_trip_was_legitimate(sim2, c2)


# --------------------------------------------------------------------------- gates


def test_protected_and_vip_customers_get_an_account_manager_task_never_a_trip():
    e = utility(accounts={0: account(0, CustomerClass.PROTECTED), 1: account(1, CustomerClass.VIP)})
    c = controller(e)
    sim = Sim(c, MONDAY)
    c.on_decisions([decision(K.ACCOUNT_MANAGER, "A0"), decision(K.TRIP, "A1")], MONDAY)  # a trip request for a
    sim.collect()  # VIP should never come from the engine; the controller refuses it all the same
    sim.run(MONDAY + 5 * DAY)
    assert trip_actions(sim, "M0") == [] and trip_actions(sim, "M1") == []
    tasks = sim.of("account_manager_task")
    assert {t["customer_class"] for t in tasks} == {"protected", "vip"}
    assert [e["case_id"] for e in sim.of("disconnect_case_cancelled")] == ["A1#1"]


def test_no_trip_on_a_holiday_the_cut_moves_to_the_next_working_day():
    def first_cut(config, decided_at):
        start = at(2026, 9, 28, 10)  # Monday before National Day: a level-2 warning, confirmed at once
        c = controller(config=config)
        sim = Sim(c, start)
        c.on_decisions([decision(K.NOTICE, level=2, balance=1000, t=start)], start)
        sim.collect()
        sim.run(decided_at)
        c.on_decisions([decision(K.TRIP, seq=2, t=sim.now)], sim.now)
        sim.collect()
        sim.run(at(2026, 10, 9))
        cuts = trip_actions(sim)
        assert len(cuts) == 1
        assert_trip_was_legitimate(sim, c)
        return c.calendar.day(int(cuts[0])).isoformat(), [e["gate"] for e in sim.of("trip_deferred")]

    # at zero late on Wednesday 30 September: no time left for the final reminder before the window closes;
    # 1-7 October are the National Day holiday (substituted days included): the cut waits for the 8th
    day, gates = first_cut(ControlConfig(), at(2026, 9, 30, 15, 50))
    assert day == "2026-10-08" and "holiday" in gates
    # where the eve of a holiday is forbidden too, reaching zero on Tuesday evening also waits for the 8th
    day, gates = first_cut(ControlConfig(trips=TripPolicy(window=TripWindowPolicy(forbid_holiday_eves=True))),
                           at(2026, 9, 29, 15, 50))
    assert day == "2026-10-08" and "holiday" in gates
    # ...while without that rule the cut is on the 30th
    day, _ = first_cut(ControlConfig(), at(2026, 9, 29, 15, 50))
    assert day == "2026-09-30"


def test_daily_cap_per_area_spreads_trips_and_defers_the_excess():
    cfg = ControlConfig(trips=TripPolicy(daily_cap_per_area=2))
    c = controller(utility(5), cfg)
    sim = Sim(c, MONDAY)
    c.on_decisions([decision(K.NOTICE, f"A{i}", level=2, balance=1000) for i in range(5)], MONDAY)
    sim.collect()
    sim.run(MONDAY + DAY + 3600)
    c.on_decisions([decision(K.TRIP, f"A{i}", seq=2, t=sim.now) for i in range(5)], sim.now)
    sim.collect()
    sim.run(MONDAY + 6 * DAY)
    cuts = sorted(t for i in range(5) for t in trip_actions(sim, f"M{i}"))
    assert len(cuts) == 5
    per_day: dict[str, list[float]] = {}
    for t in cuts:
        per_day.setdefault(c.calendar.day(int(t)).isoformat(), []).append(t)
    assert [len(v) for _, v in sorted(per_day.items())] == [2, 2, 1]
    plans: dict[str, float] = {}  # each case's final plan
    for e in sim.of("trip_planned"):
        plans[e["case_id"]] = e["planned_at"]
    per_plan_day: dict[str, list[float]] = {}
    for t in plans.values():
        per_plan_day.setdefault(c.calendar.day(int(t)).isoformat(), []).append(t)
    for slots in per_plan_day.values():  # spread: planned one slot apart (7 h window / cap 2)
        slots.sort()
        assert all(b - a >= 3.5 * 3600 for a, b in zip(slots, slots[1:]))
    assert "daily_cap" in [e["gate"] for e in sim.of("trip_deferred")]
    for i in range(5):
        assert_trip_was_legitimate(sim, c, f"M{i}", f"A{i}")


def test_extreme_weather_in_the_area_blocks_trips_until_cleared():
    c = controller()
    sim = Sim(c, MONDAY)
    c.on_decisions([decision(K.NOTICE, level=2, balance=1000)], MONDAY)
    sim.collect()
    sim.run(MONDAY + DAY + 3600)
    c.set_area_flag(AreaFlag("north", "extreme_weather", True, sim.now, None, "dispatcher", "blizzard"), sim.now)
    c.on_decisions([decision(K.TRIP, seq=2, t=sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + 4 * DAY)
    assert trip_actions(sim) == []
    assert c.cases["A0#2"].gate == "weather"
    c.set_area_flag(AreaFlag("north", "extreme_weather", False, sim.now, None, "dispatcher", "over"), sim.now)
    c.set_forecast(Forecast("north", c.calendar.day(int(sim.now)).isoformat(), -8.0, -1.0), sim.now)
    sim.collect()
    sim.run(sim.now + 3 * DAY)
    cuts = trip_actions(sim)
    assert len(cuts) == 1 and c.calendar.day(int(cuts[0])) > c.calendar.day(int(sim.now - 3 * DAY))
    assert any(a.action == "area_flag_set" and a.reason == "blizzard" for a in sim.audit)


def test_a_late_area_flag_older_than_the_one_in_force_is_refused_and_a_repeat_changes_nothing():
    c = controller()
    on = AreaFlag("north", "extreme_weather", True, MONDAY, None, "dispatcher", "blizzard")
    off = AreaFlag("north", "extreme_weather", False, MONDAY + 3600, None, "dispatcher", "over")
    c.set_area_flag(on, MONDAY)
    c.set_area_flag(on, MONDAY + 10)  # re-delivered
    c.set_area_flag(off, MONDAY + 3600)
    c.set_area_flag(on, MONDAY + 3700)  # the first message again, late
    fx = c.take_effects()
    assert not c.conditions.flags[("north", "extreme_weather")].active
    assert [a.action for a in fx.audit] == ["area_flag_set", "area_flag_cleared"]
    assert [reason for item, reason in fx.rejected] == [
        f"area flag north/extreme_weather since {MONDAY} is older than the one in force (since {MONDAY + 3600}): "
        f"a late delivery"]


def test_an_area_flag_for_an_area_no_account_is_in_is_refused():
    c = controller()
    c.set_area_flag(AreaFlag("nroth", "extreme_weather", True, MONDAY, None, "dispatcher", "blizzard"), MONDAY)
    fx = c.take_effects()
    assert not c.conditions.flags and not fx.flags and not fx.audit
    assert [reason for _, reason in fx.rejected] == [
        "area flag nroth/extreme_weather: unknown area 'nroth' (no account is in it)"]


def test_grace_period_by_customer_class():
    cfg = ControlConfig(trips=TripPolicy(grace_s={"residential": 3 * DAY}))
    c = controller(config=cfg)
    sim = Sim(c, MONDAY)
    c.on_decisions([decision(K.TRIP)], MONDAY)
    sim.collect()
    sim.run(MONDAY + 3 * DAY - 60)
    assert trip_actions(sim) == [] and c.cases["A0#1"].gate == "grace_period"
    sim.run(MONDAY + 5 * DAY)
    assert len(trip_actions(sim)) == 1 and trip_actions(sim)[0] >= MONDAY + 3 * DAY


def test_keep_power_refusal_is_a_gate_not_a_failure_to_retry():
    c = controller()
    sim = Sim(c, MONDAY, relays={"M0": FakeRelay(keep_power=True)})
    c.on_decisions([decision(K.TRIP)], MONDAY)
    sim.collect()
    sim.run(MONDAY + 2 * DAY)
    cmds = [x for x in c.commands.values() if x.action == RelayAction.TRIP]
    assert len(cmds) == 1 and cmds[0].state == CommandState.BLOCKED and cmds[0].attempts == 1
    case = c.cases["A0#1"]
    assert case.state == CaseState.BLOCKED and case.gate == "keep_power"
    sim.run(MONDAY + 5 * DAY)
    assert len([e for e in sim.of("relay_requested") if e["action"] == "trip"]) == 1  # not hammered
    # keep-power released (seen by the poller): the case plans again, with a new final reminder
    sim.relay("M0").keep_power = False
    c.observe_relays([("M0", RelayStatus(False, False, False), sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + 2 * DAY)
    assert len(trip_actions(sim)) == 1 and c.cases["A0#1"].state == CaseState.TRIPPED


# --------------------------------------------------------------------------- payments and the fresh check


def _to_the_brink(c, sim):
    """Run until the trip command exists (TRIPPING), without executing it."""
    c.on_decisions([decision(K.NOTICE, level=2, balance=1000)], MONDAY)
    sim.collect()
    sim.run(MONDAY + DAY + 3600)
    c.on_decisions([decision(K.TRIP, seq=2, t=sim.now)], sim.now)
    sim.collect()
    for _ in range(200):
        sim.do_due(execute=False)
        case = c.cases["A0#2"]
        if case.state == CaseState.TRIPPING:
            return case
        sim.advance(sim.now + 7 * DAY)
    raise AssertionError("never reached TRIPPING")


def test_a_payment_before_the_send_cancels_the_trip_and_its_notices():
    c = controller()
    sim = Sim(c, MONDAY)
    case = _to_the_brink(c, sim)
    c.on_decisions([decision(K.CANCEL_TRIP, seq=3, level=2, balance=800, t=sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + 12 * 3600)
    assert trip_actions(sim) == []
    assert case.state == CaseState.CANCELLED and "arrears cleared" in case.closed_reason
    cmd = c.commands[case.command_ids[0]]
    assert cmd.state == CommandState.CANCELLED
    assert all(not n.state.active for n in c.notices.values())


def test_the_fresh_balance_at_the_moment_of_sending_stops_the_trip():
    c = controller()
    sim = Sim(c, MONDAY)
    case = _to_the_brink(c, sim)
    sim.balances["M0"] = (150, 0)  # a payment committed but not yet seen by the engine (another instance)
    sim.execute()
    assert trip_actions(sim) == []
    cmd = c.commands[case.command_ids[0]]
    assert cmd.state == CommandState.CANCELLED and cmd.outcome.startswith("balance: fresh balance 150 fen")
    assert case.state == CaseState.WAITING and case.gate == "balance"


def test_a_payment_while_the_trip_is_in_flight_closes_right_after_it():
    c = controller()
    sim = Sim(c, MONDAY)
    case = _to_the_brink(c, sim)
    trip_id = case.command_ids[0]
    assert c.authorize(trip_id, sim.now, -5, 0).command_id == trip_id  # SENDING committed: the frame goes out
    sim.relay("M0").open = True
    c.on_decisions([decision(K.CANCEL_TRIP, seq=3, level=2, balance=800, t=sim.now)], sim.now)
    sim.collect()
    closes = [x for x in c.commands.values() if x.action == RelayAction.CLOSE]
    assert len(closes) == 1 and closes[0].readback_first
    # the close waits for the trip in flight (one command per meter at a time), then goes first
    assert [s.subject_id for s in c.steps(sim.now)] == []
    c.on_send_result(trip_id, sim.now + 0.2, SendResult.ACKNOWLEDGED)
    sim.now += 0.2
    sim.run(sim.now + 60)
    assert c.commands[trip_id].state == CommandState.CONFIRMED
    assert closes[0].state == CommandState.CONFIRMED and closes[0].outcome == "closed"
    assert sim.relay("M0").open is False and closes[0].deadline_at == closes[0].payment_at + DAY


def test_a_key_used_for_a_close_is_refused_for_a_trip_not_taken_as_done():
    c = controller(utility(1))
    close = c.manual("M0", RelayAction.CLOSE, "li", "operator", "customer paid at the counter", "req-K", MONDAY)
    with pytest.raises(AuthorityError, match="already names close command manual:req-K:M0"):
        c.manual("M0", RelayAction.TRIP, "wang", "supervisor", "tamper found on site", "req-K", MONDAY + 1)
    assert c.commands["manual:req-K:M0"] is close and close.action == RelayAction.CLOSE
    refused = [a for a in c.take_effects().audit if a.action == "manual_trip_refused"]
    assert len(refused) == 1 and "needs a key of its own" in refused[0].detail["problem"]


def test_closes_go_before_trips_and_a_close_supersedes_a_queued_trip():
    c = controller(utility(3))
    for m in ("M1", "M2"):
        c.relays[m] = RelayStatus(True, True, False)
    c.manual("M0", RelayAction.TRIP, "wang", "supervisor", "tamper found on site", "req-1", MONDAY)
    c.on_decisions([decision(K.CLOSE, "A1", balance=500), decision(K.CLOSE, "A2", balance=500)], MONDAY)
    steps = c.steps(MONDAY)
    assert [s.meter_id for s in steps] == ["M1", "M2", "M0"]
    c.manual("M0", RelayAction.CLOSE, "li", "operator", "customer paid at the counter", "req-2", MONDAY + 1)
    trip = c.commands["manual:req-1:M0"]
    assert trip.state == CommandState.CANCELLED and trip.superseded_by == "manual:req-2:M0"
    again = c.manual("M0", RelayAction.CLOSE, "li", "operator", "same request again", "req-2", MONDAY + 2)
    assert again is c.commands["manual:req-2:M0"]


def paid_while_open(relay: FakeRelay, engine=None, paid_at=None):
    """A customer whose relay is open pays: the controller has made the close. Returns (controller, sim)."""
    c = controller(engine)
    c.relays["M0"] = RelayStatus(True, True, False)
    sim = Sim(c, MONDAY, relays={"M0": relay})
    c.on_decisions([decision(K.CLOSE, balance=5000)], MONDAY, {"A0": paid_at} if paid_at is not None else None)
    sim.collect()
    return c, sim


# --------------------------------------------------------------------------- commands on the wire


def test_a_meter_that_acknowledges_but_does_not_close_gets_a_field_order_with_the_payment_deadline():
    paid = MONDAY - 120
    c, sim = paid_while_open(FakeRelay(open_=True, stuck=True), paid_at=paid)
    sim.run(MONDAY + 3600)
    close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    orders = sim.of("field_order_created")
    assert len(orders) == 1
    o = c.orders[orders[0]["order_id"]]
    assert o.deadline_at == paid + DAY  # payment time + 24 h
    assert (o.address, o.lat, o.lon) == ("0 Main St", 31.2, 121.5)
    assert "acknowledged but the relay is still open" in o.reason and o.attempts
    p = c.cfg.commands.close
    assert close.failures >= p.dispatch_after_failures and close.attempts < p.max_attempts  # before the budget ends
    assert close.state == CommandState.DISPATCHED
    n = close.attempts
    sim.run(MONDAY + 3 * 3600)
    assert close.attempts - n <= 5  # slower remote retries while the order is open (every 30 min)
    # the crew goes: accepted, on site, completed; the meter answers the verification read: closed
    c.on_field_updates([FieldUpdate("u1", o.order_id, FieldStatus.ACCEPTED, sim.now, "crew-7")], sim.now)
    c.on_field_updates([FieldUpdate("u2", o.order_id, FieldStatus.ON_SITE, sim.now + 1800, "crew-7")], sim.now + 1800)
    c.on_field_updates([FieldUpdate("u0", o.order_id, FieldStatus.ACCEPTED, sim.now + 1900, "crew-7")],
                       sim.now + 1900)  # a late, older update: kept, no effect
    sim.now += 3600
    sim.relay("M0").stuck, sim.relay("M0").open = False, False  # the crew replaced the relay
    c.on_field_updates([FieldUpdate("u3", o.order_id, FieldStatus.COMPLETED, sim.now, "crew-7", "relay replaced")],
                       sim.now)
    sim.collect()
    sim.run(sim.now + 600)
    assert o.state == OrderState.COMPLETED and o.verified == "confirmed"
    assert close.state == CommandState.CONFIRMED and close.outcome == "closed_by_field"
    assert o.crew == "crew-7" and o.note == "relay replaced"


def test_remote_success_cancels_the_open_order():
    c, sim = paid_while_open(FakeRelay(open_=True, stuck=True))
    sim.run(MONDAY + 1800)
    order = next(iter(c.orders.values()))
    sim.relay("M0").stuck = False  # the relay frees itself
    sim.run(MONDAY + 4 * 3600)
    assert order.state == OrderState.CANCELLED and "remote close succeeded" in order.note
    assert sim.of("field_order_cancelled")
    # a crew was there as the retry went out: their completion, crossing the cancellation, is recorded (their
    # visit happened); the meter was already read closed, so no verification reads follow
    c.on_field_updates([FieldUpdate("u1", order.order_id, FieldStatus.COMPLETED, sim.now, "crew-3", "reset")],
                       sim.now)
    sim.collect()
    assert (order.state, order.verified, order.crew, order.verify_next_at) == (
        OrderState.COMPLETED, "confirmed", "crew-3", None)
    assert order.note == "remote close succeeded (read-back); completed on site as well: reset"
    assert sim.of("field_order_updated")[-1]["state"] == "completed"
    # anything else for it is still refused
    with pytest.raises(ValueError, match="is completed: it takes no more field updates"):
        c.dispatcher.apply(order, FieldUpdate("u2", order.order_id, FieldStatus.FAILED, sim.now), sim.now)


def test_a_completion_after_a_cancellation_for_another_reason_is_refused():
    c, sim = paid_while_open(FakeRelay(open_=True, stuck=True))
    sim.run(MONDAY + 1800)
    order = next(iter(c.orders.values()))
    assert c.dispatcher.cancel(order, sim.now, "superseded by an operator's trip")
    with pytest.raises(ValueError, match="is cancelled: it takes no more field updates"):
        c.dispatcher.apply(order, FieldUpdate("u1", order.order_id, FieldStatus.COMPLETED, sim.now), sim.now)
    assert (order.state, order.verified) == (OrderState.CANCELLED, "")


def test_orders_escalate_near_the_deadline_and_rank_by_urgency():
    c = controller(utility(3, accounts={2: account(2, CustomerClass.PROTECTED)}),
                   ControlConfig(dispatch=DispatchPolicy(escalate_before_s=4 * 3600)))
    relays = {}
    for i in range(3):
        c.relays[f"M{i}"] = RelayStatus(True, True, False)
        relays[f"M{i}"] = FakeRelay(open_=True, silent=True)
    sim = Sim(c, MONDAY, relays=relays)
    c.on_decisions([decision(K.CLOSE, "A0", balance=900)], MONDAY, {"A0": MONDAY - 3600})
    c.on_decisions([decision(K.CLOSE, "A1", balance=900)], MONDAY, {"A1": MONDAY})
    c.on_decisions([decision(K.CLOSE, "A2", balance=900)], MONDAY, {"A2": MONDAY})
    sim.collect()
    sim.run(MONDAY + 2 * 3600)
    ranked = [o.account_id for o in c.orders_by_urgency()]
    assert ranked == ["A2", "A0", "A1"]  # life support first, then the oldest payment
    sim.run(MONDAY + DAY - 3 * 3600)
    levels = {(e["order_id"], e["level"]) for e in sim.of("field_order_escalated")}
    assert {lvl for _, lvl in levels} == {1}
    sim.run(MONDAY + DAY + 60)
    assert {lvl for _, lvl in {(e["order_id"], e["level"]) for e in sim.of("field_order_escalated")}} == {1, 2}


def test_a_completion_the_meter_contradicts_reopens_the_order():
    c, sim = paid_while_open(FakeRelay(open_=True, stuck=True))
    sim.run(MONDAY + 1800)
    o = next(iter(c.orders.values()))
    c.on_field_updates([FieldUpdate("u1", o.order_id, FieldStatus.COMPLETED, sim.now, "crew-2")], sim.now)
    sim.collect()
    sim.run(sim.now + 60)
    assert o.verified == "contradicted" and o.state == OrderState.OPEN
    assert any(e["reason"] == "reported completed but the meter disagrees" for e in sim.of("field_order_escalated"))
    done = dataclasses.replace(o, state=OrderState.COMPLETED)
    with pytest.raises(ValueError, match="is completed: it takes no more field updates"):
        c.dispatcher.apply(done, FieldUpdate("u9", o.order_id, FieldStatus.ON_SITE, sim.now), sim.now)


def test_close_allowed_mode_succeeds_when_the_meter_accepts_and_tells_the_customer_to_press_the_button():
    c, sim = paid_while_open(FakeRelay(open_=True), engine=utility(1, reconnect_mode="close_allowed"))
    sim.run(MONDAY + 60)
    close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    assert close.mode == ReconnectMode.CLOSE_ALLOWED
    assert (close.state, close.outcome) == (CommandState.CONFIRMED, "close_allowed")
    assert sim.relay("M0").open  # the relay waits for the customer
    assert [r["purpose"] for r in sim.of("notice_request")] == ["press_button"]


def test_no_answer_means_read_back_before_sending_again():
    relay = FakeRelay(open_=True, silent=True)
    c, sim = paid_while_open(relay)
    sim.run(MONDAY + 8)
    close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    assert close.state == CommandState.RETRY_WAIT and close.readback_first and close.attempts == 1
    # an operator cannot cancel it now: the frame may have acted, and only the read-back can tell
    refused = c.cancel(close.command_id, "wang", "supervisor", "customer asked", MONDAY + 9)
    assert "may have reached the meter" in refused and close.state == CommandState.RETRY_WAIT
    # the frame had in fact acted; the meter answers again: the read confirms, nothing is sent twice
    relay.silent, relay.open = False, False
    sim.run(MONDAY + 600)
    assert close.state == CommandState.CONFIRMED and close.attempts == 1 and relay.actions == []


def test_refusals_back_off_harder_and_a_password_refusal_is_final():
    c, sim = paid_while_open(FakeRelay(open_=True, refuse=("other_error",)))
    sim.run(MONDAY + 1)
    close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    assert close.state == CommandState.RETRY_WAIT and close.next_at - MONDAY >= c.cfg.commands.close.refusal_backoff_s
    c2, sim2 = paid_while_open(FakeRelay(open_=True, refuse=("password_error_or_unauthorized",)))
    sim2.run(MONDAY + 3600)
    close = next(x for x in c2.commands.values() if x.action == RelayAction.CLOSE)
    assert close.state == CommandState.FAILED and close.attempts == 1 and "lock the meter" in close.outcome
    assert c2.orders  # a reconnect that cannot work remotely goes to a crew at once


def test_an_expired_command_is_never_sent():
    c = controller()
    c.manual("M0", RelayAction.TRIP, "wang", "supervisor", "meter swap", "req-1", MONDAY)
    cmd = c.commands["manual:req-1:M0"]
    block = c.authorize(cmd.command_id, cmd.expires_at)
    assert block.gate == Gate.EXPIRED and cmd.state == CommandState.CANCELLED and cmd.attempts == 0


def test_backoff_grows_with_jitter_and_is_reproducible():
    c = controller()
    cmd = c.manual("M0", RelayAction.TRIP, "wang", "supervisor", "test", "req-1", MONDAY)
    p = c.cfg.commands.trip
    delays = []
    for failures in range(1, 6):
        cmd.failures = failures
        delays.append(c.machine.backoff(cmd, p))
    assert delays == [c.machine.backoff(cmd, p) for cmd.failures in range(1, 6)]  # a replay waits the same
    base = [min(p.backoff_s * 2 ** (k - 1), p.backoff_max_s) for k in range(1, 6)]
    assert all(b * (1 - p.jitter) <= d <= b * (1 + p.jitter) for b, d in zip(base, delays))
    assert delays[3] > delays[0] * 4
    # commands that failed together do not all come back together
    others = [dataclasses.replace(cmd, command_id=f"trip:case-{i}:1:M0", failures=1) for i in range(50)]
    spread = [c.machine.backoff(o, p) for o in others]
    assert max(spread) - min(spread) > p.backoff_s * p.jitter
    assert len({round(x, 6) for x in spread}) > 40


# --------------------------------------------------------------------------- authority


def test_manual_commands_need_identity_role_and_reason_and_every_refusal_is_audited():
    c = controller(utility(2, accounts={1: account(1, CustomerClass.PROTECTED)}))
    for operator, role, reason, meter, match in [
            ("", "operator", "x", "M0", "an operator identity is required"),
            ("zhao", "viewer", "x", "M0", "role 'viewer' may not trip"),
            ("zhao", "operator", "  ", "M0", "a reason is required"),
            ("zhao", "operator", "unsafe wiring", "M1", "protected account: a manual trip needs one of the roles")]:
        with pytest.raises(AuthorityError, match=match):
            c.manual(meter, RelayAction.TRIP, operator, role, reason, "k1", MONDAY)
    audit = c.take_effects().audit
    assert len(audit) == 4 and all(a.action == "manual_trip_refused" for a in audit)
    assert not c.commands
    cmd = c.manual("M1", RelayAction.TRIP, "qian", "supervisor", "unsafe wiring", "k2", MONDAY)
    assert (cmd.actor, cmd.role, cmd.reason, cmd.origin) == ("qian", "supervisor", "unsafe wiring", "k2")
    fx = c.take_effects()
    assert [a.action for a in fx.audit] == ["relay_trip_requested"]
    assert [e.kind for e in fx.events] == ["relay_requested"]


def test_a_manual_close_ends_the_automatic_case():
    c = controller()
    c.on_decisions([decision(K.TRIP)], MONDAY)
    c.manual("M0", RelayAction.CLOSE, "li", "operator", "hardship: supervisor approved", "k1", MONDAY + 60)
    case = c.cases["A0#1"]
    assert case.state == CaseState.CANCELLED and "operator li closed the relay manually" in case.closed_reason


# --------------------------------------------------------------------------- why is this meter off?


def test_why_is_this_meter_off():
    from gateway.core.commands import explain
    c = controller()
    sim = Sim(c, MONDAY)
    case = _to_the_brink(c, sim)
    sim.run(sim.now + 60)
    trip = c.commands[case.command_ids[0]]
    cmds = sorted(c.commands.values(), key=lambda x: -x.created_at)
    why = explain("M0", (1, sim.now, 1, 0), cmds, [], c.fmt)
    assert why.relay == "open" and why.opened_by_gateway and why.command_id == trip.command_id
    assert why.actor == "engine" and "opened by the balance engine" in why.summary and "arrears" in why.summary
    # a relay open with no command of ours behind it: a fault, not arrears
    why = explain("M9", (1, sim.now, 0, 0), [], [], c.fmt)
    assert why.opened_by_gateway is False and why.summary.startswith("not opened by the gateway")
    assert explain("M9", None, [], []).relay == "unknown"
    assert explain("M9", (0, sim.now, 0, 1), [], [], c.fmt).summary.startswith("closed")


def test_a_payment_does_not_undo_an_operators_trip_but_does_undo_ours():
    c = controller(utility(2))
    sim = Sim(c, MONDAY)
    c.manual("M0", RelayAction.TRIP, "wang", "supervisor", "meter bypass found on site", "req-1", MONDAY)
    sim.collect()
    sim.run(MONDAY + 60)
    assert sim.relay("M0").open
    c.on_decisions([decision(K.CLOSE, "A0", balance=5000, t=sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + 60)
    assert sim.relay("M0").open  # still open: the operator's reason stands until an operator closes it
    withheld = sim.of("close_withheld")
    assert len(withheld) == 1 and withheld[0]["actor"] == "wang" and "bypass" in withheld[0]["reason"]
    # ...and it is remembered after the command itself would have been forgotten
    sim.run(sim.now + 3 * DAY)
    assert c._opened_by_operator("M0").command_id == "manual:req-1:M0"


def test_a_payment_while_a_trip_outcome_is_unknown_closes_after_reading_back():
    c = controller()
    sim = Sim(c, MONDAY)
    case = _to_the_brink(c, sim)
    relay = sim.relay("M0")
    relay.silent = True  # the trip goes out, nothing comes back: did it act?
    sim.run(sim.now + 10)
    trip = c.commands[case.command_ids[0]]
    assert trip.state == CommandState.RETRY_WAIT and trip.readback_first
    relay.silent, relay.open = False, True  # it had acted
    c.on_decisions([decision(K.CANCEL_TRIP, seq=3, level=2, balance=800, t=sim.now)], sim.now)
    sim.collect()
    close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    assert close.readback_first and trip.state == CommandState.CANCELLED
    sim.run(sim.now + 60)
    assert close.state == CommandState.CONFIRMED and not relay.open


def test_a_relay_found_open_before_any_frame_is_not_ours():
    from gateway.core.commands import explain
    c = controller()
    sim = Sim(c, MONDAY, relays={"M0": FakeRelay(open_=True)})
    sim.relay("M0").commanded_open = False
    # the meter's own protection opened it
    c.observe_relays([("M0", RelayStatus(True, False, False), MONDAY)], MONDAY)
    case = _to_the_brink(c, sim)
    sim.run(sim.now + 60)
    trip = c.commands[case.command_ids[0]]
    assert trip.outcome == "already_open" and trip.attempts == 0 and sim.relay("M0").actions == []
    why = explain("M0", (1, sim.now, 1, 0), [trip], [], c.fmt)
    assert why.opened_by_gateway is False and "already open when trip command" in why.summary


def test_a_trip_that_fails_remotely_ends_the_case_and_by_configuration_gets_a_lower_priority_order():
    for orders in (False, True):
        c = controller(config=ControlConfig(dispatch=DispatchPolicy(trip_failure_orders=orders)))
        sim = Sim(c, MONDAY, relays={"M0": FakeRelay(stuck=True)})
        case = _to_the_brink(c, sim)
        sim.run(sim.now + 2 * 3600)
        trip = c.commands[case.command_ids[0]]
        assert trip.state == CommandState.FAILED and trip.attempts == c.cfg.commands.trip.max_attempts
        assert case.state == CaseState.FAILED and "acknowledged but the relay is still closed" in case.closed_reason
        assert not sim.relay("M0").open
        made = list(c.orders.values())
        assert len(made) == orders
        if orders:
            assert made[0].kind.value == "disconnect" and made[0].deadline_at == pytest.approx(
                made[0].created_at + c.cfg.dispatch.disconnect_deadline_s)


def test_a_final_reminder_announces_its_days_cut_only():
    """The reminder goes out, then a weather flag moves the cut to another day: a new reminder for that day."""
    c = controller()
    sim = Sim(c, MONDAY, deliver=lambda r: None if r["purpose"] == "final_reminder" else (ReceiptOutcome.DELIVERED, 60))
    case = None
    c.on_decisions([decision(K.NOTICE, level=2, balance=1000)], MONDAY)
    sim.collect()
    sim.run(MONDAY + DAY + 3600)
    c.on_decisions([decision(K.TRIP, seq=2, t=sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + 600)  # the reminder was requested; no receipt yet
    case = c.cases["A0#2"]
    first = c.notices[case.final_notice_id]
    assert first.state.active
    c.set_area_flag(AreaFlag("north", "extreme_weather", True, sim.now, sim.now + DAY, "ops", "storm"), sim.now)
    sim.collect()
    sim.deliver = lambda r: (ReceiptOutcome.DELIVERED, 60)
    sim.run(sim.now + 2 * DAY)
    assert first.state.value == "cancelled" and "moved to another day" in first.closed_reason
    assert case.final_notice_id != first.notice_id
    cuts = trip_actions(sim)
    assert len(cuts) == 1
    assert c.calendar.day(int(cuts[0])) == c.calendar.day(int(c.notices[case.final_notice_id].params["planned_at"]))
    assert_trip_was_legitimate(sim, c)


# --------------------------------------------------------------------------- regressions from review


def test_a_payment_after_a_trip_that_failed_without_a_verified_position_still_closes():
    c = controller()
    sim = Sim(c, MONDAY)
    case = _to_the_brink(c, sim)
    relay = sim.relay("M0")
    relay.silent = True  # frames act (or not), nothing answers, reads fail: the trip fails unverified
    sim.run(sim.now + 2 * 3600)
    trip = c.commands[case.command_ids[0]]
    assert trip.state == CommandState.FAILED and case.state == CaseState.FAILED
    relay.silent, relay.open = False, True  # it had acted
    c.on_decisions([decision(K.CANCEL_TRIP, seq=3, level=2, balance=800, t=sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + 60)
    close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    assert close.state == CommandState.CONFIRMED and not relay.open


def test_a_relay_seen_commanded_open_with_nothing_to_warrant_it_is_closed():
    e = utility(1)
    c = controller(e)
    sim = Sim(c, MONDAY, relays={"M0": FakeRelay(open_=True)})
    # not in arrears, no command of anyone's: nothing warrants it
    c.observe_relays([("M0", RelayStatus(True, True, False), MONDAY)], MONDAY)
    sim.collect()
    sim.run(MONDAY + 60)
    assert sim.of("relay_unwarranted_open") and not sim.relay("M0").open
    # ...but not while the account is in arrears, nor a local-mode meter (its own purse opens it)
    c2 = controller(utility(1, accounts={0: dataclasses.replace(account(0), mode=CostControlMode.LOCAL)}))
    c2.observe_relays([("M0", RelayStatus(True, True, False), MONDAY)], MONDAY)
    assert not [x for x in c2.commands.values()]


def test_an_operators_trip_stays_after_a_payment_even_when_our_trip_found_it_open():
    e = utility(1, meters_per_account=2)
    c = controller(e)
    sim = Sim(c, MONDAY)
    c.manual("M0", RelayAction.TRIP, "wang", "supervisor", "tampering", "req-1", MONDAY)
    sim.collect()
    sim.run(MONDAY + 60)
    case = _to_the_brink(c, sim)  # the account reaches the trip level: both meters get trip commands
    sim.run(sim.now + 60)
    trips = {c.commands[i].meter_id: c.commands[i] for i in case.command_ids}
    assert trips["M0"].outcome == "already_open" and trips["M0-1"].outcome == "open"
    c.on_decisions([decision(K.CLOSE, seq=3, balance=5000, t=sim.now)], sim.now)
    sim.collect()
    sim.run(sim.now + 60)
    assert sim.relay("M0").open and not sim.relay("M0-1").open
    assert [w["command_id"] for w in sim.of("close_withheld")] == ["manual:req-1:M0"]
    from gateway.core.commands import explain
    mine = sorted((x for x in c.commands.values() if x.meter_id == "M0"), key=lambda x: -x.created_at)
    why = explain("M0", (1, sim.now, 1, 0), mine, [], c.fmt)
    assert why.opened_by_gateway and why.actor == "wang" and "tampering" in why.summary


def test_a_payment_cancels_disconnect_orders_and_a_superseded_close_takes_its_order_along():
    c = controller(config=ControlConfig(dispatch=DispatchPolicy(trip_failure_orders=True)))
    sim = Sim(c, MONDAY, relays={"M0": FakeRelay(stuck=True)})
    _to_the_brink(c, sim)
    sim.run(sim.now + 2 * 3600)
    order = next(iter(c.orders.values()))
    assert order.kind.value == "disconnect" and order.state == OrderState.OPEN
    c.on_decisions([decision(K.CANCEL_TRIP, seq=3, level=2, balance=800, t=sim.now)], sim.now)
    sim.collect()
    assert order.state == OrderState.CANCELLED and order.note == "the customer paid"
    # a reconnect order goes when its close is superseded (an operator trips the meter instead)
    c2, sim2 = paid_while_open(FakeRelay(open_=True, stuck=True))
    sim2.run(MONDAY + 3600)
    order = next(iter(c2.orders.values()))
    c2.manual("M0", RelayAction.TRIP, "wang", "supervisor", "meter to be replaced", "req-9", sim2.now)
    assert order.state == OrderState.CANCELLED and "superseded by manual:req-9:M0" in order.note


def test_a_partial_payment_above_the_trip_level_holds_the_cut_without_reminders():
    c = controller()
    sim = Sim(c, MONDAY)
    _to_the_brink(c, sim)
    balances = {"A0": (200, 0)}  # paid a little: above the trip level, still in the trip band (hysteresis)
    c.dir.balance_and_level = lambda a: balances.get(a, (-5, 0))
    sim.balances["M0"] = balances["A0"]
    reminders_before = len([n for n in sim.notices.values() if n.purpose.value == "final_reminder"])
    sim.run(sim.now + 5 * DAY)
    assert trip_actions(sim) == []
    assert len([e for e in sim.of("relay_requested") if e["action"] == "trip"]) == 1
    assert len([n for n in sim.notices.values() if n.purpose.value == "final_reminder"]) == reminders_before
    assert c.cases["A0#2"].gate == "balance"
    balances["A0"] = sim.balances["M0"] = (-50, 0)  # used up again
    sim.run(sim.now + 3 * DAY)
    assert len(trip_actions(sim)) == 1
    assert_trip_was_legitimate(sim, c)


def test_customers_no_channel_reaches_are_never_stuck_and_never_tripped():
    for contacts, channels, address in (({"email": "a@b.cn"}, ("email",), "1 Main St"), ({}, (), "")):
        acct = dataclasses.replace(account(0, channels=channels, contacts=contacts), address=address)
        c = controller(utility(1, accounts={0: acct}))
        sim = Sim(c, MONDAY)
        c.on_decisions([decision(K.TRIP)], MONDAY)
        sim.collect()
        sim.run(MONDAY + 20 * DAY)
        case = c.cases["A0#1"]
        assert trip_actions(sim) == []
        assert case.state.active and case.next_check_at is not None and case.next_check_at > MONDAY + 19 * DAY
        ids = [n["notice_id"] for n in sim.of("notice_exhausted")]
        assert len(ids) == len(set(ids)) >= 10  # retried every day, every notice its own id


def test_second_failed_visit_counts():
    c, sim = paid_while_open(FakeRelay(open_=True, stuck=True))
    sim.run(MONDAY + 3600)
    o = next(iter(c.orders.values()))
    for i in range(2):
        c.on_field_updates([FieldUpdate(f"f{i}", o.order_id, FieldStatus.FAILED, sim.now + i, "crew-1", "no access")],
                           sim.now + i)
    assert o.visits == 2 and o.state == OrderState.FAILED


def test_an_operator_joining_a_close_underway_gets_that_command_and_a_manual_close_stops_the_notices():
    c, sim = paid_while_open(FakeRelay(open_=True, stuck=True))
    sim.run(MONDAY + 600)
    engine_close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    joined = c.manual("M0", RelayAction.CLOSE, "li", "operator", "customer called: still off", "call-77", sim.now)
    assert joined is engine_close
    assert any(a.action == "manual_close_joined" for a in c.take_effects().audit)
    c2 = controller()
    c2.on_decisions([decision(K.TRIP)], MONDAY)
    pending = [n for n in c2.notices.values() if n.state.active]
    assert pending
    c2.manual("M0", RelayAction.CLOSE, "li", "operator", "hardship", "k1", MONDAY + 60)
    assert all(not n.state.active for n in pending)


def test_a_command_found_sending_after_a_restart_gets_the_settle_time_to_show_its_position():
    c = controller()
    cmd = c.manual("M0", RelayAction.TRIP, "wang", "supervisor", "test", "req-1", MONDAY)
    c.authorize(cmd.command_id, MONDAY)
    assert cmd.state == CommandState.SENDING
    again = controller()
    again.restore(MONDAY + 1, [], [], [dataclasses.replace(cmd)], [], {}, {}, [], [])
    recovered = again.commands[cmd.command_id]
    assert recovered.state == CommandState.VERIFYING and recovered.verify_until == MONDAY + 1 + 5.0
    step = again.steps(MONDAY + 1)[0]
    again.on_read_result(step, MONDAY + 1, RelayStatus(False, True, False))  # still moving
    assert recovered.state == CommandState.VERIFYING
    again.on_read_result(again.steps(MONDAY + 2)[0], MONDAY + 2, RelayStatus(True, True, False))
    assert recovered.state == CommandState.CONFIRMED and recovered.attempts == 1


def test_a_read_the_command_no_longer_waits_for_changes_nothing():
    c, sim = paid_while_open(FakeRelay(open_=True, stuck=True))
    step = c.steps(MONDAY)[0]
    close = c.commands[step.subject_id]
    c.authorize(close.command_id, MONDAY)
    c.on_send_result(close.command_id, MONDAY, SendResult.ACKNOWLEDGED)
    read = c.steps(MONDAY + 1)[0]
    c.on_read_result(read, MONDAY + 6, RelayStatus(True, False, False))  # settle time up: failed, backing off
    assert close.state == CommandState.RETRY_WAIT
    nxt = close.next_at
    c.on_read_result(read, MONDAY + 7, RelayStatus(True, False, False))  # the same read step, again
    assert close.state == CommandState.RETRY_WAIT and close.next_at == nxt


def test_a_poll_that_read_the_relay_before_a_read_back_cannot_put_the_old_position_back():
    c, sim = paid_while_open(FakeRelay(open_=True))
    poll_read_at = MONDAY + 0.1  # the poller read the status word (still open)...
    sim.run(MONDAY + 10)  # ...the close went out and its read-back confirmed it closed...
    close = next(x for x in c.commands.values() if x.action == RelayAction.CLOSE)
    assert close.state == CommandState.CONFIRMED and "M0" not in c.relays
    c.observe_relays([("M0", RelayStatus(True, True, False), poll_read_at)], MONDAY + 11)  # ...committed last
    sim.collect()
    assert "M0" not in c.relays and not sim.of("relay_unwarranted_open")
    assert len([x for x in c.commands.values() if x.action == RelayAction.CLOSE]) == 1


def test_forgetting_finished_commands_leaves_no_dangling_references():
    """A command that finished with nothing asking for steps meanwhile is forgotten cleanly."""
    c, sim = paid_while_open(FakeRelay(open_=True))
    step = c.steps(MONDAY)[0]
    c.authorize(step.subject_id, MONDAY)
    c.on_send_result(step.subject_id, MONDAY, SendResult.ACKNOWLEDGED)
    c.on_read_result(c.steps(MONDAY + 1)[0], MONDAY + 1, RelayStatus(False, False, False))
    assert c.commands[step.subject_id].state == CommandState.CONFIRMED
    c.tick(MONDAY + 3 * DAY)  # forgotten: older than keep_terminal_s
    assert step.subject_id not in c.commands
    assert c.steps(MONDAY + 3 * DAY) == [] and c.next_step_at() is None
