"""The ``feikong`` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import json
import re
import sys
from datetime import timedelta

from gateway.ops.auth import mask_tokens_on_handlers
from gateway.ops.console import add_commands as add_console_commands
from protocols.dlt645 import Deframer, FrameReceived, FrameRejected, Noise
from protocols.dlt645 import di as di_table
from protocols.dlt645 import messages as m
from protocols.dlt645.codes import Edition, RelayAction
from protocols.dlt645.frame import normalise_address

EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED = 0, 1, 2


class CliError(Exception):
    """Bad input on the command line: printed as one clear line, exit code 1."""


# ------------------------------------------------------------------ hex input


_SEPARATORS = re.compile(r"[\s,:;\-_]+")


def parse_hex(parts: list[str]) -> bytes:
    """Hex as field engineers paste it: spaces, commas, colons, dashes, ``0x`` prefixes all fine."""
    text = " ".join(parts)
    cleaned = re.sub(r"0[xX]([0-9a-fA-F]{2})", r"\1", text)
    digits = _SEPARATORS.sub("", cleaned)
    for i, ch in enumerate(digits):
        if ch not in "0123456789abcdefABCDEF":
            raise CliError(f"not a hex digit: {ch!r} at hex digit {i} (byte offset {i // 2})")
    if len(digits) % 2:
        raise CliError(f"odd number of hex digits ({len(digits)}): the last byte is incomplete "
                       f"(byte offset {len(digits) // 2})")
    return bytes.fromhex(digits)


def decode_stream(data: bytes, edition: Edition | None = None) -> list[dict]:
    """Every frame and every error found in ``data``, in order, as JSON-ready dicts."""
    deframer = Deframer()
    out: list[dict] = []
    for ev in deframer.feed(data) + deframer.flush():
        if isinstance(ev, FrameReceived):
            try:
                obj = m.describe(m.parse(ev.frame, edition), edition)
            except m.MessageError as exc:
                obj = {"error": f"frame data does not fit its function: {exc}", "reason": "bad_data",
                       "offset": ev.offset + 10 + exc.offset, "frame_offset": ev.offset,
                       "address": ev.frame.address, "control": f"{ev.frame.control:02X}"}
            else:
                obj = {"offset": ev.offset, **obj}
            obj["raw"] = ev.raw.hex(" ").upper()
            out.append(obj)
        elif isinstance(ev, FrameRejected):
            out.append({"error": ev.message, "reason": ev.reason, "offset": ev.error_offset,
                        "frame_offset": ev.offset, "raw": ev.raw.hex(" ").upper()})
        elif isinstance(ev, Noise):
            out.append({"error": f"{len(ev.data)} byte(s) that are neither a frame nor FE preamble",
                        "reason": "noise", "offset": ev.offset, "raw": ev.data.hex(" ").upper()})
    if not out:
        out.append({"error": "no frame found (only FE preamble bytes?)", "reason": "empty", "offset": 0})
    return out


def _edition(text: str | None) -> Edition | None:
    if text is None:
        return None
    try:
        return Edition(int(text))
    except ValueError:
        raise CliError(f"--edition must be 2007 or 1997, got {text!r}") from None


# ------------------------------------------------------------------ commands


def cmd_decode(args) -> int:
    data = parse_hex(args.hex if args.hex else [sys.stdin.read()])
    results = decode_stream(data, _edition(args.edition))
    for obj in results:
        print(json.dumps(obj, ensure_ascii=False))
    return EXIT_BAD_INPUT if any("error" in o for o in results) else EXIT_OK


def _link(args):
    from protocols.dlt645.client import Dlt645Link, LinkSettings

    settings = LinkSettings(baud=args.baud, parity=args.parity, retries=args.retries)
    if args.timeout is not None:
        settings.turnaround_s, settings.margin_s = args.timeout, 0.0
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--tcp must be HOST:PORT, got {args.tcp!r}")
        return Dlt645Link.tcp(host, int(port), settings)
    return Dlt645Link.serial(args.serial, settings)


def _address(text: str) -> str:
    try:
        return normalise_address(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


async def _read(args) -> int:
    from protocols.dlt645.client import Dlt645Client, Dlt645Error

    edition = _edition(args.edition) or Edition.DLT645_2007
    try:
        di = di_table.resolve(args.di, edition)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    address = _address(args.addr)
    async with _link(args) as link:
        client = Dlt645Client(link, edition)
        try:
            value = await client.read(address, di)
        except Dlt645Error as exc:
            print(json.dumps({"address": address, "di": di_table.format_di(di, edition), "error": str(exc)}))
            return EXIT_FAILED
    print(json.dumps({"address": address, "di": value.code, "di_name": value.name,
                      "value": m.jsonable(value.value), "unit": value.unit}, ensure_ascii=False))
    return EXIT_OK


async def _relay(args) -> int:
    from protocols.dlt645.client import Dlt645Client, Dlt645Error

    try:
        action = RelayAction.parse(args.action)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    address = _address(args.addr)
    async with _link(args) as link:
        client = Dlt645Client(link, password=args.password, operator=args.operator)
        try:
            await client.relay(address, action, valid_for=timedelta(minutes=args.valid_minutes))
            await asyncio.sleep(args.settle)
            state = await client.relay_state(address)
        except Dlt645Error as exc:
            print(json.dumps({"address": address, "action": action.label, "error": str(exc)}))
            return EXIT_FAILED
    print(json.dumps({"address": address, "action": action.label, "accepted": True,
                      "relay": state["relay"], "keep_power": state["keep_power"]}))
    return EXIT_OK


class _Signals:
    """SIGINT and SIGTERM stop the command cleanly from the moment this is made. A simulator makes it before it
    says where it listens: a signal right after that line is a clean stop, not a kill (a test stopping a
    simulator as soon as it had its address saw exit -15)."""

    def __init__(self) -> None:
        import signal

        self._sigs = (signal.SIGINT, signal.SIGTERM)
        self.stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        for sig in self._sigs:
            self._loop.add_signal_handler(sig, self.stop.set)

    async def wait(self) -> None:
        try:
            await self.stop.wait()
        finally:
            for sig in self._sigs:
                self._loop.remove_signal_handler(sig)


def _host_port(text: str, option: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise CliError(f"{option} must be HOST:PORT, got {text!r}")
    return host, int(port)


def _sim_addresses(args) -> list[str]:
    from simulators.dlt645 import fleet_addresses

    if args.meters < 1:
        raise CliError("--meters must be at least 1")
    try:
        return fleet_addresses(int(normalise_address(args.first_address)), args.meters)
    except ValueError as exc:
        raise CliError(f"--first-address: {exc}") from None


def _cut_off(args, meters) -> None:
    """``--cut-off-every K``: every K-th meter starts with its relay open (a customer cut off for arrears)."""
    if args.cut_off_every < 0:
        raise CliError("--cut-off-every must be 0 (none) or more")
    for i, meter in enumerate(meters, 1):
        if args.cut_off_every and i % args.cut_off_every == 0:
            meter.relay_open = meter.relay_command_open = True


def _print_meters(meters, first_line: str) -> None:
    print(first_line, flush=True)
    for meter in meters if len(meters) <= 1000 else meters[:5]:
        extra = f" device {meter.device_id}" if hasattr(meter, "device_id") else ""
        print(f"{meter.address}{extra}{' (cut off)' if meter.relay_open else ''}", flush=True)
    if len(meters) > 1000:
        print(f"... through {meters[-1].address}", flush=True)


def _sim_dlt645_meters(args):
    from simulators.dlt645 import Faults, make_meters

    addresses = _sim_addresses(args)
    meters = make_meters(addresses[0], len(addresses),
                         faults=Faults.uniform(args.fault_rate) if args.fault_rate else None,
                         seed=args.seed)
    _cut_off(args, meters)
    return meters


async def _sim(args) -> int:
    from simulators.dlt645 import PtyBus, SimBus, serve_tcp

    signals = _Signals()
    meters = _sim_dlt645_meters(args)
    bus = SimBus.of(meters, baud=args.line_baud)
    if args.pty:
        pty = PtyBus(bus)
        where = f"pty {pty.path} (open it 8N1)"
    else:
        host, port = _host_port(args.tcp, "--tcp")
        server = await serve_tcp(bus, host, port)
        where = "tcp://%s:%d" % server.sockets[0].getsockname()[:2]
    _print_meters(meters, f"{len(meters)} simulated DL/T 645 meters on {where}"
                  + (f", line rate {args.line_baud} baud" if args.line_baud else ""))
    await signals.wait()
    return EXIT_OK


async def _sim_modbus(args) -> int:
    from protocols.modbus import load_profile
    from protocols.modbus.profile import ProfileError
    from simulators.modbus import ModbusSimMeter, serve_rtu, serve_tcp

    signals = _Signals()
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise CliError(f"--profile: {exc}") from None
    addresses = _sim_addresses(args)
    if args.first_device < 1 or args.first_device + len(addresses) - 1 > 247:
        raise CliError(f"device ids {args.first_device}..{args.first_device + len(addresses) - 1}: allowed 1..247")
    meters = [ModbusSimMeter(a, device_id=args.first_device + i, profile=profile, seed=args.seed + i)
              for i, a in enumerate(addresses)]
    _cut_off(args, meters)
    if args.rtu:
        server = await serve_rtu(meters)
        where = f"RTU on pty {server.path} (open it 8N1)"
    else:
        host, port = _host_port(args.tcp, "--tcp")
        server = await serve_tcp(meters, host, port)
        where = f"tcp://{host}:{server.port}"
    _print_meters(meters, f"{len(meters)} simulated Modbus meters ({args.profile}) on {where}")
    try:
        await signals.wait()
    finally:
        await server.close()
    return EXIT_OK


async def _sim_concentrator(args) -> int:
    from simulators.concentrator import SimConcentrator

    signals = _Signals()
    meters = _sim_dlt645_meters(args)
    host, port = _host_port(args.broker, "--broker")
    try:
        sim = await SimConcentrator.of(args.id, meters, host, port, mode=args.mode,
                                       baud=args.line_baud).start(timeout=args.connect_timeout)
    except (TimeoutError, ValueError) as exc:
        raise CliError(str(exc)) from None
    _print_meters(meters, f"simulated concentrator {args.id} ({args.mode} mode) on mqtt://{host}:{port} with "
                          f"{len(meters)} DL/T 645 meters")
    try:
        await signals.wait()
    finally:
        await sim.stop()
    return EXIT_OK


def _sim_fleet(args) -> int:
    from simulators.fleet import main as fleet_main

    return fleet_main([args.spec] + (["--broker", args.broker] if args.broker else []))


async def _sim_billing(args) -> int:
    from decimal import Decimal, InvalidOperation

    from simulators.billing import BillingSim

    signals = _Signals()
    payments = []
    for item in args.pay:
        account, sep, amount = item.partition("=")
        try:
            ok = bool(sep and account) and Decimal(amount) > 0
        except InvalidOperation:
            ok = False
        if not ok:
            raise CliError(f"--pay must be ACCOUNT=AMOUNT (yuan, e.g. A0001=50.00), got {item!r}")
        payments.append((account, amount))
    host, port = _host_port(args.broker, "--broker")
    billing = BillingSim(host, port, client_id=args.client_id)
    try:
        await asyncio.to_thread(billing.start)
    except TimeoutError as exc:
        raise CliError(str(exc)) from None
    print(f"simulated billing system on mqtt://{host}:{port}: events below, one JSON object a line", flush=True)
    for account, amount in payments:
        pid = billing.pay(account, amount)
        print(json.dumps({"paid": account, "amount": amount, "payment_id": pid}), flush=True)

    async def show_events() -> None:
        shown = 0
        while True:
            events = list(billing.events.values())  # in arrival order (one C-level copy: safe beside paho's thread)
            for ev in events[shown:]:
                print(json.dumps({"kind": ev.kind, "subject": ev.subject, "id": ev.id, "data": ev.data},
                                 ensure_ascii=False, default=str), flush=True)
            shown = len(events)
            await asyncio.sleep(0.2)

    printer = asyncio.create_task(show_events())
    try:
        await signals.wait()
    finally:
        printer.cancel()
        await asyncio.to_thread(billing.stop)
    return EXIT_OK


# ------------------------------------------------------------------ the service: run, config check


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _Bars:
    """The service's progress (fleet registration, the first read cycle) as rich progress bars on a
    terminal; elsewhere (a log file, journald) the service's INFO lines say the same."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, disable=not console.is_terminal)
        self.tasks: dict[str, int] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.bars.start()
            self.tasks[task] = self.bars.add_task(task, total=total)
        self.bars.update(self.tasks[task], completed=done, total=total)
        if all(t.finished for t in self.bars.tasks):
            self.bars.stop()


