"""A gateway on a fast-forwarded clock against simulated DL/T 645 meters over real TCP.

Real parts: the meter simulator behind a TCP listener, the DL/T 645 client and poller, the relay driver and
executor, the writer thread and a real store. Only time is virtual: a manual clock that the meters and the
gateway share, moved from one due instant to the next, so days pass in a second or two. Upstream systems
(notification delivery) are played here: they read notice requests from the outbox and answer with receipts.
"""
from __future__ import annotations

from gateway.app import Bus, Gateway
from gateway.clock import ManualClock, local_naive
from gateway.core.control import ControlConfig, NoticeReceiptIn
from gateway.core.model import Account, Meter
from gateway.core.notices import ReceiptOutcome
from protocols.dlt645.client import Dlt645Link, LinkSettings
from simulators.dlt645 import SimBus, SimMeter, serve_tcp

from .core_fixtures import POLICY, tariffs

FAST = LinkSettings(baud=9600, turnaround_s=0.3, margin_s=0.1, retries=1)


def deliver_first_channel(request) -> tuple[ReceiptOutcome, float] | None:
    return ReceiptOutcome.DELIVERED, 60


class Harness:
    def __init__(self, store_url: str, t0: float, fleet: list[tuple[SimMeter, Account]],
                 config: ControlConfig | None = None, deliver=deliver_first_channel, poll_every_s: float = 3600,
                 modes: dict[str, str] | None = None):
        """``fleet``: each simulated meter with the account it belongs to; ``modes``: reconnect mode by meter."""
        self.clock = ManualClock(t0)
        self.store_url = store_url
        self.sims = {m.address: m for m, _ in fleet}
        self.owner = {m.address: a.account_id for m, a in fleet}
        self.accounts = list({a.account_id: a for _, a in fleet}.values())
        self.modes = modes or {}
        self.config = config or ControlConfig()
        self.deliver = deliver
        self.poll_every_s = poll_every_s
        self.pending: list[tuple[float, str, ReceiptOutcome]] = []
        self.outbox_seq = 0
        self.events: list[tuple] = []  # (seq, event_id, kind, subject, at, payload), everything published
        self.executor_paused = False  # tests that step the executor themselves

    async def open_channel(self):
        """The line the meters are on: a simulated DL/T 645 bus over TCP (a subclass may put them elsewhere)."""
        # no turnaround delay: the line's real time is not what these tests are about (bench/ measures it)
        self.bus = SimBus.of(self.sims.values(), clock=local_naive(self.clock), turnaround_s=0.0)
        self.server = await serve_tcp(self.bus)
        port = self.server.sockets[0].getsockname()[1]
        self.link = Dlt645Link.tcp("127.0.0.1", port, FAST)
        return Bus(self.link, list(self.sims))

    async def close_channel(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def __aenter__(self) -> "Harness":
        channel = await self.open_channel()
        self.gw = await Gateway(self.store_url, [channel], self.config, POLICY, self.clock).open()
        self.cc, self.executor, self.writer = self.gw.control, self.gw.executor, self.gw.writer
        if not self.cc.engine.account_ids:
            await self.call(self.cc.accounting.register, tariffs(), self.accounts,
                            [Meter(addr, self.owner[addr], channel=channel.name, max_kw=30,
                                   reconnect_mode=self.modes.get(addr, "direct")) for addr in self.sims])
        self.next_poll = self.clock.now()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.gw.close()
        await self.close_channel()

    # -- the world -----------------------------------------------------------------------------------
    async def call(self, fn, *args, **kw):
        return await self.writer.call(fn, *args, **kw)

    async def poll(self) -> None:
        for channel in self.gw.channels:
            await self.gw.poll_once(channel)

    async def publish(self) -> list[tuple]:
        """Read new outbox events as upstream would, and answer notice requests."""
        new = await self.call(self.cc.store.outbox, self.outbox_seq)
        for ev in new:
            self.outbox_seq = ev[0]
            self.events.append(ev)
            if ev[2] == "notice_request":
                answer = self.deliver(ev[5])
                if answer is not None:
                    outcome, delay = answer
                    self.pending.append((self.clock.now() + delay, ev[5]["request_id"], outcome))
        return new

    async def settle(self) -> None:
        """Everything due at this instant: executor steps, receipts, ticks, polls; until nothing moves."""
        for _ in range(50):
            now = self.clock.now()
            done = 0 if self.executor_paused else await self.executor.drain()
            await self.call(self.cc.tick, now)
            due = sorted(p for p in self.pending if p[0] <= now)
            for p in due:
                self.pending.remove(p)
                await self.call(self.cc.ingest_receipts, [NoticeReceiptIn(p[1], p[2], p[0])], now)
            if now >= self.next_poll:
                await self.poll()
                self.next_poll = now + self.poll_every_s
            new = await self.publish()
            if not done and not due and not new:
                return
        raise AssertionError("the gateway did not settle")

    async def run_until(self, t_end: float) -> None:
        while True:
            await self.settle()
            now = self.clock.now()
            if now >= t_end:
                return
            nxt = await self.call(self.cc.controller.next_wakeup)
            times = [t for t in (nxt, self.next_poll, min((p[0] for p in self.pending), default=None), t_end)
                     if t is not None and t > now]
            self.clock.set(min(times))

    async def run_for(self, seconds: float) -> None:
        await self.run_until(self.clock.now() + seconds)

    async def until_trip_queued(self, limit_s: float = 7 * 86400):
        """Run with the executor paused until a trip command is queued; return it (not yet sent)."""
        self.executor_paused = True
        end = self.clock.now() + limit_s
        while self.clock.now() < end:
            await self.run_for(600)
            queued = [c for c in self.cc.controller.commands.values()
                      if c.action.value == "trip" and c.state.value == "queued"]
            if queued:
                self.executor_paused = False
                return queued[0]
        raise AssertionError("no trip command was queued")

    # -- looking -------------------------------------------------------------------------------------------
    def of(self, kind: str) -> list[dict]:
        return [e[5] for e in self.events if e[2] == kind]

    def relay_actions(self, address: str, action: str | None = None) -> list:
        return [r for r in self.sims[address].relay_log if action is None or r[1] == action]
