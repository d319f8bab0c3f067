"""The full chaos soak, `./run soak [--minutes N] [--instances N] [--seed S] [--meters N]` (docs/chaos.md).

Progress goes to standard error; the last line of standard output is one JSON object: the schedule, the
events applied, the counts and every check with its failures. Exit 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from .harness import SoakSpec, Soak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run soak", description="The chaos soak: a simulated fleet, billing and crews "
                                "against feikong gateways while they, the broker and PostgreSQL are killed and "
                                "restarted; then the end checks (docs/chaos.md).")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the chaos phase (default 10)")
    p.add_argument("--settle-minutes", type=float, default=2.0,
                   help="the quiet phase after it, before the end checks (default 2)")
    p.add_argument("--instances", type=int, default=1, help="gateway instances on the one database (default 1)")
    p.add_argument("--seed", type=int, default=1, help="draws the schedule, the fleet's faults and billing's story")
    p.add_argument("--meters", type=int, default=200, help="simulated meters (default 200)")
    p.add_argument("--events", type=int, default=None,
                   help="chaos events beyond one of each kind (default: enough for one event per 30 s of chaos "
                        "in all)")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs, configs and the broker's files here")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.settle_minutes <= 0 or args.instances < 1 or args.meters < 4:
        p.error("--minutes and --settle-minutes must be positive, --instances at least 1, --meters at least 4")
    chaos_s = args.minutes * 60
    extra = args.events if args.events is not None else max(0, int(chaos_s // 30) - 5)
    spec = SoakSpec(meters=args.meters, instances=args.instances, seed=args.seed, chaos_s=chaos_s,
                    settle_s=args.settle_minutes * 60, extra_events=extra)
    # billing's and the fleet's MQTT clients say when the broker goes away (it does, on purpose): tagged, not bare
    logging.basicConfig(level=logging.WARNING, format="[soak] %(name)s %(levelname)s: %(message)s")
    summary = asyncio.run(Soak(spec, workdir=args.workdir).run())
    print(json.dumps(summary), flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
