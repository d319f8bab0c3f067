"""The fleet simulator: one description, every kind of line served, faults drawn from the seed, a field crew's
repair, and the same fleet as a child process."""
import asyncio
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from protocols.dlt645.client import Dlt645Client, Dlt645Link, Dlt645Timeout, LinkSettings
from protocols.dlt645.codes import RelayAction
from protocols.dlt645.di import by_name
from simulators.fleet import KINDS, Fleet, FleetError, FleetProcess, FleetSpec

LINK = LinkSettings(baud=9600, turnaround_s=0.1, margin_s=0.2, retries=0)
ADDRESS_DI = by_name("meter_address").di


async def _address_of(link: Dlt645Link, address: str) -> str:
    client = Dlt645Client(link)
    try:
        return (await client.read(address, ADDRESS_DI)).value
    finally:
        await link.close()


async def test_one_description_serves_every_kind_of_line(broker):
    spec = FleetSpec({"dlt645_tcp": 5, "dlt645_pty": 3, "modbus_tcp": 3, "mqtt_frame": 2, "mqtt_json": 2},
                     per_line=2, first_address=700)
    async with Fleet(spec, broker=(broker.host, broker.port)) as fleet:
        kinds = [line.kind for line in fleet.lines]
        assert kinds == ["dlt645_tcp"] * 3 + ["dlt645_pty"] * 2 + ["modbus_tcp"] * 2 + ["mqtt_frame", "mqtt_json"]
        addresses = [m.address for line in fleet.lines for m in line.meters]
        assert addresses == [f"{a:012d}" for a in range(700, 715)] and list(fleet.meters) == addresses
        modbus = [line.describe() for line in fleet.lines if line.kind == "modbus_tcp"]
        assert [d["device_ids"] for d in modbus] == [[1, 2], [1]]
        # the DL/T 645 lines answer a real client: over TCP, and on the pseudo-terminal (8N1)
        tcp, pty = fleet.lines[2], fleet.lines[3]
        host, port = tcp.where.rsplit(":", 1)
        assert await _address_of(Dlt645Link.tcp(host, int(port), LINK), tcp.meters[0].address) == "000000000704"
        assert await _address_of(Dlt645Link.serial(pty.where, replace(LINK, parity="N")),
                                 pty.meters[0].address) == "000000000705"
        described = json.loads(json.dumps(fleet.describe()))
        assert described["spec"]["meters"]["mqtt_json"] == 2 and len(described["lines"]) == 9
    assert fleet.lines[0].meters[0].requests == 0  # nothing was asked of the first line


async def test_faults_are_drawn_from_the_seed_and_a_crew_repairs_a_meter_that_fell_silent_after_its_trip():
    spec = FleetSpec({"dlt645_tcp": 200}, per_line=200, stuck_relay=0.1, silent_after_trip=0.1, seed=11,
                     silent_delay_s=0.3)
    async with Fleet(spec) as fleet, Fleet(spec) as again:
        stuck = [a for a, f in fleet.faulty.items() if f == "stuck_relay"]
        silent = [a for a, f in fleet.faulty.items() if f == "silent_after_trip"]
        assert 8 <= len(stuck) <= 35 and 8 <= len(silent) <= 35
        assert again.faulty == fleet.faulty  # the same description, the same faulty meters
        assert all(fleet.meters[a].faults.stuck_relay for a in stuck)
        host, port = fleet.lines[0].where.rsplit(":", 1)
        client = Dlt645Client(Dlt645Link.tcp(host, int(port), LINK))
        try:
            await client.relay(stuck[0], RelayAction.TRIP)  # acknowledged...
            assert (await client.relay_state(stuck[0]))["relay"] == "closed"  # ...but the contact did not move
            target = silent[0]
            await client.relay(target, RelayAction.TRIP)
            assert (await client.relay_state(target))["relay"] == "open"  # the trip itself is seen
            for _ in range(50):
                if target in fleet.silenced:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(Dlt645Timeout):
                await client.read(target, ADDRESS_DI)
            fleet.repair(target, relay_open=False)  # the crew on site: module replaced, power back on
            assert (await client.relay_state(target))["relay"] == "closed"
            assert fleet.meters[target].relay_log[-1][2] == "field-crew" and target not in fleet.faulty
        finally:
            await client.link.close()


def test_bad_descriptions_name_what_is_wrong():
    with pytest.raises(FleetError, match=r"unknown channel kind\(s\) \['zigbee'\]; allowed: " + ", ".join(KINDS)):
        FleetSpec({"zigbee": 3})
    with pytest.raises(FleetError, match="stuck_relay must be a share between 0 and 1"):
        FleetSpec({"dlt645_tcp": 3}, stuck_relay=1.5)
    with pytest.raises(FleetError, match="the fleet has no meters"):
        FleetSpec({"dlt645_tcp": 0})
    with pytest.raises(FleetError, match=r"unknown key\(s\) \['meterz'\]"):
        FleetSpec.from_dict({"meterz": {"dlt645_tcp": 1}})
    with pytest.raises(FleetError, match="concentrators need a broker"):
        Fleet(FleetSpec({"mqtt_frame": 2}))


