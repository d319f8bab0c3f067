"""DL/T 645 link frames (2007 and 1997 share this layer).

Wire layout::

    [FE ...] 68 A0 A1 A2 A3 A4 A5 68 C L D0 .. D(L-1) CS 16

* the address is 6 BCD bytes, lowest byte first; ``AA`` bytes are wildcards
  and ``99 99 99 99 99 99`` is the broadcast address;
* every data byte is sent plus 0x33 (mod 256);
* CS is the sum, mod 256, of every byte from the first 68 to the end of data.

This module is the hot path of every exchange, so it is written by hand and
kept to a few C-level byte operations per frame (no per-byte Python loop).
Addresses are handled as the 12-character string printed on the meter's
nameplate, most significant digit first (``"000000000001"``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

START = 0x68
END = 0x16
PREAMBLE_BYTE = 0xFE
PREAMBLE = b"\xfe\xfe\xfe\xfe"
BROADCAST_ADDRESS = "999999999999"
WILDCARD_ADDRESS = "AAAAAAAAAAAA"
#: The standards limit the data field to 200 bytes; a header announcing more is
#: noise, not a frame.
MAX_DATA_LEN = 200
#: Bytes of a frame without its data field: 68, 6 address, 68, C, L, CS, 16.
OVERHEAD = 12

# Control code bits.
DIR_REPLY = 0x80  # D7: 0 master -> meter, 1 meter -> master
ABNORMAL = 0x40  # D6: meter could not do what was asked; data is an error word
FOLLOWUP = 0x20  # D5: more data follows in further frames
FUNCTION_MASK = 0x1F

_ADD33 = bytes((b + 0x33) & 0xFF for b in range(256))
_SUB33 = bytes((b - 0x33) & 0xFF for b in range(256))


class FrameError(ValueError):
    """A byte sequence that is not a valid frame.

    ``reason`` is a stable machine-readable word, ``offset`` the byte offset
    (within the bytes given) of the first offending byte.
    """

    def __init__(self, reason: str, offset: int, message: str) -> None:
        super().__init__(f"{message} (at byte offset {offset})")
        self.reason = reason
        self.offset = offset


class Frame(NamedTuple):
    """One decoded frame; ``data`` has the 0x33 offset already removed."""

    address: str
    control: int
    data: bytes = b""

    @property
    def is_reply(self) -> bool:
        return bool(self.control & DIR_REPLY)

    @property
    def is_abnormal(self) -> bool:
        return bool(self.control & ABNORMAL)

    @property
    def has_followup(self) -> bool:
        return bool(self.control & FOLLOWUP)

    @property
    def function(self) -> int:
        return self.control & FUNCTION_MASK

    def encode(self, preamble: bool = True) -> bytes:
        return encode_frame(self.address, self.control, self.data, preamble)


_new_frame = tuple.__new__


@lru_cache(maxsize=1 << 17)
def address_to_wire(address: str) -> bytes:
    """``"000000000001"`` -> ``b"\\x01\\0\\0\\0\\0\\0"``; validates BCD or AA wildcard bytes."""
    if not isinstance(address, str) or len(address) != 12:
        raise ValueError(f"meter address must be 12 characters, got {address!r}")
    up = address.upper()
    for i in range(0, 12, 2):
        pair = up[i : i + 2]
        if not (pair.isdigit() or pair == "AA"):
            raise ValueError(
                f"meter address {address!r}: byte {pair!r} at position {i} is neither BCD digits nor the AA wildcard"
            )
    return bytes.fromhex(up)[::-1]


def normalise_address(address: str | int) -> str:
    """Accept ``1``, ``"1"`` or ``"000000000001"`` (and AA wildcards) and return the 12-character form."""
    if isinstance(address, int):
        if not 0 <= address <= 999_999_999_999:
            raise ValueError(f"meter address {address} is outside 0..999999999999")
        return f"{address:012d}"
    text = str(address).strip().replace(" ", "").upper()
    if text.isdigit() and len(text) < 12:
        text = text.zfill(12)
    address_to_wire(text)
    return text


def address_matches(pattern: str, address: str) -> bool:
    """Whether ``address`` is selected by ``pattern`` (AA bytes in the pattern match any byte)."""
    if pattern == address:
        return True
    if "A" not in pattern:
        return False
    for i in range(0, 12, 2):
        if pattern[i : i + 2] != "AA" and pattern[i : i + 2] != address[i : i + 2]:
            return False
    return True


def encode_frame(address: str, control: int, data: bytes = b"", preamble: bool = True) -> bytes:
    """Build the wire bytes of one frame (``data`` without the 0x33 offset)."""
    n = len(data)
    if n > MAX_DATA_LEN:
        raise ValueError(f"data field of {n} bytes exceeds the {MAX_DATA_LEN}-byte limit")
    if not 0 <= control <= 0xFF:
        raise ValueError(f"control code {control!r} is not a byte")
    body = b"\x68" + address_to_wire(address) + b"\x68" + bytes((control, n)) + data.translate(_ADD33)
    tail = bytes((sum(body) & 0xFF, END))
    if preamble:
        return PREAMBLE + body + tail
    return body + tail


def decode_frame(raw: bytes) -> Frame:
    """Decode exactly one frame (optionally preceded by FE bytes).

    Raises :class:`FrameError` naming the offending byte offset. For a stream
    that may hold several frames, partial frames and noise, use
    :class:`protocols.dlt645.deframer.Deframer`.
    """
    skip = 0
    if raw and raw[0] == PREAMBLE_BYTE:
        stripped = raw.lstrip(b"\xfe")
        skip = len(raw) - len(stripped)
        raw = stripped
    n = len(raw)
    if n < OVERHEAD:
        if n == 0:
            raise FrameError("truncated", skip, "no frame: only preamble bytes or nothing at all")
        if raw[0] != START:
            raise FrameError("bad_start", skip, f"expected start byte 68, found {raw[0]:02X}")
        raise FrameError("truncated", skip + n, f"frame is truncated: {n} bytes, a frame needs at least {OVERHEAD}")
    if raw[0] != START:
        raise FrameError("bad_start", skip, f"expected start byte 68, found {raw[0]:02X}")
    if raw[7] != START:
        raise FrameError("bad_header", skip + 7, f"expected second start byte 68 after the address, found {raw[7]:02X}")
    length = raw[9]
    end = 10 + length
    if n != end + 2:
        if length > MAX_DATA_LEN:
            raise FrameError("bad_length", skip + 9, f"data length {length} exceeds the {MAX_DATA_LEN}-byte limit")
        if n < end + 2:
            raise FrameError(
                "truncated", skip + n, f"frame is truncated: data length {length} needs {end + 2} bytes, got {n}"
            )
        raise FrameError("trailing_bytes", skip + end + 2, f"{n - end - 2} unexpected bytes after the end byte")
    cs = raw[end]
    # summing the whole frame and subtracting the tail avoids copying a slice
    checksum = (sum(raw) - cs - raw[end + 1]) & 0xFF
    if checksum != cs:
        raise FrameError("bad_checksum", skip + end, f"checksum is {cs:02X}, computed {checksum:02X}")
    if raw[end + 1] != END:
        raise FrameError("bad_end", skip + end + 1, f"expected end byte 16, found {raw[end + 1]:02X}")
    address = raw[6:0:-1].hex()
    if not address.isdigit():
        address = address.upper()
    return _new_frame(Frame, (address, raw[8], raw[10:end].translate(_SUB33)))
