"""A simulated MQTT concentrator (or 4G DTU): one MQTT connection, a simulated RS-485 bus of many meters.

Contract: :mod:`protocols.mqtt.concentrator`. The meters are :class:`simulators.dlt645.SimMeter` on a
:class:`simulators.dlt645.SimBus`, so fault injection (no reply, late reply, corrupt checksum, wrong address,
abnormal reply, acknowledgement instead of data, stuck relay, slow relay) is the serial simulator's:

* ``frame`` mode: each ``down/frame`` goes onto the SimBus as bytes; whatever the bus puts on the line goes
  back on ``up/frame`` with the request's id, when the line carries it (a late reply comes late).
* ``json`` mode: the concentrator is the bus master. For each command it sends DL/T 645 frames to the
  SimBus, waits for the reply up to its own bus timeout (retrying like a real concentrator), decodes it and
  answers with a typed response. A repeated command id gets the first answer again and is not executed twice.

Status: on connect it publishes ``online`` retained, with a last will ``offline`` retained for the same
session. :meth:`stop` says goodbye (``offline``, then DISCONNECT); :meth:`kill` drops the TCP connection
without a word, so the broker publishes the last will. A concentrator that sees its status topic say offline
for another session while it is connected says ``online`` again (an old session's will came late).

Usable in-process (tests, demos): ``await sim.start()`` ... ``await sim.stop()``.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

import aiomqtt

from protocols.dlt645 import di as di_table
from protocols.dlt645 import messages as m
from protocols.dlt645.codes import RelayAction
from protocols.dlt645.deframer import Deframer, FrameReceived
from protocols.dlt645.di import decode_value
from protocols.dlt645.formats import FormatError
from protocols.dlt645.frame import DIR_REPLY, address_matches, encode_frame
from protocols.mqtt import concentrator as contract
from simulators.dlt645.bus import SimBus
from simulators.dlt645.meter import SimMeter

log = logging.getLogger(__name__)

_ACTIONS = {"trip": RelayAction.TRIP, "direct_close": RelayAction.DIRECT_CLOSE,
            "close_allowed": RelayAction.CLOSE_ALLOWED}


@dataclass
class SimConcentratorStats:
    connects: int = 0
    frames_in: int = 0
    frames_out: int = 0
    commands: int = 0
    responses: int = 0
    duplicates: int = 0  # a request id seen before: not executed again
    expired: int = 0
    malformed: int = 0


class _NoAnswer(Exception):
    pass


class SimConcentrator:
    def __init__(self, cid: str, bus: SimBus, host: str, port: int, *, mode: contract.Mode = "frame",
                 utc_offset_s: int = 8 * 3600, bus_timeout_s: float = 0.5, bus_retries: int = 1,
                 password: str = "000000", operator: str = "00000000", keepalive_s: int = 30) -> None:
        if mode not in ("frame", "json"):
            raise ValueError(f"mode must be 'frame' or 'json', not {mode!r}")
        contract.topic(cid, contract.STATUS)  # validates the id
        self.cid, self.bus, self.host, self.port, self.mode = cid, bus, host, port, mode
        self.zone = timezone(timedelta(seconds=utc_offset_s))
        self.bus_timeout_s, self.bus_retries = bus_timeout_s, bus_retries
        self.password, self.operator = password, operator
        self.keepalive_s = keepalive_s
        self.stats = SimConcentratorStats()
        self.session = ""
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._killed = False
        self._up: asyncio.Event | None = None
        self._seen: OrderedDict[str, contract.Response | None] = OrderedDict()  # request id -> answer (json)
        self._commands: asyncio.Queue | None = None
        self._line_in = Deframer()  # the master's bytes as the bus hears them (frame mode)

    @classmethod
    def of(cls, cid: str, meters: Iterable[SimMeter], host: str, port: int, *,
           clock: Callable[[], datetime] = datetime.now, turnaround_s: float = 0.0, baud: int | None = None,
           **kwargs) -> "SimConcentrator":
        """A concentrator serving ``meters`` on one simulated bus keeping the meters' (local) ``clock``."""
        return cls(cid, SimBus.of(meters, clock=clock, turnaround_s=turnaround_s, baud=baud), host, port, **kwargs)

    @property
    def meters(self) -> dict[str, SimMeter]:
        return self.bus.meters

    @property
    def connected(self) -> bool:
        return self._client is not None

    # -- life ---------------------------------------------------------------------------------------------
    async def start(self, timeout: float = 10.0) -> "SimConcentrator":
        """Connect, say online (retained), serve; returns once online. Reconnects by itself if the broker
        goes away, until :meth:`stop` or :meth:`kill`."""
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"concentrator {self.cid} is already running")
        self._stopping = self._killed = False
        self._up = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"sim-concentrator-{self.cid}")
        up = asyncio.ensure_future(self._up.wait())
        await asyncio.wait([up, self._task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        if self._task.done():
            self._task.result()  # raises what stopped it
        if not self._up.is_set():
            await self._end()
            raise TimeoutError(f"concentrator {self.cid} could not connect to {self.host}:{self.port}")
        return self

    async def stop(self) -> None:
        """Graceful: ``offline`` retained, then DISCONNECT (the broker discards the will)."""
        self._stopping = True
        client = self._client
        if client is not None:
            try:
                await client.publish(contract.topic(self.cid, contract.STATUS),
                                     contract.encode(contract.Status("offline", self.session, self.mode, _now())),
                                     qos=1, retain=True)
            except aiomqtt.MqttError as exc:
                log.warning("concentrator %s: could not say goodbye: %s", self.cid, exc)
        await self._end()

    async def kill(self) -> None:
        """The connection dies without a word (power cut, 4G gone): the broker publishes the last will."""
        self._stopping = self._killed = True
        client = self._client
        # aiomqtt 2 has no abort: shut the socket under paho (the broker sees the TCP connection end)
        sock = client._client.socket() if client is not None else None  # noqa: SLF001
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        await self._end()

    async def _end(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            if not task.done() and not self._killed:
                task.cancel()
            try:
                await asyncio.wait_for(task, 10)
            except (asyncio.CancelledError, aiomqtt.MqttError):
                pass
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                if self._stopping:
                    return
                log.info("concentrator %s: connection lost (%s); reconnecting", self.cid, exc)
                await asyncio.sleep(0.2)

    async def _session(self) -> None:
        self.session = uuid.uuid4().hex[:12]
        status = contract.topic(self.cid, contract.STATUS)
        will = aiomqtt.Will(status, contract.encode(contract.Status("offline", self.session, self.mode)), qos=1,
                            retain=True)
        client = aiomqtt.Client(self.host, self.port, identifier=f"sim-concentrator-{self.cid}", will=will,
                                clean_session=True, keepalive=self.keepalive_s,
                                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        worker = None
        try:
            async with client:
                self._client = client
                self._line_in = Deframer()
                await client.subscribe([(contract.topic(self.cid, contract.DOWN_FRAME), 1),
                                        (contract.topic(self.cid, contract.DOWN_CMD), 1), (status, 1)])
                await self._say_online(client)
                self.stats.connects += 1
                self._up.set()
                if self.mode == "json":
                    self._commands = asyncio.Queue()
                    worker = asyncio.create_task(self._json_worker(client))
                async for msg in client.messages:
                    payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload or "").encode()
                    self._on_message(client, msg.topic.value, payload)
        finally:
            self._client = None
            if worker is not None:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)

    async def _say_online(self, client: aiomqtt.Client) -> None:
        await client.publish(contract.topic(self.cid, contract.STATUS),
                             contract.encode(contract.Status("online", self.session, self.mode, _now(),
                                                             len(self.bus.meters), "feikong-sim/1")),
                             qos=1, retain=True)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, client: aiomqtt.Client, kind: str, payload: bytes) -> None:
        try:
            await client.publish(contract.topic(self.cid, kind), payload, qos=1)
        except aiomqtt.MqttError as exc:
            log.info("concentrator %s: could not publish %s: %s", self.cid, kind, exc)

    # -- in -----------------------------------------------------------------------------------------------
    def _on_message(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        parsed = contract.parse_topic(topic)
        if parsed is None:
            return
        kind = parsed[1]
        try:
            if kind == contract.STATUS:
                st = contract.decode_status(payload) if payload else None
                if st is None or (st.state == "offline" and st.session != self.session):
                    log.info("concentrator %s: my status says offline (session %s): online again", self.cid,
                             st.session if st else "-")
                    self._spawn(self._say_online(client))
            elif kind == contract.DOWN_FRAME:
                self._on_frame(client, contract.decode_frame_down(payload))
            elif kind == contract.DOWN_CMD:
                self._on_command(client, contract.decode_command(payload))
        except contract.PayloadError as exc:
            self.stats.malformed += 1
            log.warning("concentrator %s: dropped a malformed %s: %s", self.cid, kind, exc)

    def _first_time(self, rid: str) -> bool:
        if rid in self._seen:
            self.stats.duplicates += 1
            return False
        self._seen[rid] = None
        while len(self._seen) > 2000:
            self._seen.popitem(last=False)
        return True

    def _on_frame(self, client: aiomqtt.Client, msg: contract.FrameDown) -> None:
        self.stats.frames_in += 1
        if not self._first_time(msg.id):
            return  # a QoS 1 duplicate: the bus has heard it once
        if msg.expires_at is not None and msg.expires_at < _now():
            self.stats.expired += 1
            return
        loop = asyncio.get_running_loop()
        for seq, t in enumerate(self.bus.receive(bytes.fromhex(msg.hex), loop.time(), self._line_in)):
            up = contract.encode(contract.frame_up(msg.id, t.data, seq))
            loop.call_at(t.at, self._frame_out, client, up)

    def _frame_out(self, client: aiomqtt.Client, payload: bytes) -> None:
        if self._client is client:
            self.stats.frames_out += 1
            self._spawn(self._publish(client, contract.UP_FRAME, payload))

    def _on_command(self, client: aiomqtt.Client, cmd: contract.Command) -> None:
        self.stats.commands += 1
        if self.mode != "json":
            self.stats.malformed += 1
            log.warning("concentrator %s is in frame mode: command %s ignored", self.cid, cmd.id)
            return
        answer = self._seen.get(cmd.id)
        if cmd.id in self._seen:
            self.stats.duplicates += 1
            if answer is not None:  # answered before: the same answer again, nothing done twice
                self._spawn(self._publish(client, contract.UP_RESP, contract.encode(answer)))
            return
        self._first_time(cmd.id)
        self._commands.put_nowait(cmd)

    # -- json mode: the concentrator as bus master -------------------------------------------------------------
    async def _json_worker(self, client: aiomqtt.Client) -> None:
        while True:
            cmd = await self._commands.get()
            try:
                resp = await self._execute(cmd)
            except Exception as exc:  # a simulator bug must show, but not kill the concentrator
                log.exception("concentrator %s: command %s failed", self.cid, cmd.id)
                resp = contract.Response(cmd.id, "bad_reply", detail=f"{type(exc).__name__}: {exc}"[:500])
            if cmd.id in self._seen:
                self._seen[cmd.id] = resp
            self.stats.responses += 1
            await self._publish(client, contract.UP_RESP, contract.encode(resp))

    async def _execute(self, cmd: contract.Command) -> contract.Response:
        if cmd.expires_at is not None and cmd.expires_at < _now():
            self.stats.expired += 1
            return contract.Response(cmd.id, "rejected", detail="expired before it could be executed")
        if cmd.meter not in self.bus.meters:
            return contract.Response(cmd.id, "rejected", detail=f"meter {cmd.meter} is not on this concentrator")
        if isinstance(cmd, contract.RelayCommand):
            return await self._relay(cmd)
        return await self._read(cmd)

    async def _relay(self, cmd: contract.RelayCommand) -> contract.Response:
        valid_until = cmd.valid_until.astimezone(self.zone).replace(tzinfo=None, microsecond=0)
        request = m.RelayControlRequest(cmd.meter, _ACTIONS[cmd.action], valid_until, self.password, 2,
                                        self.operator)
        try:
            reply = await self._exchange(request, retries=0)  # a command is never repeated blindly
        except _NoAnswer as exc:
            return contract.Response(cmd.id, "no_answer", detail=str(exc))
        if isinstance(reply, m.AbnormalReply):
            return contract.Response(cmd.id, "refused", error_words=list(reply.errors),
                                     detail=f"error word {reply.error_word:02X}")
        if isinstance(reply, m.Ack):
            return contract.Response(cmd.id, "ok")
        return contract.Response(cmd.id, "bad_reply", detail=f"{type(reply).__name__} to a relay command")

    async def _read(self, cmd: contract.ReadCommand) -> contract.Response:
        values: dict = {}
        errors: dict[str, str] = {}
        words: list[str] = []
        for n, item in enumerate(cmd.items):
            di = di_table.by_name(item).di
            try:
                reply = await self._exchange(m.ReadRequest(cmd.meter, di))
                payload = b""
                while True:
                    if isinstance(reply, m.AbnormalReply):
                        raise _Refused(reply)
                    if not isinstance(reply, m.ReadReply) or reply.di != di:
                        raise ValueError(f"{type(reply).__name__} to a read of {item}")
                    payload += reply.payload
                    if not reply.followup:
                        break
                    reply = await self._exchange(m.ReadFollowupRequest(cmd.meter, di, (reply.seq or 0) + 1))
                values[item] = decode_value(di, payload).value
            except _NoAnswer as exc:
                # like a head-end poller: a meter that did not answer is not asked the rest this time
                if not values:
                    return contract.Response(cmd.id, "no_answer", detail=str(exc))
                for rest in cmd.items[n:]:
                    errors[rest] = f"no answer: {exc}" if rest == item else "skipped: the meter did not answer"
                break
            except _Refused as exc:
                words += [w for w in exc.reply.errors if w not in words]
                errors[item] = f"refused: {', '.join(exc.reply.errors) or 'no reason given'}"
            except (ValueError, FormatError, m.MessageError) as exc:
                errors[item] = f"bad reply: {exc}"[:500]
        if not values:
            status = "refused" if words else "bad_reply"
            return contract.Response(cmd.id, status, errors=errors, error_words=words,
                                     detail="; ".join(sorted(set(errors.values())))[:500])
        return contract.Response(cmd.id, "ok", contract.items_to_values(values), errors)

    async def _exchange(self, request, retries: int | None = None) -> m.Message:
        """One request on the simulated bus and its reply, as a real master does it: the reply must come
        within the bus timeout and match the request (address, function, checksum); retried on silence."""
        frame = request.frame()
        wire = encode_frame(frame.address, frame.control, frame.data, self.bus.preamble)
        fn = frame.control & 0x1F
        loop = asyncio.get_running_loop()
        why = "silence"
        tries = 1 + (self.bus_retries if retries is None else retries)
        for _ in range(tries):
            start = loop.time()
            deadline = start + self.bus_timeout_s
            line = Deframer()
            for t in sorted(self.bus.receive(wire, start, Deframer()), key=lambda t: t.at):
                if t.at > deadline:
                    why = "a reply came after the bus timeout"
                    break
                await asyncio.sleep(max(0.0, t.at - loop.time()))
                for ev in line.feed(t.data):
                    if type(ev) is FrameReceived:
                        f = ev.frame
                        if f.control & DIR_REPLY and (f.control & 0x1F) == fn and address_matches(frame.address,
                                                                                                  f.address):
                            return m.parse(f)
                        why = f"a reply from {f.address} to function {f.control & 0x1F:02X}"
                    else:
                        why = f"a garbled reply ({type(ev).__name__})"
            await asyncio.sleep(max(0.0, deadline - loop.time()))
        raise _NoAnswer(f"meter {frame.address}: no valid reply within {self.bus_timeout_s:.2f}s "
                        f"({tries} tries; last: {why})")


class _Refused(Exception):
    def __init__(self, reply: m.AbnormalReply) -> None:
        super().__init__(str(reply.errors))
        self.reply = reply


def _now() -> datetime:
    return datetime.now(timezone.utc)
