"""A simulated RS-485 bus: many meters behind one line, as a transparent serial server presents them.

Sans-I/O: :meth:`SimBus.receive` takes the bytes the master sent and the
current time and returns what goes back on the line and when. The TCP and pty
front-ends in :mod:`simulators.dlt645.serve` only move those bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable

from protocols.dlt645 import messages as m
from protocols.dlt645.deframer import Deframer, FrameReceived
from protocols.dlt645.frame import BROADCAST_ADDRESS, DIR_REPLY, address_matches, encode_frame

from .meter import SimMeter

log = logging.getLogger(__name__)


@dataclass
class Transmission:
    at: float  # monotonic time at which the bytes are on the line
    data: bytes


@dataclass
class BusStats:
    requests: int = 0
    replies: int = 0
    broadcasts: int = 0
    collisions: int = 0
    ignored: int = 0  # frames for no meter on this bus, or malformed
    busy_s: float = 0.0  # with line-rate emulation: how long the line carried bytes (requests and replies)


@dataclass
class SimBus:
    meters: dict[str, SimMeter] = field(default_factory=dict)
    #: emulate the line rate: bytes take their real time at this baud (None: as fast as the host)
    baud: int | None = None
    bits_per_char: int = 11  # 8E1
    turnaround_s: float = 0.02  # meters answer some 20 ms after the request's last byte
    preamble: bool = True
    clock: Callable[[], datetime] = datetime.now

    def __post_init__(self) -> None:
        self.deframer = Deframer()
        self.stats = BusStats()
        self._busy_until = 0.0

    @classmethod
    def of(cls, meters: Iterable[SimMeter], **kwargs) -> "SimBus":
        return cls({mt.address: mt for mt in meters}, **kwargs)

    def wire_time(self, nbytes: int) -> float:
        return nbytes * self.bits_per_char / self.baud if self.baud else 0.0

    def receive(self, data: bytes, now_mono: float, deframer: Deframer | None = None) -> list[Transmission]:
        """Bytes from the master; ``deframer`` keeps each connection's partial frames apart."""
        out: list[Transmission] = []
        for ev in (deframer or self.deframer).feed(data):
            if type(ev) is not FrameReceived or ev.frame.control & DIR_REPLY:
                continue
            # the request itself occupied the line for its own length
            start = max(now_mono, self._busy_until)
            wire = self.wire_time(len(ev.raw) + (4 if self.preamble else 0))
            arrived = start + wire
            self.stats.busy_s += wire
            self._busy_until = arrived
            out.extend(self._dispatch(ev.frame, arrived))
        return out

    def _dispatch(self, frame, arrived: float) -> list[Transmission]:
        self.stats.requests += 1
        try:
            request = m.parse(frame)
        except m.MessageError as exc:
            self.stats.ignored += 1
            log.debug("bus ignores malformed request: %s", exc)
            return []
        now = self.clock()
        if frame.address == BROADCAST_ADDRESS:
            self.stats.broadcasts += 1
            for meter in self.meters.values():
                meter.handle(request, now)
            return []
        targets = ([self.meters[frame.address]] if frame.address in self.meters
                   else [mt for a, mt in self.meters.items() if address_matches(frame.address, a)]
                   if "A" in frame.address else [])
        if not targets:
            self.stats.ignored += 1
            return []
        plans = [(meter, meter.handle(request, now)) for meter in targets]
        plans = [(meter, plan) for meter, plan in plans if plan.message is not None]
        if not plans:
            return []
        if len(plans) > 1:
            # several meters answered a wildcard at once: the line carries garbage
            self.stats.collisions += 1
            wire = bytes(a ^ b for a, b in zip(*(self._wire(meter, plan) for meter, plan in plans[:2])))
            return [self._emit(arrived + self.turnaround_s, wire)]
        meter, plan = plans[0]
        self.stats.replies += 1
        if plan.delay_s:
            # a late meter is silent until it answers, and the line free meanwhile: its reply may then cross
            # another exchange (the master drops it as a stray). Counted as busy, it went silent for everyone:
            # a 3 s late reply was 3 s of timeouts for every meter on the bus.
            return [self._emit(arrived + self.turnaround_s + plan.delay_s, self._wire(meter, plan), hold=False)]
        return [self._emit(arrived + self.turnaround_s, self._wire(meter, plan))]

    def _wire(self, meter: SimMeter, plan) -> bytes:
        frame = plan.message.frame()
        address = plan.as_address or frame.address
        wire = bytearray(encode_frame(address, frame.control, frame.data, self.preamble))
        if plan.corrupt:
            wire[-2] ^= 0x5A
        return bytes(wire)

    def _emit(self, start: float, wire: bytes, hold: bool = True) -> Transmission:
        """A transmission from ``start``; with ``hold``, after whatever is on the line and holding it until done."""
        if hold:
            start = max(start, self._busy_until)
        done = start + self.wire_time(len(wire))
        self.stats.busy_s += done - start
        if hold:
            self._busy_until = done
        return Transmission(done, wire)
