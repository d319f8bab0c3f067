"""The soak: a simulated fleet, billing, notifications and crews against `feikong run --config` gateway
processes, while chaos kills and restarts what a utility's gateway depends on; then a quiet settling phase,
then the end checks (tests/soak/checks.py).

Started here, in a temporary directory: a private PostgreSQL server (tests/soak/postgres.py), a Mosquitto
broker (simulators/broker.py), the fleet in a child process (simulators/fleet.py, with 20% misbehaving meters:
stuck relays, meters that fall silent once tripped, replies with bad checksums) and ``instances`` gateway child
processes, each restarted by the harness when it exits (as systemd's ``Restart=`` would). Upstream, in this
process: a billing system that pays (with duplicates, replays of older payments after newer ones, payments
dated before earlier ones, and re-sends of what it has not seen confirmed), a notification system that
answers notice requests with receipts, and crews that complete field orders.

The schedule is drawn from the seed and printed: gateway SIGKILLs, broker restarts (clean, and SIGKILL),
PostgreSQL restarts (clean, and crash), each at least once, at random times in the chaos phase. When it
ends, every account is paid up ("CLEAR-" payments) and everything stays up for the settling phase.
"""
from __future__ import annotations

import asyncio
import atexit
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Callable, TextIO

from protocols.mqtt import billing as contract
from simulators.billing import CN, BillingSim
from simulators.broker import Broker
from simulators.fleet import FleetProcess, FleetSpec

from .checks import Evidence, run_checks
from .postgres import PrivatePostgres, restart_safe_port

ROOT = Path(__file__).resolve().parents[2]
SOAK_CONTROL = Path(__file__).with_name("soak.control.toml")
#: every kind of chaos event; the schedule has each at least once
EVENT_KINDS = ("gateway_kill", "broker_restart", "broker_kill", "pg_restart", "pg_crash")
PRICE_YUAN = "10.0000"  # per kWh: with 20-40 kW a small credit lasts seconds, a clearing payment days
CLEARING_YUAN = "50000.00"  # far more than any arrears, and more than a run can use up
HYSTERESIS_FEN = 20  # the gateways' [thresholds]: out of TRIP (level 0, no overdraft) once 20 fen above it
LEASE_TTL_S = 5  # the gateways' [cluster] lease_ttl_s (several instances)


@dataclass(frozen=True)
class SoakSpec:
    meters: int = 40  # DL/T 645 meters over TCP, and a quarter of them behind an MQTT concentrator (frame mode)
    per_line: int = 10
    instances: int = 1
    seed: int = 1
    chaos_s: float = 90.0
    settle_s: float = 60.0
    #: extra events beyond one of each kind, drawn at random among EVENT_KINDS (gateway kills weigh double)
    extra_events: int = 2
    protected_share: float = 0.1  # accounts of class protected (never tripped automatically)
    stuck_relay: float = 0.06  # misbehaving meters: 20% in all
    silent_after_trip: float = 0.07
    corrupt_frames: float = 0.07
    poll_interval_s: float = 1.0
    #: after the settling phase, at most this much longer for every payment to be confirmed
    confirm_timeout_s: float = 60.0


@dataclass
class ChaosEvent:
    at_s: float  # from the start of the chaos phase
    kind: str
    target: str = ""  # the instance (gateway_kill)
    down_s: float = 0.0  # how long it stays down
    applied_at_s: float | None = None
    #: gateway_kill: it waits for a relay command on the wire (a relay_sent event) and kills its sender then
    in_flight: bool = False
    in_flight_hit: bool = False  # ... and one was seen (the kill landed while a command was in flight)
    takeover: bool | None = None  # several instances, a kill longer than the lease: another took the lease


