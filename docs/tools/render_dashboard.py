#!/usr/bin/env python3
"""Draw the Grafana dashboard (config/grafana/feikong-dashboard.json) as a picture, from a live Prometheus.

Grafana cannot be installed here, so this does what it would do: for every panel, ask Prometheus for the
panel's expressions over the last minutes (the template variables at "All") and draw the results in the
dashboard's grid layout (24 columns, rows as headings): time series as lines, stats as their last value, bar
gauges as bars.

By default it brings up what it draws: a Mosquitto broker, a gateway on SQLite with a small simulated fleet
(DL/T 645 over TCP and over a pseudo-terminal, two MQTT concentrators, one in JSON mode and one forwarding
frames; meters tripped for arrears, one whose relay is stuck, two that never answer), its MQTT bridge and metrics, a concentrator hub, a billing simulator paying the cut-off
customers and answering notices (some receipts delivered, some failed), refunds that put customers into
arrears (their trips held by the gates), and a real Prometheus scraping it every second with the alert
rules. After ``--minutes`` of that it draws ``docs/img/dashboard.png``. ``--prometheus URL`` draws from an
existing Prometheus instead (a running deployment).

Needs matplotlib: ``pip install -e '.[docs]'``; the default mode needs mosquitto and prometheus (``./run test``
installs both).

    .venv/bin/python docs/tools/render_dashboard.py --minutes 4
    .venv/bin/python docs/tools/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 60
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simulators.prometheus import Prometheus, at_all, dashboard_panels  # noqa: E402

DASHBOARD = ROOT / "config" / "grafana" / "feikong-dashboard.json"
RULES = ROOT / "config" / "prometheus" / "alerts.yml"
OUT = ROOT / "docs" / "img" / "dashboard.png"


# ------------------------------------------------------------------ a live gateway with traffic


async def live_traffic(seconds: float, workdir: Path, draw) -> None:
    """Run a gateway with simulated traffic for ``seconds``, with a Prometheus scraping it; then ``draw(prom)``."""
    from gateway.app import Bus, Gateway
    from gateway.clock import SystemClock, local_naive
    from gateway.core.commands import CommandPolicy
    from gateway.core.control import ControlConfig
    from gateway.core.dispatch import DispatchPolicy
    from gateway.core.model import Account, Adjustment, Meter
    from gateway.core.notices import ReceiptOutcome
    from gateway.core.tariff import tariffs_from_config
    from gateway.core.thresholds import ThresholdPolicy
    from gateway.northbound.mqtt import BillingBridge, BrokerConfig
    from gateway.ops.metrics import GatewayMetrics
    from gateway.southbound.concentrator import ConcentratorHub, HubSettings
    from protocols.dlt645.client import Dlt645Link, LinkSettings
    from protocols.mqtt import billing as contract
    from simulators.billing import BillingSim
    from simulators.broker import Broker
    from simulators.concentrator import SimConcentrator
    from simulators.dlt645 import PtyBus, SimBus, SimMeter, serve_tcp
    from simulators.dlt645.meter import Faults

    rng = random.Random(7)
    quick = dict(settle_s=1.0, verify_first_s=0.2, verify_every_s=0.3)
    p = CommandPolicy()
    config = ControlConfig(commands=CommandPolicy(
        close=replace(p.close, dispatch_after_failures=1, backoff_s=2, backoff_max_s=5, **quick),
        trip=replace(p.trip, **quick)), dispatch=DispatchPolicy(reconnect_deadline_s=90, escalate_before_s=45))
    clock = SystemClock()

    def meter(i: int, **kw) -> SimMeter:
        return SimMeter(f"{i:012d}", energy=[Decimal("100.00")] * 5, **kw)

    tcp = [meter(i, relay_open=i % 3 == 0, relay_command_open=i % 3 == 0) for i in range(1, 31)]
    tcp[1].faults = Faults(stuck_relay=True)
    tcp[1].relay_open = tcp[1].relay_command_open = True
    tcp[4].faults = tcp[7].faults = Faults(no_reply=1.0)
    for m in tcp[10:]:
        m.faults = Faults(no_reply=0.03)
    serial = [meter(i, relay_open=i % 4 == 0, relay_command_open=i % 4 == 0) for i in range(101, 111)]
    json_mode = [meter(i, relay_open=i == 202, relay_command_open=i == 202) for i in range(201, 207)]
    frame_mode = [meter(i) for i in range(301, 307)]
    tripped = [m.address for m in tcp + serial + json_mode if m.relay_open]

    with Broker(workdir / "broker") as broker:
        server = await serve_tcp(SimBus.of(tcp, clock=local_naive(clock), turnaround_s=0.02))
        pty = PtyBus(SimBus.of(serial, clock=local_naive(clock), turnaround_s=0.02))
        fast = LinkSettings(baud=9600, turnaround_s=0.15, margin_s=0.1, retries=0)
        tcp_link = Dlt645Link.tcp("127.0.0.1", server.sockets[0].getsockname()[1], fast)
        pty_link = Dlt645Link.serial(pty.path, replace(fast, parity="N"))
        hub = ConcentratorHub(HubSettings(broker.host, broker.port, client_id="feikong-demo-south"))
        await hub.start()
        concentrators = [await SimConcentrator.of(cid, ms, broker.host, broker.port, mode=mode,
                                                  clock=local_naive(clock), bus_timeout_s=0.3).start()
                         for cid, ms, mode in (("c1", json_mode, "json"), ("c2", frame_mode, "frame"))]
        channels = [Bus(tcp_link, [m.address for m in tcp]), Bus(pty_link, [m.address for m in serial]),
                    hub.json_channel("c1", [m.address for m in json_mode]),
                    hub.frame_channel("c2", [m.address for m in frame_mode])]
        gw = await Gateway(f"sqlite://{workdir / 'gw.db'}", channels, config,
                           ThresholdPolicy(default_warn1_fen=5000, default_warn2_fen=2000, hysteresis_fen=500),
                           clock, poll_interval_s=5.0).open()
        tariffs = tariffs_from_config(json.loads((ROOT / "config" / "tariffs.example.json").read_text()))
        accounts, meters = [], []
        for channel, group in zip(channels, (tcp, serial, json_mode, frame_mode)):
            for m in group:
                k = len(accounts)
                accounts.append(Account(f"A{k}", tariff_id="flat", area="north", address=f"{k} Main St",
                                        channels=("sms", "voice", "app"),
                                        contacts={"sms": f"1380000{k:04d}", "voice": f"1380000{k:04d}",
                                                  "app": f"app-{k}"}))
                meters.append(Meter(m.address, f"A{k}", channel=channel.name))
        await gw.writer.call(gw.control.accounting.register, tariffs, accounts, meters)
        account_of = {m.meter_id: m.account_id for m in meters}
        bridge = BillingBridge(gw, BrokerConfig(broker.host, broker.port, instance="gw-demo"))
        metrics = GatewayMetrics(sample_s=1.0)
        metrics.attach(gw, bridge, hub)
        port = metrics.serve()
        stop = asyncio.Event()
        # Prometheus first: it sees the counters from their start
        with Prometheus(workdir / "prometheus", [f"127.0.0.1:{port}"], rule_files=[RULES]) as prom, \
                BillingSim(broker.host, broker.port) as billing:
            await asyncio.sleep(2.0)
            await bridge.start()
            tasks = [asyncio.create_task(gw.run(stop)), asyncio.create_task(bridge.run(stop)),
                     asyncio.create_task(metrics.run(stop))]
            await bridge.ready()
            started = time.monotonic()
            answered: set[str] = set()
            paid = 0
            while time.monotonic() - started < seconds:
                await asyncio.sleep(2.0)
                # billing pays a cut-off customer now and then (and the stuck meter's customer at once)
                if tripped and rng.random() < 0.5:
                    m = tripped.pop(0 if tcp[1].address in tripped else rng.randrange(len(tripped)))
                    paid += 1
                    billing.pay(account_of[m], "80.00", f"P{paid}")
                # and refunds put a customer into arrears now and then: a disconnect case, held by the gates
                if rng.random() < 0.3:
                    k = rng.randrange(10, len(accounts))
                    await gw.credits([Adjustment(f"R{paid}-{k}", f"A{k}", -30000, int(clock.now()), "op1",
                                                 "refund", kind="refund")])
                # the notification systems answer: most delivered, some failed
                for ev in billing.of_kind("notice_request"):
                    rid = ev.data["request_id"]
                    if rid not in answered:
                        answered.add(rid)
                        outcome = ReceiptOutcome.FAILED if rng.random() < 0.3 else ReceiptOutcome.DELIVERED
                        billing.send(contract.NoticeReceipt(f"RC-{rid}", rid, outcome.value,
                                                            datetime.now(timezone.utc)))
            draw(prom)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        metrics.close()
        for c in concentrators:
            await c.stop()
        await hub.close()
        await gw.close()
        server.close()
        pty.close()


# ------------------------------------------------------------------ drawing

PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#19c1bc", "#fade2a",
           "#c4162a", "#a16c3a", "#96d98d"]
GRAFANA_COLORS = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c"}


def draw(prom, dashboard: dict, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.patches
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    all_panels = dashboard["panels"]
    rows_h = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in all_panels)
    unit_px, width_px = 34, 1800
    fig = plt.figure(figsize=(width_px / 100, rows_h * unit_px / 100), dpi=100, facecolor="#111217")
    step = max((end - start) / 200, 1.0)

    px_w, px_h = 1 / width_px, 1 / (rows_h * unit_px)

    def frame(gp):
        """The panel's rectangle in figure coordinates, a small gap around it."""
        x0, w = gp["x"] / 24 + 3 * px_w, gp["w"] / 24 - 6 * px_w
        top, h = 1 - gp["y"] / rows_h - 3 * px_h, gp["h"] / rows_h - 6 * px_h
        return x0, top - h, w, h

    def inner(gp, legend_rows: int):
        """Where the plot goes inside the frame: room for the title, the y labels and the legend below."""
        x0, y0, w, h = frame(gp)
        left, title, bottom = 48 * px_w, 26 * px_h, (22 + 11 * legend_rows) * px_h
        return [x0 + left, y0 + bottom, w - left - 10 * px_w, h - title - bottom]

    def panel_box(p):
        x0, y0, w, h = frame(p["gridPos"])
        fig.patches.append(matplotlib.patches.FancyBboxPatch(
            (x0, y0), w, h, boxstyle="square,pad=0", transform=fig.transFigure, facecolor="#181b1f",
            edgecolor="#2c3235", linewidth=0.8, zorder=-10))
        fig.text(x0 + 8 * px_w, y0 + h - 8 * px_h, p["title"], color="#d8d9da", fontsize=9, va="top")

    for p in all_panels:
        gp = p["gridPos"]
        if p["type"] == "row":
            y = 1 - (gp["y"] + 0.7) / rows_h
            fig.text(0.005, y, p["title"], color="#d8d9da", fontsize=14, fontweight="bold")
            continue
    for p in dashboard_panels(dashboard):
        panel_box(p)
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        if p["type"] in ("stat", "bargauge"):
            values = []
            for t in p["targets"]:
                for r in prom.query(at_all(t["expr"], dashboard)):
                    values.append((_legend(t.get("legendFormat", ""), r.get("metric", {})), float(r["value"][1])))
            ax = fig.add_axes(inner(p["gridPos"], 0))
            ax.set_facecolor("#181b1f")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if p["type"] == "stat":
                v = values[0][1] if values else float("nan")
                text = _fmt(v, unit)
                color = p["fieldConfig"]["defaults"].get("color", {}).get("fixedColor", "green")
                for mp in p["fieldConfig"]["defaults"].get("mappings") or []:
                    opt = mp.get("options", {}).get("" if math.isnan(v) else str(int(v)))
                    if opt:
                        text, color = opt["text"], opt.get("color", color)
                ax.text(0.5, 0.5, text, color=GRAFANA_COLORS.get(color, color), fontsize=26, fontweight="bold",
                        ha="center", va="center", transform=ax.transAxes)
            else:
                values.sort(key=lambda kv: kv[1])
                top = max((v for _, v in values), default=0) or 1
                for i, (name, v) in enumerate(values):
                    ax.barh(i, v / top, color="#5794f2" if v else "#2c3235", height=0.7)
                    ax.text(-0.01, i, name, color="#d8d9da", fontsize=7, ha="right", va="center")
                    ax.text(v / top + 0.01, i, _fmt(v, unit), color="#d8d9da", fontsize=7, va="center")
                ax.set_xlim(-0.35, 1.15)
                ax.set_ylim(-0.6, len(values) - 0.4)
            continue
        series, returned = [], 0
        for t in p["targets"]:
            for r in prom.query_range(at_all(t["expr"], dashboard), start, end, step):
                returned += 1
                pts = [(float(ts), float(v)) for ts, v in r["values"] if not math.isnan(float(v))]
                if pts and any(v for _, v in pts):  # series that stay at 0 are left out of the picture
                    series.append((_legend(t.get("legendFormat", ""), r["metric"]), pts))
        cols = 3 if p["gridPos"]["w"] >= 12 else 2
        ax = fig.add_axes(inner(p["gridPos"], math.ceil(len(series) / cols) if series else 0))
        ax.set_facecolor("#181b1f")
        for side in ax.spines.values():
            side.set_color("#2c3235")
        ax.tick_params(colors="#9fa7b3", labelsize=7)
        for n, (label, pts) in enumerate(series):
            ax.plot([datetime.fromtimestamp(ts) for ts, _ in pts], [v for _, v in pts],
                    color=PALETTE[n % len(PALETTE)], linewidth=1.3, label=label)
        ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.xaxis.set_major_locator(mdates.MinuteLocator(interval=max(int((end - start) / 60 / 4), 1)))
        ax.grid(color="#2c3235", linewidth=0.5)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _, u=unit: _fmt(v, u)))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        if series:
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(-0.02, -0.09), ncol=cols, frameon=False,
                      labelcolor="#d8d9da", handlelength=1.2, columnspacing=1.0, borderaxespad=0)
        else:
            ax.text(0.5, 0.5, "0 throughout" if returned else "no data", color="#9fa7b3", ha="center", va="center",
                    transform=ax.transAxes)
    fig.text(0.995, 0.998, f"{dashboard['title']} · {datetime.fromtimestamp(start):%Y-%m-%d %H:%M}–"
                           f"{datetime.fromtimestamp(end):%H:%M}", color="#9fa7b3", fontsize=9, ha="right", va="top")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)


def _legend(fmt: str, labels: dict) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{%s}}" % k, v)
    return out or ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


def _fmt(v: float, unit: str) -> str:
    if math.isnan(v):
        return "–"
    if unit == "percentunit":
        return f"{v * 100:.0f}%"
    if unit == "s":
        if v >= 3600:
            return f"{v / 3600:.1f} h"
        if v >= 60:
            return f"{v / 60:.1f} min"
        if v >= 1:
            return f"{v:.1f} s"
        return f"{v * 1000:.0f} ms"
    if unit == "reqps":
        return f"{v:.2g}/s"
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="how much traffic (or history) to draw")
    ap.add_argument("--prometheus", default="", help="draw from this Prometheus instead of a gateway of our own")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    dashboard = json.loads(DASHBOARD.read_text())

    def render(prom) -> None:
        end = time.time()
        draw(prom, dashboard, end - args.minutes * 60, end, args.out)
        print(f"wrote {args.out}")

    if args.prometheus:
        prom = Prometheus.__new__(Prometheus)
        prom.url = args.prometheus.rstrip("/")
        render(prom)
        return 0
    with tempfile.TemporaryDirectory(prefix="feikong-dashboard-") as d:
        asyncio.run(live_traffic(args.minutes * 60, Path(d), render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
