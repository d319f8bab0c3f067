"""The asyncio client against simulated meters over real TCP sockets and real pseudo-terminals."""
import asyncio
import time
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from protocols.dlt645.client import Dlt645Client, Dlt645Link, Dlt645LinkError, Dlt645Refused, Dlt645Timeout, LinkSettings
from protocols.dlt645.codes import RelayAction
from simulators.dlt645 import Faults, SimBus, make_meters, serve_tcp


@pytest.fixture(params=["tcp", "pty"])
async def bus_client(request, tcp_bus, pty_bus):
    return tcp_bus if request.param == "tcp" else pty_bus


async def test_reads_registers_voltage_purse_and_status(bus_client):
    bus, client = bus_client
    meter = next(iter(bus.meters.values()))
    energy = await client.read(meter.address, 0x00010000)
    assert energy.value == meter.energy[0] and energy.unit == "kWh"
    block = (await client.read(meter.address, 0x0001FF00)).value
    assert block["forward_active_energy_total"] == sum(meter.energy[1:])
    assert (await client.read(meter.address, 0x02010100)).value == Decimal("220.0")
    assert (await client.read(meter.address, 0x00900200)).value == meter.remaining_amount
    assert (await client.relay_state(meter.address))["relay"] == "closed"


async def test_trip_and_close_verified_by_read_back(bus_client):
    bus, client = bus_client
    meter = next(iter(bus.meters.values()))
    await client.relay(meter.address, RelayAction.TRIP)
    assert (await client.relay_state(meter.address))["relay"] == "open"
    assert meter.relay_open and meter.relay_log[-1][1:] == ("trip", "00000000")
    await client.relay(meter.address, RelayAction.DIRECT_CLOSE)
    assert (await client.relay_state(meter.address))["relay"] == "closed"


async def test_close_allowed_waits_for_the_button(tcp_bus):
    bus, client = tcp_bus
    meter = bus.meters["000000000001"]
    await client.relay(meter.address, RelayAction.TRIP)
    await client.relay(meter.address, RelayAction.CLOSE_ALLOWED)
    state = await client.relay_state(meter.address)
    assert state["relay"] == "open" and state["relay_command"] == "closed"
    meter.press_button()
    assert (await client.relay_state(meter.address))["relay"] == "closed"


async def test_wrong_password_and_expired_command_are_refused(tcp_bus):
    bus, client = tcp_bus
    wrong = Dlt645Client(client.link, password="999999")
    with pytest.raises(Dlt645Refused) as info:
        await wrong.relay("000000000001", RelayAction.TRIP)
    assert info.value.errors == ("password_error_or_unauthorized",)
    with pytest.raises(Dlt645Refused):
        await client.relay("000000000001", RelayAction.TRIP, valid_until=datetime.now() - timedelta(minutes=1))
    assert not bus.meters["000000000001"].relay_open


async def test_keep_power_meter_refuses_trip(tcp_bus):
    bus, client = tcp_bus
    await client.relay("000000000002", RelayAction.KEEP_POWER)
    assert (await client.relay_state("000000000002"))["keep_power"] is True
    with pytest.raises(Dlt645Refused):
        await client.relay("000000000002", RelayAction.TRIP)
    assert (await client.relay_state("000000000002"))["relay"] == "closed"


async def test_stuck_relay_acknowledges_but_does_not_move(tcp_bus):
    bus, client = tcp_bus
    bus.meters["000000000003"].faults = Faults(stuck_relay=True)
    await client.relay("000000000003", RelayAction.TRIP)  # accepted...
    state = await client.relay_state("000000000003")
    assert state["relay"] == "closed" and state["relay_command"] == "open"  # ...but only read-back tells


