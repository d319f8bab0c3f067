"""MQTT concentrators and 4G DTUs: one broker connection per gateway, one channel per concentrator.

Contract (topics, payloads): :mod:`protocols.mqtt.concentrator`; operator's view: docs/concentrators.md.

* :class:`ConcentratorHub` is the gateway's one MQTT connection for all its concentrators: it follows each
  concentrator's retained status (online with a session id; the last will says offline for that session),
  routes replies to whoever waits for them, and drops what nobody waits for (duplicates from QoS 1, late
  replies, replies from before a restart) and what does not follow the contract (logged with the reason).
* :meth:`ConcentratorHub.frame_channel` (transparent mode) is a DL/T 645 bus whose "wire" is MQTT: a
  :class:`Dlt645Link` with an opener whose transport publishes each request frame and feeds the
  concentrator's replies back to the link. The DL/T 645 client, the poller and the relay driver work
  unchanged, with their timeouts, reply matching and error semantics.
* :class:`JsonChannel` (JSON mode) sends typed commands (read items, relay control) and takes typed answers;
  :class:`JsonRelayDriver` maps them to the executor's errors like the DL/T 645 driver does.

Offline: a concentrator whose status says offline (its last will, or its own goodbye), or any concentrator
while the gateway is not connected to the broker, is unreachable: every exchange fails at once as a link
that could not be opened (nothing sent), so relay commands back off and retry through the command machine
(each attempt counts against the retry budget, and a failing close reaches a field crew) instead of
blocking the executor. A request in flight when its concentrator goes offline fails as a lost link after
writing (outcome unknown: the command machine reads the relay back before sending again).

aiomqtt (2.x) is used in :class:`_Mqtt` only: aiomqtt 3 is a rewrite.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Awaitable, Callable, Sequence

import aiomqtt

from gateway.core.commands import ReconnectMode, RelayAction, RelayStatus
from gateway.core.readings import Reading
from protocols.dlt645.client import Dlt645Link, LinkSettings
from protocols.mqtt import concentrator as contract

from .channel import Line, read_each
from .dlt645 import Bus
from .poller import DEFAULT_ITEMS
from .relay import (RelayDriverError, RelayLinkDown, RelayNoAnswer, RelayRefused,
                    status_from_word)

log = logging.getLogger(__name__)

#: Transparent mode over MQTT: the concentrator's RS-485 line (2400 8E1, 500 ms meter turnaround) plus two
#: broker hops each way and a 4G link: ``margin_s`` carries the network. One retry for reads (a late reply
#: to the first try is dropped as stale, not taken for the second's).
FRAME_LINK_SETTINGS = LinkSettings(baud=2400, parity="E", turnaround_s=0.5, margin_s=2.0, retries=1)


def channel_name(cid: str) -> str:
    """The bus name meters behind concentrator ``cid`` are configured with (``Meter.channel``)."""
    return f"mqtt://{cid}"


# --------------------------------------------------------------------------- errors


class ConcentratorError(Exception):
    """``written``: the request may have reached the concentrator (its outcome is unknown)."""

    written = True


class ConcentratorUnreachable(ConcentratorError, ConnectionError):
    """Offline, never heard of, or the gateway is not connected to the broker: nothing was sent. (A
    ConnectionError, so a :class:`Dlt645Link` reports it as a link that could not be opened.)"""

    written = False


class ConcentratorLost(ConcentratorError):
    """The concentrator (or the broker connection) went away while a request was out."""


class ConcentratorTimeout(ConcentratorError):
    """No response in time."""


class ConcentratorBadResponse(ConcentratorError):
    """A response to our request that does not follow the contract."""


# --------------------------------------------------------------------------- settings and state


@dataclass(frozen=True)
class HubSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    #: stable and unique per gateway instance (two gateways with one id throw each other off the broker)
    client_id: str = "feikong-gw1-south"
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    #: how long a QoS 1 publish may wait for the broker's PUBACK
    publish_timeout_s: float = 5.0
    #: a concentrator not heard of yet (just after connecting, its retained status on the way): wait this
    #: long for its status before calling it unreachable
    status_wait_s: float = 2.0
    #: requests carry ``expires_at`` = now + this: a concentrator does not act on one delivered later
    #: (a persistent session kept it while it was away). Wall-clock time: keep concentrator clocks in sync.
    request_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.client_id or any(c in self.client_id for c in "/#+ "):
            raise ValueError(f"client_id {self.client_id!r} must be non-empty, without '/', '#', '+' or spaces")


@dataclass
class ConcentratorState:
    cid: str
    online: bool | None = None  # None: not heard of since the gateway (re)connected to the broker
    session: str = ""
    mode: str | None = None
    meters: int | None = None
    changed_at: float | None = None  # wall clock of the last status that counted

    def describe(self) -> str:
        if self.online is None:
            return f"concentrator {self.cid}: no status heard"
        when = "" if self.changed_at is None else time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(self.changed_at))
        return f"concentrator {self.cid} is {'online' if self.online else 'offline'}{when}"


@dataclass
class HubStats:
    published: int = 0
    received: int = 0
    malformed: int = 0  # did not follow the contract: logged and dropped
    stale: int = 0  # a reply nobody waits for (late, or from before a restart)
    duplicates: int = 0
    stale_offline: int = 0  # a last will of an old session, arriving after the new one came online
    connects: int = 0
    malformed_reasons: list[str] = field(default_factory=list)  # the last few, for an operator


# --------------------------------------------------------------------------- the MQTT adapter


#: publishes awaiting the broker's PUBACK past which aiomqtt logs a warning (its default is 10)
PENDING_PUBLISHES_WARNING = 2000


class _Handoff(asyncio.Queue):
    """aiomqtt's incoming-message queue (its ``queue_type``) that hands each message to ``deliver`` as paho
    reads it, on the loop. Through aiomqtt's own queue, each message cost a task and an ``asyncio.wait``
    (two or three loop iterations, one message after the other): with the loop busy polling 88 TCP buses,
    concentrator replies waited 26-271 ms (median) in that queue, most of a close's time on a concentrator."""

    def __init__(self, deliver: Callable[[str, bytes], None], maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._deliver = deliver

    def put_nowait(self, m: aiomqtt.Message) -> None:
        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload or "").encode()
        self._deliver(m.topic.value, payload)


