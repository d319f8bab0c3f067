"""Simulated Modbus meters on pymodbus's server, driven by the same profile files the gateway reads.

The physics (energy by a household load profile, time-of-use split, the purse, a relay that takes a moment
to move or sticks) is the DL/T 645 simulator's :class:`SimMeter`; this module gives it a Modbus face: a
``SimDevice`` per meter whose registers are refreshed from the meter's state on every request and whose
writes to the profile's relay control become relay actions, logged in ``relay_log`` (ground truth).

Serve a line of meters over TCP (``serve_tcp``) or over RTU on a pseudo-terminal pair (``serve_rtu``).
"""
from __future__ import annotations

import asyncio
import os
import random
import tty
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Callable, Sequence

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from protocols.modbus.profile import TABLES, WRITE_FUNCTIONS, Point, Profile, action_of_write, encode
from simulators.dlt645.meter import SimMeter

#: function code -> the table it reads or writes
_TABLE_OF_FC = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding",
                4: "input"}
_BLOCK_ORDER = ("coil", "discrete", "holding", "input")  # SimDevice's non-shared tuple order


@dataclass
class Faults:
    """Fault injection; probabilities are per request, drawn from the meter's own seeded RNG."""

    no_reply: float = 0.0  # silence: the client times out
    exception: float = 0.0  # an exception response instead of the answer
    exception_code: int = ExcCodes.DEVICE_FAILURE
    stuck_relay: bool = False  # accepts relay writes but the contact does not move
    refuse_relay: int | None = None  # answer every relay write with this exception code (a locked meter)