async def test_silent_meter_times_out_and_retries(tcp_bus):
    bus, client = tcp_bus
    bus.meters["000000000004"].faults = Faults(no_reply=1.0)
    started = time.monotonic()
    with pytest.raises(Dlt645Timeout, match="000000000004"):
        await client.read("000000000004", 0x00010000)
    assert bus.meters["000000000004"].requests == 1
    client.link.settings.retries = 2
    with pytest.raises(Dlt645Timeout, match="3 attempt"):
        await client.read("000000000004", 0x00010000)
    assert bus.meters["000000000004"].requests == 4
    assert time.monotonic() - started < 3.0


async def test_unknown_meter_times_out_but_the_bus_keeps_working(tcp_bus):
    bus, client = tcp_bus
    with pytest.raises(Dlt645Timeout):
        await client.read("000000000099", 0x00010000)
    assert (await client.read("000000000001", 0x00010000)).value == bus.meters["000000000001"].energy[0]


async def test_corrupted_replies_are_rejected_and_retried(tcp_bus):
    bus, client = tcp_bus
    meter = bus.meters["000000000005"]
    meter.faults = Faults(corrupt_checksum=0.5)
    client.link.settings.retries = 10
    for _ in range(10):
        assert (await client.read(meter.address, 0x00010000)).value == meter.energy[0]
    assert client.link.stats.frames_rejected > 0
    assert client.link.stats.rejected_reasons.get("bad_checksum", 0) > 0


async def test_reply_from_wrong_address_is_not_taken(tcp_bus):
    bus, client = tcp_bus
    bus.meters["000000000001"].faults = Faults(wrong_address=1.0)
    with pytest.raises(Dlt645Timeout):
        await client.read("000000000001", 0x00010000)
    assert client.link.stats.stray_frames == 1


async def test_late_reply_is_a_timeout_then_the_stale_reply_is_dropped(tcp_bus):
    bus, client = tcp_bus
    bus.meters["000000000002"].faults = Faults(late_reply=1.0, late_by_s=0.6)
    with pytest.raises(Dlt645Timeout):
        await client.read("000000000002", 0x00010000)
    bus.meters["000000000002"].faults = Faults()
    await asyncio.sleep(0.5)  # the late reply arrives while nothing is asked
    # the next exchange must not take the stale reply for its own answer
    v = await client.read("000000000002", 0x02010100)
    assert v.name == "voltage_a"


async def test_abnormal_reply_raises_refused_with_names(tcp_bus):
    bus, client = tcp_bus
    with pytest.raises(Dlt645Refused) as info:
        await client.read("000000000001", 0x12345678)
    assert info.value.errors == ("no_data_requested",)


async def test_follow_up_frames_are_joined(tcp_bus):
    bus, client = tcp_bus
    meter = bus.meters["000000000003"]
    meter.max_reply_data = 6  # the 20-byte block comes in four frames
    block = (await client.read(meter.address, 0x0001FF00)).value
    assert block["forward_active_energy_valley"] == meter.energy[4]
    assert meter.requests == 4


async def test_read_address_and_broadcast_time():
    bus = SimBus.of(make_meters(42, 1))
    server = await serve_tcp(bus)
    async with Dlt645Link.tcp("127.0.0.1", server.sockets[0].getsockname()[1],
                              LinkSettings(baud=9600, turnaround_s=0.2)) as link:
        client = Dlt645Client(link)
        assert await client.read_address() == "000000000042"
        await client.broadcast_time(datetime(2026, 11, 23, 8, 0, 0))
        assert bus.stats.broadcasts == 1
        await client.freeze("000000000042", minute=0, hour=0)
        await client.change_baud("000000000042", 9600)
    server.close()


async def test_one_exchange_at_a_time_per_bus(tcp_bus):
    bus, client = tcp_bus
    addresses = list(bus.meters)
    results = await asyncio.gather(*(client.read(a, 0x00010000) for a in addresses * 4))
    assert [r.value for r in results] == [bus.meters[a].energy[0] for a in addresses * 4]
    assert client.link.stats.stray_frames == 0 and client.link.stats.timeouts == 0