async def test_the_fleet_as_a_child_process_prints_where_its_lines_are_and_stops_on_sigterm(tmp_path):
    spec = tmp_path / "fleet.json"
    spec.write_text(json.dumps({"meters": {"dlt645_tcp": 3, "modbus_tcp": 2}, "per_line": 3}))
    proc = subprocess.Popen([sys.executable, "-m", "simulators.fleet", str(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        described = json.loads(proc.stdout.readline())
        line = described["lines"][0]
        host, port = line["where"].rsplit(":", 1)
        assert await _address_of(Dlt645Link.tcp(host, int(port), LINK), line["meters"][2]) == line["meters"][2]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    bad = subprocess.run([sys.executable, "-m", "simulators.fleet", "-"], input='{"meters": {"x": 1}}',
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown channel kind(s) ['x']" in bad.stderr


async def test_a_fleet_process_takes_a_crews_repair_on_its_standard_input_and_stops_with_its_parent(tmp_path):
    spec = FleetSpec({"dlt645_tcp": 2}, stuck_relay=1.0)
    fleet = await FleetProcess(spec, workdir=tmp_path).start()
    try:
        assert set(fleet.faulty.values()) == {"stuck_relay"} and len(fleet.faulty) == 2
        line = fleet.describe()["lines"][0]
        host, port = line["where"].rsplit(":", 1)
        client = Dlt645Client(Dlt645Link.tcp(host, int(port), LINK))
        try:
            meter = line["meters"][0]
            await client.relay(meter, RelayAction.TRIP)
            assert (await client.relay_state(meter))["relay"] == "closed"  # stuck
            fleet.repair(meter, relay_open=True)  # the crew opens it by hand
            for _ in range(50):
                if (await client.relay_state(meter))["relay"] == "open":
                    break
                await asyncio.sleep(0.05)
            assert (await client.relay_state(meter))["relay"] == "open" and meter not in fleet.faulty
        finally:
            await client.link.close()
    finally:
        await fleet.stop()
    assert fleet.proc.returncode == 0
    # its standard input closing (the parent gone) stops it too
    again = await FleetProcess(spec, workdir=tmp_path).start()
    again.proc.stdin.close()
    assert await asyncio.wait_for(again.proc.wait(), 10) == 0


async def test_line_rate_buses_take_their_wire_time_and_tripped_meters_start_open_as_the_report_says(tmp_path):
    spec = FleetSpec({"dlt645_tcp": 6}, per_line=2, line_rate_lines=1, line_rate_per_line=2, line_rate_baud=2400,
                     tripped=0.5, seed=3, turnaround_s=0.0)
    fleet = await FleetProcess(spec, workdir=tmp_path).start()
    try:
        lines = fleet.describe()["lines"]
        assert [line.get("baud") for line in lines] == [2400, None, None]
        tripped = fleet.describe()["tripped"]
        assert 1 <= len(tripped) <= 5
        slow, fast = lines[0], lines[1]
        timings = []
        for line in (slow, fast):
            host, port = line["where"].rsplit(":", 1)
            client = Dlt645Client(Dlt645Link.tcp(host, int(port), replace(LINK, baud=2400, turnaround_s=0.3)))
            try:
                started = asyncio.get_running_loop().time()
                for meter in line["meters"]:
                    word = await client.relay_state(meter)
                    assert word["relay"] == ("open" if meter in tripped else "closed")
                timings.append(asyncio.get_running_loop().time() - started)
            finally:
                await client.link.close()
        # a status word 3 read: 20 request bytes (with the FE preamble) and 22 reply bytes, 11 bits each
        wire = 2 * (20 + 22) * 11 / 2400
        assert timings[0] >= wire > timings[1]
        report = await fleet.report(slow["meters"][:1])
        assert report["lines"][0]["requests"] == 2 and report["lines"][0]["busy_s"] == pytest.approx(wire)
        assert report["lines"][1]["busy_s"] == 0
        first = slow["meters"][0]
        assert report["meters"] == {first: {"relay_open": first in tripped, "relay_log": []}}
    finally:
        await fleet.stop()
    with pytest.raises(FleetError, match="line_rate_lines x line_rate_per_line"):
        FleetSpec({"dlt645_tcp": 6}, line_rate_lines=2, line_rate_per_line=4)
    with pytest.raises(FleetError, match="per_line_by_kind: unknown channel kind 'zigbee'"):
        FleetSpec({"dlt645_tcp": 6}, per_line_by_kind={"zigbee": 4})


async def test_each_kind_of_line_may_have_its_own_size_and_the_100k_fleet_is_valid():
    spec = FleetSpec({"dlt645_tcp": 7, "modbus_tcp": 3}, per_line=2, per_line_by_kind={"dlt645_tcp": 4})
    async with Fleet(spec) as fleet:
        assert [(line.kind, len(line.meters)) for line in fleet.lines] == [
            ("dlt645_tcp", 4), ("dlt645_tcp", 3), ("modbus_tcp", 2), ("modbus_tcp", 1)]
    big = Path(__file__).resolve().parent.parent / "config" / "simfleet.100k.json"
    assert FleetSpec.from_dict(json.loads(big.read_text())).total == 100_000


def test_the_example_description_is_valid_and_feikong_sim_fleet_serves_one(tmp_path, broker):
    example = Path(__file__).resolve().parent.parent / "config" / "simfleet.example.json"
    assert FleetSpec.from_dict(json.loads(example.read_text())).total == 1000
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps({"meters": {"dlt645_tcp": 2, "mqtt_json": 2}}))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "sim", "fleet", str(spec), "--broker",
                             f"{broker.host}:{broker.port}"], stdout=subprocess.PIPE, text=True)
    try:
        described = json.loads(proc.stdout.readline())
        assert [line["kind"] for line in described["lines"]] == ["dlt645_tcp", "mqtt_json"]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
