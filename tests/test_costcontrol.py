"""The cost-control shell on real SQLite and PostgreSQL: one transaction per input, restarts, the outbox."""
import dataclasses

import pytest

from gateway.core.commands import CommandState, RelayAction, RelayStatus, StepKind
from gateway.core.control import AuthorityError, NoticeReceiptIn, SendResult
from gateway.core.engine import ReadingBatch
from gateway.core.model import Meter, Payment
from gateway.core.notices import ReceiptOutcome
from gateway.costcontrol import CostControl
from gateway.store import open_store
from gateway.store.entities import ENTITY_TABLES

from .control_fixtures import MONDAY, Ids, account
from .core_fixtures import POLICY, tariffs

HOUR = 3600


def setup(store_url, now=MONDAY) -> CostControl:
    cc = CostControl(open_store(store_url), policy=POLICY, now=now, new_id=Ids())
    cc.accounting.register(tariffs(), [account(i) for i in range(3)],
                           [Meter(f"M{i}", f"A{i}", channel="tcp://bus-1", max_kw=20) for i in range(3)])
    return cc


def regs(cc, rows):
    e = cc.engine
    return ReadingBatch.from_rows([(e.meter_no[m], int(t), round(kwh * 1000), 0, 0, 0, 0) for m, t, kwh in rows])


def snapshot(c) -> dict:
    """The controller's state as comparable plain data."""
    return {name: {k: dataclasses.asdict(v) for k, v in getattr(c, name).items()}
            for name in ("notices", "cases", "commands", "orders")} | {"relays": dict(c.relays)}


def test_entity_tables_have_exactly_their_dataclass_fields(store_url):
    store = open_store(store_url)
    store.migrate()
    for table in ENTITY_TABLES:
        if store.dialect == "sqlite":
            cols = [r[1] for r in store._query(f"PRAGMA table_info({table.name})")]
        else:
            cols = [r[0] for r in store._query("SELECT column_name FROM information_schema.columns WHERE "
                                               "table_name = ? AND table_schema = current_schema() "
                                               "ORDER BY ordinal_position", (table.name,))]
        assert cols == list(table.columns), table.name
    store.close()


def test_a_payment_and_the_close_it_causes_commit_together(store_url):
    cc = setup(store_url)
    cc.ingest_readings(regs(cc, [("M0", MONDAY - 2 * HOUR, 0)]), MONDAY - 2 * HOUR)
    cc.ingest_credits([Payment("p0", "A0", 100, MONDAY - HOUR)], MONDAY - HOUR)
    cc.ingest_readings(regs(cc, [("M0", MONDAY, 10)]), MONDAY)  # 5 yuan of use: below zero
    assert cc.engine.balance_of("A0") == -400
    # the engine made a trip request; the controller asked for a notice of disconnection (no warning confirmed)
    assert cc.store.load_entities(ENTITY_TABLES[1], "account_id = 'A0'")[0].gate == "notice"
    # the relay is seen open by the next poll (the meter's own protection, say): a verified position
    cc.ingest_readings(regs(cc, [("M0", MONDAY + 60, 10)]), MONDAY + 60,
                       relays=[("M0", RelayStatus(True, True), MONDAY + 60)])
    r = cc.ingest_credits([Payment("p1", "A0", 5000, MONDAY + 100)], MONDAY + 120)
    assert [d.kind.value for d in r.decisions] == ["close_request"]
    rows = cc.store.load_entities(ENTITY_TABLES[2], "account_id = 'A0'")
    assert len(rows) == 1 and rows[0].action == RelayAction.CLOSE and rows[0].deadline_at == MONDAY + 100 + 86400
    kinds = [e[2] for e in cc.store.outbox()]
    assert "relay_requested" in kinds and "disconnect_case_cancelled" in kinds and "notice_request" in kinds
    # the same payment again: acknowledged, nothing new
    r = cc.ingest_credits([Payment("p1", "A0", 5000, MONDAY + 100)], MONDAY + 130)
    assert r.decisions == [] and r.credits.duplicates
    assert len(cc.store.load_entities(ENTITY_TABLES[2], "account_id = 'A0'")) == 1
    cc.store.close()


