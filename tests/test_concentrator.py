"""MQTT concentrators on a real Mosquitto broker: the gateway's hub and channels against simulated
concentrators (transparent DL/T 645 frames and JSON commands) serving simulated meters.

Real parts: the broker (its own process on a free port), the gateway's MQTT connection, the DL/T 645 client,
poller and relay drivers, the simulated concentrators and meters (the serial simulator's, with its fault
injection), the executor, the writer thread and a real store. Only the gateway's business time is virtual
in the gateway scenarios (a manual clock shared with the meters).
"""
from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import aiomqtt
import pytest

from gateway.app import Gateway
from gateway.clock import SystemClock, local_naive
from gateway.core.commands import CommandState, ReconnectMode, RelayAction
from gateway.core.model import Meter, Payment
from gateway.southbound.concentrator import ConcentratorHub, HubSettings
from gateway.southbound.relay import RelayDriverError, RelayLinkDown, RelayNoAnswer, RelayRefused
from protocols.dlt645 import di as di_table
from protocols.dlt645.client import Dlt645Timeout, LinkSettings
from protocols.mqtt import concentrator as contract
from simulators.concentrator import SimConcentrator
from simulators.dlt645 import SimMeter, make_meters
from simulators.dlt645.meter import Faults

from .control_fixtures import account, at
from .core_fixtures import POLICY, tariffs
from .relay_harness import Harness

MODES = ["frame", "json"]
#: loopback: a short network margin; the simulated meters answer at once (timing is not what these test)
FRAME_FAST = LinkSettings(baud=9600, turnaround_s=0.2, margin_s=0.4, retries=0)
#: the utility's local time (UTC+8), which the meters keep, whatever zone this machine is in
LOCAL = local_naive(SystemClock())


def hub_for(broker, name: str = "gw-test", **kw) -> ConcentratorHub:
    return ConcentratorHub(HubSettings(broker.host, broker.port, client_id=name, status_wait_s=1.0, **kw))


def channel_for(hub: ConcentratorHub, mode: str, cid: str, meters):
    if mode == "frame":
        return hub.frame_channel(cid, meters, FRAME_FAST)
    return hub.json_channel(cid, meters, read_timeout_s=3.0, relay_timeout_s=3.0)


class Rig:
    """A hub, one simulated concentrator in ``mode`` and the channel to it, on a real clock."""

    def __init__(self, broker, mode: str, meters: list[SimMeter], cid: str = "c1") -> None:
        self.broker, self.mode, self.cid, self.meter_list = broker, mode, cid, meters

    async def __aenter__(self) -> "Rig":
        self.hub = await hub_for(self.broker).start()
        assert self.hub.connected
        self.sim = await SimConcentrator.of(self.cid, self.meter_list, self.broker.host, self.broker.port,
                                            mode=self.mode, bus_timeout_s=0.3, clock=LOCAL).start()
        await self.hub.wait_state(self.cid, True, 5)
        self.channel = channel_for(self.hub, self.mode, self.cid, [m.address for m in self.meter_list])
        self.driver = self.channel.bind(LOCAL, 8 * 3600)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.sim.stop()
        await self.hub.close()

    async def cycle(self) -> list:
        out: list = []
        await self.channel.cycle(out.append)
        return out


async def read_until(driver, meter: str, want_open: bool, within_s: float = 3.0):
    """Read the relay back until it is where it should be (relays take a moment), as the executor does."""
    deadline = time.monotonic() + within_s
    while True:
        status = await driver.read(meter)
        if status.open == want_open or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- the contract, sans I/O


