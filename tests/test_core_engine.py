"""The balance-threshold engine over a fast-forwarded clock: crossings, hysteresis, payments, holds, local mode."""
import numpy as np

from gateway.core.engine import DecisionKind as K
from gateway.core.engine import ReadingBatch
from gateway.core.model import Account, Adjustment, CostControlMode, CustomerClass, Meter, MeterReplaced, Payment, RelayStateChanged

from .core_fixtures import DAY, HOUR, T0, engine, read


def kinds(out):
    return [(d.account_id, d.kind, d.level) for d in out.decisions]


def pay(e, account, fen, t, pid=None):
    return e.apply_credits([Payment(pid or f"p-{account}-{t}", account, fen, t)], t)


def test_run_down_to_zero_gives_one_decision_per_crossing():
    e = engine(1)
    pay(e, "A0", 10_000, T0)  # 100 yuan
    read(e, [("M0", T0, 1000)])
    seen = []
    # 2 kWh a day at 0.50 yuan = 1 yuan a day: warning 1 at 50 yuan, warning 2 at 20 yuan, trip at 0
    for day in range(1, 120):
        seen += kinds(read(e, [("M0", T0 + day * DAY, 1000 + 2 * day)]))
    assert seen == [("A0", K.NOTICE, 1), ("A0", K.NOTICE, 2), ("A0", K.TRIP, 3)]
    assert e.balance_of("A0") < 0


def test_one_big_drop_crosses_all_levels_at_once():
    e = engine(1)
    pay(e, "A0", 6000, T0)
    read(e, [("M0", T0, 0)])
    out = read(e, [("M0", T0 + DAY, 150)])  # 150 kWh = 75 yuan in a day
    assert kinds(out) == [("A0", K.NOTICE, 1), ("A0", K.NOTICE, 2), ("A0", K.TRIP, 3)]
    assert [d.decision_id for d in out.decisions] == ["A0#1", "A0#2", "A0#3"]


def test_no_flapping_around_a_level():
    e = engine(1)
    pay(e, "A0", 5100, T0)
    read(e, [("M0", T0, 0)])
    out = read(e, [("M0", T0 + HOUR, 2.4)])  # 120 fen: balance 4980 -> warning 1
    assert kinds(out) == [("A0", K.NOTICE, 1)]
    decisions = []
    for i in range(20):  # the balance wobbles across 5000: +300 fen paid, 300 fen used, again and again
        decisions += kinds(pay(e, "A0", 300, T0 + (2 + i) * HOUR, f"w{i}"))
        decisions += kinds(read(e, [("M0", T0 + (2 + i) * HOUR + 1800, 2.4 + 6 * (i + 1))]))
    assert e.balance_of("A0") == 4980
    assert decisions == []


def test_payment_after_trip_requests_close_at_once_when_relay_is_open():
    e = engine(1)
    pay(e, "A0", 100, T0)
    read(e, [("M0", T0, 0)])
    assert kinds(read(e, [("M0", T0 + HOUR, 10)]))[-1] == ("A0", K.TRIP, 3)
    e.apply_relay_states([RelayStateChanged("M0", True, T0 + 2 * HOUR)])
    out = pay(e, "A0", 10_000, T0 + 3 * HOUR)
    assert kinds(out) == [("A0", K.CLOSE, 0)]


def test_payment_before_the_trip_was_executed_cancels_it():
    e = engine(1)
    pay(e, "A0", 100, T0)
    read(e, [("M0", T0, 0)])
    read(e, [("M0", T0 + HOUR, 10)])
    out = pay(e, "A0", 10_000, T0 + 2 * HOUR)
    assert kinds(out) == [("A0", K.CANCEL_TRIP, 0)]


def test_partial_payment_below_close_level_does_nothing():
    e = engine(1)
    read(e, [("M0", T0, 0)])
    read(e, [("M0", T0 + HOUR, 10)])  # -500 fen
    e.apply_relay_states([RelayStateChanged("M0", True, T0 + HOUR)])
    assert kinds(pay(e, "A0", 300, T0 + 2 * HOUR)) == []  # still -200
    assert kinds(pay(e, "A0", 300, T0 + 3 * HOUR)) == []  # +100: inside the hysteresis above the trip level
    assert kinds(pay(e, "A0", 500, T0 + 4 * HOUR))[0][1] == K.CLOSE  # +600


def test_no_trip_close_chatter_around_zero():
    e = engine(1)
    pay(e, "A0", 10, T0)
    read(e, [("M0", T0, 0)])
    seen = []
    for i in range(5):  # -10 by a reading, +10 by a payment of 20 fen, again and again
        seen += kinds(read(e, [("M0", T0 + (i + 1) * HOUR, 0.4 * (i + 1))]))
        seen += kinds(pay(e, "A0", 20, T0 + (i + 1) * HOUR + 60, f"w{i}"))
    assert [k for _, k, _ in seen].count(K.TRIP) == 1
    assert K.CANCEL_TRIP not in [k for _, k, _ in seen]


