"""kill -9 in the middle of relay commands: no relay action is lost or applied twice.

A real gateway child process drives a simulated meter over TCP and is killed with SIGKILL at the worst
moments (SENDING committed but nothing on the wire; the frame acted but its result not committed) and at
random ones. After each restart a command that may have been sent is read back before anything is re-sent.
The meter's own relay log, which no one can argue with, must show each command's action exactly once.
"""
import asyncio
import random
import sys
from pathlib import Path

import pytest

from gateway.clock import SystemClock, local_naive
from gateway.core.commands import CommandState
from gateway.store import open_store
from simulators.dlt645 import SimBus, SimMeter, serve_tcp

from .child_process import kill, until_line

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
pytestmark = pytest.mark.slow


async def spawn(url: str, port: int, pause: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.relay_crash_child", url, "127.0.0.1", str(port), pause, str(STEPS), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_killed_mid_command_no_relay_action_is_lost_or_repeated(store_url):
    # the contact takes longer to move than the gateway takes to restart: a read right after the restart still
    # sees the old position, and only waiting out the settle time tells the frame acted
    meter = SimMeter("000000000001", relay_delay_s=1.0)
    server = await serve_tcp(SimBus.of([meter], clock=local_naive(SystemClock()), turnaround_s=0.0))
    port = server.sockets[0].getsockname()[1]
    try:
        # 1. killed with SENDING committed and nothing on the wire
        p = await spawn(store_url, port, "after_authorize")
        await until_line(p, "paused")
        await kill(p)
        assert meter.relay_log == []
        # 2. killed right after the frame acted, before its result was committed
        p = await spawn(store_url, port, "after_send")
        await until_line(p, "paused")
        await kill(p)
        assert [a for _, a, _ in meter.relay_log] == ["trip"]
        # 3. killed at random moments while commands come and go
        rng = random.Random(4)
        for _ in range(3):
            p = await spawn(store_url, port, "none")
            await asyncio.sleep(rng.uniform(0.4, 1.5))
            await kill(p)
        p = await spawn(store_url, port, "none")
        lines = await until_line(p, "done")
        await p.wait()
        assert p.returncode == 0, lines
    finally:
        server.close()
        await server.wait_closed()
    actions = [a for _, a, _ in meter.relay_log]
    assert actions == ["trip", "direct_close"] * (STEPS // 2), actions  # each command acted exactly once
    store = open_store(store_url)
    try:
        commands = [store.command(f"manual:seq-{k}:000000000001") for k in range(STEPS)]
        assert all(c.state == CommandState.CONFIRMED for c in commands)
        # the first command: counted as possibly sent before the first kill, found closed, sent once more
        assert commands[0].attempts == 2
        assert "restarted while sending" in " ".join(h["detail"] for h in commands[0].history)
        audit = [a[4] for a in store.audit_log("000000000001")]
        assert audit.count("relay_trip_requested") == STEPS // 2  # re-asked on every start, recorded once
    finally:
        store.close()
