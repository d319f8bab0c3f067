"""The demo: the whole gateway on embedded defaults against a simulated fleet and simulated upstream systems.

Spawned here, in a temporary directory: a Mosquitto broker (Debian's ``mosquitto``), a SQLite store, and a
simulated fleet (``simulators.fleet``, 1,000 meters by default) on every kind of channel: DL/T 645 buses over
TCP, DL/T 645 buses on real pseudo-terminals, Modbus TCP lines, and MQTT concentrators in transparent and JSON
mode. Upstream, over MQTT, a billing simulator that is also the notification system and the field crews.

The story: every customer starts with a little credit and consumes it within minutes. The gateway warns them
(``notice_request`` events; the notification system answers with receipts, mostly delivered, some failed,
empty or never, so notices escalate to the next channel), trips them once a notice is confirmed and every
gate passes (the demo's policies, ``gateway/demo.control.toml``: seconds instead of hours, no forbidden window),
and when billing pays (a share of the tripped customers) closes their relays and verifies each by reading it
back. Some meters fail: relays that do not move, meters that fall silent once tripped; their commands end in
field work orders with deadlines, and crews complete some of them over MQTT (``in/field-updates``). A live
summary every interval; the operator API on a free port with an operator's and a supervisor's token (in files
beside the store); Ctrl-C stops everything and removes the temporary directory.

This is the one place besides tests and benchmarks that imports ``simulators``.
"""
from __future__ import annotations

import asyncio
import csv
import json
import logging
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Callable, TextIO

from gateway.app import Gateway
from gateway.config import load_control_config, load_service_config
from gateway.core.control import ControlConfig
from gateway.core.dispatch import OrderState
from gateway.core.model import Account, Adjustment
from gateway.core.thresholds import ThresholdPolicy
from gateway.fleet import COLUMNS as FLEET_COLUMNS
from gateway.northbound.mqtt import BillingBridge
from gateway.ops.api import ApiComponent
from gateway.ops.auth import Tokens
from gateway.ops.metrics import MetricsEndpoint
from gateway.service import Service
from gateway.store.entities import COMMANDS, NOTICES, ORDERS
from protocols.mqtt import billing as contract
from simulators.billing import CN, BillingSim
from simulators.broker import Broker
from simulators.fleet import KINDS, Fleet, FleetProcess, FleetSpec

DEMO_CONTROL = Path(__file__).resolve().parent / "demo.control.toml"  # package data: the demo runs from a wheel too
TARIFFS = {"flat": [{"effective_from": 0, "kind": "flat", "price": "1.0000"}]}
#: warnings at 1.50 and 0.80 yuan (the field: days of use), the trip at zero
THRESHOLDS = ThresholdPolicy(default_warn1_fen=150, default_warn2_fen=80, warn1_min_fen=100, warn2_min_fen=50,
                             hysteresis_fen=20)
AnyFleet = Fleet | FleetProcess  # the simulated fleet in this process or in a child process
KIND_LABEL = {"dlt645_tcp": "DL/T 645 TCP", "dlt645_pty": "DL/T 645 pty", "modbus_tcp": "Modbus TCP",
              "mqtt_frame": "MQTT frame", "mqtt_json": "MQTT JSON"}


@dataclass(frozen=True)
class Story:
    """What the upstream simulators do: notice receipts, who pays and when, which field orders crews close."""

    opening_fen: tuple[int, int] = (20, 120)  # each account's opening credit, drawn in this range
    delivered: float = 0.80  # a notice request's receipt: delivered...
    failed: float = 0.08  # ...failed, empty, or (the rest) never answered (the channel's timeout escalates)
    empty: float = 0.06
    pay_share: float = 0.7  # tripped customers who pay
    pay_after_s: tuple[float, float] = (2.0, 12.0)
    pay_amounts: tuple[str, ...] = ("3.00", "5.00", "10.00")
    crew_share: float = 0.6  # field orders a crew completes
    crew_after_s: tuple[float, float] = (10.0, 40.0)
    seed: int = 6


def demo_config(path: Path = DEMO_CONTROL, today: date | None = None) -> ControlConfig:
    """The demo's policies from ``path``, with today and tomorrow (the utility's days) working days: a statutory
    holiday would otherwise hold every trip, and the demo must work any day."""
    return working_today(load_control_config(path), today)


