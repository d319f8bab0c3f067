"""The fleet's parts the soak relies on: the corrupted-frames fault share, and the meters' own records of the
relay actions they applied, when and by whom (the report), from a fleet in a child process."""
from datetime import datetime, timedelta

import pytest

from protocols.dlt645.client import Dlt645BadReply, Dlt645Client, Dlt645Link, Dlt645Timeout, LinkSettings
from protocols.dlt645.codes import RelayAction
from simulators.fleet import CORRUPT_REPLY_RATE, Fleet, FleetError, FleetProcess, FleetSpec


async def test_corrupt_frames_meters_send_bad_checksums_and_the_others_do_not():
    spec = FleetSpec({"dlt645_tcp": 20}, per_line=20, corrupt_frames=0.5, seed=3)
    fleet = await Fleet(spec).start()
    try:
        bad = {a for a, f in fleet.faulty.items() if f == "corrupt_frames"}
        assert 0 < len(bad) < 20
        assert all(fleet.meters[a].faults.corrupt_checksum == CORRUPT_REPLY_RATE for a in bad)
        host, _, port = fleet.lines[0].where.rpartition(":")
        link = Dlt645Link.tcp(host, int(port), LinkSettings(retries=0, turnaround_s=0.2, margin_s=0.1, baud=9600))
        await link.open()
        client = Dlt645Client(link)
        failures = {a: 0 for a in fleet.meters}
        for address in fleet.meters:
            for _ in range(6):
                try:
                    await client.relay_state(address)
                except (Dlt645BadReply, Dlt645Timeout):  # a bad checksum is dropped by the deframer
                    failures[address] += 1
        await link.close()
        assert all(failures[a] == 0 for a in fleet.meters if a not in bad)
        assert sum(failures[a] for a in bad) > 0
    finally:
        await fleet.stop()


def test_the_fault_shares_together_may_not_exceed_the_fleet():
    with pytest.raises(FleetError, match="corrupt_frames"):
        FleetSpec({"dlt645_tcp": 5}, stuck_relay=0.5, silent_after_trip=0.3, corrupt_frames=0.3)


async def test_a_fleet_process_reports_each_meters_relay_actions_with_time_and_operator_and_crew_repairs(tmp_path):
    fleet = await FleetProcess(FleetSpec({"dlt645_tcp": 3}, utc_offset_s=8 * 3600), workdir=tmp_path).start()
    try:
        line = fleet.describe()["lines"][0]
        host, _, port = line["where"].rpartition(":")
        link = Dlt645Link.tcp(host, int(port), LinkSettings(retries=0, turnaround_s=0.2, margin_s=0.1, baud=9600))
        await link.open()
        local = datetime.utcnow() + timedelta(hours=8)
        await Dlt645Client(link).relay("000000000001", RelayAction.TRIP, valid_until=local + timedelta(minutes=5))
        await link.close()
        fleet.repair("000000000002", relay_open=True)
        records = (await fleet.report(["000000000001", "000000000002", "000000000003"]))["meters"]
    finally:
        await fleet.stop()
    assert set(records) == {"000000000001", "000000000002", "000000000003"}
    assert records["000000000001"]["relay_open"] and [e[1] for e in records["000000000001"]["relay_log"]] == ["trip"]
    assert records["000000000002"]["relay_open"]
    assert records["000000000002"]["relay_log"][0][1:] == ["trip", "field-crew"]
    assert records["000000000003"] == {"relay_open": False, "relay_log": []}
