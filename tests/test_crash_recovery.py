"""kill -9 at any moment: a restart rebuilds the engine from the store, loses no payment, duplicates no decision.

A real child process replays a deterministic stream (read cycles, payment bursts with duplicates and
late arrivals, glitching meters) into a real store and is killed with SIGKILL at random points, many of
them in the middle of a transaction; each restart replays the whole stream from the beginning. The end
state must equal that of an uninterrupted run of the same stream.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.store import open_store

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24


def child(url: str, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.crash_child", url, str(seed), str(STEPS)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_end(url: str, seed: int) -> None:
    p = child(url, seed)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.strip().endswith("done")


def state(url: str) -> dict:
    store = open_store(url)
    try:
        return {
            "decisions": store.decisions(),
            "ledger": store._query("SELECT entry_id, account_no, kind, amount_fen, at FROM ledger ORDER BY entry_id"),
            "readings": store._query("SELECT meter_no, t, total_wh, cost_ufen, ytd_wh FROM readings "
                                     "ORDER BY meter_no, t"),
            "held": store._query("SELECT meter_no, t, registers, reason FROM held_readings ORDER BY meter_no, t"),
            "states": store._query("SELECT account_no, state, seq FROM account_state ORDER BY account_no"),
        }
    finally:
        store.close()


def second_url(store_url: str, tmp_path, request) -> str:
    if store_url.startswith("sqlite://"):
        return f"sqlite://{tmp_path / 'reference.db'}"
    return request.getfixturevalue("pg_dsn_2")


def test_kill_9_at_random_points_loses_nothing_and_repeats_nothing(store_url, tmp_path, request):
    seed = 7
    reference = second_url(store_url, tmp_path, request)
    run_to_end(reference, seed)
    expected = state(reference)
    assert expected["decisions"] and expected["held"] and len(expected["ledger"]) > 50

    rng = random.Random(seed)
    kills = 0
    for _ in range(5):
        p = child(store_url, seed)
        target = rng.randrange(STEPS)
        for line in p.stdout:
            if line.strip() in (f"step {target}", "done"):
                break
        time.sleep(rng.uniform(0, 0.05))  # often lands inside the next step's transaction
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(timeout=30)
        p.stdout.close()
        p.stderr.close()
    assert kills >= 3
    run_to_end(store_url, seed)
    got = state(store_url)
    assert got["ledger"] == expected["ledger"]  # no payment lost or counted twice
    assert got["decisions"] == expected["decisions"]  # no decision missing or repeated
    assert got["readings"] == expected["readings"]
    assert got["held"] == expected["held"]
    assert got["states"] == expected["states"]
    ids = [d[0] for d in got["decisions"]]
    assert len(ids) == len(set(ids))
