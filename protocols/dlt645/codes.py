"""Function codes, relay-control actions and error words of DL/T 645-2007 and -1997."""
from __future__ import annotations

from enum import IntEnum


class Edition(IntEnum):
    DLT645_1997 = 1997
    DLT645_2007 = 2007


class Function2007(IntEnum):
    SECURITY_AUTH = 0x03
    BROADCAST_TIME = 0x08
    READ_DATA = 0x11
    READ_FOLLOWUP = 0x12
    READ_ADDRESS = 0x13
    WRITE_DATA = 0x14
    WRITE_ADDRESS = 0x15
    FREEZE = 0x16
    CHANGE_BAUD = 0x17
    CHANGE_PASSWORD = 0x18
    CLEAR_DEMAND = 0x19
    CLEAR_METER = 0x1A
    CLEAR_EVENTS = 0x1B
    RELAY_CONTROL = 0x1C


class Function1997(IntEnum):
    READ_DATA = 0x01
    READ_FOLLOWUP = 0x02
    REREAD = 0x03
    WRITE_DATA = 0x04
    BROADCAST_TIME = 0x08
    WRITE_ADDRESS = 0x0A
    CHANGE_BAUD = 0x0C
    CHANGE_PASSWORD = 0x0F
    CLEAR_DEMAND = 0x10


_ONLY_1997 = {0x01, 0x02, 0x04, 0x0A, 0x0C, 0x0F, 0x10}
_ONLY_2007 = {f.value for f in Function2007} - {0x03, 0x08}


def edition_of(control: int, hint: Edition | None = None) -> Edition | None:
    """The edition a control code belongs to; ``hint`` settles codes both editions use (03, 08)."""
    fn = control & 0x1F
    if fn in _ONLY_2007:
        return Edition.DLT645_2007
    if fn in _ONLY_1997:
        return Edition.DLT645_1997
    return hint


def function_name(control: int, edition: Edition | None) -> str:
    fn = control & 0x1F
    table = Function1997 if edition == Edition.DLT645_1997 else Function2007
    try:
        return table(fn).name.lower()
    except ValueError:
        return f"unknown_{fn:02x}"


class RelayAction(IntEnum):
    """N1 of the 2007 control command (1C)."""

    TRIP = 0x1A  # 跳闸
    CLOSE_ALLOWED = 0x1B  # 合闸允许: the customer presses the meter's button to close
    DIRECT_CLOSE = 0x1C  # 直接合闸
    ALARM = 0x2A  # 报警
    ALARM_RELEASE = 0x2B  # 报警解除
    KEEP_POWER = 0x3A  # 保电: the meter refuses trips until released
    KEEP_POWER_RELEASE = 0x3B  # 保电解除

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "RelayAction":
        key = text.strip().lower().replace("-", "_")
        aliases = {"close": "direct_close", "open": "trip"}
        key = aliases.get(key, key)
        for action in cls:
            if action.label == key:
                return action
        allowed = ", ".join(a.label for a in cls)
        raise ValueError(f"unknown relay action {text!r}; allowed: {allowed} (close = direct_close)")


# Error word (ERR) of abnormal replies, bit -> name.
ERROR_BITS_2007 = {
    0: "other_error",
    1: "no_data_requested",  # unknown DI / no such data
    2: "password_error_or_unauthorized",
    3: "baud_rate_unchangeable",
    4: "year_time_zones_exceeded",
    5: "day_time_segments_exceeded",
    6: "tariffs_exceeded",
}
ERROR_BITS_1997 = {
    0: "illegal_data",
    1: "data_identifier_error",
    2: "password_error",
    4: "year_time_zones_exceeded",
    5: "day_time_segments_exceeded",
    6: "tariffs_exceeded",
}


def error_names(error_word: int, edition: Edition | None = Edition.DLT645_2007) -> tuple[str, ...]:
    bits = ERROR_BITS_1997 if edition == Edition.DLT645_1997 else ERROR_BITS_2007
    names = tuple(name for bit, name in bits.items() if error_word >> bit & 1)
    unknown = error_word & ~sum(1 << b for b in bits) & 0xFF
    if unknown:
        names += (f"reserved_bits_{unknown:02x}",)
    return names


def error_word(*names: str, edition: Edition = Edition.DLT645_2007) -> int:
    bits = ERROR_BITS_1997 if edition == Edition.DLT645_1997 else ERROR_BITS_2007
    lookup = {name: bit for bit, name in bits.items()}
    word = 0
    for name in names:
        if name not in lookup:
            raise ValueError(f"unknown error word name {name!r}; allowed: {', '.join(lookup)}")
        word |= 1 << lookup[name]
    return word


# Baud rate feature word Z of the change-baud command (17).
BAUD_BITS = {600: 1, 1200: 2, 2400: 3, 4800: 4, 9600: 5, 19200: 6}


def baud_to_word(baud: int) -> int:
    if baud not in BAUD_BITS:
        raise ValueError(f"baud rate {baud} not allowed; allowed: {', '.join(map(str, BAUD_BITS))}")
    return 1 << BAUD_BITS[baud]


def word_to_baud(word: int) -> int | None:
    for baud, bit in BAUD_BITS.items():
        if word == 1 << bit:
            return baud
    return None
