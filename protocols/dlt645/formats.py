"""Data formats of DL/T 645 data fields.

Numbers are BCD, lowest byte first; signed quantities carry the sign in the
top bit of the most significant byte. Numbers decode to ``Decimal`` (exact:
energy turns into money downstream, so never ``float``). The fixed payload
layouts (date-time, status words, the relay-control command) are declared with
``construct`` where the declarative form documents the layout better than code.
"""
from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal
from functools import lru_cache

from construct import (
    Adapter,
    BitsInteger,
    BitStruct,
    Bytes,
    ByteSwapped,
    ConstructError,
    Flag,
    GreedyBytes,
    Int8ul,
    Int32ul,
    Padding,
    Struct,
)


class FormatError(ValueError):
    """A data field whose bytes do not fit the data item's format."""


# -- BCD numbers (hand-written: they are on the hot path of every reading) --


def decode_bcd(payload: bytes, decimals: int = 0, signed: bool = False) -> Decimal:
    negative = False
    if signed and payload and payload[-1] & 0x80:
        negative = True
        payload = payload[:-1] + bytes((payload[-1] & 0x7F,))
    digits = payload[::-1].hex()
    if not digits.isdigit():
        raise FormatError(f"bytes {payload[::-1].hex().upper()} (most significant first) are not BCD digits")
    value = Decimal(digits).scaleb(-decimals) if decimals else Decimal(digits)
    return -value if negative else value


def encode_bcd(value: Decimal | int | str, length: int, decimals: int = 0, signed: bool = False) -> bytes:
    number = Decimal(value).scaleb(decimals)
    if number != number.to_integral_value():
        raise FormatError(f"{value} has more than {decimals} decimal places")
    scaled = int(number)
    negative = scaled < 0
    if negative and not signed:
        raise FormatError(f"{value} is negative but the format is unsigned")
    digits = f"{abs(scaled):0{2 * length}d}"
    limit_digits = 2 * length - (1 if signed else 0)
    if len(digits) > 2 * length or (signed and int(digits[0]) > 7):
        raise FormatError(f"{value} does not fit in {limit_digits} BCD digits")
    raw = bytes.fromhex(digits)[::-1]
    if negative:
        raw = raw[:-1] + bytes((raw[-1] | 0x80,))
    return raw


def decode_hex_le(payload: bytes) -> str:
    """Identifiers kept as printed (address, meter number): reversed bytes as hex."""
    return payload[::-1].hex().upper()


def encode_hex_le(text: str, length: int) -> bytes:
    text = text.strip()
    if len(text) != 2 * length:
        raise FormatError(f"{text!r} must be {2 * length} hex digits")
    try:
        return bytes.fromhex(text)[::-1]
    except ValueError:
        raise FormatError(f"{text!r} is not hex digits") from None


# -- construct building blocks ------------------------------------------------