def schedule(spec: SoakSpec) -> list[ChaosEvent]:
    """The chaos events of a run: each kind once plus ``extra_events``, at seeded random times in the middle
    80% of the chaos phase."""
    rng = random.Random(spec.seed)
    kinds = list(EVENT_KINDS) + rng.choices(EVENT_KINDS, weights=(2, 1, 1, 1, 1), k=spec.extra_events)
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0.1, 0.9) * spec.chaos_s for _ in kinds)
    events = []
    for at, kind in zip(times, kinds):
        target = f"gw{rng.randint(1, spec.instances)}" if kind == "gateway_kill" else ""
        events.append(ChaosEvent(round(at, 1), kind, target, round(rng.uniform(1.0, 5.0), 1)))
    kills = [e for e in events if e.kind == "gateway_kill"]
    kills[0].in_flight = True  # the first kill lands while a relay command is in flight
    if spec.instances > 1:  # and the last stays down longer than a lease lives: another instance takes over
        kills[-1].down_s = LEASE_TTL_S + 5.0
    return events


# ------------------------------------------------------------------------------------------ the gateways


class GatewayProcess:
    """One `feikong run --config` child, restarted whenever it exits unless held down (a SIGKILL's downtime)."""

    restart_s = 1.0  # systemd's RestartSec, shortened

    def __init__(self, name: str, config: Path, log: Path) -> None:
        self.name, self.config, self.log_path = name, config, log
        self.proc: asyncio.subprocess.Process | None = None
        self.held = False
        self.exits: list[dict] = []  # {at, code, killed}
        self.starts = 0
        self._killing = False
        self._task: asyncio.Task | None = None

    async def _spawn(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self.starts + 1} at {time.time():.3f}\n".encode())
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config), cwd=ROOT, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def _supervise(self) -> None:
        while True:
            if not self.held:
                await self._spawn()
                code = await self.proc.wait()
                self.exits.append({"at": time.time(), "code": code, "killed": self._killing})
                self._killing = False
            await asyncio.sleep(self.restart_s)

    async def kill(self, down_s: float) -> bool:
        """SIGKILL; restarted ``down_s`` later. One between restarts (it exited: the store was away at its
        start, say) is killed once it runs again, so that every kill lands on a running gateway; False when it
        did not run again within 10 s (no kill was sent: not counted as applied)."""
        for _ in range(200):
            if self.running:
                break
            await asyncio.sleep(0.05)
        self.held = True
        killed = self.proc is not None and self.proc.returncode is None
        if killed:
            self._killing = True
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        await asyncio.sleep(down_s)
        self.held = False
        return killed

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean stop), SIGKILL if it takes longer than ``timeout``; -> its exit code."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.proc is None or self.proc.returncode is not None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self) -> int:
        return len(self.log())


# ------------------------------------------------------------------------------------------ upstream


@dataclass
class Sent:
    """A payment billing made (its id is unique; every publication of it repeats the same content)."""

    payment_id: str
    account: str
    amount: str
    paid_at: datetime
    published: list[float] = field(default_factory=list)  # epoch s of each publication

    def message(self) -> contract.Payment:
        return contract.Payment(self.payment_id, self.account, self.amount, self.paid_at, "soak")