async def test_line_rate_emulation_paces_the_bus():
    # 2400 baud, 8E1: a 20-byte request with preamble plus a 24-byte reply take ~0.2 s on the wire
    bus = SimBus.of(make_meters(1, 2), baud=2400)
    server = await serve_tcp(bus)
    settings = LinkSettings(baud=2400)
    async with Dlt645Link.tcp("127.0.0.1", server.sockets[0].getsockname()[1], settings) as link:
        client = Dlt645Client(link)
        started = time.monotonic()
        for _ in range(3):
            await client.read("000000000001", 0x00010000)
        elapsed = time.monotonic() - started
    server.close()
    per_exchange = (20 + 24) * 11 / 2400 + bus.turnaround_s  # both frames carry FE FE FE FE
    assert elapsed >= 3 * per_exchange * 0.95
    assert elapsed < 3 * per_exchange + 1.0


async def test_link_that_cannot_open_says_where():
    link = Dlt645Link.tcp("127.0.0.1", 1, LinkSettings())
    with pytest.raises(Dlt645LinkError, match="tcp://127.0.0.1:1"):
        await link.open()
    with pytest.raises(Dlt645LinkError, match="/dev/does-not-exist"):
        await Dlt645Link.serial("/dev/does-not-exist").open()


async def test_reconnects_after_the_server_drops_the_connection():
    bus = SimBus.of(make_meters(1, 1))
    server = await serve_tcp(bus)
    port = server.sockets[0].getsockname()[1]
    async with Dlt645Link.tcp("127.0.0.1", port, LinkSettings(baud=9600, turnaround_s=0.2, retries=1)) as link:
        client = Dlt645Client(link)
        await client.read("000000000001", 0x00010000)
        link._protocol.transport.abort()  # the DTU drops the socket
        await asyncio.sleep(0.05)
        assert (await client.read("000000000001", 0x00010000)).name == "forward_active_energy_total"
        assert link.stats.reconnects == 1
    server.close()


async def test_pty_bus_is_a_real_terminal(pty_bus):
    import os
    bus, client = pty_bus
    path = client.link.name.removeprefix("serial://")
    assert path.startswith("/dev/pts/") and os.path.exists(path)


async def test_an_exchange_queued_for_the_bus_goes_between_a_silent_meters_attempts(tcp_bus):
    """Outside a reservation each attempt takes the bus on its own: a read queued meanwhile (a paid customer's
    close, on a real bus) waits for one attempt, not for all of them. Inside one, the holder's stay together."""
    bus, client = tcp_bus
    silent = bus.meters["000000000004"]
    silent.faults = Faults(no_reply=1.0)
    client.link.settings.retries = 2
    seen = []

    async def silent_read():
        with pytest.raises(Dlt645Timeout, match="3 attempt"):
            await client.read(silent.address, 0x00010000)

    async def queued_read():
        await asyncio.sleep(0.01)  # queued while the silent meter's first attempt waits
        await client.read("000000000001", 0x00010000)
        seen.append(silent.requests)

    await asyncio.gather(silent_read(), queued_read())
    assert seen == [1] and silent.requests == 3

    async def held_read():
        async with client.link.reserved():
            with pytest.raises(Dlt645Timeout):
                await client.read(silent.address, 0x00010000)

    seen.clear()
    await asyncio.gather(held_read(), queued_read())
    assert seen == [6]


async def test_a_late_meter_does_not_hold_the_simulated_line_for_the_others(tcp_bus):
    """A meter that answers late is silent until then, and the line is free meanwhile: the simulated bus
    counted the wait as the line busy, so every other meter on it fell silent for the delay too."""
    bus, client = tcp_bus
    bus.meters["000000000002"].faults = Faults(late_reply=1.0, late_by_s=2.0)
    with pytest.raises(Dlt645Timeout):
        await client.read("000000000002", 0x00010000)
    started = time.monotonic()
    assert (await client.read("000000000001", 0x00010000)).value == bus.meters["000000000001"].energy[0]
    assert time.monotonic() - started < 1.0  # not after the late reply, 2 s on
