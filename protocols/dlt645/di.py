"""Data identifiers (DI) and their formats, for DL/T 645-2007 (4-byte DI) and -1997 (2-byte DI).

The table holds what a prepaid head-end reads: energy registers (total and per
tariff: T1 sharp 尖, T2 peak 峰, T3 flat 平, T4 valley 谷), voltages, currents,
power, the clock, the address, the run status words and the prepaid
remaining amount and overdraft. A DI the table does not know decodes to its
raw bytes, not an error: meters carry many vendor-specific items.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, NamedTuple

from . import formats
from .codes import Edition
from .formats import FormatError

TARIFF_NAMES = ("total", "sharp", "peak", "flat", "valley")
PHASES = ("a", "b", "c")


@dataclass(frozen=True, slots=True)
class DataItem:
    di: int
    edition: Edition
    name: str
    fmt: str  # as the standard writes it: XXXXXX.XX, YYMMDDWW, ...
    length: int
    unit: str = ""
    signed: bool = False
    description: str = ""
    decoder: Callable[[bytes], Any] = field(default=None, repr=False, compare=False)
    encoder: Callable[[Any], bytes] = field(default=None, repr=False, compare=False)

    @property
    def code(self) -> str:
        return format_di(self.di, self.edition)

    def decode(self, payload: bytes) -> Any:
        if len(payload) != self.length:
            raise FormatError(f"DI {self.code} ({self.name}) needs {self.length} bytes of data, got {len(payload)}")
        return self.decoder(payload)

    def encode(self, value: Any) -> bytes:
        return self.encoder(value)


def format_di(di: int, edition: Edition = Edition.DLT645_2007) -> str:
    return f"{di:04X}" if edition == Edition.DLT645_1997 else f"{di:08X}"


def parse_di(text: str | int, edition: Edition = Edition.DLT645_2007) -> int:
    if isinstance(text, int):
        return text
    t = text.strip().upper().removeprefix("0X")
    width = 4 if edition == Edition.DLT645_1997 else 8
    if len(t) != width:
        raise ValueError(f"data identifier {text!r} must be {width} hex digits for DL/T 645-{int(edition)}")
    try:
        return int(t, 16)
    except ValueError:
        raise ValueError(f"data identifier {text!r} is not hex") from None


def _number(length: int, decimals: int, signed: bool):
    if signed:
        def decode(payload: bytes) -> Decimal:
            return formats.decode_bcd(payload, decimals, True)
    else:
        # the unsigned case is every energy register: keep it to three C calls
        # "12345678E-2" parses straight to Decimal('123456.78'): cheaper than scaleb()
        def decode(payload: bytes, _Decimal=Decimal, _exp=f"E-{decimals}" if decimals else "") -> Decimal:
            digits = payload[::-1].hex()
            if not digits.isdigit():
                raise FormatError(f"bytes {digits.upper()} (most significant first) are not BCD digits")
            return _Decimal(digits + _exp)

    def encode(value) -> bytes:
        return formats.encode_bcd(value, length, decimals, signed)

    return decode, encode


def _struct(con, what):
    return (lambda payload: formats.parse_struct(con, payload, what),
            lambda value: formats.build_struct(con, value, what))


def _status(number: int):
    return (lambda payload: formats.decode_status_word(number, payload),
            lambda value: formats.encode_status_word(number, value))


_ID = (formats.decode_hex_le, lambda value: formats.encode_hex_le(value, 6))


def _fmt_decimals(fmt: str) -> int:
    return len(fmt.split(".")[1]) if "." in fmt else 0


# Per-edition tables keyed by the bare DI: the hot path builds no tuple key, and the outer dict is keyed by
# the plain int because Enum hashing runs Python code.
_BY_DI: dict[int, dict[int, DataItem]] = {2007: {}, 1997: {}}


def _register(item: DataItem) -> DataItem:
    _BY_DI[int(item.edition)][item.di] = item
    return item


def _add(edition: Edition, di: int, name: str, fmt: str, length: int, unit: str = "",
         signed: bool = False, description: str = "", codec=None) -> DataItem:
    if codec is None:
        codec = _number(length, _fmt_decimals(fmt), signed)
    return _register(DataItem(di, edition, name, fmt, length, unit, signed, description, codec[0], codec[1]))


def _block(edition: Edition, di: int, name: str, parts: list[DataItem], description: str) -> None:
    length = sum(p.length for p in parts)

    def decode(payload: bytes) -> dict:
        out, pos = {}, 0
        for p in parts:
            out[p.name] = p.decode(payload[pos : pos + p.length])
            pos += p.length
        return out

    def encode(values: dict) -> bytes:
        return b"".join(p.encode(values[p.name]) for p in parts)

    _register(DataItem(di, edition, name, "block", length, parts[0].unit, False, description, decode, encode))


E07, E97 = Edition.DLT645_2007, Edition.DLT645_1997

# ---- DL/T 645-2007 ----
_add(E07, 0x00000000, "combined_active_energy_total", "XXXXXX.XX", 4, "kWh", True, "组合有功总电能")
for _reg, _dir, _zh in ((0x0001, "forward", "正向"), (0x0002, "reverse", "反向")):
    _parts = []
    for _t, _tn in enumerate(TARIFF_NAMES):
        _parts.append(_add(E07, _reg << 16 | _t << 8, f"{_dir}_active_energy_{_tn}", "XXXXXX.XX", 4, "kWh",
                           False, f"{_zh}有功{'总' if _t == 0 else f'费率{_t}'}电能"))
    _block(E07, _reg << 16 | 0xFF00, f"{_dir}_active_energy_block", _parts, f"{_zh}有功电能数据块")
for _q, _qname, _fmt, _len, _unit, _signed, _zh in (
    (0x01, "voltage", "XXX.X", 2, "V", False, "电压"),
    (0x02, "current", "XXX.XXX", 3, "A", True, "电流"),
):
    _parts = [_add(E07, 0x0200_0000 | _q << 16 | _p << 8, f"{_qname}_{_pn}", _fmt, _len, _unit, _signed,
                   f"{_pn.upper()}相{_zh}") for _p, _pn in enumerate(PHASES, 1)]
    _block(E07, 0x0200_00FF | _q << 16, f"{_qname}_block", _parts, f"{_zh}数据块")
for _p, _pn in enumerate(("total",) + PHASES):
    _add(E07, 0x0203_0000 | _p << 8, f"active_power_{_pn}", "XX.XXXX", 3, "kW", True, "有功功率")
    _add(E07, 0x0206_0000 | _p << 8, f"power_factor_{_pn}", "X.XXX", 2, "", True, "功率因数")
_add(E07, 0x02800002, "frequency", "XX.XX", 2, "Hz", False, "电网频率")
_add(E07, 0x04000101, "date", "YYMMDDWW", 4, "", description="日期及星期",
     codec=_struct(formats.DateWeek, "date"))
_add(E07, 0x04000102, "time", "hhmmss", 3, "", description="时间", codec=_struct(formats.Time3, "time"))
_add(E07, 0x04000401, "meter_address", "NNNNNNNNNNNN", 6, "", description="通信地址", codec=_ID)
_add(E07, 0x04000402, "meter_number", "NNNNNNNNNNNN", 6, "", description="表号", codec=_ID)
_status_parts = [_add(E07, 0x04000500 | _w, f"status_word_{_w}", "XXXX", 2, "", description=f"电表运行状态字{_w}",
                      codec=_status(_w)) for _w in range(1, 8)]
_block(E07, 0x040005FF, "status_word_block", _status_parts, "电表运行状态字数据块")
_add(E07, 0x00900100, "remaining_energy", "XXXXXX.XX", 4, "kWh", description="(当前)剩余电量")
_add(E07, 0x00900101, "overdraft_energy", "XXXXXX.XX", 4, "kWh", description="(当前)透支电量")
_add(E07, 0x00900200, "remaining_amount", "XXXXXX.XX", 4, "yuan", description="(当前)剩余金额")
_add(E07, 0x00900201, "overdraft_amount", "XXXXXX.XX", 4, "yuan", description="(当前)透支金额")

# ---- DL/T 645-1997 ----
for _reg, _dir, _zh in ((0x901, "forward", "正向"), (0x902, "reverse", "反向")):
    _parts = [_add(E97, _reg << 4 | _t, f"{_dir}_active_energy_{_tn}", "XXXXXX.XX", 4, "kWh",
                   description=f"{_zh}有功电能") for _t, _tn in enumerate(TARIFF_NAMES)]
    _block(E97, _reg << 4 | 0xF, f"{_dir}_active_energy_block", _parts, f"{_zh}有功电能数据块")
_parts = [_add(E97, 0xB610 | _p, f"voltage_{_pn}", "XXX", 2, "V", description="电压") for _p, _pn in enumerate(PHASES, 1)]
_block(E97, 0xB61F, "voltage_block", _parts, "电压数据块")
_parts = [_add(E97, 0xB620 | _p, f"current_{_pn}", "XX.XX", 2, "A", description="电流") for _p, _pn in enumerate(PHASES, 1)]
_block(E97, 0xB62F, "current_block", _parts, "电流数据块")
for _p, _pn in enumerate(("total",) + PHASES):
    _add(E97, 0xB630 | _p, f"active_power_{_pn}", "XX.XXXX", 3, "kW", description="有功功率")
_add(E97, 0xC010, "date", "YYMMDDWW", 4, description="日期及周次", codec=_struct(formats.DateWeek, "date"))
_add(E97, 0xC011, "time", "hhmmss", 3, description="时间", codec=_struct(formats.Time3, "time"))
_add(E97, 0xC032, "meter_number", "NNNNNNNNNNNN", 6, description="表号", codec=_ID)


# Names a client asks for, in either edition (for the CLI and configs).
_BY_NAME: dict[tuple[Edition, str], DataItem] = {(i.edition, i.name): i for table in _BY_DI.values()
                                                 for i in table.values()}


def lookup(di: int, edition: Edition = Edition.DLT645_2007) -> DataItem | None:
    return _BY_DI[int(edition)].get(di)


def by_name(name: str, edition: Edition = Edition.DLT645_2007) -> DataItem | None:
    return _BY_NAME.get((edition, name))


def resolve(text: str | int, edition: Edition = Edition.DLT645_2007) -> int:
    """A DI given as hex (``00010000``) or as a table name (``forward_active_energy_total``)."""
    if isinstance(text, str):
        item = by_name(text.strip().lower(), edition)
        if item is not None:
            return item.di
    try:
        return parse_di(text, edition)
    except ValueError as exc:
        raise ValueError(f"{exc}, and is not a known data-item name "
                         f"(for example forward_active_energy_total, voltage_a, status_word_3)") from None


class Value(NamedTuple):
    """A decoded data item: ``value`` is Decimal, date, time, str, dict, or raw bytes for unknown DIs."""

    di: int
    edition: Edition
    name: str
    value: Any
    unit: str = ""

    @property
    def code(self) -> str:
        return format_di(self.di, self.edition)


_new_value = tuple.__new__


_TABLE_2007 = _BY_DI[2007]


def decode_value(di: int, payload: bytes, edition: Edition = E07) -> Value:
    item = _TABLE_2007.get(di) if edition is E07 else _BY_DI[int(edition)].get(di)
    if item is None:
        return _new_value(Value, (di, edition, "unknown", bytes(payload), ""))
    if len(payload) != item.length:
        raise FormatError(f"DI {item.code} ({item.name}) needs {item.length} bytes of data, got {len(payload)}")
    return _new_value(Value, (di, edition, item.name, item.decoder(payload), item.unit))


_DI07 = struct.Struct("<I").unpack_from
_DI97 = struct.Struct("<H").unpack_from


def decode_data(data: bytes, edition: Edition = E07) -> Value:
    """Value of a read reply's data field (DI, then the payload): the reading hot path, in one call."""
    if edition is E07:
        if len(data) < 4:
            raise FormatError(f"read reply data of {len(data)} bytes has no room for a 4-byte DI")
        di = _DI07(data)[0]
        item = _TABLE_2007.get(di)
        payload = data[4:]
    else:
        if len(data) < 2:
            raise FormatError(f"read reply data of {len(data)} bytes has no room for a 2-byte DI")
        di = _DI97(data)[0]
        item = _BY_DI[int(edition)].get(di)
        payload = data[2:]
    if item is None:
        return _new_value(Value, (di, edition, "unknown", payload, ""))
    if len(payload) != item.length:
        raise FormatError(f"DI {item.code} ({item.name}) needs {item.length} bytes of data, got {len(payload)}")
    return _new_value(Value, (di, edition, item.name, item.decoder(payload), item.unit))


def encode_value(di: int, value: Any, edition: Edition = Edition.DLT645_2007) -> bytes:
    item = _BY_DI[int(edition)].get(di)
    if item is None:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise FormatError(f"DI {format_di(di, edition)} is not in the table: give its value as raw bytes")
    return item.encode(value)
