"""The MQTT bridge to billing, notification and work-order systems (contract: ``protocols.mqtt.billing``).

Inbound, at QoS 1 on a persistent MQTT 5 session (clean start off, a session expiry), so what billing
published while the gateway was down waits at the broker. paho-mqtt with ``manual_ack``: a message is
acknowledged to the broker only after what it carries is committed (a payment with the close it causes), so
a crash at any point loses nothing; a re-delivered payment is a duplicate by its id and is not counted
again. Messages are taken in batches (one transaction per batch: group commit). A message that cannot be
used goes to the dead-letter topic, through the outbox, with the reason and the original payload; it never
stops the consumer. While the store is away nothing is acknowledged and the batch waits; a failure that
persists otherwise is traced to its message, which alone goes to the dead letters (``_handle_until_done``).

Outbound from the outbox, in commit order: published at QoS 1, marked published when the broker has
acknowledged, published again after an outage (consumers de-duplicate on the event id). The gateway's
status is retained at ``feikong/v1/status/<instance>``, with a last will saying "offline".

paho runs on the event loop (``_OnLoop``), with a read-ahead under it (``_ReadAhead``): its callbacks run
there too, between our own steps; only a connection attempt goes to a worker thread.

Several instances (docs/scaling.md): the broker keeps dealing shared messages to the persistent session of an
instance that is down. The instance holding the publisher lease (``gateway.cluster.PUBLISHER``, held only
while its bridge is connected) publishes the outbox and adopts such sessions: it connects with the down
instance's client id, resuming its session, takes it out of the shared group and handles what was queued
there through this same inbound path (:func:`adoptable`, :meth:`BillingBridge._adopt`).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import msgspec
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.core.control import Event, NoticeReceiptIn
from gateway.core.dispatch import FieldStatus, FieldUpdate
from gateway.core.model import Payment
from gateway.core.notices import ReceiptOutcome
from gateway.core.policy import AreaFlag, Forecast
from gateway.core.tariff import tariffs_from_config
from protocols.mqtt import billing as contract

log = logging.getLogger(__name__)

VERSION = "feikong/0.1"
#: a failure that is not the store being away, this many times in a row: the message's own doing
POISON_AFTER = 3
#: a broker session that lasted this long resets the reconnect back-off
STABLE_S = 10.0


@dataclass(frozen=True)
class BrokerConfig:
    """How the gateway reaches its broker (``[mqtt]`` in the gateway config; see config/gateway.example.toml)."""

    host: str = "127.0.0.1"
    port: int = 1883
    #: this gateway instance: its status topic and, prefixed, its MQTT client id; stable across restarts, or
    #: the broker's queued messages for the old session are never delivered
    instance: str = "gw1"
    username: str = ""
    #: a file holding the password (kept out of the config file and out of logs)
    password_file: str = ""
    #: TLS: the CA that signed the broker's certificate; a client certificate and key where the broker asks
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    keepalive_s: int = 30
    #: how long the broker keeps the session (and queues messages) while the gateway is away
    session_expiry_s: int = 7 * 86400
    #: several instances share the inbound load with a shared subscription ($share/<group>/...); "" = none
    shared_group: str = ""
    #: unacknowledged inbound messages the broker may have in flight to us (MQTT 5 receive maximum)
    receive_maximum: int = 2000
    #: most inbound messages committed in one transaction
    batch_max: int = 500
    #: most outbox events published before waiting for the broker's acknowledgements
    publish_batch: int = 500
    publish_ack_timeout_s: float = 10.0
    #: how often an idle publisher looks at the outbox
    publish_idle_s: float = 0.2
    reconnect_max_s: int = 10

    def __post_init__(self) -> None:
        if not self.instance or any(c in self.instance for c in "/#+ "):
            raise ValueError(f"instance {self.instance!r} must be non-empty, without '/', '#', '+' or spaces")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for name in ("receive_maximum", "batch_max", "publish_batch", "session_expiry_s", "keepalive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def client_id(self) -> str:
        return f"feikong-{self.instance}"

    def password(self) -> str | None:
        if not self.password_file:
            return None
        try:
            return Path(self.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"password_file {self.password_file}: cannot read: {exc.strerror}") from None


def make_client(cfg: BrokerConfig) -> "_ReadAhead":
    """The bridge's paho MQTT 5 client: acknowledgements by hand, the config's credentials and TLS."""
    client = _ReadAhead(paho.CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=paho.MQTTv5,
                        manual_ack=True)
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password())
    if cfg.tls_ca_file:
        client.tls_set(ca_certs=cfg.tls_ca_file, certfile=cfg.tls_cert_file or None,
                       keyfile=cfg.tls_key_file or None, cert_reqs=ssl.CERT_REQUIRED)
    client.max_queued_messages_set(0)
    return client


class _ReadAhead(paho.Client):
    """paho reads a packet in three or more recv() calls (its type, each length byte, its body): at
    thousands of messages a second those system calls were the bridge's largest single cost. This reads
    what the socket holds (64 KiB at most) at once and serves paho's small reads from it.

    It overrides paho's private ``_sock_recv`` (paho-mqtt is pinned below 3), and only works with a reader
    that drains :attr:`pending` before it waits on the socket again (``_OnLoop``): bytes held here are no
    longer in the socket for a selector to see."""

    _CHUNK = 65536

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._ahead, self._at, self._ahead_sock = b"", 0, None

    @property
    def pending(self) -> bool:
        return self._at < len(self._ahead)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._sock is not self._ahead_sock:  # a new connection: nothing read on the old one belongs to it
            self._ahead, self._at, self._ahead_sock = b"", 0, self._sock
        if self._at >= len(self._ahead):
            data = super()._sock_recv(self._CHUNK)  # BlockingIOError when there is nothing; b"" when closed
            if len(data) <= bufsize:
                return data
            self._ahead, self._at = data, 0
        out = self._ahead[self._at:self._at + bufsize]
        self._at += len(out)
        return out


def session_properties(cfg: BrokerConfig) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry_s
    props.ReceiveMaximum = min(cfg.receive_maximum, 65535)
    return props


@dataclass
class BridgeStats:
    received: int = 0
    committed: int = 0  # inbound messages whose content is committed (and then acknowledged)
    duplicates: int = 0
    dead_letters: int = 0
    published: int = 0
    publish_refused: int = 0  # events the broker refused to take (they stay in the outbox)
    retries: int = 0  # batches tried again (the store away, or a failure not yet known to be a message's)
    connected: bool = False
    connects: int = 0
    last_error: str = ""
    adoptions: int = 0  # other instances' sessions adopted (several instances: they were down)
    adopted: int = 0  # of those, held now


@dataclass
class _Inbound:
    generation: int  # which connection it came on: an ack belongs to that connection only
    mid: int
    qos: int
    topic: str
    payload: bytes
    item: Any = None  # decoded and converted, or None when it went to the dead letters


@dataclass
class _Run:
    kind: type
    messages: list[_Inbound] = field(default_factory=list)


@dataclass(frozen=True)
class StatusSeen:
    """An instance's last status message heard (``feikong/v1/status/<instance>``, retained)."""

    state: str  # "online" or "offline" (its last will, or a clean stop)
    count: int  # status messages heard for it so far: a new one, a change


