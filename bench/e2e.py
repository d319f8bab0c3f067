#!/usr/bin/env python3
"""End to end at scale: a simulated fleet of every kind of channel read by the real gateway, with payments
arriving over MQTT during a read cycle and each one's reconnect verified by read-back.

Setup, one run:

* a Mosquitto broker (spawned on a free port);
* the fleet (``simulators.fleet``, ``--spec``: 100,000 meters by default, ``config/simfleet.100k.json``) in a
  child process pinned to the other CPU: DL/T 645 buses behind TCP listeners (some emulating a 2400-baud
  RS-485 line), MQTT concentrators (frame and JSON mode) and Modbus TCP lines; a share of meters start
  tripped (relay open), and ``stuck_relay``/``silent_after_trip``/``transient`` faults as the spec says;
* the gateway as ``feikong run`` builds it (on uvloop where it is installed, as `feikong run` does; ``--loop asyncio`` for the stdlib's): ``gateway.service.Service`` from a gateway config file and a fleet
  CSV written here from the fleet's description (one account per meter, a channel per line, every poll
  reading ``forward_active_energy_block`` and ``status_word_3``: the energy that bills and the relay's
  position; the voltage and the meter's own purse are left out: a remote cost-control head-end keeps the
  balance itself), SQLite (WAL, synchronous=FULL) or ``--store postgresql://...``; pinned to one CPU;
* a billing-like publisher (a child process, paho, QoS 1) that publishes the payments.

Timeline: the fleet is registered and every account except the tripped ones gets an opening credit (through
``Gateway.credits``, as an operator's adjustment). Every channel then reads every meter once per
``--interval`` (the config's ``poll_interval_s``): the first cycle is the baseline (energy registers, relays
seen open); at the start of the second, ``--payments`` payments (10,000 by default) for tripped, healthy
meters arrive at random over ``--window`` seconds (default: as long as the first cycle took, so they arrive
during the read cycle). Each one closes its meter's relay, verified by reading
status word 3 back.

Figures (the last stdout line, and ``bench/results/e2e.json``):

* ``read_cycle_s``: the second cycle, from the first channel's start to the last channel's end, over the
  channels at host speed (DL/T 645 TCP without line-rate emulation, concentrators, Modbus); per channel kind
  and with the emulated lines in the results file;
* ``bus_utilisation``: on the line-rate-emulated buses, requests per second in the second cycle divided by
  the line-rate limit for the frames used (the simulator's own count of how long its line carried bytes per
  request); the median over those buses (each one's in the file);
* ``close_latency_p50_s``/``p99_s``: payment published -> commit of the read-back that shows the relay
  closed (``confirmed_at``; same wall clock), healthy meters only;
* ``engine_readings_per_s``: readings the writer committed through ``CostControl.ingest_readings`` per second
  of its time (engine, ledger charges, decisions and the SQL);
* ``peak_rss_mb`` of the gateway process (``fleet_peak_rss_mb``: the simulators').

In the results file, to say where a close's time went: its stages (payment -> command -> frame sent ->
confirmed), overall and by channel kind; the slowest 1 % by kind and frames needed; each kind of writer call
(calls, time running and queued, longest) and those over 200 ms once payments flowed; each process's CPU use
(cores) and how late the gateway's event loop ran a 10 ms timer, from the first payment to the last close.

Verified in the run, before anything is reported: every payment committed once in the ledger; every paid
meter's close command CONFIRMED; in the simulators' own records every paid meter's relay closed, with exactly
one relay action (the close) in its log; every meter read in the second cycle (answers counted by channel
kind); the counts match.

The machine is shared (other work runs on the same two cores): the load average at the start and end is in
the results file.

Usage::

    python bench/e2e.py                  # 100,000 meters; writes bench/results/e2e.json (several minutes)
    python bench/e2e.py --quick          # 5,000 meters, 500 payments (smoke test)
    python bench/e2e.py --spec FILE --payments N --window S --interval S --store URL --loop asyncio --out PATH
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import importlib.util
import json
import os
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import ROOT, cpu_seconds, machine_info, peak_rss_mb, pin_to_one_cpu, quantile  # noqa: E402

#: what every poll reads: the energy that bills and the relay's position
ITEMS = ("forward_active_energy_block", "status_word_3")
OPENING_CREDIT_FEN = 100_000  # far above every warning level: only the tripped accounts make relay work
PAYMENT_YUAN = "50.00"
CLOSE_ACTIONS = ("direct_close", "close")
QUICK_SPEC = {
    "meters": {"dlt645_tcp": 4000, "modbus_tcp": 247, "mqtt_frame": 500, "mqtt_json": 253},
    "per_line": 250, "line_rate_lines": 2, "line_rate_per_line": 20, "line_rate_baud": 2400,
    "tripped": 0.12, "stuck_relay": 0.005, "silent_after_trip": 0.005, "transient": 0.0,
    "turnaround_s": 0.005, "utc_offset_s": 28800, "seed": 7,
}


# --------------------------------------------------------------------------- the billing-like publisher


def publisher_main(host: str, port: int) -> None:
    """Child process: connect; read the plan (one JSON line: epoch start, [[delay_s, payment id, account]]) on
    standard input; publish each payment at its time; print {payment id: epoch published} and the lateness."""
    from datetime import datetime

    from protocols.mqtt import billing as contract
    from simulators.billing import CN, BillingSim

    sim = BillingSim(host, port, client_id="bench-e2e-billing", in_flight=200, subscribe=False).start()
    plan = json.loads(sys.stdin.readline())
    published, late = {}, 0.0
    for delay, pid, account in plan["payments"]:
        at = plan["start"] + delay
        wait = at - time.time()
        if wait > 0:
            time.sleep(wait)
        late = max(late, -wait)
        body = contract.encode(contract.Payment(pid, account, PAYMENT_YUAN, datetime.now(CN), "bank"))
        published[pid] = time.time()
        sim.publish(f"{contract.IN}/payments", body)
    sim.wait_acked(120)
    sim.stop()
    print(json.dumps({"published": published, "max_late_s": late}), flush=True)


# --------------------------------------------------------------------------- the gateway's files


def write_gateway_files(layout: dict, workdir: Path, broker, store_url: str, interval_s: float) -> Path:
    """A gateway config (a channel per fleet line) and its fleet CSV (an account per meter)."""
    channels, rows = [], []
    for n, line in enumerate(layout["lines"], 1):
        kind, where = line["kind"], line["where"]
        name = f"{kind}-{n}"
        if kind == "dlt645_tcp":
            host, _, port = where.rpartition(":")
            # an emulated line's rate goes into the timeouts; the others answer at host speed
            channels.append(dict(kind="dlt645_tcp", name=name, host=host, port=int(port),
                                 baud=line.get("baud", 9600), timeout_s=0.3, margin_s=0.5, retries=1,
                                 items=list(ITEMS)))
        elif kind == "modbus_tcp":
            host, _, port = where.rpartition(":")
            channels.append(dict(kind="modbus_tcp", name=name, host=host, port=int(port),
                                 profile=layout["spec"]["modbus_profile"], timeout_s=1.0))
        elif kind in ("mqtt_frame", "mqtt_json"):
            mode = "frame" if kind == "mqtt_frame" else "json"
            channels.append(dict(kind="concentrator", name=name, id=where, mode=mode, baud=9600, timeout_s=0.3,
                                 margin_s=1.0, retries=1, read_timeout_s=3.0, relay_timeout_s=3.0,
                                 items=list(ITEMS)))
        else:
            raise SystemExit(f"e2e: fleet line kind {kind} is not benchmarked (DL/T 645 TCP, Modbus, MQTT)")
        ids = line.get("device_ids") or [""] * len(line["meters"])
        rows += [(f"A{m}", "flat", f"line-{n}", m, name, d) for m, d in zip(line["meters"], ids)]
    with open(workdir / "fleet.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("account_id", "tariff", "area", "meter_id", "channel", "device_id"))
        w.writerows(rows)
    lines = [
        "[store]", f"url = {json.dumps(store_url)}",
        "[gateway]", f"poll_interval_s = {interval_s}", "tick_s = 1",
        "[fleet]", 'file = "fleet.csv"', f"tariffs = {json.dumps(str(ROOT / 'config' / 'tariffs.example.json'))}",
        "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}", 'instance = "e2e"',
    ]
    for c in channels:
        lines.append("[[channels]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in c.items()]
    path = workdir / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- measuring the gateway


class LoopLag:
    """How late the gateway's event loop runs a 10 ms timer: every callback (an exchange's reply, a writer
    result) waits about as long for its turn."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.recording = False

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            asked = loop.time()
            await asyncio.sleep(0.01)
            if self.recording:
                self.lags.append(loop.time() - asked - 0.01)

    def summary(self) -> dict:
        return {"samples": len(self.lags), **{k: round(1000 * quantile(self.lags, q), 1)
                                              for k, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0))}}


