"""Poll scheduler for DL/T 645 buses: every meter on a bus, one exchange at a time, buses in parallel.

A bus is half-duplex: the link's lock already serialises exchanges, so one
poller task per bus keeps the line busy without queueing behind itself. A
meter that keeps failing is marked unreachable (and still read each cycle;
once it has missed one, without the link's retries).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Awaitable, Callable, Sequence

from gateway.core.readings import Reading
from protocols.dlt645 import di as di_table
from protocols.dlt645.client import Dlt645Client, Dlt645Error, Dlt645Timeout
from protocols.dlt645.formats import FormatError

log = logging.getLogger(__name__)

#: What a prepaid head-end reads by default: energy per tariff in one block, voltage,
#: the meter's own purse (local cost control) and the relay state.
#: (A channel's ``items`` setting chooses; energy and status word 3 are the least a poll must read.)
DEFAULT_ITEMS = ("forward_active_energy_block", "voltage_a", "remaining_amount", "status_word_3")


@dataclass
class MeterHealth:
    consecutive_failures: int = 0
    last_ok: datetime | None = None
    last_error: str = ""

    def unreachable(self, threshold: int) -> bool:
        return self.consecutive_failures >= threshold

    def record(self, answered: bool, now: datetime, errors: dict[str, str]) -> None:
        """One cycle's outcome: any value read counts as an answer; otherwise the first reason is kept."""
        if answered:
            self.consecutive_failures, self.last_ok = 0, now
        else:
            self.consecutive_failures += 1
            self.last_error = next(iter(errors.values()), "")


@dataclass
class BusPoller:
    client: Dlt645Client
    meters: Sequence[str]
    items: Sequence[str] = DEFAULT_ITEMS
    clock: Callable[[], datetime] = datetime.now
    unreachable_after: int = 3
    health: dict[str, MeterHealth] = field(default_factory=dict)
    cycles: int = 0

    def __post_init__(self) -> None:
        edition = self.client.edition
        unknown = [name for name in self.items if di_table.by_name(name, edition) is None]
        if unknown:
            raise ValueError(f"unknown data items {unknown} for DL/T 645-{int(edition)}")
        self._dis = [(name, di_table.by_name(name, edition).di) for name in self.items]
        for meter in self.meters:
            self.health.setdefault(meter, MeterHealth())

    @property
    def channel(self) -> str:
        return self.client.link.name

    async def read_meter(self, meter: str) -> Reading:
        values, errors = {}, {}
        # a meter that did not answer last cycle is asked once: its retries were bus time a paid customer's
        # close waited behind (an answer puts it back on the link's retries)
        retries = 0 if self.health[meter].consecutive_failures else None
        for name, di in self._dis:
            try:
                values[name] = (await self.client.read(meter, di, retries=retries)).value
            except Dlt645Timeout as exc:
                # bus time is the scarce resource: a meter that did not answer is not asked again this cycle
                errors[name] = str(exc)
                for rest, _ in self._dis[len(values) + len(errors):]:
                    errors[rest] = "skipped: the meter did not answer this cycle"
                break
            except (Dlt645Error, FormatError) as exc:
                errors[name] = str(exc)
        now = self.clock()
        self.health[meter].record(bool(values), now, errors)
        return Reading(meter, now, self.channel, values, errors)

    async def cycle(self, on_reading: Callable[[Reading], Awaitable[None] | None]) -> None:
        for meter in self.meters:
            reading = await self.read_meter(meter)
            result = on_reading(reading)
            if asyncio.iscoroutine(result):
                await result
        self.cycles += 1

    async def run(self, on_reading, interval_s: float = 5.0, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            started = asyncio.get_running_loop().time()
            await self.cycle(on_reading)
            rest = interval_s - (asyncio.get_running_loop().time() - started)
            try:
                await asyncio.wait_for(stop.wait(), max(rest, 0.0))
            except asyncio.TimeoutError:
                pass
