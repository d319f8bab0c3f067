"""Channels: the ways the gateway reaches meters. Each one polls its meters and carries their relay commands.

The gateway runs one poll loop per channel and hands the executor each channel's relay driver; it knows
nothing else about the wire. A channel is one half-duplex path: a DL/T 645 RS-485 line or TCP transparent
server, a Modbus RTU line or TCP endpoint, or an MQTT concentrator. Its driver's ``reserved()`` holds that
path, so a relay command and the poll never interleave on it.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Awaitable, Callable, Protocol, Sequence

from gateway.core.readings import Reading

from .relay import RelayDriver

#: a channel's clock: the utility's local time without a zone (what meters keep)
LocalClock = Callable[[], datetime]


class Channel(Protocol):
    #: the bus name meters are configured with (``Meter.channel``): commands for them go to this driver
    name: str
    meters: Sequence[str]

    def bind(self, clock: LocalClock, utc_offset_s: int) -> RelayDriver:
        """Called once by the gateway before any use: the clock readings are stamped with; returns the
        relay driver for this channel's meters."""

    async def cycle(self, sink: Callable[[Reading], None]) -> None:
        """Read every meter once, one exchange at a time, handing each Reading to ``sink``. A reading
        carries the gateway's vocabulary: ``forward_active_energy_block`` (total, sharp, peak, flat, valley
        in kWh), ``remaining_amount`` (yuan), ``status_word_3`` ({relay, relay_command, keep_power})."""

    async def read_meter(self, meter_id: str) -> Reading:
        """Read one meter now (the same items as a cycle). The caller reserves the line if it must."""

    async def close(self) -> None: ...


class Line:
    """A half-duplex path, one task at a time. ``reserved()`` holds it across several exchanges and whatever
    the holder does between them (a relay command's last gate check before its frame); inside, the holder's
    own exchanges pass straight through (re-entrant for that task)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task | None = None

    @asynccontextmanager
    async def reserved(self):
        if self._holder is not None and self._holder is asyncio.current_task():
            yield self
            return
        async with self._lock:
            self._holder = asyncio.current_task()
            try:
                yield self
            finally:
                self._holder = None


async def read_each(meters: Sequence[str], read_meter: Callable[[str], Awaitable[Reading]],
                    sink: Callable[[Reading], object]) -> None:
    """One read cycle: every meter in turn, each reading handed to ``sink`` (which may be a coroutine)."""
    for meter in meters:
        result = sink(await read_meter(meter))
        if asyncio.iscoroutine(result):
            await result