def test_a_restart_rebuilds_the_same_controller(store_url):
    cc = setup(store_url)
    cc.ingest_credits([Payment("p1", "A1", 4000, MONDAY - 2 * HOUR)], MONDAY - 2 * HOUR)
    cc.ingest_readings(regs(cc, [("M0", MONDAY - HOUR, 0), ("M1", MONDAY - HOUR, 0)]), MONDAY - HOUR)
    cc.ingest_readings(regs(cc, [("M0", MONDAY, 10), ("M1", MONDAY, 1)]), MONDAY)  # A0 at zero, A1 warned
    requests = [e[5] for e in cc.store.outbox() if e[2] == "notice_request"]
    assert {r["purpose"] for r in requests} == {"disconnect", "warning_1"}
    cc.ingest_receipts([NoticeReceiptIn(requests[0]["request_id"], ReceiptOutcome.DELIVERED, MONDAY + 60)],
                       MONDAY + 60)
    cc.tick(MONDAY + 2 * HOUR)
    cc.manual("M2", RelayAction.TRIP, "wang", "supervisor", "tampering", "req-9", MONDAY + 2 * HOUR)
    step = next(s for s in cc.steps(MONDAY + 2 * HOUR) if s.meter_id == "M2")
    permit = cc.authorize(step.subject_id, MONDAY + 2 * HOUR)
    assert permit.action == RelayAction.TRIP
    before = snapshot(cc.controller)
    cc.store.close()
    again = CostControl(open_store(store_url), policy=POLICY, now=MONDAY + 2 * HOUR + 1)
    after = snapshot(again.controller)
    # a command found SENDING after a restart is read back before anything is sent again
    sending = before["commands"].pop("manual:req-9:M2")
    recovered = after["commands"].pop("manual:req-9:M2")
    assert sending["state"] == CommandState.SENDING and recovered["state"] == CommandState.VERIFYING
    assert "restarted while sending" in recovered["last_error"]
    assert before == after
    steps = again.steps(MONDAY + 2 * HOUR + 1)
    assert [(s.kind, s.meter_id) for s in steps if s.meter_id == "M2"] == [(StepKind.READ, "M2")]
    again.store.close()


def test_a_failed_transaction_leaves_memory_as_the_store_says(store_url, monkeypatch):
    cc = setup(store_url)
    cc.ingest_readings(regs(cc, [("M0", MONDAY - HOUR, 0)]), MONDAY - HOUR)
    cc.ingest_readings(regs(cc, [("M0", MONDAY, 10)]), MONDAY, relays=[("M0", RelayStatus(True, True), MONDAY)])
    before = snapshot(cc.controller)

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cc.store, "write_effects", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        cc.ingest_credits([Payment("p1", "A0", 5000, MONDAY + 100)], MONDAY + 120)
    monkeypatch.undo()
    assert snapshot(cc.controller) == before  # no close command in memory that the store does not have
    assert cc.engine.balance_of("A0") < 0  # and the payment was not counted: it was not committed
    r = cc.ingest_credits([Payment("p1", "A0", 5000, MONDAY + 100)], MONDAY + 130)  # re-delivered: applied now
    assert [d.kind.value for d in r.decisions] == ["close_request"]
    cc.store.close()


def test_manual_refusals_are_audited_and_why_explains_the_meter(store_url):
    cc = setup(store_url)
    with pytest.raises(AuthorityError, match="role 'viewer' may not trip"):
        cc.manual("M1", RelayAction.TRIP, "zhou", "viewer", "curious", "r1", MONDAY)
    audit = cc.store.audit_log("M1")
    assert [(a[2], a[4]) for a in audit] == [("zhou", "manual_trip_refused")]
    cmd = cc.manual("M1", RelayAction.TRIP, "wang", "supervisor", "meter bypass found", "r2", MONDAY)
    assert cc.manual("M1", RelayAction.TRIP, "wang", "supervisor", "again", "r2", MONDAY + 5).command_id == \
        cmd.command_id
    step = cc.steps(MONDAY)[0]
    cc.authorize(step.subject_id, MONDAY)
    cc.send_result(step.subject_id, MONDAY + 0.3, SendResult.ACKNOWLEDGED)
    read = cc.steps(MONDAY + 1)[0]
    cc.read_result(read, MONDAY + 1, RelayStatus(True, True, False))
    why = cc.why("M1")
    assert why.relay == "open" and why.opened_by_gateway and why.actor == "wang" and why.role == "supervisor"
    assert "operator wang (supervisor)" in why.summary and "meter bypass found" in why.summary
    assert cc.why("M0").relay == "unknown"
    with pytest.raises(KeyError, match="unknown meter 'NOPE'"):
        cc.why("NOPE")
    actions = [a[4] for a in cc.store.audit_log("M1")]
    assert actions == ["manual_trip_refused", "relay_trip_requested", "relay_trip_sent", "relay_trip_confirmed"]
    cc.store.close()


