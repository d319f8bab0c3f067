"""kill -9 the gateway while payments pour in over MQTT: none is lost, none counted twice; consumers see the
dead gateway through its last will, and every payment's confirmation arrives (once, by id) after the restart."""
import asyncio
import sys
from pathlib import Path

import pytest

from gateway.store import open_store
from simulators.billing import BillingSim

from .child_process import kill, until_line

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


async def spawn(url: str, broker, accounts: int) -> asyncio.subprocess.Process:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.mqtt_crash_child", url, broker.host, str(broker.port), str(accounts),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await until_line(p, "ready", 30)
    return p


async def test_killed_mid_burst_no_payment_is_lost_or_counted_twice(store_url, broker):
    n, accounts, kills = 6000, 50, 2
    store = None
    child = await spawn(store_url, broker, accounts)
    try:
        store = open_store(store_url)
        count = lambda: store._query("SELECT COUNT(*) FROM ledger WHERE kind = 'payment'")[0][0]  # noqa: E731
        with BillingSim(broker.host, broker.port, in_flight=200) as billing:
            for k in range(kills):
                for i in range(k * n // kills, (k + 1) * n // kills):
                    billing.pay(f"A{i % accounts}", "1.00", f"K{i:05d}")
                floor = count()
                while count() < floor + 300:  # mid-burst: payments committed, others in flight
                    await asyncio.sleep(0.01)
                await kill(child)
                await asyncio.to_thread(billing.wait_for, lambda b: b.status["gw-crash"].state == "offline", 20,
                                        "the last will saying offline")
                child = await spawn(store_url, broker, accounts)
                await asyncio.to_thread(billing.wait_for, lambda b: b.status["gw-crash"].state == "online", 20,
                                        "online again")
            await asyncio.to_thread(billing.wait_acked, 60)
            deadline = asyncio.get_running_loop().time() + 60
            while count() < n and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(billing.wait_for, lambda b: len(b.applied) == n, 60,
                                    "every payment confirmed")
        rows = store._query("SELECT entry_id, amount_fen FROM ledger WHERE kind = 'payment'")
        assert sorted(pid for pid, _ in rows) == [f"K{i:05d}" for i in range(n)]
        assert all(fen == 100 for _, fen in rows)
        per_account = dict(store._query(
            "SELECT a.account_id, SUM(l.amount_fen) FROM ledger l JOIN accounts a ON a.account_no = l.account_no "
            "GROUP BY a.account_id"))
        assert {k: int(v) for k, v in per_account.items()} == {f"A{i}": n // accounts * 100 for i in range(accounts)}
    finally:
        await kill(child)
        if store is not None:
            store.close()
