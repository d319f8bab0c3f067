#!/usr/bin/env python3
"""Balance-threshold engine throughput: band re-evaluation, and readings end to end into SQLite and PostgreSQL.

Four figures, one run, one core:

* ``evaluations_per_s``    ``Engine.transitions()`` over 1,000,000 accounts (the vectorised band evaluation
                           of every account, no index): accounts evaluated per second. Balances, states and
                           levels are varied (remote and local-purse accounts, overdrafts, calibrated and
                           default levels, all four states) so that both downward and upward moves occur.
* ``readings_per_s``       end to end: poller rows (plain tuples) -> ``ReadingBatch.from_rows`` ->
                           ``Accounting.ingest_readings(batch, now)`` (validation, pricing, band evaluation,
                           decisions, and one committed SQLite transaction per batch; WAL, synchronous=FULL,
                           the store's defaults) for 100,000 meters on flat, TOU and tiered tariffs.
* ``pg_readings_per_s``    the same workload against PostgreSQL (a fresh schema, dropped afterwards).
* ``naive_readings_per_s`` a straightforward baseline on a prefix of the same readings: a dict per account,
                           int arithmetic, threshold ``if``s, each reading (and its charge, decisions and
                           state) inserted into SQLite and committed on its own (WAL, synchronous=FULL).

Workload: every meter is read once per 15-minute cycle, in poll order (a fixed random slot per meter, plus
jitter), so a batch holds the meters read in the same stretch of time. Cycle 0 sets the baselines (no
charges); it is run untimed, then the charged cycles are timed. Consumption is per-meter (lognormal mean
power, varied per cycle, 10 Wh register steps). Every account is paid up front (``ingest_credits``, timed
as setup); a share of them starts just above a warning or trip level, so the readings push them across it
and decisions are produced and committed during the timed run.

Verification, before any figure is reported: the transitions of every account against a plain Python
re-implementation of the band rules; after the runs, the readings row count, the sum of the stored charges
against the engine's cost (in total and per account), the decisions stored against those returned; the
naive baseline's charges (per reading) and decisions against the engine's for the same readings.

Time: ``time.perf_counter``; the end-to-end figures are wall time over all timed batches (GC on, as in the
service); the row tuples for a batch are built before its clock starts, ``from_rows`` is inside it. The
evaluation figure is the best of several calls (median reported too). The breakdown per store comes from
timing wrappers put on the benchmark's own store/engine instances (a few clock reads per batch). The
process is pinned to one CPU where the OS allows (the PostgreSQL server is a separate process). Bytes
written per reading: SQLite, this process's write() calls (WAL and checkpoints, /proc/self/io); PostgreSQL,
the server's WAL bytes (pg_stat_wal). Peak RSS is ru_maxrss, also recorded after each phase.

Sizes: full, 1,000,000 accounts evaluated, 100,000 meters x (1 baseline + 5 charged) cycles in batches of
10,000, naive on the first 10,000 charged readings; ``--quick``, 100,000 / 10,000 x (1 + 2) / 1,000.

Usage::

    python bench/engine.py            # full run, writes bench/results/engine.json
    python bench/engine.py --quick    # short run (smoke test), writes bench/results/engine-quick.json
    python bench/engine.py --out PATH [--skip-pg] [--profile PROFILE.pstats]

The last line of stdout is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import machine_info as common_machine_info  # noqa: E402
from bench._common import peak_rss_mb, pin_to_one_cpu  # noqa: E402
from gateway.accounting import Accounting  # noqa: E402
from gateway.core.engine import NO_BALANCE, Engine, ReadingBatch  # noqa: E402
from gateway.core.model import UFEN_PER_FEN, Account, CostControlMode, CustomerClass, Meter, Payment  # noqa: E402
from gateway.core.tariff import Tariff, tariffs_from_config  # noqa: E402
from gateway.core.thresholds import ThresholdPolicy, calibrate, evaluate  # noqa: E402
from gateway.store import open_store  # noqa: E402
from gateway.store.sqlite import SqliteStore  # noqa: E402

CST = timezone(timedelta(hours=8))
T0 = int(datetime(2026, 3, 2, 6, 30, tzinfo=CST).timestamp())  # cycles run across the valley -> peak change
CYCLE_S = 900
POLICY = ThresholdPolicy(default_warn1_fen=5000, default_warn2_fen=2000, hysteresis_fen=500)
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGETS = {"evaluations_per_s": 20_000_000, "readings_per_s": 100_000}

TARIFF_IDS = ("flat", "tiered", "tou", "tiered_fast")
TARIFF_SHARE = (0.45, 0.30, 0.20, 0.05)
CLASSES = (CustomerClass.RESIDENTIAL, CustomerClass.COMMERCIAL, CustomerClass.VIP, CustomerClass.PROTECTED)
CLASS_SHARE = (0.85, 0.10, 0.03, 0.02)


def tariffs() -> dict[str, Tariff]:
    """The example tariffs (config/tariffs.example.json: flat, tou, tiered), plus small blocks so that block
    boundaries are crossed inside the run (the annual ones are not)."""
    out = tariffs_from_config(json.loads((ROOT / "config" / "tariffs.example.json").read_text()))
    out["tiered_fast"] = Tariff.from_config("tiered_fast", [{"effective_from": 0, "kind": "flat", "price": "0.4883",
                                                             "tiers": [{"from_kwh": 0},
                                                                       {"from_kwh": 1, "surcharge": "0.05"},
                                                                       {"from_kwh": 3, "surcharge": "0.30"}]}])
    return out


def tou_period(t: np.ndarray) -> np.ndarray:
    """Register index 1..4 (sharp, peak, flat, valley) by local hour."""
    hour = ((t + 8 * 3600) // 3600) % 24
    table = np.array([4] * 7 + [3] + [2] * 3 + [3] * 6 + [2] + [1] * 2 + [2] * 2 + [4] * 2)
    return table[hour]


# ============================================================================ workload


@dataclass
class Workload:
    n: int
    tariff_ids: list[str]  # per account
    klass: np.ndarray  # index into CLASSES
    overdraft: np.ndarray
    max_kw: np.ndarray
    pay_fen: np.ndarray  # one payment per account
    cycles: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per cycle, poll order: meter, t, regs (n x 5)
    batch_size: int

    def accounts(self) -> list[Account]:
        return [Account(f"AC{i:07d}", CLASSES[k], CostControlMode.REMOTE, tid, area=f"area{i % 50}",
                        overdraft_limit_fen=int(o))
                for i, (k, tid, o) in enumerate(zip(self.klass.tolist(), self.tariff_ids, self.overdraft.tolist()))]

    def meters(self) -> list[Meter]:
        return [Meter(f"{i + 1:012d}", f"AC{i:07d}", max_kw=int(kw)) for i, kw in enumerate(self.max_kw.tolist())]

    def payments(self) -> list[Payment]:
        return [Payment(f"pay-{i}", f"AC{i:07d}", int(a), T0 - 3600, "bank")
                for i, a in enumerate(self.pay_fen.tolist())]

    def batches(self, cycle: int):
        """(rows, now) per batch: rows are the plain tuples a poll scheduler hands over."""
        m, t, regs = self.cycles[cycle]
        for s in range(0, self.n, self.batch_size):
            cols = [m[s:s + self.batch_size].tolist(), t[s:s + self.batch_size].tolist()]
            cols += [regs[s:s + self.batch_size, k].tolist() for k in range(5)]
            rows = list(zip(*cols))
            yield rows, int(t[min(s + self.batch_size, self.n) - 1])

    @property
    def readings(self) -> int:
        return self.n * len(self.cycles)


def make_workload(n: int, charged_cycles: int, batch_size: int, seed: int = 20261123) -> Workload:
    rng = np.random.default_rng(seed)
    tno = rng.choice(len(TARIFF_IDS), n, p=TARIFF_SHARE)
    klass = rng.choice(len(CLASSES), n, p=CLASS_SHARE)
    commercial = klass == 1
    overdraft = np.where(commercial & (rng.random(n) < 0.5), 5000, 0)
    max_kw = np.where(commercial | (klass == 2), 60, 10)
    # mean power (W): residential ~0.5 kW, commercial / VIP ~8 kW, lognormal, well under the meter limit
    power = np.where(max_kw == 60, np.exp(rng.normal(np.log(8000), 0.7, n)), np.exp(rng.normal(np.log(500), 0.7, n)))
    power = np.minimum(power, max_kw * 1000 * 0.6)
    # balances: most far from any level; 40 % within about one run's spend above warning 1, warning 2 or trip
    price_fen_per_kwh = 60
    spend = power / 1000 * charged_cycles * CYCLE_S / 3600 * price_fen_per_kwh
    level = np.where(rng.random(n) < 0.5, 5000, np.where(rng.random(n) < 0.5, 2000, -overdraft))
    near = rng.random(n) < 0.4
    bal = np.where(near, level + rng.random(n) * 1.5 * spend, rng.integers(8000, 200_000, n))
    pay = np.maximum(bal.astype(np.int64), 1)
    # registers: total and T1..T4 (sharp, peak, flat, valley), in 10 Wh steps (DL/T 645 resolution)
    regs = np.zeros((n, 5), np.int64)
    regs[:, 1:] = rng.integers(0, 1_000_000, (n, 4)) * 10
    regs[:, 0] = regs[:, 1:].sum(axis=1)
    slot = rng.integers(0, CYCLE_S - 120, n)  # the meter's place in the poll cycle
    meters = np.arange(n, dtype=np.int64)
    cycles = []
    last_t = None
    for c in range(charged_cycles + 1):
        t = T0 + c * CYCLE_S + slot + rng.integers(0, 60, n)
        if last_t is not None:
            dt = t - last_t
            wh = power * dt / 3600 * rng.uniform(0.3, 1.7, n)
            wh = np.minimum(wh, max_kw * 1000 * dt / 3600 * 0.95)
            step = (wh // 10).astype(np.int64) * 10
            regs = regs.copy()
            regs[:, 0] += step
            regs[meters, tou_period(last_t)] += step  # the period the interval started in gets it all
        last_t = t
        order = np.argsort(t, kind="stable")
        cycles.append((meters[order], t[order], regs[order]))
    return Workload(n, [TARIFF_IDS[k] for k in tno.tolist()], klass, overdraft.astype(np.int64),
                    max_kw.astype(np.int64), pay, cycles, batch_size)


# ============================================================================ evaluation (1M accounts)


def expected_transitions(e: Engine) -> tuple[list[int], list[int]]:
    """The band rules written out per account in plain Python (independent of the NumPy code)."""
    h = e.policy.hysteresis_fen
    cols = [x.tolist() for x in (e.credits, e.cost, e.local, e.meter_bal, e.credits_at_read, e.state,
                                 e.levels.warn1, e.levels.warn2, e.levels.trip, e.levels.close)]
    accounts, states = [], []
    for a, (cr, cost, local, mbal, cread, s, w1, w2, tr, cl) in enumerate(zip(*cols)):
        if not local:
            b = cr - cost // UFEN_PER_FEN
        elif mbal == NO_BALANCE:
            b = 1 << 62  # purse not read yet: far above every level
        else:
            b = mbal + cr - cread
        if b <= tr:
            down = 3
        elif b <= w2:
            down = 2
        elif b <= w1:
            down = 1
        else:
            down = 0
        if down > s:
            new = down
        else:
            # leaving a band: its level plus the hysteresis; out of TRIP also above the close level
            if b <= max(tr + h, cl):
                up = 3
            elif b <= w2 + h:
                up = 2
            elif b <= w1 + h:
                up = 1
            else:
                up = 0
            new = up if up < s else s
        if new != s:
            accounts.append(a)
            states.append(new)
    return accounts, states


def bench_evaluation(n: int, runs: int, seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    klass = rng.choice(len(CLASSES), n, p=CLASS_SHARE)
    local = rng.random(n) < 0.05
    overdraft = np.where(rng.random(n) < 0.1, 5000, 0)
    tids = rng.choice(len(TARIFF_IDS), n, p=TARIFF_SHARE)
    accounts = [Account(f"AC{i:07d}", CLASSES[k], CostControlMode.LOCAL if lo else CostControlMode.REMOTE,
                        TARIFF_IDS[ti], overdraft_limit_fen=int(o))
                for i, (k, lo, ti, o) in enumerate(zip(klass.tolist(), local.tolist(), tids.tolist(),
                                                       overdraft.tolist()))]
    objects_s = time.perf_counter() - t
    t = time.perf_counter()
    e = Engine(tariffs(), POLICY)
    e.add_accounts(accounts)
    add_s = time.perf_counter() - t
    del accounts
    # levels: calibrated from history for 80 %, defaults for the rest
    avg = np.where(rng.random(n) < 0.8, rng.integers(50, 3000, n), -1)
    e.levels = calibrate(avg, e.overdraft, e.policy)
    # balances spread around the levels, in every state, so both downward and upward moves happen
    e.credits[:] = rng.integers(0, 60_000, n)
    e.cost[:] = rng.integers(0, 40_000, n) * UFEN_PER_FEN + rng.integers(0, UFEN_PER_FEN, n)
    known = local & (rng.random(n) < 0.8)
    e.meter_bal[:] = np.where(known, rng.integers(-8000, 30_000, n), NO_BALANCE)
    e.credits_at_read[:] = np.where(local, e.credits - rng.integers(0, 3000, n), 0)
    e.state[:] = rng.choice(4, n, p=(0.7, 0.12, 0.08, 0.10)).astype(np.int8)
    e.state[local & ~known] = 0  # a purse never read cannot have moved the account out of NORMAL

    def check() -> tuple[int, dict]:
        accts, new = e.transitions()
        exp_a, exp_s = expected_transitions(e)
        assert accts.tolist() == exp_a and new.tolist() == exp_s, "transitions differ from the plain rules"
        old = e.state[accts]
        return len(accts), {"down": int((new > old).sum()), "up": int((new < old).sum())}

    changed, moves = check()
    assert moves["down"] > 0 and moves["up"] > 0, moves
    gc.collect()
    times, bal_t, eval_t = [], [], []
    for _ in range(runs):
        s = time.perf_counter()
        accts, new = e.transitions()
        times.append(time.perf_counter() - s)
        assert len(accts) == changed
        # parts, for the breakdown: the balance arithmetic and the band evaluation alone
        s = time.perf_counter()
        b = e.balance()
        bal_t.append(time.perf_counter() - s)
        s = time.perf_counter()
        evaluate(b, e.state, e.levels, e.policy.hysteresis_fen)
        eval_t.append(time.perf_counter() - s)
    assert check()[0] == changed  # still right after timing
    best, med = min(times), float(np.median(times))
    return {
        "accounts": n,
        "setup_s": {"account_objects": round(objects_s, 3), "add_accounts": round(add_s, 3)},
        "add_accounts_per_s": round(n / add_s),
        "changed_accounts": changed,
        "moves": moves,
        "runs": runs,
        "best_ms": round(best * 1e3, 3),
        "median_ms": round(med * 1e3, 3),
        "parts_best_ms": {"balance": round(min(bal_t) * 1e3, 3), "evaluate": round(min(eval_t) * 1e3, 3)},
        "evaluations_per_s": round(n / best),
        "evaluations_per_s_median": round(n / med),
    }


# ============================================================================ end to end through Accounting


def written(store) -> int | None:
    """Bytes written so far: by this process (SQLite writes from here), or as WAL by the PostgreSQL server."""
    try:
        if store.dialect == "sqlite":
            for line in Path("/proc/self/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    return int(line.split()[1])
            return None
        return int(store._query("SELECT wal_bytes FROM pg_stat_wal")[0][0])
    except Exception:  # not Linux, or no pg_stat_wal (PostgreSQL < 14)
        return None


def database_bytes(store) -> int:
    if store.dialect == "sqlite":
        return store._query("PRAGMA page_count")[0][0] * store._query("PRAGMA page_size")[0][0]
    return int(store._query("SELECT pg_total_relation_size('readings') + pg_total_relation_size('decisions') "
                            "+ pg_total_relation_size('account_state') + pg_total_relation_size('ledger')")[0][0])


class Clock:
    """Accumulating timers put on the benchmark's own store / engine instances (not on the classes)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def wrap(self, obj, name: str, key: str, when=None) -> None:
        fn = getattr(obj, name)
        t = self.t
        t.setdefault(key, 0.0)

        def timed(*a, **k):
            if when is not None and not when(*a):
                return fn(*a, **k)
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                t[key] += time.perf_counter() - s

        setattr(obj, name, timed)


