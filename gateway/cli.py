"""The ``feikong`` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import json
import re
import sys
from datetime import timedelta

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


async def _sim(args) -> int:
    from simulators.dlt645 import Faults, PtyBus, SimBus, make_meters, serve_tcp

    if args.meters < 1:
        raise CliError("--meters must be at least 1")
    try:
        first = int(normalise_address(args.first_address))
    except ValueError as exc:
        raise CliError(f"--first-address: {exc}") from None
    meters = make_meters(first, args.meters, faults=Faults.uniform(args.fault_rate) if args.fault_rate else None,
                         seed=args.seed)
    bus = SimBus.of(meters, baud=args.line_baud)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in ("SIGINT", "SIGTERM"):
        import signal

        loop.add_signal_handler(getattr(signal, sig), stop.set)
    if args.pty:
        pty = PtyBus(bus)
        where = f"pty {pty.path} (open it 8N1)"
    else:
        host, _, port = args.tcp.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"--tcp must be HOST:PORT, got {args.tcp!r}")
        server = await serve_tcp(bus, host, int(port))
        where = "tcp://%s:%d" % server.sockets[0].getsockname()[:2]
    print(f"{len(meters)} simulated DL/T 645 meters on {where}"
          + (f", line rate {args.line_baud} baud" if args.line_baud else ""), flush=True)
    for meter in meters if args.meters <= 1000 else meters[:5]:
        print(meter.address, flush=True)
    if args.meters > 1000:
        print(f"... through {meters[-1].address}", flush=True)
    await stop.wait()
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
                    "--interval seconds; Ctrl-C stops everything cleanly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--tcp-meters", type=int, default=600, help="DL/T 645 meters on buses behind TCP listeners")
    demo.add_argument("--pty-meters", type=int, default=100, help="DL/T 645 meters on pseudo-terminal buses")
    demo.add_argument("--modbus-meters", type=int, default=100, help="Modbus TCP meters (Hiking DDS238 profile)")
    demo.add_argument("--concentrator-meters", type=int, default=150,
                      help="DL/T 645 meters behind MQTT concentrators in transparent (frame) mode")
    demo.add_argument("--json-meters", type=int, default=50, help="meters behind MQTT concentrators in JSON mode")
    demo.add_argument("--per-line", type=int, default=75,
                      help="meters per bus, Modbus line or concentrator (Modbus: at most 247)")
    demo.add_argument("--stuck-relay", type=float, default=0.01, help="share of meters whose relay does not move")
    demo.add_argument("--silent-after-trip", type=float, default=0.01,
                      help="share of meters that stop answering once tripped")
    demo.add_argument("--transient", type=float, default=0.002,
                      help="transient faults per DL/T 645 request (no reply, late, corrupt, wrong address, abnormal)")
    demo.add_argument("--fleet-process", action="store_true",
                      help="run the simulated fleet in a child process (python -m simulators.fleet), off the "
                           "gateway's event loop")
    demo.add_argument("--seed", type=int, default=6, help="seed of the fleet and of the upstream simulators")
    demo.add_argument("--control", default=None, metavar="FILE",
                      help="the disconnect/reconnect policies (default: config/demo.control.toml: short lead "
                           "times, no forbidden windows)")
    demo.add_argument("--cycles", type=int, default=None, help="stop after N summaries (default: run until Ctrl-C)")
    demo.add_argument("--interval", type=float, default=5.0, help="seconds between summaries")
    demo.add_argument("--poll", type=float, default=2.0,
                      help="seconds from the start of one read cycle of a channel to the next (at least the cycle)")
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

    sim = sub.add_parser("sim", help="simulators")
    ssub = sim.add_subparsers(dest="sim", required=True)
    sd = ssub.add_parser("dlt645", help="N simulated DL/T 645 meters behind one TCP listener or pseudo-terminal")
    where = sd.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen here, as a transparent serial server (port 0: any)")
    where.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal and print its path")
    sd.add_argument("--meters", type=int, required=True)
    sd.add_argument("--first-address", default="000000000001")
    sd.add_argument("--line-baud", type=int, default=None, help="emulate this line rate (bytes take their real time)")
    sd.add_argument("--fault-rate", type=float, default=0.0, help="share of requests that meet a fault (0..1)")
    sd.add_argument("--seed", type=int, default=0)
    sd.set_defaults(run=_sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # warnings and errors on stderr, with the time and where they come from (stdout is the command's output)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.run(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
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
