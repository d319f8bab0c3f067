"""Application messages: typed requests and replies on top of frames.

Each message builds its :class:`Frame` with ``frame()``; :func:`parse` turns a
received frame back into a message. The client, the meter simulator and the
decoder CLI all go through here, so there is one interpretation of the wire.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Union

from . import di as di_table
from . import formats
from .codes import (
    Edition,
    Function1997,
    Function2007,
    RelayAction,
    baud_to_word,
    edition_of,
    error_names,
    function_name,
    word_to_baud,
)
from .formats import FormatError
from .frame import ABNORMAL, BROADCAST_ADDRESS, DIR_REPLY, FOLLOWUP, WILDCARD_ADDRESS, Frame

E07, E97 = Edition.DLT645_2007, Edition.DLT645_1997


class MessageError(ValueError):
    """A frame whose data field does not fit its function. ``offset`` is within the data field."""

    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset


def _read_fn(edition: Edition) -> int:
    return Function1997.READ_DATA if edition == E97 else Function2007.READ_DATA


def _followup_fn(edition: Edition) -> int:
    return Function1997.READ_FOLLOWUP if edition == E97 else Function2007.READ_FOLLOWUP


def _di_bytes(di: int, edition: Edition) -> bytes:
    return di.to_bytes(2 if edition == E97 else 4, "little")


# -------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class ReadRequest:
    address: str
    di: int
    edition: Edition = E07

    def frame(self) -> Frame:
        return Frame(self.address, _read_fn(self.edition), _di_bytes(self.di, self.edition))


@dataclass(frozen=True, slots=True)
class ReadFollowupRequest:
    """Ask for the next part of a multi-frame reply (2007: DI + sequence number)."""

    address: str
    di: int
    seq: int
    edition: Edition = E07

    def frame(self) -> Frame:
        data = _di_bytes(self.di, self.edition)
        if self.edition == E07:
            data += bytes((self.seq & 0xFF,))
        return Frame(self.address, _followup_fn(self.edition), data)


@dataclass(frozen=True, slots=True)
class ReadAddressRequest:
    address: str = WILDCARD_ADDRESS

    def frame(self) -> Frame:
        return Frame(self.address, int(Function2007.READ_ADDRESS), b"")


@dataclass(frozen=True, slots=True)
class WriteRequest:
    address: str
    di: int
    payload: bytes
    password: str = "000000"
    password_level: int = 2
    operator: str = "00000000"

    def frame(self) -> Frame:
        data = formats.build_struct(formats.WriteDataPayload, dict(
            di=self.di, password_level=self.password_level, password=self.password,
            operator=self.operator, data=self.payload), "write-data command")
        return Frame(self.address, int(Function2007.WRITE_DATA), data)


@dataclass(frozen=True, slots=True)
class BroadcastTime:
    """Clock synchronisation, sent to every meter on the bus; meters do not answer."""

    when: datetime
    address: str = BROADCAST_ADDRESS

    def frame(self) -> Frame:
        return Frame(self.address, int(Function2007.BROADCAST_TIME),
                     formats.build_struct(formats.DateTime6, self.when, "broadcast time"))


@dataclass(frozen=True, slots=True)
class FreezeRequest:
    """Freeze (16): ``minute hour day month``, each 0..99 where 99 means 'every'."""

    address: str
    minute: int = 99
    hour: int = 99
    day: int = 99
    month: int = 99

    def frame(self) -> Frame:
        fields = dict(minute=self.minute, hour=self.hour, day=self.day, month=self.month)
        data = bytes(int(f"{fields[k]:02d}", 16) for k in ("minute", "hour", "day", "month"))
        return Frame(self.address, int(Function2007.FREEZE), data)


@dataclass(frozen=True, slots=True)
class ChangeBaudRequest:
    address: str
    baud: int

    def frame(self) -> Frame:
        return Frame(self.address, int(Function2007.CHANGE_BAUD), bytes((baud_to_word(self.baud),)))


@dataclass(frozen=True, slots=True)
class RelayControlRequest:
    """Control command (1C): trip, close-allowed, direct close, alarm, keep-power, with a validity deadline."""

    address: str
    action: RelayAction
    valid_until: datetime
    password: str = "000000"
    password_level: int = 2
    operator: str = "00000000"

    def frame(self) -> Frame:
        data = formats.build_struct(formats.RelayControlPayload, dict(
            password_level=self.password_level, password=self.password, operator=self.operator,
            action=int(self.action), reserved=0, valid_until=self.valid_until), "relay-control command")
        return Frame(self.address, int(Function2007.RELAY_CONTROL), data)


# --------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class ReadReply:
    address: str
    di: int
    payload: bytes
    edition: Edition = E07
    followup: bool = False  # more frames follow (ask with ReadFollowupRequest)
    seq: int | None = None  # sequence number of a follow-up reply (2007)

    def frame(self) -> Frame:
        if self.seq is not None:
            fn = _followup_fn(self.edition)
            data = _di_bytes(self.di, self.edition) + self.payload + bytes((self.seq & 0xFF,))
        else:
            fn = _read_fn(self.edition)
            data = _di_bytes(self.di, self.edition) + self.payload
        return Frame(self.address, DIR_REPLY | (FOLLOWUP if self.followup else 0) | fn, data)

    def value(self) -> di_table.Value:
        return di_table.decode_value(self.di, self.payload, self.edition)


@dataclass(frozen=True, slots=True)
class ReadAddressReply:
    address: str

    def frame(self) -> Frame:
        return Frame(self.address, DIR_REPLY | Function2007.READ_ADDRESS, formats.encode_hex_le(self.address, 6))


@dataclass(frozen=True, slots=True)
class Ack:
    """Normal reply without data (write, relay control, freeze, ...)."""

    address: str
    function: int

    def frame(self) -> Frame:
        return Frame(self.address, DIR_REPLY | self.function, b"")


@dataclass(frozen=True, slots=True)
class ChangeBaudReply:
    address: str
    baud: int

    def frame(self) -> Frame:
        return Frame(self.address, DIR_REPLY | Function2007.CHANGE_BAUD, bytes((baud_to_word(self.baud),)))


@dataclass(frozen=True, slots=True)
class AbnormalReply:
    """The meter refused: ``error_word`` bits name why."""

    address: str
    function: int
    error_word: int
    edition: Edition = E07

    @property
    def errors(self) -> tuple[str, ...]:
        return error_names(self.error_word, self.edition)

    def frame(self) -> Frame:
        return Frame(self.address, DIR_REPLY | ABNORMAL | self.function, bytes((self.error_word,)))


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A well-formed frame whose function this codec does not interpret."""

    frame_: Frame
    edition: Edition | None

    def frame(self) -> Frame:
        return self.frame_


