"""Streaming deframer: feed it bytes as they arrive, get frames and error events out.

An RS-485 line delivers frames split across reads, several frames in one read,
FE wake-up runs, and noise (bus turn-around glitches, a meter answering with a
corrupted checksum, a frame cut off by a power dip). The deframer never raises
on any of that: every byte it drops is reported in an event with its offset in
the stream, and a bad candidate frame is abandoned by moving one byte past its
start, so a good frame that follows or overlaps a bad one is still found.
"""
from __future__ import annotations

from typing import NamedTuple, Union

from .frame import END, MAX_DATA_LEN, OVERHEAD, START, Frame, FrameError, decode_frame


class FrameReceived(NamedTuple):
    frame: Frame
    offset: int  # stream offset of the frame's first 68 byte
    raw: bytes  # the frame's bytes on the wire, without preamble


class FrameRejected(NamedTuple):
    reason: str  # bad_header, bad_length, bad_checksum, bad_end, truncated
    offset: int  # stream offset of the candidate's first 68 byte
    error_offset: int  # stream offset of the byte that made it invalid
    raw: bytes  # the candidate's bytes
    message: str


class Noise(NamedTuple):
    offset: int
    data: bytes  # bytes that are neither a frame nor FE preamble


Event = Union[FrameReceived, FrameRejected, Noise]


class Deframer:
    """Sans-I/O frame extractor. ``feed()`` bytes, ``flush()`` on an idle gap or end of stream."""

    __slots__ = ("_buf", "_base", "_reported", "max_data_len")

    def __init__(self, max_data_len: int = MAX_DATA_LEN) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._reported = 0  # stream offset up to which dropped bytes were already reported
        self.max_data_len = max_data_len

    @property
    def pending(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = 0
        n = len(buf)
        while pos < n:
            start = buf.find(START, pos)
            if start < 0:
                self._noise(events, pos, n)
                pos = n
                break
            if start > pos:
                self._noise(events, pos, start)
            avail = n - start
            if avail < 10:
                pos = start
                break
            if buf[start + 7] != START:
                self._reject(events, "bad_header", start, start + 7, buf[start : start + 8],
                             f"expected second start byte 68 after the address, found {buf[start + 7]:02X}")
                pos = start + 1
                continue
            length = buf[start + 9]
            if length > self.max_data_len:
                self._reject(events, "bad_length", start, start + 9, buf[start : start + 10],
                             f"data length {length} exceeds the {self.max_data_len}-byte limit")
                pos = start + 1
                continue
            total = OVERHEAD + length
            if avail < total:
                later = self._complete_frame_after(start + 1, n)
                if later is None:
                    pos = start
                    break
                self._reject(events, "truncated", start, later, buf[start:later],
                             "frame cut off: a complete frame starts before this one could end")
                pos = later
                continue
            raw = bytes(buf[start : start + total])
            try:
                frame = decode_frame(raw)
            except FrameError as exc:
                later = self._complete_frame_after(start + 1, n)
                if later is not None and later < start + total:
                    # the real story: this frame was cut off and the next one began
                    self._reject(events, "truncated", start, later, buf[start:later],
                                 "frame cut off: a complete frame starts before this one could end")
                    pos = later
                else:
                    self._reject(events, exc.reason, start, start + exc.offset, raw,
                                 str(exc).rsplit(" (at", 1)[0])
                    pos = start + 1
                continue
            events.append(FrameReceived(frame, self._base + start, raw))
            pos = start + total
        if pos:
            del buf[:pos]
            self._base += pos
        return events

    def flush(self) -> list[Event]:
        """Give up on whatever is buffered (the line went idle or closed)."""
        buf = self._buf
        events: list[Event] = []
        if buf:
            if buf[0] == START:
                self._reject(events, "truncated", 0, len(buf), buf, f"frame cut off after {len(buf)} bytes")
            else:
                self._noise(events, 0, len(buf))
            self._base += len(buf)
            buf.clear()
        return events

    def reset(self) -> None:
        """Drop buffered bytes silently (for example before a new request on a fresh link)."""
        self._base += len(self._buf)
        self._buf.clear()

    # -- internals -------------------------------------------------------

    def _complete_frame_after(self, pos: int, n: int) -> int | None:
        """Offset of the first complete, valid frame at or after ``pos``, if any."""
        buf = self._buf
        while True:
            start = buf.find(START, pos, n)
            if start < 0 or n - start < OVERHEAD:
                return None
            pos = start + 1
            if buf[start + 7] != START:
                continue
            end = start + 10 + buf[start + 9]
            if end + 2 > n or buf[end + 1] != END:
                continue
            if sum(buf[start:end]) & 0xFF == buf[end]:
                return start

    def _noise(self, events: list[Event], lo: int, hi: int) -> None:
        # bytes inside an already rejected candidate are not reported twice
        lo = max(lo, self._reported - self._base)
        if lo >= hi:
            return
        chunk = bytes(self._buf[lo:hi])
        if chunk.strip(b"\xfe"):
            events.append(Noise(self._base + lo, chunk))

    def _reject(self, events: list[Event], reason: str, start: int, at: int, raw, message: str) -> None:
        # A false start inside a candidate already reported (its second 68, a 68 in
        # its data) is part of that report, not a new error.
        if self._base + start >= self._reported:
            events.append(FrameRejected(reason, self._base + start, self._base + at, bytes(raw), message))
        self._reported = max(self._reported, self._base + start + len(raw))
