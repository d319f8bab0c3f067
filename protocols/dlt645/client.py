"""Thin asyncio adapter: DL/T 645 over a serial RS-485 line or a TCP transparent serial server.

All protocol logic lives in the sans-I/O modules; this file only moves bytes
and enforces the rules of a half-duplex master/slave bus:

* one exchange at a time per link (an RS-485 bus or a DTU's TCP socket);
* timeouts derived from the line's baud rate and the frames' lengths;
* each reply is matched to its request by address and control code; anything
  else on the line (a stray reply, our own echo, noise) is counted and dropped.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from . import messages as m
from .codes import Edition, RelayAction
from .deframer import Deframer, FrameReceived, FrameRejected, Noise
from .di import Value, decode_value
from .frame import BROADCAST_ADDRESS, DIR_REPLY, OVERHEAD, Frame, address_matches, encode_frame

log = logging.getLogger(__name__)


class Dlt645Error(Exception):
    """Base of the client's errors."""


class Dlt645Timeout(Dlt645Error):
    """No matching reply in time: the outcome of a command is unknown."""


class Dlt645Refused(Dlt645Error):
    """The meter answered with an abnormal reply (an explicit refusal)."""

    def __init__(self, reply: m.AbnormalReply) -> None:
        super().__init__(f"meter {reply.address} refused: {', '.join(reply.errors) or 'no reason given'}"
                         f" (error word {reply.error_word:02X})")
        self.reply = reply
        self.errors = reply.errors


class Dlt645BadReply(Dlt645Error):
    """A reply that matched the request but could not be used: malformed data, or the wrong kind of reply."""


class Dlt645LinkError(Dlt645Error):
    """The link could not be opened or was lost. ``written``: the request had gone out before (its outcome
    is unknown), as opposed to a link that could not be opened (nothing was sent)."""

    def __init__(self, message: str, written: bool = False) -> None:
        super().__init__(message)
        self.written = written


@dataclass
class LinkSettings:
    baud: int = 2400
    parity: str = "E"  # 8E1 on real DL/T 645 lines; Linux ptys refuse even parity, use "N" there
    bytesize: int = 8
    stopbits: int = 1
    preamble: bool = True  # FE FE FE FE wakes the meters' UARTs
    turnaround_s: float = 0.5  # the standard lets a meter take up to 500 ms before it answers
    margin_s: float = 0.2  # scheduling slack on the host and, for TCP, the network
    retries: int = 2  # for reads; commands decide their own

    @property
    def bits_per_char(self) -> int:
        return 1 + self.bytesize + (0 if self.parity.upper() == "N" else 1) + self.stopbits

    def exchange_timeout(self, request_len: int, reply_len: int) -> float:
        """Time for the request and the longest expected reply on the wire, plus the meter's turnaround."""
        wire = (request_len + reply_len + 4) * self.bits_per_char / self.baud
        return wire + self.turnaround_s + self.margin_s


@dataclass
class LinkStats:
    exchanges: int = 0
    timeouts: int = 0
    frames_rejected: int = 0
    noise_bytes: int = 0
    stray_frames: int = 0  # well-formed frames that answered nothing we asked
    reconnects: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)


class _LinkProtocol(asyncio.Protocol):
    def __init__(self, link: "Dlt645Link") -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.made = loop.create_future()
        self.closed = loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.link._on_events(self.link.deframer.feed(data))

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        self.link._on_lost(exc)


Opener = Callable[[Callable[[], asyncio.Protocol]], Any]

#: how long opening a link (a TCP connect, a serial port) may take
CONNECT_TIMEOUT_S = 5.0


