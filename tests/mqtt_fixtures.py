"""A live gateway on a real clock with its MQTT bridge, simulated DL/T 645 meters over TCP, and a billing
simulator, all through a real Mosquitto broker (the ``broker`` fixture)."""
from __future__ import annotations

import asyncio
from decimal import Decimal

from gateway.app import Bus, Gateway
from gateway.clock import SystemClock, local_naive
from gateway.core.control import ControlConfig
from gateway.core.model import Account, Meter
from gateway.northbound.mqtt import BillingBridge, BrokerConfig
from protocols.dlt645.client import Dlt645Link
from simulators.dlt645 import SimBus, SimMeter, serve_tcp

from .control_fixtures import LIVE_LINK, QUICK
from .core_fixtures import POLICY, tariffs



def tripped_meter(i: int) -> SimMeter:
    """A meter whose relay is open (the account ran out before the test began)."""
    return SimMeter(f"{i:012d}", relay_open=True, relay_command_open=True, energy=[Decimal("100.00")] * 5)


class LiveGateway:
    """``accounts`` (a number of plain ones, or the accounts themselves) of which the first ``len(meters)`` own
    the simulated meters (one each)."""

    def __init__(self, store_url: str, broker, *, accounts: int | list[Account] = 1, meters: list[SimMeter] = (),
                 mqtt: BrokerConfig | None = None, poll_interval_s: float = 3600.0, bus: dict | None = None,
                 config: ControlConfig = QUICK, metrics=None, hub=None) -> None:
        """``bus``: more of the DL/T 645 channel's settings (its password and operator code, say); ``metrics``: a
        :class:`gateway.ops.metrics.GatewayMetrics` to attach (before the first poll and tick, with ``hub``, a
        concentrator hub, if given) and run."""
        self.store_url = store_url
        self.broker = broker
        self.accounts = accounts if isinstance(accounts, list) else \
            [Account(f"A{i}", tariff_id="flat", area="north") for i in range(accounts)]
        self.sims = list(meters)
        self.mqtt = mqtt or BrokerConfig(broker.host, broker.port, instance="gw-test")
        self.poll_interval_s = poll_interval_s
        self.config = config
        self.metrics = metrics
        self.hub = hub
        self.bus = bus or {}

    async def __aenter__(self) -> "LiveGateway":
        clock = SystemClock()
        self.server = await serve_tcp(SimBus.of(self.sims, clock=local_naive(clock), turnaround_s=0.0))
        link = Dlt645Link.tcp("127.0.0.1", self.server.sockets[0].getsockname()[1], LIVE_LINK)
        self.gw = await Gateway(self.store_url, [Bus(link, [m.address for m in self.sims], **self.bus)], self.config,
                                POLICY,
                                clock, poll_interval_s=self.poll_interval_s).open()
        cc = self.gw.control
        if not cc.engine.account_ids:
            meters = [Meter(m.address, self.accounts[i].account_id, channel=link.name)
                      for i, m in enumerate(self.sims)]
            await self.gw.writer.call(cc.accounting.register, tariffs(), self.accounts, meters)
        self.bridge = BillingBridge(self.gw, self.mqtt)
        self.stop = asyncio.Event()
        await self.bridge.start()
        self.tasks = [asyncio.create_task(self.gw.run(self.stop)), asyncio.create_task(self.bridge.run(self.stop))]
        if self.metrics is not None:
            self.metrics.attach(self.gw, self.bridge, self.hub)
            self.tasks.append(asyncio.create_task(self.metrics.run(self.stop)))
        await self.bridge.ready()
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.metrics is not None:
            self.metrics.close()
        await self.gw.close()
        self.server.close()
        await self.server.wait_closed()

    async def call(self, fn, *args):
        return await self.gw.writer.call(fn, *args)

    async def until(self, predicate, timeout: float = 20.0, what: str = "") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"not within {timeout}s: {what or predicate}")
            await asyncio.sleep(0.02)

    async def ledger(self) -> list[tuple]:
        """(entry id, account, amount fen) of every payment committed, read on the writer's connection."""
        rows = await self.call(self.gw.control.store._query,
                               "SELECT l.entry_id, a.account_id, l.amount_fen FROM ledger l JOIN accounts a "
                               "ON a.account_no = l.account_no WHERE l.kind = 'payment'")
        return [tuple(r) for r in rows]