class _Mqtt:
    """The one place aiomqtt (2.x) is used: connect, subscribe, publish at QoS 1; what arrives goes to
    ``deliver(topic, payload)`` as it is read (which must not raise)."""

    def __init__(self, s: HubSettings, deliver: Callable[[str, bytes], None]) -> None:
        self._client = aiomqtt.Client(s.host, s.port, identifier=s.client_id, username=s.username,
                                      password=s.password, keepalive=s.keepalive_s, clean_session=True,
                                      timeout=s.publish_timeout_s,
                                      queue_type=functools.partial(_Handoff, deliver),
                                      # small request/response messages: Nagle's algorithm with delayed
                                      # ACKs costs ~40 ms per hop on an idle connection
                                      socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        # aiomqtt warns (on every publish) past 10 publishes awaiting their PUBACK; a hub has up to one
        # request out per concentrator it serves, hundreds at scale: warn only when far past that
        self._client.pending_calls_threshold = PENDING_PUBLISHES_WARNING

    async def __aenter__(self) -> "_Mqtt":
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.__aexit__(*exc)

    async def subscribe(self, topics: Sequence[str]) -> None:
        await self._client.subscribe([(t, 1) for t in topics])

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        await self._client.publish(topic, payload, qos=1, retain=retain)

    async def until_disconnected(self) -> None:
        """Returns never: raises :class:`MqttError` when the connection is lost (messages go to
        ``deliver``, so the iterator waits only for that)."""
        async for _ in self._client.messages:
            raise AssertionError("a message reached aiomqtt's iterator past the hand-off")


MqttError = aiomqtt.MqttError


# --------------------------------------------------------------------------- the hub


class ConcentratorHub:
    """The gateway's MQTT connection to all its concentrators (reconnects by itself)."""

    def __init__(self, settings: HubSettings | None = None) -> None:
        self.settings = settings or HubSettings()
        self.stats = HubStats()
        self.states: dict[str, ConcentratorState] = {}
        self._mqtt: _Mqtt | None = None
        self._connected = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._waiters: dict[str, tuple[str, asyncio.Future]] = {}  # request id -> (cid, future)
        self._frames: dict[str, _FrameTransport] = {}  # cid -> the transparent link's transport
        # ids unique across restarts: a reply to a request of an earlier run never matches one of this run
        self._prefix = uuid.uuid4().hex[:10]
        self._seq = itertools.count(1)
        self._closing = False

    # -- life ---------------------------------------------------------------------------------------------
    async def start(self, wait_s: float = 5.0) -> "ConcentratorHub":
        """Start connecting; return once connected (or after ``wait_s``: it keeps trying in the background)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="concentrator-hub")
        try:
            await asyncio.wait_for(self._until(lambda: self._connected), wait_s)
        except asyncio.TimeoutError:
            log.warning("concentrator hub: not connected to %s:%d yet; retrying in the background",
                        self.settings.host, self.settings.port)
        return self

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._lost_all(ConcentratorLost("the concentrator hub closed"))

    async def __aenter__(self) -> "ConcentratorHub":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected

    def frame_channel(self, cid: str, meters: Sequence[str], settings: LinkSettings | None = None,
                      items: Sequence[str] = DEFAULT_ITEMS, name: str | None = None) -> Bus:
        """Transparent mode: DL/T 645 end to end, the concentrator's bus behind MQTT. The same channel as a
        serial line (poller, client, relay driver); only the link's opener differs. ``name``: the bus name
        meters are configured with (default :func:`channel_name`)."""
        link = Dlt645Link(self.frame_opener(cid), settings or FRAME_LINK_SETTINGS, name or channel_name(cid), "mqtt")
        return Bus(link, list(meters), items)

    def json_channel(self, cid: str, meters: Sequence[str], *, read_timeout_s: float = 10.0,
                     relay_timeout_s: float = 10.0, items: Sequence[str] = DEFAULT_ITEMS,
                     name: str | None = None) -> "JsonChannel":
        return JsonChannel(self, cid, meters, read_timeout_s=read_timeout_s, relay_timeout_s=relay_timeout_s,
                           items=items, name=name)

    async def _run(self) -> None:
        delay = self.settings.reconnect_min_s
        s = self.settings
        while not self._closing:
            try:
                async with _Mqtt(s, self._dispatch) as mqtt:
                    await mqtt.subscribe(contract.GATEWAY_SUBSCRIPTIONS)
                    self._mqtt, self._connected = mqtt, True
                    self.stats.connects += 1
                    delay = s.reconnect_min_s
                    log.info("concentrator hub connected to %s:%d as %s", s.host, s.port, s.client_id)
                    self._notify()
                    await mqtt.until_disconnected()
            except MqttError as exc:
                if not self._closing:
                    log.warning("concentrator hub: broker connection %s:%d: %s; again in %.1fs", s.host, s.port,
                                exc, delay)
            finally:
                was = self._connected
                self._mqtt, self._connected = None, False
                if was:
                    # nothing is reachable through a broker we are not connected to; statuses come again
                    # (retained) when we are back
                    self._lost_all(ConcentratorLost("the gateway lost its broker connection"))
                    for st in self.states.values():
                        st.online = None
                    self._notify()
            if self._closing:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.reconnect_max_s)

    # -- state --------------------------------------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await self._changed.wait()

    def state(self, cid: str) -> ConcentratorState:
        return self.states.setdefault(cid, ConcentratorState(cid))

    def online(self, cid: str) -> bool:
        return self._connected and self.state(cid).online is True

    async def wait_state(self, cid: str, online: bool, timeout: float) -> None:
        """Until the gateway sees ``cid`` online (or offline); asyncio.TimeoutError after ``timeout``."""
        await asyncio.wait_for(self._until(lambda: self.online(cid) == online), timeout)

    async def _reachable(self, cid: str) -> None:
        """Return if ``cid`` can be asked now; raise :class:`ConcentratorUnreachable` at once if it is known to
        be offline, after a short wait for a status never heard."""
        st = self.state(cid)
        if self._connected and st.online is None:
            try:
                await asyncio.wait_for(self._until(lambda: not self._connected or st.online is not None),
                                       self.settings.status_wait_s)
            except asyncio.TimeoutError:
                pass
        if not self._connected:
            raise ConcentratorUnreachable(f"concentrator {cid}: the gateway is not connected to the broker")
        if st.online is not True:
            raise ConcentratorUnreachable(st.describe())

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._seq)}"

    def expires_at(self) -> datetime:
        return contract.instant(time.time() + self.settings.request_ttl_s)

    # -- out ----------------------------------------------------------------------------------------------
    async def publish(self, cid: str, kind: str, payload: bytes) -> None:
        """QoS 1, waiting for the broker's PUBACK. Unreachable (nothing sent) when not connected; lost (may
        have reached the broker) when the publish fails after it was handed to the connection."""
        mqtt = self._mqtt
        if mqtt is None:
            raise ConcentratorUnreachable(f"concentrator {cid}: the gateway is not connected to the broker")
        try:
            await mqtt.publish(contract.topic(cid, kind), payload)
        except MqttError as exc:
            raise ConcentratorLost(f"concentrator {cid}: publish failed: {exc}") from None
        self.stats.published += 1

    def spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def request(self, cid: str, make: Callable[[str], contract.Command], timeout: float) -> contract.Response:
        """One JSON-mode command and its response."""
        await self._reachable(cid)
        rid = self.new_id()
        command = make(rid)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[rid] = (cid, fut)
        try:
            await self.publish(cid, contract.DOWN_CMD, contract.encode(command))
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                raise ConcentratorTimeout(f"concentrator {cid}: no response to {command.__struct_config__.tag} "
                                          f"{rid} for meter {command.meter} within {timeout:.1f}s") from None
        finally:
            self._waiters.pop(rid, None)
            if not fut.done():
                fut.cancel()

    # -- in -----------------------------------------------------------------------------------------------
    def _malformed(self, cid: str, kind: str, reason: str) -> None:
        self.stats.malformed += 1
        self.stats.malformed_reasons = (self.stats.malformed_reasons + [f"{cid}/{kind}: {reason}"])[-20:]
        log.warning("concentrator %s: dropped a malformed %s message: %s", cid, kind, reason)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        self.stats.received += 1
        parsed = contract.parse_topic(topic)
        if parsed is None:
            self._malformed("?", "topic", f"not a concentrator topic: {topic[:200]!r}")
            return
        cid, kind = parsed
        try:
            if kind == contract.STATUS:
                if not payload:  # a retained status being cleared (a concentrator taken out of service)
                    self._on_status(cid, None)
                else:
                    self._on_status(cid, contract.decode_status(payload))
            elif kind == contract.UP_FRAME:
                self._on_frame(cid, contract.decode_frame_up(payload))
            elif kind == contract.UP_RESP:
                self._on_response(cid, payload)
            # our own down/ messages are not subscribed to; anything else under up/ is not ours to judge
        except contract.PayloadError as exc:
            self._malformed(cid, kind, str(exc))
        except Exception:  # a bug must not stop the hub: log it and go on with the next message
            log.exception("concentrator %s: handling a %s message failed", cid, kind)

    def _on_status(self, cid: str, status: contract.Status | None) -> None:
        st = self.state(cid)
        if status is None:
            st.online, st.session, st.changed_at = False, "", time.time()
            log.info("concentrator %s: status cleared: taken as offline", cid)
        elif status.state == "online":
            was = st.online
            st.online, st.session, st.mode, st.meters = True, status.session, status.mode, status.meters
            st.changed_at = time.time()
            if was is not True:
                log.info("concentrator %s online (session %s, mode %s, %s meters)", cid, status.session,
                         status.mode, status.meters)
        else:
            if st.online and st.session and status.session != st.session:
                self.stats.stale_offline += 1
                log.info("concentrator %s: ignored the last will of old session %s (session %s is online)",
                         cid, status.session, st.session)
                return
            was = st.online
            st.online, st.session, st.changed_at = False, status.session, time.time()
            if was is not False:
                log.warning("concentrator %s offline (session %s)", cid, status.session)
        if not st.online:
            self._lost(cid, ConcentratorLost(f"concentrator {cid} went offline with a request out"))
        self._notify()

    def _lost(self, cid: str, exc: ConcentratorError) -> None:
        for rid, (owner, fut) in list(self._waiters.items()):
            if owner == cid and not fut.done():
                fut.set_exception(exc)
        transport = self._frames.get(cid)
        if transport is not None:
            transport.lose(exc)

    def _lost_all(self, exc: ConcentratorError) -> None:
        for cid in {owner for owner, _ in self._waiters.values()} | set(self._frames):
            self._lost(cid, exc)

    def _on_frame(self, cid: str, msg: contract.FrameUp) -> None:
        transport = self._frames.get(cid)
        if transport is None:
            self.stats.stale += 1
            log.debug("concentrator %s: frame %s with no link open: dropped", cid, msg.id)
            return
        transport.received(msg)

    def _on_response(self, cid: str, payload: bytes) -> None:
        try:
            resp = contract.decode_response(payload)
        except contract.PayloadError as exc:
            rid = contract.salvage_id(payload)
            waiter = self._waiters.get(rid) if rid else None
            if waiter is not None and waiter[0] == cid and not waiter[1].done():
                waiter[1].set_exception(ConcentratorBadResponse(f"concentrator {cid}: {exc}"))
            raise
        waiter = self._waiters.get(resp.id)
        if waiter is None or waiter[0] != cid:
            self.stats.stale += 1
            log.debug("concentrator %s: response %s nobody waits for: dropped", cid, resp.id)
            return
        if waiter[1].done():
            self.stats.duplicates += 1
            return
        waiter[1].set_result(resp)

    # -- transparent mode ---------------------------------------------------------------------------------
    def frame_opener(self, cid: str):
        """A :class:`Dlt645Link` opener whose transport is concentrator ``cid`` over MQTT."""

        async def opener(factory):
            await self._reachable(cid)
            protocol = factory()
            old = self._frames.get(cid)
            if old is not None:
                old.lose(None)
            transport = _FrameTransport(self, cid, protocol)
            self._frames[cid] = transport
            protocol.connection_made(transport)
            return transport, protocol

        return opener


class _FrameTransport(asyncio.Transport):
    """What a :class:`Dlt645Link` writes goes out as one ``down/frame`` with a new id; only pieces of the answer
    to the latest request reach the link, each once."""

    def __init__(self, hub: ConcentratorHub, cid: str, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.hub, self.cid, self.protocol = hub, cid, protocol
        self._current: str | None = None
        self._pieces: set[int] = set()
        self._closing = False

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        rid = self.hub.new_id()
        self._current, self._pieces = rid, set()
        message = contract.encode(contract.frame_down(rid, bytes(data), self.hub.expires_at()))
        self.hub.spawn(self._publish(message))

    async def _publish(self, message: bytes) -> None:
        try:
            await self.hub.publish(self.cid, contract.DOWN_FRAME, message)
        except ConcentratorError as exc:
            self.lose(exc)

    def received(self, msg: contract.FrameUp) -> None:
        if msg.id != self._current:
            self.hub.stats.stale += 1
            log.debug("concentrator %s: frame for %s while waiting for %s: dropped", self.cid, msg.id, self._current)
            return
        if msg.seq in self._pieces:
            self.hub.stats.duplicates += 1
            return
        self._pieces.add(msg.seq)
        if not self._closing:
            self.protocol.data_received(bytes.fromhex(msg.hex))

    def lose(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        if self.hub._frames.get(self.cid) is self:
            del self.hub._frames[self.cid]
        self.protocol.connection_lost(exc)

    def close(self) -> None:
        self.lose(None)

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self.lose(None)


# --------------------------------------------------------------------------- transparent channel


# --------------------------------------------------------------------------- JSON channel


_JSON_ACTIONS = {(RelayAction.TRIP, ReconnectMode.DIRECT): "trip",
                 (RelayAction.TRIP, ReconnectMode.CLOSE_ALLOWED): "trip",
                 (RelayAction.CLOSE, ReconnectMode.DIRECT): "direct_close",
                 (RelayAction.CLOSE, ReconnectMode.CLOSE_ALLOWED): "close_allowed"}


class JsonChannel:
    """JSON mode: the concentrator reads its meters and drives their relays itself; one command at a time."""

    def __init__(self, hub: ConcentratorHub, cid: str, meters: Sequence[str], *, read_timeout_s: float = 10.0,
                 relay_timeout_s: float = 10.0, items: Sequence[str] = DEFAULT_ITEMS, name: str | None = None) -> None:
        unknown = [i for i in items if i not in contract.ITEMS]
        if unknown:
            raise ValueError(f"JSON mode cannot read {unknown}; it reads {list(contract.ITEMS)}")
        self.hub, self.cid = hub, cid
        self.name = name or channel_name(cid)
        self.kind = "concentrator_json"
        self.meters = list(meters)
        self.items = list(items)
        self.read_timeout_s, self.relay_timeout_s = read_timeout_s, relay_timeout_s
        self.path = Line()
        self.clock: Callable[[], datetime] = datetime.now
        self.cycles = 0

    def bind(self, clock, utc_offset_s: int) -> "JsonRelayDriver":
        self.clock = clock
        return JsonRelayDriver(self, utc_offset_s)

    async def ask(self, make: Callable[[str], contract.Command], timeout: float) -> contract.Response:
        async with self.path.reserved():
            return await self.hub.request(self.cid, make, timeout)

    async def read_meter(self, meter: str, items: Sequence[str] | None = None) -> Reading:
        items = list(items or self.items)
        values: dict = {}
        errors: dict[str, str] = {}
        try:
            resp = await self.ask(lambda rid: contract.ReadCommand(rid, meter, items, self.hub.expires_at()),
                                  self.read_timeout_s)
        except ConcentratorError as exc:
            errors = {i: str(exc) for i in items}
        else:
            if resp.status == "ok":
                values = contract.values_to_items(resp.values) if resp.values is not None else {}
                errors = {i: resp.errors.get(i, "not in the response") for i in items if i not in values}
            else:
                why = f"{resp.status}: {', '.join(resp.error_words) or resp.detail or 'no detail'}"
                errors = {i: why for i in items}
        return Reading(meter, self.clock(), self.name, values, errors)

    async def cycle(self, sink) -> None:
        await read_each(self.meters, self.read_meter, sink)
        self.cycles += 1

    async def close(self) -> None:
        """The hub is shared and closed by whoever made it."""


class JsonRelayDriver:
    """Relay control in JSON mode, with the DL/T 645 driver's rules: only a read-back confirms."""

    def __init__(self, channel: JsonChannel, utc_offset_s: int = 8 * 3600) -> None:
        self.channel = channel
        self.name = channel.name
        self.zone = timezone(timedelta(seconds=utc_offset_s))

    def reserved(self):
        return self.channel.path.reserved()

    async def open(self) -> None:
        """Nothing to open per exchange: the broker link is the bridge's."""

    async def send(self, meter_id: str, action: RelayAction, mode: ReconnectMode, valid_until: float) -> None:
        op = _JSON_ACTIONS[(action, mode)]
        deadline = datetime.fromtimestamp(int(valid_until), self.zone)
        ch = self.channel
        try:
            resp = await ch.ask(lambda rid: contract.RelayCommand(rid, meter_id, op, deadline, ch.hub.expires_at()),
                                ch.relay_timeout_s)
        except ConcentratorBadResponse as exc:
            raise RelayNoAnswer(str(exc)) from None
        except ConcentratorTimeout as exc:
            raise RelayNoAnswer(str(exc)) from None
        except ConcentratorError as exc:
            raise RelayLinkDown(str(exc), exc.written) from None
        if resp.status == "ok":
            return
        detail = f"meter {meter_id} via concentrator {ch.cid}: {resp.status}" + (f": {resp.detail}" if resp.detail else "")
        if resp.status == "refused":
            raise RelayRefused(detail, tuple(resp.error_words))
        if resp.status == "rejected":  # the concentrator put nothing on its bus
            raise RelayLinkDown(detail, written=False)
        raise RelayNoAnswer(detail)  # no_answer, bad_reply: the frame may have acted

    async def read(self, meter_id: str) -> RelayStatus:
        ch = self.channel
        try:
            resp = await ch.ask(lambda rid: contract.ReadCommand(rid, meter_id, ["status_word_3"], ch.hub.expires_at()),
                                ch.read_timeout_s)
        except ConcentratorTimeout as exc:
            raise RelayNoAnswer(str(exc)) from None
        except ConcentratorBadResponse as exc:
            raise RelayDriverError(f"meter {meter_id}: unreadable status word 3: {exc}") from None
        except ConcentratorError as exc:
            raise RelayLinkDown(str(exc), exc.written) from None
        detail = f"meter {meter_id} via concentrator {ch.cid}: {resp.status}" + (f": {resp.detail}" if resp.detail else "")
        if resp.status == "refused":
            raise RelayRefused(detail, tuple(resp.error_words))
        if resp.status == "no_answer":
            raise RelayNoAnswer(detail)
        if resp.status == "rejected":
            raise RelayLinkDown(detail, written=False)
        word = resp.values.status_word_3 if resp.values is not None else None
        if resp.status != "ok" or word is None:
            raise RelayDriverError(f"meter {meter_id}: unreadable status word 3: {resp.status} "
                                   f"{resp.errors.get('status_word_3', resp.detail)}".rstrip())
        return status_from_word(contract.values_to_items(resp.values)["status_word_3"])


__all__ = ["ConcentratorHub", "HubSettings", "JsonChannel", "JsonRelayDriver", "channel_name",
           "FRAME_LINK_SETTINGS", "ConcentratorError", "ConcentratorUnreachable", "ConcentratorLost",
           "ConcentratorTimeout", "ConcentratorBadResponse", "ConcentratorState", "HubStats"]
