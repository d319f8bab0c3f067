"""A simulated fleet: many meters across every kind of channel from one description, started in one call.

A :class:`FleetSpec` says how many meters sit on each kind of channel, how many share a line, their load and
their faults; :meth:`Fleet.start` builds the meters and serves them: one TCP listener per DL/T 645 bus (as a
transparent serial server presents one RS-485 line per port), a real pseudo-terminal per serial bus, a
Modbus TCP server per line (device ids 1..247), and one MQTT connection per concentrator (transparent
``frame`` mode or ``json`` mode). :attr:`Fleet.lines` tells a head-end where each line is and which meters
are on it.

Some DL/T 645 TCP buses may emulate their RS-485 line (``line_rate_lines`` of ``line_rate_per_line`` meters at
``line_rate_baud``: every byte takes its time, and each line's statistics say how long it carried bytes); a
share of meters may start tripped (``tripped``: relay open, as customers in arrears); ``per_line_by_kind``
sizes each kind's lines apart (a 100,000-meter fleet: config/simfleet.100k.json).

Faults, drawn once per meter from the spec's seed: a share of meters whose relay acknowledges but does not
move (``stuck_relay``), a share that stop answering a few seconds after they were tripped (a dead
communication module, ``silent_after_trip``), a share of DL/T 645 meters whose replies come back corrupted
(bad checksum) half the time (``corrupt_frames``: a failing line driver), and per-request transient faults on
the DL/T 645 lines (``transient``, the serial simulator's mix). :meth:`Fleet.repair` is the field crew on site:
the fault gone, the relay set by hand.

In-process (tests, the demo): ``fleet = await Fleet(spec, broker=(host, port)).start()`` ...
``await fleet.stop()``. As a child process, so the simulators do not share a core with the gateway:
``python -m simulators.fleet SPEC.json [--broker HOST:PORT] [--commands]`` prints :meth:`Fleet.describe` as
one JSON line on standard output once everything listens, and serves until SIGINT or SIGTERM (with
``--commands``: it also takes one JSON command a line on standard input, ``{"repair": ADDRESS, "relay_open":
false}`` or ``{"report": [ADDRESS, ...]}`` (answered with :meth:`Fleet.report` as one JSON line), and stops
when standard input closes, so it never outlives its parent). :class:`FleetProcess` is that
child seen from the parent, with the same ``describe``, ``faulty``, ``repair``, ``report`` and ``stop``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Callable

from protocols.modbus import load_profile
from simulators.concentrator import SimConcentrator
from simulators.dlt645 import Faults, PtyBus, SimBus, SimMeter, serve_tcp
from simulators.dlt645.meter import _PROFILE
from simulators.modbus import Faults as ModbusFaults
from simulators.modbus import ModbusSimMeter
from simulators.modbus import serve_tcp as serve_modbus_tcp

#: channel kinds, in the order lines are built (and addresses given out)
KINDS = ("dlt645_tcp", "dlt645_pty", "modbus_tcp", "mqtt_frame", "mqtt_json")
MQTT_KINDS = ("mqtt_frame", "mqtt_json")
MODBUS_MAX_DEVICES = 247
#: a ``corrupt_frames`` meter's replies: this share of them has a bad checksum
CORRUPT_REPLY_RATE = 0.5


class FleetError(ValueError):
    """A fleet description that cannot be built; the message names the key."""


@dataclass(frozen=True)
class FleetSpec:
    meters: dict[str, int]  # kind (one of KINDS) -> how many meters
    per_line: int = 100  # meters sharing one bus, listener, Modbus line or concentrator
    per_line_by_kind: dict = field(default_factory=dict)  # kind -> meters per line, where not per_line
    first_address: int = 1
    load_kw: tuple[float, float] = (0.4, 3.0)  # mean load of each meter at the hour the fleet starts
    stuck_relay: float = 0.0  # share of meters whose relay does not move
    silent_after_trip: float = 0.0  # share of meters that stop answering once tripped...
    silent_delay_s: float = 3.0  # ...this long after the relay opened (so the trip itself is verified)
    corrupt_frames: float = 0.0  # share of DL/T 645 meters whose replies are often corrupted (CORRUPT_REPLY_RATE)
    transient: float = 0.0  # per-request transient faults on DL/T 645 meters (Faults.uniform)
    turnaround_s: float = 0.005  # DL/T 645 meters answer this long after the request (the line: host speed)
    modbus_profile: str = "hiking_dds238_2_znsr"
    utc_offset_s: int | None = None  # the meters keep local time at this offset (None: the host's local time)
    seed: int = 0
    #: the first this many DL/T 645 TCP buses emulate their RS-485 line: bytes take their time at this baud
    #: (11 bits a character, 8E1), with this many meters each (taken from the dlt645_tcp count)
    line_rate_lines: int = 0
    line_rate_per_line: int = 40
    line_rate_baud: int = 2400
    tripped: float = 0.0  # share of meters whose relay is open when the fleet starts (customers in arrears)

    def __post_init__(self) -> None:
        unknown = [k for k in self.meters if k not in KINDS]
        if unknown:
            raise FleetError(f"meters: unknown channel kind(s) {unknown}; allowed: {', '.join(KINDS)}")
        bad = {k: n for k, n in self.meters.items() if not isinstance(n, int) or n < 0}
        if bad:
            raise FleetError(f"meters: counts must be whole numbers >= 0, got {bad}")
        if not sum(self.meters.values()):
            raise FleetError("meters: the fleet has no meters")
        if not isinstance(self.per_line, int) or self.per_line < 1:
            raise FleetError(f"per_line must be a whole number >= 1, got {self.per_line!r}")
        for kind, n in self.per_line_by_kind.items():
            if kind not in KINDS:
                raise FleetError(f"per_line_by_kind: unknown channel kind {kind!r}; allowed: {', '.join(KINDS)}")
            if not isinstance(n, int) or n < 1:
                raise FleetError(f"per_line_by_kind.{kind} must be a whole number >= 1, got {n!r}")
        lo, hi = self.load_kw
        if not 0 < lo <= hi:
            raise FleetError(f"load_kw must be (low, high) with 0 < low <= high, got {self.load_kw!r}")
        for name in ("stuck_relay", "silent_after_trip", "corrupt_frames", "transient"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FleetError(f"{name} must be a share between 0 and 1, got {getattr(self, name)!r}")
        if self.stuck_relay + self.silent_after_trip + self.corrupt_frames > 1.0:
            raise FleetError("stuck_relay + silent_after_trip + corrupt_frames must not exceed 1")
        if self.silent_delay_s < 0:
            raise FleetError(f"silent_delay_s must not be negative, got {self.silent_delay_s!r}")
        if self.turnaround_s < 0:
            raise FleetError(f"turnaround_s must not be negative, got {self.turnaround_s!r}")
        for name in ("line_rate_lines", "line_rate_per_line", "line_rate_baud"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "line_rate_lines" else 1):
                raise FleetError(f"{name} must be a whole number >= {0 if name == 'line_rate_lines' else 1}, "
                                 f"got {getattr(self, name)!r}")
        if self.line_rate_lines * self.line_rate_per_line > self.meters.get("dlt645_tcp", 0):
            raise FleetError(f"line_rate_lines x line_rate_per_line ({self.line_rate_lines} x "
                             f"{self.line_rate_per_line}) exceeds meters.dlt645_tcp "
                             f"({self.meters.get('dlt645_tcp', 0)}): the emulated lines are DL/T 645 TCP buses")
        if not 0.0 <= self.tripped <= 1.0:
            raise FleetError(f"tripped must be a share between 0 and 1, got {self.tripped!r}")
        if self.first_address < 0 or self.first_address + self.total > 10**12:
            raise FleetError(f"first_address {self.first_address}: the addresses run past 999999999999")

    @property
    def total(self) -> int:
        return sum(self.meters.values())

    @classmethod
    def from_dict(cls, data: dict) -> "FleetSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FleetError(f"unknown key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        if "meters" not in data:
            raise FleetError("meters: required (channel kind -> count)")
        data = dict(data)
        if "load_kw" in data:
            data["load_kw"] = tuple(data["load_kw"])
        return cls(**data)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


@dataclass
class Line:
    """One line of the fleet: its kind, where a head-end reaches it, and its meters."""

    kind: str
    where: str  # host:port (TCP kinds), the pty's path, or the concentrator id (MQTT kinds)
    meters: list[SimMeter]
    baud: int | None = None  # the emulated line rate (None: as fast as the host)
    bus: SimBus | None = None  # DL/T 645 kinds: the bus, with its statistics

    def describe(self) -> dict:
        out = {"kind": self.kind, "where": self.where, "meters": [m.address for m in self.meters]}
        if self.kind == "modbus_tcp":
            out["device_ids"] = [m.device_id for m in self.meters]
        if self.baud is not None:
            out["baud"] = self.baud
        return out

    def stats(self) -> dict:
        """What the line carried: requests and replies, and how long the emulated line was busy (s)."""
        out = {"where": self.where, "kind": self.kind, "baud": self.baud}
        if self.bus is not None:
            st = self.bus.stats
            out.update(requests=st.requests, replies=st.replies, busy_s=round(st.busy_s, 6))
        return out


@dataclass
class Fleet:
    spec: FleetSpec
    broker: tuple[str, int] | None = None  # the MQTT broker the concentrators connect to
    clock: Callable[[], datetime] | None = None  # the meters' (local, naive) time; None: by spec.utc_offset_s
    lines: list[Line] = field(default_factory=list)
    meters: dict[str, SimMeter] = field(default_factory=dict)
    #: address -> the fault the meter was built with ("stuck_relay", "silent_after_trip" or "corrupt_frames")
    faulty: dict[str, str] = field(default_factory=dict)
    #: addresses of the silent-after-trip meters that have gone silent
    silenced: set[str] = field(default_factory=set)
    #: addresses of the meters whose relay was open at the start (``FleetSpec.tripped``)
    tripped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.clock is None:
            offset = self.spec.utc_offset_s
            zone = None if offset is None else timezone(timedelta(seconds=offset))
            self.clock = datetime.now if zone is None else lambda: datetime.now(zone).replace(tzinfo=None)
        if self.broker is None and any(self.spec.meters.get(k) for k in MQTT_KINDS):
            raise FleetError("meters: concentrators need a broker (host, port)")
        self._closers: list[Callable] = []
        self._watch: asyncio.Task | None = None

    # -- building ------------------------------------------------------------------------------------------
    def _build(self) -> dict[str, list[list[SimMeter]]]:
        s = self.spec
        rng = random.Random(s.seed)
        # its own generator: a spec without tripped meters draws the same fleet as before the option existed
        tripped_rng = random.Random(s.seed * 7919 + 1)
        hour_factor = _PROFILE[self.clock().hour]  # the meters' profile shapes load by hour: start at the mean
        profile = load_profile(s.modbus_profile) if s.meters.get("modbus_tcp") else None
        address = s.first_address
        groups: dict[str, list[list[SimMeter]]] = {}
        for kind in KINDS:
            count = s.meters.get(kind, 0)
            per = s.per_line_by_kind.get(kind, s.per_line)
            per = min(per, MODBUS_MAX_DEVICES) if kind == "modbus_tcp" else per
            lines = groups.setdefault(kind, [])
            emulated = s.line_rate_lines * s.line_rate_per_line if kind == "dlt645_tcp" else 0
            for i in range(count):
                if i < emulated and i % s.line_rate_per_line == 0 or i >= emulated and (i - emulated) % per == 0:
                    lines.append([])
                draw = rng.random()
                fault = ("stuck_relay" if draw < s.stuck_relay else
                         "silent_after_trip" if draw < s.stuck_relay + s.silent_after_trip else
                         "corrupt_frames" if draw < s.stuck_relay + s.silent_after_trip + s.corrupt_frames and
                         kind != "modbus_tcp" else "")
                common = dict(power_kw=round(rng.uniform(*s.load_kw) / hour_factor, 3),
                              energy=_registers(rng), seed=s.seed * 1_000_003 + address)
                addr = f"{address:012d}"
                if kind == "modbus_tcp":
                    meter = ModbusSimMeter(addr, device_id=len(lines[-1]) + 1, profile=profile, clock=self.clock,
                                           faults=ModbusFaults(stuck_relay=fault == "stuck_relay"), **common)
                else:
                    faults = Faults.uniform(s.transient) if s.transient else Faults()
                    faults.stuck_relay = fault == "stuck_relay"
                    if fault == "corrupt_frames":
                        faults.corrupt_checksum = max(faults.corrupt_checksum, CORRUPT_REPLY_RATE)
                    meter = SimMeter(addr, faults=faults, **common)
                if fault:
                    self.faulty[addr] = fault
                if s.tripped and tripped_rng.random() < s.tripped:
                    meter.relay_open = meter.relay_command_open = True
                    self.tripped.append(addr)
                self.meters[addr] = meter
                lines[-1].append(meter)
                address += 1
        return groups

    async def start(self) -> "Fleet":
        """Build every meter and serve every line; returns once all listen (and concentrators are online)."""
        if self.lines:
            raise RuntimeError("the fleet is already running")
        try:
            for kind, groups in self._build().items():
                for n, meters in enumerate(groups, 1):
                    baud = self.spec.line_rate_baud if kind == "dlt645_tcp" and n <= self.spec.line_rate_lines else None
                    self.lines.append(await self._serve(kind, n, meters, baud))
        except BaseException:
            await self.stop()
            raise
        if any(f == "silent_after_trip" for f in self.faulty.values()):
            self._watch = asyncio.create_task(self._silence_tripped(), name="fleet-silent-after-trip")
        return self

    async def _serve(self, kind: str, n: int, meters: list[SimMeter], baud: int | None = None) -> Line:
        bus = lambda: SimBus.of(meters, clock=self.clock, turnaround_s=self.spec.turnaround_s,  # noqa: E731
                                baud=baud)
        if kind == "dlt645_tcp":
            line_bus = bus()
            server = await serve_tcp(line_bus)
            self._closers.append(lambda: _close_server(server))
            host, port = server.sockets[0].getsockname()[:2]
            return Line(kind, f"{host}:{port}", meters, baud, line_bus)
        if kind == "dlt645_pty":
            pty = PtyBus(bus())
            self._closers.append(pty.close)
            return Line(kind, pty.path, meters, bus=pty.bus)
        if kind == "modbus_tcp":
            server = await serve_modbus_tcp(meters)
            self._closers.append(server.close)
            return Line(kind, f"127.0.0.1:{server.port}", meters)
        cid = f"{'c' if kind == 'mqtt_frame' else 'j'}{n}"
        concentrator = SimConcentrator(cid, bus(), *self.broker, mode="frame" if kind == "mqtt_frame" else "json")
        self._closers.append(concentrator.stop)
        await concentrator.start()
        return Line(kind, cid, meters, bus=concentrator.bus)

    async def stop(self) -> None:
        """Stop every line (concentrators say goodbye); safe to call twice."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        closers, self._closers = self._closers[::-1], []
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result

    async def __aenter__(self) -> "Fleet":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- faults and the field --------------------------------------------------------------------------------
    async def _silence_tripped(self, every_s: float = 0.1) -> None:
        loop = asyncio.get_running_loop()
        opened: dict[str, float] = {}  # address -> when its relay was first seen open
        while True:
            for addr, fault in list(self.faulty.items()):
                meter = self.meters[addr]
                if fault != "silent_after_trip" or addr in self.silenced or not meter.relay_open:
                    continue
                if loop.time() - opened.setdefault(addr, loop.time()) >= self.spec.silent_delay_s:
                    meter.faults.no_reply = 1.0
                    self.silenced.add(addr)
            await asyncio.sleep(every_s)

    def repair(self, address: str, relay_open: bool) -> None:
        """A field crew on site: the meter's fault cleared for good, its relay set by hand."""
        meter = self.meters[address]
        meter.faults.no_reply = 0.0
        meter.faults.stuck_relay = False
        self.faulty.pop(address, None)
        self.silenced.discard(address)
        meter.relay_open = meter.relay_command_open = relay_open
        meter.relay_log.append((self.clock(), "trip" if relay_open else "close", "field-crew"))

    # -- what happened ----------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"spec": self.spec.to_dict(), "lines": [line.describe() for line in self.lines],
                "faulty": dict(self.faulty), "tripped": list(self.tripped)}

    def report(self, addresses: list[str] | None = None) -> dict:
        """The simulators' own record: each line's statistics, and for each of ``addresses`` (default: none)
        its relay's position and every relay action it carried out, in order (``relay_log``: [ISO local time,
        action, operator]; a crew's repair is logged with the operator ``field-crew``)."""
        return {"lines": [line.stats() for line in self.lines],
                "meters": {a: {"relay_open": self.meters[a].relay_open,
                               "relay_log": [[when.isoformat(), action, operator]
                                             for when, action, operator in self.meters[a].relay_log]}
                           for a in addresses or ()}}


