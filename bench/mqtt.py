#!/usr/bin/env python3
"""Payments through a real Mosquitto broker into committed ledger entries, against paho's raw QoS 1 floor.

One broker (spawned on a free port, persistence on). In the same run, with the same payload size and the
same publisher (a child process: one paho client, ``--in-flight`` QoS 1 publishes pipelined):

* ``paho_floor_per_s``: raw paho-mqtt, publisher -> broker -> one QoS 1 subscriber in this process that does
  nothing but count. From the publisher's first publish to the last message received.
* ``payments_per_s``: the gateway (``gateway.app.Gateway`` + ``BillingBridge``: SQLite with synchronous=FULL,
  its writer thread; paho with manual acknowledgement after commit) in this process. From the publisher's
  first publish until the gateway has committed every payment (and acknowledged it to the broker).
* ``events_per_s``: payment confirmations out: the rows of the ``payments_applied`` events the gateway
  publishes from its outbox (one event per committed batch), as received by the publisher's own
  subscription: confirmations / (last arrival - first arrival). ``event_messages`` says how many MQTT
  messages carried them.

Verified before reporting: the ledger holds every payment id once with its exact amount, and the publisher
received every payment's confirmation. Three rounds (each floor then gateway, on a fresh broker); the figures
are the medians, with every round listed (this 2-core VM moves the ratio by ±0.1 between rounds). The last line of stdout is one JSON object; results are written to
bench/results/mqtt.json (``--quick``: a smaller run, to mqtt-quick.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho  # noqa: E402

from bench._common import ROOT, machine_info  # noqa: E402
from gateway.app import Gateway  # noqa: E402
from gateway.core.model import Account, Payment  # noqa: E402
from gateway.core.tariff import tariffs_from_config  # noqa: E402
from gateway.northbound.mqtt import BillingBridge, BrokerConfig  # noqa: E402
from protocols.mqtt import billing as contract  # noqa: E402
from simulators.billing import CN, BillingSim  # noqa: E402
from simulators.broker import Broker  # noqa: E402

ACCOUNTS = 1000
PAID_AT = datetime(2026, 11, 25, 10, 0, tzinfo=CN)
FLOOR_TOPIC = "bench/floor"


def payment_bytes(i: int) -> tuple[str, bytes]:
    pid = f"BENCH{i:08d}"
    return pid, contract.encode(contract.Payment(pid, f"A{i % ACCOUNTS:05d}", "1.00", PAID_AT, "bank"))


# ------------------------------------------------------------------------------------------ the publisher
def publisher(host: str, port: int, n: int, mode: str, in_flight: int) -> None:
    """Child process: publish n messages (raw floor or payments), report times as one JSON line."""
    sim = BillingSim(host, port, client_id=f"bench-{mode}", in_flight=in_flight, subscribe=(mode == "payments"))
    sim.start()
    bodies = [payment_bytes(i)[1] for i in range(n)]
    topic = FLOOR_TOPIC if mode == "floor" else f"{contract.IN}/payments"
    started = time.time()
    for body in bodies:
        sim.publish(topic, body)
    sim.wait_acked(300)
    acked = time.time()
    out = {"started": started, "acked": acked, "payload_bytes": len(bodies[0])}
    if mode == "payments":
        sim.wait_for(lambda s: len(s.applied) >= n, 300, "every payment confirmed")
        arrivals = sorted(sim.applied_at.values())
        out.update(events=len(sim.applied), event_messages=sim.count("payments_applied"),
                   repeats=sum(sim.repeats.values()),
                   events_span_s=arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0)
    sim.stop()
    print(json.dumps(out), flush=True)


def run_publisher(broker: Broker, n: int, mode: str, in_flight: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--publisher", mode, "--host", broker.host, "--port",
                             str(broker.port), "-n", str(n), "--in-flight", str(in_flight)],
                            stdout=subprocess.PIPE, text=True)


def result_of(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"publisher failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the floor
def floor(broker: Broker, n: int, in_flight: int) -> dict:
    received = 0
    last = 0.0
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(client, userdata, msg):
        nonlocal received, last
        received += 1
        last = time.time()
        if received >= n:
            done.set()

    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-floor-sub", protocol=paho.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(FLOOR_TOPIC, qos=1)
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    subscribed.wait(10)
    pub = run_publisher(broker, n, "floor", in_flight)
    if not done.wait(600):
        raise SystemExit(f"floor: only {received} of {n} received")
    res = result_of(pub)
    sub.disconnect()
    sub.loop_stop()
    return {"per_s": n / (last - res["started"]), "payload_bytes": res["payload_bytes"]}


# ------------------------------------------------------------------------------------------ the gateway
async def gateway_run(broker: Broker, n: int, in_flight: int, store_dir: Path, metrics: bool = False) -> dict:
    tariffs = tariffs_from_config(json.loads((ROOT / "config" / "tariffs.example.json").read_text()))
    gw = await Gateway(f"sqlite://{store_dir / 'bench.db'}", []).open()
    await gw.writer.call(gw.control.accounting.register, tariffs,
                         [Account(f"A{i:05d}", tariff_id="flat") for i in range(ACCOUNTS)], [])
    # every account in credit first: the run measures payments, not a wave of arrears cases
    await gw.credits([Payment(f"OPEN{i:05d}", f"A{i:05d}", 100_000, int(time.time())) for i in range(ACCOUNTS)])
    bridge = BillingBridge(gw, BrokerConfig(broker.host, broker.port, instance="bench"))
    await bridge.start()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(gw.run(stop)), asyncio.create_task(bridge.run(stop))]
    scraper = None
    if metrics:  # the gateway's metrics attached, sampled every second and scraped every second meanwhile
        from gateway.ops.metrics import GatewayMetrics

        m = GatewayMetrics(sample_s=1.0)
        m.attach(gw, bridge)
        port = m.serve()
        tasks.append(asyncio.create_task(m.run(stop)))
        scraper = threading.Thread(target=_scrape_every_second, args=(port, stop), daemon=True)
        scraper.start()
    await bridge.ready()
    while await gw.writer.call(gw.control.store.outbox, 0, 1, True):  # those events out before the run
        await asyncio.sleep(0.05)
    pub = await asyncio.to_thread(run_publisher, broker, n, "payments", in_flight)
    while bridge.stats.committed - bridge.stats.duplicates < n:
        await asyncio.sleep(0.005)
        if pub.poll() not in (None, 0):
            raise SystemExit("publisher failed")
    committed_at = time.time()
    res = await asyncio.to_thread(result_of, pub)
    stats = bridge.stats
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    if metrics:
        scraper.join(5)
        m.close()
    rows = await gw.writer.call(gw.control.store._query,
                                "SELECT entry_id, amount_fen FROM ledger WHERE entry_id LIKE 'BENCH%'")
    await gw.close()
    ids = {pid for pid, fen in rows if fen == 100}
    if len(rows) != n or ids != {payment_bytes(i)[0] for i in range(n)}:
        raise SystemExit(f"ledger check failed: {len(rows)} rows for {n} payments")
    if res["events"] != n:
        raise SystemExit(f"events check failed: {res['events']} payments confirmed of {n}")
    return {"payments_per_s": n / (committed_at - res["started"]),
            "events_per_s": res["events"] / res["events_span_s"] if res["events_span_s"] else None,
            "event_messages": res["event_messages"],
            "duplicates_seen": stats.duplicates, "event_repeats": res["repeats"],
            "payload_bytes": res["payload_bytes"]}


def _scrape_every_second(port: int, stop: asyncio.Event) -> None:
    import urllib.request

    while not stop.is_set():
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        time.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 messages instead of 20,000")
    ap.add_argument("-n", type=int, default=None, help="messages per measurement")
    ap.add_argument("--in-flight", type=int, default=100, help="QoS 1 publishes in flight (both runs)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds, each floor then gateway (default 3; "
                                                                 "--quick: 1); figures are the medians")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--metrics", action="store_true", help="attach the gateway's Prometheus metrics (sampled and "
                                                           "scraped every second) to measure what they cost")
    ap.add_argument("--publisher", choices=("floor", "payments"), help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.publisher:
        publisher(args.host, args.port, args.n, args.publisher, args.in_flight)
        return
    n = args.n or (2000 if args.quick else 20000)
    rounds = args.rounds or (1 if args.quick else 3)
    out = args.out or ROOT / "bench" / "results" / ("mqtt-quick.json" if args.quick else "mqtt.json")
    runs = []
    for _ in range(rounds):  # floor and gateway side by side in each round, each round on a fresh broker
        with tempfile.TemporaryDirectory() as tmp:
            with Broker(Path(tmp) / "broker") as broker:
                floor_res = floor(broker, n, args.in_flight)
                ours = asyncio.run(gateway_run(broker, n, args.in_flight, Path(tmp), args.metrics))
        runs.append({"payments_per_s": round(ours["payments_per_s"]), "events_per_s": round(ours["events_per_s"] or 0),
                     "paho_floor_per_s": round(floor_res["per_s"]),
                     "payments_over_floor": round(ours["payments_per_s"] / floor_res["per_s"], 3),
                     "event_messages": ours["event_messages"], "duplicates_seen": ours["duplicates_seen"],
                     "event_repeats": ours["event_repeats"]})
    median = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    results = {"messages": n, "in_flight": args.in_flight, "payload_bytes": floor_res["payload_bytes"],
               "rounds": rounds, "payments_per_s": median("payments_per_s"), "events_per_s": median("events_per_s"),
               "paho_floor_per_s": median("paho_floor_per_s"),
               "payments_over_floor": median("payments_over_floor"),
               "payments_over_floor_range": [min(r["payments_over_floor"] for r in runs),
                                             max(r["payments_over_floor"] for r in runs)],
               "store": "sqlite (synchronous=FULL)", "metrics": args.metrics, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(None, broker="mosquitto (spawned, persistence on)"),
                               "results": results}, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