def working_today(cfg: ControlConfig, today: date | None = None) -> ControlConfig:
    """``cfg`` with today and tomorrow (the utility's days) extra working days."""
    today = today or cfg.calendar.calendar().day(int(time.time()))
    workdays = tuple(cfg.calendar.extra_workdays) + tuple((today + timedelta(days=i)).isoformat() for i in (0, 1))
    return replace(cfg, calendar=replace(cfg.calendar, extra_workdays=workdays))


def demo_accounts(layout: dict) -> tuple[list[Account], dict[str, str]]:
    """One account per meter of the fleet's ``layout`` (``Fleet.describe()``), in an area per line, reachable by
    SMS, voice call and app; -> (accounts, meter -> account)."""
    accounts, owner = [], {}
    for n, line in enumerate(layout["lines"], 1):
        for address in line["meters"]:
            i = len(accounts) + 1
            phone = f"138{i:08d}"
            accounts.append(Account(f"A{i:05d}", tariff_id="flat", area=f"feeder-{n}", name=f"Customer {i}",
                                    address=f"{i} Demo Road", lat=31.2 + i / 100_000, lon=121.5,
                                    channels=("sms", "voice", "app"),
                                    contacts={"sms": phone, "voice": phone, "app": f"app-{i}"}))
            owner[address] = accounts[-1].account_id
    return accounts, owner


#: each simulated line kind as a channel of the gateway's config file: its kind and the settings the demo
#: gives it (the lines answer at host speed, line-rate emulation off: the timeouts can be short)
LINE = {"baud": 9600, "timeout_s": 0.2, "margin_s": 0.3, "retries": 1}
CHANNEL = {
    "dlt645_tcp": {"kind": "dlt645_tcp", **LINE},
    "dlt645_pty": {"kind": "dlt645_serial", **LINE, "parity": "N"},  # pseudo-terminals refuse even parity
    "modbus_tcp": {"kind": "modbus_tcp", "timeout_s": 0.5},
    "mqtt_frame": {"kind": "concentrator", "mode": "frame", **LINE, "margin_s": 1.0},
    "mqtt_json": {"kind": "concentrator", "mode": "json", "read_timeout_s": 3.0, "relay_timeout_s": 3.0},
}


NAME = {"dlt645_tcp": "tcp://", "dlt645_pty": "serial://", "modbus_tcp": "modbus+tcp://", "mqtt_frame": "mqtt://",
        "mqtt_json": "mqtt://"}


