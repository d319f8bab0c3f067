"""The store and the accounting shell, the same tests on SQLite and on a real PostgreSQL server."""
import numpy as np
import pytest

from gateway.accounting import Accounting
from gateway.core.engine import DecisionKind as K
from gateway.core.engine import ReadingBatch
from gateway.core.model import (Account, Adjustment, CostControlMode, CustomerClass, Meter, MeterReplaced,
                                 Payment, RelayStateChanged)
from gateway.store import StoreError, open_store

from .core_fixtures import DAY, HOUR, POLICY, T0, tariffs


@pytest.fixture
def acc(store_url):
    store = open_store(store_url)
    a = Accounting(store, POLICY)
    a.register(tariffs(), [Account(f"A{i}", tariff_id="tiered" if i == 2 else "flat", area="north",
                                   address=f"{i} Main St", lat=31.2, lon=121.5) for i in range(3)]
               + [Account("L0", mode=CostControlMode.LOCAL, tariff_id="flat"),
                  Account("P0", CustomerClass.PROTECTED, tariff_id="flat")],
               [Meter(f"M{i}", f"A{i}", max_kw=20) for i in range(3)] + [Meter("ML", "L0"), Meter("MP", "P0")])
    yield a
    store.close()


def batch(acc, rows):
    e = acc.engine
    return ReadingBatch.from_rows([(e.meter_no[m], t, round(kwh * 1000), 0, 0, 0, 0) for m, t, kwh in rows])


def test_migrations_are_versioned_and_idempotent(store_url):
    store = open_store(store_url)
    assert store.migrate() == 6 and store.schema_version() == 6
    assert store.migrate() == 6  # running again changes nothing
    with store.transaction():
        store._execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match="newer than this feikong"):
        store.migrate()
    store.close()


def test_registry_round_trips(acc):
    store = acc.store
    assert [a.account_id for a in store.load_accounts()] == ["A0", "A1", "A2", "L0", "P0"]
    a0 = store.load_accounts()[0]
    assert (a0.address, a0.lat, a0.area) == ("0 Main St", 31.2, "north")
    assert [m.meter_id for m in store.load_meters()] == ["M0", "M1", "M2", "ML", "MP"]
    t = store.load_tariffs()
    assert t["tiered"].versions[0].tiers == tariffs()["tiered"].versions[0].tiers


def test_duplicate_payment_is_acknowledged_and_not_counted(acc):
    p = Payment("pay-1", "A0", 5000, T0)
    r1 = acc.ingest_credits([p], T0)
    r2 = acc.ingest_credits([p], T0 + 1)
    assert r1.credits.new == [p] and r2.credits.new == [] and r2.credits.duplicates == [p]
    assert acc.engine.balance_of("A0") == 5000
    # a duplicate inside one batch too
    r3 = acc.ingest_credits([Payment("pay-2", "A0", 100, T0), Payment("pay-2", "A0", 100, T0)], T0)
    assert len(r3.credits.new) == 1 and len(r3.credits.duplicates) == 1
    assert acc.store.counts()["ledger"] == 2


def test_same_payment_id_with_different_content_is_a_conflict_not_a_credit(acc):
    acc.ingest_credits([Payment("pay-1", "A0", 5000, T0)], T0)
    r = acc.ingest_credits([Payment("pay-1", "A0", 9000, T0), Payment("pay-9", "NOPE", 100, T0)], T0)
    assert r.credits.new == []
    reasons = {item.payment_id: why for item, why in r.credits.conflicts}
    assert "already used for payment of 5000 fen" in reasons["pay-1"]
    assert "unknown account 'NOPE'" in reasons["pay-9"]
    assert acc.engine.balance_of("A0") == 5000


def test_statement_shows_oldest_first_allocation(acc):
    acc.ingest_readings(batch(acc, [("M0", T0, 0)]), T0)
    acc.ingest_readings(batch(acc, [("M0", T0 + DAY, 10)]), T0 + DAY)  # 500 fen
    acc.ingest_readings(batch(acc, [("M0", T0 + 2 * DAY, 30)]), T0 + 2 * DAY)  # 1000 fen
    acc.ingest_credits([Payment("pay-1", "A0", 800, T0 + 3 * DAY)], T0 + 3 * DAY)
    st = acc.store.statement("A0")
    assert st.balance_fen == -700 == acc.engine.balance_of("A0")
    first, second = [e.entry_id for e in st.entries if e.kind == "charge"]
    assert [(a.debit_id, a.amount_fen) for a in st.settles("pay-1")] == [(first, 500), (second, 300)]
    assert st.arrears == [(second, 700)]


