import asyncio

import pytest

from protocols.dlt645.client import Dlt645Client, Dlt645Link, LinkSettings
from simulators.dlt645 import PtyBus, SimBus, make_meters, serve_tcp

FAST = dict(turnaround_s=0.15, margin_s=0.05, baud=9600)


@pytest.fixture
async def tcp_bus():
    """A simulated bus of five meters behind a TCP listener; yields (bus, client)."""
    bus = SimBus.of(make_meters(1, 5, seed=3))
    server = await serve_tcp(bus)
    port = server.sockets[0].getsockname()[1]
    link = Dlt645Link.tcp("127.0.0.1", port, LinkSettings(retries=0, **FAST))
    await link.open()
    yield bus, Dlt645Client(link)
    await link.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def pty_bus():
    """The same over a real pseudo-terminal, opened 8N1 (ptys refuse even parity)."""
    bus = SimBus.of(make_meters(1001, 3, seed=4))
    pty = PtyBus(bus)
    link = Dlt645Link.serial(pty.path, LinkSettings(parity="N", retries=0, **FAST))
    await link.open()
    yield bus, Dlt645Client(link)
    await link.close()
    pty.close()