class Dlt645Link:
    """One bus (serial line or TCP socket to a transparent serial server); one exchange at a time."""

    def __init__(self, opener: Opener, settings: LinkSettings, name: str, transport: str = "tcp") -> None:
        """``transport``: what the opener reaches the bus through: ``tcp`` (a transparent serial server),
        ``serial`` (a line), ``mqtt`` (a concentrator forwarding frames); metrics are labelled with it."""
        self._opener = opener
        self.settings = settings
        self.name = name
        self.transport = transport
        self.deframer = Deframer()
        self.stats = LinkStats()
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task | None = None
        self._protocol: _LinkProtocol | None = None
        self._waiter: asyncio.Future | None = None
        self._match: Callable[[Frame], bool] | None = None

    @classmethod
    def tcp(cls, host: str, port: int, settings: LinkSettings | None = None, name: str | None = None) -> "Dlt645Link":
        """``name``: the bus name meters are configured with (default ``tcp://HOST:PORT``)."""
        async def opener(factory):
            return await asyncio.get_running_loop().create_connection(factory, host, port)

        return cls(opener, settings or LinkSettings(), name or f"tcp://{host}:{port}")

    @classmethod
    def serial(cls, device: str, settings: LinkSettings | None = None, name: str | None = None) -> "Dlt645Link":
        settings = settings or LinkSettings()

        async def opener(factory):
            import serial_asyncio_fast

            return await serial_asyncio_fast.create_serial_connection(
                asyncio.get_running_loop(), factory, device, baudrate=settings.baud,
                parity=settings.parity.upper(), bytesize=settings.bytesize, stopbits=settings.stopbits)

        return cls(opener, settings, name or f"serial://{device}", "serial")

    @property
    def is_open(self) -> bool:
        return self._protocol is not None and not self._protocol.closed.done()

    async def open(self) -> None:
        if self.is_open:
            return
        try:
            # bounded: an unanswered TCP connect would hold the bus (and a relay command's lease check) for minutes
            _, protocol = await asyncio.wait_for(self._opener(lambda: _LinkProtocol(self)), CONNECT_TIMEOUT_S)
            # serial transports report connection_made a loop iteration later
            await asyncio.wait_for(protocol.made, 5.0)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            raise Dlt645LinkError(f"cannot open {self.name}: {exc}") from exc
        if self._protocol is not None:
            self.stats.reconnects += 1
        self._protocol = protocol
        self.deframer.reset()

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(protocol.closed), 1.0)
            except asyncio.TimeoutError:
                pass

    async def __aenter__(self) -> "Dlt645Link":
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @asynccontextmanager
    async def reserved(self):
        """Hold the bus for several exchanges and whatever the caller does between them (a relay command's
        last check before its frame goes out): nothing else gets on the line meanwhile."""
        async with self._lock:
            self._holder = asyncio.current_task()
            try:
                yield self
            finally:
                self._holder = None

    async def exchange(self, request: Frame, *, expect_reply: bool = True, reply_len: int = 64,
                       timeout: float | None = None, retries: int = 0) -> Frame | None:
        """Send ``request`` and return the matching reply frame (``None`` for broadcasts).

        Retries only on timeouts and a lost link; an abnormal reply is an answer and is returned (as a frame)
        for the caller to interpret. Outside a :meth:`reserved` hold each attempt takes the bus on its own:
        whoever queued for it meanwhile (a paid customer's close) goes between a silent meter's attempts
        instead of after all of them.
        """
        wire = encode_frame(request.address, request.control, request.data, self.settings.preamble)
        if timeout is None:
            timeout = self.settings.exchange_timeout(len(wire), OVERHEAD + reply_len)
        match = _reply_matcher(request)
        held = self._holder is not None and self._holder is asyncio.current_task()
        attempt = 0
        while True:
            attempt += 1
            async with nullcontext() if held else self._lock:
                await self.open()  # a line that cannot be opened is not tried again here (a connect takes seconds)
                try:
                    return await self._attempt(wire, expect_reply, timeout, match)
                except Dlt645LinkError:
                    if attempt > retries:
                        raise
                except asyncio.TimeoutError:
                    if attempt > retries:
                        raise Dlt645Timeout(
                            f"no reply from {request.address} on {self.name} to function "
                            f"{request.control:02X} within {timeout:.2f}s ({attempt} attempt(s))") from None
                    log.debug("timeout from %s on %s, retry %d", request.address, self.name, attempt)

    async def _attempt(self, wire: bytes, expect_reply: bool, timeout: float,
                       match: Callable[[Frame], bool]) -> Frame | None:
        """One try, the bus ours and open: the frame out, then its reply, or TimeoutError, or a lost link
        (closed here, reopened by the next try)."""
        self._dispose_pending()
        self.stats.exchanges += 1
        loop = asyncio.get_running_loop()
        if not expect_reply:
            self._protocol.transport.write(wire)
            # a broadcast occupies the line; the next request waits for it to drain
            await asyncio.sleep(len(wire) * self.settings.bits_per_char / self.settings.baud)
            return None
        self._waiter = waiter = loop.create_future()
        self._match = match
        self._protocol.transport.write(wire)
        # one future and one timer per exchange (wait_for(shield(...)) made two more tasks' worth of
        # futures and callbacks: a fifth of the client's time at thousands of exchanges a second)
        timer = loop.call_at(loop.time() + timeout, _expire, waiter)
        try:
            return await waiter
        except Dlt645LinkError:
            await self.close()
            raise
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            self._on_events(self.deframer.flush())
            raise
        finally:
            timer.cancel()
            self._waiter = None
            self._match = None

    # -- callbacks from the protocol -----------------------------------------------

    def _dispose_pending(self) -> None:
        if self.deframer.pending:
            self._on_events(self.deframer.flush())

    def _on_events(self, events) -> None:
        for ev in events:
            if type(ev) is FrameReceived:
                waiter = self._waiter
                if waiter is not None and not waiter.done() and self._match(ev.frame):
                    waiter.set_result(ev.frame)
                elif ev.frame.control & DIR_REPLY:
                    self.stats.stray_frames += 1
                    log.debug("stray frame on %s: %s", self.name, ev.raw.hex())
                # our own request echoed by a half-duplex adapter: ignore silently
            elif type(ev) is FrameRejected:
                self.stats.frames_rejected += 1
                self.stats.rejected_reasons[ev.reason] = self.stats.rejected_reasons.get(ev.reason, 0) + 1
                log.debug("rejected frame on %s: %s", self.name, ev.message)
            elif type(ev) is Noise:
                self.stats.noise_bytes += len(ev.data)

    def _on_lost(self, exc) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(Dlt645LinkError(f"{self.name} closed: {exc or 'by peer'}", written=True))


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


