"""The gateway's Prometheus metrics against a live gateway (real clock, simulated DL/T 645 meters over TCP, a real
Mosquitto broker, the billing simulator): real events in, the values read back from the HTTP exposition and
checked against what the store committed."""
import asyncio
import sqlite3
import urllib.request
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.commands import CommandPolicy, CommandState, RelayAction
from gateway.core.dispatch import DispatchPolicy
from gateway.core.model import Adjustment, Payment
from gateway.ops.metrics import GatewayMetrics
from protocols.mqtt import billing as contract
from simulators.billing import BillingSim
from simulators.dlt645 import SimMeter
from simulators.dlt645.meter import Faults

from .control_fixtures import QUICK, account, at_any_hour
from .mqtt_fixtures import LiveGateway, tripped_meter

KIND = "dlt645_tcp"


def scrape(metrics: GatewayMetrics, port: int) -> dict:
    """{(sample name, frozenset of labels): value} from the HTTP exposition."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def v(samples: dict, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


async def outbox(live, kind: str) -> list[dict]:
    rows = await live.call(live.gw.control.store.outbox, 0, 100_000)
    return [data for _, _, k, _, _, data in rows if k == kind]


async def online(billing: BillingSim) -> None:
    await asyncio.to_thread(billing.wait_for, lambda b: b.status.get("gw-test") is not None
                            and b.status["gw-test"].state == "online", 10, "gateway online")


async def test_a_payment_to_a_verified_close_is_counted_once_with_its_latency(broker, store_url):
    m = GatewayMetrics(CollectorRegistry(), sample_s=0.2)
    meter = tripped_meter(1)
    async with LiveGateway(store_url, broker, meters=[meter], metrics=m) as live:
        port = m.serve()
        await live.until(lambda: live.gw.readings_seen == 1, what="the first poll")
        await m.sample()
        before = scrape(m, port)
        assert v(before, "feikong_meters", kind=KIND, state="tripped") == 1
        assert v(before, "feikong_meters", kind=KIND, state="online") == 0
        assert v(before, "feikong_meter_reads_total", kind=KIND, result="ok") == 1
        assert v(before, "feikong_meter_read_duration_seconds_count", kind=KIND) == 1
        assert v(before, "feikong_engine_batch_readings_count") == 1
        assert v(before, "feikong_engine_batch_readings_sum") == 1
        assert v(before, "feikong_reconnect_duration_seconds_count", via="remote") == 0
        assert v(before, "feikong_mqtt_connected") == 1
        with BillingSim(broker.host, broker.port) as billing:
            await online(billing)
            billing.pay("A0", "50.00", "P1")
            await asyncio.to_thread(billing.wait_for, lambda b: b.of_kind("relay_confirmed"), 20, "relay confirmed")
            billing.pay("A0", "50.00", "P1")  # a re-delivery: acknowledged, not counted
            await live.until(lambda: live.bridge.stats.duplicates == 1, what="the duplicate")
        await m.sample()
        after = scrape(m, port)
        closes = [c for c in await live.call(live.gw.control.store.meter_commands, meter.address)
                  if c.action == RelayAction.CLOSE]
        assert [c.state for c in closes] == [CommandState.CONFIRMED]
        took = closes[0].confirmed_at - closes[0].payment_at
        assert v(after, "feikong_reconnect_duration_seconds_count", via="remote") == 1
        assert abs(v(after, "feikong_reconnect_duration_seconds_sum", via="remote") - took) < 1e-6
        assert 0 < took < 20
        assert v(after, "feikong_relay_commands_requested_total", action="close", actor="engine") == 1
        assert v(after, "feikong_relay_commands_finished_total", action="close", outcome="confirmed") == 1
        assert v(after, "feikong_relay_commands_finished_total", action="close", outcome="failed") == 0
        assert v(after, "feikong_payments_total", result="applied") == 1
        assert v(after, "feikong_payments_total", result="duplicate") == 1
        assert v(after, "feikong_mqtt_payment_duplicates_total") == 1
        assert v(after, "feikong_mqtt_messages_committed_total") == 2
        assert v(after, "feikong_meters", kind=KIND, state="tripped") == 0
        assert v(after, "feikong_meters", kind=KIND, state="online") == 1
        assert v(after, "feikong_reconnects_pending", deadline="ok") == 0
        assert v(after, "feikong_outbox_unpublished_events") == await live.call(live.gw.control.store.outbox_pending)
        assert v(after, "feikong_queue_depth", queue="bridge_inbound") == 0


#: closes fail fast, go to a crew after the first failure and end failed after three attempts; the reconnect
#: deadline is seconds away
FAILING = replace(QUICK, commands=CommandPolicy(
    close=replace(QUICK.commands.close, dispatch_after_failures=1, backoff_s=0.3, backoff_max_s=0.5, max_attempts=3,
                  dispatched_retry_s=0.5),
    trip=QUICK.commands.trip), dispatch=DispatchPolicy(reconnect_deadline_s=4, escalate_before_s=2))


async def test_a_meter_that_will_not_close_gets_a_field_order_and_a_silent_one_becomes_unreachable(broker, tmp_path):
    m = GatewayMetrics(CollectorRegistry(), sample_s=0.2)
    stuck = tripped_meter(1)
    stuck.faults = Faults(stuck_relay=True)  # acknowledges every command; the contact does not move
    silent = SimMeter("000000000002", faults=Faults(no_reply=1.0))
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, accounts=2, meters=[stuck, silent],
                           config=FAILING, metrics=m) as live:
        port = m.serve()
        await live.until(lambda: live.gw.readings_seen == 2, what="the first poll")
        for _ in range(m.unreachable_after - 1):
            await live.gw.poll_once(live.gw.channels[0])
        with BillingSim(broker.host, broker.port) as billing:
            await online(billing)
            billing.pay("A0", "50.00", "P1")
            await asyncio.to_thread(billing.wait_for, lambda b: b.of_kind("field_order_created"), 20, "field order")
        orders = await live.call(live.gw.control.store.meter_orders, stuck.address)
        assert len(orders) == 1
        await m.sample()
        s = scrape(m, port)
        assert v(s, "feikong_field_orders_created_total", kind="reconnect") == 1
        assert v(s, "feikong_field_orders_open", kind="reconnect") == 1
        assert v(s, "feikong_relay_retries_total", action="close") == len(await outbox(live, "relay_retry")) >= 1
        assert v(s, "feikong_meters", kind=KIND, state="unreachable") == 1
        assert v(s, "feikong_meters", kind=KIND, state="tripped") == 1
        assert v(s, "feikong_meter_reads_total", kind=KIND, result="failed") == m.unreachable_after
        assert v(s, "feikong_meter_reads_total", kind=KIND, result="ok") == m.unreachable_after
        pending = {d: v(s, "feikong_reconnects_pending", deadline=d) for d in ("ok", "at_risk", "passed")}
        assert sum(pending.values()) == 1  # the close still trying, whatever its time left
        # past the deadline (payment + 4 s): the order is overdue, the reconnect's deadline passed
        await live.until(lambda: live.gw.clock.now() > orders[0].deadline_at + 0.5, what="the deadline")
        await m.sample()
        s = scrape(m, port)
        assert v(s, "feikong_field_orders_overdue", kind="reconnect") == 1
        assert v(s, "feikong_reconnects_pending", deadline="passed") == 1
        assert v(s, "feikong_reconnect_duration_seconds_count", via="remote") == 0
        assert v(s, "feikong_relay_commands_finished_total", action="close", outcome="confirmed") == 0
        # the remote budget runs out (the command ends failed), then a crew repairs the meter and closes it:
        # the command ended once, failed; the crew's close is counted apart
        with BillingSim(broker.host, broker.port) as billing:
            await online(billing)
            await live.until(lambda: any(c.state.value == "failed" for c in live.gw.control.controller.commands.values()
                                         if c.meter_id == stuck.address), what="the close failed", timeout=30)
            stuck.faults, stuck.relay_open, stuck.relay_command_open = Faults(), False, False
            billing.send(contract.FieldUpdate("U1", orders[0].order_id, "completed", datetime.now(timezone.utc),
                                              "crew-7"))
            await asyncio.to_thread(billing.wait_for, lambda b: any(
                e.data["outcome"] == "closed_by_field" for e in b.of_kind("relay_confirmed")), 30, "field close")
        s = scrape(m, port)
        assert v(s, "feikong_relay_commands_finished_total", action="close", outcome="failed") == 1
        assert v(s, "feikong_relay_commands_finished_total", action="close", outcome="field") == 0
        assert v(s, "feikong_relay_failed_then_closed_by_field_total", action="close") == 1
        assert v(s, "feikong_relay_commands_requested_total", action="close", actor="engine") == 1


async def test_a_trip_held_by_the_notice_gate_and_a_failed_receipt_are_counted_as_committed(broker, tmp_path):
    m = GatewayMetrics(CollectorRegistry(), sample_s=0.2)
    meter = SimMeter("000000000001", energy=[Decimal("100.00")] * 5)
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, accounts=[account(0)], meters=[meter],
                           metrics=m, config=at_any_hour(QUICK)) as live:  # held by the notice gate alone
        port = m.serve()
        await live.until(lambda: live.gw.readings_seen == 1, what="the baseline poll")
        with BillingSim(broker.host, broker.port) as billing:
            await online(billing)
            billing.pay("A0", "10.00", "P1")
            await asyncio.to_thread(billing.wait_for, lambda b: b.applied, 10, "payment applied")
            # a refund takes the balance below zero: a disconnect case, held until a notice is confirmed
            refund = Adjustment("R1", "A0", -2000, int(live.gw.clock.now()), "op1", "refund", kind="refund")
            await live.gw.credits([refund])
            await live.gw.credits([refund])  # the same adjustment again: a duplicate, but of no payment
            await asyncio.to_thread(billing.wait_for, lambda b: b.of_kind("trip_deferred"), 10, "trip deferred")
            first = billing.of_kind("notice_request")[0].data
            billing.send(contract.NoticeReceipt("R1", first["request_id"], "failed", datetime.now(timezone.utc),
                                                "number unknown"))
            await asyncio.to_thread(billing.wait_for, lambda b: len(b.of_kind("notice_request")) >= 2, 10,
                                    "the next channel")
        s = scrape(m, port)
        deferred = await outbox(live, "trip_deferred")
        assert {d["gate"] for d in deferred} == {"notice"}
        assert v(s, "feikong_trips_blocked_total", gate="notice") == len(deferred)
        assert v(s, "feikong_trips_blocked_total", gate="forbidden_window") == 0
        for event in ("opened", "cancelled"):
            assert v(s, "feikong_disconnect_cases_total", event=event) == \
                len(await outbox(live, f"disconnect_case_{event}"))
        assert v(s, "feikong_disconnect_cases_total", event="opened") >= 1
        requests = await outbox(live, "notice_request")
        for channel in ("sms", "voice", "app"):
            assert v(s, "feikong_notice_requests_total", channel=channel) == \
                sum(r["channel"] == channel for r in requests)
        assert v(s, "feikong_notice_requests_total", channel=first["channel"]) >= 1
        assert v(s, "feikong_notice_receipts_total", channel=first["channel"], outcome="failed") == 1
        assert v(s, "feikong_notice_receipts_total", channel=first["channel"], outcome="delivered") == 0
        assert v(s, "feikong_engine_batch_readings_count") == 1
        assert v(s, "feikong_engine_readings_total", result="accepted") == 1
        assert v(s, "feikong_payments_total", result="applied") == 1  # the refund is no payment
        assert v(s, "feikong_payments_total", result="duplicate") == 0


async def test_a_rolled_back_transaction_counts_nothing(broker, tmp_path):
    """The listeners hear of commits only: a payment whose transaction fails (the database itself refuses the
    outbox write, with a trigger) leaves every counter where it was; the same payment committed afterwards
    counts once."""
    m = GatewayMetrics(CollectorRegistry(), sample_s=0.2)
    meter = tripped_meter(1)
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, meters=[meter], metrics=m) as live:
        port = m.serve()
        await live.until(lambda: live.gw.readings_seen == 1, what="the first poll")
        store = live.gw.control.store
        await live.call(store._execute, "CREATE TRIGGER full BEFORE INSERT ON outbox "
                                        "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        payment = Payment("P1", "A0", 5000, int(live.gw.clock.now()))
        with pytest.raises(sqlite3.IntegrityError, match="disk full"):
            await live.gw.credits([payment])
        assert await live.ledger() == []
        s = scrape(m, port)
        assert v(s, "feikong_payments_total", result="applied") == 0
        assert v(s, "feikong_relay_commands_requested_total", action="close", actor="engine") == 0
        await live.call(store._execute, "DROP TRIGGER full")
        await live.gw.credits([payment])
        assert await live.ledger() == [("P1", "A0", 5000)]
        s = scrape(m, port)
        assert v(s, "feikong_payments_total", result="applied") == 1
        assert v(s, "feikong_relay_commands_requested_total", action="close", actor="engine") == 1
