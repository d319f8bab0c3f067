"""The store's single writer: one thread runs every transaction, in the order asked.

The asyncio side (pollers, executor, northbound) never touches the store directly: it awaits
``writer.call(fn, ...)``, so transactions never interleave and the event loop never blocks on a commit.

Group commit: calls made with :meth:`Writer.call_grouped` that are waiting in the queue together run in ONE
outer transaction (``group()``, e.g. :meth:`gateway.costcontrol.CostControl.group`: each call's own
transaction a savepoint in it), so they share one COMMIT, one fsync. Each call's result (or error) is handed
back only after that COMMIT: durable before acknowledged, and a relay frame sent on an ``authorize`` result
always has its SENDING committed. A call that fails is rolled back to its savepoint and only its caller gets
the error; a COMMIT that fails fails every call of the group.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, ContextManager

#: at most this many calls share a commit: each one's caller waits for the whole group's work
MAX_GROUP = 64

_STOP = object()


@dataclass
class _Call:
    fn: Callable
    args: tuple
    kwargs: dict
    grouped: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class Writer:
    def __init__(self) -> None:
        #: ``group()``: the context manager of one outer transaction; set once what it groups exists (the
        #: cost-control shell is built on this thread, through a call); None: every call commits alone
        self.group: Callable[[], ContextManager] | None = None
        #: group commits made, and the calls they held (metrics, benchmarks)
        self.groups = self.grouped_calls = 0
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="feikong-writer", daemon=True)
        self._thread.start()

    async def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the writer thread, committing on its own."""
        return await self._submit(fn, args, kwargs, False)

    async def call_grouped(self, fn, *args, **kwargs):
        """Like :meth:`call`, but ``fn`` may share its commit with other grouped calls waiting with it; its
        result comes back only once that commit is done."""
        return await self._submit(fn, args, kwargs, True)

    def _submit(self, fn, args, kwargs, grouped: bool) -> asyncio.Future:
        if self._closed:
            raise RuntimeError("no calls to the writer after its shutdown (close())")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Call(fn, args, kwargs, grouped, loop, future))
        return future

    def pending(self) -> int:
        """Calls waiting for the writer thread (the one it is running not counted)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()

    # -- the writer thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        held = None  # a call taken from the queue while collecting a group, run next
        while True:
            item, held = (held if held is not None else self._queue.get()), None
            if item is _STOP:
                return
            if not item.grouped or self.group is None:
                self._settle(item, *_invoke(item))
                continue
            batch = [item]
            while len(batch) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or not nxt.grouped:
                    held = nxt
                    break
                batch.append(nxt)
            if len(batch) == 1:
                self._settle(item, *_invoke(item))
                continue
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