def test_topics_round_trip_and_refuse_what_is_not_a_concentrator_topic():
    assert contract.topic("dtu-07.a", "up/resp") == "feikong/v1/concentrator/dtu-07.a/up/resp"
    assert contract.parse_topic("feikong/v1/concentrator/dtu-07.a/up/resp") == ("dtu-07.a", "up/resp")
    for bad in ("feikong/v1/concentrator/c1/up/other", "feikong/v2/concentrator/c1/status",
                "feikong/v1/concentrator/c 1/status", "feikong/v1/concentrator/c1"):
        assert contract.parse_topic(bad) is None, bad
    with pytest.raises(ValueError):
        contract.topic("c/1", "status")


def test_payloads_validate_as_they_decode():
    cmd = contract.RelayCommand("g-1", "000000000001", "direct_close", contract.instant(1_770_000_000))
    assert contract.decode_command(contract.encode(cmd)) == cmd
    for bad, why in ((b'{"op":"relay","id":"g-1","meter":"000000000001","action":"explode",'
                      b'"valid_until":"2026-01-01T00:00:00+08:00"}', "action"),
                     (b'{"op":"read","id":"g-1","meter":"1","items":["voltage_a"]}', "meter"),
                     (b'{"op":"read","id":"g-1","meter":"000000000001","items":["voltage_a"],"x":1}', "x"),
                     (b'{"op":"relay","id":"g-1","meter":"000000000001","action":"trip",'
                      b'"valid_until":"2026-01-01T00:00:00"}', "valid_until")):  # no offset: ambiguous
        with pytest.raises(contract.PayloadError, match=why):
            contract.decode_command(bad)
    with pytest.raises(contract.PayloadError, match="hex"):
        contract.decode_frame_up(b'{"id":"a","hex":"6G"}')
    # values travel as decimal strings and come back in the DL/T 645 decoder's vocabulary
    items = {"forward_active_energy_block": {f"forward_active_energy_{t}": v for t, v in
                                             zip(("total", "sharp", "peak", "flat", "valley"),
                                                 ("10.01", "1.00", "2.00", "3.00", "4.01"))},
             "remaining_amount": "12.30", "status_word_3": {"relay": "open", "relay_command": "open",
                                                            "keep_power": True}}
    wire = contract.encode(contract.Response("g-1", "ok", contract.items_to_values(items)))
    assert b'"remaining_amount":"12.30"' in wire
    back = contract.values_to_items(contract.decode_response(wire).values)
    assert str(back["forward_active_energy_block"]["forward_active_energy_valley"]) == "4.01"
    assert back["status_word_3"] == {"relay": "open", "relay_command": "open", "keep_power": True}


# --------------------------------------------------------------------------- reads and relays, both modes


@pytest.mark.parametrize("mode", MODES)
async def test_reads_every_meter_behind_one_concentrator(broker, mode):
    meters = make_meters(1, 4, seed=7)
    meters[2].relay_open = True
    async with Rig(broker, mode, meters) as rig:
        readings = await rig.cycle()
        assert [r.meter for r in readings] == [m.address for m in meters]
        for r, sim in zip(readings, meters):
            assert r.errors == {} and r.channel == "mqtt://c1"
            block = r.values["forward_active_energy_block"]
            assert block["forward_active_energy_total"] == sim.energy[0]
            assert block["forward_active_energy_valley"] == sim.energy[4]
            assert r.values["remaining_amount"] == sim.remaining_amount
            assert r.values["status_word_3"]["relay"] == ("open" if sim.relay_open else "closed")
        assert rig.hub.stats.malformed == 0 and rig.hub.stats.stale == 0


