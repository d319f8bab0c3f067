"""Scenarios on simulated DL/T 645 meters over real TCP, with a fast-forwarded clock (days in seconds).

Each asserts what customers feel, from the simulated meters' own records (their relay logs) as well as
from the gateway's store: no trip without a confirmed notice and every gate passed; a paid customer's
power back in seconds, or a field order with the right deadline.
"""
import asyncio

import pytest

from gateway.core.commands import CommandState, RelayAction
from gateway.core.control import ControlConfig
from gateway.core.dispatch import FieldStatus, FieldUpdate
from gateway.core.model import CustomerClass, Payment
from gateway.core.notices import ReceiptOutcome
from gateway.core.policy import TripPolicy
from gateway.store.entities import COMMANDS, NOTICES, ORDERS
from simulators.dlt645 import SimMeter
from simulators.dlt645.meter import Faults

from .control_fixtures import account, at
from .relay_harness import Harness

DAY, HOUR = 86400, 3600
pytestmark = pytest.mark.slow


def meter(i: int, **kw) -> SimMeter:
    return SimMeter(f"{i:012d}", power_kw=kw.pop("power_kw", 2.0), relay_delay_s=kw.pop("relay_delay_s", 2.0), **kw)


def fleet(n: int, klass=CustomerClass.RESIDENTIAL, **kw):
    return [(meter(i + 1, **kw), account(i + 1, klass)) for i in range(n)]


async def pay(h: Harness, account_id: str, yuan: int, pid: str):
    return await h.call(h.cc.ingest_credits, [Payment(pid, account_id, yuan * 100, int(h.clock.now()))],
                        h.clock.now())


def trips(h: Harness, address: str) -> list:
    return [when for when, action, _ in h.sims[address].relay_log if action == "trip"]


def assert_every_trip_legitimate(h: Harness, address: str, account_id: str):
    """From the meter's own log and the store: each trip had a confirmed notice at least the lead time
    old (and not stale), a confirmed final reminder at least its lead old, inside a permitted window."""
    t = h.config.trips
    store = h.cc.store
    notices = store.load_entities(NOTICES, "account_id = ?", (account_id,))
    zone = h.cc.controller.calendar.zone
    for when in trips(h, address):
        cut = when.replace(tzinfo=zone).timestamp()
        assert any(n.delivered_at and n.purpose.value in ("warning_1", "warning_2", "disconnect")
                   and n.delivered_at + t.notice_lead_s <= cut + 1 <= n.delivered_at + t.notice_max_age_s
                   for n in notices), f"trip at {when} without a confirmed notice at least the lead time old"
        assert any(n.delivered_at and n.purpose.value == "final_reminder"
                   and n.delivered_at + t.final_reminder_s <= cut + 1 for n in notices), \
            f"trip at {when} without a confirmed final reminder"
        assert h.cc.controller.gates.time_block(h.cc.engine.account(account_id).area, int(cut)) is None, \
            f"trip at {when} in a forbidden window"


# --------------------------------------------------------------------------- the whole cycle


async def test_runs_to_zero_notices_escalate_trip_after_confirmed_notice_then_pays_and_is_closed_in_seconds(
        store_url):
    def upstream(r):  # the customer's SMS number is wrong; voice calls get through
        return (ReceiptOutcome.FAILED, 20) if r["channel"] == "sms" else (ReceiptOutcome.DELIVERED, 90)

    async with Harness(store_url, at(2026, 3, 2, 8), fleet(1), deliver=upstream) as h:
        addr, acct = "000000000001", "A1"
        await pay(h, acct, 40, "opening")
        await h.run_until(at(2026, 3, 7, 12))
        sim = h.sims[addr]
        cuts = trips(h, addr)
        assert len(cuts) == 1 and sim.relay_open
        assert_every_trip_legitimate(h, addr, acct)
        escalated = [e for e in h.of("notice_escalated") if "sms: failed" in e["detail"]]
        assert escalated, "the failed SMS must escalate"
        assert [r["channel"] for r in h.of("notice_request")][:2] == ["sms", "voice"]
        why = await h.call(h.cc.why, addr)
        assert why.relay == "open" and why.opened_by_gateway and why.actor == "engine"
        assert "arrears" in why.summary
        # the customer pays: the close is sent at once and verified by reading the relay back
        paid = h.clock.now()
        await pay(h, acct, 100, "pay-1")
        await h.run_for(30)
        assert not sim.relay_open
        closes = [c for c in await h.call(h.cc.store.meter_commands, addr) if c.action == RelayAction.CLOSE]
        assert len(closes) == 1 and closes[0].state == CommandState.CONFIRMED and closes[0].outcome == "closed"
        # virtual seconds: the relay takes 2 s to move; first read-back 0.5 s after the ack, then every 1 s
        assert closes[0].confirmed_at - paid <= 4.0
        assert closes[0].deadline_at == paid + DAY
        assert [a for _, a, _ in sim.relay_log] == ["trip", "direct_close"]
        assert (await h.call(h.cc.why, addr)).relay == "closed"


