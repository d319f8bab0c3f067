"""The demo: the whole gateway on embedded defaults against simulated meters and a simulated billing system.

Spawned here, in a temporary directory: a Mosquitto broker (Debian's ``mosquitto``), a SQLite store, and
simulated meters on four kinds of channel: a DL/T 645 bus over TCP, a DL/T 645 bus on a real
pseudo-terminal, Modbus TCP meters, and an MQTT concentrator forwarding DL/T 645 frames. Half the customers
start cut off (relay open, balance zero); a billing simulator pays them one by one over MQTT, and the
gateway closes each relay and verifies it by reading it back; the verified close comes back to billing as
an event. One malformed payment shows the dead-letter topic. Ctrl-C stops it cleanly.

This is the one place besides tests and benchmarks that imports ``simulators``.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import TextIO

from gateway.app import Bus, Gateway
from gateway.clock import SystemClock, local_naive
from gateway.core.model import Account, Meter
from gateway.core.tariff import tariffs_from_config
from gateway.northbound.mqtt import BillingBridge, BrokerConfig
from gateway.southbound.concentrator import ConcentratorHub, HubSettings
from gateway.southbound.modbus import ModbusChannel, ModbusMeter
from protocols.dlt645.client import Dlt645Link, LinkSettings
from protocols.modbus import load_profile
from protocols.mqtt import billing as contract
from simulators.billing import BillingSim
from simulators.broker import Broker
from simulators.concentrator import SimConcentrator
from simulators.dlt645 import Faults, PtyBus, SimBus, SimMeter, serve_tcp
from simulators.modbus import ModbusSimMeter
from simulators.modbus import serve_tcp as serve_modbus_tcp

TARIFFS = {"flat": [{"effective_from": 0, "kind": "flat", "price": "0.5000"}]}
LINE = LinkSettings(baud=9600, turnaround_s=0.2, margin_s=0.3, retries=1)


class _Fleet:
    """Every simulated meter, which channel it is on, and whether it starts cut off."""

    def __init__(self) -> None:
        self.meters: dict[str, SimMeter] = {}
        self.channel_of: dict[str, str] = {}

    def add(self, meter: SimMeter, cut_off: bool) -> SimMeter:
        meter.relay_open = meter.relay_command_open = cut_off
        self.meters[meter.address] = meter
        return meter

    @property
    def cut_off(self) -> list[str]:
        return [a for a, m in self.meters.items() if m.relay_open]


async def run_demo(tcp_meters: int = 6, pty_meters: int = 4, modbus_meters: int = 4, concentrator_meters: int = 4,
                   cycles: int | None = None, interval_s: float = 2.0, out: TextIO = sys.stdout) -> dict:
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    clock = SystemClock()
    local = local_naive(clock)
    fleet = _Fleet()
    n = 0

    def meter(cls=SimMeter, **kw) -> SimMeter:
        nonlocal n
        n += 1
        return fleet.add(cls(f"{n:012d}", power_kw=3.0, energy=[Decimal("1000.00")] * 5, **kw), cut_off=n % 2 == 0)

    with tempfile.TemporaryDirectory(prefix="feikong-demo-") as tmp, Broker(Path(tmp) / "broker") as broker:
        tcp = [meter() for _ in range(tcp_meters)]
        if tcp_meters >= 3:
            tcp[-1].faults = Faults(corrupt_checksum=0.3)  # a bad line: a third of its replies corrupted
        pty = [meter() for _ in range(pty_meters)]
        dds238 = load_profile("hiking_dds238_2_znsr")
        modbus = [meter(ModbusSimMeter, device_id=i + 1, profile=dds238) for i in range(modbus_meters)]
        behind = [meter() for _ in range(concentrator_meters)]

        tcp_server = await serve_tcp(SimBus.of(tcp, clock=local))
        pty_bus = PtyBus(SimBus.of(pty, clock=local))
        for m in modbus:
            m.clock = local
        modbus_server = await serve_modbus_tcp(modbus)
        concentrator = await SimConcentrator("c1", SimBus.of(behind, clock=local), broker.host, broker.port).start()
        hub = await ConcentratorHub(HubSettings(broker.host, broker.port, client_id="feikong-demo-south")).start()

        port = tcp_server.sockets[0].getsockname()[1]
        channels = [Bus(Dlt645Link.tcp("127.0.0.1", port, LINE), [m.address for m in tcp]),
                    # pseudo-terminals refuse even parity: 8N1 here (real lines: 8E1)
                    Bus(Dlt645Link.serial(pty_bus.path, replace(LINE, parity="N")), [m.address for m in pty]),
                    ModbusChannel.tcp("127.0.0.1", modbus_server.port,
                                      [ModbusMeter(m.address, m.device_id, dds238) for m in modbus], timeout_s=0.5),
                    hub.frame_channel("c1", [m.address for m in behind])]
        for channel, group in zip(channels, (tcp, pty, modbus, behind)):
            for m in group:
                fleet.channel_of[m.address] = channel.name

        gw = await Gateway(f"sqlite://{tmp}/feikong.db", channels, clock=clock, poll_interval_s=interval_s).open()
        accounts = [Account(f"A{i + 1:04d}", tariff_id="flat", area="demo") for i in range(len(fleet.meters))]
        owner = {addr: a.account_id for addr, a in zip(fleet.meters, accounts)}
        await gw.writer.call(gw.control.accounting.register, tariffs_from_config(TARIFFS), accounts,
                             [Meter(addr, owner[addr], channel=fleet.channel_of[addr], max_kw=30)
                              for addr in fleet.meters])
        bridge = BillingBridge(gw, BrokerConfig(broker.host, broker.port, instance="demo"))
        await bridge.start()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(gw.run(stop)), asyncio.create_task(bridge.run(stop))]
        await bridge.ready()
        billing = await asyncio.to_thread(BillingSim(broker.host, broker.port, client_id="demo-billing").start)

        say(f"feikong demo: {len(fleet.meters)} simulated meters on {len(channels)} channels:")
        for channel, group in zip(channels, (tcp, pty, modbus, behind)):
            say(f"  {channel.name}  ({len(group)} meters)")
        say(f"broker mqtt://{broker.host}:{broker.port} (spawned; try: mosquitto_sub -p {broker.port} -t "
            f"'feikong/v1/#' -v), store {tmp}/feikong.db")
        say(f"{len(fleet.cut_off)} customers start cut off for arrears; billing pays them one by one. Ctrl-C stops.")

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        for addr, account_id in owner.items():  # the others are in credit
            if not fleet.meters[addr].relay_open:
                billing.pay(account_id, "100.00", f"OPEN-{account_id}")
        billing.publish(f"{contract.IN}/payments", b'{"payment_id": "BAD-1", "account": "A0001", "amount": 5.5}')

        queue = list(fleet.cut_off)
        paid_at: dict[str, float] = {}
        reported: set[str] = set()
        done, started = 0, time.monotonic()
        try:
            while not stop.is_set() and (cycles is None or done < cycles):
                await _sleep_or_stop(stop, interval_s)
                done += 1
                if queue and gw.readings_seen >= len(fleet.meters):  # the gateway has seen the relays open
                    addr = queue.pop(0)
                    billing.pay(owner[addr], "50.00", f"DEMO-{addr}")
                    paid_at[addr] = time.monotonic()
                    say(f"  billing: {owner[addr]} pays 50.00 yuan (meter {addr})")
                for ev in billing.of_kind("relay_confirmed"):
                    if ev.id not in reported and ev.data["action"] == "close":
                        reported.add(ev.id)
                        took = billing.arrived[ev.id] - paid_at.get(ev.subject, billing.arrived[ev.id])
                        say(f"  relay: meter {ev.subject} ({fleet.channel_of[ev.subject]}) closed, verified by "
                            f"read-back; billing heard it {took:.2f} s after paying")
                for ev in billing.of_kind("dead_letter"):
                    if ev.id not in reported:
                        reported.add(ev.id)
                        say(f"  dead letter: {ev.data['reason']}")
                s = bridge.stats
                off = sum(m.relay_open for m in fleet.meters.values())
                say(f"-- {time.monotonic() - started:5.1f}s: {gw.readings_seen} readings, {s.committed} messages in "
                    f"({s.duplicates} duplicates, {s.dead_letters} dead letters), {s.published} events out, "
                    f"{off} of {len(fleet.meters)} relays open")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(billing.stop)
            await gw.close()
            await hub.close()
            await concentrator.stop()
            await modbus_server.close()
            pty_bus.close()
            tcp_server.close()
            await tcp_server.wait_closed()
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass
    say("feikong demo stopped.")
    return {"cycles": done, "readings": gw.readings_seen, "closed": len(reported)}


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
