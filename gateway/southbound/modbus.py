"""Modbus channels: one pymodbus client per TCP endpoint or RTU line, its meters polled by their profiles, and
the relay driver that writes a profile's trip/close and reads the relay back.

A pymodbus client keeps one request in flight; the channel's own lock goes further and keeps a relay
command's last gate check and its write together (``reserved()``), like a DL/T 645 bus. Every failure is
named for the executor: silence is "no answer" (the write may have acted), an exception response is a
refusal with its Modbus name, a link that cannot be opened is "link down, nothing written".
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from gateway.core.commands import ReconnectMode, RelayAction, RelayStatus
from gateway.core.readings import Reading
from protocols.modbus.profile import (ITEM_OF, STATE_POINTS, Profile, ProfileError, ReadBlock, ValueDecodeError,
                                      decode, read_plan, relay_write, to_items)

from .channel import Line, read_each
from .poller import MeterHealth
from .relay import RelayDriverError, RelayLinkDown, RelayNoAnswer, RelayRefused

log = logging.getLogger(__name__)

#: Modbus exception codes by name (what an operator sees in a command's last error)
EXCEPTION_NAMES = {1: "illegal_function", 2: "illegal_data_address", 3: "illegal_data_value",
                   4: "server_device_failure", 5: "acknowledge", 6: "server_device_busy",
                   7: "negative_acknowledge", 8: "memory_parity_error", 10: "gateway_path_unavailable",
                   11: "gateway_target_no_response"}
_ACKNOWLEDGE, _PATH_UNAVAILABLE, _TARGET_NO_RESPONSE = 5, 10, 11
_READ = {"coil": "read_coils", "discrete": "read_discrete_inputs", "holding": "read_holding_registers",
         "input": "read_input_registers"}
_FUNCTION = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


class ModbusError(Exception):
    pass


class ModbusNoAnswer(ModbusError):
    """Nothing came back in time: whether a write acted is unknown."""


class ModbusExceptionReply(ModbusError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
        self.error = EXCEPTION_NAMES.get(code, f"exception_{code}")


class ModbusLinkDown(ModbusError):
    def __init__(self, message: str, written: bool) -> None:
        super().__init__(message)
        self.written = written


@dataclass(frozen=True)
class ModbusMeter:
    meter_id: str  # the gateway's meter id (``Meter.meter_id``)
    device_id: int  # Modbus unit id on the line, 1..247
    profile: Profile


def _check_meters(name: str, meters: Sequence[ModbusMeter]) -> None:
    ids = [m.meter_id for m in meters]
    units = [m.device_id for m in meters]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: a meter id appears twice: {ids}")
    if len(set(units)) != len(units) or not all(1 <= u <= 247 for u in units):
        raise ValueError(f"{name}: device ids must be unique and in 1..247: {units}")


class ModbusChannel:
    """One Modbus path (a TCP endpoint, or an RTU line) and the meters on it: a :class:`Channel`."""

    def __init__(self, name: str, client, meters: Sequence[ModbusMeter], unreachable_after: int = 3,
                 kind: str = "modbus_tcp") -> None:
        _check_meters(name, meters)
        self.name = name
        self.kind = kind  # modbus_tcp or modbus_rtu (the constructors say which)
        self.client = client
        self.by_id = {m.meter_id: m for m in meters}
        self.meters = [m.meter_id for m in meters]
        self.unreachable_after = unreachable_after
        self.health = {m: MeterHealth() for m in self.meters}
        self.cycles = 0
        self.clock: Callable[[], datetime] = datetime.now
        self.zone = timezone(timedelta(hours=8))
        self._plans = {m.meter_id: read_plan(m.profile) for m in meters}
        self._relay_plans = {m.meter_id: read_plan(m.profile, STATE_POINTS) for m in meters}
        self.line = Line()

    @classmethod
    def tcp(cls, host: str, port: int, meters: Sequence[ModbusMeter], *, name: str | None = None,
            timeout_s: float = 1.0, **kw) -> "ModbusChannel":
        # no retries inside pymodbus (a retried write could act twice) and no background reconnects: the
        # channel connects when it next needs the link
        name = name or f"modbus+tcp://{host}:{port}"
        _check_meters(name, meters)
        client = AsyncModbusTcpClient(host, port=port, timeout=timeout_s, retries=0, reconnect_delay=0)
        return cls(name, client, meters, **kw)

    @classmethod
    def rtu(cls, device: str, meters: Sequence[ModbusMeter], *, baudrate: int = 9600, parity: str = "N",
            stopbits: int = 1, bytesize: int = 8, timeout_s: float = 1.0, name: str | None = None,
            **kw) -> "ModbusChannel":
        """An RS-485 line. Parity is the meters' (often E on site); Linux ptys refuse E: use N there."""
        if parity not in ("N", "E", "O"):
            raise ValueError(f"parity must be N, E or O, not {parity!r}")
        if stopbits not in (1, 2) or bytesize not in (7, 8):
            raise ValueError(f"unsupported framing: {bytesize} data bits, {stopbits} stop bits")
        name = name or f"modbus+rtu://{device}"
        _check_meters(name, meters)
        client = AsyncModbusSerialClient(device, baudrate=baudrate, parity=parity, stopbits=stopbits,
                                         bytesize=bytesize, timeout=timeout_s, retries=0, reconnect_delay=0)
        return cls(name, client, meters, kind="modbus_rtu", **kw)

    # -- Channel -------------------------------------------------------------------------------------

    def bind(self, clock: Callable[[], datetime], utc_offset_s: int) -> "ModbusRelayDriver":
        self.clock = clock
        self.zone = timezone(timedelta(seconds=utc_offset_s))
        return ModbusRelayDriver(self)

    async def cycle(self, sink: Callable[[Reading], None]) -> None:
        await read_each(self.meters, self.read_meter, sink)
        self.cycles += 1

    async def close(self) -> None:
        async with self.line.reserved():
            self.client.close()

    # -- the line ------------------------------------------------------------------------------------

    def reserved(self):
        """Hold the line for several exchanges and whatever happens between them."""
        return self.line.reserved()

    async def connect(self) -> None:
        """The link connected (pymodbus's timeout bounds it), or :class:`ModbusLinkDown`."""
        if not self.client.connected and not await self.client.connect():
            raise ModbusLinkDown(f"{self.name}: cannot connect", written=False)

    async def _call(self, what: str, method: str, *args, writes: bool = False, **kw):
        """One exchange; pymodbus's outcomes mapped to ours."""
        async with self.line.reserved():
            await self.connect()
            try:
                reply = await getattr(self.client, method)(*args, **kw)
            except ConnectionException as exc:  # raised before anything is sent
                raise ModbusLinkDown(f"{self.name}: {what}: link down: {exc}", written=False) from None
            except ModbusIOException:
                raise ModbusNoAnswer(f"{self.name}: {what}: no answer") from None
            except ModbusException as exc:
                raise ModbusNoAnswer(f"{self.name}: {what}: {exc}") from None
        if reply.isError():
            code = int(getattr(reply, "exception_code", 0))
            name = EXCEPTION_NAMES.get(code, f"exception_{code}")
            if code == _TARGET_NO_RESPONSE:  # a TCP/RTU gateway heard nothing from the meter
                raise ModbusNoAnswer(f"{self.name}: {what}: {name}")
            if code == _PATH_UNAVAILABLE:  # the gateway could not route it: nothing reached the line
                raise ModbusLinkDown(f"{self.name}: {what}: {name}", written=False)
            if writes and code == _ACKNOWLEDGE:  # accepted, still being carried out: the read-back tells
                return reply
            raise ModbusExceptionReply(f"{self.name}: {what}: exception {code} ({name})", code)
        return reply

    async def read_block(self, meter: ModbusMeter, block: ReadBlock) -> list:
        what = f"device {meter.device_id}: read {block.table} {block.start:#06x}+{block.count}"
        reply = await self._call(what, _READ[block.table], block.start, count=block.count,
                                 device_id=meter.device_id)
        # pymodbus does not match an RTU reply to its request: a late reply to an earlier read (the energy
        # block, say) must not be taken for this one (a relay read-back). Bits come padded to whole bytes.
        values = len(reply.bits) if block.bits else len(reply.registers)
        fits = block.count <= values < block.count + 8 if block.bits else values == block.count
        if reply.function_code != _FUNCTION[block.table] or reply.dev_id != meter.device_id or not fits:
            raise ModbusNoAnswer(f"{self.name}: {what}: a reply that is not to this request (function "
                                 f"{reply.function_code}, device {reply.dev_id}, {values} values): a late one?")
        return list(reply.bits[: block.count] if block.bits else reply.registers)

    async def read_points(self, meter: ModbusMeter, plan: list[ReadBlock]) -> tuple[dict, dict[str, str]]:
        """Decoded points and, per point, why it could not be read. A meter that does not answer is not
        asked again this cycle: line time is the scarce resource."""
        decoded, errors = {}, {}
        for i, block in enumerate(plan):
            try:
                raw = await self.read_block(meter, block)
            except (ModbusNoAnswer, ModbusLinkDown) as exc:
                for p in block.points:
                    errors[p.name] = str(exc)
                for rest in plan[i + 1 :]:
                    for p in rest.points:
                        errors[p.name] = "skipped: the meter did not answer this cycle"
                break
            except ModbusExceptionReply as exc:
                for p in block.points:
                    errors[p.name] = str(exc)
                continue
            for p in block.points:
                try:
                    decoded[p.name] = decode(p, block.slice(p, raw))
                except ValueDecodeError as exc:
                    errors[p.name] = f"device {meter.device_id}: {exc}"
        return decoded, errors

    async def read_meter(self, meter_id: str) -> Reading:
        meter = self.by_id[meter_id]
        decoded, point_errors = await self.read_points(meter, self._plans[meter_id])
        values = to_items(meter.profile, decoded)
        errors: dict[str, str] = {}
        for point, why in point_errors.items():
            errors.setdefault(ITEM_OF[point], why)  # the first reason an item is missing
        health = self.health[meter_id]
        now = self.clock()
        health.record(bool(values), now, errors)
        if not values and health.unreachable(self.unreachable_after):
            log.warning("%s: meter %s unreachable: %s", self.name, meter_id, health.last_error)
        return Reading(meter_id, now, self.name, values, errors)


