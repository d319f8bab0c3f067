"""`feikong run --config` as a child process against simulated meters on every kind of channel (DL/T 645 over
TCP and a real pseudo-terminal, Modbus TCP, an MQTT concentrator in frame and JSON mode) and a real Mosquitto:
cut-off customers pay over MQTT, each relay is closed and verified by read-back, and SIGTERM stops it cleanly."""
from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.error
import urllib.request
import signal
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.clock import SystemClock, local_naive
from protocols.modbus import load_profile
from simulators.billing import BillingSim
from simulators.concentrator import SimConcentrator
from simulators.dlt645 import PtyBus, SimBus, SimMeter, serve_tcp
from simulators.modbus import ModbusSimMeter
from simulators.modbus import serve_tcp as serve_modbus_tcp

ROOT = Path(__file__).resolve().parent.parent
FEIKONG = [sys.executable, "-m", "gateway.cli"]


def cut_off(i: int, cls=SimMeter, **kw) -> SimMeter:
    return cls(f"{i:012d}", relay_open=True, relay_command_open=True, energy=[Decimal("100.00")] * 5, **kw)


def in_credit(i: int) -> SimMeter:
    return SimMeter(f"{i:012d}", energy=[Decimal("100.00")] * 5)


async def spawn(*args: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return await asyncio.create_subprocess_exec(*FEIKONG, *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Log:
    """A child's stderr, collected line by line as it comes."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._changed.set()

    async def wait_for(self, text: str, timeout: float) -> str:
        async def find():
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                self._changed.clear()
                await self._changed.wait()
        try:
            return await asyncio.wait_for(find(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {text!r} in {timeout}s; the log:\n" + "\n".join(self.lines)) from None

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.mark.slow
async def test_feikong_run_closes_paid_meters_on_every_kind_of_channel_and_stops_on_sigterm(tmp_path, broker):
    local = local_naive(SystemClock())
    tcp = [cut_off(1), in_credit(2)]
    pty = [cut_off(11)]
    profile = load_profile("hiking_dds238_2_znsr")
    modbus = [cut_off(21, ModbusSimMeter, device_id=1, profile=profile, clock=local)]
    frame = [cut_off(31), in_credit(32)]
    json_mode = [cut_off(41)]

    tcp_server = await serve_tcp(SimBus.of(tcp, clock=local, turnaround_s=0.0))
    pty_bus = PtyBus(SimBus.of(pty, clock=local, turnaround_s=0.0))
    modbus_server = await serve_modbus_tcp(modbus)
    c1 = await SimConcentrator.of("c1", frame, broker.host, broker.port, clock=local).start()
    c2 = await SimConcentrator.of("c2", json_mode, broker.host, broker.port, clock=local, mode="json").start()
    channel_of = {}
    rows = ["account_id,tariff,area,notice_channels,contacts,meter_id,channel,device_id"]
    for name, group in (("tcp", tcp), ("pty", pty), ("modbus", modbus), ("frame", frame), ("json", json_mode)):
        for m in group:
            device = str(m.device_id) if name == "modbus" else ""
            rows.append(f"A{m.address[-2:]},flat,north,sms,sms=1380000{m.address[-4:]},{m.address},{name},{device}")
            channel_of[m.address] = name
    (tmp_path / "fleet.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "control.toml").write_text("[commands.close]\nsettle_s = 1\nverify_first_s = 0.2\n"
                                           "verify_every_s = 0.2\n")
    port = tcp_server.sockets[0].getsockname()[1]
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[store]
url = "sqlite://state/feikong.db"
[control]
file = "control.toml"
[gateway]
poll_interval_s = 1
tick_s = 0.2
[fleet]
file = "fleet.csv"
tariffs = "{ROOT / 'config' / 'tariffs.example.json'}"
[mqtt]
host = "{broker.host}"
port = {broker.port}
instance = "svc-test"
[metrics]
port = 0
[http]
port = 0
[[channels]]
kind = "dlt645_tcp"
name = "tcp"
host = "127.0.0.1"
port = {port}
baud = 9600
timeout_s = 0.2
margin_s = 0.1
retries = 0
[[channels]]
kind = "dlt645_serial"
name = "pty"
device = "{pty_bus.path}"
baud = 9600
parity = "N"
timeout_s = 0.2
retries = 0
[[channels]]
kind = "modbus_tcp"
name = "modbus"
host = "127.0.0.1"
port = {modbus_server.port}
timeout_s = 0.5
[[channels]]
kind = "concentrator"
name = "frame"
id = "c1"
margin_s = 1.0
[[channels]]
kind = "concentrator"
name = "json"
id = "c2"
mode = "json"
""")
    (tmp_path / "state").mkdir()
    billing = await asyncio.to_thread(BillingSim(broker.host, broker.port, client_id="svc-billing").start)
    proc = await spawn("run", "--config", str(config))
    log = Log(proc.stderr)
    try:
        for what in ("store sqlite://", "channel tcp: dlt645_tcp", "channel pty: dlt645_serial",
                     "channel modbus: modbus_tcp", "channel frame: concentrator", "channel json: concentrator",
                     "fleet: 7 accounts, 7 meters", "billing bridge: mqtt://", "metrics: http://127.0.0.1:"):
            await log.wait_for(what, 30)
        api = re.search(r"operator API on (http://\S+)/api/v1", await log.wait_for("operator API on", 30)).group(1)
        # no tokens file: the probes answer, every operator call is refused
        assert (await asyncio.to_thread(_get, f"{api}/api/v1/health")) == (200, {"status": "ok"})
        assert (await asyncio.to_thread(_get, f"{api}/api/v1/meters"))[0] == 401
        await log.wait_for("first read cycle: 7 meters", 60)
        owed = [a for a, m in {**{m.address: m for g in (tcp, pty, modbus, frame, json_mode) for m in g}}.items()
                if m.relay_open]
        assert sorted(channel_of[a] for a in owed) == ["frame", "json", "modbus", "pty", "tcp"]
        for address in owed:
            billing.pay(f"A{address[-2:]}", "50.00", f"PAY-{address}")

        def closed() -> set[str]:
            return {ev.subject for ev in billing.of_kind("relay_confirmed") if ev.data["action"] == "close"}

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while closed() != set(owed):
            assert loop.time() < deadline, f"closed: {closed()} of {owed}; the log:\n{log.text()}"
            await asyncio.sleep(0.2)
        every = {m.address: m for g in (tcp, pty, modbus, frame, json_mode) for m in g}
        assert [a for a in owed if every[a].relay_open] == []  # the simulated relays really closed
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.text()
        await log.task
        assert "stopped" in log.lines[-1], log.text()
        assert "Traceback" not in log.text(), log.text()
        # a second start registers nothing twice and sees the same fleet (idempotent registration)
        proc = await spawn("run", "--config", str(config))
        log = Log(proc.stderr)
        await log.wait_for("fleet: 7 accounts, 7 meters, 3 tariffs (0 accounts and 0 meters new)", 60)
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.text()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.to_thread(billing.stop)
        await c1.stop()
        await c2.stop()
        await modbus_server.close()
        pty_bus.close()
        tcp_server.close()
        await tcp_server.wait_closed()