def write_gateway_config(directory: Path, layout: dict, broker: Broker, *, poll_interval_s: float,
                         control: Path = DEMO_CONTROL) -> Path:
    """The demo as ``feikong run`` would run it: ``gateway.toml`` for the fleet's ``layout``
    (``Fleet.describe()``: a channel per line) with the fleet file (an account per meter,
    :func:`demo_accounts`), the tariffs and the operator tokens beside it, in ``directory``; -> its path.
    SQLite beside it, the demo's broker, the API and the metrics on free local ports."""
    accounts, owner = demo_accounts(layout)
    by_id = {a.account_id: a for a in accounts}
    channels, rows = [], []
    for line in layout["lines"]:
        kind = line["kind"]
        name = NAME[kind] + line["where"]  # where it is, as the gateway's own links name themselves
        table = {"name": name, **CHANNEL[kind]}
        if kind in ("dlt645_tcp", "modbus_tcp"):
            host, _, port = line["where"].rpartition(":")
            table.update(host=host, port=int(port))
        elif kind == "dlt645_pty":
            table["device"] = line["where"]
        else:
            table["id"] = line["where"]
        if kind == "modbus_tcp":
            table["profile"] = layout["spec"]["modbus_profile"]
        channels.append(table)
        units = line.get("device_ids") or [""] * len(line["meters"])
        for address, unit in zip(line["meters"], units):
            a = by_id[owner[address]]
            contacts = ";".join(f"{c}={a.contacts[c]}" for c in a.channels)
            rows.append([a.account_id, "residential", "remote", a.tariff_id, a.area, a.name, a.address, a.lat,
                         a.lon, ";".join(a.channels), contacts, "0", address, name, unit, "", ""])
    with (directory / "fleet.csv").open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(FLEET_COLUMNS)
        out.writerows(rows)
    (directory / "tariffs.json").write_text(json.dumps(TARIFFS))
    _demo_tokens(directory)
    t = THRESHOLDS
    text = [
        "# written by `feikong demo`: the demo's gateway, as `feikong run --config` would run it",
        "[store]", f"url = {_toml(f'sqlite://{directory}/feikong.db')}",
        "[control]", f"file = {_toml(str(control))}",
        "[gateway]", f"poll_interval_s = {poll_interval_s}",
        "[thresholds]", *(f"{k} = {getattr(t, k)}" for k in ("default_warn1_fen", "default_warn2_fen",
                                                              "warn1_min_fen", "warn2_min_fen", "hysteresis_fen")),
        "[http]", 'host = "127.0.0.1"', "port = 0", 'tokens_file = "tokens.toml"',
        "[metrics]", 'host = "127.0.0.1"', "port = 0",
        "[fleet]", 'file = "fleet.csv"', 'tariffs = "tariffs.json"',
        "[mqtt]", f"host = {_toml(broker.host)}", f"port = {broker.port}", 'instance = "demo"',
    ]
    for table in channels:
        text += ["[[channels]]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    path = directory / "gateway.toml"
    path.write_text("\n".join(text) + "\n")
    return path


def _toml(value) -> str:
    """A TOML value: strings through JSON's quoting (a valid TOML basic string), numbers as they are."""
    return json.dumps(value) if isinstance(value, str) else str(value)


@dataclass
class Composed:
    """The running gateway (a :class:`Service` from the demo's config file) and what an operator is shown."""

    service: Service
    addresses: dict[str, str] = field(default_factory=dict)
    task: asyncio.Task | None = None
    answered: dict[str, float] = field(default_factory=dict)  # meter -> when (epoch s) a read last got a value

    def __post_init__(self) -> None:
        self.gateway.reading_hooks.append(self._heard)

    @property
    def gateway(self) -> Gateway:
        return self.service.gateway

    @property
    def bridge(self) -> BillingBridge:
        return self.service.bridge

    @property
    def channels(self) -> list:
        return self.gateway.channels

    def _heard(self, channel, reading, seconds: float) -> None:
        if reading.values:
            self.answered[reading.meter] = self.gateway.clock.now()

    async def close(self) -> None:
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        await self.service.close()


async def compose(directory: Path, broker: Broker, fleet: AnyFleet, control: Path, stop: asyncio.Event,
                  *, poll_interval_s: float, story: "Story") -> Composed:
    """The gateway for ``fleet`` exactly as ``feikong run --config`` composes it (:class:`Service`, with the
    metrics endpoint and the operator API), from the config files written into ``directory`` with the
    policies file ``control``; the one difference from ``feikong run`` on that file: today and tomorrow are
    working days (:func:`working_today`). Every account gets its small opening credit before any loop runs
    (the first tick would otherwise see empty accounts); then everything runs until ``stop``."""
    path = write_gateway_config(directory, fleet.describe(), broker, poll_interval_s=poll_interval_s,
                                control=control)
    service_config = load_service_config(path)
    service_config = replace(service_config, policies=working_today(service_config.policies))
    metrics, api = MetricsEndpoint(), ApiComponent()
    service = await Service(service_config, ops=[metrics, api]).start()
    composed = Composed(service, {"broker": f"mqtt://{broker.host}:{broker.port}",
                                  "store": service_config.store.url,
                                  "metrics": f"http://127.0.0.1:{metrics.port}/metrics",
                                  "api": f"http://127.0.0.1:{api.port}/api/v1", "config": str(path)})
    try:
        gw = service.gateway
        rng, now = random.Random(story.seed), int(gw.clock.now())
        await gw.credits([Adjustment(f"OPEN-{a.account_id}", a.account_id, rng.randint(*story.opening_fen), now,
                                     "demo", "opening credit") for a in service_config.accounts])
        composed.task = asyncio.create_task(service.run(stop))
        await service.bridge.ready()
    except BaseException:
        stop.set()
        await composed.close()
        raise
    return composed


# ------------------------------------------------------------------------------------------- the story


class Upstream:
    """Billing, the notification system and the field crews, driven from the events billing hears."""

    def __init__(self, billing: BillingSim, fleet: AnyFleet, story: Story) -> None:
        self.billing, self.fleet, self.story = billing, fleet, story
        self.rng = random.Random(story.seed)
        self._notice_rng = random.Random(story.seed + 1)  # used in paho's thread
        self.due: list[tuple[float, str, Callable[[], None]]] = []  # (monotonic time, what, action)
        self.paid_at: dict[str, float] = {}  # account -> monotonic time of its latest payment
        self.payments = 0
        self.latencies: list[float] = []  # payment -> billing hears the verified close (s)
        self.crew_completed = 0
        self._seen: set[str] = set()
        billing.answer_notices(self._receipt)

    def _receipt(self, ev: contract.Event) -> tuple[str, str] | None:
        s, r = self.story, self._notice_rng.random()
        if r < s.delivered:
            return "delivered", f"{ev.data['channel']} delivered"
        if r < s.delivered + s.failed:
            return "failed", "number not reachable"
        if r < s.delivered + s.failed + s.empty:
            return "empty", ""
        return None

    def _new(self, kind: str) -> list[contract.Event]:
        out = [ev for ev in self.billing.of_kind(kind) if ev.id not in self._seen]
        self._seen.update(ev.id for ev in out)
        return out

    async def run(self, stop: asyncio.Event, say: Callable[[str], None], every_s: float = 0.2) -> None:
        while not stop.is_set():
            for line in self.step():
                say(line)
            await _sleep_or_stop(stop, every_s)

    def step(self) -> list[str]:
        """React to what happened since the last step, do what is due; -> lines worth telling the operator."""
        s, now, told = self.story, time.monotonic(), []
        for ev in self._new("relay_confirmed"):
            account, action = ev.data["account_id"], ev.data["action"]
            if action == "trip" and self.rng.random() < s.pay_share:
                amount = self.rng.choice(s.pay_amounts)
                self.due.append((now + self.rng.uniform(*s.pay_after_s), f"pay {account}",
                                 lambda a=account, y=amount: self._pay(a, y)))
            elif action == "close" and account in self.paid_at:
                self.latencies.append(self.billing.arrived[ev.id] - self.paid_at.pop(account))
        for ev in self._new("field_order_created"):
            told.append(f"  field order {ev.data['order_id']} ({ev.data['kind']}) for meter {ev.subject}: "
                        f"{ev.data['reason']}")
            if self.rng.random() < s.crew_share:
                self.due.append((now + self.rng.uniform(*s.crew_after_s), f"crew {ev.data['order_id']}",
                                 lambda e=ev: self._crew(e)))
        for ev in self._new("dead_letter"):
            told.append(f"  dead letter: {ev.data['reason']}")
        for item in sorted(d for d in self.due if d[0] <= now):
            self.due.remove(item)
            item[2]()
        return told

    def _pay(self, account: str, amount: str) -> None:
        self.payments += 1
        self.paid_at[account] = time.monotonic()
        self.billing.pay(account, amount, f"DEMO-{self.payments:06d}-{account}")

    def _crew(self, ev: contract.Event) -> None:
        """On site: the meter repaired and its relay set by hand, then the order reported completed."""
        self.fleet.repair(ev.subject, relay_open=ev.data["kind"] == "disconnect")
        self.crew_completed += 1
        self.billing.send(contract.FieldUpdate(f"U-{ev.data['order_id']}", ev.data["order_id"], "completed",
                                               datetime.now(CN), "crew-7", "meter repaired on site"))


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(max(int(p) - 1, 0), 98)]