class CycleLog:
    """Each channel's read cycles (start, end, readings, answered, exchanges on the line), by wrapping the
    channel's ``cycle`` as the gateway calls it; and the writer's time in ``ingest_readings``."""

    def __init__(self, channels) -> None:
        self.cycles: dict[str, list[dict]] = {c.name: [] for c in channels}
        self.second_started = asyncio.Event()
        self.ingest_s = 0.0
        self.ingested = 0
        for channel in channels:
            channel.cycle = self._wrap(channel, channel.cycle)

    def _wrap(self, channel, cycle):
        log = self.cycles[channel.name]
        link = getattr(channel, "link", None)

        async def timed(sink):
            entry = {"start": time.time(), "readings": 0, "answered": 0,
                     "exchanges0": link.stats.exchanges if link is not None else 0}
            log.append(entry)
            if len(log) == 2:
                self.second_started.set()

            def counted(reading):
                entry["readings"] += 1
                entry["answered"] += bool(reading.values)
                return sink(reading)

            try:
                return await cycle(counted)
            finally:
                entry["end"] = time.time()
                if link is not None:
                    entry["exchanges"] = link.stats.exchanges - entry["exchanges0"]

        return timed

    def wrap_ingest(self, control) -> None:
        ingest = control.ingest_readings

        def timed(batch, *args):
            started = time.perf_counter()
            try:
                return ingest(batch, *args)
            finally:
                self.ingest_s += time.perf_counter() - started
                self.ingested += len(batch)

        control.ingest_readings = timed

    def wrap_writer(self, writer) -> None:
        """Each writer call's time in the writer thread and its wait in the queue, by what was called (a
        grouped call's share of its group's COMMIT is not in its time: see ``group_commits``)."""
        self.writer_calls: dict[str, list[float]] = {}  # name -> [calls, s running, s queued, longest s]
        self.writer_long: list[tuple[float, float, str]] = []  # (started, s running, name) of calls over 200 ms
        self.writer = writer

        def timing(call):
            async def timed(fn, *args, **kwargs):
                name = getattr(fn, "__name__", type(fn).__name__)
                if name == "_reported":  # the executor's step outcomes and next steps in one call: by the first outcome
                    name = args[0][0][0].__name__ if args[0] else "next_steps"
                entry = self.writer_calls.setdefault(name, [0, 0.0, 0.0, 0.0])
                asked = time.perf_counter()
                ran = []

                def run(*a, **k):
                    ran.append(time.perf_counter())
                    try:
                        return fn(*a, **k)
                    finally:
                        ran.append(time.perf_counter())

                try:
                    return await call(run, *args, **kwargs)
                finally:
                    entry[0] += 1
                    if len(ran) == 2:
                        entry[1] += ran[1] - ran[0]
                        entry[2] += ran[0] - asked
                        entry[3] = max(entry[3], ran[1] - ran[0])
                        if ran[1] - ran[0] > 0.2:  # a call that long holds every close queued behind it
                            self.writer_long.append((time.time() - (ran[1] - ran[0]), ran[1] - ran[0], name))
            return timed

        writer.call = timing(writer.call)
        writer.call_grouped = timing(writer.call_grouped)

    def writer_summary(self) -> dict:
        calls = {name: {"calls": n, "running_s": round(run, 2), "queued_mean_ms": round(1000 * queued / n, 1),
                        "max_ms": round(1000 * longest, 1)}
                 for name, (n, run, queued, longest) in sorted(self.writer_calls.items(), key=lambda kv: -kv[1][1])}
        return {**calls, "group_commits": {"groups": self.writer.groups, "calls": self.writer.grouped_calls}}

    def long_calls(self, since: float, until: float) -> list[dict]:
        """The writer calls over 200 ms that started between ``since`` and ``until`` (seconds from ``since``)."""
        return [{"at_s": round(t - since, 2), "ms": round(1000 * s), "call": name}
                for t, s, name in self.writer_long if since <= t <= until]

    def done(self, k: int) -> bool:
        return all(len(c) >= k and "end" in c[k - 1] for c in self.cycles.values())