def _reply_matcher(request: Frame) -> Callable[[Frame], bool]:
    want_fn = request.control & 0x1F
    pattern = request.address

    def match(reply: Frame) -> bool:
        return (reply.control & DIR_REPLY and (reply.control & 0x1F) == want_fn
                and address_matches(pattern, reply.address))

    return match


class Dlt645Client:
    """Meter operations over a link: read, read address, write, relay control, time sync."""

    def __init__(self, link: Dlt645Link, edition: Edition = Edition.DLT645_2007,
                 password: str = "000000", password_level: int = 2, operator: str = "00000000") -> None:
        self.link = link
        self.edition = edition
        self.password = password
        self.password_level = password_level
        self.operator = operator

    async def _ask(self, request, *, reply_len: int = 64, retries: int | None = None,
                   expect: type | tuple = object) -> m.Message:
        frame = await self.link.exchange(request.frame(), reply_len=reply_len,
                                         retries=self.link.settings.retries if retries is None else retries)
        try:
            reply = m.parse(frame, self.edition)
        except m.MessageError as exc:
            raise Dlt645BadReply(f"malformed reply from {frame.address} on {self.link.name}: {exc}") from None
        if isinstance(reply, m.AbnormalReply):
            raise Dlt645Refused(reply)
        if not isinstance(reply, expect):
            raise Dlt645BadReply(f"unexpected {type(reply).__name__} from {frame.address} on {self.link.name} "
                                 f"to function {request.frame().control:02X}")
        return reply

    async def read_raw(self, address: str, di: int, *, retries: int | None = None) -> bytes:
        """Read one DI; follow-up frames are requested and joined. ``retries``: the link's setting unless given."""
        reply = await self._ask(m.ReadRequest(address, di, self.edition), expect=m.ReadReply, retries=retries)
        payload = reply.payload
        seq = 0
        while reply.followup:
            seq += 1
            reply = await self._ask(m.ReadFollowupRequest(address, di, seq, self.edition), expect=m.ReadReply,
                                    retries=retries)
            payload += reply.payload
        return payload

    async def read(self, address: str, di: int, *, retries: int | None = None) -> Value:
        return decode_value(di, await self.read_raw(address, di, retries=retries), self.edition)

    async def read_address(self) -> str:
        """Ask whoever is on the bus for its address (only meaningful with one meter on the line)."""
        reply = await self._ask(m.ReadAddressRequest(), expect=m.ReadAddressReply)
        return reply.address

    async def write(self, address: str, di: int, payload: bytes, *, retries: int = 0) -> None:
        await self._ask(m.WriteRequest(address, di, payload, self.password, self.password_level, self.operator),
                        reply_len=1, retries=retries, expect=m.Ack)

    async def relay(self, address: str, action: RelayAction, *, valid_for: timedelta = timedelta(minutes=10),
                    now: datetime | None = None, valid_until: datetime | None = None, retries: int = 0) -> None:
        """Send a relay-control command. It only says the meter accepted it: confirm by reading status word 3.

        Commands are not retried by default: after a timeout the outcome is
        unknown and the caller reads the relay back before deciding anything.
        """
        if valid_until is None:
            valid_until = (now or datetime.now()).replace(microsecond=0) + valid_for
        await self._ask(m.RelayControlRequest(address, RelayAction(action), valid_until, self.password,
                                              self.password_level, self.operator), reply_len=1, retries=retries,
                        expect=m.Ack)

    async def relay_state(self, address: str) -> dict:
        """Status word 3 decoded: ``relay`` is the contact ('open'/'closed'), plus keep-power and alarm bits."""
        return (await self.read(address, 0x04000503)).value

    async def broadcast_time(self, when: datetime) -> None:
        await self.link.exchange(m.BroadcastTime(when.replace(microsecond=0), BROADCAST_ADDRESS).frame(),
                                 expect_reply=False)

    async def freeze(self, address: str, **when: int) -> None:
        await self._ask(m.FreezeRequest(address, **when), reply_len=1, retries=0, expect=m.Ack)

    async def change_baud(self, address: str, baud: int) -> None:
        await self._ask(m.ChangeBaudRequest(address, baud), reply_len=1, retries=0, expect=m.ChangeBaudReply)


__all__ = ["Dlt645Client", "Dlt645Link", "LinkSettings", "LinkStats", "Dlt645Error", "Dlt645Timeout",
           "Dlt645Refused", "Dlt645LinkError", "Dlt645BadReply"]