def run_store(url: str, wl: Workload, profile: str | None = None) -> dict:
    store = open_store(url)
    try:
        return _run_store(store, wl, profile)
    finally:
        store.close()


def _run_store(store, wl: Workload, profile: str | None) -> dict:
    setup = {}
    t = time.perf_counter()
    acc = Accounting(store, POLICY)
    accounts, meters = wl.accounts(), wl.meters()
    acc.register(tariffs(), accounts, meters)
    setup["register"] = time.perf_counter() - t
    assert acc.engine.meter_no[meters[-1].meter_id] == wl.n - 1  # poller meter numbers = registration order
    del accounts, meters

    t = time.perf_counter()
    payments = wl.payments()
    payment_decisions = []
    for s in range(0, len(payments), 10_000):
        r = acc.ingest_credits(payments[s:s + 10_000], T0 - 3600)
        assert len(r.credits.new) == len(payments[s:s + 10_000])
        payment_decisions += r.decisions
    setup["payments"] = time.perf_counter() - t
    del payments

    t = time.perf_counter()
    for rows, now in wl.batches(0):
        r = acc.ingest_readings(ReadingBatch.from_rows(rows), now)
        assert r.accepted == len(rows) and not r.decisions, r
    setup["baseline_cycle"] = time.perf_counter() - t
    e = acc.engine
    after_baseline = {"state": e.state.copy(), "seq": e.seq.copy()}

    clock = Clock()
    clock.wrap(acc, "_drop_redelivered", "drop_redelivered")
    clock.wrap(e, "apply_readings", "engine")
    clock.wrap(store, "write_outcome", "write_outcome")
    clock.wrap(store, "_insert_readings", "sql_readings")
    clock.wrap(store, "_executemany", "sql_other", when=lambda sql, rows: not sql.startswith("INSERT INTO readings"))
    clock.wrap(store, "_begin", "begin")
    clock.wrap(store, "_commit", "commit")
    io_start = written(store)
    conv = 0.0
    total = 0.0
    per_cycle = []
    batch_decisions: list[tuple[int, int, list]] = []  # cycle, batch, decisions
    readings = 0
    prof = None
    if profile:
        import cProfile
        prof = cProfile.Profile()
    for c in range(1, len(wl.cycles)):
        cyc = 0.0
        for b, (rows, now) in enumerate(wl.batches(c)):
            if prof:
                prof.enable()
            s = time.perf_counter()
            batch = ReadingBatch.from_rows(rows)
            m = time.perf_counter()
            r = acc.ingest_readings(batch, now)
            f = time.perf_counter()
            if prof:
                prof.disable()
            conv += m - s
            cyc += f - s
            assert r.accepted == len(rows) and r.held == 0 and r.duplicates == 0, r
            batch_decisions.append((c, b, r.decisions))
            readings += len(rows)
        per_cycle.append(round(wl.n / cyc))
        total += cyc
    io_end = written(store)
    if prof:
        prof.dump_stats(profile)
    assert acc.engine is e  # no transaction failed (a failure rebuilds the engine)

    # ---- verification against the store
    decisions = [d for _, _, ds in batch_decisions for d in ds]
    counts = store.counts()
    assert counts["readings"] == wl.readings, (counts, wl.readings)
    assert counts["held_readings"] == 0
    stored_cost = store._query("SELECT CAST(SUM(cost_ufen) AS BIGINT) FROM readings")[0][0]
    assert int(stored_cost) == int(e.cost.sum()), (stored_cost, int(e.cost.sum()))
    per_acct = np.zeros(wl.n, np.int64)
    for a, s in store._query("SELECT account_no, CAST(SUM(cost_ufen) AS BIGINT) FROM readings GROUP BY account_no"):
        per_acct[a] = s
    assert np.array_equal(per_acct, e.cost), "per-account charges differ from the engine's cost"
    stored = store.decisions()
    returned = payment_decisions + decisions
    assert len(stored) == len(returned) == counts["decisions"]
    assert sorted((d.decision_id, d.kind.value, d.level, d.balance_fen, d.at) for d in returned) == \
        sorted((r[0], r[2], r[3], r[4], r[5]) for r in stored), "stored decisions differ from those returned"
    kinds: dict[str, int] = {}
    for d in decisions:
        kinds[d.kind.value] = kinds.get(d.kind.value, 0) + 1

    bd = clock.t
    other = total - conv - sum(bd[k] for k in ("drop_redelivered", "engine", "write_outcome", "begin", "commit"))
    row_build = bd["write_outcome"] - bd["sql_readings"] - bd["sql_other"]
    parts = {"from_rows": conv, "drop_redelivered": bd["drop_redelivered"], "engine": bd["engine"],
             "outcome_rows_python": row_build, "sql_insert_readings": bd["sql_readings"],
             "sql_decisions_state": bd["sql_other"], "begin": bd["begin"], "commit": bd["commit"],
             "accounting_other": other}
    return {
        "readings": readings,
        "seconds": round(total, 3),
        "readings_per_s": round(readings / total),
        "per_cycle_readings_per_s": per_cycle,
        "decisions": len(decisions),
        "decision_kinds": kinds,
        "payment_decisions": len(payment_decisions),
        "setup_s": {k: round(v, 3) for k, v in setup.items()},
        "breakdown_s": {k: round(v, 3) for k, v in parts.items()},
        "breakdown_pct": {k: round(100 * v / total, 1) for k, v in parts.items()},
        "written_bytes_per_reading": None if io_start is None else round((io_end - io_start) / readings),
        "written_bytes_source": ("write() calls of this process (/proc/self/io wchar): WAL, checkpoints"
                                 if store.dialect == "sqlite" else "pg_stat_wal.wal_bytes (whole server)"),
        "database_mb": round(database_bytes(store) / 2**20, 1),
        "verified": {"readings_rows": counts["readings"], "sum_cost_ufen": int(stored_cost),
                     "decisions_stored": len(stored)},
        "_after_baseline": after_baseline,
        "_batch_decisions": batch_decisions,
    }


