"""The demo end to end: the whole story on a small fleet of every channel kind, checked against what the store
and the simulated meters recorded; and Ctrl-C on ``feikong demo`` leaving nothing behind."""
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.core.commands import CommandState
from gateway.core.notices import NoticeState
from gateway.demo import Story, demo_config, fleet_spec, run_demo
from simulators.broker import mosquitto_available

SMALL = {"dlt645_tcp": 12, "dlt645_pty": 6, "modbus_tcp": 6, "mqtt_frame": 6, "mqtt_json": 6}
#: credit for 20 to 60 s, everyone who is tripped pays within seconds, crews complete every order
QUICK_STORY = Story(opening_fen=(10, 35), pay_share=1.0, pay_after_s=(0.5, 2.0), crew_share=1.0,
                    crew_after_s=(1.0, 3.0))


@pytest.fixture(autouse=True)
def _mosquitto():
    if not mosquitto_available():
        pytest.fail("mosquitto is not installed; `./run test` installs it (Debian: mosquitto mosquitto-clients)")


def _everything_happened(s: dict) -> bool:
    return (s["notices_confirmed"] > 0 and s["closes"] >= 5 and s["orders_completed"] >= 1
            and {"dlt645_tcp", "dlt645_pty", "modbus_tcp", "mqtt_frame", "mqtt_json"} <= set(s["cycle_s"]))


async def test_customers_run_out_are_warned_tripped_pay_and_are_reconnected_and_failing_meters_get_crews():
    out = io.StringIO()
    spec = fleet_spec(SMALL, per_line=6, stuck_relay=0.15, silent_after_trip=0.15, seed=3)
    started = time.monotonic()
    s = await run_demo(spec, QUICK_STORY, cycles=40, until=_everything_happened, interval_s=2.0,
                       poll_interval_s=1.0, out=out)
    text = out.getvalue()
    assert _everything_happened(s), text[-3000:]
    assert time.monotonic() - started < 90
    store, fleet = s["store"], s["fleet"]
    notices, commands, orders = store["notices"], store["relay_commands"], store["work_orders"]

    # notices went out and were confirmed; some receipts failed or never came, and those notices escalated
    assert any(n.state == NoticeState.DELIVERED for n in notices)
    assert s["notices_escalated"] > 0 and s["receipts"].get("delivered", 0) > 0
    # every trip the store confirmed moved a real relay, and only after a notice had been confirmed
    trips = [c for c in commands if c.action == "trip" and c.state == CommandState.CONFIRMED]
    assert trips
    delivered = {}
    for n in notices:
        if n.delivered_at is not None:
            delivered[n.account_id] = min(delivered.get(n.account_id, n.delivered_at), n.delivered_at)
    lead = demo_config().trips.notice_lead_s
    for c in trips:
        assert any(action == "trip" for _, action, _ in fleet.meters[c.meter_id].relay_log), c.meter_id
        assert delivered[c.account_id] + lead <= c.created_at + 1, c  # the notice gate held
    # payments closed relays, verified by reading them back: the meters are closed again
    closes = [c for c in commands if c.action == "close" and c.state == CommandState.CONFIRMED]
    assert len(closes) >= 5 and len(s["latencies"]) >= 1
    tripped_at = {}
    for c in trips:
        tripped_at[c.meter_id] = min(tripped_at.get(c.meter_id, c.created_at), c.created_at)
    reconnected = [c for c in closes if c.created_at > tripped_at.get(c.meter_id, float("inf"))
                   and c.meter_id not in fleet.faulty]
    assert reconnected
    # the meter itself was told to close (DL/T 645 direct_close, Modbus close)
    assert all(any("close" in a for _, a, _ in fleet.meters[c.meter_id].relay_log) for c in reconnected)
    # failing meters (stuck relays, silent after a trip) got field orders with deadlines; crews completed some
    built_faulty = {o.meter_id for o in orders}
    assert orders and all(o.deadline_at > o.created_at for o in orders)
    assert any(o.state == "completed" for o in orders)
    crewed = [m for m in built_faulty if any(op == "field-crew" for _, _, op in fleet.meters[m].relay_log)]
    assert crewed
    # the summary block was printed, the malformed payment was dead-lettered, and everything stopped
    assert "dead letter: invalid Payment" in text and s["dead_letters"] == 1
    assert re.search(r"^   meters    36: \d+ online, \d+ tripped, \d+ unreachable$", text, re.M)
    assert text.rstrip().endswith("feikong demo stopped.")


