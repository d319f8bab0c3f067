#!/usr/bin/env python3
"""Payment to verified close: how long a paying customer waits for power, on healthy simulated meters.

Setup, one run: simulated DL/T 645 meters, every relay open (tripped, balance at zero), behind several TCP
transparent-serial-server listeners (one bus each; 20 ms meter turnaround; the contact takes
``--relay-delay`` seconds to move after a command, and status word 3 shows the old position until then).
The simulators run in a child process pinned to the other CPU; the gateway (``gateway.app.Gateway``: SQLite
store with synchronous=FULL, writer thread, executor, ticker, and a poller per bus reading every meter
continuously, so closes compete with polls for the buses) in this process, pinned to one CPU.

Payments arrive one at a time at random (exponential gaps, ``--rate`` per second), one per account, each
through ``Gateway.credits`` as the northbound bridge will call it. Latency per payment: from the moment the
gateway receives it to the commit of the read-back that shows the relay closed (``confirmed_at``, same clock).
Also reported: ``payment_commit``, from receipt until the payment and the close command it causes are
committed (the point where the bridge may acknowledge it).

Side by side, same meters, same arrivals: ``adaptive`` verification (this gateway: first read-back 0.5 s
after the ack, then every second, up to the 5 s settle time) and ``fixed_settle`` (the literal reading of
"wait for the relay to settle, then read it back": one read 5 s after the ack).

Verified before reporting: every close command CONFIRMED; every meter's relay read closed afterwards by a
separate client (not the gateway's); each meter's own relay log shows exactly one close frame.

Usage::

    python bench/relay.py                 # 200 meters on 4 buses; writes bench/results/relay.json
    python bench/relay.py --quick         # 20 meters on 2 buses (smoke test)
    python bench/relay.py --out PATH --meters N --buses B --rate R --relay-delay S

The last line of stdout is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, machine_info, pin_to_one_cpu, quantile  # noqa: E402
from gateway.app import Bus, Gateway  # noqa: E402
from gateway.core.commands import CommandPolicy, CommandState  # noqa: E402
from gateway.core.control import ControlConfig  # noqa: E402
from gateway.core.model import Account, Meter, Payment  # noqa: E402
from gateway.core.tariff import tariffs_from_config  # noqa: E402
from gateway.store.entities import COMMANDS  # noqa: E402
from protocols.dlt645.client import Dlt645Client, Dlt645Link, LinkSettings  # noqa: E402

LINK = LinkSettings(baud=9600, turnaround_s=0.3, margin_s=0.2, retries=1)


# --------------------------------------------------------------------------- the simulators' process


def _simulators(first_addresses: list[int], per_bus: int, relay_delay: float, conn) -> None:
    from gateway.clock import SystemClock, local_naive
    from simulators.dlt645 import SimBus, SimMeter, serve_tcp

    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})

    async def main():
        buses, servers = [], []
        for first in first_addresses:
            meters = [SimMeter(f"{first + i:012d}", relay_open=True, relay_command_open=True,
                               relay_delay_s=relay_delay, power_kw=1.0) for i in range(per_bus)]
            bus = SimBus.of(meters, clock=local_naive(SystemClock()))
            servers.append(await serve_tcp(bus))
            buses.append(bus)
        conn.send([s.sockets[0].getsockname()[1] for s in servers])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        conn.send({m.address: [a for _, a, _ in m.relay_log] for bus in buses for m in bus.meters.values()})

    asyncio.run(main())


# --------------------------------------------------------------------------- one measured run


async def run_once(label: str, config: ControlConfig, ports: list[int], addresses: list[list[str]], rate: float,
                   seed: int, workdir: str) -> dict:
    db = f"sqlite://{workdir}/{label}.db"
    buses = [Bus(Dlt645Link.tcp("127.0.0.1", port, LINK), addrs) for port, addrs in zip(ports, addresses)]
    gw = await Gateway(db, buses, config, poll_interval_s=0.0).open()
    tariffs = tariffs_from_config(json.loads((ROOT / "config" / "tariffs.example.json").read_text()))
    accounts = [Account(f"A{a}", tariff_id="flat", area="bench") for addrs in addresses for a in addrs]
    meters = [Meter(a, f"A{a}", channel=bus.name) for bus, addrs in zip(buses, addresses) for a in addrs]
    await gw.writer.call(gw.control.accounting.register, tariffs, accounts, meters)
    stop = asyncio.Event()
    runner = asyncio.create_task(gw.run(stop))
    n = len(meters)
    t0 = time.monotonic()
    while gw.readings_seen < n:  # one full cycle: baselines, balances at zero, relays seen open
        await asyncio.sleep(0.05)
        if time.monotonic() - t0 > 60:
            raise SystemExit(f"{label}: the first read cycle did not finish")
    rng = random.Random(seed)
    order = [m.meter_id for m in meters]
    rng.shuffle(order)
    received: dict[str, float] = {}
    committed: dict[str, float] = {}
    for meter_id in order:
        await asyncio.sleep(rng.expovariate(rate))
        received[meter_id] = gw.clock.now()
        await gw.credits([Payment(f"pay-{meter_id}", f"A{meter_id}", 5000, int(received[meter_id]))])
        committed[meter_id] = gw.clock.now()  # the payment and its close command are durable: ack point
    deadline = time.monotonic() + 120
    while True:
        closes = await gw.writer.call(gw.control.store.load_entities, COMMANDS, "action = 'close'")
        if len(closes) == n and all(c.state == CommandState.CONFIRMED for c in closes):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{label}: {sum(c.state == CommandState.CONFIRMED for c in closes)} of {n} closes "
                             f"confirmed after 120 s")
        await asyncio.sleep(0.1)
    stop.set()
    await runner
    polls = gw.readings_seen
    await gw.close()
    latency = sorted(c.confirmed_at - received[c.meter_id] for c in closes)
    commit = sorted(committed[m] - received[m] for m in received)
    return {"payments": n, "p50_s": quantile(latency, 0.5), "p90_s": quantile(latency, 0.9), "p99_s": quantile(latency, 0.99),
            "max_s": latency[-1], "mean_s": statistics.fmean(latency),
            "payment_commit_p50_ms": 1000 * quantile(commit, 0.5), "payment_commit_p99_ms": 1000 * quantile(commit, 0.99),
            "close_frames": sum(c.attempts for c in closes), "meter_reads": polls}


async def read_all_closed(ports: list[int], addresses: list[list[str]]) -> int:
    """An independent check: a fresh client reads every meter's status word 3."""
    closed = 0
    for port, addrs in zip(ports, addresses):
        async with Dlt645Link.tcp("127.0.0.1", port, LINK) as link:
            client = Dlt645Client(link)
            for a in addrs:
                closed += (await client.relay_state(a))["relay"] == "closed"
    return closed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--meters", type=int, default=None)
    ap.add_argument("--buses", type=int, default=None)
    ap.add_argument("--rate", type=float, default=None, help="payments per second (random arrivals)")
    ap.add_argument("--relay-delay", type=float, default=1.0, help="seconds the contact takes to move")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    meters = args.meters or (20 if args.quick else 200)
    nbus = args.buses or (2 if args.quick else 4)
    rate = args.rate or (10.0 if args.quick else 10.0)
    if meters % nbus:
        raise SystemExit("--meters must be a multiple of --buses")
    per_bus = meters // nbus
    out = Path(args.out or ROOT / "bench" / "results" / ("relay-quick.json" if args.quick else "relay.json"))
    cpu = pin_to_one_cpu()
    base = CommandPolicy()
    configs = {
        "adaptive": ControlConfig(),
        "fixed_settle": ControlConfig(commands=CommandPolicy(
            close=replace(base.close, verify_first_s=base.close.settle_s), trip=base.trip)),
    }
    results, logs = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for i, (label, config) in enumerate(configs.items()):
            firsts = [1 + (i * nbus + b) * per_bus for b in range(nbus)]
            addresses = [[f"{f + k:012d}" for k in range(per_bus)] for f in firsts]
            parent, child = mp.Pipe()
            sims = mp.Process(target=_simulators, args=(firsts, per_bus, args.relay_delay, child), daemon=True)
            sims.start()
            ports = parent.recv()
            results[label] = asyncio.run(run_once(label, config, ports, addresses, rate, seed=7, workdir=workdir))
            closed = asyncio.run(read_all_closed(ports, addresses))
            parent.send("stop")
            logs[label] = parent.recv()
            sims.join(10)
            if closed != meters:
                raise SystemExit(f"{label}: only {closed} of {meters} relays read closed afterwards")
            bad = {m: log for m, log in logs[label].items() if log != ["direct_close"]}
            if bad:
                raise SystemExit(f"{label}: meters whose relay log is not exactly one close: {list(bad.items())[:5]}")
            results[label]["verified"] = {"relays_read_closed": closed, "one_close_frame_per_meter": True}
            print(f"{label:13} p50 {results[label]['p50_s']:.2f} s  p99 {results[label]['p99_s']:.2f} s  "
                  f"max {results[label]['max_s']:.2f} s  ({meters} payments, {nbus} buses, relay moves in "
                  f"{args.relay_delay:g} s)", flush=True)
    summary = {"close_latency_p50_s": round(results["adaptive"]["p50_s"], 3),
               "close_latency_p99_s": round(results["adaptive"]["p99_s"], 3),
               "fixed_settle_p50_s": round(results["fixed_settle"]["p50_s"], 3),
               "fixed_settle_p99_s": round(results["fixed_settle"]["p99_s"], 3),
               "payments": meters, "buses": nbus, "relay_delay_s": args.relay_delay}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(cpu), "workload": {
        "meters": meters, "buses": nbus, "payments_per_s": rate, "relay_delay_s": args.relay_delay,
        "meter_turnaround_s": 0.02, "store": "sqlite (WAL, synchronous=FULL)", "polling": "continuous"},
        "runs": results, "results": summary}, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
