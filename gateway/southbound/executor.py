"""The command executor: relay commands onto the wire, one exchange at a time per bus, buses in parallel.

It asks the cost-control shell (through the single writer) which steps are due, most urgent first
(closes before trips), and performs them:

* **send**: reserve the bus, then ask the shell to authorise the send (the last gate check, with a fresh
  balance, and SENDING committed), then put the frame on the line; the bus stays reserved in between, so a
  payment committed before the check is always seen, and nothing queues between a trip's check and its frame
  (closes checked together go out back to back, below). Until then a command is QUEUED, and an operator may
  still cancel it;
* **read**: read the relay back (status word 3) and report it, for a command being verified, a command whose
  last outcome is unknown, or a completed field order.

Every writer call here is a grouped one (:meth:`gateway.writer.Writer.call_grouped`: ahead of the read
cycles' batches, and the steps of many buses share a commit), and a result (a permit to send) comes back
only once it is committed.

Settling is not waited out on the bus: after a frame the bus serves other meters, and the verification read
is a step of its own, due a moment later. So a batch of trips on one bus is paced by the bus.

A bus's steps are taken up to ``batch`` at a time (:meth:`gateway.core.control.Controller.next_steps`): the
closes' sends under one check, back to back, then the reads, the bus held for the whole batch (polling
waits), and all their outcomes, with the bus's next steps, in one writer call. At 100,000 meters a paid
customer's close otherwise waited for three writer round trips per close ahead of it on its bus. A trip's
send is never batched: its check stays right before its own frame. In real time a bus's worker with nothing
due stays for a read-back due within ``linger_s`` and does it when due, without asking again, rather than
leave it to the next pass.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from gateway.clock import Clock
from gateway.core.commands import StepKind
from gateway.core.control import BusWork, SendResult, Step
from gateway.core.policy import Block
from gateway.costcontrol import CostControl
from gateway.writer import Writer

from .relay import RelayDriver, RelayDriverError, RelayLinkDown, RelayNoAnswer, RelayRefused

log = logging.getLogger(__name__)


class CommandExecutor:
    def __init__(self, control: CostControl, writer: Writer, drivers: dict[str, RelayDriver],
                 bus_of: Callable[[str], str], clock: Clock, may_send: Callable[[str], bool] | None = None,
                 batch: int = 16, linger_s: float = 2.0) -> None:
        """``drivers``: bus name -> driver; ``bus_of``: meter id -> bus name; ``may_send(bus)``: asked right
        before a frame goes out (several instances: this one's lease on the bus surely still holds);
        ``batch``: at most this many steps of a bus back to back between writer round trips; ``linger_s``: in
        real time, a bus's worker with nothing due waits this long at most for the bus's next step (a
        read-back due a moment after its frame) instead of leaving it to the next pass."""
        self.control = control
        self.writer = writer
        self.drivers = drivers
        self.bus_of = bus_of
        self.clock = clock
        self.may_send = may_send
        self.batch = batch
        self.linger_s = linger_s
        self._wake = asyncio.Event()
        self._lingering: dict[str, asyncio.Event] = {}  # bus -> set when a step of it is due now

    def wake(self) -> None:
        """Something new may be due (a payment made a close): look now, not at the next wakeup."""
        self._wake.set()

    async def drain(self) -> int:
        """Perform every step due now; buses in parallel, one step at a time on each. Returns steps done."""
        buses = sorted(await self.writer.call_grouped(self.control.due_buses, self.clock.now()))
        done = await asyncio.gather(*(self._drain_bus(bus) for bus in buses), return_exceptions=True)
        for bus, result in zip(buses, done):
            if isinstance(result, BaseException):
                log.error("bus %s: executor pass failed: %r", bus, result)
        return sum(d for d in done if isinstance(d, int))

    async def _drain_bus(self, bus: str, stop: asyncio.Event | None = None) -> int:
        """A bus's steps due now, batch after batch; with ``stop`` (real time), then those falling due within
        ``linger_s``, each when it is due."""
        n = 0
        if stop is not None and stop.is_set():
            return n
        nxt = await self.writer.call_grouped(self._next, bus)
        while True:
            if nxt.steps:
                # the next steps come back with the last ones' outcomes, asked afresh: a close made meanwhile
                # goes first
                n += len(nxt.steps)
                nxt = await self._perform(nxt.steps, next_on=bus)
                if stop is not None and stop.is_set():
                    return n
                continue
            if stop is None:
                return n
            # nothing due now: a step due soon (a close's read-back, half a second after its frame) waited for
            # the next pass, a new worker and a writer round trip to hand it over
            at = min((s.due_at for s in nxt.soon), default=nxt.due_at)
            delay = None if at is None else at - self.clock.now()
            if delay is None or delay > self.linger_s or (delay <= 0 and not nxt.soon):
                return n
            woken = delay > 0 and await self._linger(bus, delay, stop)
            if stop.is_set():
                return n
            now = self.clock.now()
            ready = [s for s in nxt.soon if s.due_at <= now]
            if woken or not ready:  # something else came due on the bus: ask
                nxt = await self.writer.call_grouped(self._next, bus)
            else:  # the read-backs we were told of: no need to ask again
                nxt = BusWork(ready, [], None)

    async def _linger(self, bus: str, delay: float, stop: asyncio.Event) -> bool:
        """Wait ``delay`` s, or less: until the run loop sees a step of the bus due (a payment's close; True)
        or stop."""
        due = self._lingering[bus] = asyncio.Event()
        waits = [asyncio.ensure_future(due.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            return due.is_set()
        finally:
            for w in waits:
                w.cancel()
            del self._lingering[bus]

    def _next(self, bus: str) -> BusWork:
        """On the writer thread: the bus's steps due now, its read-backs due within ``linger_s`` (its worker
        does them when due, without asking again), and when its next step falls due."""
        return self.control.bus_work(self.clock.now(), bus, self.batch, self.linger_s)

    async def perform(self, step: Step) -> None:
        """Do one step now (its outcome committed)."""
        await self._perform([step], None)

    async def _perform(self, steps: list[Step], next_on: str | None) -> BusWork:
        """Do ``steps`` (all on one bus) back to back: the sends under one gate check (one writer call for all
        of them, the bus reserved from the check to the last frame), then the reads; their outcomes in one
        writer call. With ``next_on``, the same call returns that bus's next steps, when its next one is due and
        its read-backs due soon (one round trip fewer)."""
        bus = self.bus_of(steps[0].meter_id)
        driver = self.drivers.get(bus) or _Unconfigured(bus)
        sends = [s for s in steps if s.kind == StepKind.SEND]
        # the whole batch holds the bus: a poll exchange between each of its reads made a batch of sixteen
        # take sixteen of them longer, and the closes queued behind it waited that much more
        async with driver.reserved():
            reports = await self._send(driver, sends) if sends else []
            for step in steps:
                if step.kind != StepKind.SEND:
                    reports.append(await self._read(driver, step))
        return await self.writer.call_grouped(self._reported, reports, next_on)

    def _reported(self, reports: list[tuple], next_on: str | None) -> BusWork:
        """On the writer thread: the steps' outcomes, then (with ``next_on``) that bus's next steps. One outcome
        that cannot be committed is logged and the others still are (its command is rebuilt from the store,
        where its last committed state says what to do next)."""
        for report, args in reports:
            try:
                report(*args)
            except Exception:
                log.exception("reporting a step's outcome failed (%s %s)", report.__name__, args[0])
        return BusWork([], [], None) if next_on is None else self._next(next_on)

    async def _send(self, driver: RelayDriver, steps: list[Step]) -> list[tuple]:
        """The gate check, then the permitted frames; the caller holds the bus from before the check."""
        permits = await self.writer.call_grouped(self.control.authorize_many, [s.subject_id for s in steps],
                                                 self.clock.now())
        reports = []
        for step, permit in zip(steps, permits):
            if isinstance(permit, Block):  # its outcome already committed by the check
                log.info("command %s not sent: %s: %s", step.subject_id, permit.gate.value, permit.reason)
                continue
            outcome = await self._frame(driver, step, permit)
            reports.append((self.control.send_result, (step.subject_id, self.clock.now(), *outcome)))
        return reports

    async def _frame(self, driver: RelayDriver, step: Step, permit) -> tuple:
        """Put one permitted frame on the line: (result, detail, errors, status read after a refusal)."""
        try:
            # the line opened first (a TCP connect can take seconds): only the write follows the lease check
            await driver.open()
            if self.may_send is not None and not self.may_send(bus := self.bus_of(step.meter_id)):
                raise RelayLinkDown(f"the lease on bus {bus} may have lapsed: not sent", written=False)
            await driver.send(step.meter_id, permit.action, permit.mode, permit.valid_until)
            return SendResult.ACKNOWLEDGED, "", (), None
        except RelayNoAnswer as exc:
            return SendResult.NO_ANSWER, str(exc), (), None
        except RelayLinkDown as exc:
            return (SendResult.NO_ANSWER if exc.written else SendResult.NOT_SENT), str(exc), (), None
        except RelayRefused as exc:
            try:  # why? keep-power is a gate, anything else a refusal
                status = await driver.read(step.meter_id)
            except Exception:
                status = None
            return SendResult.REFUSED, str(exc), exc.errors, status
        except Exception as exc:  # whatever went wrong, the frame may have gone out: read back before more
            log.exception("meter %s: sending command %s failed", step.meter_id, step.subject_id)
            return SendResult.NO_ANSWER, f"{type(exc).__name__}: {exc}", (), None

    async def _read(self, driver: RelayDriver, step: Step) -> tuple:
        try:
            status = await driver.read(step.meter_id)
        except Exception as exc:
            if not isinstance(exc, RelayDriverError):
                log.exception("meter %s: reading the relay failed", step.meter_id)
            why = str(exc) if isinstance(exc, RelayDriverError) else f"{type(exc).__name__}: {exc}"
            return self.control.read_result, (step, self.clock.now(), None, why)
        return self.control.read_result, (step, self.clock.now(), status)

    async def run(self, stop: asyncio.Event, idle_s: float = 1.0, min_sleep_s: float = 0.01,
                  min_pass_s: float = 0.05) -> None:
        """Real time: a worker per bus with steps due, started as soon as its bus has work, so a close on one
        bus never waits behind another bus's slow exchanges (a silent meter's timeouts); between passes, sleep
        until the next step is due, a wake(), a worker finishing or ``idle_s`` (never less than
        ``min_sleep_s``: a step that cannot be done yet must not spin the loop). Passes are at least
        ``min_pass_s`` apart: each one scans every pending command, and at thousands of closes a second a pass
        per payment batch and per finished worker made those scans most of the writer's work (the queue behind
        it held closes for tens of seconds). On ``stop`` each worker finishes the step it is in."""
        workers: dict[str, asyncio.Task] = {}
        loop = asyncio.get_running_loop()
        last_pass = float("-inf")
        try:
            while not stop.is_set():
                gap = last_pass + min_pass_s - loop.time()
                if gap > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), gap)
                    except asyncio.TimeoutError:
                        pass
                    continue
                last_pass = loop.time()
                self._wake.clear()
                nxt = None
                try:
                    for bus in sorted(await self.writer.call_grouped(self.control.due_buses, self.clock.now())):
                        if bus not in workers:
                            workers[bus] = asyncio.create_task(self._drain_bus(bus, stop), name=f"executor {bus}")
                        elif (lingering := self._lingering.get(bus)) is not None:
                            lingering.set()
                    nxt = await self.writer.call_grouped(self.control.controller.next_step_at)
                except Exception:
                    log.exception("executor pass failed; trying again")
                now = self.clock.now()
                # a step due now may be a busy worker's or a bus's whose worker just finished: look again after
                # min_pass_s (waiting for a worker to finish held a read-back due on an idle bus up to idle_s)
                delay = idle_s if nxt is None else min(max(nxt - now, min_sleep_s), idle_s)
                waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                await asyncio.wait([*waits, *workers.values()], timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
                for bus, task in list(workers.items()):
                    if task.done():
                        del workers[bus]
                        if not task.cancelled() and task.exception() is not None:
                            log.error("bus %s: executor pass failed: %r", bus, task.exception())
        finally:
            await asyncio.gather(*workers.values(), return_exceptions=True)


class _Unconfigured:
    """The driver of a bus no channel was configured for: every exchange fails as a link that cannot be
    opened (nothing sent), so its commands back off, fail and reach a field crew like any unreachable meter."""

    def __init__(self, bus: str) -> None:
        self.name = bus
        self._lock = asyncio.Lock()

    def reserved(self):
        return self._lock

    async def open(self) -> None:
        raise RelayLinkDown(f"no channel configured for bus {self.name!r}", written=False)

    async def send(self, meter_id, action, mode, valid_until) -> None:
        raise RelayLinkDown(f"no channel configured for bus {self.name!r}", written=False)

    async def read(self, meter_id):
        raise RelayLinkDown(f"no channel configured for bus {self.name!r}", written=False)