def _registers(rng: random.Random) -> list[Decimal]:
    per_tariff = [Decimal(rng.randrange(0, 500_000)) / 100 for _ in range(4)]
    return [sum(per_tariff, Decimal("0.00"))] + per_tariff


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


# ------------------------------------------------------------------------------------------- child process

#: the child's description is one JSON line: 100,000 meters' addresses are some 2 MB (asyncio's default: 64 KiB)
_LINE_LIMIT = 256 * 1024 * 1024


class FleetProcess:
    """A fleet served by a child process (``python -m simulators.fleet --commands``), seen from the parent."""

    def __init__(self, spec: FleetSpec, broker: tuple[str, int] | None = None, *, workdir: str | Path) -> None:
        self.spec, self.broker = spec, broker
        self.path = Path(workdir) / "fleet.json"
        self.proc: asyncio.subprocess.Process | None = None
        self.description: dict = {}
        self.faulty: dict[str, str] = {}

    async def start(self, timeout: float = 60.0) -> "FleetProcess":
        self.path.write_text(json.dumps(self.spec.to_dict()))
        args = [sys.executable, "-m", "simulators.fleet", str(self.path), "--commands"]
        if self.broker is not None:
            args += ["--broker", f"{self.broker[0]}:{self.broker[1]}"]
        # a session of its own: Ctrl-C reaches the parent, which stops the fleet after the gateway
        self.proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE, start_new_session=True,
                                                         limit=_LINE_LIMIT)
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"the fleet process ended before it served (exit {await self.proc.wait()})")
            self.description = json.loads(line)
        except BaseException:
            await self.stop()
            raise
        self.faulty = dict(self.description["faulty"])
        return self

    def describe(self) -> dict:
        return self.description

    def repair(self, address: str, relay_open: bool) -> None:
        self.faulty.pop(address, None)
        self.proc.stdin.write(json.dumps({"repair": address, "relay_open": relay_open}).encode() + b"\n")

    async def report(self, addresses: list[str] | None = None, timeout: float = 60.0) -> dict:
        """:meth:`Fleet.report`, from the child: one command, one JSON line back."""
        self.proc.stdin.write(json.dumps({"report": list(addresses or ())}).encode() + b"\n")
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the fleet process ended (exit {await self.proc.wait()})")
        return json.loads(line)

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _serve_until_signalled(spec: FleetSpec, broker: tuple[str, int] | None, commands: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleet = await Fleet(spec, broker).start()
    try:
        print(json.dumps(fleet.describe()), flush=True)
        obey = asyncio.create_task(_obey(fleet, stop)) if commands else None
        await stop.wait()
        if obey is not None:
            obey.cancel()
            await asyncio.gather(obey, return_exceptions=True)
    finally:
        await fleet.stop()


async def _obey(fleet: Fleet, stop: asyncio.Event) -> None:
    """Commands a line on standard input until it closes (the parent went away: stop)."""
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)  # a report names thousands of meters
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            stop.set()
            return
        try:
            command = json.loads(line)
            if "report" in command:
                print(json.dumps(fleet.report(command["report"])), flush=True)
            else:
                fleet.repair(command["repair"], bool(command["relay_open"]))
        except (ValueError, KeyError, TypeError) as exc:
            print(f"fleet: bad command {line!r}: {exc!r}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="the fleet description: a JSON file, or '-' for standard input")
    p.add_argument("--broker", metavar="HOST:PORT", help="the MQTT broker the concentrators connect to")
    p.add_argument("--commands", action="store_true",
                   help='take commands on standard input, one JSON object a line ({"repair": ADDRESS, '
                        '"relay_open": false} or {"report": [ADDRESS, ...]}, answered with one JSON line), '
                        'and stop when it closes')
    args = p.parse_args(argv)
    try:
        text = sys.stdin.read() if args.spec == "-" else open(args.spec, encoding="utf-8").read()
        spec = FleetSpec.from_dict(json.loads(text))
    except (OSError, json.JSONDecodeError, FleetError, TypeError) as exc:
        print(f"fleet: {args.spec}: {exc}", file=sys.stderr)
        return 2
    broker = None
    if args.broker:
        host, _, port = args.broker.rpartition(":")
        broker = (host, int(port))
    try:
        asyncio.run(_serve_until_signalled(spec, broker, args.commands))
    except FleetError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