def test_close_level_above_warning_2_holds_the_account_until_reached():
    from gateway.core.engine import Engine
    from gateway.core.thresholds import ThresholdPolicy
    from .core_fixtures import tariffs
    e = Engine(tariffs(), ThresholdPolicy(close_margin_fen=3000, hysteresis_fen=500))
    e.add_accounts([Account("A0", tariff_id="flat")])
    e.add_meters([Meter("M0", "A0")])
    read(e, [("M0", T0, 0)])
    read(e, [("M0", T0 + HOUR, 2)])  # -100: trip
    e.apply_relay_states([RelayStateChanged("M0", True, T0 + HOUR)])
    assert kinds(pay(e, "A0", 2700, T0 + 2 * HOUR)) == []  # 2600: above warning 2 + h, below close 3000
    assert kinds(pay(e, "A0", 500, T0 + 3 * HOUR))[0][1] == K.CLOSE


def test_protected_and_vip_accounts_get_an_account_manager_task_not_a_trip():
    for klass in (CustomerClass.PROTECTED, CustomerClass.VIP):
        e = engine(1, klass=klass)
        pay(e, "A0", 1000, T0)
        read(e, [("M0", T0, 0)])
        out = read(e, [("M0", T0 + DAY, 100)])
        assert kinds(out)[-1] == ("A0", K.ACCOUNT_MANAGER, 3)
        assert K.TRIP not in [d.kind for d in out.decisions]


def test_overdraft_limit_moves_the_trip_level():
    e = engine(1, overdraft=2000)
    read(e, [("M0", T0, 0)])
    out = read(e, [("M0", T0 + HOUR, 30)])  # -1500 fen: inside the overdraft
    assert K.TRIP not in [d.kind for d in out.decisions]
    assert kinds(read(e, [("M0", T0 + 2 * HOUR, 40)]))[-1] == ("A0", K.TRIP, 3)


def test_bad_readings_are_held_not_charged():
    e = engine(1)
    pay(e, "A0", 100_000, T0)
    read(e, [("M0", T0, 100)])
    out = read(e, [("M0", T0 + HOUR, 99)])
    assert out.held[0][3] == "backwards"
    out = read(e, [("M0", T0 + HOUR, 130)])  # 30 kWh in an hour on a 20 kW meter
    assert out.held[0][3] == "implausible_jump"
    read(e, [("M0", T0 + 2 * HOUR, 101)])
    out = read(e, [("M0", T0 + HOUR, 100.5)])  # older than the last accepted reading
    assert out.held[0][3] == "out_of_order"
    out = read(e, [("M0", T0 + 2 * HOUR, 101)])  # the same reading again
    assert out.duplicates == 1 and out.held == [] and out.accepted_count == 0
    assert e.cost[0] == 1000 * 50_000  # only the 1 kWh that was plausible
    out = read(e, [("NOPE", T0, 1)])
    assert out.held[0][3] == "unknown_meter"


def test_meter_replacement_resets_the_baseline():
    e = engine(1)
    pay(e, "A0", 100_000, T0)
    read(e, [("M0", T0, 5000)])
    e.replace_meter(MeterReplaced("M0", T0 + HOUR, (0, 0, 0, 0, 0)))
    out = read(e, [("M0", T0 + 2 * HOUR, 2)])
    assert out.held == [] and e.cost[0] == 2000 * 50_000


def test_several_readings_of_one_meter_in_one_batch_apply_in_time_order():
    e = engine(2)
    pay(e, "A0", 100_000, T0)
    out = read(e, [("M0", T0 + 2 * HOUR, 2), ("M1", T0, 0), ("M0", T0, 0), ("M0", T0 + HOUR, 1)])
    assert out.held == [] and out.accepted_count == 4
    assert e.cost[0] == 2000 * 50_000


def test_account_with_two_meters_sums_both():
    from gateway.core.engine import Engine
    from .core_fixtures import POLICY, tariffs
    e = Engine(tariffs(), POLICY)
    e.add_accounts([Account("A", tariff_id="flat")])
    e.add_meters([Meter("M1", "A"), Meter("M2", "A")])
    read(e, [("M1", T0, 0), ("M2", T0, 0)])
    read(e, [("M1", T0 + HOUR, 1), ("M2", T0 + HOUR, 3)])
    assert e.cost[0] == 4000 * 50_000


def test_time_of_use_readings_charge_per_register():
    e = engine(1, "tou")
    read(e, [("M0", T0, 0, (0, 0, 0, 0))])
    read(e, [("M0", T0 + DAY, 10, (1, 2, 3, 4))])
    assert e.cost[0] == (1 * 100_000 + 2 * 80_000 + 3 * 50_000 + 4 * 30_000) * 1000


def test_local_mode_uses_the_meters_purse_and_later_payments():
    e = engine(1, mode=CostControlMode.LOCAL)
    out = read(e, [("M0", T0, 0, None, 6000)])
    assert e.balance_of("A0") == 6000 and e.cost[0] == 0
    out = read(e, [("M0", T0 + DAY, 10, None, 1500)])  # the meter says 15 yuan left
    assert kinds(out) == [("A0", K.NOTICE, 1), ("A0", K.NOTICE, 2)]
    read(e, [("M0", T0 + 2 * DAY, 12, None, -10)])
    assert e.state[0] == 3
    e.apply_relay_states([RelayStateChanged("M0", True, T0 + 2 * DAY)])
    out = pay(e, "A0", 5000, T0 + 3 * DAY)  # paid: close before the meter's purse is even topped up
    assert kinds(out) == [("A0", K.CLOSE, 1)]