@pytest.mark.parametrize("mode", MODES)
async def test_trip_and_close_are_verified_by_reading_the_relay_back(broker, mode):
    meter = SimMeter("000000000011", relay_delay_s=0.3)  # the contact moves a moment after the command
    async with Rig(broker, mode, [meter]) as rig:
        d = rig.driver
        async with d.reserved():
            await d.send(meter.address, RelayAction.TRIP, ReconnectMode.DIRECT, time.time() + 600)
        first = await d.read(meter.address)
        assert first.commanded_open and not first.open  # acknowledged, not moved yet: not confirmed
        assert (await read_until(d, meter.address, True)).open and meter.relay_open
        await d.send(meter.address, RelayAction.CLOSE, ReconnectMode.DIRECT, time.time() + 600)
        assert not (await read_until(d, meter.address, False)).open and not meter.relay_open
        await d.send(meter.address, RelayAction.CLOSE, ReconnectMode.CLOSE_ALLOWED, time.time() + 600)
        assert [a for _, a, _ in meter.relay_log] == ["trip", "direct_close", "close_allowed"]
        # an expired validity deadline: the meter refuses, and says why
        with pytest.raises(RelayRefused):
            await d.send(meter.address, RelayAction.TRIP, ReconnectMode.DIRECT, time.time() - 60)
        assert not meter.relay_open


@pytest.mark.parametrize("mode", MODES)
async def test_the_serial_simulators_faults_reach_the_gateway_the_same_way(broker, mode):
    silent = SimMeter("000000000021", faults=Faults(no_reply=1.0))
    garbled = SimMeter("000000000022", faults=Faults(corrupt_checksum=1.0))
    kept = SimMeter("000000000023", keep_power=True)
    good = SimMeter("000000000024", faults=Faults(stuck_relay=True))
    async with Rig(broker, mode, [silent, garbled, kept, good]) as rig:
        d = rig.driver
        for m in (silent, garbled):
            with pytest.raises(RelayNoAnswer):
                await d.send(m.address, RelayAction.TRIP, ReconnectMode.DIRECT, time.time() + 600)
            with pytest.raises(RelayNoAnswer):
                await d.read(m.address)
        # the silent meter never heard it; the garbled one acted (once: commands are not retried), only its
        # acknowledgement was lost: an unknown outcome either way, which is what the read-back is for
        assert silent.relay_log == [] and [a for _, a, _ in garbled.relay_log] == ["trip"]
        with pytest.raises(RelayRefused):  # keep-power (保电): the meter refuses trips
            await d.send(kept.address, RelayAction.TRIP, ReconnectMode.DIRECT, time.time() + 600)
        assert (await d.read(kept.address)).keep_power
        await d.send(good.address, RelayAction.TRIP, ReconnectMode.DIRECT, time.time() + 600)
        status = await read_until(d, good.address, True, within_s=0.5)
        assert status.commanded_open and not status.open  # acknowledged but stuck: only the read-back shows it
        readings = {r.meter: r for r in await rig.cycle()}
        assert readings[silent.address].values == {} and readings[silent.address].errors
        assert readings[good.address].errors == {}


# --------------------------------------------------------------------------- the gateway behind a concentrator


