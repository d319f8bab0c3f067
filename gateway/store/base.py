"""The store port: one interface, SQL written once, two adapters (SQLite embedded, PostgreSQL scale-out).

Every write happens inside :meth:`Store.transaction`; callers acknowledge an
input only after the transaction that recorded it has committed. Schema
migrations are versioned and run at start-up.
"""
from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from gateway.core.commands import RelayStatus
from gateway.core.control import Effects
from gateway.core.engine import NO_BALANCE, Outcome, Snapshot
from gateway.core.ledger import Entry, Statement, allocate, charges_from_cumulative
from gateway.core.model import Account, Adjustment, CostControlMode, CustomerClass, Meter, Payment
from gateway.core.policy import AreaFlag, Forecast
from gateway.core.tariff import Tariff, Tier, TariffVersion

from gateway.ops.audit import ChainHeadMissing, link_hash

from .entities import CASES, COMMANDS, NOTICES, ORDERS, REQUESTS, EntityTable

# Each migration is a list of statements; {serial_pk}, {real} and {without_rowid} are filled per dialect.
MIGRATIONS: list[list[str]] = [
    [  # 1: accounts, meters, tariffs, readings, ledger, decisions, state
        "CREATE TABLE tariffs (tariff_id TEXT PRIMARY KEY, definition TEXT NOT NULL)",
        """CREATE TABLE accounts (
            account_no BIGINT PRIMARY KEY, account_id TEXT NOT NULL UNIQUE, customer_class TEXT NOT NULL,
            mode TEXT NOT NULL, tariff_id TEXT NOT NULL, area TEXT NOT NULL, name TEXT NOT NULL,
            address TEXT NOT NULL, lat {real}, lon {real}, channels TEXT NOT NULL, contacts TEXT NOT NULL,
            overdraft_limit_fen BIGINT NOT NULL)""",
        """CREATE TABLE meters (
            meter_no BIGINT PRIMARY KEY, meter_id TEXT NOT NULL UNIQUE, account_no BIGINT NOT NULL,
            protocol TEXT NOT NULL, channel TEXT NOT NULL, max_kw BIGINT NOT NULL)""",
        # One row per accepted reading: the registers, and the charge it caused (exact micro-fen).
        # Clustered by time: a read cycle appends at the end of one B-tree instead of touching a page per
        # meter (measured: ~330k rows/s sustained against 50-80k with a meter-ordered key or index).
        """CREATE TABLE readings (
            t BIGINT NOT NULL, meter_no BIGINT NOT NULL, account_no BIGINT NOT NULL,
            total_wh BIGINT NOT NULL, sharp_wh BIGINT NOT NULL, peak_wh BIGINT NOT NULL,
            flat_wh BIGINT NOT NULL, valley_wh BIGINT NOT NULL,
            delta_wh BIGINT NOT NULL, cost_ufen BIGINT NOT NULL, ytd_wh BIGINT NOT NULL, tier_year BIGINT NOT NULL,
            balance_fen BIGINT, credits_fen BIGINT,
            PRIMARY KEY (t, meter_no)){without_rowid}""",
        """CREATE TABLE held_readings (
            id {serial_pk}, meter_no BIGINT NOT NULL, t BIGINT NOT NULL, registers TEXT NOT NULL,
            reason TEXT NOT NULL, held_at BIGINT NOT NULL, reviewed INTEGER NOT NULL DEFAULT 0,
            UNIQUE (meter_no, t, registers, reason))""",
        # Payments, adjustments and refunds: entry_id is the idempotency key.
        """CREATE TABLE ledger (
            entry_id TEXT PRIMARY KEY, account_no BIGINT NOT NULL, kind TEXT NOT NULL, amount_fen BIGINT NOT NULL,
            at BIGINT NOT NULL, operator TEXT NOT NULL, reason TEXT NOT NULL, channel TEXT NOT NULL,
            recorded_at BIGINT NOT NULL)""",
        "CREATE INDEX ledger_account_at ON ledger (account_no, at)",
        """CREATE TABLE decisions (
            decision_id TEXT PRIMARY KEY, account_no BIGINT NOT NULL, kind TEXT NOT NULL, level INTEGER NOT NULL,
            balance_fen BIGINT NOT NULL, at BIGINT NOT NULL, reason TEXT NOT NULL)""",
        "CREATE INDEX decisions_account ON decisions (account_no, at)",
        """CREATE TABLE account_state (
            account_no BIGINT PRIMARY KEY, state INTEGER NOT NULL, seq BIGINT NOT NULL,
            notice_confirmed_at BIGINT NOT NULL)""",
        "CREATE TABLE relay_state (meter_no BIGINT PRIMARY KEY, is_open INTEGER NOT NULL, at BIGINT NOT NULL)",
    ],
    [  # 2: calibrated levels survive a restart (defaults until the first calibration)
        """CREATE TABLE account_levels (
            account_no BIGINT PRIMARY KEY, warn1_fen BIGINT NOT NULL, warn2_fen BIGINT NOT NULL,
            trip_fen BIGINT NOT NULL, close_fen BIGINT NOT NULL, calibrated_at BIGINT NOT NULL)""",
        "CREATE TABLE calibration (id INTEGER PRIMARY KEY, calibrated_at BIGINT NOT NULL)",
    ],
    [  # 3: disconnect and reconnect: notices, disconnect cases, relay commands, field orders, outbox, audit
        # (the entity tables' columns are their dataclasses' fields, in order: gateway/store/entities.py)
        "ALTER TABLE account_state DROP COLUMN notice_confirmed_at",  # notices keep their own deliveries now
        "ALTER TABLE meters ADD COLUMN reconnect_mode TEXT NOT NULL DEFAULT 'direct'",
        "ALTER TABLE relay_state ADD COLUMN commanded_open INTEGER",
        "ALTER TABLE relay_state ADD COLUMN keep_power INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE notices (
            notice_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, purpose TEXT NOT NULL, created_at {real} NOT NULL,
            channels TEXT NOT NULL, params TEXT NOT NULL, state TEXT NOT NULL, due_at {real},
            next_channel INTEGER NOT NULL, attempts TEXT NOT NULL, delivered_at {real},
            delivered_channel TEXT NOT NULL, closed_reason TEXT NOT NULL, updated_at {real} NOT NULL)""",
        "CREATE INDEX notices_account ON notices (account_id, created_at)",
        "CREATE INDEX notices_state ON notices (state)",
        """CREATE TABLE trip_cases (
            case_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, opened_at {real} NOT NULL, balance_fen BIGINT NOT NULL,
            state TEXT NOT NULL, gate TEXT NOT NULL, gate_reason TEXT NOT NULL, next_check_at {real},
            plan_day TEXT NOT NULL, planned_at {real}, notice_id TEXT NOT NULL, final_notice_id TEXT NOT NULL,
            command_ids TEXT NOT NULL, rounds INTEGER NOT NULL, notices_made INTEGER NOT NULL, closed_at {real},
            closed_reason TEXT NOT NULL, updated_at {real} NOT NULL)""",
        "CREATE INDEX trip_cases_state ON trip_cases (state)",
        "CREATE INDEX trip_cases_account ON trip_cases (account_id, opened_at)",
        """CREATE TABLE relay_commands (
            command_id TEXT PRIMARY KEY, meter_id TEXT NOT NULL, account_id TEXT NOT NULL, action TEXT NOT NULL,
            actor TEXT NOT NULL, role TEXT NOT NULL, reason TEXT NOT NULL, origin TEXT NOT NULL,
            created_at {real} NOT NULL, expires_at {real} NOT NULL, mode TEXT NOT NULL, state TEXT NOT NULL,
            next_at {real}, readback_first INTEGER NOT NULL, attempts INTEGER NOT NULL, failures INTEGER NOT NULL,
            refusals INTEGER NOT NULL, sent_at {real}, verify_until {real}, confirmed_at {real},
            outcome TEXT NOT NULL, last_error TEXT NOT NULL, payment_at {real}, deadline_at {real},
            order_id TEXT NOT NULL, superseded_by TEXT NOT NULL, history TEXT NOT NULL, updated_at {real} NOT NULL)""",
        "CREATE INDEX relay_commands_meter ON relay_commands (meter_id, created_at)",
        "CREATE INDEX relay_commands_state ON relay_commands (state)",
        """CREATE TABLE work_orders (
            order_id TEXT PRIMARY KEY, kind TEXT NOT NULL, command_id TEXT NOT NULL, meter_id TEXT NOT NULL,
            account_id TEXT NOT NULL, customer_class TEXT NOT NULL, address TEXT NOT NULL, lat {real}, lon {real},
            reason TEXT NOT NULL, attempts TEXT NOT NULL, created_at {real} NOT NULL, deadline_at {real} NOT NULL,
            state TEXT NOT NULL, escalation INTEGER NOT NULL, visits INTEGER NOT NULL, crew TEXT NOT NULL,
            note TEXT NOT NULL, verified TEXT NOT NULL, verify_next_at {real}, closed_at {real},
            updated_at {real} NOT NULL)""",
        "CREATE INDEX work_orders_state ON work_orders (state)",
        "CREATE INDEX work_orders_meter ON work_orders (meter_id, created_at)",
        """CREATE TABLE field_updates (
            update_id TEXT PRIMARY KEY, order_id TEXT NOT NULL, status TEXT NOT NULL, at {real} NOT NULL,
            crew TEXT NOT NULL, note TEXT NOT NULL, result TEXT NOT NULL, recorded_at {real} NOT NULL)""",
        """CREATE TABLE area_flags (
            area TEXT NOT NULL, flag TEXT NOT NULL, active INTEGER NOT NULL, since {real} NOT NULL, until {real},
            actor TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (area, flag))""",
        """CREATE TABLE forecasts (
            area TEXT NOT NULL, day TEXT NOT NULL, min_c {real} NOT NULL, max_c {real} NOT NULL,
            received_at {real} NOT NULL, PRIMARY KEY (area, day))""",
        # outgoing events, committed with the change that caused them; published (and marked) later
        """CREATE TABLE outbox (
            seq {serial_pk}, event_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, subject TEXT NOT NULL,
            at {real} NOT NULL, payload TEXT NOT NULL, published_at {real})""",
        "CREATE INDEX outbox_unpublished ON outbox (published_at, seq)",
        """CREATE TABLE audit_log (
            seq {serial_pk}, at {real} NOT NULL, actor TEXT NOT NULL, role TEXT NOT NULL, action TEXT NOT NULL,
            subject TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL)""",
        "CREATE INDEX audit_log_subject ON audit_log (subject, seq)",
    ],
    [  # 4: operators: two-person approval requests; the audit log hash-chained and append-only
        """CREATE TABLE approval_requests (
            request_id TEXT PRIMARY KEY, kind TEXT NOT NULL, meter_ids TEXT NOT NULL, requested_by TEXT NOT NULL,
            requested_role TEXT NOT NULL, reason TEXT NOT NULL, created_at {real} NOT NULL,
            expires_at {real} NOT NULL, state TEXT NOT NULL, decided_by TEXT NOT NULL,
            decided_role TEXT NOT NULL, decided_at {real}, decision_reason TEXT NOT NULL,
            command_ids TEXT NOT NULL)""",
        "CREATE INDEX approval_requests_state ON approval_requests (state, created_at)",
        "ALTER TABLE audit_log ADD COLUMN prev_hash TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE audit_log ADD COLUMN hash TEXT NOT NULL DEFAULT ''",
        # the chain's head: locked (updated) by every append, so appends from several gateways on one
        # database take turns and each links to the one committed before it
        "CREATE TABLE audit_head (id INTEGER PRIMARY KEY, records BIGINT NOT NULL, hash TEXT NOT NULL)",
        lambda store: store._chain_existing_audit(),
        lambda store: [store._execute(sql) for sql in store.append_only_sql("audit_log")],
    ],
    [  # 5: several instances on one database (gateway/cluster.py; PostgreSQL: SQLite has one instance)
        # a lease per channel: the database's now() is the only clock expiry is measured by
        "CREATE TABLE leases (channel TEXT PRIMARY KEY, holder TEXT, epoch BIGINT NOT NULL, expires_at TIMESTAMPTZ)",
        "CREATE TABLE members (instance TEXT PRIMARY KEY, seen_at TIMESTAMPTZ NOT NULL)",
        # per-account inputs received by an instance that does not act for the account, for the one that does;
        # key: the input's idempotency key
        """CREATE TABLE inbox (
            key TEXT PRIMARY KEY, channel TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
            received_at {real} NOT NULL)""",
        "CREATE INDEX inbox_channel ON inbox (channel, received_at)",
    ],
    [  # 6: a credit's account, id and amount in its inbox row (the fresh balance before a trip sums them);
        # the members' config digests
        "ALTER TABLE inbox ADD COLUMN account_id TEXT",
        "ALTER TABLE inbox ADD COLUMN entry_id TEXT",
        "ALTER TABLE inbox ADD COLUMN amount_fen BIGINT",
        "CREATE INDEX inbox_account ON inbox (account_id)",
        # each instance's config digest (channels and fleet): an instance with another config does not join
        "ALTER TABLE members ADD COLUMN config_digest TEXT",
    ],
]

#: PostgreSQL NOTIFY channel of the inbox: the payload is the (meter) channel a row was queued for
INBOX_NOTIFY = "feikong_inbox"

READING_COLUMNS = ("t", "meter_no", "account_no", "total_wh", "sharp_wh", "peak_wh", "flat_wh", "valley_wh",
                   "delta_wh", "cost_ufen", "ytd_wh", "tier_year", "balance_fen", "credits_fen")


# time, then the per-account sequence in numeric order (ACCOUNT#9 before ACCOUNT#10)
_DECISION_ORDER = " ORDER BY d.at, d.account_no, LENGTH(d.decision_id), d.decision_id"


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class CreditResult:
    new: list  # committed now for the first time: apply them
    duplicates: list  # same id, same content: acknowledge, do not count again
    conflicts: list[tuple[object, str]]  # same id, different content: dead-letter with the reason


class Store(ABC):
    """SQL shared by both adapters; adapters supply the connection, placeholders and bulk paths."""

    dialect = "abstract"
    serial_pk = ""
    real = "REAL"
    without_rowid = ""

    def __init__(self) -> None:
        self._in_tx = False
        self._group: list | None = None  # a group's after-commit callbacks while it is open (see group())
        self._group_broken = False
        #: called first in every transaction (``fence(store)``): raises when this instance may no longer act
        #: (gateway/cluster.py: its leases); None on a single instance
        self.fence = None
        #: monotonic time of the last commit (or of opening): several instances renew their leases only while
        #: their writer commits (gateway/cluster.py)
        self.committed_at = time.monotonic()

    # -- adapter hooks ----------------------------------------------------------------
    @abstractmethod
    def _execute(self, sql: str, params: tuple = ()): ...

    @abstractmethod
    def _executemany(self, sql: str, rows) -> None: ...

    @abstractmethod
    def _begin(self) -> None: ...

    @abstractmethod
    def _commit(self) -> None: ...

    @abstractmethod
    def _rollback(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def append_only_sql(self, table: str) -> list[str]:
        """Statements (triggers) that make ``table`` refuse UPDATE and DELETE: the dialect's own DDL."""

    def _insert_readings(self, rows: list[tuple]) -> None:
        cols = ", ".join(READING_COLUMNS)
        marks = ", ".join("?" * len(READING_COLUMNS))
        self._executemany(f"INSERT INTO readings ({cols}) VALUES ({marks}) ON CONFLICT DO NOTHING", rows)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._execute(sql, params).fetchall()

    # -- transactions and migrations -------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator["Store"]:
        """One transaction; inside a :meth:`group`, a savepoint of the group's (committed with it)."""
        if self._in_tx:
            raise StoreError("transactions do not nest")
        grouped = self._group is not None
        if grouped:
            self._execute("SAVEPOINT grouped_call")
        else:
            self._begin()
        self._in_tx = True
        try:
            if self.fence is not None and not grouped:  # a group is fenced once, for all its calls
                self.fence(self)
            yield self
        except BaseException:
            self._in_tx = False
            if grouped:
                self._undo_savepoint()
            else:
                self._rollback()
            raise
        self._in_tx = False
        if grouped:
            self._execute("RELEASE SAVEPOINT grouped_call")
            return
        self._commit_or_rollback()

    def _commit_or_rollback(self) -> None:
        """COMMIT (alone or a group's), stamped for the lease keeper; one that fails (busy, connection lost)
        must not leave the transaction open."""
        try:
            self._commit()
        except BaseException:
            self._rollback()
            raise
        self.committed_at = time.monotonic()

    def _undo_savepoint(self) -> None:
        try:
            self._execute("ROLLBACK TO SAVEPOINT grouped_call")
            self._execute("RELEASE SAVEPOINT grouped_call")
        except Exception:  # the failed call's writes may still be there: the group must not commit them
            self._group_broken = True

    @contextmanager
    def group(self) -> Iterator["Store"]:
        """Several callers' transactions in ONE outer transaction (group commit: one COMMIT, one fsync), each
        of them a savepoint: a transaction that fails is rolled back to its savepoint alone. What
        :meth:`after_commit` was given runs once the outer COMMIT is done; nothing of it if it fails."""
        if self._in_tx or self._group is not None:
            raise StoreError("a group is not opened inside a transaction or another group")
        self._begin()
        self._group, self._group_broken = [], False
        try:
            # fenced once at the top, not in each savepoint: the same answer for every call (now() is the
            # transaction's, the leases acted for change only between groups), and its FOR SHARE locks are
            # not given up by a call rolled back to its savepoint
            if self.fence is not None:
                self.fence(self)
            yield self
            if self._group_broken:
                raise StoreError("a failed call of the group could not be rolled back to its savepoint: "
                                 "the group is rolled back")
        except BaseException:
            self._group = None
            self._rollback()
            raise
        done, self._group = self._group, None
        self._commit_or_rollback()
        for callback in done:
            callback()

    def after_commit(self, callback) -> None:
        """``callback()`` once what was just written is committed: now, or after the open group's COMMIT."""
        if self._group is not None:
            self._group.append(callback)
        else:
            callback()

    def schema_version(self) -> int:
        rows = self._query("SELECT version FROM schema_version") if self._has_table("schema_version") else []
        return rows[0][0] if rows else 0

    @abstractmethod
    def _has_table(self, name: str) -> bool: ...

    def migrate(self) -> int:
        """Bring the schema to the newest version; returns the version now in force."""
        with self.transaction():
            if not self._has_table("schema_version"):
                self._execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                self._execute("INSERT INTO schema_version (version) VALUES (0)")
            current = self._query("SELECT version FROM schema_version")[0][0]
            if current > len(MIGRATIONS):
                raise StoreError(f"database schema version {current} is newer than this feikong "
                                 f"({len(MIGRATIONS)}): upgrade feikong, do not downgrade the database")
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1]:
                    if callable(statement):  # a step that needs Python (hashing existing rows, a dialect's DDL)
                        statement(self)
                        continue
                    self._execute(statement.format(serial_pk=self.serial_pk, real=self.real,
                                                   without_rowid=self.without_rowid))
                self._execute("UPDATE schema_version SET version = ?", (version,))
        return len(MIGRATIONS)

    # -- registry ---------------------------------------------------------------------------
    def save_tariffs(self, tariffs: dict[str, Tariff]) -> None:
        rows = [(tid, json.dumps([{"effective_from": v.effective_from, "kind": v.kind,
                                   "prices_mfen": list(v.prices_mfen),
                                   "tiers": [[x.from_wh, x.surcharge_mfen] for x in v.tiers]}
                                  for v in t.versions])) for tid, t in tariffs.items()]
        self._executemany("INSERT INTO tariffs (tariff_id, definition) VALUES (?, ?) "
                          "ON CONFLICT (tariff_id) DO UPDATE SET definition = excluded.definition", rows)

    def load_tariffs(self) -> dict[str, Tariff]:
        out = {}
        for tid, definition in self._query("SELECT tariff_id, definition FROM tariffs ORDER BY tariff_id"):
            versions = [TariffVersion(v["effective_from"], v["kind"], tuple(v["prices_mfen"]),
                                      tuple(Tier(a, b) for a, b in v["tiers"])) for v in json.loads(definition)]
            out[tid] = Tariff(tid, versions)
        return out

    def save_accounts(self, accounts: list[Account], numbers: dict[str, int]) -> None:
        rows = [(numbers[a.account_id], a.account_id, a.customer_class.value, a.mode.value, a.tariff_id, a.area,
                 a.name, a.address, a.lat, a.lon, json.dumps(list(a.channels)), json.dumps(a.contacts),
                 a.overdraft_limit_fen) for a in accounts]
        self._executemany(
            "INSERT INTO accounts (account_no, account_id, customer_class, mode, tariff_id, area, name, address, "
            "lat, lon, channels, contacts, overdraft_limit_fen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (account_no) DO NOTHING", rows)

    def save_meters(self, meters: list[Meter], numbers: dict[str, int], account_numbers: dict[str, int]) -> None:
        rows = [(numbers[m.meter_id], m.meter_id, account_numbers[m.account_id], m.protocol, m.channel, m.max_kw,
                 m.reconnect_mode) for m in meters]
        self._executemany("INSERT INTO meters (meter_no, meter_id, account_no, protocol, channel, max_kw, "
                          "reconnect_mode) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (meter_no) DO NOTHING", rows)

    def load_accounts(self) -> list[Account]:
        rows = self._query("SELECT account_id, customer_class, mode, tariff_id, area, name, address, lat, lon, "
                           "channels, contacts, overdraft_limit_fen FROM accounts ORDER BY account_no")
        return [Account(r[0], CustomerClass(r[1]), CostControlMode(r[2]), r[3], r[4], r[5], r[6], r[7], r[8],
                        tuple(json.loads(r[9])), json.loads(r[10]), r[11]) for r in rows]

    def load_meters(self) -> list[Meter]:
        rows = self._query("SELECT m.meter_id, a.account_id, m.protocol, m.channel, m.max_kw, m.reconnect_mode "
                           "FROM meters m JOIN accounts a ON a.account_no = m.account_no ORDER BY m.meter_no")
        return [Meter(*r) for r in rows]

    # -- inputs -------------------------------------------------------------------------------
    def insert_credits(self, items: list[Payment | Adjustment], account_numbers: dict[str, int],
                       recorded_at: int) -> CreditResult:
        """Record payments/adjustments idempotently (inside a transaction). Unknown accounts are conflicts."""
        conflicts: list[tuple[object, str]] = []
        first: dict[str, tuple] = {}  # entry id -> (item, row), first occurrence in this batch
        repeats: list[tuple[object, tuple]] = []
        for item in items:
            no = account_numbers.get(item.account_id)
            if no is None:
                conflicts.append((item, f"unknown account {item.account_id!r}"))
                continue
            if isinstance(item, Payment):
                row = (item.payment_id, no, "payment", item.amount_fen, item.paid_at, "", "", item.channel,
                       recorded_at)
            else:
                row = (item.adjustment_id, no, item.kind, item.amount_fen, item.at, item.operator, item.reason, "",
                       recorded_at)
            if row[0] in first:
                repeats.append((item, row))
            else:
                first[row[0]] = (item, row)
        inserted: set[str] = set()
        rows = [row for _, row in first.values()]
        for i in range(0, len(rows), 500):  # one statement per 500 entries: a round trip each, not one per payment
            chunk = rows[i:i + 500]
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            inserted.update(r[0] for r in self._query(
                "INSERT INTO ledger (entry_id, account_no, kind, amount_fen, at, operator, reason, channel, "
                f"recorded_at) VALUES {values} ON CONFLICT (entry_id) DO NOTHING RETURNING entry_id",
                tuple(v for row in chunk for v in row)))
        new = [item for eid, (item, _) in first.items() if eid in inserted]
        others = [(item, row) for eid, (item, row) in first.items() if eid not in inserted] + repeats
        existing = self._existing_entries([row[0] for _, row in others])
        dups = []
        for item, row in others:
            old = existing[row[0]]
            if old == (row[1], row[2], row[3]):
                dups.append(item)
            else:
                conflicts.append((item, f"id {row[0]!r} was already used for {old[1]} of {old[2]} fen "
                                        f"on account no {old[0]}: refusing a different {row[2]} "
                                        f"of {row[3]} fen under the same id"))
        return CreditResult(new, dups, conflicts)

    def _existing_entries(self, ids: list[str]) -> dict[str, tuple]:
        out = {}
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), 500):
            chunk = unique[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            for eid, no, kind, amount in self._query(
                    f"SELECT entry_id, account_no, kind, amount_fen FROM ledger WHERE entry_id IN ({marks})",
                    tuple(chunk)):
                out[eid] = (no, kind, amount)
        return out

    def write_outcome(self, outcome: Outcome, now: int) -> None:
        """Persist what an engine batch changed (inside the same transaction as its inputs)."""
        acc = outcome.accepted
        if acc is not None and len(acc["meter"]):
            regs = acc["regs"]
            bal = acc["balance_fen"]
            bal_list = [None if b == NO_BALANCE else b for b in bal.tolist()]
            credits = acc["credits_fen"].tolist()
            credits = [c if b is not None else None for c, b in zip(credits, bal_list)]
            rows = list(zip(acc["t"].tolist(), acc["meter"].tolist(), acc["account"].tolist(),
                            regs[:, 0].tolist(), regs[:, 1].tolist(), regs[:, 2].tolist(), regs[:, 3].tolist(),
                            regs[:, 4].tolist(), acc["delta_wh"].tolist(), acc["cost_ufen"].tolist(),
                            acc["ytd_wh"].tolist(), acc["tier_year"].tolist(), bal_list, credits))
            self._insert_readings(rows)
        if outcome.held:
            # a re-delivered bad reading is held once, not once per delivery
            self._executemany("INSERT INTO held_readings (meter_no, t, registers, reason, held_at) "
                              "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                              [(m, t, json.dumps(list(r)), reason, now) for m, t, r, reason in outcome.held])
        if outcome.decisions:
            self._executemany("INSERT INTO decisions (decision_id, account_no, kind, level, balance_fen, at, reason) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                              [(d.decision_id, d.account_no, d.kind.value, d.level, d.balance_fen, d.at, d.reason)
                               for d in outcome.decisions])
        if outcome.state_rows:
            self._executemany("INSERT INTO account_state (account_no, state, seq) VALUES (?, ?, ?) "
                              "ON CONFLICT (account_no) DO UPDATE SET state = excluded.state, seq = excluded.seq",
                              outcome.state_rows)
        if outcome.relay_rows:
            self._executemany("INSERT INTO relay_state (meter_no, is_open, at, commanded_open, keep_power) "
                              "VALUES (?, ?, ?, ?, ?) ON CONFLICT (meter_no) DO UPDATE SET is_open = excluded.is_open, "
                              "at = excluded.at, commanded_open = excluded.commanded_open, "
                              "keep_power = excluded.keep_power",
                              [(m, int(o), at, None if c is None else int(c), int(k))
                               for m, o, at, c, k in outcome.relay_rows])

    def save_levels(self, levels, calibrated_at: int) -> None:
        rows = list(zip(range(len(levels.warn1)), levels.warn1.tolist(), levels.warn2.tolist(),
                        levels.trip.tolist(), levels.close.tolist(), [calibrated_at] * len(levels.warn1)))
        self._executemany("INSERT INTO account_levels (account_no, warn1_fen, warn2_fen, trip_fen, close_fen, "
                          "calibrated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account_no) DO UPDATE SET "
                          "warn1_fen = excluded.warn1_fen, warn2_fen = excluded.warn2_fen, "
                          "trip_fen = excluded.trip_fen, close_fen = excluded.close_fen, "
                          "calibrated_at = excluded.calibrated_at", rows)
        self._execute("INSERT INTO calibration (id, calibrated_at) VALUES (1, ?) "
                      "ON CONFLICT (id) DO UPDATE SET calibrated_at = excluded.calibrated_at", (calibrated_at,))

    def last_calibration(self) -> int | None:
        rows = self._query("SELECT calibrated_at FROM calibration WHERE id = 1")
        return rows[0][0] if rows else None

    # -- restart -------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        def arrays(sql, ncols):
            rows = self._query(sql)
            if not rows:
                return [np.zeros(0, np.int64) for _ in range(ncols)]
            arr = np.array([[NO_BALANCE if v is None else v for v in r] for r in rows], dtype=np.int64)
            return [arr[:, i] for i in range(ncols)]

        ca, cs = arrays("SELECT account_no, CAST(SUM(amount_fen) AS BIGINT) FROM ledger GROUP BY account_no", 2)
        ka, ks = arrays("SELECT account_no, CAST(SUM(cost_ufen) AS BIGINT) FROM readings GROUP BY account_no", 2)
        # (a row-value IN, not a self-join: without an account index SQLite would nest two full scans)
        ya, yy, yw = arrays(
            "SELECT account_no, tier_year, MAX(ytd_wh) FROM readings WHERE (account_no, tier_year) IN "
            "(SELECT account_no, MAX(tier_year) FROM readings WHERE tier_year > 0 GROUP BY account_no) "
            "GROUP BY account_no, tier_year", 3)
        # last tier year's total as of its last reading (late readings of it priced after a restart see it)
        pa, pw = arrays(
            "SELECT account_no, MAX(ytd_wh) FROM readings WHERE (account_no, tier_year + 1) IN "
            "(SELECT account_no, MAX(tier_year) FROM readings WHERE tier_year > 0 GROUP BY account_no) "
            "GROUP BY account_no", 2)
        last = arrays("SELECT meter_no, t, total_wh, sharp_wh, peak_wh, flat_wh, valley_wh FROM readings "
                      "WHERE (meter_no, t) IN (SELECT meter_no, MAX(t) FROM readings GROUP BY meter_no)", 7)
        purse = arrays("SELECT meter_no, balance_fen, credits_fen FROM readings WHERE (meter_no, t) IN "
                       "(SELECT meter_no, MAX(t) FROM readings WHERE balance_fen IS NOT NULL GROUP BY meter_no)", 3)
        sa, ss, sq = arrays("SELECT account_no, state, seq FROM account_state", 3)
        rm, ro, rk, rc = arrays("SELECT meter_no, is_open, keep_power, COALESCE(commanded_open, -1) "
                                "FROM relay_state", 4)
        levels = self.load_levels()
        return Snapshot(ca, cs, ka, ks, ya, yw, yy, pa, pw, last[0], last[1], np.stack(last[2:7], axis=1),
                        purse[0], purse[1], purse[2], sa, ss.astype(np.int8), sq, rm, ro.astype(bool),
                        rk.astype(bool), rc.astype(np.int8), *levels)

    def load_levels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(account numbers, n x 4 levels: warning 1, warning 2, trip, close)`` as last calibrated."""
        rows = self._query("SELECT account_no, warn1_fen, warn2_fen, trip_fen, close_fen FROM account_levels")
        table = np.array(rows, dtype=np.int64).reshape(-1, 5)
        return table[:, 0], table[:, 1:5]

    # -- queries ----------------------------------------------------------------------------------
    def statement(self, account_id: str, since: int = 0) -> Statement:
        """The account's charges and credits from ``since`` on, with what settled what.

        Readings are clustered by time (the write path's need), so give a period for long histories.
        """
        no = self._query("SELECT account_no FROM accounts WHERE account_id = ?", (account_id,))
        if not no:
            raise KeyError(f"unknown account {account_id!r}")
        no = no[0][0]
        readings = self._query("SELECT meter_no, t, cost_ufen FROM readings WHERE t >= ? AND account_no = ? "
                               "AND cost_ufen <> 0 ORDER BY t, meter_no", (since, no))
        # the fen steps continue from what was charged before the period, not from zero
        before = 0
        if since > 0:
            before = int(self._query("SELECT COALESCE(CAST(SUM(cost_ufen) AS BIGINT), 0) FROM readings "
                                     "WHERE t < ? AND account_no = ?", (since, no))[0][0])
        charges = charges_from_cumulative([(f"reading:{m}:{t}", t, c) for m, t, c in readings], before)
        credits = [Entry(e, k, a, at, r) for e, k, a, at, r in self._query(
            "SELECT entry_id, kind, amount_fen, at, reason FROM ledger WHERE account_no = ? AND at >= ? "
            "ORDER BY at, entry_id", (no, since))]
        # same instant: the credit first (a payment clears before the meter is read)
        entries = sorted(charges + credits, key=lambda e: (e.at, e.amount_fen < 0))
        return allocate(account_id, entries)

    def decisions(self, account_id: str | None = None) -> list[tuple]:
        sql = ("SELECT d.decision_id, a.account_id, d.kind, d.level, d.balance_fen, d.at, d.reason FROM decisions d "
               "JOIN accounts a ON a.account_no = d.account_no")
        if account_id is None:
            return self._query(sql + _DECISION_ORDER)
        return self._query(sql + " WHERE a.account_id = ?" + _DECISION_ORDER, (account_id,))

    def known_readings(self, keys: list[tuple[int, int]]) -> set[tuple[int, ...]]:
        """``(meter_no, t, *registers)`` of readings already recorded, accepted or held, among the
        ``(meter_no, t)`` keys: a re-delivery of any of them must change nothing."""
        out: set[tuple[int, ...]] = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            where = " OR ".join(["(meter_no = ? AND t = ?)"] * len(chunk))
            params = tuple(v for k in chunk for v in k)
            for row in self._query(f"SELECT meter_no, t, total_wh, sharp_wh, peak_wh, flat_wh, valley_wh "
                                   f"FROM readings WHERE {where}", params):
                out.add(tuple(row))
            for m, t, regs in self._query(f"SELECT meter_no, t, registers FROM held_readings WHERE {where}", params):
                out.add((m, t, *json.loads(regs)))
        return out

    def held_readings(self) -> list[tuple]:
        # LEFT JOIN: readings from meters the gateway does not know are listed too (by number)
        return self._query("SELECT COALESCE(m.meter_id, CAST(h.meter_no AS TEXT)), h.t, h.registers, h.reason "
                           "FROM held_readings h LEFT JOIN meters m ON m.meter_no = h.meter_no ORDER BY h.id")

    def counts(self) -> dict[str, int]:
        return {t: self._query(f"SELECT COUNT(*) FROM {t}")[0][0]
                for t in ("readings", "held_readings", "ledger", "decisions")}

    def average_daily_cost_fen(self, n_accounts: int, since: int, until: int) -> np.ndarray:
        """Average daily cost per account over [since, until); -1 where the account has no readings there."""
        out = np.full(n_accounts, -1, np.int64)
        # Divide by the time the readings cover, not the whole window (a new customer's week of history says
        # more than the same cost spread over thirty days). n charged readings between first and last carry
        # n intervals' cost but span n-1 of them: scale the span by n/(n-1) (regular polling), at least a day.
        # Readings without consumption are left out: an idle spell makes warnings come earlier, not later.
        for no, cost, first, last, n in self._query(
                "SELECT account_no, CAST(SUM(cost_ufen) AS BIGINT), MIN(t), MAX(t), COUNT(*) FROM readings "
                "WHERE t >= ? AND t < ? AND delta_wh > 0 GROUP BY account_no", (since, until)):
            cost, span = int(cost), (last - first) * n  # span of n intervals, times (n - 1)
            span_s_x = max(span, 86400 * max(n - 1, 1))  # at least a day
            out[no] = cost * 86400 * max(n - 1, 1) // (span_s_x * 1_000_000)  # integers throughout
        return out

    # -- disconnect and reconnect: entities, outbox, audit --------------------------------------------
    def save_entities(self, table: EntityTable, objects) -> None:
        objects = list(objects)
        if not objects:
            return
        cols = table.columns
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != table.key)
        self._executemany(f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                          f"ON CONFLICT ({table.key}) DO UPDATE SET {updates}", [table.to_row(o) for o in objects])

    def load_entities(self, table: EntityTable, condition: str, params: tuple = ()) -> list:
        """Rows of an entity table as entities; ``condition`` is what follows WHERE (ORDER BY and LIMIT too)."""
        return [table.from_row(r) for r in self._query(
            f"SELECT {', '.join(table.columns)} FROM {table.name} WHERE {condition}", params)]

    def write_effects(self, fx: Effects, now: float) -> None:
        """Persist what the controller changed (inside the transaction that carried its input)."""
        for table, changed in ((NOTICES, fx.notices), (CASES, fx.cases), (COMMANDS, fx.commands),
                               (ORDERS, fx.orders)):
            self.save_entities(table, changed.values())
        self.add_events(fx.events)
        self.append_audit(fx.audit)
        if fx.flags:
            self._executemany("INSERT INTO area_flags (area, flag, active, since, until, actor, reason) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (area, flag) DO UPDATE SET "
                              "active = excluded.active, since = excluded.since, until = excluded.until, "
                              "actor = excluded.actor, reason = excluded.reason",
                              [(f.area, f.flag, int(f.active), f.since, f.until, f.actor, f.reason) for f in fx.flags])
        if fx.forecasts:
            self._executemany("INSERT INTO forecasts (area, day, min_c, max_c, received_at) VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (area, day) DO UPDATE SET min_c = excluded.min_c, max_c = excluded.max_c, "
                              "received_at = excluded.received_at",
                              [(f.area, f.day, f.min_c, f.max_c, f.received_at) for f in fx.forecasts])
        if fx.field_updates:
            self._executemany("INSERT INTO field_updates (update_id, order_id, status, at, crew, note, result, "
                              "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (update_id) DO NOTHING",
                              [(u.update_id, u.order_id, u.status.value, u.at, u.crew, u.note, result, now)
                               for u, result in fx.field_updates])

    def control_state(self, now: float, keep_s: float, notice_horizon_s: float, today: str) -> dict:
        """What the controller needs after a restart: everything active, and the recent past the gates use."""
        active_notices = "('waiting', 'requested')"
        relays, seen_at = {}, {}
        for meter_id, is_open, commanded, keep, at in self._query(
                "SELECT m.meter_id, r.is_open, r.commanded_open, r.keep_power, r.at FROM relay_state r "
                "JOIN meters m ON m.meter_no = r.meter_no"):
            seen_at[meter_id] = at
            if is_open or keep or commanded:
                relays[meter_id] = RelayStatus(bool(is_open), None if commanded is None else bool(commanded),
                                               bool(keep))
        return {
            "notices": self.load_entities(NOTICES, f"state IN {active_notices} OR created_at >= ?",
                                          (now - notice_horizon_s,)),
            "cases": self.load_entities(CASES, "state IN ('waiting', 'scheduled', 'tripping', 'blocked') "
                                               "OR (plan_day >= ? AND state <> 'cancelled')", (today,)),
            # active, recent, and for each open relay the last command that acted on it (who opened it, and why;
            # "acted" as in Command.acted: confirmed, and not by finding the relay already there)
            "commands": self.load_entities(
                COMMANDS, "state IN ('queued', 'sending', 'verifying', 'retry_wait', 'dispatched') OR updated_at >= ? "
                          "OR (state = 'confirmed' AND substr(outcome, 1, 8) <> 'already_' AND meter_id IN "
                          "(SELECT m.meter_id FROM relay_state r JOIN meters m ON m.meter_no = r.meter_no "
                          "WHERE r.is_open = 1) AND confirmed_at = (SELECT MAX(c2.confirmed_at) FROM relay_commands c2 "
                          "WHERE c2.meter_id = relay_commands.meter_id AND c2.state = 'confirmed' "
                          "AND substr(c2.outcome, 1, 8) <> 'already_'))",
                (now - keep_s,)),
            "orders": self.load_entities(ORDERS, "state NOT IN ('completed', 'cancelled') OR verify_next_at IS NOT "
                                                 "NULL OR updated_at >= ?", (now - keep_s,)),
            "relays": relays,
            "relay_seen_at": seen_at,
            **dict(zip(("flags", "forecasts"), self.area_conditions(today))),
        }

    def area_conditions(self, today: str) -> tuple[list[AreaFlag], list[Forecast]]:
        """The area flags, and the forecasts from ``today`` on (ISO date)."""
        return ([AreaFlag(a, f, bool(act), s, u, actor, r) for a, f, act, s, u, actor, r in self._query(
                    "SELECT area, flag, active, since, until, actor, reason FROM area_flags")],
                [Forecast(*r) for r in self._query(
                    "SELECT area, day, min_c, max_c, received_at FROM forecasts WHERE day >= ?", (today,))])

    def notice_account(self, notice_id: str) -> str | None:
        rows = self._query("SELECT account_id FROM notices WHERE notice_id = ?", (notice_id,))
        return rows[0][0] if rows else None

    def field_update_seen(self, update_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM field_updates WHERE update_id = ?", (update_id,)))

    def command(self, command_id: str):
        found = self.load_entities(COMMANDS, "command_id = ?", (command_id,))
        return found[0] if found else None

    def meter_commands(self, meter_id: str, limit: int = 50) -> list:
        """A meter's relay commands, newest first."""
        return self.load_entities(COMMANDS, "meter_id = ? ORDER BY created_at DESC, command_id DESC LIMIT ?",
                                  (meter_id, limit))

    def meter_orders(self, meter_id: str, limit: int = 20) -> list:
        return self.load_entities(ORDERS, "meter_id = ? ORDER BY created_at DESC LIMIT ?", (meter_id, limit))

    def commands_page(self, state: str | None = None, meter_id: str | None = None, limit: int = 100,
                      offset: int = 0) -> list:
        """Relay commands, newest first, optionally of one state and/or one meter."""
        where, params = _filters(state=state, meter_id=meter_id)
        return self.load_entities(COMMANDS, f"{where} ORDER BY created_at DESC, command_id DESC LIMIT ? OFFSET ?",
                                  (*params, limit, offset))

    def order(self, order_id: str):
        found = self.load_entities(ORDERS, "order_id = ?", (order_id,))
        return found[0] if found else None

    def meters_page(self, relay: str | None = None, limit: int = 100, offset: int = 0) -> list[tuple]:
        """``(meter_id, account_id, protocol, channel, relay, verified_at)`` by meter id; ``relay`` is open,
        closed or unknown (never read)."""
        where, params = _filters(relay=relay)
        return self._query(
            "SELECT meter_id, account_id, protocol, channel, relay, verified_at FROM (SELECT m.meter_id, "
            "a.account_id, m.protocol, m.channel, CASE WHEN r.meter_no IS NULL THEN 'unknown' WHEN r.is_open = 1 "
            "THEN 'open' ELSE 'closed' END AS relay, r.at AS verified_at FROM meters m JOIN accounts a "
            f"ON a.account_no = m.account_no LEFT JOIN relay_state r ON r.meter_no = m.meter_no) v WHERE {where} "
            "ORDER BY meter_id LIMIT ? OFFSET ?", (*params, limit, offset))

    def recent_readings(self, meter_id: str, since: int, limit: int = 10) -> list[tuple]:
        """``(t, total_wh, sharp_wh, peak_wh, flat_wh, valley_wh, balance_fen)`` of the meter's readings from
        ``since`` on, newest first (give a window: readings are clustered by time)."""
        return self._query("SELECT r.t, r.total_wh, r.sharp_wh, r.peak_wh, r.flat_wh, r.valley_wh, r.balance_fen "
                           "FROM readings r JOIN meters m ON m.meter_no = r.meter_no WHERE r.t >= ? "
                           "AND m.meter_id = ? ORDER BY r.t DESC LIMIT ?", (since, meter_id, limit))

    # -- two-person approvals ------------------------------------------------------------------------
    def save_request(self, request) -> None:
        self.save_entities(REQUESTS, [request])

    def approval_request(self, request_id: str, for_update: bool = False):
        """``for_update`` (inside a transaction): the row locked until the commit (PostgreSQL; SQLite has one
        writer)."""
        lock = " FOR UPDATE" if for_update and self.dialect == "postgresql" else ""
        found = self.load_entities(REQUESTS, f"request_id = ?{lock}", (request_id,))
        return found[0] if found else None

    def approval_requests(self, state: str | None, now: float, limit: int = 100, offset: int = 0) -> list:
        """Newest first. ``expired`` are the pending ones past their expiry; ``pending`` are the others."""
        if state == "pending":
            where, params = "state = 'pending' AND expires_at > ?", (now,)
        elif state == "expired":
            where, params = "state = 'pending' AND expires_at <= ?", (now,)
        else:
            where, params = _filters(state=state)
        return self.load_entities(REQUESTS, f"{where} ORDER BY created_at DESC, request_id DESC LIMIT ? OFFSET ?",
                                  (*params, limit, offset))

    # -- the inbox: inputs for the instance acting for their account (gateway/cluster.py) -----------------
    def put_inbox(self, rows: list[tuple]) -> None:
        """``(key, channel, kind, body, received_at)`` rows, a credit's with ``account_id, entry_id,
        amount_fen`` after them; a key already there is kept (a re-delivery)."""
        if rows:
            self._executemany("INSERT INTO inbox (key, channel, kind, body, received_at, account_id, entry_id, "
                              "amount_fen) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                              [(*r, *(None,) * (8 - len(r))) for r in rows])
            self.notify_inbox(sorted({r[1] for r in rows}))

    def inbox_credits_fen(self, account_id: str) -> int:
        """The account's payments and adjustments waiting in the inbox that the ledger does not have yet (each
        id once; an id queued with two amounts, a conflict its owner will refuse, counts the smaller)."""
        return int(self._query(
            "SELECT COALESCE(CAST(SUM(amount_fen) AS BIGINT), 0) FROM (SELECT entry_id, MIN(amount_fen) AS amount_fen "
            "FROM inbox i WHERE account_id = ? AND amount_fen IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM ledger l WHERE l.entry_id = i.entry_id) GROUP BY entry_id) AS waiting",
            (account_id,))[0][0])

    def notify_inbox(self, channels: list[str]) -> None:
        """Wake the instances listening (PostgreSQL: NOTIFY, delivered at the commit)."""

    def inbox(self, channels: list[str], kind: str, limit: int = 500) -> list[tuple[str, str]]:
        """``(key, body)`` of the oldest inbox rows of one kind for these channels."""
        if not channels:
            return []
        marks = ", ".join("?" * len(channels))
        return self._query(f"SELECT key, body FROM inbox WHERE kind = ? AND channel IN ({marks}) "
                           "ORDER BY received_at, key LIMIT ?", (kind, *channels, limit))

    def consume_inbox(self, keys: list[str]) -> None:
        """Delete the rows taken (in the transaction that ingests them); all of them or a StoreError."""
        if not keys:
            return
        marks = ", ".join("?" * len(keys))
        gone = self._query(f"DELETE FROM inbox WHERE key IN ({marks}) RETURNING key", tuple(keys))
        if len(gone) != len(set(keys)):
            raise StoreError(f"inbox: {len(set(keys)) - len(gone)} of {len(set(keys))} rows were taken by "
                             f"another transaction")

    def inbox_pending(self) -> int:
        return self._query("SELECT COUNT(*) FROM inbox")[0][0]

    def ping(self) -> bool:
        """The database answers."""
        return self._query("SELECT 1")[0][0] == 1

    def relay_row(self, meter_id: str) -> tuple | None:
        """``(is_open, at, commanded_open, keep_power)`` of the meter's last verified relay position."""
        rows = self._query("SELECT r.is_open, r.at, r.commanded_open, r.keep_power FROM relay_state r "
                           "JOIN meters m ON m.meter_no = r.meter_no WHERE m.meter_id = ?", (meter_id,))
        return rows[0] if rows else None

    def account_credits_fen(self, account_no: int) -> int:
        """Every committed credit of the account (the fresh balance check at the moment of a trip)."""
        return int(self._query("SELECT COALESCE(CAST(SUM(amount_fen) AS BIGINT), 0) FROM ledger "
                               "WHERE account_no = ?", (account_no,))[0][0])

    def add_events(self, events: list) -> None:
        """Events into the outbox; an event id already there is kept as it was (a re-delivered input that
        makes the same event again, such as a dead letter, is not an error)."""
        if events:
            self._executemany("INSERT INTO outbox (event_id, kind, subject, at, payload) VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT (event_id) DO NOTHING",
                              [(e.event_id, e.kind, e.subject, e.at, _dumps(e.payload)) for e in events])

    def outbox(self, after_seq: int = 0, limit: int = 1000, unpublished: bool = False) -> list[tuple]:
        """``(seq, event_id, kind, subject, at, payload)`` in commit order."""
        cond = " AND published_at IS NULL" if unpublished else ""
        return [(seq, eid, kind, subj, at, json.loads(payload)) for seq, eid, kind, subj, at, payload in self._query(
            f"SELECT seq, event_id, kind, subject, at, payload FROM outbox WHERE seq > ?{cond} ORDER BY seq LIMIT ?",
            (after_seq, limit))]

    def outbox_pending(self) -> int:
        """Events not yet published (the index on published_at makes this a range count)."""
        return self._query("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")[0][0]

    def mark_published(self, seqs: list[int], at: float) -> None:
        self._executemany("UPDATE outbox SET published_at = ? WHERE seq = ?", [(at, s) for s in seqs])

    # -- the audit log: append-only, hash-chained (gateway/ops/audit.py verifies it) --------------------
    def append_audit(self, records) -> None:
        """Audit records (:class:`~gateway.core.control.AuditRecord`) appended to the chain, inside the
        caller's transaction: the head row is updated first, which locks it (PostgreSQL) until the commit,
        so concurrent appenders on one database link one after the other."""
        if not records:
            return
        count, head = self._audit_head_row(
            self._query("UPDATE audit_head SET records = records WHERE id = 1 RETURNING records, hash"))
        rows = []
        for a in records:
            row = (a.at, a.actor, a.role, a.action, a.subject, a.reason, _dumps(a.detail))
            digest = link_hash(head, *row)
            rows.append((*row, head, digest))
            head = digest
        self._executemany("INSERT INTO audit_log (at, actor, role, action, subject, reason, detail, prev_hash, "
                          "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        self._execute("UPDATE audit_head SET records = ?, hash = ? WHERE id = 1", (count + len(rows), head))

    def _chain_existing_audit(self) -> None:
        """Migration 4: the records written before the chain existed get their links, in order."""
        head, n = "", 0
        for seq, *row in self._query("SELECT seq, at, actor, role, action, subject, reason, detail FROM audit_log "
                                     "ORDER BY seq"):
            digest = link_hash(head, *row)
            self._execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?", (head, digest, seq))
            head, n = digest, n + 1
        self._execute("INSERT INTO audit_head (id, records, hash) VALUES (1, ?, ?)", (n, head))

    def audit_head(self) -> tuple[int, str]:
        """``(records, hash)``: how many records the chain has and the last one's hash."""
        return self._audit_head_row(self._query("SELECT records, hash FROM audit_head WHERE id = 1"))

    @staticmethod
    def _audit_head_row(rows: list) -> tuple[int, str]:
        # the row is made by migration 4 and only ever updated: without it nothing that is audited (a trip, a
        # close, an adjustment) may be committed, so say why rather than fail on an empty result
        if not rows:
            raise ChainHeadMissing("the audit chain's head (table audit_head, row id 1) is missing: the audit "
                                   "log was altered outside the gateway; nothing audited (a trip, a close, an "
                                   "adjustment) can be committed until it is restored from a backup")
        return int(rows[0][0]), rows[0][1]

    def audit_chain(self, after_seq: int = 0, limit: int = 1000) -> list[tuple]:
        """Raw chain rows in order: ``(seq, at, actor, role, action, subject, reason, detail_text, prev_hash,
        hash)`` (the detail as stored: the hash covers that text)."""
        return self._query("SELECT seq, at, actor, role, action, subject, reason, detail, prev_hash, hash "
                           "FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))

    def audit_page(self, subject: str | None = None, action: str | None = None, before_seq: int | None = None,
                   limit: int = 100) -> list[tuple]:
        """Newest first: ``(seq, at, actor, role, action, subject, reason, detail, hash)``."""
        where, params = _filters(subject=subject, action=action)
        if before_seq is not None:
            where, params = f"{where} AND seq < ?", (*params, before_seq)
        rows = self._query("SELECT seq, at, actor, role, action, subject, reason, detail, hash FROM audit_log "
                           f"WHERE {where} ORDER BY seq DESC LIMIT ?", (*params, limit))
        return [(*r[:7], json.loads(r[7]), r[8]) for r in rows]

    def audit_log(self, subject: str | None = None) -> list[tuple]:
        sql = "SELECT seq, at, actor, role, action, subject, reason, detail FROM audit_log"
        rows = self._query(sql + " WHERE subject = ? ORDER BY seq", (subject,)) if subject else \
            self._query(sql + " ORDER BY seq")
        return [(*r[:7], json.loads(r[7])) for r in rows]


def _filters(**equal) -> tuple[str, tuple]:
    """A WHERE condition of ``column = ?`` for each value given (None: no condition on that column)."""
    given = {k: v for k, v in equal.items() if v is not None}
    return " AND ".join([f"{k} = ?" for k in given] or ["1 = 1"]), tuple(given.values())


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)