async def run(args, spec_dict: dict, workdir: Path) -> dict:
    from gateway.config import load_service_config
    from gateway.core.commands import CommandState
    from gateway.core.model import Adjustment
    from gateway.service import Service
    from gateway.store.entities import COMMANDS
    from simulators.broker import Broker
    from simulators.fleet import FleetProcess, FleetSpec

    load_start = os.getloadavg()
    spec = FleetSpec.from_dict(spec_dict)
    broker = Broker(workdir / "broker").start()
    _unpin(broker.proc.pid)
    fleet = publisher = service = None
    try:
        t = time.monotonic()
        fleet = await FleetProcess(spec, (broker.host, broker.port), workdir=workdir).start(timeout=900)
        fleet_up_s = time.monotonic() - t
        _unpin(fleet.proc.pid, other_cpu=True)
        layout = fleet.describe()
        print(f"fleet: {spec.total:,} meters on {len(layout['lines'])} lines, up in {fleet_up_s:.1f} s", flush=True)
        store_url = args.store or f"sqlite://{workdir / 'e2e.db'}"
        config = load_service_config(write_gateway_files(layout, workdir, broker, store_url, args.interval))
        emulated = {f"dlt645_tcp-{n}" for n, line in enumerate(layout["lines"], 1) if line.get("baud")}
        kind_of = {m.meter_id: _kind(c, emulated) for c in config.channels for m in config.meters_on(c.name)}

        t = time.monotonic()
        service = await Service(config).start()
        gw = service.gateway
        register_s = time.monotonic() - t
        tripped = set(layout["tripped"])
        now = int(gw.clock.now())
        opening = [Adjustment(f"OPEN-{a.account_id}", a.account_id, OPENING_CREDIT_FEN, now, "bench", "opening credit")
                   for a in config.accounts if a.account_id[1:] not in tripped]
        for i in range(0, len(opening), 5000):
            await gw.credits(opening[i:i + 5000])
        print(f"gateway: {len(config.accounts):,} accounts registered in {register_s:.1f} s, "
              f"{len(opening):,} opening credits", flush=True)

        healthy_tripped = sorted(a for a in tripped if a not in layout["faulty"])
        rng = random.Random(spec.seed)
        payers = rng.sample(healthy_tripped, min(args.payments, len(healthy_tripped)))
        publisher = subprocess.Popen([sys.executable, __file__, "--publisher", "--host", broker.host, "--port",
                                      str(broker.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        _unpin(publisher.pid)

        log = CycleLog(gw.channels)
        log.wrap_ingest(gw.control)
        log.wrap_writer(gw.writer)
        stop = asyncio.Event()
        t_run = time.time()
        runner = asyncio.create_task(service.run(stop))
        lag = LoopLag()
        lagger = asyncio.create_task(lag.run(stop))
        await _until(lambda: log.second_started.is_set(), args.interval * 3 + 600, runner, "the second cycle")
        first_cycle_s = max(c[0]["end"] for c in log.cycles.values()) - t_run
        # "during a read cycle": at random over the time the first one took, unless told otherwise
        window_s = args.window if args.window is not None else first_cycle_s
        delays = sorted(rng.uniform(0, window_s) for _ in payers)
        plan = [[d, f"E2E-{m}", f"A{m}"] for d, m in zip(delays, payers)]
        print(f"first cycle (baseline): {first_cycle_s:.1f} s; second cycle started: "
              f"{len(payers):,} payments over {window_s:.1f} s", flush=True)
        procs = {"gateway": os.getpid(), "fleet": fleet.proc.pid, "broker": broker.proc.pid,
                 "publisher": publisher.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
        lag.recording = True
        t_pay = time.time()
        publisher.stdin.write(json.dumps({"start": t_pay, "payments": plan}) + "\n")
        publisher.stdin.flush()
        await _until(lambda: log.done(2), args.interval + 900, runner, "the second cycle's end")
        for k, names in _by_kind(config.channels, emulated).items():
            cycle = [log.cycles[n][1] for n in names]
            print(f"  second cycle, {k}: {max(c['end'] for c in cycle) - min(c['start'] for c in cycle):.1f} s, "
                  f"{sum(c['answered'] for c in cycle):,} of {sum(c['readings'] for c in cycle):,} answered",
                  flush=True)
        deadline = time.monotonic() + 120 + window_s
        while True:  # a count, every second: loading 10,000 commands every half second was a tenth of the writer
            (count,), = await gw.writer.call(gw.control.store._query, "SELECT COUNT(*) FROM relay_commands WHERE "
                                             "action = 'close' AND state = ?", (CommandState.CONFIRMED.value,))
            if count >= len(payers) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        closes = await gw.writer.call(gw.control.store.load_entities, COMMANDS, "action = 'close'")
        confirmed = {c.meter_id: c for c in closes if c.state == CommandState.CONFIRMED}
        writer_after_cycle = log.writer_summary()
        long_calls = log.long_calls(t_pay, time.time())
        lag.recording = False
        cpu = {k: round((cpu_seconds(p) - cpu0[k]) / (time.time() - t_pay), 2) for k, p in procs.items()}
        published_out, _ = await asyncio.get_running_loop().run_in_executor(None, publisher.communicate)
        publisher = None
        pub = json.loads(published_out.strip().splitlines()[-1])
        ledger = await gw.writer.call(gw.control.store._query,
                                      "SELECT entry_id, amount_fen FROM ledger WHERE entry_id LIKE 'E2E-%'")
        report = await fleet.report(payers)
        fleet_rss = peak_rss_mb(fleet.proc.pid)
        stop.set()
        await runner
        await lagger
    finally:
        if publisher is not None:
            publisher.kill()
        if service is not None:
            await service.close()
        if fleet is not None:
            await fleet.stop()
        broker.stop()

    # -- verification ------------------------------------------------------------------------------------
    problems = []
    missing = [m for m in payers if m not in confirmed]
    if missing:
        problems.append(f"{len(missing)} of {len(payers)} paid meters have no confirmed close: {missing[:5]}")
    paid_ids = {f"E2E-{m}" for m in payers}
    if sorted(e for e, _ in ledger) != sorted(paid_ids) or any(a != 5000 for _, a in ledger):
        problems.append(f"ledger: {len(ledger)} E2E payments for {len(paid_ids)} published (each once, 50 yuan)")
    # DL/T 645 meters log the direct close by its DL/T 645 name, Modbus meters as a close
    not_closed = [m for m, r in report["meters"].items()
                  if r["relay_open"] or len(r["relay_log"]) != 1 or r["relay_log"][0][1] not in CLOSE_ACTIONS]
    if not_closed:
        problems.append(f"simulators: {len(not_closed)} paid meters not closed by exactly one close: "
                        f"{[(m, report['meters'][m]) for m in not_closed[:5]]}")
    second = {name: c[1] for name, c in log.cycles.items()}
    read = sum(c["readings"] for c in second.values())
    if read != spec.total:
        problems.append(f"second cycle: {read} readings for {spec.total} meters")
    # a reading counts whether or not the meter answered: the answers are checked too (meters silent by their
    # fault excepted, and 1 % for the transient faults: a meter that met one on every item this cycle)
    answered_all = sum(c["answered"] for c in second.values())
    silent = sum(1 for f in layout["faulty"].values() if f == "silent_after_trip")
    if answered_all < spec.total - silent - math.ceil(spec.total / 100):
        problems.append(f"second cycle: only {answered_all} of {spec.total} meters answered ({silent} are silent "
                        f"by their fault)")
    if problems:
        raise SystemExit("e2e: verification failed:\n  " + "\n  ".join(problems))

    # -- figures -----------------------------------------------------------------------------------------
    def window(names) -> float:
        return max(second[n]["end"] for n in names) - min(second[n]["start"] for n in names)

    fast = [n for n in second if n not in emulated]
    by_kind = _by_kind(config.channels, emulated)
    answered = {k: [sum(second[n]["answered"] for n in names), sum(second[n]["readings"] for n in names)]
                for k, names in by_kind.items()}
    by_where = {s["where"]: s for s in report["lines"]}
    utilisation: dict[int, dict[str, float]] = {0: {}, 1: {}}  # cycle -> bus -> utilisation
    for n, line in enumerate(layout["lines"], 1):
        name = f"dlt645_tcp-{n}"
        if name in emulated:
            st = by_where[line["where"]]
            wire_per_request = st["busy_s"] / st["requests"]  # the frames this bus carried, at its baud
            for k in (0, 1):
                c = log.cycles[name][k]
                utilisation[k][name] = c["exchanges"] / (c["end"] - c["start"]) * wire_per_request
    latencies = [confirmed[m].confirmed_at - pub["published"][f"E2E-{m}"] for m in payers]
    # where a close's time went: the payment reaching a command, the command reaching the wire, the read-back
    stages = {"published_to_command": [confirmed[m].created_at - pub["published"][f"E2E-{m}"] for m in payers],
              "command_to_sent": [confirmed[m].sent_at - confirmed[m].created_at for m in payers],
              "sent_to_confirmed": [confirmed[m].confirmed_at - confirmed[m].sent_at for m in payers]}
    slowest = [m for _, m in sorted(zip(latencies, payers))[-max(1, len(payers) // 100):]]
    paid_kinds = sorted({kind_of[m] for m in payers})

    def p99_of(kind: str, values: list[float]) -> float:
        """The p99 of the paid meters' ``values`` (in ``payers``' order) on lines of ``kind``."""
        return round(quantile([v for m, v in zip(payers, values) if kind_of[m] == kind], 0.99), 3)

    arrived_in_cycle = max(pub["published"].values()) <= max(second[n]["end"] for n in fast)
    summary = {
        "meters": spec.total,
        "read_cycle_s": round(window(fast), 2),
        "bus_utilisation": round(statistics.median(utilisation[1].values()), 3) if emulated else None,
        "close_latency_p50_s": round(quantile(latencies, 0.5), 3),
        "close_latency_p99_s": round(quantile(latencies, 0.99), 3),
        "engine_readings_per_s": round(log.ingested / log.ingest_s) if log.ingest_s else None,
        "peak_rss_mb": round(peak_rss_mb()),
        "fleet_peak_rss_mb": round(fleet_rss),
        "payments": len(payers),
        "verified": True,
    }
    details = {
        "read_cycle_by_kind_s": {k: round(window(names), 2) for k, names in by_kind.items()},
        "read_cycle_all_s": round(window(list(second)), 2),
        "first_cycle_s": round(first_cycle_s, 2),
        "answered_second_cycle": {k: {"answered": a, "read": r} for k, (a, r) in answered.items()},
        "bus_utilisation_by_bus": {k: round(v, 3) for k, v in utilisation[1].items()},
        # the first cycle: the same polling, without payments (closes hold their bus through the last gate check,
        # which waits its turn at the writer)
        "bus_utilisation_first_cycle": round(statistics.median(utilisation[0].values()), 3) if emulated else None,
        "close_latency_s": {"p50": round(quantile(latencies, 0.5), 3), "p90": round(quantile(latencies, 0.9), 3),
                            "p99": round(quantile(latencies, 0.99), 3), "max": round(max(latencies), 3)},
        "close_latency_p99_by_kind_s": {k: p99_of(k, latencies) for k in paid_kinds},
        "close_latency_stages_s": {k: {"p50": round(quantile(v, 0.5), 3), "p99": round(quantile(v, 0.99), 3),
                                       "max": round(max(v), 3)} for k, v in stages.items()},
        "close_latency_stages_p99_by_kind_s": {k: {stage: p99_of(k, v) for stage, v in stages.items()}
                                               for k in paid_kinds},
        # the slowest 1 %: which kind of channel, and how many frames their closes took
        "slowest_closes": {"by_kind": dict(Counter(kind_of[m] for m in slowest)),
                           "attempts": dict(Counter(confirmed[m].attempts for m in slowest))},
        # closes made more than 5 s after their payment: which input made them (a payment's close has the
        # payment's origin; one the poll made has "poll-...": the relay was not known open when the money came)
        "late_commands": [{"meter": m, "after_s": round(v, 1), "origin": confirmed[m].origin,
                           "reason": confirmed[m].reason}
                          for m, v in zip(payers, stages["published_to_command"]) if v > 5][:20],
        "payments_arrived_within_the_cycle": arrived_in_cycle,
        "publisher_max_late_s": round(pub["max_late_s"], 3),
        "engine": {"readings": log.ingested, "writer_s": round(log.ingest_s, 2)},
        "writer_calls_until_the_closes_confirmed": writer_after_cycle,
        # the calls that held the writer over 200 ms once payments flowed (seconds after the first was due)
        "writer_calls_over_200ms_during_the_payments": long_calls,
        # from the first payment due to the last close confirmed: each process's CPU use (1.0 = a whole core)
        # and how late the gateway's event loop ran a 10 ms timer
        "cpu_cores_during_the_payments": cpu,
        "event_loop_lag_during_the_payments": lag.summary(),
        "fleet_up_s": round(fleet_up_s, 1), "register_s": round(register_s, 1),
        # what was found, not what was asked for: the checks above compare these with the payments and meters
        "verified": {"payments_in_ledger_once": len(ledger), "closes_confirmed": len(set(payers) & set(confirmed)),
                     "relays_closed_by_one_close_in_the_simulators": len(report["meters"]) - len(not_closed),
                     "second_cycle_readings": read, "second_cycle_answered": answered_all,
                     "silent_by_fault": silent},
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }
    return {"summary": summary, "details": details, "spec": spec.to_dict(), "store": store_url.split(":")[0],
            "items": list(ITEMS), "interval_s": args.interval, "window_s": round(window_s, 2)}


def _kind(channel, emulated: set[str]) -> str:
    """A channel's kind as the results file groups them: concentrators by mode, emulated buses apart."""
    if channel.kind == "concentrator":
        return f"concentrator_{channel.mode}"
    return "dlt645_tcp_line_rate" if channel.name in emulated else channel.kind


def _by_kind(channels, emulated: set[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in channels:
        out.setdefault(_kind(c, emulated), []).append(c.name)
    return out


#: every CPU this process may use, before it pins itself to one
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _unpin(pid: int, other_cpu: bool = False) -> None:
    """A child (it inherited this process's pin): on the CPU the gateway does not use, or on any."""
    if len(CPUS) > 1:
        os.sched_setaffinity(pid, {CPUS[-1]} if other_cpu else set(CPUS))


async def _until(predicate, timeout: float, runner: asyncio.Task, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if runner.done():
            runner.result()
            raise SystemExit(f"e2e: the service stopped before {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"e2e: no {what} within {timeout:.0f} s")
        await asyncio.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5,000 meters, 500 payments (a smoke test)")
    ap.add_argument("--spec", default=None, help="fleet description (default config/simfleet.100k.json)")
    ap.add_argument("--payments", type=int, default=None, help="payments during the second cycle (10,000)")
    ap.add_argument("--window", type=float, default=None,
                    help="seconds over which they arrive (default: as long as the first read cycle took)")
    ap.add_argument("--interval", type=float, default=None, help="poll interval, s (90; quick 15)")
    ap.add_argument("--store", default=None, help="store URL (default: SQLite in a temporary directory)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default=None,
                    help="the gateway's event loop (default: uvloop where it is installed)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publisher:
        publisher_main(args.host, args.port)
        return 0
    if args.spec:
        spec = json.loads(Path(args.spec).read_text())
    elif args.quick:
        spec = QUICK_SPEC
    else:
        spec = json.loads((ROOT / "config" / "simfleet.100k.json").read_text())
    args.payments = args.payments if args.payments is not None else (500 if args.quick else 10_000)
    args.interval = args.interval if args.interval is not None else (15.0 if args.quick else 90.0)
    out = Path(args.out or ROOT / "bench" / "results" / ("e2e-quick.json" if args.quick else "e2e.json"))
    cpu = pin_to_one_cpu()
    loop = args.loop or ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    from gateway.cli import async_runner

    runner = async_runner(loop)  # as `feikong run` picks it (the bench extra has uvloop)
    with tempfile.TemporaryDirectory() as workdir:
        result = runner(run(args, spec, Path(workdir)))
    result["event_loop"] = loop
    summary = result.pop("summary")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(cpu, uptime=_uptime()), **result, "results": summary},
                              indent=2) + "\n")
    print(json.dumps(summary))
    return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