def test_local_payment_is_not_lost_at_a_poll_before_the_top_up_reaches_the_meter():
    e = engine(1, mode=CostControlMode.LOCAL)
    read(e, [("M0", T0, 0, None, 100)])
    read(e, [("M0", T0 + HOUR, 1, None, -10)])
    e.apply_relay_states([RelayStateChanged("M0", True, T0 + HOUR)])
    assert kinds(pay(e, "A0", 5000, T0 + 2 * HOUR))[0][1] == K.CLOSE
    out = read(e, [("M0", T0 + 3 * HOUR, 1, None, -10)])  # the top-up has not reached the meter yet
    assert kinds(out) == [] and e.balance_of("A0") == 4990
    read(e, [("M0", T0 + 4 * HOUR, 1, None, 4985)])  # now it has (less 5 fen used meanwhile)
    assert e.balance_of("A0") == 4985
    read(e, [("M0", T0 + 5 * HOUR, 1, None, 4900)])  # plain use afterwards
    assert e.balance_of("A0") == 4900
    # two payments, the meter gets the first top-up only: the second stays pending
    pay(e, "A0", 5000, T0 + 6 * HOUR)
    pay(e, "A0", 3000, T0 + 6 * HOUR + 1)
    read(e, [("M0", T0 + 7 * HOUR, 1, None, 9890)])
    assert e.balance_of("A0") == 12_900  # 3000 pending plus 10 fen used meanwhile, settled at the next rise
    read(e, [("M0", T0 + 8 * HOUR, 1, None, 12_880)])
    assert e.balance_of("A0") == 12_880


def test_adjustment_and_refund_move_the_balance():
    e = engine(1)
    e.apply_credits([Adjustment("adj1", "A0", 10_000, T0, "op7", "estimated bill corrected")], T0)
    e.apply_credits([Adjustment("ref1", "A0", -2_000, T0, "op7", "overpayment returned", kind="refund")], T0)
    assert e.balance_of("A0") == 8000


def test_recalibration_reevaluates_every_account_in_one_pass():
    e = engine(1000)
    e.apply_credits([Payment(f"p{i}", f"A{i}", 4000, T0) for i in range(1000)], T0)  # all warned (w1=5000)
    assert (e.state == 1).all()
    # cheap customers: warning 1 drops to the 2000 fen floor, so everyone is back to normal...
    out = e.recalibrate(np.full(1000, 100), T0 + DAY)
    assert (e.state == 0).all() and out.decisions == []
    # ...and heavy users' warning levels rise above their balance: one notice each
    out = e.recalibrate(np.full(1000, 1000), T0 + 2 * DAY)
    assert len(out.decisions) == 1000 and {d.kind for d in out.decisions} == {K.NOTICE}


def test_reading_batch_from_rows():
    b = ReadingBatch.from_rows([(0, 10, 1, 2, 3, 4, 5)])
    assert b.regs.tolist() == [[1, 2, 3, 4, 5]] and b.balance_fen is None


def test_time_of_use_registers_are_checked_for_plausibility_too():
    e = engine(1, "tou")
    pay(e, "A0", 100_000, T0)
    read(e, [("M0", T0, 0, (0, 0, 0, 0))])
    out = read(e, [("M0", T0 + HOUR, 1, (10_000, 0, 0, 0))])  # sharp register jumped 10,000 kWh
    assert out.held[0][3] == "implausible_jump" and e.cost[0] == 0
    out = read(e, [("M0", T0 + HOUR, 1, (0.5, 0.5, 0.5, 0))])  # T1..T4 moved more than the total
    assert out.held[0][3] == "implausible_jump"


def test_meter_replacement_is_idempotent_and_never_rolls_readings_back():
    import pytest
    e = engine(1)
    pay(e, "A0", 100_000, T0)
    read(e, [("M0", T0, 9000)])
    swap = MeterReplaced("M0", T0 + HOUR, (0, 0, 0, 0, 0))
    e.replace_meter(swap)
    assert e.replace_meter(swap).duplicates == 1  # re-delivered: nothing changes
    read(e, [("M0", T0 + 2 * HOUR, 1)])
    with pytest.raises(ValueError, match="not after its last reading"):
        e.replace_meter(swap)
    read(e, [("M0", T0 + 3 * HOUR, 3)])
    assert e.cost[0] == 3000 * 50_000


def test_money_must_be_whole_numbers():
    import pytest
    from gateway.core.model import MoneyError
    for bad in (50.7, True, "100"):
        with pytest.raises(MoneyError, match="whole number"):
            Payment("p", "A0", bad, T0)
    with pytest.raises(MoneyError, match="paid_at"):
        Payment("p", "A0", 100, 1.5)
