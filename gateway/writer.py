"""The store's single writer: one thread runs every transaction, in the order asked.

The asyncio side (pollers, executor, northbound) never touches the store directly: it awaits
``writer.call(fn, ...)``, so transactions never interleave and the event loop never blocks on a commit.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor


class Writer:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feikong-writer")

    async def call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def pending(self) -> int:
        """Calls waiting for the writer thread (the one it is running not counted)."""
        return self._pool._work_queue.qsize()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
