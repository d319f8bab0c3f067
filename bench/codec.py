#!/usr/bin/env python3
"""DL/T 645 codec throughput: our frame codec against the PyPI peer ``dlt645`` (3.x), one core, one run.

All five operations work on the same frame, a typical read reply with four FE
wake-up bytes: meter 000000000001 answers 00010000 (forward active energy,
total) = 123456.78 kWh::

    FE FE FE FE 68 01 00 00 00 00 00 68 91 08 33 33 34 33 AB 89 67 45 17 16

* ``ours_decode``        ``decode_frame(wire)``
* ``ours_decode_value``  ``decode_data(decode_frame(wire).data)``: frame, then DI and value (Decimal)
* ``ours_encode``        ``encode_frame(address, 0x91, data)`` (with preamble)
* ``peer_decode``        ``DLT645Protocol.deserialize_with_remaining(wire)`` (the peer's lowest-level decoder;
                         like ours it checks the checksum and removes the 0x33 offset, but not BCD)
* ``peer_encode``        ``DLT645Protocol.build_frame(addr, 0x91, data)`` (default 4 FE)

Every operation's output is checked against the reference before timing, so the
benchmark cannot time a function that does nothing or the wrong thing.

Method: ``timeit`` (GC off during a run) with ``time.perf_counter``; the inner
loop count is calibrated so that one run takes ~0.3 s; rounds are interleaved
across the operations (to spread drift and frequency changes evenly) and the
best of 5 runs is kept. The process is pinned to one CPU where the OS allows.

Usage::

    python bench/codec.py            # full run, writes bench/results/codec.json
    python bench/codec.py --quick    # short run (smoke test), writes bench/results/codec-quick.json
    python bench/codec.py --out PATH

The last line of stdout is one JSON object with the rates (frames per second).
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import timeit

from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import machine_info as common_machine_info  # noqa: E402
from bench._common import pin_to_one_cpu  # noqa: E402
from protocols.dlt645.di import decode_data  # noqa: E402
from protocols.dlt645.frame import decode_frame, encode_frame  # noqa: E402

ADDRESS = "000000000001"
ADDRESS_WIRE = bytes.fromhex(ADDRESS)[::-1]  # standard order, A0 first (the peer takes raw bytes)
CONTROL = 0x91
DI = 0x00010000
VALUE = Decimal("123456.78")
DATA = struct.pack("<I", DI) + bytes.fromhex("78563412")  # DI little-endian, then BCD lowest byte first
# Written out by hand, independent of both codecs.
REFERENCE = bytes.fromhex("fefefefe" "68 010000000000 68 91 08 33333433 ab896745 17 16".replace(" ", ""))

KEYS = ("ours_decode", "ours_decode_value", "ours_encode", "peer_decode", "peer_encode")


def verify(P, bcd_to_float) -> None:
    """Fail loudly unless every operation produces the reference result."""
    f = decode_frame(REFERENCE)
    assert (f.address, f.control, f.data) == (ADDRESS, CONTROL, DATA), f
    v = decode_data(f.data)
    assert v.di == DI and v.value == VALUE and v.unit == "kWh", v

    assert encode_frame(ADDRESS, CONTROL, DATA) == REFERENCE

    remaining, fr = P.deserialize_with_remaining(REFERENCE)
    assert fr is not None and remaining == b"", (remaining, fr)
    assert bytes(fr.addr) == ADDRESS_WIRE and fr.ctrl_code == CONTROL and bytes(fr.data) == DATA, fr
    assert bytes(fr.preamble) == b"\xfe" * 4
    assert bcd_to_float(fr.data[4:8], "XXXXXX.XX", "little") == float(VALUE)

    assert bytes(P.build_frame(ADDRESS_WIRE, CONTROL, DATA)) == REFERENCE


def make_timers(P) -> dict[str, timeit.Timer]:
    ns = {
        "decode_frame": decode_frame, "decode_data": decode_data, "encode_frame": encode_frame,
        "P": P, "deserialize": P.deserialize_with_remaining, "build_frame": P.build_frame,
        "wire": REFERENCE, "address": ADDRESS, "address_wire": ADDRESS_WIRE, "control": CONTROL, "data": DATA,
    }
    stmts = {
        "ours_decode": "decode_frame(wire)",
        "ours_decode_value": "decode_data(decode_frame(wire).data)",
        "ours_encode": "encode_frame(address, control, data)",
        "peer_decode": "deserialize(wire)",
        "peer_encode": "build_frame(address_wire, control, data)",
    }
    return {k: timeit.Timer(stmts[k], globals=ns, timer=time.perf_counter) for k in KEYS}


def calibrate(timer: timeit.Timer, target_s: float) -> int:
    n = 1
    while True:
        t = timer.timeit(n)
        if t >= target_s / 10:
            return max(1, int(n * target_s / t))
        n *= 4


def machine_info(cpu: int | None) -> dict:
    try:
        from importlib.metadata import version

        peer_version = version("dlt645")
    except Exception:  # pragma: no cover
        peer_version = "unknown"
    return common_machine_info(cpu, dlt645_version=peer_version)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run for smoke tests (3 x ~0.05 s)")
    ap.add_argument("--runs", type=int, default=None, help="runs per operation, best kept (default 5, quick 3)")
    ap.add_argument("--seconds", type=float, default=None, help="target seconds per run (default 0.3, quick 0.05)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/codec[-quick].json)")
    args = ap.parse_args(argv)
    runs = args.runs or (3 if args.quick else 5)
    target = args.seconds or (0.05 if args.quick else 0.3)
    out = args.out or ROOT / "bench" / "results" / ("codec-quick.json" if args.quick else "codec.json")

    cpu = pin_to_one_cpu()
    from dlt645.common.transform import bcd_to_float
    from dlt645.protocol.protocol import DLT645Protocol as P

    verify(P, bcd_to_float)
    timers = make_timers(P)
    loops = {k: calibrate(t, target) for k, t in timers.items()}
    best = {k: float("inf") for k in KEYS}
    for _ in range(runs):
        for k in KEYS:  # interleaved rounds
            best[k] = min(best[k], timers[k].timeit(loops[k]) / loops[k])
    verify(P, bcd_to_float)  # still correct after timing (nothing was monkeypatched or cached wrongly)

    rates = {f"{k}_per_s": round(1.0 / best[k]) for k in KEYS}
    summary = dict(rates)
    summary["decode_ratio_ours_over_peer"] = round(rates["ours_decode_per_s"] / rates["peer_decode_per_s"], 2)
    summary["encode_ratio_ours_over_peer"] = round(rates["ours_encode_per_s"] / rates["peer_encode_per_s"], 2)

    result = {
        "benchmark": "dlt645 codec frames per second, one core",
        "frame_hex": REFERENCE.hex(),
        "method": {"timer": "time.perf_counter via timeit (gc disabled)", "runs": runs, "best_of": runs,
                   "target_seconds_per_run": target, "loops": loops, "quick": args.quick},
        "operations": {
            "ours_decode": "protocols.dlt645.frame.decode_frame(wire)",
            "ours_decode_value": "protocols.dlt645.di.decode_data(decode_frame(wire).data)",
            "ours_encode": "protocols.dlt645.frame.encode_frame(address, 0x91, data, preamble=True)",
            "peer_decode": "dlt645 DLT645Protocol.deserialize_with_remaining(wire)",
            "peer_encode": "dlt645 DLT645Protocol.build_frame(addr, 0x91, data) (4 FE)",
        },
        "best_us": {k: round(best[k] * 1e6, 4) for k in KEYS},
        "results": summary,
        "machine": machine_info(cpu),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    width = max(map(len, KEYS))
    for k in KEYS:
        print(f"{k:<{width}}  {rates[f'{k}_per_s']:>12,} frames/s  ({best[k] * 1e6:7.3f} us)")
    print(f"results written to {out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
