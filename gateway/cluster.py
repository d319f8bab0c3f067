"""Several gateway instances on one PostgreSQL database: the channels shared out among them with leases.

The one place for leases (docs/scaling.md). Three parts:

* :func:`plan`: the pure decision, from the lease table and the number of live instances, of which channels
  this instance takes and which it gives up (a fair share each: ``ceil(channels / live instances)``);
* :class:`LeaseDb`: the SQL, on a connection of its own (never the writer's);
* :class:`Cluster`: the keeper. A thread of its own heartbeats, renews the leases every ``ttl / 5`` and takes
  free or expired ones up to the fair share, so a long batch on the writer never lets a lease lapse; the
  gateway (:class:`gateway.app.Gateway`) is told when the set changed and rescopes itself. ``acting`` is
  the set the gateway works for (held, and its engine and controller reloaded since they were taken):
  :meth:`Cluster.fence` checks it, inside every transaction, against the lease table (FOR SHARE: an
  acquirer's UPDATE waits for our commit) and raises :class:`LeaseLost` when one is gone. So an instance
  that was paused past its leases' expiry cannot commit anything for those channels, and in particular
  cannot commit SENDING for a relay command: it cannot send one.

The database's clock (``now()``) is the only one expiry is measured by; locally each lease also has a
conservative deadline on the monotonic clock (from before the renewal was sent), which the executor checks
right before a relay frame goes out.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import psycopg

from gateway.store.base import INBOX_NOTIFY

log = logging.getLogger(__name__)

#: a lease renewed at local monotonic time t is trusted locally until t + ttl * SAFETY (DB expiry: now() + ttl)
SAFETY = 0.8
#: the lease of the one instance that publishes the outbox and adopts the MQTT sessions of instances that are
#: down (gateway/northbound/mqtt.py); held only while its bridge is connected. Channel names start with a
#: letter or a digit, so it names no channel.
PUBLISHER = "@outbox"


class LeaseLost(Exception):
    """This instance no longer holds channels it was acting for: the transaction is rolled back."""

    def __init__(self, channels: Iterable[str]) -> None:
        self.channels = sorted(channels)
        super().__init__(f"lease lost on channel(s) {', '.join(self.channels)}: another instance may hold them; "
                         f"nothing was committed for them")


def log_failure(logger: logging.Logger, message: str, *args) -> None:
    """From an ``except`` block: a lost lease is an expected turn of events (a warning, no traceback);
    anything else is logged with its traceback."""
    import sys

    exc = sys.exc_info()[1]
    if isinstance(exc, LeaseLost):
        logger.warning(message + ": %s", *args, exc)
    else:
        logger.exception(message, *args)


class ConfigMismatch(RuntimeError):
    """Live instances run another config (channels, fleet): this one does not join (routing, the fair share
    and the inbox assume every instance has the same)."""

    def __init__(self, me: str, digest: str, others: dict[str, str]) -> None:
        self.others = others
        super().__init__(
            f"instance {me!r} has config digest {digest[:12]} (its channels, fleet and lease_ttl_s), but live "
            f"instance(s) {', '.join(f'{i!r} has {d[:12]}' for i, d in sorted(others.items()))}: every instance "
            f"must run the same config (only [mqtt] instance differs); not joining. To change the config, stop "
            f"them all, then start them with the new one")


class NotHeld(LookupError):
    """A meter on a channel another instance holds (an operator's command goes to that instance)."""

    def __init__(self, meter_id: str, channel: str, holder: str | None) -> None:
        self.meter_id, self.channel, self.holder = meter_id, channel, holder
        super().__init__(f"meter {meter_id} is on channel {channel!r}, held by "
                         f"{'instance ' + repr(holder) if holder else 'no instance right now'}: "
                         f"send the command to that instance")


# --------------------------------------------------------------------------- the pure decision


@dataclass(frozen=True)
class Lease:
    channel: str
    holder: str | None
    epoch: int
    live: bool  # expires_at > now() at the database


@dataclass(frozen=True)
class Plan:
    take: tuple[str, ...] = ()
    release: tuple[str, ...] = ()


def fair_share(channels: int, members: int) -> int:
    return math.ceil(channels / max(members, 1))


def plan(channels: Sequence[str], leases: dict[str, Lease], me: str, members: int) -> Plan:
    """Which channels to take (free, expired or never leased) and which to give up (above the fair share:
    a newcomer gets its share as the others hand theirs over). An expired lease of our own counts as free:
    taking it again bumps its epoch, and the gateway reloads as for any lease newly taken."""
    share = fair_share(len(channels), members)
    mine = sorted(c for c in channels if (l := leases.get(c)) is not None and l.holder == me and l.live)
    if len(mine) > share:
        return Plan(release=tuple(mine[share:]))
    free = [c for c in channels if (l := leases.get(c)) is None or not l.live or l.holder is None]
    # each instance starts its search at its own place: several looking at once mostly try different ones
    start = zlib.crc32(me.encode()) % len(free) if free else 0
    return Plan(take=tuple((free[start:] + free[:start])[:share - len(mine)]))


def owner_channel(engine, account_no: int, home: str) -> str:
    """The account's channel: that of its first meter; ``home`` (the first channel by name) for an account
    without meters, so that exactly one instance acts for it (its payments, adjustments and notices). The
    instance holding that channel acts for the account (notices, cases, commands of every meter)."""
    ms = engine.meters_of[account_no]
    return engine.meters[ms[0]].channel if ms else home


def owner_channels(engine, home: str) -> list[str]:
    """:func:`owner_channel` of every account, by account number."""
    return [owner_channel(engine, no, home) for no in range(len(engine.meters_of))]


# --------------------------------------------------------------------------- the SQL


class LeaseDb:
    """The lease and member tables (store migration 5), on a connection of its own."""

    def __init__(self, dsn: str, me: str, ttl_s: float, digest: str | None = None) -> None:
        self.me, self.ttl_s, self.digest = me, ttl_s, digest
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)
        # a lease row locked by an instance frozen inside a transaction must not stop this keeper's round (its
        # own renewals come first in it): the acquisition gives up and is tried again next round
        self.conn.execute(f"SET lock_timeout = '{max(int(ttl_s * 1000 / 5), 100)}ms'")

    def ensure(self, channels: Iterable[str]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany("INSERT INTO leases (channel, holder, epoch, expires_at) VALUES (%s, NULL, 0, "
                            "'-infinity') ON CONFLICT (channel) DO NOTHING", [(c,) for c in channels])

    def heartbeat(self) -> None:
        self.conn.execute("INSERT INTO members (instance, seen_at, config_digest) VALUES (%s, now(), %s) "
                          "ON CONFLICT (instance) DO UPDATE SET seen_at = now(), config_digest = excluded.config_digest",
                          (self.me, self.digest))

    def other_configs(self) -> dict[str, str]:
        """Live instances (not this one) whose config digest differs from ours (one that records none, an
        older version, is not compared)."""
        if self.digest is None:
            return {}
        return dict(self.conn.execute(
            "SELECT instance, config_digest FROM members WHERE instance <> %s AND config_digest IS NOT NULL "
            "AND config_digest <> %s AND seen_at > now() - make_interval(secs => %s)",
            (self.me, self.digest, self.ttl_s)).fetchall())

    def members(self) -> dict[str, bool]:
        """Every instance that ever joined: is its heartbeat younger than the ttl?"""
        return dict(self.conn.execute("SELECT instance, seen_at > now() - make_interval(secs => %s) FROM members",
                                      (self.ttl_s,)).fetchall())

    def leases(self) -> dict[str, Lease]:
        return {c: Lease(c, h, e, live) for c, h, e, live in self.conn.execute(
            "SELECT channel, holder, epoch, expires_at > now() FROM leases")}

    def acquire(self, channel: str) -> int | None:
        """The new epoch, or None when another instance holds it (live)."""
        row = self.conn.execute(
            "UPDATE leases SET holder = %s, epoch = epoch + 1, expires_at = now() + make_interval(secs => %s) "
            "WHERE channel = %s AND (expires_at < now() OR holder = %s OR holder IS NULL) RETURNING epoch",
            (self.me, self.ttl_s, channel, self.me)).fetchone()
        return None if row is None else row[0]

    def renew(self, held: dict[str, int]) -> set[str]:
        """The leases still ours (same epoch), extended by the ttl; a lapsed one nobody took is ours again
        (nobody acted on it meanwhile: taking it would have bumped its epoch)."""
        if not held:
            return set()
        chans = list(held)
        return {r[0] for r in self.conn.execute(
            "UPDATE leases l SET expires_at = now() + make_interval(secs => %s) FROM unnest(%s::text[], "
            "%s::bigint[]) AS h(channel, epoch) WHERE l.channel = h.channel AND l.epoch = h.epoch "
            "AND l.holder = %s RETURNING l.channel", (self.ttl_s, chans, [held[c] for c in chans], self.me))}

    def release(self, channel: str, epoch: int) -> None:
        self.conn.execute("UPDATE leases SET holder = NULL, expires_at = '-infinity' WHERE channel = %s "
                          "AND holder = %s AND epoch = %s", (channel, self.me, epoch))

    def leave(self) -> None:
        self.conn.execute("UPDATE leases SET holder = NULL, expires_at = '-infinity' WHERE holder = %s", (self.me,))
        # the row stays, its heartbeat gone: the broker keeps dealing messages to a stopped instance's session,
        # which the publisher then adopts (gateway/northbound/mqtt.py)
        self.conn.execute("UPDATE members SET seen_at = '-infinity' WHERE instance = %s", (self.me,))

    def holder(self, channel: str) -> str | None:
        row = self.conn.execute("SELECT holder FROM leases WHERE channel = %s AND expires_at > now()",
                                (channel,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.conn.close()


def fence_sql(store, me: str, acting: dict[str, int]) -> set[str]:
    """Inside the caller's transaction: the channels of ``acting`` this instance no longer holds (another
    holder or epoch, or expired). The rows still held are locked FOR SHARE until the commit."""
    chans = list(acting)
    ok = {(c, e) for c, e in store._query(
        "SELECT channel, epoch FROM leases WHERE channel = ANY(?) AND holder = ? AND expires_at > now() "
        "FOR SHARE", (chans, me))}
    return {c for c in chans if (c, acting[c]) not in ok}


# --------------------------------------------------------------------------- the keeper


class Cluster:
    """This instance's leases: a keeper thread (heartbeat, renewals, takeovers, inbox notifications) and the
    set the gateway acts for. ``on_change()`` and ``on_inbox(channel)`` are called from the keeper thread
    (hand them to the event loop with ``call_soon_threadsafe``)."""

    def __init__(self, dsn: str, me: str, channels: Sequence[str], ttl_s: float,
                 on_change: Callable[[], None] = lambda: None, on_inbox: Callable[[str], None] = lambda c: None,
                 monotonic: Callable[[], float] = time.monotonic, digest: str | None = None) -> None:
        """``digest``: of this instance's config (:meth:`gateway.config.ServiceConfig.cluster_digest`); it does
        not join live instances with another (None: not compared)."""
        self.dsn, self.me, self.channels, self.ttl_s = dsn, me, list(channels), ttl_s
        self.digest = digest
        #: the channel of accounts without meters (every instance has the same channels: the same one)
        self.home = min(self.channels, default="")
        self.on_change, self.on_inbox = on_change, on_inbox
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._db = threading.RLock()
        self.held: dict[str, int] = {}  # channel -> epoch, as the lease table says (keeper thread writes)
        self.deadline: dict[str, float] = {}  # channel -> monotonic time until which the lease surely holds
        self.releasing: set[str] = set()  # above the fair share: the gateway hands these over
        #: channel -> epoch the gateway works for; changed on the writer thread only (rescope, fence)
        self.acting: dict[str, int] = {}
        #: channels the fence found lost since the gateway last rescoped (it stops their polls, closes their
        #: links and reloads: ``acting`` no longer names them, so it cannot tell from that alone)
        self.fenced: set[str] = set()
        #: channels the fence found lost that are still in ``held``: not wanted until the keeper's next round
        #: settles them (its renewal fails: lost; it succeeds: the lease had only lapsed, nobody took it, and it
        #: is ours again). ``held`` is the keeper's alone: a renewal in flight while the fence looked may have
        #: extended it, and a lease the database says is ours must stay renewed
        self.suspect: set[str] = set()
        self._owner_cache: tuple | None = None
        self._meter_cache: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer_quiet = False
        self.db: LeaseDb | None = None
        self.renew_every_s = ttl_s / 5
        #: the monotonic time of the writer's last commit (set by the gateway; None: not watched). The keeper
        #: renews, heartbeats and takes leases only while that is within the ttl: an instance whose writer
        #: cannot commit (its database connection lost, a stuck transaction) must let its channels go
        self.writer_committed_at: Callable[[], float] | None = None
        #: set by the MQTT bridge: is it connected to the broker? The publisher lease is held only while it is
        self.broker_connected: Callable[[], bool] = lambda: False
        self.publisher_epoch: int | None = None
        self.publisher_deadline = 0.0
        #: every instance that ever joined -> is its heartbeat fresh (as of the last round)
        self.members: dict[str, bool] = {}

    # -- life -------------------------------------------------------------------------------------------
    def check_config(self) -> None:
        """:class:`ConfigMismatch` if live instances run another config."""
        db = LeaseDb(self.dsn, self.me, self.ttl_s, self.digest)
        try:
            others = db.other_configs()
        finally:
            db.close()
        if others:
            raise ConfigMismatch(self.me, self.digest, others)

    def start(self) -> None:
        self.check_config()
        self.db = LeaseDb(self.dsn, self.me, self.ttl_s, self.digest)
        self.db.ensure([*self.channels, PUBLISHER])
        self._listen = psycopg.connect(self.dsn, autocommit=True)
        self._listen.execute(f"LISTEN {INBOX_NOTIFY}")
        self._round()  # the first share taken before the gateway starts its loops
        self._thread = threading.Thread(target=self._run, name="feikong-leases", daemon=True)
        self._thread.start()

    def stop(self, leave: bool = True) -> None:
        """Stop the keeper; ``leave``: hand every lease back at once (a clean stop), else they expire."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl_s)
        # (a keeper stuck in a call to an unreachable database keeps _db: then the leases simply expire)
        if leave and self.db is not None and self._db.acquire(timeout=self.ttl_s):
            try:
                self.db.leave()
                with self._lock:
                    self.held.clear()
                    self.publisher_epoch = None
            except psycopg.Error as exc:
                log.warning("handing the leases back failed (%s): they expire within %.0f s", exc, self.ttl_s)
            finally:
                self._db.release()
        for conn in (self.db and self.db.conn, getattr(self, "_listen", None)):
            if conn is not None:
                conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.monotonic()
            try:
                self._round()
            except psycopg.Error as exc:
                log.warning("lease round failed (%s); leases are trusted until their local deadline", exc)
                self._reconnect()
            self._wait_notifies(max(self.renew_every_s - (self.monotonic() - started), 0.01))

    def _reconnect(self) -> None:
        try:
            with self._db:
                if self.db is not None:
                    self.db.close()
                self.db = LeaseDb(self.dsn, self.me, self.ttl_s, self.digest)
            self._listen.close()
            self._listen = psycopg.connect(self.dsn, autocommit=True)
            self._listen.execute(f"LISTEN {INBOX_NOTIFY}")
        except psycopg.Error:
            self._stop.wait(self.renew_every_s)

    def _wait_notifies(self, seconds: float) -> None:
        try:
            for n in self._listen.notifies(timeout=seconds, stop_after=1000):
                if n.payload in self.held:
                    self.on_inbox(n.payload)
        except psycopg.Error:
            self._stop.wait(seconds)

    def _round(self) -> None:
        """Heartbeat, renew, then the plan: take free leases up to the fair share, mark the excess."""
        # the database calls under _db (one round or release at a time), the state under _lock, held only
        # for moments: the executor asks may_send() on the event loop
        with self._db:
            db = self.db
            sent = self.monotonic()
            if not self._writer_commits(sent):
                with self._lock:
                    lost = set(self.held)
                    self.held.clear()
                    self.deadline.clear()
                    self.releasing = set()
                    self.suspect = set()
                    publisher, self.publisher_epoch, self.publisher_deadline = self.publisher_epoch, None, 0.0
                if publisher is not None:  # (no writer transaction locks it: handed back at once)
                    db.release(PUBLISHER, publisher)
                if lost:
                    self.on_change()
                return
            db.heartbeat()
            self.members = db.members()
            with self._lock:
                held, suspect = dict(self.held), set(self.suspect)  # (suspect before this renewal was sent)
            renewed = db.renew(held)
            lost = set(held) - renewed
            with self._lock:
                for c in renewed:
                    self.deadline[c] = sent + self.ttl_s * SAFETY
                settled = renewed & suspect
                if settled:
                    log.warning("lease on channel(s) %s had lapsed but nobody took it: ours again",
                                ", ".join(sorted(settled)))
                self.suspect -= settled | lost
                for c in lost:
                    log.warning("lease on channel %s lost (taken by another instance or expired)", c)
                    self.held.pop(c, None)
                    self.deadline.pop(c, None)
            p = plan(self.channels, db.leases(), self.me, sum(self.members.values()))  # (live ones: True)
            taken = []
            for c in p.take:
                sent = self.monotonic()
                try:
                    epoch = db.acquire(c)
                except psycopg.errors.LockNotAvailable:
                    log.info("lease on channel %s is locked by a transaction of its holder: next round", c)
                    continue
                if epoch is not None:
                    with self._lock:
                        self.held[c] = epoch
                        self.deadline[c] = sent + self.ttl_s * SAFETY
                        self.suspect.discard(c)
                    taken.append(c)
            releasing = set(p.release)
            with self._lock:
                changed = bool(lost or taken or settled or releasing != self.releasing)
                self.releasing = releasing
            self._publisher_round(db)
        if taken:
            log.info("took the lease on channel(s) %s", ", ".join(sorted(taken)))
        if changed:
            self.on_change()

    def _writer_commits(self, now: float) -> bool:
        """The writer committed within the ttl (the tick commits every ``tick_s``). If not, the leases are let
        go: neither renewed nor taken, and no heartbeat (the others' fair share then counts without us)."""
        if self.writer_committed_at is None:
            return True
        quiet = now - self.writer_committed_at()
        if quiet <= self.ttl_s:
            if self._writer_quiet:
                log.warning("the writer commits again: taking leases again")
                self._writer_quiet = False
            return True
        if not self._writer_quiet:
            log.warning("the writer has committed nothing for %.1f s (more than lease_ttl_s): letting the leases "
                        "of channel(s) %s go", quiet, ", ".join(sorted(self.held)) or "none")
            self._writer_quiet = True
        return False

    def _publisher_round(self, db: LeaseDb) -> None:
        """The publisher lease taken or renewed while the bridge is connected, and handed back at once when it
        is not: a connected instance takes it in its next round."""
        epoch = self.publisher_epoch
        if self.broker_connected():
            sent = self.monotonic()
            if epoch is not None and not db.renew({PUBLISHER: epoch}):
                log.warning("the publisher lease was lost")
                epoch = None
            if epoch is None and (epoch := db.acquire(PUBLISHER)) is not None:
                log.info("took the publisher lease (%s): this instance publishes the outbox", PUBLISHER)
            with self._lock:
                self.publisher_epoch = epoch
                self.publisher_deadline = sent + self.ttl_s * SAFETY if epoch is not None else 0.0
        elif epoch is not None:
            with self._lock:
                self.publisher_epoch, self.publisher_deadline = None, 0.0
            db.release(PUBLISHER, epoch)
            log.info("handed the publisher lease back: not connected to the broker")

    def is_publisher(self) -> bool:
        """This instance holds the publisher lease (local, conservative deadline)."""
        with self._lock:
            return self.publisher_epoch is not None and self.publisher_deadline > self.monotonic()

    # -- the gateway's side -----------------------------------------------------------------------------
    def wanted(self) -> dict[str, int]:
        """The channels the gateway should act for now: held and not being handed over."""
        with self._lock:
            return {c: e for c, e in self.held.items() if c not in self.releasing and c not in self.suspect}

    def take_fenced(self) -> set[str]:
        """The channels the fence found lost since the last call (the gateway's rescope stops them)."""
        with self._lock:
            fenced, self.fenced = self.fenced, set()
            return fenced

    def release(self, channel: str) -> None:
        """Hand a lease over (after the gateway stopped acting for it)."""
        with self._db:
            with self._lock:
                epoch = self.held.pop(channel, None)
                self.deadline.pop(channel, None)
                self.releasing.discard(channel)
                self.suspect.discard(channel)
            if epoch is not None:
                self.db.release(channel, epoch)
                log.info("handed over channel %s (above the fair share)", channel)

    def may_send(self, channel: str) -> bool:
        """Right before a relay frame: the lease surely holds (local, conservative deadline)."""
        with self._lock:
            return channel in self.acting and self.deadline.get(channel, 0.0) > self.monotonic()

    def holder(self, channel: str) -> str | None:
        """Who holds the channel now (for an operator's error message), on a connection of its own: the
        keeper's may be waiting for a row lock of the very transaction that asks."""
        db = LeaseDb(self.dsn, self.me, self.ttl_s)
        try:
            return db.holder(channel)
        finally:
            db.close()

    def fence(self, store) -> None:
        """In the transaction that just began: raise :class:`LeaseLost` (and stop acting for them) when a
        channel we act for is no longer ours."""
        if not self.acting:
            return
        lost = fence_sql(store, self.me, self.acting)
        if lost:
            with self._lock:
                self.fenced |= lost
                for c in lost:
                    self.acting.pop(c, None)
                    if c in self.held:
                        self.suspect.add(c)
            log.warning("lease on channel(s) %s lost (found in a transaction): stopped acting for them",
                        ", ".join(sorted(lost)))
            try:
                self.on_change()
            except Exception:  # (the gateway's loop closing at a stop): the rollback matters, not the news
                log.debug("lease change not announced", exc_info=True)
            raise LeaseLost(lost)

    def acting_meters(self, engine) -> np.ndarray:
        """Per meter number: is it on a channel this instance acts for?"""
        key = (frozenset(self.acting), len(engine.meters))
        if self._meter_cache is None or self._meter_cache[0] != key:
            self._meter_cache = (key, np.array([m.channel in self.acting for m in engine.meters], dtype=bool))
        return self._meter_cache[1]

    def account_channel(self, engine, account_id: str) -> str:
        return owner_channel(engine, engine.account_no[account_id], self.home)

    def owned_accounts(self, engine) -> np.ndarray:
        """Per account number: does this instance act for it (its channel, :func:`owner_channel`, is acting)?"""
        key = (frozenset(self.acting), len(engine.meters), len(engine.account_ids))
        if self._owner_cache is None or self._owner_cache[0] != key:
            owners = owner_channels(engine, self.home)
            self._owner_cache = (key, np.array([c in self.acting for c in owners], dtype=bool))
        return self._owner_cache[1]
