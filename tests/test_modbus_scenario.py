"""A gateway on a fast-forwarded clock over simulated Modbus meters (real pymodbus server and client, TCP):
a tripped customer pays and the close is verified by reading the relay back; a meter whose relay sticks gets
its retries and then a field work order, before the retry budget runs out."""
import pytest

from gateway.clock import local_naive
from gateway.core.commands import CommandState, RelayAction
from gateway.core.model import Payment
from gateway.southbound.modbus import ModbusChannel, ModbusMeter
from protocols.modbus import load_profile
from simulators.modbus import Faults, ModbusSimMeter, serve_tcp

from .control_fixtures import account, at
from .relay_harness import Harness

DAY, HOUR = 86400, 3600
DDS238 = load_profile("hiking_dds238_2_znsr")
pytestmark = pytest.mark.slow


class ModbusHarness(Harness):
    """The relay harness with its meters on a Modbus TCP line instead of a DL/T 645 bus."""

    async def open_channel(self):
        clock = local_naive(self.clock)
        for sim in self.sims.values():
            sim.clock = clock
        self.server = await serve_tcp(list(self.sims.values()))
        return ModbusChannel.tcp("127.0.0.1", self.server.port,
                                 [ModbusMeter(a, s.device_id, s.profile) for a, s in self.sims.items()],
                                 name="modbus-line-1", timeout_s=0.5)

    async def close_channel(self) -> None:
        await self.server.close()


def fleet(n: int):
    return [(ModbusSimMeter(f"MB{i:04d}", device_id=i, profile=DDS238, power_kw=2.0, relay_delay_s=2.0),
             account(i)) for i in range(1, n + 1)]


async def pay(h, account_id: str, yuan: int, pid: str):
    await h.call(h.cc.ingest_credits, [Payment(pid, account_id, yuan * 100, int(h.clock.now()))], h.clock.now())


async def test_modbus_meters_trip_then_close_on_payment_and_a_stuck_relay_gets_a_field_order(tmp_path):
    async with ModbusHarness(f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8), fleet(2)) as h:
        good, stuck = h.sims["MB0001"], h.sims["MB0002"]
        await pay(h, "A1", 40, "o1")
        await pay(h, "A2", 40, "o2")
        for _ in range(600):
            await h.run_for(600)
            if good.relay_open and stuck.relay_open:
                break
        assert good.relay_open and stuck.relay_open  # both ran out and were tripped over Modbus
        for addr in ("MB0001", "MB0002"):
            trip = next(c for c in await h.call(h.cc.store.meter_commands, addr) if c.action == RelayAction.TRIP)
            assert trip.state == CommandState.CONFIRMED and trip.outcome == "open"
            assert (await h.call(h.cc.why, addr)).opened_by_gateway
        await h.run_for(60)
        stuck.faults = Faults(stuck_relay=True)  # accepts every write, the contact no longer moves
        paid = h.clock.now()
        await pay(h, "A1", 100, "pay-1")
        await pay(h, "A2", 100, "pay-2")
        await h.run_for(30)
        # the customer who paid has power again, confirmed by reading the relay register back
        assert not good.relay_open
        close = next(c for c in await h.call(h.cc.store.meter_commands, "MB0001") if c.action == RelayAction.CLOSE)
        assert close.state == CommandState.CONFIRMED and close.outcome == "closed"
        assert close.confirmed_at - paid <= 5.0  # the relay takes 2 s; read back 0.5 s after, then every 1 s
        assert [a for _, a, _ in good.relay_log] == ["trip", "close"]
        # the stuck one: retries, then a field order with the reconnect deadline before the budget runs out
        await h.run_for(2 * HOUR)
        orders = await h.call(h.cc.store.meter_orders, "MB0002")
        assert len(orders) == 1 and orders[0].kind.value == "reconnect"
        assert orders[0].deadline_at == pytest.approx(paid + DAY)
        assert "acknowledged but the relay is still open" in orders[0].reason
        close = next(c for c in await h.call(h.cc.store.meter_commands, "MB0002") if c.action == RelayAction.CLOSE)
        policy = h.config.commands.close
        assert close.state == CommandState.DISPATCHED and close.order_id == orders[0].order_id
        assert policy.dispatch_after_failures <= close.failures < policy.max_attempts
        # every attempt is one write on the wire, as the meter's own log shows
        assert len([r for r in stuck.relay_log if r[1] == "close"]) == close.attempts
        assert stuck.relay_open