@dataclass(frozen=True)
class AdoptionEnded:
    status_count: int  # the instance's StatusSeen.count when our adoption of its session ended
    at: float  # monotonic


def adoptable(members: dict[str, bool], statuses: dict[str, StatusSeen], me: str,
              ended: dict[str, AdoptionEnded], now: float, grace_s: float) -> set[str]:
    """The instances whose MQTT sessions the publisher adopts: members of the cluster (``members``: name ->
    heartbeat fresh) other than this one whose bridge is down (their status says offline) or whose heartbeat
    has stopped. Not one whose adoption by us just ended (most likely its instance came back and took its
    session over) until it says offline again or ``grace_s`` has passed: an instance that is starting
    connects before its first heartbeat, and must not have its session taken back and forth."""
    out = set()
    for name, live in members.items():
        seen = statuses.get(name)
        offline = seen is not None and seen.state == "offline"
        if name == me or (live and not offline):
            continue
        end = ended.get(name)
        if end is not None and now - end.at < grace_s and not (offline and seen.count != end.status_count):
            continue
        out.add(name)
    return out


class BillingBridge:
    """Runs beside a :class:`gateway.app.Gateway`: billing's messages in, the gateway's outbox out.

    With ``adopted_by`` (another bridge of this gateway), it is an adoption of the session of the instance
    ``config.instance`` names, which is down: inbound only, no status, no will, never reconnected."""

    def __init__(self, gateway, config: BrokerConfig, adopted_by: "BillingBridge | None" = None) -> None:
        self.gateway = gateway
        self.config = config
        self.adopted_by = adopted_by
        self.stats = BridgeStats()
        self.zone = timezone(timedelta(seconds=gateway.config.calendar.utc_offset_s))
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Inbound] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._acks: dict[int, asyncio.Future] = {}
        self._generation = 0  # which connection: bumped on every connect and disconnect
        self._refused = False  # the broker refused the last connection attempt (credentials, say)
        self._wake = asyncio.Event()
        self._refusal_logged_at = float("-inf")
        self.statuses: dict[str, StatusSeen] = {}  # several instances: each one's last status heard
        self.adoptions: dict[str, tuple[BillingBridge, asyncio.Task]] = {}  # instance -> its session's adoption
        self.ended = asyncio.Event()  # an adoption: its connection is gone (taken over, most likely)

    # -- paho callbacks (on the event loop) -------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self._refused = reason.is_failure
        if reason.is_failure:
            self.stats.last_error = f"broker refused the connection: {reason}"
            log.error("MQTT: %s", self.stats.last_error)
            return  # the broker closes the connection next: the disconnect reconnects
        self._net.connected()
        self._generation += 1
        self.stats.connects += 1
        if self.adopted_by is not None:
            # out of the shared group: the broker deals what comes next to the live instances; what it queued
            # here still comes, and is handled as our own (the session's other subscriptions stay: global inputs)
            shared = [t for t in inbound_subscriptions(self.config) if t.startswith("$share/")]
            client.unsubscribe(shared)
            log.warning("MQTT: adopted the session of instance %s (session present: %s): handling what the "
                        "broker queued for it", self.config.instance, flags.session_present)
            self._set_connected(True)
            return
        topics = inbound_subscriptions(self.config)
        if self._clustered():
            topics.append(contract.status_topic("+"))  # which instances are down: their sessions are adopted
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in topics])
        client.publish(contract.status_topic(self.config.instance), self._status("online"), qos=1, retain=True)
        log.info("MQTT: connected to %s:%s (session present: %s)", self.config.host, self.config.port,
                 flags.session_present)
        self._set_connected(True)

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        self._generation += 1
        self._set_connected(False)
        if self.adopted_by is not None:
            # taken over by its instance come back (Mosquitto just closes the connection), or the link dropped:
            # never reconnected from here; the publisher decides whether to adopt it again (``adoptable``)
            self.ended.set()
            return
        if reason.is_failure and not self._refused:  # a refusal already said why; keep that
            self.stats.last_error = f"disconnected: {reason}"
            log.warning("MQTT: %s; reconnecting", self.stats.last_error)
        self._net.lost()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            self.stats.last_error = f"broker refused the subscriptions: {', '.join(refused)}"
            log.error("MQTT: %s", self.stats.last_error)
            return
        self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.startswith(contract.STATUS + "/"):
            self._heard_status(msg)
            if msg.qos > 0:
                client.ack(msg.mid, msg.qos)  # a state, not an input: nothing to commit
            return
        self._queue.put_nowait(_Inbound(self._generation, msg.mid, msg.qos, msg.topic, msg.payload))

    def _heard_status(self, msg) -> None:
        instance = msg.topic[len(contract.STATUS) + 1:]
        try:
            state = msgspec.json.decode(msg.payload, type=contract.Status).state
        except msgspec.DecodeError as exc:  # (a ValidationError too)
            log.warning("MQTT: status of %s not understood (%s): ignored", instance, exc)
            return
        before = self.statuses.get(instance)
        self.statuses[instance] = StatusSeen(state, (before.count if before else 0) + 1)

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(not reason.is_failure)

    # -- event loop -----------------------------------------------------------------------------------------
    def _set_connected(self, up: bool) -> None:
        self.stats.connected = up
        if up:
            self._connected.set()
        else:
            self._connected.clear()
            self._subscribed.clear()

    def _status(self, state: str) -> bytes:
        return contract.encode(contract.Status(self.config.instance, state, datetime.now(self.zone), VERSION))

    @property
    def backlog(self) -> int:
        """Inbound messages received and waiting for the consumer's next batch."""
        return self._queue.qsize()

    def wake(self) -> None:
        """New events are committed: publish now rather than at the next look."""
        if self.adopted_by is not None:
            self.adopted_by.wake()
        self._wake.set()

    def _clustered(self) -> bool:
        """Several instances sharing the inbound messages: their sessions are adopted when they are down."""
        return bool(self.config.shared_group) and getattr(self.gateway, "cluster", None) is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        client = make_client(cfg)
        if self.adopted_by is None:  # (an adoption says nothing for the instance it stands in for)
            client.will_set(contract.status_topic(cfg.instance), self._status("offline"), qos=1, retain=True)
        client.max_inflight_messages_set(cfg.publish_batch)
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_message, client.on_publish = self._on_message, self._on_publish
        client.on_subscribe = self._on_subscribe
        if cfg.shared_group and getattr(self.gateway, "cluster", None) is None:
            log.warning("MQTT: sharing inbound messages in group %r without [cluster]: every instance acts on "
                        "every meter it hears of (docs/scaling.md)", cfg.shared_group)
        if self.adopted_by is None and getattr(self.gateway, "cluster", None) is not None:
            self.gateway.cluster.broker_connected = lambda: self.stats.connected  # (the publisher lease)
        client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, clean_start=False,
                             properties=session_properties(cfg))
        self._client = client
        self._net = _OnLoop(self._loop, client, cfg.reconnect_max_s,
                            give_up=self.ended.set if self.adopted_by is not None else None)
        self._net.start()

    async def ready(self, timeout: float = 10.0) -> None:
        """Until connected and subscribed (a first connection: nothing is queued for us before that)."""
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"MQTT bridge not subscribed within {timeout}s at {self.config.host}:"
                               f"{self.config.port}: {self.stats.last_error or 'no answer'}") from None

    async def run(self, stop: asyncio.Event) -> None:
        if self._client is None:
            await self.start()
        tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._publish_loop(stop))]
        if self._clustered():
            tasks.append(asyncio.create_task(self._adopt_loop(stop)))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for name in list(self.adoptions):
                await self._end_adoption(name)
            await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self.stats.connected and self.adopted_by is None:
            info = client.publish(contract.status_topic(self.config.instance), self._status("offline"), qos=1,
                                  retain=True)
            said = self._acks[info.mid] = self._loop.create_future()
            await asyncio.wait([said], timeout=2.0)
        await self._net.stop()

    # -- several instances: the sessions of those that are down ---------------------------------------------
    async def _adopt_loop(self, stop: asyncio.Event) -> None:
        """While this instance holds the publisher lease (and so is connected), adopt the sessions of the
        instances that are down; end an adoption once its instance is back or the lease is gone."""
        cluster = self.gateway.cluster
        grace_s = max(3 * cluster.ttl_s, 10.0)
        ended: dict[str, AdoptionEnded] = {}
        while not stop.is_set():
            for name, (adoption, _) in list(self.adoptions.items()):
                if adoption.ended.is_set():  # taken over, the link dropped, or refused: again only as adoptable says
                    seen = self.statuses.get(name)
                    ended[name] = AdoptionEnded(seen.count if seen else 0, time.monotonic())
                    await self._end_adoption(name)
            wanted = set()
            if cluster.is_publisher() and self.stats.connected:
                wanted = adoptable(cluster.members, self.statuses, self.config.instance, ended, time.monotonic(),
                                   grace_s)
            for name in sorted(set(self.adoptions) - wanted):  # back (heartbeat and status), or not ours to do
                await self._end_adoption(name)
            for name in sorted(wanted - set(self.adoptions)):
                ended.pop(name, None)
                await self._adopt(name)
            try:
                await asyncio.wait_for(stop.wait(), cluster.renew_every_s)
            except asyncio.TimeoutError:
                pass

    async def _adopt(self, instance: str) -> None:
        adoption = BillingBridge(self.gateway, replace(self.config, instance=instance), adopted_by=self)
        self.stats.adoptions += 1
        log.info("MQTT: instance %s is down (status %s, heartbeat %s): adopting its session %s", instance,
                 getattr(self.statuses.get(instance), "state", "unknown"),
                 "fresh" if self.gateway.cluster.members.get(instance) else "stopped", adoption.config.client_id)
        await adoption.start()
        self.adoptions[instance] = (adoption, asyncio.create_task(adoption._consume()))
        self.stats.adopted = len(self.adoptions)

    async def _end_adoption(self, instance: str) -> None:
        adoption, consumer = self.adoptions.pop(instance)
        self.stats.adopted = len(self.adoptions)
        consumer.cancel()  # (a batch not yet acknowledged is delivered again, to its instance or an adopter)
        await asyncio.gather(consumer, return_exceptions=True)
        await adoption.close()
        log.info("MQTT: adoption of instance %s's session ended after %d messages (%s)", instance,
                 adoption.stats.committed, "taken over or the link dropped" if adoption.ended.is_set()
                 else "it is back, or this instance no longer publishes")

    # -- inbound ---------------------------------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.config.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self.stats.received += len(batch)
            try:
                await self._handle_until_done(batch)
            except Exception:  # unacknowledged, so the broker delivers them again; this task must go on
                log.exception("MQTT: %d inbound messages left unacknowledged", len(batch))

    async def _handle_until_done(self, batch: list[_Inbound]) -> None:
        """Commit, then acknowledge. While the store is away, nothing is acknowledged and the batch is tried
        again until it is back. Any other failure is tried again a few times too (the shell has rebuilt
        itself from the store: a clash with another writer passes); if it persists it is one message's doing,
        so each message is then tried on its own, and one that still fails goes to the dead letters with the
        error: it cannot hold up the messages behind it."""
        delay, failures = 0.5, 0
        while True:
            try:
                await self.handle(batch)
                break
            except Exception as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                away = _store_away(exc)
                failures += not away
                if failures >= POISON_AFTER:
                    if len(batch) > 1:
                        log.warning("MQTT: a batch of %d keeps failing (%s); committing its messages one by one",
                                    len(batch), self.stats.last_error)
                        for msg in batch:
                            await self._handle_until_done([msg])
                        return
                    log.exception("MQTT: a message from %s cannot be applied; dead letter", batch[0].topic)
                    await self._refuse(batch[0], f"could not be applied: {type(exc).__name__}: {exc}")
                    break
                self.stats.retries += 1
                log.error("MQTT: committing %d messages failed (%s); they wait, unacknowledged, %.1fs",
                          len(batch), self.stats.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0) if away else 0.1
        self._ack(batch)

    async def _refuse(self, msg: _Inbound, reason: str) -> None:
        letter = self._dead_letter(msg, reason, self.gateway.clock.now())
        delay = 0.5
        while True:
            try:
                await self.gateway.writer.call(self.gateway.control.add_events, [letter])
                break
            except Exception as exc:
                if not _store_away(exc):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.stats.dead_letters += 1
        self.wake()

    async def handle(self, batch: list[_Inbound]) -> None:
        """Decode, commit (runs of one kind together, in arrival order), dead-letter what was refused."""
        now = self.gateway.clock.now()
        letters: list[Event] = []
        runs: list[_Run] = []
        for msg in batch:
            try:
                msg.item = self._convert(contract.decode(msg.topic, msg.payload), now)
            except (contract.BadMessage, ValueError) as exc:
                letters.append(self._dead_letter(msg, str(exc), now))
                continue
            if not runs or runs[-1].kind is not type(msg.item):
                runs.append(_Run(type(msg.item)))
            runs[-1].messages.append(msg)
        for run in runs:
            letters += await self._commit(run, now)
        if runs:
            self.wake()
        if letters:
            await self.gateway.writer.call(self.gateway.control.add_events, letters)
            self.stats.dead_letters += len(letters)
            self.wake()
        self.stats.committed += len(batch) - len(letters)

    def _convert(self, m, now: float):
        """Contract payload -> the domain's input (whose own checks may refuse it, as ValueError)."""
        if isinstance(m, contract.Payment):
            return Payment(m.payment_id, m.account, m.amount_fen, int(m.paid_at.timestamp()), m.channel)
        if isinstance(m, contract.NoticeReceipt):
            return NoticeReceiptIn(m.request_id, ReceiptOutcome(m.outcome), m.at.timestamp(), m.detail)
        if isinstance(m, contract.FieldUpdate):
            return FieldUpdate(m.update_id, m.order_id, FieldStatus(m.status), m.at.timestamp(), m.crew, m.note)
        if isinstance(m, contract.AreaFlag):
            return AreaFlag(m.area, m.flag, m.active, int(m.since.timestamp()),
                            None if m.until is None else int(m.until.timestamp()), m.actor, m.reason)
        if isinstance(m, contract.Forecast):
            if m.min_c > m.max_c:
                raise ValueError(f"forecast {m.forecast_id}: min_c {m.min_c} is above max_c {m.max_c}")
            return Forecast(m.area, m.day.isoformat(), m.min_c, m.max_c, int(now))
        if isinstance(m, contract.TariffChange):
            return _Tariffs(m.change_id, tariffs_from_config(m.as_config()))
        raise ValueError(f"no handler for {type(m).__name__}")

    async def _commit(self, run: _Run, now: float) -> list[Event]:
        """Commit one run; what the domain refused (with its reason) comes back as dead letters."""
        gw, items = self.gateway, [m.item for m in run.messages]
        # by identity: one batch may hold two messages with the same id (a re-send and a conflict)
        by_item = {id(m.item): m for m in run.messages}
        refused: list[tuple[object, str]] = []
        if run.kind is Payment:
            credits = (await gw.credits(items)).credits
            self.stats.duplicates += len(credits.duplicates)
            refused = credits.conflicts
        elif run.kind is NoticeReceiptIn:
            refused = (await gw.receipts(items)).rejected  # a receipt for no notice we sent, say
        elif run.kind is FieldUpdate:
            refused = (await gw.field_updates(items)).rejected  # an unknown or closed order
        elif run.kind is AreaFlag:
            for flag in items:
                refused += (await gw.area_flag(flag)).rejected  # older than the flag in force
        elif run.kind is Forecast:
            for fc in items:
                await gw.forecast(fc)
        elif run.kind is _Tariffs:
            for change in items:
                await gw.tariffs(change.tariffs)
        return [self._dead_letter(by_item[id(item)], reason, now) for item, reason in refused if id(item) in by_item]

    def _dead_letter(self, msg: _Inbound, reason: str, now: float) -> Event:
        log.warning("MQTT: dead letter from %s: %s", msg.topic, reason)
        # the same message refused again (a re-delivery) makes the same event, kept once
        key = hashlib.sha256(msg.topic.encode() + b"\0" + msg.payload + b"\0" + reason.encode()).hexdigest()[:32]
        letter = contract.dead_letter(msg.topic, msg.payload, reason)
        return Event(f"dead_letter/{key}", "dead_letter", msg.topic, now,
                     {"topic": letter.topic, "reason": letter.reason, "payload": letter.payload,
                      "encoding": letter.encoding})

    def _ack(self, batch: list[_Inbound]) -> None:
        client = self._client
        if client is None:
            return
        for msg in batch:
            # a message from an earlier connection is re-delivered by the broker (and is then a duplicate); its
            # old packet id may already name another message on this connection: never ack it. (paho's callbacks
            # run on this loop too, so the generation cannot change under this loop.)
            if msg.qos > 0 and msg.generation == self._generation:
                client.ack(msg.mid, msg.qos)

    # -- outbound ---------------------------------------------------------------------------------------------
    async def _publish_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._connected.wait()
            try:
                sent = await self.publish_pending()
            except Exception as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("MQTT: publishing the outbox failed; trying again")
                sent = 0
            if sent < self.config.publish_batch:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.publish_idle_s)
                except asyncio.TimeoutError:
                    pass

    async def publish_pending(self) -> int:
        """One batch of unpublished outbox events: publish, wait for the broker's acks, mark what was acked.
        Returns how many were acknowledged."""
        control = self.gateway.control
        if control.cluster is not None and not control.cluster.is_publisher():
            return 0  # several instances: the outbox is published by the holder of the publisher lease
        rows = await self.gateway.writer.call(control.store.outbox, 0, self.config.publish_batch, True)
        if not rows or not self._connected.is_set():  # lost while we read: paho may be reconnecting in its thread
            return 0
        client = self._client
        waits = []
        try:
            for seq, event_id, kind, subject, at, data in rows:
                envelope = contract.Event(event_id, kind, subject, datetime.fromtimestamp(at, self.zone), seq,
                                          self.config.instance, data)
                topic = contract.event_topic(kind)
                info = client.publish(topic, contract.encode(envelope), qos=1)
                if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):  # NO_CONN: paho keeps it
                    raise RuntimeError(f"publish refused: {paho.error_string(info.rc)}")
                fut = self._loop.create_future()
                self._acks[info.mid] = fut
                waits.append((seq, event_id, topic, info.mid, fut))
            done, _ = await asyncio.wait([w[-1] for w in waits], timeout=self.config.publish_ack_timeout_s)
        finally:
            for *_, mid, fut in waits:
                if not fut.done():  # the broker is away: these go again from the outbox
                    fut.cancel()
                    if self._acks.get(mid) is fut:
                        del self._acks[mid]
        acked = [seq for seq, *_, fut in waits if fut in done and fut.result()]
        refused = [(event_id, topic) for _, event_id, topic, _, fut in waits if fut in done and not fut.result()]
        if refused:
            # the broker will not take them (an ACL that does not let the gateway write there): they stay in
            # the outbox and are tried again, and an operator has to hear of it
            self.stats.publish_refused += len(refused)
            if self._loop.time() - self._refusal_logged_at > 60:  # tried again every moment: say it once a minute
                self._refusal_logged_at = self._loop.time()
                log.error("MQTT: the broker refused %d events (first: %s to %s); they stay in the outbox",
                          len(refused), *refused[0])
        if acked:
            await self.gateway.writer.call(control.mark_published, acked, self.gateway.clock.now())
            self.stats.published += len(acked)
        return len(acked)