class ModbusRelayDriver:
    """Relay control over a profile's register or coil writes; the relay read back from its state points."""

    def __init__(self, channel: ModbusChannel) -> None:
        self.channel = channel
        self.name = channel.name

    def reserved(self):
        return self.channel.reserved()

    async def open(self) -> None:
        with _as_relay_errors():
            await self.channel.connect()

    def _meter(self, meter_id: str) -> ModbusMeter:
        meter = self.channel.by_id.get(meter_id)
        if meter is None:
            raise RelayLinkDown(f"{self.name}: meter {meter_id} is not on this channel", written=False)
        return meter

    async def send(self, meter_id: str, action: RelayAction, mode: ReconnectMode, valid_until: float) -> None:
        meter = self._meter(meter_id)
        # a Modbus write carries no deadline for the meter to check: the gateway checks it, at the last moment
        now = self.channel.clock().replace(tzinfo=self.channel.zone).timestamp()
        if now > valid_until:
            raise RelayRefused(f"meter {meter_id}: command expired before it was sent", ("expired",))
        name = "trip" if action == RelayAction.TRIP else (
            "close_allowed" if mode == ReconnectMode.CLOSE_ALLOWED else "close")
        try:
            write = relay_write(meter.profile, name)
        except ProfileError as exc:
            raise RelayRefused(f"meter {meter_id}: {exc}", ("no_remote_relay",)) from None
        what = f"device {meter.device_id}: {name} ({write.function} {write.address:#06x} {list(write.values)})"
        args = (write.values[0],) if write.function in ("write_register", "write_coil") else (list(write.values),)
        with _as_relay_errors():
            await self.channel._call(what, write.function, write.address, *args, writes=True,
                                     device_id=meter.device_id)

    async def read(self, meter_id: str) -> RelayStatus:
        meter = self._meter(meter_id)
        if "relay_state" not in meter.profile.points:
            raise RelayDriverError(f"meter {meter_id}: profile {meter.profile.name!r} has no relay state "
                                   f"register: the relay cannot be read back")
        decoded = {}
        for block in self.channel._relay_plans[meter_id]:
            with _as_relay_errors():
                raw = await self.channel.read_block(meter, block)
            for p in block.points:
                try:
                    decoded[p.name] = decode(p, block.slice(p, raw))
                except ValueDecodeError as exc:
                    raise RelayDriverError(f"meter {meter_id}: unreadable relay state: {exc}") from None
        return RelayStatus(decoded["relay_state"], decoded.get("relay_command"), decoded.get("keep_power", False))


@contextmanager
def _as_relay_errors():
    """The line's outcomes as the executor's: no answer (unknown), a refusal, a link down (sent or not)."""
    try:
        yield
    except ModbusNoAnswer as exc:
        raise RelayNoAnswer(str(exc)) from None
    except ModbusExceptionReply as exc:
        raise RelayRefused(str(exc), (exc.error,)) from None
    except ModbusLinkDown as exc:
        raise RelayLinkDown(str(exc), exc.written) from None