class ConcentratorHarness(Harness):
    """The relay scenarios' harness (manual clock, real store, executor), with its meters behind a simulated
    MQTT concentrator instead of a TCP serial server."""

    def __init__(self, broker, mode: str, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.broker, self.mode = broker, mode

    async def __aenter__(self) -> "ConcentratorHarness":
        self.hub = await hub_for(self.broker, f"gw-{self.mode}").start()
        self.sim = await SimConcentrator.of("c1", self.sims.values(), self.broker.host, self.broker.port,
                                            mode=self.mode, clock=local_naive(self.clock), bus_timeout_s=0.3).start()
        await self.hub.wait_state("c1", True, 5)
        channel = channel_for(self.hub, self.mode, "c1", list(self.sims))
        self.gw = await Gateway(self.store_url, [channel], self.config, POLICY, self.clock).open()
        self.cc, self.executor, self.writer = self.gw.control, self.gw.executor, self.gw.writer
        await self.call(self.cc.accounting.register, tariffs(), self.accounts,
                        [Meter(addr, self.owner[addr], channel=channel.name, max_kw=30) for addr in self.sims])
        self.next_poll = self.clock.now()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.gw.close()
        await self.sim.stop()
        await self.hub.close()


def one_customer():
    return [(SimMeter("000000000001", power_kw=2.0, relay_delay_s=2.0), account(1))]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_a_customer_tripped_for_arrears_pays_and_is_closed_and_verified(broker, tmp_path, mode):
    async with ConcentratorHarness(broker, mode, f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 8),
                                   one_customer(), poll_every_s=4 * 3600) as h:
        addr, sim = "000000000001", h.sims["000000000001"]
        await h.call(h.cc.ingest_credits, [Payment("opening", "A1", 4000, int(h.clock.now()))], h.clock.now())
        await h.run_until(at(2026, 3, 7, 12))
        assert [a for _, a, _ in sim.relay_log] == ["trip"] and sim.relay_open
        why = await h.call(h.cc.why, addr)
        assert why.relay == "open" and why.opened_by_gateway and "arrears" in why.summary
        paid = h.clock.now()
        await h.call(h.cc.ingest_credits, [Payment("pay-1", "A1", 10000, int(paid))], paid)
        await h.run_for(30)
        assert not sim.relay_open
        closes = [c for c in await h.call(h.cc.store.meter_commands, addr) if c.action == RelayAction.CLOSE]
        assert len(closes) == 1 and closes[0].state == CommandState.CONFIRMED and closes[0].outcome == "closed"
        assert closes[0].attempts == 1 and closes[0].confirmed_at - paid <= 4.0  # relay moves in 2 s
        assert [a for _, a, _ in sim.relay_log] == ["trip", "direct_close"]
        assert (await h.call(h.cc.why, addr)).relay == "closed"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_an_offline_concentrator_fails_commands_fast_they_retry_and_succeed_when_it_is_back(
        broker, tmp_path, mode):
    fleet = [(SimMeter("000000000001", relay_open=True, relay_delay_s=2.0), account(1))]
    async with ConcentratorHarness(broker, mode, f"sqlite://{tmp_path / 'g.db'}", at(2026, 3, 2, 10), fleet,
                                   poll_every_s=3600) as h:
        addr, sim = "000000000001", h.sims["000000000001"]
        await h.sim.kill()  # no goodbye: the broker publishes the concentrator's last will
        await h.hub.wait_state("c1", False, 5)
        cmd = await h.call(h.cc.manual, addr, RelayAction.CLOSE, "li", "operator", "reconnect after repair",
                           "r1", h.clock.now())
        started = time.monotonic()
        await h.executor.drain()
        assert time.monotonic() - started < 1.0  # no exchange timeout waited out: nothing was sent
        c = h.cc.controller.commands[cmd.command_id]
        assert c.state == CommandState.RETRY_WAIT and c.attempts == 1 and not c.readback_first
        assert "offline" in c.last_error
        # while it stays away every retry fails the same way, each counting against the budget, and the
        # failing reconnect reaches a field crew before the budget is spent
        await h.run_for(600)
        c = h.cc.controller.commands[cmd.command_id]
        assert c.state == CommandState.DISPATCHED and c.attempts >= 3 and c.order_id
        assert len(await h.call(h.cc.store.meter_orders, addr)) == 1
        assert sim.relay_log == [] and sim.relay_open
        await h.sim.start()
        await h.hub.wait_state("c1", True, 5)
        await h.run_until(c.next_at + 10)
        c = h.cc.controller.commands[cmd.command_id]
        assert c.state == CommandState.CONFIRMED and c.outcome == "closed"
        assert [a for _, a, _ in sim.relay_log] == ["direct_close"] and not sim.relay_open