Message = Union[ReadRequest, ReadFollowupRequest, ReadAddressRequest, WriteRequest, BroadcastTime,
                FreezeRequest, ChangeBaudRequest, RelayControlRequest, ReadReply, ReadAddressReply, Ack,
                ChangeBaudReply, AbnormalReply, UnknownMessage]


# ----------------------------------------------------------------------- parse


def parse(frame: Frame, edition: Edition | None = None) -> Message:
    """Interpret a frame. ``edition`` settles function codes both editions use (03, 08)."""
    control, data, address = frame.control, frame.data, frame.address
    ed = edition_of(control, edition) or E07
    fn = control & 0x1F
    try:
        if control & DIR_REPLY:
            return _parse_reply(address, control, fn, data, ed)
        return _parse_request(address, fn, data, ed, frame)
    except FormatError as exc:
        raise MessageError(str(exc)) from None


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) < n:
        raise MessageError(f"{what} needs at least {n} data bytes, got {len(data)}", len(data))


def _parse_request(address: str, fn: int, data: bytes, ed: Edition, frame: Frame) -> Message:
    di_len = 2 if ed == E97 else 4
    if fn == _read_fn(ed):
        _need(data, di_len, "read request")
        return ReadRequest(address, int.from_bytes(data[:di_len], "little"), ed)
    if fn == _followup_fn(ed):
        _need(data, di_len, "follow-up read request")
        seq = data[di_len] if ed == E07 and len(data) > di_len else 0
        return ReadFollowupRequest(address, int.from_bytes(data[:di_len], "little"), seq, ed)
    if ed == E07:
        if fn == Function2007.READ_ADDRESS:
            return ReadAddressRequest(address)
        if fn == Function2007.WRITE_DATA:
            _need(data, 12, "write-data command")
            p = formats.parse_struct(formats.WriteDataPayload, data, "write-data command")
            return WriteRequest(address, p.di, p.data, p.password, p.password_level, p.operator)
        if fn == Function2007.FREEZE:
            _need(data, 4, "freeze command")
            mm, hh, dd, mo = (int(f"{b:02x}") if f"{b:02x}".isdigit() else 99 for b in data[:4])
            return FreezeRequest(address, mm, hh, dd, mo)
        if fn == Function2007.CHANGE_BAUD:
            _need(data, 1, "change-baud command")
            baud = word_to_baud(data[0])
            if baud is None:
                raise MessageError(f"baud feature word {data[0]:02X} names no single baud rate")
            return ChangeBaudRequest(address, baud)
        if fn == Function2007.RELAY_CONTROL:
            _need(data, 16, "relay-control command")
            p = formats.parse_struct(formats.RelayControlPayload, data, "relay-control command")
            try:
                action = RelayAction(p.action)
            except ValueError:
                raise MessageError(f"relay-control N1 {p.action:02X} is not a known action", 8) from None
            return RelayControlRequest(address, action, p.valid_until, p.password, p.password_level, p.operator)
    if fn == Function2007.BROADCAST_TIME:
        _need(data, 6, "broadcast time")
        return BroadcastTime(formats.parse_struct(formats.DateTime6, data, "broadcast time"), address)
    return UnknownMessage(Frame(address, fn, data), ed)