def _log_to(console) -> None:
    """INFO and above on stderr: through rich on a terminal (above the progress bars), plain otherwise."""
    root = logging.getLogger()
    if console.is_terminal:
        from rich.logging import RichHandler

        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(RichHandler(console=console, show_path=False))
    mask_tokens_on_handlers(root)
    root.setLevel(logging.INFO)


def _config_errors(errors: list[str]) -> int:
    for line in errors:
        print(f"error: {line}")
    print(f"{len(errors)} error{'s' if len(errors) != 1 else ''}")
    return EXIT_BAD_INPUT


async def _run_service(args) -> int:
    from gateway.config import check_service_config
    from gateway.service import Service, ops_components

    config, errors = check_service_config(args.config)
    if errors:
        return _config_errors(errors)
    console = _console()
    _log_to(console)
    bars = _Bars(console)
    service = Service(config, ops=ops_components(config), progress=bars)
    stop = asyncio.Event()
    waiter = asyncio.create_task(_Signals().wait())
    waiter.add_done_callback(lambda _: stop.set())
    log = logging.getLogger("gateway.service")
    try:
        try:
            await service.start()
        except Exception as exc:  # the store or a channel that cannot be opened: one line, exit 2
            log.error("cannot start: %s", exc)
            return EXIT_FAILED
        log.info("running; SIGINT or SIGTERM stops it cleanly")
        try:
            await service.run(stop)
        except Exception:
            log.exception("a part of the gateway failed; stopping")
            return EXIT_FAILED
    finally:
        waiter.cancel()
        bars.bars.stop()
        await service.close()
        log.info("stopped")
    return EXIT_OK


