"""The DL/T 645 channel: one line (an RS-485 serial port, a TCP transparent serial server, or a concentrator
forwarding frames over MQTT: whatever the link's opener reaches) and the meters on it, polled by the
:class:`~gateway.southbound.poller.BusPoller` and commanded by the
:class:`~gateway.southbound.relay.Dlt645RelayDriver`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from protocols.dlt645.client import Dlt645Client, Dlt645Link
from protocols.dlt645.codes import Edition

from .poller import DEFAULT_ITEMS, BusPoller
from .relay import Dlt645RelayDriver


@dataclass
class Bus:
    link: Dlt645Link
    meters: list[str]
    items: Sequence[str] = DEFAULT_ITEMS
    edition: Edition = Edition.DLT645_2007
    #: the meters' relay-control password (6 hex digits) and the operator code they record
    password: str = field(default="000000", repr=False)  # a secret: never in a repr or a log
    operator: str = "00000000"
    client: Dlt645Client = field(init=False)
    poller: BusPoller | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.client = Dlt645Client(self.link, self.edition, password=self.password, operator=self.operator)

    @property
    def name(self) -> str:
        return self.link.name

    def bind(self, clock, utc_offset_s: int) -> Dlt645RelayDriver:
        self.poller = BusPoller(self.client, self.meters, items=self.items, clock=clock)
        return Dlt645RelayDriver(self.client, utc_offset_s)

    async def cycle(self, sink) -> None:
        await self.poller.cycle(sink)

    async def read_meter(self, meter_id: str):
        return await self.poller.read_meter(meter_id)

    async def close(self) -> None:
        await self.link.close()