async def snapshot(c: Composed, fleet: AnyFleet, up: Upstream, started: float, reads_before: tuple[float, int]) -> dict:
    """Every figure of the summary, as numbers (the tests read them too)."""
    gw, billing = c.gateway, up.billing
    now = gw.clock.now()

    def in_writer():
        orders = gw.control.store.load_entities(ORDERS, "1 = 1")
        return int(gw.control.engine.m_relay_open.sum()), orders

    tripped, orders = await gw.writer.call(in_writer)
    stale = 3 * max([gw.poll_interval_s, *gw.cycle_s.values()])
    lines = fleet.describe()["lines"]
    meters = [a for line in lines for a in line["meters"]]
    online = sum(1 for m in meters if now - c.answered.get(m, -1e18) <= stale)
    cycle: dict[str, float] = {}
    for ch, line in zip(c.channels, lines):
        if ch.name in gw.cycle_s:
            cycle[line["kind"]] = max(cycle.get(line["kind"], 0.0), gw.cycle_s[ch.name])
    t0, n0 = reads_before
    active = [o for o in orders if OrderState(o.state).active]
    trips = [e for e in billing.of_kind("relay_confirmed") if e.data["action"] == "trip"]
    closes = [e for e in billing.of_kind("relay_confirmed") if e.data["action"] == "close"]
    return {
        "elapsed_s": time.monotonic() - started, "meters": len(meters), "online": online,
        "unreachable": len(meters) - online, "tripped": tripped,
        "reads_per_s": (gw.readings_seen - n0) / max(time.monotonic() - t0, 1e-9), "readings": gw.readings_seen,
        "cycle_s": cycle,
        "notices_requested": billing.count("notice_request"), "notices_confirmed": billing.count("notice_delivered"),
        "notices_escalated": billing.count("notice_escalated"), "receipts": dict(billing.receipts),
        "trips": len(trips), "trips_deferred": billing.count("trip_deferred"), "payments": up.payments,
        "closes": len(closes), "close_p50_s": percentile(up.latencies, 50),
        "close_p99_s": percentile(up.latencies, 99),
        "orders": len(orders), "orders_open": len(active),
        "orders_overdue": sum(1 for o in active if o.deadline_at < now),
        "orders_completed": sum(1 for o in orders if o.state == OrderState.COMPLETED),
        "crew_completed": up.crew_completed, "dead_letters": c.bridge.stats.dead_letters,
    }


