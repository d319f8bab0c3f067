"""The gateway's poll scheduler over a simulated TCP bus."""
from decimal import Decimal

import pytest

from gateway.southbound.poller import BusPoller
from simulators.dlt645 import Faults


async def test_cycle_reads_every_meter_and_marks_silent_ones_unreachable(tcp_bus):
    bus, client = tcp_bus
    bus.meters["000000000003"].faults = Faults(no_reply=1.0)
    poller = BusPoller(client, list(bus.meters), unreachable_after=2)
    readings = []
    for _ in range(2):
        await poller.cycle(readings.append)
    assert len(readings) == 10 and poller.cycles == 2
    good = [r for r in readings if r.meter == "000000000001"]
    assert all(r.complete for r in good)
    v = good[-1].values
    assert v["forward_active_energy_block"]["forward_active_energy_total"] == sum(bus.meters["000000000001"].energy[1:])
    assert v["voltage_a"] == Decimal("220.0") and v["status_word_3"]["relay"] == "closed"
    silent = [r for r in readings if r.meter == "000000000003"]
    assert not silent[-1].values and "no reply" in silent[-1].errors["forward_active_energy_block"]
    # after the first timeout the rest of that meter's items are skipped, not waited for one by one
    assert bus.meters["000000000003"].requests == 2
    assert silent[-1].errors["status_word_3"].startswith("skipped")
    assert poller.health["000000000003"].unreachable(2)
    assert not poller.health["000000000001"].unreachable(2)
    # it answers again: one good cycle clears the mark
    bus.meters["000000000003"].faults = Faults()
    await poller.cycle(readings.append)
    assert not poller.health["000000000003"].unreachable(2)




async def test_unknown_item_name_is_a_clear_error(tcp_bus):
    _, client = tcp_bus
    with pytest.raises(ValueError, match="unknown data items \\['bogus'\\]"):
        BusPoller(client, ["000000000001"], items=("voltage_a", "bogus"))


async def test_a_meter_silent_last_cycle_is_asked_once_and_an_answer_restores_its_retries(tcp_bus):
    """Bus time is what a paid customer's close waits for: a meter that missed a cycle costs one attempt."""
    bus, client = tcp_bus
    client.link.settings.retries = 2
    silent = bus.meters["000000000003"]
    silent.faults = Faults(no_reply=1.0)
    poller = BusPoller(client, [silent.address], items=("voltage_a", "status_word_3"))
    await poller.cycle(lambda r: None)
    assert silent.requests == 3  # first time: the link's retries (then its other item is skipped)
    await poller.cycle(lambda r: None)
    assert silent.requests == 4  # silent last cycle: asked once
    silent.faults = Faults()
    await poller.cycle(lambda r: None)
    assert silent.requests == 6 and poller.health[silent.address].consecutive_failures == 0
    silent.faults = Faults(no_reply=1.0)
    await poller.cycle(lambda r: None)
    assert silent.requests == 9  # it answered last time: the retries again