async def test_a_payment_that_lands_before_the_send_cancels_the_trip(tmp_path):
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), fleet(2)) as h:
        await pay(h, "A1", 40, "o1")
        await pay(h, "A2", 40, "o2")
        target = await h.until_trip_queued()
        # a long exchange occupies the bus (a poll of a slow meter, say) while the customer pays
        gate = asyncio.Event()

        async def busy_bus():
            async with h.link.reserved():
                await gate.wait()

        hold = asyncio.create_task(busy_bus())
        await asyncio.sleep(0)
        drain = asyncio.create_task(h.executor.drain())
        await asyncio.sleep(0.05)
        await pay(h, target.account_id, 100, "just-in-time")  # committed while the executor waits for the bus
        gate.set()
        await hold
        await drain
        await h.run_for(120)
        address = target.meter_id
        assert trips(h, address) == []
        stored = (await h.call(h.cc.store.meter_commands, address))[0]
        assert stored.state == CommandState.CANCELLED and "arrears cleared" in stored.outcome


async def test_a_payment_after_the_trip_frame_left_closes_right_behind_it(tmp_path):
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), fleet(1)) as h:
        addr = "000000000001"
        await pay(h, "A1", 40, "o1")
        trip = await h.until_trip_queued()
        # the frame goes out (SENDING committed, frame on the wire); the payment lands before the read-back
        step = (await h.call(h.cc.steps, h.clock.now()))[0]
        await h.executor.perform(step)
        paid = h.clock.now()
        await pay(h, "A1", 100, "pay-1")
        await h.run_for(60)
        assert [a for _, a, _ in h.sims[addr].relay_log] == ["trip", "direct_close"]
        assert not h.sims[addr].relay_open
        cmds = {c.action: c for c in await h.call(h.cc.store.meter_commands, addr)}
        assert cmds[RelayAction.TRIP].command_id == trip.command_id
        assert cmds[RelayAction.CLOSE].state == CommandState.CONFIRMED
        assert cmds[RelayAction.CLOSE].confirmed_at - paid < 10


# --------------------------------------------------------------------------- a meter that will not close


async def test_a_meter_that_ignores_close_gets_retries_then_a_field_order_with_the_deadline(tmp_path):
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), fleet(1)) as h:
        addr, sim = "000000000001", None
        sim = h.sims[addr]
        await pay(h, "A1", 40, "o1")
        for _ in range(600):
            await h.run_for(600)
            if sim.relay_open:
                break
        assert sim.relay_open
        await h.run_for(60)
        sim.faults = Faults(stuck_relay=True)  # acknowledges every command, the contact no longer moves
        paid = h.clock.now()
        await pay(h, "A1", 100, "pay-1")
        await h.run_for(2 * HOUR)
        orders = await h.call(h.cc.store.meter_orders, addr)
        assert len(orders) == 1
        order = orders[0]
        assert order.deadline_at == pytest.approx(paid + DAY) and order.kind.value == "reconnect"
        assert order.address == "1 Main St" and order.lat == pytest.approx(31.201)
        close = next(c for c in await h.call(h.cc.store.meter_commands, addr) if c.action == RelayAction.CLOSE)
        policy = h.config.commands.close
        assert close.state == CommandState.DISPATCHED and close.order_id == order.order_id
        assert policy.dispatch_after_failures <= close.failures < policy.max_attempts  # before the budget ran out
        assert "acknowledged but the relay is still open" in order.reason
        closes_sent = len([r for r in sim.relay_log if r[1] == "direct_close"])
        assert closes_sent == close.attempts  # every attempt is one frame: nothing sent twice behind our back
        # the crew: accepted, on site, completed (they replace the relay); a read confirms
        for i, status in enumerate((FieldStatus.ACCEPTED, FieldStatus.ON_SITE)):
            await h.call(h.cc.ingest_field_updates, [FieldUpdate(f"u{i}", order.order_id, status, h.clock.now(),
                                                                 "crew-7")], h.clock.now())
            await h.run_for(1800)
        sim.faults = Faults()
        sim.relay_open = False
        sim.relay_command_open = False
        await h.call(h.cc.ingest_field_updates, [FieldUpdate("u9", order.order_id, FieldStatus.COMPLETED,
                                                             h.clock.now(), "crew-7", "relay replaced")], h.clock.now())
        # a re-delivered field update changes nothing
        await h.call(h.cc.ingest_field_updates, [FieldUpdate("u9", order.order_id, FieldStatus.COMPLETED,
                                                             h.clock.now(), "crew-7", "relay replaced")], h.clock.now())
        await h.run_for(600)
        order = (await h.call(h.cc.store.meter_orders, addr))[0]
        assert order.state.value == "completed" and order.verified == "confirmed"
        assert order.closed_at < order.deadline_at
        close = await h.call(h.cc.store.command, close.command_id)
        assert close.state == CommandState.CONFIRMED
        assert (await h.call(h.cc.why, addr)).relay == "closed"
        assert [e["state"] for e in h.of("field_order_updated")] == ["accepted", "on_site", "completed"]