def _parse_reply(address: str, control: int, fn: int, data: bytes, ed: Edition) -> Message:
    if control & ABNORMAL:
        _need(data, 1, "abnormal reply")
        return AbnormalReply(address, fn, data[0], ed)
    di_len = 2 if ed == E97 else 4
    followup = bool(control & FOLLOWUP)
    if fn == _read_fn(ed):
        _need(data, di_len, "read reply")
        return ReadReply(address, int.from_bytes(data[:di_len], "little"), data[di_len:], ed, followup)
    if fn == _followup_fn(ed):
        _need(data, di_len + (1 if ed == E07 else 0), "follow-up read reply")
        if ed == E07:
            return ReadReply(address, int.from_bytes(data[:4], "little"), data[4:-1], ed, followup, data[-1])
        return ReadReply(address, int.from_bytes(data[:2], "little"), data[2:], ed, followup, 0)
    if ed == E07 and fn == Function2007.READ_ADDRESS:
        _need(data, 6, "read-address reply")
        return ReadAddressReply(formats.decode_hex_le(data[:6]))
    if ed == E07 and fn == Function2007.CHANGE_BAUD:
        _need(data, 1, "change-baud reply")
        return ChangeBaudReply(address, word_to_baud(data[0]) or 0)
    if not data:
        return Ack(address, fn)
    return UnknownMessage(Frame(address, control, data), ed)


def describe(message: Message, edition: Edition | None = None) -> dict[str, Any]:
    """A JSON-ready description of a message, for the decoder CLI and logs. Secrets are masked."""
    frame = message.frame()
    ed = getattr(message, "edition", None) or edition_of(frame.control, edition) or E07
    out: dict[str, Any] = {
        "edition": int(ed) if edition_of(frame.control, edition) else "2007/1997",
        "address": frame.address,
        "control": f"{frame.control:02X}",
        "function": function_name(frame.control, ed),
        "direction": "meter_to_master" if frame.control & DIR_REPLY else "master_to_meter",
        "abnormal": bool(frame.control & ABNORMAL),
        "followup": bool(frame.control & FOLLOWUP),
        "message": type(message).__name__,
    }
    if frame.address == BROADCAST_ADDRESS:
        out["broadcast"] = True
    elif "A" in frame.address:
        out["wildcard"] = True
    if isinstance(message, (ReadRequest, ReadFollowupRequest)):
        out["di"] = di_table.format_di(message.di, ed)
        item = di_table.lookup(message.di, ed)
        out["di_name"] = item.name if item else "unknown"
        if isinstance(message, ReadFollowupRequest):
            out["seq"] = message.seq
    elif isinstance(message, ReadReply):
        out["di"] = di_table.format_di(message.di, ed)
        if message.seq is not None:
            out["seq"] = message.seq
        try:
            value = message.value()
            out["di_name"] = value.name
            out["value"] = jsonable(value.value)
            if value.unit:
                out["unit"] = value.unit
        except FormatError as exc:
            out["di_name"] = getattr(di_table.lookup(message.di, ed), "name", "unknown")
            out["value_error"] = str(exc)
            out["raw"] = message.payload.hex().upper()
    elif isinstance(message, AbnormalReply):
        out["error_word"] = f"{message.error_word:02X}"
        out["errors"] = list(message.errors)
    elif isinstance(message, RelayControlRequest):
        out.update(action=message.action.label, valid_until=message.valid_until.isoformat(),
                   password_level=message.password_level, password="******", operator=message.operator)
    elif isinstance(message, WriteRequest):
        out.update(di=di_table.format_di(message.di, ed), password_level=message.password_level,
                   password="******", operator=message.operator, data=message.payload.hex().upper())
    elif isinstance(message, BroadcastTime):
        out["time"] = message.when.isoformat()
    elif isinstance(message, (ChangeBaudRequest, ChangeBaudReply)):
        out["baud"] = message.baud
    elif isinstance(message, FreezeRequest):
        out["freeze"] = {k: getattr(message, k) for k in ("minute", "hour", "day", "month")}
    elif isinstance(message, ReadAddressReply):
        out["meter_address"] = message.address
    elif isinstance(message, UnknownMessage):
        out["data"] = frame.data.hex().upper()
    return out


def jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex().upper()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
