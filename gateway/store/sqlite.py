"""SQLite adapter: the embedded default. WAL, synchronous=FULL (a money ledger), one writer."""
from __future__ import annotations

import sqlite3

from .base import Store


class SqliteStore(Store):
    dialect = "sqlite"
    serial_pk = "INTEGER PRIMARY KEY AUTOINCREMENT"
    real = "REAL"
    without_rowid = " WITHOUT ROWID"

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        super().__init__()
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"store.synchronous must be FULL, NORMAL or EXTRA, got {synchronous!r}")
        self.path = path
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE takes the write lock up front)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.conn.execute("PRAGMA busy_timeout=5000")

    def _execute(self, sql, params=()):
        return self.conn.execute(sql, params)

    def _executemany(self, sql, rows) -> None:
        self.conn.executemany(sql, rows)

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self.conn.execute("COMMIT")

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def _has_table(self, name: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                      (name,)).fetchone())

    def append_only_sql(self, table: str) -> list[str]:
        return [f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"
                for verb in ("UPDATE", "DELETE")]

    def close(self) -> None:
        self.conn.close()
