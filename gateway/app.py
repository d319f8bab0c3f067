"""Composition root: a running gateway from its parts (store, channels, policies) on a real clock.

One writer thread owns the store; on the event loop run a poll loop per channel (every meter, one exchange at
a time; DL/T 645 buses, Modbus lines, MQTT concentrators alike), the command executor (closes first, paced by
the channels) and a ticker (notice timeouts, gates, dispatch, escalation). A payment wakes the executor at
once: its close does not wait for the next tick.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable

from gateway.clock import Clock, SystemClock, local_naive
from gateway.cluster import NotHeld, log_failure
from gateway.core.control import ControlConfig, NoticeReceiptIn
from gateway.core.dispatch import FieldUpdate
from gateway.core.model import Adjustment, Payment
from gateway.core.policy import AreaFlag, Forecast
from gateway.core.readings import Reading
from gateway.core.thresholds import ThresholdPolicy
from gateway.costcontrol import CostControl
from gateway.southbound.channel import Channel
from gateway.southbound.dlt645 import Bus  # (the DL/T 645 channel, also named here for callers)
from gateway.southbound.executor import CommandExecutor
from gateway.southbound.readings import to_batch
from gateway.store import open_store
from gateway.writer import Writer

log = logging.getLogger(__name__)


class Gateway:
    def __init__(self, store_url: str, channels: list[Channel], config: ControlConfig | None = None,
                 policy: ThresholdPolicy | None = None, clock: Clock | None = None, poll_interval_s: float = 900.0,
                 tick_s: float = 1.0, cluster=None) -> None:
        self.clock = clock or SystemClock()
        self.config = config or ControlConfig()
        self.store_url = store_url
        self.policy = policy
        self.channels = channels
        self.poll_interval_s = poll_interval_s
        self.tick_s = tick_s
        self.writer = Writer()
        #: several instances (gateway/cluster.py): the leases say which channels this one polls and acts for
        self.cluster = cluster
        #: with leases, how often the inbox is looked at without a notification (and the channels re-checked)
        self.inbox_every_s = 5.0
        self.control: CostControl | None = None
        self.executor: CommandExecutor | None = None
        self.readings_seen = 0
        #: called on the event loop with (channel, reading, seconds) as each meter's reading arrives in a poll
        #: cycle, before it is committed (metrics, progress bars); ``seconds`` is the time the channel took for
        #: it (its exchanges: a cycle reads one meter after another)
        self.reading_hooks: list[Callable[[Channel, Reading, float], None]] = []
        self.cycle_s: dict[str, float] = {}  # channel name -> how long its last full read cycle took (s)

    async def open(self) -> "Gateway":
        self.control = await self.writer.call(CostControl, open_store(self.store_url), self.config, self.policy,
                                              self.clock.now())
        offset = self.config.calendar.utc_offset_s
        local = local_naive(self.clock, offset)
        drivers = {channel.name: channel.bind(local, offset) for channel in self.channels}
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.check_config)  # (a clear refusal at start-up)
            await self.writer.call(self.control.attach, self.cluster, self.clock.now())
        self.writer.group = lambda: self.control.group(self.clock.now())  # group commit (gateway/writer.py)
        self.executor = CommandExecutor(self.control, self.writer, drivers,
                                        lambda m: self.control.engine.meter(m).channel, self.clock,
                                        may_send=self.cluster.may_send if self.cluster is not None else None)
        return self

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        if self.control is not None:
            await self.writer.call(self.control.store.close)
        self.writer.close()

    # -- inputs -------------------------------------------------------------------------------------------
    async def credits(self, items: list[Payment | Adjustment]):
        """Payments in: committed (with any close they cause) before this returns, then the executor woken."""
        return await self._commit(self.control.ingest_credits, items)

    async def _commit(self, method, *args):
        """An input committed through the writer; the executor woken when it made relay work."""
        result = await self.writer.call_grouped(method, *args, self.clock.now())
        if getattr(result, "decisions", None) or getattr(result, "commands", None):
            self.executor.wake()
        return result

    async def receipts(self, receipts: list[NoticeReceiptIn]):
        return await self._commit(self.control.ingest_receipts, receipts)

    async def field_updates(self, updates: list[FieldUpdate]):
        return await self._commit(self.control.ingest_field_updates, updates)

    async def area_flag(self, flag: AreaFlag):
        return await self._commit(self.control.set_area_flag, flag)

    async def forecast(self, forecast: Forecast):
        return await self._commit(self.control.set_forecast, forecast)

    async def tariffs(self, tariffs: dict):
        return await self._commit(self.control.change_tariffs, tariffs)

    async def poll_once(self, channel: Channel) -> None:
        """One read cycle of a channel, committed as one batch (with the relay positions it saw)."""
        readings: list[Reading] = []
        started = asyncio.get_running_loop().time()
        await channel.cycle(self._timed_sink(channel, readings) if self.reading_hooks else readings.append)
        self.cycle_s[channel.name] = asyncio.get_running_loop().time() - started
        await self._ingest(readings)

    async def read_meter(self, meter_id: str) -> Reading:
        """One meter read now, on its channel with the line reserved (a poll or a relay command on it waits),
        and committed like a poll's readings. :class:`KeyError` for a meter not known here, :class:`LookupError`
        for one whose channel this gateway does not run."""
        bus = self.control.engine.meter(meter_id).channel
        channel = next((c for c in self.channels if c.name == bus), None)
        if channel is None:
            raise LookupError(f"meter {meter_id} is on channel {bus!r}, which this gateway does not run")
        if not self.control.owns_channel(bus):
            raise NotHeld(meter_id, bus, await asyncio.to_thread(self.control.cluster.holder, bus))
        async with self.executor.drivers[bus].reserved():
            started = time.perf_counter()
            reading = await channel.read_meter(meter_id)
            seconds = time.perf_counter() - started
        self._heard(channel, reading, seconds)
        await self._ingest([reading])
        return reading

    async def _ingest(self, readings: list[Reading]) -> None:
        batch, relays = to_batch(readings, self.control.engine, self.config.calendar.utc_offset_s)
        result = await self.writer.call(self.control.ingest_readings, batch, self.clock.now(), relays)
        self.readings_seen += len(readings)
        if result.decisions:
            self.executor.wake()

    def _timed_sink(self, channel: Channel, readings: list[Reading]):
        """A cycle reads its meters one after another: the time since the last reading (or the cycle's start)
        is this meter's."""
        last = time.perf_counter()

        def sink(reading: Reading) -> None:
            nonlocal last
            now = time.perf_counter()
            readings.append(reading)
            self._heard(channel, reading, now - last)
            last = time.perf_counter()

        return sink

    def _heard(self, channel: Channel, reading: Reading, seconds: float) -> None:
        for hook in list(self.reading_hooks):  # a hook may remove itself
            try:
                hook(channel, reading, seconds)
            except Exception:
                log.exception("a reading hook failed")

    # -- loops --------------------------------------------------------------------------------------------
    async def _poll(self, channel: Channel, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = asyncio.get_running_loop().time()
            try:
                await self.poll_once(channel)
            except Exception:
                log_failure(log, "poll cycle on %s failed", channel.name)
            rest = self.poll_interval_s - (asyncio.get_running_loop().time() - started)
            await _sleep_or_stop(stop, max(rest, 0.0))

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                fx = await self.writer.call(self.control.tick, self.clock.now())
                if fx.commands:
                    self.executor.wake()
            except Exception:
                log_failure(log, "tick failed")
            await _sleep_or_stop(stop, self.tick_s)

    async def run(self, stop: asyncio.Event) -> None:
        executor = asyncio.create_task(self.executor.run(stop))
        tasks = [executor, asyncio.create_task(self._tick(stop))]
        if self.cluster is None:
            tasks += [asyncio.create_task(self._poll(c, stop)) for c in self.channels]
        else:
            tasks.append(asyncio.create_task(self._leases(stop, executor)))
        await asyncio.gather(*tasks)

    # -- several instances ------------------------------------------------------------------------------
    async def _leases(self, stop: asyncio.Event, executor: asyncio.Task) -> None:
        """The lease keeper started; whenever the leases change, the gateway rescoped (engine and controller
        reloaded after the takeover, polls started and stopped, excess handed over); the inbox drained when
        notified, after every change and every ``inbox_every_s``. On stop the leases are handed back once the
        buses are quiet (:meth:`_quiet`)."""
        loop = asyncio.get_running_loop()
        changed, inbox = asyncio.Event(), asyncio.Event()
        cluster = self.cluster
        cluster.on_change = lambda: loop.call_soon_threadsafe(changed.set)
        cluster.on_inbox = lambda channel: loop.call_soon_threadsafe(inbox.set)
        await asyncio.to_thread(cluster.start)
        polls: dict[str, asyncio.Task] = {}
        changed.set()
        try:
            while not stop.is_set():
                if changed.is_set():
                    changed.clear()
                    try:
                        if await self._rescope(polls, stop):
                            inbox.set()
                    except Exception:
                        log.exception("taking up the leases' channels failed; trying again")
                        await _sleep_or_stop(stop, 0.5)
                        changed.set()
                        continue
                if inbox.is_set():
                    inbox.clear()
                    try:
                        if await self.writer.call(self.control.drain_inbox, self.clock.now()):
                            self.executor.wake()
                    except Exception:
                        log_failure(log, "draining the inbox failed; trying again")
                waits = [asyncio.ensure_future(e.wait()) for e in (changed, inbox, stop)]
                done, _ = await asyncio.wait(waits, timeout=self.inbox_every_s, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                if not done:
                    inbox.set()
        finally:
            for task in polls.values():
                task.cancel()
            await asyncio.gather(*polls.values(), return_exceptions=True)
            async with contextlib.AsyncExitStack() as quiet:
                await asyncio.to_thread(cluster.stop, await self._quiet(executor, quiet))

    async def _quiet(self, executor: asyncio.Task, held: contextlib.AsyncExitStack) -> bool:
        """At a stop, before the leases are handed back: the executor has finished the step it was in (its
        result committed) and every bus is reserved in ``held`` (an exchange in progress, an operator's read,
        ends first; nothing starts after). Else the next holder could read a relay back before our frame is
        out, and send again. False when that takes longer than the ttl: the leases are then left to expire
        (the executor's local deadline stops frames before that)."""
        try:
            async with asyncio.timeout(self.cluster.ttl_s):
                await asyncio.wait([executor])
                for name in sorted(self.executor.drivers):
                    await held.enter_async_context(self.executor.drivers[name].reserved())
            return True
        except TimeoutError:
            log.warning("a relay exchange did not end within %.0f s of the stop: the leases are left to expire",
                        self.cluster.ttl_s)
            return False

    async def _rescope(self, polls: dict[str, asyncio.Task], stop: asyncio.Event) -> bool:
        """Act for the channels the leases say; True if some were taken up (drain their inbox). What is given
        up is what actually runs (poll tasks) or was acted for, less what is wanted: a lease the fence found
        lost is no longer in ``acting``, but its poll loop and its link still are."""
        cluster = self.cluster
        fenced = cluster.take_fenced()
        wanted, acting = cluster.wanted(), dict(cluster.acting)
        gone = (set(acting) | set(polls) | fenced) - set(wanted)
        by_name = {c.name: c for c in self.channels}
        for name in gone:  # their readings would be dropped anyway: stop reading
            task = polls.pop(name, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        gained = {c for c, e in wanted.items() if acting.get(c) != e}
        async with contextlib.AsyncExitStack() as held:
            # the buses given up are held first: a relay exchange in progress, and the result it commits, end
            # before the reload forgets its command and before the lease is handed over
            for name in sorted(gone):
                if name in self.executor.drivers:
                    await held.enter_async_context(self.executor.drivers[name].reserved())
            started = time.perf_counter()
            # (after a lost lease always: memory may still have the lost channel's cases and commands)
            if await self.writer.call(self.control.rescope, wanted, self.clock.now()):
                log.info("acting for channel(s) %s (%s); reloaded in %.2f s", ", ".join(sorted(wanted)) or "none",
                         "; ".join(x for x in (f"took {', '.join(sorted(gained))}" if gained else "",
                                                f"gave up {', '.join(sorted(gone))}" if gone else "") if x),
                         time.perf_counter() - started)
            for name in sorted(cluster.releasing - set(cluster.acting)):
                await asyncio.to_thread(cluster.release, name)
        for name in gone:
            channel = by_name.get(name)
            if isinstance(channel, Bus):
                # a TCP serial server often takes one connection at a time: leave the line to its new holder
                # (the link opens again by itself if this instance takes the channel back)
                await channel.close()
        for name in cluster.acting:
            task = polls.get(name)
            if (task is None or task.done()) and name in by_name:
                polls[name] = asyncio.create_task(self._poll(by_name[name], stop), name=f"poll {name}")
        if gained:
            self.executor.wake()
        return bool(gained)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
