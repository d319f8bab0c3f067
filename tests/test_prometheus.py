"""The alert rules and the dashboard against a real Prometheus (Debian's package; `./run test` installs it):
promtool checks and unit-tests the rules, then a Prometheus on a free port scrapes a live gateway (real
broker, simulated meters, traffic: a payment and its verified close, a meter that will not close, a silent
meter, a trip held by a gate) and every PromQL expression of the dashboard and of the rules is evaluated
through its HTTP API: each must return data."""
import asyncio
import json
import re
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from gateway.core.model import Adjustment
from gateway.ops.metrics import GatewayMetrics
from gateway.southbound.concentrator import ConcentratorHub, HubSettings
from protocols.mqtt import billing as contract
from simulators.billing import BillingSim
from simulators.dlt645 import SimMeter
from simulators.dlt645.meter import Faults
from simulators.prometheus import (PROMTOOL, Prometheus, at_all, available, dashboard_expressions, dashboard_panels,
                                   label_values_selector)

from .control_fixtures import account, at_any_hour
from .mqtt_fixtures import LiveGateway, tripped_meter
from .test_metrics import FAILING

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "feikong-dashboard.json"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prometheus_installed():
    if not available():
        pytest.fail("prometheus/promtool are not installed; `./run test` installs them (Debian: prometheus)")


def promtool(*args: str) -> str:
    r = subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def test_promtool_checks_the_rules_and_the_config_and_runs_the_unit_tests():
    assert "SUCCESS: 13 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")


