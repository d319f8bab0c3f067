"""Transports for a simulated bus: a TCP listener (a transparent serial server) and a real pseudo-terminal."""
from __future__ import annotations

import asyncio
import os
import tty

from protocols.dlt645.deframer import Deframer

from .bus import SimBus, Transmission


class _BusConnection(asyncio.Protocol):
    def __init__(self, bus: SimBus) -> None:
        self.bus = bus
        self.deframer = Deframer()
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for t in self.bus.receive(data, self.loop.time(), self.deframer):
            self.loop.call_at(t.at, self._send, t.data)

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.transport = None


async def serve_tcp(bus: SimBus, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Listen on ``host:port`` (0 picks a free port: read it from ``server.sockets[0].getsockname()``)."""
    return await asyncio.get_running_loop().create_server(lambda: _BusConnection(bus), host, port)


class PtyBus:
    """The bus behind a real pseudo-terminal pair: open :attr:`path` with any serial library.

    Linux ptys ignore the baud rate and refuse even parity, so open it 8N1;
    timing comes from the bus's line-rate emulation.
    """

    def __init__(self, bus: SimBus) -> None:
        self.bus = bus
        self.loop = asyncio.get_running_loop()
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing: the line is binary
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self._slave)
        self.deframer = Deframer()
        self._pending = bytearray()
        self.loop.add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: no process has the other side open right now
            return
        for t in self.bus.receive(data, self.loop.time(), self.deframer):
            self.loop.call_at(t.at, self._send, t)

    def _send(self, t: Transmission) -> None:
        self._pending += t.data
        self._drain()

    def _drain(self) -> None:
        while self._pending:
            try:
                n = os.write(self.master, self._pending)
            except BlockingIOError:
                self.loop.call_later(0.005, self._drain)
                return
            del self._pending[:n]

    def close(self) -> None:
        self.loop.remove_reader(self.master)
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