#: inputs every instance needs (gates, prices), never dealt out in a shared subscription
GLOBAL_INBOUND = (contract.AreaFlag, contract.Forecast, contract.TariffChange)


def inbound_subscriptions(cfg: BrokerConfig) -> list[str]:
    """The inbound topics: per-account inputs (payments, receipts, field updates) in the shared group when
    there is one (any instance takes them: the inbox brings them to the one acting for the account), the
    global ones on this instance's own session."""
    prefix = f"$share/{cfg.shared_group}/" if cfg.shared_group else ""
    return [topic if kind in GLOBAL_INBOUND else prefix + topic for topic, kind in contract.INBOUND.items()]


def _store_away(exc: BaseException) -> bool:
    """The store (not the message) failed: a lost connection, a locked or unwritable database. Both drivers
    call that an OperationalError."""
    from gateway.cluster import LeaseLost  # (a lease lost mid-batch: the batch is tried again, rescoped)

    return isinstance(exc, (OSError, TimeoutError, sqlite3.OperationalError, psycopg.OperationalError,
                            psycopg.InterfaceError, LeaseLost))


class _OnLoop:
    """paho's network loop on the event loop, without a thread of its own: the socket is watched with
    add_reader/add_writer, keepalive runs from a task, reconnects back off. With paho on its own thread,
    the two threads' fight for the GIL cost a third of the bridge's throughput (docs/performance.md)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: _ReadAhead, reconnect_max_s: float,
                 give_up: "Callable[[], None] | None" = None) -> None:
        """``give_up``: called instead of trying again when a connection attempt fails (an adoption)."""
        self.loop, self.client, self.reconnect_max_s = loop, client, reconnect_max_s
        self.give_up = give_up
        self._thread = threading.get_ident()
        self._tasks: set[asyncio.Task] = set()
        self._connecting: asyncio.Task | None = None
        self._attempting: asyncio.Future | None = None
        self._delay = 0.0
        self._up_since: float | None = None
        self.attempts = 0  # connection attempts, for an operator (and a test) to see the back-off
        self._stopped = False
        # file descriptors are taken when paho calls, not later on the loop: by then the socket may be closed
        # (fileno -1) and its number reused by the next connection's socket
        client.on_socket_open = lambda c, u, sock: self._soon(self.loop.add_reader, sock.fileno(), self._readable)
        client.on_socket_close = lambda c, u, sock: self._soon(self._unwatch, sock.fileno())
        client.on_socket_register_write = lambda c, u, sock: self._soon(self.loop.add_writer, sock.fileno(),
                                                                        c.loop_write)
        client.on_socket_unregister_write = lambda c, u, sock: self._soon(self.loop.remove_writer, sock.fileno())

    def _soon(self, fn, *args) -> None:
        # paho calls these from the thread that connects (a TCP and TLS handshake must not block the loop),
        # which may finish after we stopped: nothing to watch then
        if self._stopped or self.loop.is_closed():
            return
        if threading.get_ident() == self._thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _readable(self) -> None:
        self.client.loop_read()
        while self._more():
            self.client.loop_read()

    def _more(self) -> bool:
        """Bytes a selector cannot see: in the read-ahead, or decrypted and held by TLS."""
        sock = self.client.socket()
        if sock is None:
            return False
        return self.client.pending or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)

    def _unwatch(self, fd: int) -> None:
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)

    def _spawn(self, coro) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self) -> None:
        self._spawn(self._keepalive())
        self.lost()

    def lost(self) -> None:
        """The connection is gone, or never came: connect again, backing off, until stopped. Only when no
        socket is open: a second connection under our client id would take the session over from the first."""
        if self._stopped or self.client.socket() is not None:
            return
        if self._up_since is not None and time.monotonic() - self._up_since >= STABLE_S:
            self._delay = 0.0  # a connection that served a while: the next one at once
        self._up_since = None
        if self._connecting is None or self._connecting.done():
            self._connecting = self._spawn(self._connect())

    def connected(self) -> None:
        """The broker accepted the session. Only one that then lasts (``STABLE_S``) resets the back-off: a
        session taken over at once by another instance with our id must not ping-pong at full speed."""
        self._up_since = time.monotonic()

    async def _connect(self) -> None:
        # the back-off grows until a session is accepted, not merely a TCP connection: a refused CONNACK, a
        # session taken over by another instance with our id, a broker's DISCONNECT must not loop at full speed
        while not self._stopped and self.client.socket() is None:
            if self._delay:
                await asyncio.sleep(self._delay)
            self._delay = min(max(self._delay * 2, 0.5), self.reconnect_max_s)
            self.attempts += 1
            self._attempting = self.loop.run_in_executor(None, self._attempt)
            try:
                await asyncio.shield(self._attempting)  # a stop waits for it rather than leaving it behind
                return
            except (OSError, ValueError) as exc:  # refused, unreachable, TLS failure
                if self.give_up is not None:
                    log.warning("MQTT: cannot connect (%s); given up", exc)
                    return self.give_up()
                log.warning("MQTT: cannot connect (%s); again in %.1fs", exc, self._delay)
            except Exception:  # never end this task: nothing else would connect again
                log.exception("MQTT: connecting failed; again in %.1fs", self._delay)
                if self.give_up is not None:
                    return self.give_up()

    def _attempt(self) -> None:
        """One connection attempt, in a worker thread."""
        self.client.reconnect()

    async def _keepalive(self) -> None:
        while not self._stopped:
            if self._connecting is None or self._connecting.done():  # never beside a connect in its thread
                self.client.loop_misc()  # pings, and notices a broker that went silent
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._attempting is not None and not self._attempting.done():
            await asyncio.wait([self._attempting], timeout=15)  # its socket is ours to close, cleanly
        client, sock = self.client, self.client.socket()
        fd = sock.fileno() if sock is not None else -1
        # a clean goodbye: the broker drops the will ("offline" is said below, by the bridge, or not at all)
        client.disconnect()
        client.loop_write()
        # paho closes its socket only when it reads the broker's answer, which no one waits for now: unhook our
        # callbacks (else paho's finaliser calls them on a closed event loop), unwatch the descriptor (else a
        # later socket with the same number is never read) and close the socket here
        client.on_socket_open = client.on_socket_close = None
        client.on_socket_register_write = client.on_socket_unregister_write = None
        if fd >= 0:
            self._unwatch(fd)
        if client.socket() is not None:
            client.socket().close()


@dataclass(frozen=True)
class _Tariffs:
    change_id: str
    tariffs: dict
