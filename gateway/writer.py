"""The store's single writer: one thread runs every transaction, one at a time.

The asyncio side (pollers, executor, northbound) never touches the store directly: it awaits
``writer.call(fn, ...)``, so transactions never interleave and the event loop never blocks on a commit.

Group commit: calls made with :meth:`Writer.call_grouped` that are waiting in the queue together run in ONE
outer transaction (``group()``, e.g. :meth:`gateway.costcontrol.CostControl.group`: each call's own
transaction a savepoint in it), so they share one COMMIT, one fsync. Each call's result (or error) is handed
back only after that COMMIT: durable before acknowledged, and a relay frame sent on an ``authorize`` result
always has its SENDING committed. A call that fails is rolled back to its savepoint and only its caller gets
the error; a COMMIT that fails fails every call of the group.

Grouped calls go first: they are the small ones a customer waits on (a payment, a relay command's gate check
and outcome), which otherwise queued behind read cycles' batches, tick work and the outbox. Ungrouped calls
run in the order asked among themselves, each waiting at most ``MAX_BEHIND_S`` behind grouped ones (never
starved).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ContextManager

#: at most this many calls share a commit: each one's caller waits for the whole group's work
MAX_GROUP = 64
#: an ungrouped call (a read cycle's batch, the tick, the outbox) waits at most this long behind grouped ones
MAX_BEHIND_S = 0.25


@dataclass
class _Call:
    fn: Callable
    args: tuple
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)
    asked: float = field(default_factory=time.monotonic)


class Writer:
    def __init__(self) -> None:
        #: ``group()``: the context manager of one outer transaction; set once what it groups exists (the
        #: cost-control shell is built on this thread, through a call); None: every call commits alone
        self.group: Callable[[], ContextManager] | None = None
        #: group commits made, and the calls they held (metrics, benchmarks)
        self.groups = self.grouped_calls = 0
        self._ready = threading.Condition()
        self._first: deque[_Call] = deque()  # grouped calls
        self._rest: deque[_Call] = deque()  # the others
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="feikong-writer", daemon=True)
        self._thread.start()

    async def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the writer thread, committing on its own."""
        return await self._submit(fn, args, kwargs, False)

    async def call_grouped(self, fn, *args, **kwargs):
        """Like :meth:`call`, but ``fn`` goes ahead of ungrouped calls and may share its commit with other
        grouped calls waiting with it; its result comes back only once that commit is done."""
        return await self._submit(fn, args, kwargs, True)

    def _submit(self, fn, args, kwargs, grouped: bool) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._ready:  # (checked under the lock: a call let in after close() would never be answered)
            if self._closed:
                raise RuntimeError("no calls to the writer after its shutdown (close())")
            (self._first if grouped else self._rest).append(_Call(fn, args, kwargs, loop, future))
            self._ready.notify()
        return future

    def pending(self) -> int:
        """Calls waiting for the writer thread (the one it is running not counted)."""
        return len(self._first) + len(self._rest)

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    # -- the writer thread -------------------------------------------------------------------------------
    def _next(self) -> list[_Call] | None:
        """What to run next: an ungrouped call, or up to MAX_GROUP grouped ones; None once stopped and empty."""
        with self._ready:
            while not self._first and not self._rest:
                if self._closed:
                    return None
                self._ready.wait()
            rest = self._rest
            if rest and (not self._first or time.monotonic() - rest[0].asked >= MAX_BEHIND_S):
                return [rest.popleft()]
            first = self._first
            return [first.popleft() for _ in range(min(MAX_GROUP, len(first)))]

    def _run(self) -> None:
        while (batch := self._next()) is not None:
            if len(batch) == 1 or self.group is None:
                for item in batch:
                    self._settle(item, *_invoke(item))
            else:
                self._run_group(batch)

    def _run_group(self, batch: list[_Call]) -> None:
        outcomes = []
        try:
            with self.group():
                for item in batch:
                    outcomes.append(_invoke(item))
        except BaseException as exc:  # the COMMIT (or the group itself) failed: nothing of it is durable
            for item in batch:
                self._settle(item, False, exc)
            return
        self.groups += 1
        self.grouped_calls += len(batch)
        for item, outcome in zip(batch, outcomes):
            self._settle(item, *outcome)

    @staticmethod
    def _settle(item: _Call, ok: bool, value) -> None:
        def put() -> None:
            if item.future.done():  # its caller gave up waiting (cancelled)
                return
            if ok:
                item.future.set_result(value)
            else:
                item.future.set_exception(value)
        try:
            item.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass


def _invoke(item: _Call) -> tuple[bool, object]:
    try:
        return True, item.fn(*item.args, **item.kwargs)
    except BaseException as exc:
        return False, exc
