"""``Gateway.read_meter``: one meter read now on its channel, every channel kind (DL/T 645 over TCP, Modbus TCP,
an MQTT concentrator in frame and JSON mode), with the line reserved, and committed like a poll's readings."""
import asyncio

import pytest

from simulators.dlt645 import SimMeter

from .control_fixtures import account, at
from .relay_harness import Harness
from .test_concentrator import MODES, ConcentratorHarness
from .test_modbus_scenario import ModbusHarness, fleet

T0 = at(2026, 3, 2, 8)


async def read_and_check(h, meter_id: str) -> None:
    gw = h.gw
    bus = gw.control.engine.meter(meter_id).channel
    async with gw.executor.drivers[bus].reserved():  # someone else on the line: the read waits for it
        task = asyncio.create_task(gw.read_meter(meter_id))
        await asyncio.sleep(0.3)
        assert not task.done()
    reading = await asyncio.wait_for(task, 10)
    assert reading.meter == meter_id and reading.values.get("forward_active_energy_block"), reading
    assert reading.values.get("status_word_3")
    rows = await h.call(gw.control.store.recent_readings, meter_id, 0)
    assert len(rows) == 1  # committed
    with pytest.raises(KeyError):
        await gw.read_meter("NOPE")


async def test_on_a_dlt645_bus(tmp_path):
    async with Harness(f"sqlite://{tmp_path / 'g.db'}", T0, [(SimMeter("000000000001"), account(1))]) as h:
        await read_and_check(h, "000000000001")


async def test_on_a_modbus_line(tmp_path):
    async with ModbusHarness(f"sqlite://{tmp_path / 'g.db'}", T0, fleet(1)) as h:
        await read_and_check(h, "MB0001")


@pytest.mark.parametrize("mode", MODES)
async def test_behind_a_concentrator(broker, tmp_path, mode):
    async with ConcentratorHarness(broker, mode, f"sqlite://{tmp_path / 'g.db'}", T0,
                                   [(SimMeter("000000000001"), account(1))]) as h:
        await read_and_check(h, "000000000001")