async def test_a_request_out_when_the_concentrator_dies_is_an_unknown_outcome(broker):
    """Killed while a command waits for its answer: the executor must read back before sending again."""
    slow = SimMeter("000000000031", faults=Faults(late_reply=1.0, late_by_s=0.9))
    async with Rig(broker, "json", [slow]) as rig:
        rig.sim.bus_timeout_s = 2.0  # the concentrator waits for the slow meter
        send = asyncio.create_task(rig.driver.send(slow.address, RelayAction.TRIP, ReconnectMode.DIRECT,
                                                   time.time() + 600))
        while rig.sim.stats.commands == 0:  # the concentrator has the command and waits on its slow meter
            await asyncio.sleep(0.01)
        await rig.sim.kill()
        with pytest.raises(RelayLinkDown) as err:
            await send
        assert err.value.written
        with pytest.raises(RelayLinkDown) as err:  # and now nothing goes out at all
            await rig.driver.read(slow.address)
        assert not err.value.written
        await rig.sim.start()


# --------------------------------------------------------------------------- what a concentrator may send


@pytest.mark.parametrize("mode", MODES)
async def test_malformed_and_stale_payloads_are_dropped_and_the_channel_goes_on(broker, mode):
    meter = SimMeter("000000000041")
    async with Rig(broker, mode, [meter]) as rig:
        async with aiomqtt.Client(broker.host, broker.port, identifier="junk-sender") as junk:
            for kind, payload in (("up/resp", b"not json"), ("up/resp", b'{"id":"x","status":"maybe"}'),
                                  ("up/frame", b'{"id":"x","hex":"zz"}'), ("status", b'{"state":"sleepy"}'),
                                  ("up/frame", b'{"id":"from-an-old-run","hex":"68AA16"}'),
                                  ("up/resp", b'{"id":"from-an-old-run","status":"ok"}')):
                await junk.publish(contract.topic("c1", kind), payload, qos=1)
            await junk.publish("feikong/v1/concentrator/c1/up/elsewhere", b"?", qos=1)
        for _ in range(100):
            if rig.hub.stats.malformed >= 4 and rig.hub.stats.stale >= 2:
                break
            await asyncio.sleep(0.02)
        assert rig.hub.stats.malformed == 5, rig.hub.stats.malformed_reasons  # 4 bad payloads, 1 bad topic
        assert rig.hub.stats.stale == 2
        assert any("maybe" in r for r in rig.hub.stats.malformed_reasons)
        assert rig.hub.online("c1")  # a bad status does not change what is known
        [reading] = await rig.cycle()
        assert reading.errors == {} and reading.values["status_word_3"]["relay"] == "closed"
        await rig.driver.send(meter.address, RelayAction.TRIP, ReconnectMode.DIRECT, time.time() + 600)
        assert (await rig.driver.read(meter.address)).open


async def test_json_answers_are_matched_by_id_a_broken_one_fails_at_once_and_duplicates_are_dropped(broker):
    """The test plays a concentrator's firmware by hand: it answers the first read with a broken body (the
    read fails now, not after its timeout) and the next one twice (the second copy is dropped)."""
    async with hub_for(broker) as hub, aiomqtt.Client(broker.host, broker.port, identifier="fw-c9") as fw:
        await fw.subscribe(contract.topic("c9", "down/cmd"), qos=1)
        await fw.publish(contract.topic("c9", "status"), contract.encode(contract.Status("online", "s1", "json")),
                         qos=1, retain=True)
        await hub.wait_state("c9", True, 5)
        channel = hub.json_channel("c9", ["000000000051"], read_timeout_s=5.0)
        driver = channel.bind(LOCAL, 8 * 3600)

        async def firmware():
            answers = 0
            async for msg in fw.messages:
                cmd = contract.decode_command(msg.payload)
                answers += 1
                if answers == 1:
                    await fw.publish(contract.topic("c9", "up/resp"), b'{"id":"%s","status":"ok","values":'
                                     b'{"status_word_3":{"relay":"ajar"}}}' % cmd.id.encode(), qos=1)
                else:
                    word = contract.RelayWord("open", "open")
                    good = contract.encode(contract.Response(cmd.id, "ok", contract.Values(status_word_3=word)))
                    await fw.publish(contract.topic("c9", "up/resp"), good, qos=1)
                    await fw.publish(contract.topic("c9", "up/resp"), good, qos=1)
                    return

        fw_task = asyncio.create_task(firmware())
        started = time.monotonic()
        with pytest.raises(RelayDriverError, match="ajar"):
            await driver.read("000000000051")
        assert time.monotonic() - started < 2.0  # not the 5 s timeout
        assert (await driver.read("000000000051")).open
        await fw_task
        for _ in range(100):
            if hub.stats.stale + hub.stats.duplicates >= 1:
                break
            await asyncio.sleep(0.02)
        assert hub.stats.stale + hub.stats.duplicates == 1 and hub.stats.malformed == 1
        await fw.publish(contract.topic("c9", "status"), b"", qos=1, retain=True)