@dataclass
class ModbusSimMeter(SimMeter):
    """One meter: ``address`` is the gateway's meter id, ``device_id`` its Modbus unit id on the line."""

    device_id: int = 1
    profile: Profile | None = None
    faults: Faults = field(default_factory=Faults)
    clock: Callable[[], datetime] = datetime.now
    # what reached the meter: (function code, address, values or count) for every request it answered
    wire_log: list[tuple[int, int, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.profile is None:
            raise ValueError(f"meter {self.address}: a Modbus meter needs a profile")
        if self.seed is None:
            self.seed = self.device_id
        super().__post_init__()
        self.rng = random.Random(self.seed)

    # -- the register image ---------------------------------------------------------------------------

    def point_value(self, point: Point) -> Decimal | bool:
        """The meter's state as the point reports it (a state point: True = open / set)."""
        name = point.name
        if name.startswith("energy_"):
            period = ("total", "sharp", "peak", "flat", "valley").index(name.split("_")[1])
            return self.energy[period]
        if name == "voltage_a":
            return self.voltage
        if name == "remaining_amount":
            return self.remaining_amount
        if name == "relay_state":
            return self.relay_open
        if name == "relay_command":
            return self.relay_command_open
        if name == "keep_power":
            return self.keep_power
        raise KeyError(name)

    def _encoded(self, point: Point) -> list:
        value = self.point_value(point)
        if point.unit is not None and point.type.startswith("u") and value < 0:
            value = Decimal(0)  # an unsigned purse register cannot show an overdraft
        return encode(point, value)

    def refresh(self, table: str, start: int, registers: list[int]) -> None:
        """Write the current state into pymodbus's block for ``table`` (registers starting at ``start``;
        bit tables hold 16 bits per register, bit 0 first)."""
        for p in self.profile.points.values():
            if p.table != table:
                continue
            values = self._encoded(p)
            if TABLES[table][1]:
                idx = p.address - start * 16
                reg, bit = divmod(idx, 16)
                registers[reg] = (registers[reg] | 1 << bit) if values[0] else (registers[reg] & ~(1 << bit))
            else:
                off = p.address - start
                registers[off : off + len(values)] = values

    def device(self) -> SimDevice:
        """The pymodbus device: every table spans the profile's points (and the relay control), the
        registers between them read as 0 (reserved) like on the real models."""
        spans: dict[str, list[tuple[int, int]]] = {t: [] for t in _BLOCK_ORDER}
        for p in self.profile.points.values():
            spans[p.table].append((p.address, p.address + p.count))
        relay = self.profile.relay
        if relay is not None:
            width = max(len(v) for v in relay.writes.values())
            spans[relay.table].append((relay.address, relay.address + width))
        blocks = []
        for table in _BLOCK_ORDER:
            bits = TABLES[table][1]
            if spans[table]:
                lo = min(a for a, _ in spans[table])
                hi = max(b for _, b in spans[table])
            else:  # pymodbus needs every table; park an unused one at the top of the address space
                lo, hi = 0xFFF0, 0xFFF1
            # bits as one list: pymodbus multiplies a BITS entry's count twice while checking it
            blocks.append([SimData(lo, values=[False] * (hi - lo), datatype=DataType.BITS) if bits else
                           SimData(lo, count=hi - lo, values=0, datatype=DataType.REGISTERS)])
        return SimDevice(self.device_id, simdata=tuple(blocks), action=self._action)

    # -- requests ---------------------------------------------------------------------------------------

    async def _action(self, fc: int, start: int, address: int, count: int, registers: list[int],
                      set_values) -> ExcCodes | None:
        if fc in (5, 6) and set_values is None:
            return None  # the read pymodbus makes to echo a single write: the request is echoed as sent
        self.requests += 1
        f = self.faults
        if f.no_reply and self.rng.random() < f.no_reply:
            raise NoSuchIdException("simulated silence")  # the server is built to answer nothing to this
        if f.exception and self.rng.random() < f.exception:
            return ExcCodes(f.exception_code)
        now = self.clock()
        self.advance(now)
        table = _TABLE_OF_FC[fc]
        if set_values is not None:
            self.wire_log.append((fc, address, list(set_values)))
            return self._write(fc, table, address, set_values, now)
        self.wire_log.append((fc, address, count))
        self.refresh(table, start, registers)
        return None

    def _write(self, fc: int, table: str, address: int, values, now: datetime) -> ExcCodes | None:
        action = action_of_write(self.profile, table, address, values)
        relay = self.profile.relay
        if action is not None and fc != WRITE_FUNCTIONS[relay.function][1]:
            return ExcCodes.ILLEGAL_FUNCTION  # e.g. the DDS238 takes its relay only by FC 10h
        if action is None:
            # only the relay control is writable here; a bad value for it is an illegal value
            on_relay = relay is not None and relay.table == table and relay.address == address
            return ExcCodes.ILLEGAL_VALUE if on_relay else ExcCodes.ILLEGAL_ADDRESS
        if self.faults.refuse_relay is not None:
            return ExcCodes(self.faults.refuse_relay)
        if action == "trip":
            if self.keep_power:
                return ExcCodes.ILLEGAL_VALUE  # keep-power (保电) refuses trips
            self._set_relay(True, now)
            self.close_allowed_pending = False
        elif action == "close":
            self._set_relay(False, now)
            self.close_allowed_pending = False
        else:  # close_allowed: the customer's button closes it
            self.relay_command_open = False
            self.close_allowed_pending = True
        self.relay_log.append((now, action, "modbus"))
        return None


def _silent_device() -> SimDevice:
    """Device id 0 catches every id no meter has: on a real line nobody answers those. (It spans every
    address: pymodbus checks the address before it calls the action.)"""
    async def silent(*_):
        raise NoSuchIdException("no such meter")

    blocks = tuple([SimData(0, values=[False] * 0x10000, datatype=DataType.BITS)] if t in ("coil", "discrete")
                   else [SimData(0, count=0x10000, values=0, datatype=DataType.REGISTERS)] for t in _BLOCK_ORDER)
    return SimDevice(0, simdata=blocks, action=silent)


def _devices(meters: Sequence[ModbusSimMeter]) -> list[SimDevice]:
    ids = [m.device_id for m in meters]
    if len(set(ids)) != len(ids) or not all(1 <= i <= 247 for i in ids):
        raise ValueError(f"device ids must be unique and in 1..247: {ids}")
    return [m.device() for m in meters] + [_silent_device()]


class SimServer:
    """A running simulated line; ``close()`` stops it (and its pty pair)."""

    def __init__(self, server, meters: Sequence[ModbusSimMeter], pty: "PtyPair | None" = None) -> None:
        self.server = server
        self.meters = {m.address: m for m in meters}
        self.pty = pty

    @property
    def port(self) -> int:
        return self.server.transport.sockets[0].getsockname()[1]

    @property
    def path(self) -> str:
        """RTU: the serial device the gateway opens."""
        return self.pty.client_path

    async def close(self) -> None:
        await self.server.shutdown()
        if self.pty is not None:
            self.pty.close()


async def serve_tcp(meters: Sequence[ModbusSimMeter], host: str = "127.0.0.1", port: int = 0) -> SimServer:
    """Modbus TCP on ``host:port`` (0: a free port, see ``SimServer.port``)."""
    server = ModbusTcpServer(_devices(meters), address=(host, port), ignore_missing_devices=True)
    await server.serve_forever(background=True)
    return SimServer(server, meters)


class PtyPair:
    """Two pseudo-terminals joined like a null-modem cable: the server opens one slave, the gateway the
    other, and the masters copy bytes across. (A pty's master has no path a serial library can open.)
    Linux ptys ignore the baud rate and refuse even parity: open both 8N1."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._fds: list[int] = []
        ends = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)  # binary line: no echo, no line editing
            os.set_blocking(master, False)
            self._fds += [master, slave]  # the slave stays open here so the master never sees a hang-up
            ends.append((master, os.ttyname(slave)))
        (self._a, self.server_path), (self._b, self.client_path) = ends
        self.loop.add_reader(self._a, self._copy, self._a, self._b)
        self.loop.add_reader(self._b, self._copy, self._b, self._a)

    def _copy(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, InterruptedError, OSError):  # EIO: nobody has that side open right now
            return
        while data:
            try:
                n = os.write(dst, data)
            except BlockingIOError:
                continue  # a frame is a few hundred bytes at most: the other side drains at once
            except OSError:
                return
            data = data[n:]

    def close(self) -> None:
        for fd in (self._a, self._b):
            self.loop.remove_reader(fd)
        for fd in self._fds:
            os.close(fd)
        self._fds = []


async def serve_rtu(meters: Sequence[ModbusSimMeter], baudrate: int = 9600) -> SimServer:
    """Modbus RTU on a pty pair; the gateway opens ``SimServer.path`` 8N1."""
    pty = PtyPair()
    server = ModbusSerialServer(_devices(meters), port=pty.server_path, baudrate=baudrate, parity="N",
                                stopbits=1, bytesize=8, ignore_missing_devices=True, reconnect_delay=0)
    try:
        await server.serve_forever(background=True)
    except Exception:
        pty.close()
        raise
    return SimServer(server, meters, pty)