class _BcdByte(Adapter):
    def _decode(self, obj, context, path):
        hi, lo = obj >> 4, obj & 0x0F
        if hi > 9 or lo > 9:
            raise FormatError(f"byte {obj:02X} is not two BCD digits")
        return hi * 10 + lo

    def _encode(self, obj, context, path):
        if not 0 <= obj <= 99:
            raise FormatError(f"{obj} does not fit in two BCD digits")
        return (obj // 10) << 4 | obj % 10


BcdByte = _BcdByte(Int8ul)


class _HexLE(Adapter):
    def _decode(self, obj, context, path):
        return decode_hex_le(obj)

    def _encode(self, obj, context, path):
        return encode_hex_le(obj, self.subcon.length)


def HexLE(length: int):
    return _HexLE(Bytes(length))


# YYMMDDhhmmss, sent lowest byte (seconds) first.
_DateTime6 = Struct("second" / BcdByte, "minute" / BcdByte, "hour" / BcdByte,
                    "day" / BcdByte, "month" / BcdByte, "year" / BcdByte)


class _DateTimeAdapter(Adapter):
    def _decode(self, obj, context, path):
        try:
            return datetime(2000 + obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second)
        except ValueError as exc:
            raise FormatError(f"not a valid date-time: {exc}") from None

    def _encode(self, obj, context, path):
        if not 2000 <= obj.year <= 2099:
            raise FormatError(f"year {obj.year} outside 2000..2099")
        return dict(second=obj.second, minute=obj.minute, hour=obj.hour,
                    day=obj.day, month=obj.month, year=obj.year - 2000)


DateTime6 = _DateTimeAdapter(_DateTime6)

# YYMMDDWW (04000101): week day first on the wire; 0 = Sunday as the standard numbers it.
_DateWeek = Struct("weekday" / BcdByte, "day" / BcdByte, "month" / BcdByte, "year" / BcdByte)


class _DateAdapter(Adapter):
    def _decode(self, obj, context, path):
        try:
            return date(2000 + obj.year, obj.month, obj.day)
        except ValueError as exc:
            raise FormatError(f"not a valid date: {exc}") from None

    def _encode(self, obj, context, path):
        return dict(weekday=(obj.isoweekday() % 7), day=obj.day, month=obj.month, year=obj.year - 2000)


DateWeek = _DateAdapter(_DateWeek)

# hhmmss (04000102)
_Time3 = Struct("second" / BcdByte, "minute" / BcdByte, "hour" / BcdByte)


class _TimeAdapter(Adapter):
    def _decode(self, obj, context, path):
        try:
            return time(obj.hour, obj.minute, obj.second)
        except ValueError as exc:
            raise FormatError(f"not a valid time: {exc}") from None

    def _encode(self, obj, context, path):
        return dict(second=obj.second, minute=obj.minute, hour=obj.hour)


Time3 = _TimeAdapter(_Time3)

# -- run status words (04000501..04000507), two bytes, lowest first ----------
# ByteSwapped turns them most-significant-first, so each BitStruct lists its
# fields from bit 15 down to bit 0, as the standard's tables do.

_ON_OFF = {0: "closed", 1: "open"}

STATUS_WORD_1 = ByteSwapped(BitStruct(
    Padding(8),
    Padding(2),
    "reactive_power_reverse" / Flag,  # bit5
    "active_power_reverse" / Flag,  # bit4
    "reading_battery_low" / Flag,  # bit3 停电抄表电池欠压
    "clock_battery_low" / Flag,  # bit2 时钟电池欠压
    "demand_mode_block" / Flag,  # bit1 需量积算方式 0 sliding, 1 block
    Padding(1),
))

STATUS_WORD_2 = ByteSwapped(BitStruct(
    Padding(8),
    Padding(1),
    "phase_c_reactive_reverse" / Flag,
    "phase_b_reactive_reverse" / Flag,
    "phase_a_reactive_reverse" / Flag,
    Padding(1),
    "phase_c_active_reverse" / Flag,
    "phase_b_active_reverse" / Flag,
    "phase_a_active_reverse" / Flag,
))

# Word 3 (operation) as extended by the 2013 filing for cost-control meters.
STATUS_WORD_3 = ByteSwapped(BitStruct(
    "remote_account_open" / Flag,  # bit15 远程开户
    "local_account_open" / Flag,  # bit14 本地开户
    "identity_authenticated" / Flag,  # bit13 身份认证有效
    "keep_power" / Flag,  # bit12 保电: the meter refuses trips
    "step_table" / BitsInteger(1),  # bit11 current step (tier) table, 0 first / 1 second
    "tariff_table" / BitsInteger(1),  # bit10 current price table
    "meter_type" / BitsInteger(2),  # bits 9-8: 00 not prepaid, 01 energy prepaid, 10 money prepaid
    "pre_trip_alarm" / Flag,  # bit7 预跳闸报警
    "relay_command" / BitsInteger(1),  # bit6 继电器命令状态 0 closed, 1 open
    "time_zone_table" / BitsInteger(1),  # bit5
    "relay" / BitsInteger(1),  # bit4 继电器状态 0 closed (通), 1 open (断): the actual contact
    "programming_allowed" / Flag,  # bit3
    "power_supply" / BitsInteger(2),  # bits 2-1: 00 main, 01 auxiliary, 10 battery
    "time_segment_table" / BitsInteger(1),  # bit0
))

_PHASE_FAULTS = ByteSwapped(BitStruct(
    Padding(7),
    "current_break" / Flag,  # bit8 断流
    "phase_break" / Flag,  # bit7 断相
    "reverse_power_flow" / Flag,  # bit6 潮流反向
    "overload" / Flag,
    "over_current" / Flag,
    "loss_of_current" / Flag,  # 失流
    "over_voltage" / Flag,
    "under_voltage" / Flag,
    "loss_of_voltage" / Flag,  # bit0 失压
))

STATUS_WORD_7 = ByteSwapped(BitStruct(
    Padding(5),
    "terminal_cover_open" / Flag,  # bit10
    "meter_cover_open" / Flag,  # bit9
    "severe_current_imbalance" / Flag,  # bit8
    "power_factor_low" / Flag,  # bit7
    "demand_over_limit" / Flag,  # bit6
    "power_failure" / Flag,  # bit5
    "auxiliary_power_lost" / Flag,  # bit4
    "current_imbalance" / Flag,
    "voltage_imbalance" / Flag,
    "current_reverse_sequence" / Flag,
    "voltage_reverse_sequence" / Flag,  # bit0
))

STATUS_WORDS = {1: STATUS_WORD_1, 2: STATUS_WORD_2, 3: STATUS_WORD_3,
                4: _PHASE_FAULTS, 5: _PHASE_FAULTS, 6: _PHASE_FAULTS, 7: STATUS_WORD_7}

_METER_TYPES = {0: "not_prepaid", 1: "energy_prepaid", 2: "money_prepaid", 3: "reserved"}
_POWER_SUPPLY = {0: "main", 1: "auxiliary", 2: "battery", 3: "reserved"}


def decode_status_word(number: int, payload: bytes) -> dict:
    if len(payload) != 2:
        raise FormatError(f"status word {number} needs 2 bytes, got {len(payload)}")
    # a fleet shows few distinct words, and construct takes ~60 us a parse: every poll reads status word 3
    return dict(_decode_status_word(number, bytes(payload)))


@lru_cache(maxsize=4096)
def _decode_status_word(number: int, payload: bytes) -> dict:
    parsed = STATUS_WORDS[number].parse(payload)
    out = {k: v for k, v in parsed.items() if not k.startswith("_")}
    if number == 3:
        out["relay"] = _ON_OFF[out["relay"]]
        out["relay_command"] = _ON_OFF[out["relay_command"]]
        out["meter_type"] = _METER_TYPES[out["meter_type"]]
        out["power_supply"] = _POWER_SUPPLY[out["power_supply"]]
    out["raw"] = payload[::-1].hex().upper()
    return out


def encode_status_word(number: int, fields: dict) -> bytes:
    values = dict(fields)
    values.pop("raw", None)
    if number == 3:
        for key, table in (("relay", _ON_OFF), ("relay_command", _ON_OFF),
                           ("meter_type", _METER_TYPES), ("power_supply", _POWER_SUPPLY)):
            if isinstance(values.get(key), str):
                values[key] = {v: k for k, v in table.items()}[values[key]]
    defaults = {name: 0 for name in _field_names(STATUS_WORDS[number])}
    defaults.update(values)
    return STATUS_WORDS[number].build(defaults)


def _field_names(con) -> list[str]:
    return [sc.name for sc in con.subcon.subcon.subcons if sc.name]


# -- command payloads ------------------------------------------------------------

#: Data field of the 2007 relay-control command (1C), plain-text form.
RelayControlPayload = Struct(
    "password_level" / Int8ul,  # PA
    "password" / HexLE(3),  # P0 P1 P2
    "operator" / HexLE(4),  # C0 .. C3, operator code recorded by the meter
    "action" / Int8ul,  # N1, see codes.RelayAction
    "reserved" / Int8ul,  # N2
    "valid_until" / DateTime6,  # N3 .. N8: the meter ignores the command after this
)

#: Data field of the 2007 write-data command (14).
WriteDataPayload = Struct(
    "di" / Int32ul,
    "password_level" / Int8ul,
    "password" / HexLE(3),
    "operator" / HexLE(4),
    "data" / GreedyBytes,
)


def parse_struct(struct, payload: bytes, what: str):
    try:
        return struct.parse(payload)
    except FormatError:
        raise
    except ConstructError as exc:
        raise FormatError(f"{what}: {exc}") from None


def build_struct(struct, values, what: str) -> bytes:
    try:
        return struct.build(values)
    except FormatError:
        raise
    except ConstructError as exc:
        raise FormatError(f"{what}: {exc}") from None