def pg_schema_dsn(base: str) -> tuple[str, str]:
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    return schema, f"{base}{sep}options=-csearch_path%3D{schema}"


def pg_drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_server_version(base: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(base, connect_timeout=5) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]
    except Exception:
        return None


# ============================================================================ naive baseline


class Naive:
    """What one would write first: a dict per account, ints, ifs, and one commit per reading."""

    def __init__(self, path: str, wl: Workload) -> None:
        schema = SqliteStore(path)  # the same tables as the real store (readings, decisions, account_state)
        schema.migrate()
        schema.close()
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.tariffs = {}
        for tid, tariff in tariffs().items():
            v = tariff.versions[0]
            tiers = [(tr.from_wh, v.tiers[i + 1].from_wh if i + 1 < len(v.tiers) else None, tr.surcharge_mfen)
                     for i, tr in enumerate(v.tiers)]
            self.tariffs[tid] = (v.kind, v.prices_mfen, tiers)
        h = POLICY.hysteresis_fen
        self.accounts = {}
        for i, (k, tid, od) in enumerate(zip(wl.klass.tolist(), wl.tariff_ids, wl.overdraft.tolist())):
            trip = -od
            w2 = max(POLICY.default_warn2_fen, trip + 1)
            w1 = max(POLICY.default_warn1_fen, w2)
            self.accounts[i] = {"id": f"AC{i:07d}", "credits": 0, "cost": 0, "state": 0, "seq": 0, "ytd": 0,
                                "year": 0, "tariff": tid, "auto_trip": CLASSES[k].auto_trip_allowed,
                                "w1": w1, "w2": w2, "trip": trip, "close": trip + POLICY.close_margin_fen, "h": h}
        self.meters = {i: {"account": i, "last_t": None, "regs": None, "max_w": kw * 1000}
                       for i, kw in enumerate(wl.max_kw.tolist())}
        self.relay_open = {}
        self.decisions = []

    def pay(self, account_no: int, amount: int, now: int) -> None:
        acct = self.accounts[account_no]
        acct["credits"] += amount
        self.check(account_no, now, "balance after payment", persist=False)

    def balance(self, acct) -> int:
        return acct["credits"] - acct["cost"] // 1_000_000

    def check(self, account_no: int, now: int, reason: str, persist: bool) -> None:
        acct = self.accounts[account_no]
        b = self.balance(acct)
        s = acct["state"]
        if b <= acct["trip"]:
            down = 3
        elif b <= acct["w2"]:
            down = 2
        elif b <= acct["w1"]:
            down = 1
        else:
            down = 0
        if down > s:
            new = down
        else:
            if b <= max(acct["trip"] + acct["h"], acct["close"]):
                up = 3
            elif b <= acct["w2"] + acct["h"]:
                up = 2
            elif b <= acct["w1"] + acct["h"]:
                up = 1
            else:
                up = 0
            new = up if up < s else s
        if new == s:
            return
        made = []
        if new > s:
            for level in range(s + 1, new + 1):
                if level < 3:
                    made.append(("notice", level))
                elif acct["auto_trip"]:
                    made.append(("trip_request", 3))
                else:
                    made.append(("account_manager_task", 3))
        elif s == 3:
            if self.relay_open.get(account_no):
                made.append(("close_request", new))
            elif acct["auto_trip"]:
                made.append(("cancel_trip", new))
        acct["state"] = new
        for kind, level in made:
            acct["seq"] += 1
            d = (f"{acct['id']}#{acct['seq']}", account_no, kind, level, b, now, reason)
            self.decisions.append(d)
            if persist:
                self.db.execute("INSERT INTO decisions (decision_id, account_no, kind, level, balance_fen, at, "
                                "reason) VALUES (?, ?, ?, ?, ?, ?, ?)", d)
        if persist:
            self.db.execute("INSERT INTO account_state (account_no, state, seq) "
                            "VALUES (?, ?, ?) ON CONFLICT (account_no) DO UPDATE "
                            "SET state = excluded.state, seq = excluded.seq", (account_no, new, acct["seq"]))

    def price(self, acct, d: list[int], t: int) -> int:
        kind, prices, tiers = self.tariffs[acct["tariff"]]
        if kind == "flat":
            cost = d[0] * prices[0]
        else:
            cost = d[1] * prices[0] + d[2] * prices[1] + d[3] * prices[2] + d[4] * prices[3]
        year = time.gmtime(t + 8 * 3600).tm_year  # tier year (UTC+8); every account keeps its year-to-date
        if acct["year"] != year:
            acct["year"], acct["ytd"] = year, 0
        start = acct["ytd"]
        end = start + d[0]
        for lo, hi, surcharge in tiers:
            a = max(start, lo) if hi is None else min(max(start, lo), hi)
            b = max(end, lo) if hi is None else min(max(end, lo), hi)
            cost += (b - a) * surcharge
        acct["ytd"] = end
        return cost

    def reading(self, row: tuple, now: int, persist: bool = True) -> None:
        meter_no, t, regs = row[0], row[1], list(row[2:7])
        meter = self.meters[meter_no]
        acct_no = meter["account"]
        acct = self.accounts[acct_no]
        delta = cost = 0
        if meter["last_t"] is not None:
            if t <= meter["last_t"]:
                return  # out of order (none in this workload)
            d = [x - y for x, y in zip(regs, meter["regs"])]
            if min(d) < 0 or d[0] * 3600 > meter["max_w"] * (t - meter["last_t"]) + 20 * 3600:
                return  # backwards or implausible (none in this workload)
            delta = d[0]
            cost = self.price(acct, d, t)
            acct["cost"] += cost
        meter["last_t"], meter["regs"] = t, regs
        if persist:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO readings (meter_no, t, account_no, total_wh, sharp_wh, peak_wh, flat_wh, "
                            "valley_wh, delta_wh, cost_ufen, ytd_wh, tier_year) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (meter_no, t, acct_no, *regs, delta, cost, acct["ytd"], acct["year"]))
        self.check(acct_no, now, "balance after readings", persist)
        if persist:
            self.db.execute("COMMIT")


def bench_naive(wl: Workload, prefix: int, tmp: str, engine_run: dict, engine_db: str) -> dict:
    path = os.path.join(tmp, "naive.db")
    nv = Naive(path, wl)
    # the same starting point as the engine: payments, then the baseline cycle (untimed, not persisted)
    for i, a in enumerate(wl.pay_fen.tolist()):
        nv.pay(i, a, T0 - 3600)
    for rows, now in wl.batches(0):
        for row in rows:
            nv.reading(row, now, persist=False)
    st = engine_run["_after_baseline"]
    assert [nv.accounts[i]["state"] for i in range(wl.n)] == st["state"].tolist(), "naive states differ"
    assert [nv.accounts[i]["seq"] for i in range(wl.n)] == st["seq"].tolist(), "naive seqs differ"
    nv.decisions.clear()
    prefix = min(prefix, wl.n)  # within the first charged cycle: each account is read at most once
    work = []
    for rows, now in wl.batches(1):
        work += [(row, now) for row in rows[: prefix - len(work)]]
        if len(work) >= prefix:
            break
    gc.collect()
    s = time.perf_counter()
    for row, now in work:
        nv.reading(row, now)
    elapsed = time.perf_counter() - s
    # cross-check: the same charges (and year-to-date) per reading, and the same decisions
    nv.db.execute("ATTACH DATABASE ? AS eng", (engine_db,))
    n_rows, n_same = nv.db.execute(
        "SELECT COUNT(*), SUM(n.cost_ufen = e.cost_ufen AND n.delta_wh = e.delta_wh AND n.ytd_wh = e.ytd_wh "
        "AND n.tier_year = e.tier_year AND n.total_wh = e.total_wh) "
        "FROM readings n JOIN eng.readings e USING (meter_no, t)").fetchone()
    assert n_rows == prefix and n_same == prefix, (n_rows, n_same, prefix)
    charged = nv.db.execute("SELECT COUNT(*), SUM(cost_ufen) FROM readings WHERE cost_ufen > 0").fetchone()
    nbatches = -(-prefix // wl.batch_size)
    in_prefix = {row[0] for row, _ in work}  # meter no = account no here
    engine_decisions = sorted((d.decision_id, d.account_no, d.kind.value, d.level, d.balance_fen, d.at, d.reason)
                              for c, b, ds in engine_run["_batch_decisions"] if c == 1 and b < nbatches
                              for d in ds if d.account_no in in_prefix)
    assert sorted(nv.decisions) == engine_decisions, "naive decisions differ from the engine's"
    stored = nv.db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    assert stored == len(nv.decisions)
    nv.db.close()
    return {"readings": prefix, "seconds": round(elapsed, 3), "readings_per_s": round(prefix / elapsed),
            "decisions": len(nv.decisions), "charged_readings": charged[0],
            "cross_checked": {"readings_same_charge": n_same, "decisions_same": len(engine_decisions)}}


# ============================================================================ report


def machine_info(cpu: int | None, tmp: str, pg_base: str | None) -> dict:
    fs = None
    try:  # the file system the SQLite files live on (fsync cost depends on it)
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if (tmp + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, fs = mnt, f"{typ} ({dev} on {mnt})"
    except OSError:
        pass
    try:
        import psycopg

        psycopg_version = psycopg.__version__
    except Exception:
        psycopg_version = None
    return common_machine_info(
        cpu, numpy_version=np.__version__, sqlite_version=sqlite3.sqlite_version, sqlite_filesystem=fs,
        psycopg_version=psycopg_version, postgresql_server=pg_server_version(pg_base) if pg_base else None)


def public(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run for smoke tests (well under 30 s)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/engine[-quick].json)")
    ap.add_argument("--skip-pg", action="store_true", help="leave PostgreSQL out (pg_readings_per_s: null)")
    ap.add_argument("--profile", default=None, help="write a cProfile of the timed SQLite batches here")
    ap.add_argument("--batch", type=int, default=10_000, help="readings per batch (default 10000)")
    args = ap.parse_args(argv)
    q = args.quick
    eval_accounts = 100_000 if q else 1_000_000
    eval_runs = 5 if q else 15
    meters = 10_000 if q else 100_000
    charged_cycles = 2 if q else 5
    naive_prefix = 1_000 if q else 10_000
    out = args.out or ROOT / "bench" / "results" / ("engine-quick.json" if q else "engine.json")
    pg_base = None if args.skip_pg else os.environ.get("FEIKONG_PG_DSN", DEFAULT_PG)

    cpu = pin_to_one_cpu()
    rss = {}
    wl = make_workload(meters, charged_cycles, args.batch)
    with tempfile.TemporaryDirectory(prefix="feikong-bench-") as tmp:
        sqlite_db = os.path.join(tmp, "feikong.db")
        sq = run_store(f"sqlite://{sqlite_db}", wl, args.profile)
        rss["after_sqlite"] = peak_rss_mb()
        print(f"sqlite      {sq['readings_per_s']:>12,} readings/s  ({sq['readings']:,} readings, "
              f"{sq['decisions']:,} decisions)", file=sys.stderr)
        pg = None
        if pg_base:
            schema, dsn = pg_schema_dsn(pg_base)
            try:
                pg = run_store(dsn, wl)
            finally:
                pg_drop_schema(pg_base, schema)
            assert pg["decisions"] == sq["decisions"] and pg["verified"] == sq["verified"], "stores disagree"
            rss["after_postgresql"] = peak_rss_mb()
            print(f"postgresql  {pg['readings_per_s']:>12,} readings/s", file=sys.stderr)
        naive = bench_naive(wl, naive_prefix, tmp, sq, sqlite_db)
        rss["after_naive"] = peak_rss_mb()
        print(f"naive       {naive['readings_per_s']:>12,} readings/s  ({naive['readings']:,} readings)",
              file=sys.stderr)
        machine = machine_info(cpu, tmp, pg_base)
    del wl
    gc.collect()
    ev = bench_evaluation(eval_accounts, eval_runs)
    rss["after_evaluation"] = peak_rss_mb()
    print(f"evaluation  {ev['evaluations_per_s']:>12,} accounts/s  ({ev['accounts']:,} accounts, "
          f"best {ev['best_ms']} ms)", file=sys.stderr)

    summary = {
        "evaluations_per_s": ev["evaluations_per_s"],
        "readings_per_s": sq["readings_per_s"],
        "pg_readings_per_s": pg["readings_per_s"] if pg else None,
        "naive_readings_per_s": naive["readings_per_s"],
        "readings_ratio_over_naive": round(sq["readings_per_s"] / naive["readings_per_s"], 1),
        "pg_ratio_over_naive": round(pg["readings_per_s"] / naive["readings_per_s"], 1) if pg else None,
        "evaluation_accounts": eval_accounts,
        "accounts": meters,
        "batch_size": args.batch,
        "timed_readings": sq["readings"],
        "decisions": sq["decisions"],
        "naive_readings": naive["readings"],
        "peak_rss_mb": peak_rss_mb(),
    }
    result = {
        "benchmark": "balance-threshold engine: band re-evaluation, readings end to end (SQLite, PostgreSQL), "
                     "naive baseline; one core",
        "workload": {
            "accounts": meters, "meters": meters, "meters_per_account": 1, "batch_size": args.batch,
            "cycles": {"baseline_untimed": 1, "charged_timed": charged_cycles, "cycle_s": CYCLE_S},
            "tariffs": dict(zip(TARIFF_IDS, TARIFF_SHARE)),
            "classes": {c.value: s for c, s in zip(CLASSES, CLASS_SHARE)},
            "start": datetime.fromtimestamp(T0, CST).isoformat(),
            "poll_order": "random fixed slot per meter within the cycle + 0-59 s jitter; batches in time order",
            "naive_prefix": naive["readings"],
        },
        "method": {"timer": "time.perf_counter", "quick": q, "gc": "enabled during end-to-end runs",
                   "evaluation": f"best of {eval_runs} calls of Engine.transitions() (median also given)",
                   "end_to_end": "wall time over all timed batches; from_rows inside, tuple building outside",
                   "sqlite": "store defaults: WAL, synchronous=FULL, temp directory",
                   "postgresql": "fresh schema on FEIKONG_PG_DSN or the default, dropped afterwards"},
        "targets": TARGETS,
        "results": summary,
        "evaluation": ev,
        "sqlite": public(sq),
        "postgresql": public(pg) if pg else None,
        "naive": naive,
        "peak_rss_mb_after": rss,
        "machine": machine,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