def test_decisions_are_committed_with_their_cause(acc):
    acc.ingest_credits([Payment("p", "A0", 6000, T0)], T0)
    acc.ingest_readings(batch(acc, [("M0", T0, 0)]), T0)
    r = acc.ingest_readings(batch(acc, [("M0", T0 + DAY, 150)]), T0 + DAY)
    assert [d.kind for d in r.decisions] == [K.NOTICE, K.NOTICE, K.TRIP]
    stored = acc.store.decisions("A0")
    assert [row[0] for row in stored] == ["A0#1", "A0#2", "A0#3"]
    assert stored[2][2] == "trip_request" and stored[2][4] == 6000 - 7500


def test_held_readings_are_stored_for_review(acc):
    acc.ingest_readings(batch(acc, [("M0", T0, 100)]), T0)
    r = acc.ingest_readings(batch(acc, [("M0", T0 + HOUR, 90), ("M1", T0, 0)]), T0 + HOUR)
    assert r.held == 1 and r.accepted == 1
    assert acc.store.held_readings() == [("M0", T0 + HOUR, "[90000, 0, 0, 0, 0]", "backwards")]


def test_redelivered_old_readings_are_duplicates_not_out_of_order(acc):
    for d in range(3):
        acc.ingest_readings(batch(acc, [("M0", T0 + d * DAY, d)]), T0 + d * DAY)
    r = acc.ingest_readings(batch(acc, [("M0", T0, 0), ("M0", T0 + DAY, 1), ("M0", T0 + DAY // 2, 0.5)]),
                            T0 + 3 * DAY)
    assert r.duplicates == 2 and r.held == 1  # the one never seen before is out of order


def test_restart_rebuilds_the_same_engine(acc, store_url):
    acc.ingest_credits([Payment("p0", "A0", 3000, T0), Payment("p2", "A2", 999_999, T0)], T0)
    acc.ingest_readings(batch(acc, [("M0", T0, 0), ("M2", T0, 0), ("ML", T0, 0)]), T0)
    acc.ingest_readings(batch(acc, [("M0", T0 + DAY, 70), ("M2", T0 + DAY, 2500)]), T0 + DAY)
    acc.ingest_credits([Payment("pl0", "L0", 1000, T0)], T0)  # opening credit, already in the purse
    lb = ReadingBatch.from_rows([(acc.engine.meter_no["ML"], T0 + DAY, 5000, 0, 0, 0, 0, 1234)])
    acc.ingest_readings(lb, T0 + DAY)
    acc.ingest_relay_states([RelayStateChanged("M0", True, T0 + DAY)], T0 + DAY)
    acc.ingest_credits([Adjustment("adj", "A1", 700, T0, "op1", "goodwill")], T0 + DAY)
    # a local customer pays; the next purse reading does not show the top-up yet: it stays pending
    acc.ingest_credits([Payment("pl", "L0", 3000, T0 + DAY)], T0 + DAY)
    lb2 = ReadingBatch.from_rows([(acc.engine.meter_no["ML"], T0 + DAY + HOUR, 5001, 0, 0, 0, 0, 1200)])
    acc.ingest_readings(lb2, T0 + DAY + HOUR)
    acc.ingest_relay_states([RelayStateChanged("M1", False, T0 + DAY, False, True)], T0 + DAY)  # keep-power on
    acc.tick(T0 + DAY + HOUR)  # calibrated levels must come back too
    acc.reevaluate(T0 + DAY)  # the accounts nothing touched yet get their first evaluation
    before = acc.engine
    again = Accounting(open_store(store_url), POLICY)
    after = again.engine
    assert before.credits_at_read[3] == 1000 and before.balance_of("L0") == 4200  # the pending 3000 counted
    for name in ("credits", "cost", "state", "seq", "ytd_wh", "ytd_year", "ytd_prev_wh", "meter_bal",
                 "credits_at_read", "m_last_t", "m_regs", "m_relay_open", "m_keep_power", "m_commanded"):
        assert np.array_equal(getattr(before, name), getattr(after, name)), name
    for name in ("warn1", "warn2", "trip", "close"):
        assert np.array_equal(getattr(before.levels, name), getattr(after.levels, name)), name
    assert np.array_equal(before.balance(), after.balance())
    assert again.reevaluate(T0 + 2 * DAY).decisions == []  # nothing was pending
    # the next payment closes the relay that was open before the restart
    r = again.ingest_credits([Payment("p1", "A0", 10_000, T0 + 2 * DAY)], T0 + 2 * DAY)
    assert [d.kind for d in r.decisions] == [K.CLOSE]
    again.store.close()


def test_meter_replacement_persists_the_new_baseline(acc, store_url):
    acc.ingest_readings(batch(acc, [("M0", T0, 9000)]), T0)
    acc.replace_meter(MeterReplaced("M0", T0 + HOUR, (0, 0, 0, 0, 0)), T0 + HOUR)
    again = Accounting(open_store(store_url), POLICY)
    r = again.ingest_readings(batch(again, [("M0", T0 + 2 * HOUR, 1)]), T0 + 2 * HOUR)
    assert r.held == 0 and again.engine.cost[0] == 1000 * 50_000
    again.store.close()


def test_recalibration_uses_history(acc):
    acc.ingest_credits([Payment("p", "A0", 100_000, T0)], T0)
    for d in range(31):
        acc.ingest_readings(batch(acc, [("M0", T0 + d * DAY, 20 * d)]), T0 + d * DAY)  # 1000 fen a day
    acc.recalibrate(T0 + 31 * DAY)
    assert acc.engine.levels.warn1[0] == 7000 and acc.engine.levels.warn2[0] == 3000


def test_failed_transaction_leaves_engine_as_store(acc):
    acc.ingest_credits([Payment("p", "A0", 5000, T0)], T0)
    def boom(*a, **k):
        raise RuntimeError("disk full")
    acc.store.write_outcome = boom
    with pytest.raises(RuntimeError):
        acc.ingest_credits([Payment("p2", "A0", 5000, T0)], T0)
    del acc.store.write_outcome
    assert acc.engine.balance_of("A0") == 5000  # the engine was rebuilt from what is durable
    assert acc.store.counts()["ledger"] == 1


def test_bad_store_urls_are_clear():
    with pytest.raises(ValueError, match="sqlite:///PATH or postgresql://"):
        open_store("mysql://x")
    with pytest.raises(ConnectionError, match="cannot connect to PostgreSQL"):
        open_store("postgresql://nobody@127.0.0.1:1/none")


def test_a_version_1_database_is_upgraded_in_place(store_url):
    from gateway.store import base
    saved = base.MIGRATIONS[:]
    del base.MIGRATIONS[1:]
    try:
        store = open_store(store_url)
        assert store.migrate() == 1
        with store.transaction():
            store.save_tariffs(tariffs())
        store.close()
    finally:
        base.MIGRATIONS[:] = saved
    store = open_store(store_url)
    assert store.schema_version() == 1
    assert store.migrate() == 6
    assert "flat" in store.load_tariffs() and store.last_calibration() is None
    store.close()


def test_a_version_2_database_with_data_is_upgraded_to_the_newest(store_url):
    """Meters get the direct reconnect mode, relay rows keep their position, account states their bands."""
    from gateway.store import base
    saved = base.MIGRATIONS[:]
    del base.MIGRATIONS[2:]
    try:
        store = open_store(store_url)
        assert store.migrate() == 2
        with store.transaction():
            store.save_tariffs(tariffs())
            store.save_accounts([Account("A0", tariff_id="flat")], {"A0": 0})
        store._execute("INSERT INTO meters (meter_no, meter_id, account_no, protocol, channel, max_kw) "
                       "VALUES (0, 'M0', 0, 'dlt645', 'tcp://x', 20)")
        store._execute("INSERT INTO relay_state (meter_no, is_open, at) VALUES (0, 1, ?)", (T0,))
        store._execute("INSERT INTO account_state (account_no, state, seq, notice_confirmed_at) VALUES (0, 3, 4, ?)",
                       (T0,))
        store.close()
    finally:
        base.MIGRATIONS[:] = saved
    store = open_store(store_url)
    acc = Accounting(store, POLICY)
    assert store.schema_version() == 6
    assert store.load_meters()[0].reconnect_mode == "direct"
    assert store.relay_row("M0") == (1, T0, None, 0)
    assert (acc.engine.state[0], acc.engine.seq[0], acc.engine.m_relay_open[0]) == (3, 4, True)
    store.close()


def test_calibrated_levels_survive_a_restart_and_follow_the_schedule(acc, store_url):
    acc.ingest_credits([Payment("p", "A0", 100_000, T0)], T0)
    for d in range(8):
        acc.ingest_readings(batch(acc, [("M0", T0 + d * DAY, 20 * d)]), T0 + d * DAY)  # 1000 fen a day
    assert [d for d in acc.tick(T0 + 8 * DAY).decisions if d.account_id == "A0"] == []
    assert acc.engine.levels.warn1[0] == 7000
    assert acc.store.last_calibration() == T0 + 8 * DAY
    again = Accounting(open_store(store_url), POLICY)
    assert again.engine.levels.warn1[0] == 7000 and again.engine.levels.warn2[0] == 3000
    # not due again until a day has passed: the next tick changes nothing
    again.ingest_readings(batch(again, [("M0", T0 + 9 * DAY, 200)]), T0 + 9 * DAY)  # a heavy day
    again.tick(T0 + 8 * DAY + 3600)
    assert again.engine.levels.warn1[0] == 7000
    again.tick(T0 + 9 * DAY + 1)
    assert again.engine.levels.warn1[0] > 7000
    again.store.close()


def test_tariff_change_recalibrates_and_reevaluates_everyone(acc):
    from gateway.core.tariff import Tariff
    acc.ingest_credits([Payment(f"p{i}", f"A{i}", 6000, T0) for i in range(2)], T0)
    for d in range(8):
        acc.ingest_readings(batch(acc, [("M0", T0 + d * DAY, 2 * d), ("M1", T0 + d * DAY, 2 * d)]), T0 + d * DAY)
    acc.tick(T0 + 8 * DAY)  # 100 fen a day: levels at their floors, balances 5300: normal
    assert acc.engine.state[0] == 0
    dearer = {"flat": Tariff.from_config("flat", [{"effective_from": 0, "kind": "flat", "price": "0.5000"},
                                                   {"effective_from": T0 + 8 * DAY, "kind": "flat",
                                                    "price": "20.0000"}])}
    acc.change_tariffs(dearer, T0 + 8 * DAY + 60)
    assert acc.store.last_calibration() == T0 + 8 * DAY + 60  # recalibrated, every account re-evaluated
    assert len(acc.engine.transitions()[0]) == 0
    acc.ingest_readings(batch(acc, [("M0", T0 + 9 * DAY, 16), ("M1", T0 + 9 * DAY, 16)]), T0 + 9 * DAY)
    # 14 kWh at the old price; the 2 kWh interval across the change half at each price
    assert acc.engine.cost[0] == 14_000 * 50_000 + 1_000 * 50_000 + 1_000 * 2_000_000
    acc.tick(T0 + 9 * DAY + 60)  # a day on: the dearer day lifts the warning levels at the next calibration
    assert acc.engine.levels.warn1[0] > 2000


def test_statement_for_a_period_continues_the_fen_steps(acc):
    # 0.6 fen a day: the whole fen falls due on day 2 and day 4
    acc.ingest_readings(batch(acc, [("M0", T0, 0)]), T0)
    for d in range(1, 5):
        acc.ingest_readings(batch(acc, [("M0", T0 + d * DAY, 0.012 * d)]), T0 + d * DAY)
    whole = acc.store.statement("A0")
    assert [(e.at - T0) // DAY for e in whole.entries] == [2, 4]
    for since_day, expected in ((1, [2, 4]), (2, [2, 4]), (3, [4])):
        st = acc.store.statement("A0", since=T0 + since_day * DAY)
        assert [(e.at - T0) // DAY for e in st.entries] == expected, since_day


def test_decisions_are_listed_in_sequence(acc):
    acc.ingest_credits([Payment("p", "A0", 6000, T0)], T0)
    acc.ingest_readings(batch(acc, [("M0", T0, 0)]), T0)
    for i in range(8):  # run down, pay back, run down again ...: more than nine decisions for one account
        acc.ingest_readings(batch(acc, [("M0", T0 + (i + 1) * DAY, 150 * (i + 1))]), T0 + (i + 1) * DAY)
        acc.ingest_credits([Payment(f"q{i}", "A0", 7_500, T0)], T0 + (i + 1) * DAY + HOUR)
    ids = [row[0] for row in acc.store.decisions("A0")]
    assert len(ids) > 10 and ids == sorted(ids, key=lambda x: int(x.split("#")[1]))


def test_readings_from_unknown_meters_are_listed_for_review(acc):
    acc.ingest_readings(ReadingBatch.from_rows([(999, T0, 1, 0, 0, 0, 0)]), T0)
    assert acc.store.held_readings() == [("999", T0, "[1, 0, 0, 0, 0]", "unknown_meter")]
    assert acc.ingest_readings(ReadingBatch.from_rows([]), T0).accepted == 0


def test_unknown_ids_in_event_batches_are_reported_not_fatal(acc):
    r = acc.ingest_relay_states([RelayStateChanged("NOPE", True, T0), RelayStateChanged("M0", True, T0)], T0)
    assert [why for _, why in r.rejected] == ["unknown meter 'NOPE'"]
    assert acc.engine.m_relay_open[acc.engine.meter_no["M0"]]


def test_a_failed_rebuild_is_retried_before_any_more_work(acc):
    acc.ingest_credits([Payment("p", "A0", 5000, T0)], T0)
    calls = {"n": 0}
    real_reload = acc.reload

    def flaky_reload():
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("database gone")
        real_reload()

    acc.reload = flaky_reload
    acc.store.write_outcome = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full"))
    with pytest.raises(RuntimeError):
        acc.ingest_credits([Payment("p2", "A0", 5000, T0)], T0)
    del acc.store.write_outcome
    assert acc.engine.balance_of("A0") == 10_000  # still ahead of the store...
    acc.ingest_credits([Payment("p3", "A0", 1, T0)], T0)  # ...so the next call rebuilds first
    assert calls["n"] == 2 and acc.engine.balance_of("A0") == 5001