def render(s: dict) -> str:
    """The summary block: short lines an operator reads at a glance."""
    lat = "-" if s["close_p50_s"] is None else f"p50 {s['close_p50_s']:.2f} s, p99 {s['close_p99_s']:.2f} s"
    cycles = ", ".join(f"{KIND_LABEL[k]} {s['cycle_s'][k]:.1f} s" for k in KINDS if k in s["cycle_s"])
    return "\n".join([
        f"-- {s['elapsed_s']:6.1f} s " + "-" * 60,
        f"   meters    {s['meters']}: {s['online']} online, {s['tripped']} tripped, {s['unreachable']} unreachable",
        f"   reads     {s['reads_per_s']:.0f}/s; last full cycle: {cycles or '-'}",
        f"   notices   {s['notices_requested']} requested, {s['notices_confirmed']} confirmed, "
        f"{s['notices_escalated']} escalated",
        f"   relays    {s['trips']} trips verified, {s['payments']} payments, {s['closes']} closes verified "
        f"(payment to verified close: {lat})",
        f"   field     {s['orders']} orders: {s['orders_open']} open, {s['orders_overdue']} overdue, "
        f"{s['orders_completed']} completed",
        f"   dead letters {s['dead_letters']}",
    ])


def fleet_spec(meters: dict[str, int], **kw) -> FleetSpec:
    """The demo's fleet: ``meters`` (channel kind -> count) drawing 20 to 40 kW, so a small credit lasts
    minutes (the registers count 0.01 kWh: a realistic 1 kW would take an hour to move the balance)."""
    return FleetSpec(meters, load_kw=(20.0, 40.0), **kw)


async def run_demo(spec: FleetSpec, story: Story = Story(), *, cycles: int | None = None,
                   until: Callable[[dict], bool] | None = None, fleet_process: bool = False,
                   interval_s: float = 5.0, poll_interval_s: float = 2.0, out: TextIO = sys.stdout,
                   control: str | Path | None = None) -> dict:
    """Run until Ctrl-C (SIGINT or SIGTERM), ``cycles`` summaries, or a summary's snapshot satisfies ``until``;
    -> the last snapshot, with ``fleet`` (what the simulated meters recorded), ``latencies`` and ``store``
    (table name -> the notices, relay commands and work orders the store holds) added. ``fleet_process``: the simulated fleet runs in a child
    process (its own core; ``fleet`` is then a :class:`FleetProcess`, without the meters' own records)."""
    say = lambda text: print(text, file=out, flush=True)  # noqa: E731
    # pymodbus logs every silent meter as an error with a hex dump; the gateway's own warning says it once
    quiet, level = logging.getLogger("pymodbus"), logging.getLogger("pymodbus").level
    quiet.setLevel(logging.CRITICAL)
    control = Path(control) if control else DEMO_CONTROL
    offset = load_control_config(control).calendar.utc_offset_s
    spec = replace(spec, utc_offset_s=offset)  # the meters keep the utility's time
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    result: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="feikong-demo-") as tmp, Broker(Path(tmp) / "broker") as broker:
            fleet = await (FleetProcess(spec, (broker.host, broker.port), workdir=tmp) if fleet_process else
                           Fleet(spec, (broker.host, broker.port))).start()
            try:
                c = await compose(Path(tmp), broker, fleet, control, stop, poll_interval_s=poll_interval_s,
                                  story=story)
                try:
                    result = await _story(c, fleet, story, stop, cycles, until, interval_s, say)
                finally:
                    stop.set()
                    await c.close()
            finally:
                await fleet.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        quiet.setLevel(level)
    say("feikong demo stopped.")
    return result


