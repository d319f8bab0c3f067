"""The demo: simulated meter buses (one over TCP, one over a real pseudo-terminal) and the gateway polling them.

This is the one place besides tests and benchmarks that imports ``simulators``.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
from datetime import datetime, timedelta
from typing import TextIO

from gateway.core.readings import Reading
from gateway.southbound.poller import BusPoller
from protocols.dlt645.client import Dlt645Client, Dlt645Link, LinkSettings
from simulators.dlt645 import Faults, PtyBus, SimBus, make_meters, serve_tcp


def accelerated_clock(speed: float):
    """Simulated wall clock running ``speed`` times faster than real time, so registers visibly move."""
    start_wall, start_mono = datetime.now(), time.monotonic()

    def now() -> datetime:
        return start_wall + timedelta(seconds=(time.monotonic() - start_mono) * speed)

    return now


def format_reading(r: Reading) -> str:
    kind = r.channel.split(":", 1)[0]
    if not r.values:
        why = next(iter(r.errors.values()), "no data")
        return f"{r.taken_at:%H:%M:%S} {kind:6} {r.meter}  UNREACHABLE  {why}"
    v = r.values
    energy = v.get("forward_active_energy_block") or {}
    tariffs = "/".join(str(energy.get(f"forward_active_energy_{n}", "-"))
                       for n in ("sharp", "peak", "flat", "valley"))
    relay = (v.get("status_word_3") or {}).get("relay", "?")
    line = (f"{r.taken_at:%H:%M:%S} {kind:6} {r.meter}  "
            f"E={energy.get('forward_active_energy_total', '-'):>10} kWh (T1-T4 {tariffs})  "
            f"U={v.get('voltage_a', '-')} V  purse={v.get('remaining_amount', '-')} yuan  relay={relay}")
    if r.errors:
        line += f"  [{len(r.errors)} item(s) failed: {', '.join(r.errors)}]"
    return line


async def run_demo(tcp_meters: int = 8, pty_meters: int = 4, cycles: int | None = None, interval_s: float = 2.0,
                   speed: float = 120.0, pty_baud: int = 9600, out: TextIO = sys.stdout) -> dict:
    clock = accelerated_clock(speed)
    tcp_fleet = make_meters(1, tcp_meters, seed=1)
    pty_fleet = make_meters(1001, pty_meters, seed=2)
    if tcp_meters >= 2:
        # show what the gateway does with a bad line: one meter corrupts a third of its replies
        tcp_fleet[-1].faults = Faults(corrupt_checksum=0.3)
    tcp_bus = SimBus.of(tcp_fleet, clock=clock)
    pty_bus = SimBus.of(pty_fleet, clock=clock, baud=pty_baud)
    server = await serve_tcp(tcp_bus)
    host, port = server.sockets[0].getsockname()[:2]
    pty = PtyBus(pty_bus)
    fast = LinkSettings(baud=9600, turnaround_s=0.2, retries=2)
    links = [Dlt645Link.tcp(host, port, fast),
             Dlt645Link.serial(pty.path, LinkSettings(baud=pty_baud, parity="N", turnaround_s=0.2, retries=2))]
    pollers = [BusPoller(Dlt645Client(links[0]), [m.address for m in tcp_fleet], clock=clock),
               BusPoller(Dlt645Client(links[1]), [m.address for m in pty_fleet], clock=clock)]
    print(f"feikong demo: simulated DL/T 645 bus 1 on tcp://{host}:{port} ({tcp_meters} meters), "
          f"bus 2 on pseudo-terminal {pty.path} ({pty_meters} meters, {pty_baud} baud emulated); "
          f"simulated time runs {speed:g}x. Ctrl-C stops.", file=out, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (NotImplementedError, RuntimeError):
        pass
    readings = 0

    def on_reading(r: Reading) -> None:
        nonlocal readings
        readings += 1
        print(format_reading(r), file=out, flush=True)

    done = 0
    try:
        while not stop.is_set() and (cycles is None or done < cycles):
            started = loop.time()
            await asyncio.gather(*(p.cycle(on_reading) for p in pollers))
            done += 1
            unreachable = sum(h.unreachable(p.unreachable_after) for p in pollers for h in p.health.values())
            noise = sum(link.stats.frames_rejected for link in links)
            print(f"-- cycle {done}: {tcp_meters + pty_meters} meters in {loop.time() - started:.2f}s, "
                  f"{unreachable} unreachable, {noise} corrupted frames rejected so far", file=out, flush=True)
            if cycles is None or done < cycles:
                try:
                    await asyncio.wait_for(stop.wait(), interval_s)
                except asyncio.TimeoutError:
                    pass
    finally:
        for link in links:
            await link.close()
        pty.close()
        server.close()
        await server.wait_closed()
        try:
            loop.remove_signal_handler(signal.SIGINT)
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError):
            pass
    print("feikong demo stopped.", file=out, flush=True)
    return {"cycles": done, "readings": readings}