# --------------------------------------------------------------------------- gates on real meters


async def test_a_protected_customer_at_zero_gets_an_account_manager_task_and_keeps_power(tmp_path):
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), fleet(1, CustomerClass.PROTECTED)) as h:
        await pay(h, "A1", 20, "o1")
        await h.run_until(at(2026, 3, 9, 12))
        assert h.cc.engine.balance_of("A1") < -5000  # far below zero
        assert trips(h, "000000000001") == [] and not h.sims["000000000001"].relay_open
        tasks = h.of("account_manager_task")
        assert len(tasks) == 1 and tasks[0]["customer_class"] == "protected"


async def test_no_trip_over_the_national_day_holiday(tmp_path):
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 9, 29, 8), fleet(1)) as h:
        await pay(h, "A1", 30, "o1")
        await h.run_until(at(2026, 10, 9, 18))
        cuts = trips(h, "000000000001")
        assert len(cuts) == 1
        assert cuts[0].date().isoformat() == "2026-10-08"  # zero was reached during the holiday
        assert_every_trip_legitimate(h, "000000000001", "A1")
        assert "holiday" in [e["gate"] for e in h.of("trip_deferred")]


async def test_the_daily_cap_defers_the_excess_to_the_next_permitted_window(tmp_path):
    config = ControlConfig(trips=TripPolicy(daily_cap_per_area=2))
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), fleet(4), config=config) as h:
        for i in range(1, 5):
            await pay(h, f"A{i}", 40, f"o{i}")
        await h.run_until(at(2026, 3, 9, 18))
        days = sorted(c.date().isoformat() for i in range(1, 5) for c in trips(h, f"{i:012d}"))
        assert len(days) == 4
        per_day = {d: days.count(d) for d in days}
        assert max(per_day.values()) == 2 and len(per_day) == 2
        for i in range(1, 5):
            assert_every_trip_legitimate(h, f"{i:012d}", f"A{i}")
        assert "daily_cap" in [e["gate"] for e in h.of("trip_deferred")]


async def test_close_allowed_meters_wait_for_the_customers_button(tmp_path):
    (m, a), = fleet(1)
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), [(m, a)],
                       modes={m.address: "close_allowed"}) as h:
        await pay(h, "A1", 40, "o1")
        for _ in range(600):
            await h.run_for(600)
            if m.relay_open:
                break
        await h.run_for(60)
        await pay(h, "A1", 100, "pay-1")
        await h.run_for(30)
        close = next(c for c in await h.call(h.cc.store.meter_commands, m.address) if c.action == RelayAction.CLOSE)
        assert close.state == CommandState.CONFIRMED and close.outcome == "close_allowed"
        assert m.relay_open and m.close_allowed_pending  # the relay waits for the customer
        assert "press_button" in [r["purpose"] for r in h.of("notice_request")]
        why = await h.call(h.cc.why, m.address)
        assert why.waiting_for_button and "press the meter's button" in why.summary
        m.press_button()
        await h.run_for(HOUR + 60)  # the next poll sees it closed
        assert (await h.call(h.cc.why, m.address)).relay == "closed"


async def test_keep_power_on_the_meter_blocks_the_trip_without_hammering(tmp_path):
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), fleet(1)) as h:
        sim = h.sims["000000000001"]
        await pay(h, "A1", 40, "o1")
        await h.until_trip_queued()
        sim.keep_power = True  # set on site just before the cut: the gateway learns it from the refusal
        await h.run_until(at(2026, 3, 9, 12))
        assert trips(h, "000000000001") == [] and not sim.relay_open
        stored = await h.call(h.cc.store.load_entities, COMMANDS, "action = 'trip'")
        assert len(stored) == 1 and stored[0].state == CommandState.BLOCKED and stored[0].attempts == 1
        assert "keep-power" in stored[0].outcome
        assert [e["gate"] for e in h.of("trip_deferred")][-1] == "keep_power"
        assert await h.call(h.cc.store.load_entities, ORDERS, "1 = 1") == []
        # released on site: the next poll sees it, the case plans again (with a fresh final reminder)
        sim.keep_power = False
        await h.run_until(at(2026, 3, 11, 18))
        assert len(trips(h, "000000000001")) == 1
        assert_every_trip_legitimate(h, "000000000001", "A1")