async def test_the_simulated_concentrator_executes_a_repeated_command_once(broker):
    meter = SimMeter("000000000061")
    sim = await SimConcentrator.of("c5", [meter], broker.host, broker.port, mode="json").start()
    try:
        async with aiomqtt.Client(broker.host, broker.port, identifier="gw-by-hand") as gw:
            await gw.subscribe(contract.topic("c5", "up/resp"), qos=1)
            cmd = contract.encode(contract.RelayCommand("same-1", meter.address, "trip",
                                                        contract.instant(time.time() + 600)))
            await gw.publish(contract.topic("c5", "down/cmd"), cmd, qos=1)
            await gw.publish(contract.topic("c5", "down/cmd"), cmd, qos=1)  # QoS 1 re-delivery
            await gw.publish(contract.topic("c5", "down/cmd"), b'{"op":"relay"}', qos=1)  # malformed: dropped
            answers = []
            async with asyncio.timeout(5):
                async for msg in gw.messages:
                    answers.append(contract.decode_response(msg.payload))
                    if len(answers) == 2:
                        break
        assert [(a.id, a.status) for a in answers] == [("same-1", "ok"), ("same-1", "ok")]
        assert [a for _, a, _ in meter.relay_log] == ["trip"]
        assert sim.stats.duplicates == 1 and sim.stats.malformed == 1
    finally:
        await sim.stop()


async def test_the_gateway_and_concentrators_come_back_after_a_broker_restart(broker):
    meter = SimMeter("000000000071")
    async with Rig(broker, "frame", [meter]) as rig:
        assert (await rig.cycle())[0].errors == {}
        broker.stop()
        for _ in range(100):
            if not rig.hub.connected:
                break
            await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(RelayLinkDown) as err:
            await rig.driver.send(meter.address, RelayAction.TRIP, ReconnectMode.DIRECT, time.time() + 600)
        assert not err.value.written and time.monotonic() - started < 0.5
        broker.start()
        await rig.hub.wait_state("c1", True, 15)
        [reading] = await rig.cycle()
        assert reading.errors == {}
        assert rig.hub.stats.connects == 2


async def test_a_late_reply_to_an_earlier_request_is_not_taken_for_the_next_ones(broker):
    """On a wire, a reply that comes after its timeout can pass for the answer to the next request to the same
    meter (same address, same function). Over MQTT every reply names its request: the late one is dropped."""
    meter = SimMeter("000000000081", voltage=Decimal("231.5"),
                     faults=Faults(late_reply=1.0, late_by_s=0.9))
    async with Rig(broker, "frame", [meter]) as rig:
        client = rig.channel.client  # timeout ~0.65 s
        with pytest.raises(Dlt645Timeout):
            await client.read(meter.address, di_table.by_name("remaining_amount").di)
        # the next request waits for the line (busy with the late reply until ~0.9 s), its reply comes ~0.2 s
        # after that: after the late one, inside its own window (~0.7 s to ~1.4 s)
        meter.faults.late_by_s = 0.2
        value = await client.read(meter.address, di_table.by_name("voltage_a").di)
        assert value.value == meter.voltage
        assert rig.hub.stats.stale == 1