def _config_check(args) -> int:
    from collections import Counter

    from rich.console import Console
    from rich.table import Table

    from gateway.config import check_service_config
    from gateway.service import safe_url

    config, errors = check_service_config(args.file)
    if errors:
        return _config_errors(errors)
    table = Table(title=f"channels in {args.file}")
    for column in ("name", "kind", "where", "meters"):
        table.add_column(column, justify="right" if column == "meters" else "left")
    from gateway.service import describe_channel

    for c in config.channels:
        table.add_row(c.name, c.kind, describe_channel(c), f"{len(config.meters_on(c.name)):,}")
    out = Console()
    if config.channels:
        out.print(table)
    kinds = Counter(c.kind for c in config.channels)
    print(f"ok: {args.file}: {len(config.channels)} channels ("
          + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"), {len(config.accounts):,} accounts, "
          f"{len(config.meters):,} meters, {len(config.tariffs)} tariffs; store {safe_url(config.store.url)}; "
          f"policies {config.control.file or 'built-in defaults'}; broker {config.mqtt.host}:{config.mqtt.port}; "
          f"http {config.http.host}:{config.http.port}; metrics {config.metrics.host}:{config.metrics.port}")
    return EXIT_OK


async def _demo(args) -> int:
    from gateway.core.config import ConfigError
    from gateway.demo import Story, fleet_spec, run_demo
    from simulators.fleet import FleetError

    try:
        spec = fleet_spec({"dlt645_tcp": args.tcp_meters, "dlt645_pty": args.pty_meters,
                          "modbus_tcp": args.modbus_meters, "mqtt_frame": args.concentrator_meters,
                          "mqtt_json": args.json_meters}, per_line=args.per_line,
                         stuck_relay=args.stuck_relay, silent_after_trip=args.silent_after_trip,
                         transient=args.transient, seed=args.seed)
        await run_demo(spec, Story(seed=args.seed), cycles=args.cycles, interval_s=args.interval,
                       poll_interval_s=args.poll, control=args.control, fleet_process=args.fleet_process)
    except (FleetError, ConfigError) as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


