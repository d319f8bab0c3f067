"""The command executor: relay commands onto the wire, one exchange at a time per bus, buses in parallel.

It asks the cost-control shell (through the single writer) which steps are due, most urgent first
(closes before trips), and performs them:

* **send**: reserve the bus, then ask the shell to authorise the send (the last gate check, with a fresh
  balance, and SENDING committed), then put the frame on the line; the bus stays reserved in between, so a
  payment committed before the check is always seen, and nothing queues between the check and the frame;
* **read**: read the relay back (status word 3) and report it, for a command being verified, a command whose
  last outcome is unknown, or a completed field order.

Every writer call here is a grouped one (:meth:`gateway.writer.Writer.call_grouped`): the steps of many buses
share a commit, and a result (a permit to send) comes back only once it is committed.

Settling is not waited out on the bus: after a frame the bus serves other meters, and the verification read
is a step of its own, due a moment later. So a batch of trips on one bus is paced by the bus.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from gateway.clock import Clock
from gateway.core.commands import StepKind
from gateway.core.control import SendResult, Step
from gateway.core.policy import Block
from gateway.costcontrol import CostControl
from gateway.writer import Writer

from .relay import RelayDriver, RelayDriverError, RelayLinkDown, RelayNoAnswer, RelayRefused

log = logging.getLogger(__name__)


class CommandExecutor:
    def __init__(self, control: CostControl, writer: Writer, drivers: dict[str, RelayDriver],
                 bus_of: Callable[[str], str], clock: Clock, may_send: Callable[[str], bool] | None = None) -> None:
        """``drivers``: bus name -> driver; ``bus_of``: meter id -> bus name; ``may_send(bus)``: asked right
        before a frame goes out (several instances: this one's lease on the bus surely still holds)."""
        self.control = control
        self.writer = writer
        self.drivers = drivers
        self.bus_of = bus_of
        self.clock = clock
        self.may_send = may_send
        self._wake = asyncio.Event()

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
        n = 0
        if stop is not None and stop.is_set():
            return n
        step = await self.writer.call_grouped(self.control.next_step, self.clock.now(), bus)
        while step is not None:
            # the next step comes back with the last one's outcome, asked afresh: a close made meanwhile goes first
            step = await self.perform(step, next_on=bus)
            n += 1
            if stop is not None and stop.is_set():
                break
        return n

    async def perform(self, step: Step, next_on: str | None = None) -> Step | None:
        """Do ``step``; with ``next_on``, the most urgent step due on that bus once its outcome is committed
        (asked in the same writer call: one round trip fewer per step)."""
        bus = self.bus_of(step.meter_id)
        driver = self.drivers.get(bus) or _Unconfigured(bus)
        if step.kind == StepKind.SEND:
            return await self._send(driver, step, next_on)
        return await self._read(driver, step, next_on)

    def _reported(self, report, args: tuple, next_on: str | None) -> Step | None:
        """On the writer thread: a step's outcome, then (with ``next_on``) that bus's next step."""
        report(*args)
        return None if next_on is None else self.control.next_step(self.clock.now(), next_on)

    async def _send(self, driver: RelayDriver, step: Step, next_on: str | None) -> Step | None:
        status = None
        errors: tuple[str, ...] = ()
        async with driver.reserved():
            permit = await self.writer.call_grouped(self.control.authorize, step.subject_id, self.clock.now())
            if isinstance(permit, Block):
                log.info("command %s not sent: %s: %s", step.subject_id, permit.gate.value, permit.reason)
                return await self.writer.call_grouped(self._reported, _nothing, (), next_on)
            try:
                # the line opened first (a TCP connect can take seconds): only the write follows the lease check
                await driver.open()
                if self.may_send is not None and not self.may_send(bus := self.bus_of(step.meter_id)):
                    raise RelayLinkDown(f"the lease on bus {bus} may have lapsed: not sent", written=False)
                await driver.send(step.meter_id, permit.action, permit.mode, permit.valid_until)
                result, detail = SendResult.ACKNOWLEDGED, ""
            except RelayNoAnswer as exc:
                result, detail = SendResult.NO_ANSWER, str(exc)
            except RelayLinkDown as exc:
                result, detail = (SendResult.NO_ANSWER if exc.written else SendResult.NOT_SENT), str(exc)
            except RelayRefused as exc:
                result, detail, errors = SendResult.REFUSED, str(exc), exc.errors
                try:  # why? keep-power is a gate, anything else a refusal
                    status = await driver.read(step.meter_id)
                except Exception:
                    status = None
            except Exception as exc:  # whatever went wrong, the frame may have gone out: read back before more
                log.exception("meter %s: sending command %s failed", step.meter_id, step.subject_id)
                result, detail = SendResult.NO_ANSWER, f"{type(exc).__name__}: {exc}"
        return await self.writer.call_grouped(
            self._reported, self.control.send_result,
            (step.subject_id, self.clock.now(), result, detail, errors, status), next_on)

    async def _read(self, driver: RelayDriver, step: Step, next_on: str | None) -> Step | None:
        try:
            status = await driver.read(step.meter_id)
        except Exception as exc:
            if not isinstance(exc, RelayDriverError):
                log.exception("meter %s: reading the relay failed", step.meter_id)
            why = str(exc) if isinstance(exc, RelayDriverError) else f"{type(exc).__name__}: {exc}"
            return await self.writer.call_grouped(self._reported, self.control.read_result,
                                                  (step, self.clock.now(), None, why), next_on)
        return await self.writer.call_grouped(self._reported, self.control.read_result,
                                              (step, self.clock.now(), status), next_on)

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


def _nothing() -> None:
    """The outcome of a send the gates blocked: already committed by ``authorize``."""


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