class Upstream:
    """Billing (payments, with their duplicates, replays and re-sends), notifications and crews."""

    def __init__(self, billing: BillingSim, fleet: FleetProcess, meter_of: dict[str, str], seed: int) -> None:
        self.billing, self.fleet, self.meter_of = billing, fleet, meter_of
        self.rng = random.Random(seed * 7 + 1)
        notice_rng = random.Random(seed * 7 + 2)  # used in paho's thread only
        self.sent: dict[str, Sent] = {}
        self.counts = {"published": 0, "duplicates": 0, "replays": 0, "out_of_order": 0, "resent": 0,
                       "crew_completed": 0, "crew_skipped_cancelled": 0, "crew_skipped_paid": 0}
        self.cleared: set[str] = set()
        self.paying = True
        self.due: list[tuple[float, int, Callable[[], None]]] = []
        self._n = 0
        self._seen: set[str] = set()

        def receipt(ev: contract.Event) -> tuple[str, str] | None:
            r = notice_rng.random()
            if r < 0.85:
                return "delivered", f"{ev.data['channel']} delivered"
            if r < 0.90:
                return "failed", "number not reachable"
            if r < 0.95:
                return "empty", ""
            return None
        billing.answer_notices(receipt)

    def _later(self, delay_s: float, action: Callable[[], None]) -> None:
        self._n += 1
        self.due.append((time.monotonic() + delay_s, self._n, action))

    def publish(self, s: Sent) -> None:
        s.published.append(time.time())
        self.billing.send(s.message())
        self.counts["published"] += 1

    def pay(self, account: str, amount: str, prefix: str = "PAY", paid_at: datetime | None = None) -> Sent:
        pid = f"{prefix}-{len(self.sent) + 1:06d}-{account}"
        s = self.sent[pid] = Sent(pid, account, amount, paid_at or datetime.now(CN))
        self.publish(s)
        if self.rng.random() < 0.3:  # billing's retry after a lost acknowledgement: the same payment again
            self.publish(s)
            self.counts["duplicates"] += 1
        return s

    def open_accounts(self, accounts: list[str]) -> None:
        """Each account's opening credit: a payment like any other, small enough to run out in the chaos."""
        for a in accounts:
            self.pay(a, f"{self.rng.randint(100, 300) / 100:.2f}", "OPEN")

    def clear_all(self) -> None:
        """The settling phase's start: every account not yet cleared pays enough to stay closed for days."""
        self.paying = False
        if not self.counts["replays"]:  # every run replays an old payment and sends one out of order at least once
            self.publish(next(iter(self.sent.values())))
            self.counts["replays"] += 1
        if not self.counts["out_of_order"]:
            s = next(iter(self.sent.values()))
            self.pay(s.account, "1.00", "PAY", s.paid_at - timedelta(seconds=30))
            self.counts["out_of_order"] += 1
        for a in sorted(self.meter_of):
            if a not in self.cleared:
                self.cleared.add(a)
                self.pay(a, CLEARING_YUAN, "CLEAR")

    def _new(self, kind: str) -> list[contract.Event]:
        out = [ev for ev in self.billing.of_kind(kind) if ev.id not in self._seen]
        self._seen.update(ev.id for ev in out)
        return out

    def step(self) -> None:
        now = time.monotonic()
        for ev in self._new("relay_confirmed"):
            account = ev.data["account_id"]
            if ev.data["action"] == "trip" and self.paying and self.rng.random() < 0.8:
                self._later(self.rng.uniform(2, 8), lambda a=account: self._pay_tripped(a))
        for ev in self._new("field_order_created"):
            self._later(self.rng.uniform(3, 10), lambda e=ev, seen=time.time(): self._crew(e, seen))
        if self.paying and self.sent and self.rng.random() < 0.05:  # an old payment replayed after newer ones
            s = self.rng.choice(list(self.sent.values())[: max(1, len(self.sent) // 2)])
            self.publish(s)
            self.counts["replays"] += 1
        for item in sorted(d for d in self.due if d[0] <= now):
            self.due.remove(item)
            item[2]()

    def _pay_tripped(self, account: str) -> None:
        if not self.paying or account in self.cleared:
            return
        if self.rng.random() < 0.4:
            self.cleared.add(account)
            self.pay(account, CLEARING_YUAN, "CLEAR")
            return
        earlier = [s.paid_at for s in self.sent.values() if s.account == account]
        paid_at = None
        if earlier and self.rng.random() < 0.3:  # arrives after a newer one, dated before it
            paid_at = max(earlier) - timedelta(seconds=self.rng.uniform(1, 30))
            self.counts["out_of_order"] += 1
        self.pay(account, f"{self.rng.randint(200, 800) / 100:.2f}", "PAY", paid_at)

    def resend_unconfirmed(self, older_than_s: float = 15.0) -> int:
        """What a billing system does with payments it has not seen confirmed: send them again."""
        now, n = time.time(), 0
        for s in list(self.sent.values()):
            if s.payment_id not in self.billing.applied and now - s.published[-1] > older_than_s:
                self.publish(s)
                n += 1
        self.counts["resent"] += n
        return n

    def _crew(self, ev: contract.Event, seen_at: float) -> None:
        """On site: the meter repaired and its relay set by hand, unless the order was cancelled meanwhile, or
        (a disconnect) the customer paid since it was given (the crew asks the office first: the cancellation may
        still be on its way while the broker or the database is down)."""
        order_id = ev.data["order_id"]
        if any(c.data.get("order_id") == order_id for c in self.billing.of_kind("field_order_cancelled")):
            self.counts["crew_skipped_cancelled"] += 1
            return
        if ev.data["kind"] == "disconnect" and any(s.account == ev.data["account_id"] and s.published[0] > seen_at - 5
                                                   for s in self.sent.values()):
            self.counts["crew_skipped_paid"] += 1
            return
        self.fleet.repair(ev.subject, relay_open=ev.data["kind"] == "disconnect")
        self.billing.send(contract.FieldUpdate(f"U-{order_id}", order_id, "completed", datetime.now(CN), "crew-soak",
                                               "repaired on site"))
        self.counts["crew_completed"] += 1

    async def run(self, stop: asyncio.Event, resend_every_s: float = 10.0) -> None:
        last_resend = time.monotonic()
        while not stop.is_set():
            self.step()
            if time.monotonic() - last_resend > resend_every_s:
                self.resend_unconfirmed()
                last_resend = time.monotonic()
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass


# ------------------------------------------------------------------------------------------ files


def fleet_spec(spec: SoakSpec) -> FleetSpec:
    behind_concentrator = spec.meters // 4
    return FleetSpec({"dlt645_tcp": spec.meters - behind_concentrator, "mqtt_frame": behind_concentrator},
                     per_line=spec.per_line, load_kw=(20.0, 40.0), stuck_relay=spec.stuck_relay,
                     silent_after_trip=spec.silent_after_trip, corrupt_frames=spec.corrupt_frames,
                     exact_faults=True, utc_offset_s=8 * 3600, seed=spec.seed)


def write_fleet_csv(path: Path, layout: dict, spec: SoakSpec) -> tuple[dict[str, str], set[str]]:
    """One account per meter; a seeded share of them protected. -> (account -> meter, protected accounts)."""
    rng = random.Random(spec.seed * 7 + 3)
    rows = ["account_id,class,tariff,area,name,address,lat,lon,notice_channels,contacts,meter_id,channel"]
    meter_of, protected = {}, set()
    for n, line in enumerate(layout["lines"], 1):
        for address in line["meters"]:
            account = f"S{address[-6:]}"
            cls = "protected" if rng.random() < spec.protected_share else "residential"
            if cls == "protected":
                protected.add(account)
            phone = f"139{address[-8:]}"
            rows.append(f"{account},{cls},soak,feeder-{n},Customer {account},{address} Soak Road,31.2,121.5,"
                        f"sms;voice;app,sms={phone};voice={phone};app=app-{account},{address},line{n}")
            meter_of[account] = address
    path.write_text("\n".join(rows) + "\n")
    return meter_of, protected


def write_control(path: Path, today: date) -> None:
    workdays = json.dumps([(today + timedelta(days=i)).isoformat() for i in (-1, 0, 1)])
    text = SOAK_CONTROL.read_text().replace('country = "CN"\n', f'country = "CN"\nextra_workdays = {workdays}\n', 1)
    path.write_text(text)


def gateway_toml(spec: SoakSpec, instance: str, store_url: str, broker: Broker, layout: dict, work: Path) -> str:
    cluster = spec.instances > 1
    parts = [f'[store]\nurl = "{store_url}"\n',
             f'[control]\nfile = "{work / "control.toml"}"\n',
             f"[gateway]\npoll_interval_s = {spec.poll_interval_s}\ntick_s = 0.2\n",
             "[thresholds]\ndefault_warn1_fen = 150\ndefault_warn2_fen = 80\nwarn1_min_fen = 100\n"
             f"warn2_min_fen = 50\nhysteresis_fen = {HYSTERESIS_FEN}\n",
             f'[fleet]\nfile = "{work / "fleet.csv"}"\ntariffs = "{work / "tariffs.json"}"\n',
             f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ninstance = "{instance}"\nreconnect_max_s = 2\n'
             + ('shared_group = "feikong"\n' if cluster else ""),
             "[metrics]\nport = 0\n", "[http]\nport = 0\n"]
    if cluster:
        parts.append(f"[cluster]\nlease_ttl_s = {LEASE_TTL_S}\n")
    for n, line in enumerate(layout["lines"], 1):
        if line["kind"] == "dlt645_tcp":
            host, _, port = line["where"].rpartition(":")
            parts.append(f'[[channels]]\nkind = "dlt645_tcp"\nname = "line{n}"\nhost = "{host}"\nport = {port}\n'
                         "baud = 9600\ntimeout_s = 0.2\nmargin_s = 0.2\nretries = 1\n")
        else:
            parts.append(f'[[channels]]\nkind = "concentrator"\nname = "line{n}"\nid = "{line["where"]}"\n'
                         "baud = 9600\ntimeout_s = 0.3\nmargin_s = 1.0\nretries = 1\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ the run


class Soak:
    def __init__(self, spec: SoakSpec, out: TextIO = sys.stderr, workdir: Path | None = None) -> None:
        self.spec, self.out = spec, out
        self.workdir = workdir
        self.events = schedule(spec)
        self.applied: dict[str, int] = {k: 0 for k in EVENT_KINDS}

    def say(self, text: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {text}", file=self.out, flush=True)

    async def run(self) -> dict:
        """The whole soak; -> the summary (also what the checks found)."""
        started = time.monotonic()
        keep = self.workdir is not None
        work = self.workdir or Path(tempfile.mkdtemp(prefix="feikong-soak-"))
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        spec = self.spec
        self.say(f"seed {spec.seed}, {spec.meters} meters, {spec.instances} gateway instance(s), chaos "
                 f"{spec.chaos_s:.0f} s then settling {spec.settle_s:.0f} s; work directory {work}")
        self.say("schedule: " + "; ".join(f"t+{e.at_s:.1f}s {e.kind}{' ' + e.target if e.target else ''} "
                                          f"(down {e.down_s:.1f}s)" for e in self.events))
        fleet = billing = None
        gateways: list[GatewayProcess] = []
        pg = PrivatePostgres()
        broker = Broker(work / "broker")
        broker.port = restart_safe_port()  # it is restarted on this port: keep it out of the ephemeral range
        broker._write_config()

        def leftovers() -> None:
            """Whatever way this process ends (an exception, a KeyboardInterrupt, sys.exit), no server stays."""
            for g in gateways:
                if g.running:
                    g.proc.kill()
            if fleet is not None and fleet.proc is not None and fleet.proc.returncode is None:
                try:
                    os.killpg(fleet.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            broker.kill()
            pg.close()
        atexit.register(leftovers)
        try:
            pg.start()
            broker.start()
            fleet = await FleetProcess(fleet_spec(spec), (broker.host, broker.port), workdir=work).start()
            layout = fleet.describe()
            meter_of, protected = write_fleet_csv(work / "fleet.csv", layout, spec)
            (work / "tariffs.json").write_text(json.dumps(
                {"soak": [{"effective_from": 0, "kind": "flat", "price": PRICE_YUAN}]}))
            write_control(work / "control.toml", datetime.now(CN).date())
            for i in range(1, spec.instances + 1):
                path = work / f"gw{i}.toml"
                path.write_text(gateway_toml(spec, f"gw{i}", pg.dsn, broker, layout, work))
                gateways.append(GatewayProcess(f"gw{i}", path, work / f"gw{i}.log"))
            billing = await asyncio.to_thread(BillingSim(broker.host, broker.port, client_id="soak-billing").start)
            up = Upstream(billing, fleet, meter_of, spec.seed)
            for g in gateways:
                g.start()
            await self._wait_online(billing, gateways, 120)
            self.say(f"gateways online; fleet faults: {dict(Counter(fleet.faulty.values()))}; "
                     f"{len(protected)} protected accounts")
            up.open_accounts(sorted(meter_of))
            stop = asyncio.Event()
            upstream = asyncio.create_task(up.run(stop))
            chaos_started = time.monotonic()
            try:
                await self._chaos(chaos_started, pg, broker, {g.name: g for g in gateways}, billing)
                rest = spec.chaos_s - (time.monotonic() - chaos_started)
                if rest > 0:
                    await asyncio.sleep(rest)
                self.say("chaos over: everything up; every account paid up; settling")
                await self._all_up(pg, broker, billing, gateways)
                up.clear_all()
                await asyncio.sleep(spec.settle_s)
                confirmed = await self._confirmed(up, spec.confirm_timeout_s)
                self.say(f"payments: {len(up.sent)} unique, {confirmed} confirmed")
            finally:
                stop.set()
                await upstream
            ended_at = time.time()
            codes = {g.name: await g.stop() for g in gateways}
            records = (await fleet.report(sorted(meter_of.values())))["meters"]
            evidence = Evidence.collect(pg.dsn, up, billing, records, layout, protected, meter_of,
                                        work / "control.toml", ended_at,
                                        {"trip_level_fen": 0, "close_margin_fen": HYSTERESIS_FEN})
            results = run_checks(evidence)
            if keep:  # with the logs and configs: all a failure needs looking into
                (work / "records.json").write_text(json.dumps(records))
                await asyncio.to_thread(pg.dump, work / "feikong.sql")
            summary = self._summary(up, billing, gateways, codes, evidence, results, time.monotonic() - started)
            for r in results:
                self.say(f"check {r.name}: {'passed' if r.passed else 'FAILED'} ({r.checked} checked)"
                         + "".join(f"\n    {f}" for f in r.failures[:20]))
            return summary
        finally:
            if billing is not None:
                await asyncio.to_thread(billing.stop)
            for g in gateways:
                await g.stop(5)
            if fleet is not None:
                await fleet.stop()
            leftovers()
            atexit.unregister(leftovers)
            if not keep and not os.environ.get("FEIKONG_SOAK_KEEP"):
                import shutil
                shutil.rmtree(work, ignore_errors=True)

    async def _wait_online(self, billing: BillingSim, gateways: list[GatewayProcess], timeout: float) -> None:
        names = [g.name for g in gateways]

        def online(b: BillingSim) -> bool:
            return all(b.status.get(n) is not None and b.status[n].state == "online" for n in names)
        try:
            await asyncio.to_thread(billing.wait_for, online, timeout, f"gateways {names} online")
        except TimeoutError:
            raise RuntimeError("gateways not online; their logs:\n" +
                               "\n".join(g.log()[-3000:] for g in gateways)) from None

    async def _relay_in_flight(self, billing: BillingSim, target: str, timeout: float = 20.0) -> tuple[str, bool]:
        """Until a gateway sends a relay command (its ``relay_sent`` event; the meter's answer not yet in):
        -> (that gateway, True); or (``target``, False) if none comes within ``timeout``."""
        seen = billing.count("relay_sent")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if billing.count("relay_sent") > seen:
                return billing.of_kind("relay_sent")[-1].instance, True
            await asyncio.sleep(0.01)
        return target, False

    async def _chaos(self, t0: float, pg: PrivatePostgres, broker: Broker, gateways: dict,
                     billing: BillingSim) -> None:
        for e in self.events:
            wait = t0 + e.at_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            e.applied_at_s = round(time.monotonic() - t0, 1)
            if e.kind == "gateway_kill":
                if e.in_flight:
                    e.target, e.in_flight_hit = await self._relay_in_flight(billing, e.target)
                    e.applied_at_s = round(time.monotonic() - t0, 1)
                others = {n: g.log_size() for n, g in gateways.items() if n != e.target}
                self.say(f"t+{e.applied_at_s:.1f}s {e.kind} {e.target} (down {e.down_s:.1f}s)"
                         + (" with a relay command in flight" if e.in_flight_hit else ""))
                if not await gateways[e.target].kill(e.down_s):
                    self.say(f"  {e.target} was not running: no kill sent")
                    continue
                if others and e.down_s > LEASE_TTL_S:
                    e.takeover = any("took the lease" in gateways[n].log()[size:] for n, size in others.items())
                    self.say(f"  another instance took the lease meanwhile: {e.takeover}")
                self.applied[e.kind] += 1
                continue
            self.say(f"t+{e.applied_at_s:.1f}s {e.kind} {e.target} (down {e.down_s:.1f}s)")
            if e.kind in ("broker_restart", "broker_kill"):
                await asyncio.to_thread(broker.stop if e.kind == "broker_restart" else broker.kill)
                await asyncio.sleep(e.down_s)
                await asyncio.to_thread(broker.start)
            else:
                await asyncio.to_thread(pg.stop, "fast" if e.kind == "pg_restart" else "immediate")
                await asyncio.sleep(e.down_s)
                await asyncio.to_thread(pg.start)
            self.applied[e.kind] += 1

    async def _all_up(self, pg: PrivatePostgres, broker: Broker, billing: BillingSim, gateways: list) -> None:
        if not pg.running:
            await asyncio.to_thread(pg.start)
        if not broker.running:
            await asyncio.to_thread(broker.start)
        for g in gateways:
            g.held = False
        await self._wait_online(billing, gateways, 120)

    async def _confirmed(self, up: Upstream, timeout: float) -> int:
        """Until billing has seen every payment confirmed (re-sending what it has not), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing = [p for p in up.sent if p not in up.billing.applied]
            if not missing:
                break
            up.resend_unconfirmed(older_than_s=5.0)
            await asyncio.sleep(1.0)
        return sum(1 for p in up.sent if p in up.billing.applied)

    def _summary(self, up: Upstream, billing: BillingSim, gateways: list, codes: dict, evidence: Evidence,
                 results: list, wall_s: float) -> dict:
        confirmed = billing.of_kind("relay_confirmed")
        return {
            "soak": "feikong", "seed": self.spec.seed, "spec": asdict(self.spec),
            "events": [asdict(e) for e in self.events], "events_applied": dict(self.applied),
            "gateway_starts": {g.name: g.starts for g in gateways},
            "gateway_exits": {g.name: [e["code"] for e in g.exits] for g in gateways},
            "gateway_stop_codes": codes,
            "payments": {"unique": len(up.sent), **{k: v for k, v in up.counts.items() if not k.startswith("crew")}},
            "crews": {k.removeprefix("crew_"): v for k, v in up.counts.items() if k.startswith("crew")},
            "trips_confirmed": sum(1 for e in confirmed if e.data["action"] == "trip"),
            "closes_confirmed": sum(1 for e in confirmed if e.data["action"] == "close"),
            "field_orders": billing.count("field_order_created"),
            "notice_receipts": dict(billing.receipts),
            "faults": dict(Counter(evidence.faulty.values())),
            "counts": evidence.counts(),
            "checks": {r.name: {"passed": r.passed, "checked": r.checked, "failures": r.failures[:20],
                                **({"raced_crew": r.raced_crew} if r.name == "no_action_twice" else {})}
                       for r in results},
            "checks_passed": sum(r.passed for r in results), "checks_total": len(results),
            "passed": all(r.passed for r in results),
            "wall_s": round(wall_s, 1),
        }