def test_the_unit_tests_show_every_alert_firing_and_not_firing():
    alerts = {r["alert"] for g in rules()["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts and firing == alerts and quiet == alerts


def rules() -> dict:
    return yaml.safe_load((PROM / "alerts.yml").read_text())


def _walk(node, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def test_the_dashboard_expressions_are_found_exhaustively():
    """Every ``expr`` anywhere in the JSON is among the extracted ones (none hides in a nested row or an odd
    place), every panel asks for something, and every query variable is there."""
    dash = json.loads(DASHBOARD.read_text())
    found = [e for _, e in dashboard_expressions(dash)]
    assert set(_walk(dash, "expr")) <= set(found)
    assert len([t for p in dashboard_panels(dash) for t in p.get("targets", [])]) == len(list(_walk(dash, "expr")))
    assert all(p.get("targets") for p in dashboard_panels(dash))
    variables = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    assert len(found) == len(list(_walk(dash, "expr"))) + len(variables)
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "instance", "kind"}
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dashboard_panels(dash) for t in p["targets"])
    assert len(dashboard_panels(dash)) >= 25


# ------------------------------------------------------------------ alert expressions, honestly evaluated

_SET_OP = re.compile(r"\s(and|or|unless)\s")
_MATCHING = re.compile(r"\s*(on|ignoring)\s*\([^)]*\)\s*")
_COMPARISON = re.compile(r"^(?P<lhs>.+?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<rhs>-?[0-9.]+(e[+-]?[0-9]+)?)\s*$", re.S)


def _top_level(expr: str) -> str:
    """The expression with everything inside brackets, braces, parentheses and quotes blanked out (same
    length), so that operators found in it are top-level ones."""
    out, depth, quote = [], 0, None
    for ch in expr:
        if quote:
            out.append(" ")
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
            out.append(" ")
        elif ch in "([{":
            depth += 1
            out.append(" ")
        elif ch in ")]}":
            depth -= 1
            out.append(" ")
        else:
            out.append(ch if depth == 0 else " ")
    return "".join(out)


def conditions(expr: str) -> list[str]:
    """What to evaluate for an alert: its expression returns nothing while all is well (that is the point of
    an alert), so "returns data" would prove nothing there. Instead each operand of its top-level
    ``and``/``or``/``unless`` is evaluated, its threshold comparison turned into a ``bool`` comparison:
    ``x > 0`` -> ``x > bool 0``, which returns every series of ``x`` with 0 or 1. An operand that returns
    nothing has a wrong name, label or function, or its series do not exist: the test fails. The thresholds
    themselves are tested by promtool, firing and not firing (alerts.test.yml). An operand that is no
    comparison with a number is not accepted: the test cannot fall back to something weaker."""
    expr = expr.strip()
    blanked = _top_level(expr)
    cuts = []
    for m in _SET_OP.finditer(blanked):
        modifier = _MATCHING.match(expr, m.end())
        cuts.append((m.start(), modifier.end() if modifier else m.end()))
    parts, at = [], 0
    for start, end in cuts:
        parts.append(expr[at:start])
        at = end
    parts.append(expr[at:])
    out = []
    for part in parts:
        part = part.strip()
        m = _COMPARISON.match(_top_level(part))
        assert m, f"alert condition {part!r} is not '<expression> <comparison> <number>'"
        lhs, op, rhs = part[:m.start("op")].rstrip(), m["op"], part[m.start("rhs"):]
        out.append(f"{lhs} {op} bool {rhs}")
    return out


def test_conditions_turn_thresholds_into_bool_comparisons_at_the_top_level_only():
    assert conditions('up{job="feikong"} == 0') == ['up{job="feikong"} == bool 0']
    assert conditions("min_over_time(x[10m]) > 50\nand\nderiv(x{a=\"b>1\"}[10m]) > 0") == \
        ["min_over_time(x[10m]) > bool 50", 'deriv(x{a="b>1"}[10m]) > bool 0']
    assert conditions("r < 0.9\nand on (action)\nn >= 10") == ["r < bool 0.9", "n >= bool 10"]
    with pytest.raises(AssertionError):
        conditions("absent(up)")


# ------------------------------------------------------------------ a live gateway, a real Prometheus


async def drive(live, billing: BillingSim, stuck: SimMeter) -> None:
    """Traffic with something in every row of the dashboard: a paid customer reconnected (remote close,
    verified), one whose meter will not close (retries, a field order past its deadline), a silent meter
    (failed reads, unreachable), a refund into arrears (a disconnect case held by the notice gate, notice
    requests, a failed receipt)."""
    gw = live.gw
    await asyncio.to_thread(billing.wait_for, lambda b: b.status.get("gw-test") is not None, 10, "online")
    billing.pay("A1", "50.00", "P1")  # meter 2: tripped, closes
    billing.pay("A0", "50.00", "P2")  # meter 1: stuck
    await asyncio.to_thread(billing.wait_for, lambda b: b.of_kind("relay_confirmed")
                            and b.of_kind("field_order_created"), 20, "a close confirmed and a field order")
    for _ in range(3):
        await gw.poll_once(gw.channels[0])
    billing.pay("A3", "5.00", "P3")
    await asyncio.to_thread(billing.wait_for, lambda b: len(b.applied) == 3, 10, "payments applied")
    await gw.credits([Adjustment("R1", "A3", -2000, int(gw.clock.now()), "op1", "refund", kind="refund")])
    await asyncio.to_thread(billing.wait_for, lambda b: b.of_kind("trip_deferred"), 10, "trip deferred")
    first = next(e.data for e in billing.of_kind("notice_request") if e.data["account_id"] == "A3")
    billing.send(contract.NoticeReceipt("RC1", first["request_id"], "failed", datetime.now(timezone.utc)))


async def test_prometheus_scrapes_a_live_gateway_and_every_expression_returns_data(broker, tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    stuck = tripped_meter(1)
    stuck.faults = Faults(stuck_relay=True)
    meters = [stuck, tripped_meter(2), SimMeter("000000000003", faults=Faults(no_reply=1.0))]
    metrics = GatewayMetrics(sample_s=0.5)  # a registry of its own, with the process collectors
    hub = ConcentratorHub(HubSettings(broker.host, broker.port, client_id="feikong-test-south"))
    await hub.start()
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, accounts=[account(i) for i in range(4)],
                           meters=meters, config=at_any_hour(replace(FAILING, dispatch=replace(
                               FAILING.dispatch, reconnect_deadline_s=8))),
                           metrics=metrics, hub=hub) as live:
        port = metrics.serve()
        with Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"], rule_files=[PROM / "alerts.yml"]) as prom:
            with BillingSim(broker.host, broker.port) as billing:
                await drive(live, billing, stuck)
                exprs = [(w, at_all(e, dash)) for w, e in dashboard_expressions(dash)]
                for group in rules()["groups"]:
                    for r in group["rules"]:
                        if "record" in r:
                            exprs.append((f"record {r['record']}", r["expr"]))
                        else:
                            prom.query(r["expr"])  # the alert as written parses and runs (it may be empty)
                            exprs += [(f"alert {r['alert']} condition {i}", c)
                                      for i, c in enumerate(conditions(r["expr"]))]
                exprs.append(("scrapes", 'count_over_time(up{job="feikong"}[1m]) >= 10'))
                # the reconnect deadline passed (payment + 8 s): the alert is pending (its for: is a minute)
                exprs.append(("deadline alert", 'ALERTS{alertname="FeikongReconnectDeadlinePassed"}'))
                missing = await _until_all_return_data(prom, exprs, timeout=90)
                assert not missing, "no data for:\n" + "\n".join(f"  {w}: {e}" for w, e in missing)
                # and the traffic shows where it should
                assert _value(prom, 'sum(feikong_reconnect_duration_seconds_count{via="remote"})') == 1
                assert _value(prom, 'sum(feikong_field_orders_overdue{kind="reconnect"})') == 1
                assert _value(prom, 'sum(feikong_meters{state="unreachable"})') == 1
                rows = await live.call(live.gw.control.store.outbox, 0, 100_000)
                deferred = [data["gate"] for _, _, kind, _, _, data in rows if kind == "trip_deferred"]
                assert deferred
                for gate in set(deferred):
                    assert _value(prom, f'sum(feikong_trips_blocked_total{{gate="{gate}"}})') == deferred.count(gate)
                assert _value(prom, 'feikong_concentrator_hub_connected') == 1
                assert _value(prom, 'up{job="feikong"}') == 1
    await hub.close()


def _value(prom: Prometheus, expr: str) -> float:
    result = prom.query(expr)
    assert result, f"no data for {expr}"
    return float(result[0]["value"][1])


async def _until_all_return_data(prom: Prometheus, exprs: list[tuple[str, str]], timeout: float) -> list:
    """Ask until every expression returns data (scrapes and rule evaluations take a few seconds to come);
    what still returns nothing at the timeout. A query Prometheus refuses fails at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        missing = []
        for where, expr in exprs:
            sel, label = label_values_selector(expr)
            result = await asyncio.to_thread(prom.query, sel)
            if not result or (label and not all(label in r["metric"] for r in result)):
                missing.append((where, expr))
        if not missing or loop.time() > deadline:
            return missing
        await asyncio.sleep(1.0)
