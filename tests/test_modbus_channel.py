"""The Modbus channel and relay driver against simulated meters on pymodbus's server, over TCP and over RTU
on a pseudo-terminal pair: readings in the gateway's vocabulary, relay writes verified by reading back, and
each wire fault mapped to the error the command executor expects."""
import asyncio
import tomllib
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from gateway.core.commands import ReconnectMode, RelayAction
from gateway.core.engine import Engine
from gateway.core.model import Account, Meter
from gateway.southbound.modbus import ModbusChannel, ModbusMeter
from gateway.southbound.readings import to_batch
from gateway.southbound.relay import RelayDriverError, RelayLinkDown, RelayNoAnswer, RelayRefused
from protocols.modbus import load_profile, parse_profile
from simulators.modbus import Faults, ModbusSimMeter, serve_rtu, serve_tcp

from .core_fixtures import POLICY, tariffs
from .test_modbus_profile import FULL_PROFILE

DDS238 = load_profile("hiking_dds238_2_znsr")
DDSU666 = load_profile("chint_ddsu666")
FULL = parse_profile(tomllib.loads(FULL_PROFILE), "full", "full.toml")
T0 = datetime(2026, 3, 2, 10, 0, 0)
FAR = 4_000_000_000.0  # a command deadline far ahead


class Clock:
    """The local wall clock the meters and the channel share; moved by hand."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


def sims(clock):
    return [ModbusSimMeter("MB-1", device_id=1, profile=DDS238, clock=clock, power_kw=2.0,
                           energy=[Decimal("1234.56")] * 5),
            ModbusSimMeter("MB-2", device_id=2, profile=FULL, clock=clock, remaining_amount=Decimal("-3.25"),
                           energy=[Decimal("10.00"), Decimal("1.00"), Decimal("2.00"), Decimal("3.00"),
                                   Decimal("4.00")], voltage=Decimal("229.5")),
            ModbusSimMeter("MB-3", device_id=3, profile=DDSU666, clock=clock, energy=[Decimal("478.49")] * 5)]


@pytest.fixture(params=["tcp", "rtu"])
async def line(request):
    """(channel, driver, simulated meters by id, clock); the channel also knows a meter nobody answers for."""
    clock = Clock()
    meters = sims(clock)
    server = await (serve_tcp(meters) if request.param == "tcp" else serve_rtu(meters))
    config = [ModbusMeter(m.address, m.device_id, m.profile) for m in meters] + [ModbusMeter("MB-9", 9, DDS238)]
    if request.param == "tcp":
        channel = ModbusChannel.tcp("127.0.0.1", server.port, config, timeout_s=0.3)
    else:
        channel = ModbusChannel.rtu(server.path, config, baudrate=9600, parity="N", timeout_s=0.3)
    driver = channel.bind(clock, 8 * 3600)
    try:
        yield channel, driver, server.meters, clock
    finally:
        await channel.close()
        await server.close()


async def readings(channel):
    out = []
    await channel.cycle(out.append)
    return {r.meter: r for r in out}


async def test_a_cycle_reads_every_meter_in_the_gateway_vocabulary(line):
    channel, _, sim, clock = line
    got = await readings(channel)
    assert list(got) == ["MB-1", "MB-2", "MB-3", "MB-9"]
    dds = got["MB-1"]
    assert dds.complete and dds.taken_at == T0 and dds.channel == channel.name
    assert dds.values["forward_active_energy_block"]["forward_active_energy_total"] == Decimal("1234.56")
    assert dds.values["forward_active_energy_block"]["forward_active_energy_flat"] == Decimal("1234.56")
    assert dds.values["voltage_a"] == Decimal("220.0")
    assert dds.values["status_word_3"] == {"relay": "closed", "relay_command": "closed", "keep_power": False}
    full = got["MB-2"].values
    assert full["forward_active_energy_block"] == {
        "forward_active_energy_total": Decimal("10.00"), "forward_active_energy_sharp": Decimal("1.00"),
        "forward_active_energy_peak": Decimal("2.00"), "forward_active_energy_flat": Decimal("3.00"),
        "forward_active_energy_valley": Decimal("4.00")}
    assert full["remaining_amount"] == Decimal("-3.25") and full["voltage_a"] == Decimal("229.5")
    assert got["MB-3"].values["forward_active_energy_block"]["forward_active_energy_total"] == Decimal("478.49")
    assert "status_word_3" not in got["MB-3"].values  # no relay on that model
    # the silent unit: one timeout, the rest of its items skipped, and its health counts the failure
    silent = got["MB-9"]
    assert not silent.values and "no answer" in silent.errors["forward_active_energy_block"]
    assert channel.health["MB-9"].consecutive_failures == 1 and channel.health["MB-1"].last_ok == T0
    # an hour of 2 kW later the counter has moved; and to_batch takes the readings unchanged
    clock.t = T0 + timedelta(hours=1)
    later = (await readings(channel))["MB-1"]
    moved = later.values["forward_active_energy_block"]["forward_active_energy_total"] - Decimal("1234.56")
    assert Decimal("1.0") < moved < Decimal("3.0")
    engine = Engine(tariffs(), POLICY)
    engine.add_accounts([Account("A1", tariff_id="flat"), Account("A2", tariff_id="flat")])
    engine.add_meters([Meter("MB-1", "A1"), Meter("MB-2", "A2")])
    batch, relays = to_batch([got["MB-1"], got["MB-2"]], engine)
    assert len(batch.t) == 2 and int(batch.regs[0][0]) == 1_234_560 and int(batch.balance_fen[1]) == -325
    assert [(m, s.open) for m, s, _ in relays] == [("MB-1", False), ("MB-2", False)]


async def test_trip_and_close_are_written_and_read_back(line):
    _, driver, sim, clock = line
    dds = sim["MB-1"]
    async with driver.reserved():  # a command holds the line; its exchanges go through inside
        await driver.send("MB-1", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
        status = await driver.read("MB-1")
    assert status.open and status.commanded_open is None and not status.keep_power  # not reported by the model
    assert [a for _, a, _ in dds.relay_log] == ["trip"]
    assert dds.wire_log[-2][:2] == (16, 0x1A)  # FC 10h, as that model requires
    await driver.send("MB-1", RelayAction.CLOSE, ReconnectMode.CLOSE_ALLOWED, FAR)  # no button: a close
    assert not (await driver.read("MB-1")).open and [a for _, a, _ in dds.relay_log] == ["trip", "close"]
    # the coil model reports the commanded position separately
    full = sim["MB-2"]
    await driver.send("MB-2", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
    assert full.relay_open and (await driver.read("MB-2")).commanded_open is True


async def test_a_relay_that_takes_time_or_sticks_is_seen_by_the_read_back(line):
    _, driver, sim, clock = line
    dds = sim["MB-1"]
    dds.relay_delay_s = 2.0
    await driver.send("MB-1", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
    assert not (await driver.read("MB-1")).open  # still moving
    clock.t += timedelta(seconds=3)
    assert (await driver.read("MB-1")).open
    dds.faults = Faults(stuck_relay=True)
    await driver.send("MB-1", RelayAction.CLOSE, ReconnectMode.DIRECT, FAR)  # accepted...
    clock.t += timedelta(seconds=10)
    assert (await driver.read("MB-1")).open  # ...but the contact never moves
    assert [a for _, a, _ in dds.relay_log] == ["trip", "close"]


async def test_wire_faults_map_to_the_executors_errors(line):
    channel, driver, sim, clock = line
    dds, full = sim["MB-1"], sim["MB-2"]
    dds.faults = Faults(no_reply=1.0)
    with pytest.raises(RelayNoAnswer, match="no answer"):
        await driver.send("MB-1", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
    with pytest.raises(RelayNoAnswer):
        await driver.read("MB-1")
    assert dds.relay_log == []
    dds.faults = Faults(exception=1.0)
    with pytest.raises(RelayRefused) as refused:
        await driver.send("MB-1", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
    assert refused.value.errors == ("server_device_failure",) and "exception 4" in str(refused.value)
    reading = (await readings(channel))["MB-1"]
    assert "server_device_failure" in reading.errors["status_word_3"] and not reading.values
    dds.faults = Faults()
    full.keep_power = True  # keep-power refuses trips
    with pytest.raises(RelayRefused) as kept:
        await driver.send("MB-2", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
    assert kept.value.errors == ("illegal_data_value",)
    assert (await driver.read("MB-2")).keep_power and not full.relay_open
    # a model without a relay: refused by the driver, nothing on the wire; and it cannot be read back
    sent = len(sim["MB-3"].wire_log)
    with pytest.raises(RelayRefused) as none:
        await driver.send("MB-3", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
    assert none.value.errors == ("no_remote_relay",) and len(sim["MB-3"].wire_log) == sent
    with pytest.raises(RelayDriverError, match="no relay state register"):
        await driver.read("MB-3")
    # an expired command is never written
    with pytest.raises(RelayRefused) as expired:
        await driver.send("MB-1", RelayAction.TRIP, ReconnectMode.DIRECT, 1_000_000.0)
    assert expired.value.errors == ("expired",) and dds.relay_log == []


async def test_a_meter_that_does_not_answer_is_not_asked_again_this_cycle(line):
    channel, _, sim, _ = line
    full = sim["MB-2"]  # five read requests a cycle
    full.faults = Faults(no_reply=1.0)
    before = full.requests
    reading = (await readings(channel))["MB-2"]
    assert full.requests - before == 1
    skipped = [why for why in reading.errors.values() if why.startswith("skipped")]
    assert skipped and not reading.values
    for _ in range(2):
        await readings(channel)
    assert channel.health["MB-2"].unreachable(3) and not channel.health["MB-1"].unreachable(3)
    full.faults = Faults()
    assert (await readings(channel))["MB-2"].complete and channel.health["MB-2"].consecutive_failures == 0


async def test_a_link_that_cannot_be_opened_is_down_with_nothing_written():
    clock = Clock()
    meters = sims(clock)[:1]
    server = await serve_tcp(meters)
    port = server.port
    await server.close()  # nothing listens there now
    channel = ModbusChannel.tcp("127.0.0.1", port, [ModbusMeter("MB-1", 1, DDS238)], timeout_s=0.3)
    driver = channel.bind(clock, 8 * 3600)
    try:
        with pytest.raises(RelayLinkDown) as down:
            await driver.send("MB-1", RelayAction.TRIP, ReconnectMode.DIRECT, FAR)
        assert down.value.written is False and "cannot connect" in str(down.value)
        with pytest.raises(RelayLinkDown):
            await driver.read("MB-1")
        reading = (await readings(channel))["MB-1"]
        assert "cannot connect" in reading.errors["forward_active_energy_block"]
    finally:
        await channel.close()
    await asyncio.sleep(0)


def test_channel_configuration_is_checked():
    with pytest.raises(ValueError, match="parity"):
        ModbusChannel.rtu("/dev/null", [], parity="X")
    with pytest.raises(ValueError, match="device ids"):
        ModbusChannel.tcp("127.0.0.1", 502, [ModbusMeter("a", 1, DDS238), ModbusMeter("b", 1, DDS238)])
    with pytest.raises(ValueError, match="meter id appears twice"):
        ModbusChannel.tcp("127.0.0.1", 502, [ModbusMeter("a", 1, DDS238), ModbusMeter("a", 2, DDS238)])
