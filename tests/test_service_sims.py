"""`feikong sim modbus|concentrator|billing` as child processes, read by the gateway's own channels over real
sockets, a real pseudo-terminal pair and a real Mosquitto; SIGTERM stops each cleanly."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from datetime import datetime, timezone

import msgspec
import paho.mqtt.client as paho
import pytest

from gateway.southbound.concentrator import ConcentratorHub, HubSettings
from gateway.southbound.modbus import ModbusChannel, ModbusMeter
from protocols.modbus import load_profile
from protocols.mqtt import billing as contract

FEIKONG = [sys.executable, "-m", "gateway.cli"]
CST = 8 * 3600


async def child(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*FEIKONG, *argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE,
                                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


async def lines(proc, n: int, timeout: float = 30) -> list[str]:
    return [(await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().rstrip() for _ in range(n)]


async def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 15)
    err = (await proc.stderr.read()).decode()
    assert code == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("where", ["tcp", "rtu"])
async def test_sim_modbus_serves_meters_the_gateway_reads_and_cut_off_ones_are_open(where):
    argv = ["--tcp", "127.0.0.1:0"] if where == "tcp" else ["--rtu"]
    proc = await child("sim", "modbus", *argv, "--meters", "3", "--first-address", "500", "--first-device", "4",
                       "--cut-off-every", "2")
    try:
        header, *meters = await lines(proc, 4)
        assert header.startswith("3 simulated Modbus meters (hiking_dds238_2_znsr) on "), header
        assert meters == ["000000000500 device 4", "000000000501 device 5 (cut off)", "000000000502 device 6"]
        profile = load_profile("hiking_dds238_2_znsr")
        devices = [ModbusMeter(f"M{d}", d, profile) for d in (4, 5, 6)]
        if where == "tcp":
            port = int(re.search(r"tcp://127\.0\.0\.1:(\d+)", header).group(1))
            channel = ModbusChannel.tcp("127.0.0.1", port, devices, timeout_s=1.0)
        else:
            path = re.search(r"pty (/dev/\S+)", header).group(1)
            channel = ModbusChannel.rtu(path, devices, timeout_s=1.0)
        driver = channel.bind(datetime.now, CST)
        try:
            assert [(await driver.read(f"M{d}")).open for d in (4, 5, 6)] == [False, True, False]
            reading = await channel.read_meter("M4")
            assert reading.errors == {} and reading.values["forward_active_energy_block"]
        finally:
            await channel.close()
    finally:
        await stop(proc)


@pytest.mark.parametrize("mode", ["frame", "json"])
async def test_sim_concentrator_comes_online_and_answers_through_the_hub(broker, mode):
    proc = await child("sim", "concentrator", "--broker", f"{broker.host}:{broker.port}", "--id", "c9",
                       "--mode", mode, "--meters", "2", "--first-address", "42", "--cut-off-every", "2")
    hub = await ConcentratorHub(HubSettings(broker.host, broker.port, client_id="test-hub")).start()
    try:
        header, *meters = await lines(proc, 3)
        assert header == (f"simulated concentrator c9 ({mode} mode) on mqtt://{broker.host}:{broker.port} with 2 "
                          f"DL/T 645 meters")
        assert meters == ["000000000042", "000000000043 (cut off)"]
        await hub.wait_state("c9", True, 10)
        addresses = ["000000000042", "000000000043"]
        channel = hub.frame_channel("c9", addresses) if mode == "frame" else hub.json_channel("c9", addresses)
        driver = channel.bind(datetime.now, CST)
        assert [(await driver.read(a)).open for a in addresses] == [False, True]
        await stop(proc)
        await hub.wait_state("c9", False, 10)  # it said goodbye
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await hub.close()


async def test_sim_billing_pays_and_prints_the_gateways_events(broker):
    got: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    spy = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="spy", protocol=paho.MQTTv5)
    subscribed = asyncio.Event()
    spy.on_connect = lambda c, *_: c.subscribe(f"{contract.IN}/payments", qos=1)
    spy.on_subscribe = lambda *_: loop.call_soon_threadsafe(subscribed.set)
    spy.on_message = lambda c, u, msg: loop.call_soon_threadsafe(got.put_nowait, msg.payload)
    spy.connect(broker.host, broker.port)
    spy.loop_start()
    await asyncio.wait_for(subscribed.wait(), 10)
    proc = await child("sim", "billing", "--broker", f"{broker.host}:{broker.port}", "--pay", "A7=12.50")
    try:
        header, paid = await lines(proc, 2)
        assert header.startswith("simulated billing system on mqtt://")
        assert json.loads(paid)["paid"] == "A7"
        payment = msgspec.json.decode(await asyncio.wait_for(got.get(), 10), type=contract.Payment)
        assert (payment.account, str(payment.amount), payment.payment_id) == ("A7", "12.50",
                                                                                json.loads(paid)["payment_id"])
        event = contract.Event("ev-1", "relay_confirmed", "000000000001", datetime.now(timezone.utc), 1, "gw",
                               {"action": "close"})
        spy.publish(contract.event_topic(event.kind), contract.encode(event), qos=1)
        shown = json.loads((await lines(proc, 1))[0])
        assert shown == {"kind": "relay_confirmed", "subject": "000000000001", "id": "ev-1",
                         "data": {"action": "close"}}
        await stop(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        spy.loop_stop()
        spy.disconnect()


def test_sim_billing_refuses_a_bad_payment(capsys):
    from gateway.cli import main

    assert main(["sim", "billing", "--broker", "127.0.0.1:1", "--pay", "A7"]) == 1
    assert "--pay must be ACCOUNT=AMOUNT" in capsys.readouterr().err