def _processes_mentioning(fragment: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


@pytest.mark.parametrize("where", [[], ["--fleet-process"]], ids=["fleet-in-process", "fleet-in-a-child"])
def test_ctrl_c_stops_the_demo_cleanly_and_leaves_nothing_behind(where):
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "demo", "--tcp-meters", "4", "--pty-meters", "2",
                             "--modbus-meters", "2", "--concentrator-meters", "2", "--json-meters", "2",
                             "--per-line", "2", "--interval", "1", *where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"the demo ended early: {''.join(lines)}{proc.stderr.read()}"
            lines.append(line)
            if line.startswith("   dead letters"):  # the first whole summary block
                break
        text = "".join(lines)
        tmp = re.search(r"^store +sqlite://(/\S+)/feikong\.db$", text, re.M).group(1)
        port = int(re.search(r"^broker +mqtt://127\.0\.0\.1:(\d+)$", text, re.M).group(1))
        # the operator API answers the console with the token the demo made
        console = re.search(r"^console  feikong (meters --api \S+ --token-file \S+)", text, re.M).group(1).split()
        listed = subprocess.run([sys.executable, "-m", "gateway.cli", *console, "--limit", "2"], capture_output=True,
                                text=True, timeout=30)
        assert listed.returncode == 0 and "000000000001" in listed.stdout, listed.stderr
        # its metrics answer Prometheus' format, with the fleet in them
        metrics_url = re.search(r"^metrics +(http://127\.0\.0\.1:\d+/metrics)$", text, re.M).group(1)
        exposition = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        assert 'feikong_meters{kind="dlt645_tcp",state=' in exposition and "feikong_mqtt_connected 1.0" in exposition
        # the spawned mosquitto runs from it (and the fleet process reads its description there)
        assert os.path.isdir(tmp) and len(_processes_mentioning(tmp)) == 1 + len(where)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert rest.rstrip().endswith("feikong demo stopped."), rest
    assert "Traceback" not in err and "Task was destroyed" not in err and "never awaited" not in err, err
    assert not os.path.exists(tmp)
    assert not _processes_mentioning(tmp)  # no mosquitto (nor fleet) left running
    api_port = int(re.search(r"^api +http://127\.0\.0\.1:(\d+)/api/v1$", text, re.M).group(1))
    metrics_port = int(metrics_url.rsplit(":", 1)[1].split("/")[0])
    for closed in (port, api_port, metrics_port):  # neither the broker, the API nor the metrics listen any more
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", closed), timeout=1).close()


def test_the_demo_policies_allow_trips_at_any_hour_even_on_a_statutory_holiday():
    from datetime import date

    from gateway.core.policy import TripWindows

    national_day = date(2026, 10, 1)
    cfg = demo_config(today=national_day)
    windows = TripWindows(cfg.trips.window, cfg.calendar.calendar())
    assert windows.day_block(national_day) is None and windows.day_block(date(2026, 10, 2)) is None
    plain = TripWindows(cfg.trips.window, replace(cfg.calendar, extra_workdays=()).calendar())
    assert plain.day_block(national_day).gate.value == "holiday"  # without the demo's working days it would hold
    assert cfg.trips.window.hours == "00:00-24:00" and cfg.trips.daily_cap_per_area >= 100_000