# ------------------------------------------------------------------ parser


def _add_link_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="transparent serial server / DTU / simulator")
    where.add_argument("--serial", metavar="DEVICE", help="RS-485 serial device, e.g. /dev/ttyUSB0")
    p.add_argument("--addr", required=True, help="meter address, 12 digits as on the nameplate (AA = wildcard)")
    p.add_argument("--baud", type=int, default=2400, help="line baud rate (default 2400)")
    p.add_argument("--parity", default="E", choices=["E", "N", "O"],
                   help="E for real DL/T 645 lines (8E1, default); N for pseudo-terminals")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the meter beyond the frames' time on the wire (default 0.7)")
    p.add_argument("--retries", type=int, default=2, help="retries after a timeout (reads only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feikong", description="Head-end gateway for prepaid (cost-control) meters.")
    parser.add_argument("--version", action="version", version="feikong 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="the gateway on embedded defaults (SQLite, a spawned Mosquitto) with a simulated fleet, "
                     "billing, notification system and field crews",
        description="Customers run out of credit, are warned, tripped once a notice is confirmed, pay and are "
                    "reconnected with read-back verification; failing meters get field orders. A summary every "
                    "--interval seconds; Ctrl-C stops everything cleanly.")
    dflt = " (default: %(default)s)"
    demo.add_argument("--tcp-meters", type=int, default=600,
                      help="DL/T 645 meters on buses behind TCP listeners" + dflt)
    demo.add_argument("--pty-meters", type=int, default=100, help="DL/T 645 meters on pseudo-terminal buses" + dflt)
    demo.add_argument("--modbus-meters", type=int, default=100, help="Modbus TCP meters (Hiking DDS238 profile)" + dflt)
    demo.add_argument("--concentrator-meters", type=int, default=150,
                      help="DL/T 645 meters behind MQTT concentrators in transparent (frame) mode" + dflt)
    demo.add_argument("--json-meters", type=int, default=50,
                      help="meters behind MQTT concentrators in JSON mode" + dflt)
    demo.add_argument("--per-line", type=int, default=75,
                      help="meters per bus, Modbus line or concentrator (Modbus: at most 247)" + dflt)
    demo.add_argument("--stuck-relay", type=float, default=0.01,
                      help="share of meters whose relay does not move" + dflt)
    demo.add_argument("--silent-after-trip", type=float, default=0.01,
                      help="share of meters that stop answering once tripped" + dflt)
    demo.add_argument("--transient", type=float, default=0.002,
                      help="transient faults per DL/T 645 request (no reply, late, corrupt, wrong address, "
                           "abnormal)" + dflt)
    demo.add_argument("--fleet-process", action="store_true",
                      help="run the simulated fleet in a child process (python -m simulators.fleet), off the "
                           "gateway's event loop")
    demo.add_argument("--seed", type=int, default=6, help="seed of the fleet and of the upstream simulators" + dflt)
    demo.add_argument("--control", default=None, metavar="FILE",
                      help="the disconnect/reconnect policies (default: gateway/demo.control.toml: short lead "
                           "times, no forbidden windows)")
    demo.add_argument("--cycles", type=int, default=None, help="stop after N summaries (default: run until Ctrl-C)")
    demo.add_argument("--interval", type=float, default=5.0, help="seconds between summaries" + dflt)
    demo.add_argument("--poll", type=float, default=2.0,
                      help="seconds from the start of one read cycle of a channel to the next (at least the "
                           "cycle)" + dflt)
    demo.set_defaults(run=_demo)

    dlt = sub.add_parser("dlt645", help="DL/T 645 tools: decode captured hex, read a meter, control a relay")
    dsub = dlt.add_subparsers(dest="tool", required=True)
    dec = dsub.add_parser("decode", help="decode captured frames: one JSON object per frame or error",
                          description="Paste hex as captured: spaces, FE preambles and several frames are fine. "
                                      "Reads standard input when no HEX is given. Exit code 1 if anything was malformed.")
    dec.add_argument("hex", nargs="*", metavar="HEX")
    dec.add_argument("--edition", choices=["2007", "1997"], default=None,
                     help="settles function codes both editions use (03, 08)")
    dec.set_defaults(run=cmd_decode)

    rd = dsub.add_parser("read", help="read one data item from a meter")
    _add_link_options(rd)
    rd.add_argument("--di", required=True, help="data identifier in hex (00010000) or by name (forward_active_energy_total)")
    rd.add_argument("--edition", choices=["2007", "1997"], default="2007")
    rd.set_defaults(run=_read)

    rl = dsub.add_parser("relay", help="send a relay-control command (1C) and read the relay back")
    _add_link_options(rl)
    rl.add_argument("action", help="trip, close (direct close), close_allowed, alarm, alarm_release, "
                                   "keep_power, keep_power_release")
    rl.add_argument("--password", default="000000", help="6 hex digits (P0..P2 as printed)")
    rl.add_argument("--operator", default="00000000", help="8-digit operator code the meter records")
    rl.add_argument("--valid-minutes", type=float, default=10.0, help="validity deadline, minutes from now")
    rl.add_argument("--settle", type=float, default=0.5, help="seconds to let the relay move before reading it back")
    rl.set_defaults(run=_relay)

    run = sub.add_parser("run", help="run the gateway from a config file until SIGINT or SIGTERM",
                         description="Store, policies, channels, fleet, MQTT bridge and concentrators from one config "
                                     "file (docs/deployment.md). Check it first with `feikong config check FILE`.")
    run.add_argument("--config", required=True, metavar="FILE", help="the gateway config (config/gateway.example.toml)")
    run.set_defaults(run=_run_service)

    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="tool", required=True)
    chk = csub.add_parser("check", help="check a gateway config and the files it names; every error with its key",
                          description="Checks the gateway config, the control policies, the fleet file and the "
                                      "tariffs it names. Exit code 1 and every error (file, key or line:column, the "
                                      "allowed values) if anything is wrong; a summary with counts otherwise.")
    chk.add_argument("file", metavar="FILE")
    chk.set_defaults(run=_config_check)

    sim = sub.add_parser("sim", help="simulators")
    ssub = sim.add_subparsers(dest="sim", required=True)

    def meters_options(p, default_first="000000000001") -> None:
        p.add_argument("--meters", type=int, required=True)
        p.add_argument("--first-address", default=default_first, help="the first meter's address (the rest follow)")
        p.add_argument("--cut-off-every", type=int, default=0, metavar="K",
                       help="every K-th meter starts with its relay open, cut off for arrears (default: none)")
        p.add_argument("--seed", type=int, default=0)

    sd = ssub.add_parser("dlt645", help="N simulated DL/T 645 meters behind one TCP listener or pseudo-terminal")
    where = sd.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen here, as a transparent serial server (port 0: any)")
    where.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal and print its path")
    meters_options(sd)
    sd.add_argument("--line-baud", type=int, default=None, help="emulate this line rate (bytes take their real time)")
    sd.add_argument("--fault-rate", type=float, default=0.0, help="share of requests that meet a fault (0..1)")
    sd.set_defaults(run=_sim)

    sm = ssub.add_parser("modbus", help="N simulated Modbus meters (device ids 1..N) on TCP or an RTU pseudo-terminal")
    where = sm.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="Modbus TCP here (port 0: any)")
    where.add_argument("--rtu", action="store_true", help="Modbus RTU on a new pseudo-terminal pair; prints its path")
    meters_options(sm)
    sm.add_argument("--profile", default="hiking_dds238_2_znsr", help="register map: a shipped profile name or a file")
    sm.add_argument("--first-device", type=int, default=1, help="the first meter's Modbus device id")
    sm.set_defaults(run=_sim_modbus)

    sc = ssub.add_parser("concentrator", help="a simulated MQTT concentrator with N DL/T 645 meters on its bus")
    sc.add_argument("--broker", required=True, metavar="HOST:PORT")
    sc.add_argument("--id", required=True, help="the concentrator id in its topics")
    sc.add_argument("--mode", choices=["frame", "json"], default="frame",
                    help="frame: DL/T 645 frames forwarded (transparent); json: typed commands")
    meters_options(sc)
    sc.add_argument("--line-baud", type=int, default=None, help="emulate this line rate on its bus")
    sc.add_argument("--fault-rate", type=float, default=0.0, help="share of requests that meet a fault (0..1)")
    sc.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the broker")
    sc.set_defaults(run=_sim_concentrator)

    sf = ssub.add_parser("fleet", help="a whole simulated fleet (every channel kind, faults) from one JSON description; "
                                       "prints where each line is as one JSON line",
                         description="See simulators/fleet.py and config/simfleet.example.json. Serves until "
                                     "Ctrl-C or SIGTERM.")
    sf.add_argument("spec", metavar="SPEC.json", help="the fleet description ('-': standard input)")
    sf.add_argument("--broker", metavar="HOST:PORT", help="the MQTT broker its concentrators connect to")
    sf.set_defaults(run=_sim_fleet)

    sb = ssub.add_parser("billing", help="a simulated billing system: sends payments, prints the gateway's events")
    sb.add_argument("--broker", required=True, metavar="HOST:PORT")
    sb.add_argument("--pay", action="append", default=[], metavar="ACCOUNT=AMOUNT",
                    help="send this payment (yuan) once connected; repeat for more")
    sb.add_argument("--client-id", default="billing-sim")
    sb.set_defaults(run=_sim_billing)
    add_console_commands(sub)  # meter, meters, relay, requests, orders, audit, token: gateway/ops/console.py
    return parser


def async_runner(loop: str | None = None):
    """How the gateway's coroutines are run: ``asyncio.run``, or ``uvloop.run`` with the optional extra
    ``feikong[uvloop]`` installed (1.2-1.4x on the read path, docs/performance.md); ``loop`` names one."""
    import importlib.util

    loop = loop or ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
    if loop == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # warnings and errors on stderr, with the time and where they come from (stdout is the command's output)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mask_tokens_on_handlers()  # an operator's token never reaches a log, not even inside a traceback
    try:
        result = args.run(args)
        if asyncio.iscoroutine(result):
            result = async_runner()(result)
        return result
    except CliError as exc:
        print(f"feikong: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a link that cannot open, and the like: one line, not a traceback
        from protocols.dlt645.client import Dlt645Error

        if isinstance(exc, Dlt645Error):
            print(f"feikong: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        raise


if __name__ == "__main__":
    sys.exit(main())