def test_a_rebuild_that_fails_is_retried_before_any_more_work(store_url, monkeypatch):
    cc = setup(store_url)
    cc.ingest_readings(regs(cc, [("M0", MONDAY - HOUR, 0)]), MONDAY - HOUR)
    cc.ingest_readings(regs(cc, [("M0", MONDAY, 10)]), MONDAY, relays=[("M0", RelayStatus(True, True), MONDAY)])
    real_reload, real_write = cc.accounting.reload, cc.store.write_effects

    def fail(*a, **k):
        raise RuntimeError("connection lost")

    monkeypatch.setattr(cc.store, "write_effects", fail)
    monkeypatch.setattr(cc.accounting, "reload", fail)
    with pytest.raises(RuntimeError):
        cc.ingest_credits([Payment("p1", "A0", 5000, MONDAY + 100)], MONDAY + 120)
    assert cc._stale  # memory may be ahead of the store: nothing more until it is rebuilt
    monkeypatch.setattr(cc.store, "write_effects", real_write)
    monkeypatch.setattr(cc.accounting, "reload", real_reload)
    r = cc.ingest_credits([Payment("p1", "A0", 5000, MONDAY + 100)], MONDAY + 130)
    assert not cc._stale and [d.kind.value for d in r.decisions] == ["close_request"]
    assert len([c for c in cc.controller.commands.values() if c.action == RelayAction.CLOSE]) == 1
    cc.store.close()


def test_the_send_time_balance_sees_a_payment_committed_by_someone_else(store_url):
    """Another gateway instance (or anything writing the ledger) committed a payment this engine has not seen:
    the trip is stopped at the moment of sending, from the store's own sum of the account's credits."""
    cc = setup(store_url)
    cc.ingest_readings(regs(cc, [("M0", MONDAY - HOUR, 0)]), MONDAY - HOUR)
    cc.ingest_readings(regs(cc, [("M0", MONDAY, 10)]), MONDAY)
    request = next(e[5] for e in cc.store.outbox() if e[2] == "notice_request")
    cc.ingest_receipts([NoticeReceiptIn(request["request_id"], ReceiptOutcome.DELIVERED, MONDAY + 60)], MONDAY + 60)
    t = MONDAY + 60
    while not any(c.action == RelayAction.TRIP for c in cc.controller.commands.values()):
        t = cc.controller.next_wakeup()
        cc.tick(t)
        for e in cc.store.outbox(unpublished=True):
            if e[2] == "notice_request":  # the final reminder, delivered at once
                cc.ingest_receipts([NoticeReceiptIn(e[5]["request_id"], ReceiptOutcome.DELIVERED, t)], t)
            cc.store.mark_published([e[0]], t)
        assert t < MONDAY + 3 * 86400
    trip = next(c for c in cc.controller.commands.values() if c.action == RelayAction.TRIP)
    with cc.store.transaction():  # elsewhere: a payment lands in the ledger, not through this engine
        cc.store._execute("INSERT INTO ledger (entry_id, account_no, kind, amount_fen, at, operator, reason, channel, "
                          "recorded_at) VALUES ('other-1', 0, 'payment', 5000, ?, '', '', 'counter', ?)",
                          (int(t), int(t)))
    assert cc.engine.balance_of("A0") == -500  # this engine has not seen it (10 kWh at 0.50)
    block = cc.authorize(trip.command_id, t)
    assert block.gate.value == "balance" and "fresh balance 4500 fen" in block.reason
    assert cc.store.command(trip.command_id).state == CommandState.CANCELLED
    cc.store.close()


def test_area_flags_and_forecasts_hold_across_a_restart(store_url):
    from gateway.core.policy import AreaFlag, Forecast
    cc = setup(store_url)
    cc.set_area_flag(AreaFlag("north", "extreme_weather", True, MONDAY, MONDAY + 86400, "dispatcher", "blizzard"),
                     MONDAY)
    cc.set_forecast(Forecast("north", "2026-03-04", -9.0, -2.0, MONDAY), MONDAY)
    assert cc.controller.gates.time_block("north", MONDAY + 60).gate.value == "weather"
    cc.store.close()
    again = CostControl(open_store(store_url), policy=POLICY, now=MONDAY + 120)
    gates = again.controller.gates
    assert "blizzard" in gates.time_block("north", MONDAY + 120).reason
    assert "-9..-2" in gates.time_block("north", MONDAY + 2 * 86400).reason  # Wednesday's forecast
    assert gates.time_block("south", MONDAY + 120) is None
    assert [a[4] for a in again.store.audit_log("north")] == ["area_flag_set"]
    again.store.close()