def _demo_tokens(directory: Path) -> Tokens:
    """An operator's and a supervisor's token for the demo's API, each in a file of its own (for the console's
    ``--token-file``; a token is never printed)."""
    tokens = Tokens(path=directory / "tokens.toml")
    for name, role in (("demo-operator", "operator"), ("demo-supervisor", "supervisor")):
        token_file = directory / f"{name}.token"
        token_file.write_text(tokens.add(name, role))
        token_file.chmod(0o600)
    return tokens


async def _story(c: Composed, fleet: AnyFleet, story: Story, stop: asyncio.Event, cycles: int | None,
                 until: Callable[[dict], bool] | None, interval_s: float, say) -> dict:
    gw = c.gateway
    billing = await asyncio.to_thread(BillingSim(c.bridge.config.host, c.bridge.config.port,
                                                 client_id="demo-billing").start)
    try:
        up = Upstream(billing, fleet, story)
        lines = fleet.describe()["lines"]
        say(f"feikong demo: {sum(len(line['meters']) for line in lines)} simulated meters on {len(lines)} channels:")
        for ch, line in zip(c.channels, lines):
            say(f"  {ch.name}  ({KIND_LABEL[line['kind']]}, {len(line['meters'])} meters)")
        for name, address in c.addresses.items():
            say(f"{name:8} {address}")
        if "api" in c.addresses:
            tokens = Path(c.addresses["store"].removeprefix("sqlite://")).parent
            say(f"console  feikong meters --api {c.addresses['api'].removesuffix('/api/v1')} "
                f"--token-file {tokens}/demo-operator.token   (a supervisor's: {tokens}/demo-supervisor.token)")
        say(f"watch the contract: mosquitto_sub -p {c.bridge.config.port} -t 'feikong/v1/#' -v")
        faults = {f: sum(1 for v in fleet.faulty.values() if v == f) for f in ("stuck_relay", "silent_after_trip")}
        say(f"every customer starts with {story.opening_fen[0] / 100:.2f}-{story.opening_fen[1] / 100:.2f} yuan of "
            f"credit and uses it up within minutes; {faults['stuck_relay']} meters have stuck relays, "
            f"{faults['silent_after_trip']} fall silent once tripped. Ctrl-C stops.")
        billing.publish(f"{contract.IN}/payments", b'{"payment_id": "BAD-1", "account": "A00001", "amount": 5.5}')
        started, done = time.monotonic(), 0
        mark = (started, gw.readings_seen)
        snap: dict = {}
        upstream = asyncio.create_task(up.run(stop, say))
        try:
            while not stop.is_set() and (cycles is None or done < cycles):
                await _sleep_or_stop(stop, interval_s)
                snap = await snapshot(c, fleet, up, started, mark)
                mark = (time.monotonic(), gw.readings_seen)
                done += 1
                say(render(snap))
                if until is not None and until(snap):
                    break
        finally:
            stop.set()
            await upstream
        snap["cycles"] = done
        snap["latencies"] = list(up.latencies)
        snap["fleet"] = fleet
        store = gw.control.store
        snap["store"] = await gw.writer.call(lambda: {t.name: store.load_entities(t, "1 = 1")
                                                      for t in (NOTICES, COMMANDS, ORDERS)})
        return snap
    finally:
        await asyncio.to_thread(billing.stop)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
