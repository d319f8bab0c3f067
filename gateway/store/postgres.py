"""PostgreSQL adapter (psycopg 3): the scale-out store. Readings go in with COPY; the rest shares the SQL."""
from __future__ import annotations

import re

import psycopg

from .base import INBOX_NOTIFY, READING_COLUMNS, Store

_PLACEHOLDER = re.compile(r"\?")


def _pg(sql: str) -> str:
    # the shared SQL uses qmark placeholders; none of it has a literal '?'
    return _PLACEHOLDER.sub("%s", sql)


class PostgresStore(Store):
    dialect = "postgresql"
    serial_pk = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    real = "DOUBLE PRECISION"

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        #: session settings applied to every connection this store opens (see :meth:`limit_idle_transactions`)
        self.session: dict[str, str] = {}
        self.conn = self._connect()

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"cannot connect to PostgreSQL at {_redact(self.dsn)}: {exc}".strip()) from None
        for name, value in self.session.items():
            conn.execute(f"SET {name} = '{value}'")
        return conn

    def limit_idle_transactions(self, seconds: float) -> None:
        """The server ends this store's session when a transaction stays idle longer than ``seconds``: an
        instance frozen inside a transaction (SIGSTOP, a paused VM) would otherwise hold its lease rows FOR
        SHARE for ever, and no other instance could take them over (gateway/cluster.py)."""
        self.session["idle_in_transaction_session_timeout"] = f"{int(seconds * 1000)}ms"
        if not self._in_tx and not self.conn.closed:
            self.conn.execute(f"SET idle_in_transaction_session_timeout = '{int(seconds * 1000)}ms'")

    def _live(self) -> psycopg.Connection:
        """The connection, opened anew if the server dropped it (a restart, a failover): only between
        transactions, so that one never spans two connections (the statement that met the dropped connection
        has already raised to its caller, who tries again)."""
        if self.conn.closed and not self._in_tx:
            self.conn = self._connect()
        return self.conn

    def _execute(self, sql, params=()):
        return self._live().execute(_pg(sql), params)

    def _executemany(self, sql, rows) -> None:
        rows = list(rows)
        if rows:
            with self._live().cursor() as cur:
                cur.executemany(_pg(sql), rows)

    def _insert_readings(self, rows: list[tuple]) -> None:
        # COPY cannot skip conflicts: stage, then insert what is new (re-delivered readings are ignored)
        cols = ", ".join(READING_COLUMNS)
        with self._live().cursor() as cur:
            cur.execute("CREATE TEMP TABLE IF NOT EXISTS readings_in (LIKE readings) ON COMMIT DELETE ROWS")
            with cur.copy(f"COPY readings_in ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(f"INSERT INTO readings ({cols}) SELECT {cols} FROM readings_in ON CONFLICT DO NOTHING")

    def _begin(self) -> None:
        self._live().execute("BEGIN")

    def _commit(self) -> None:
        self.conn.execute("COMMIT")

    def _rollback(self) -> None:
        if not self.conn.closed and self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.conn.execute("ROLLBACK")

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]

    def append_only_sql(self, table: str) -> list[str]:
        return [f"CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN RAISE EXCEPTION USING MESSAGE = '{table} is append-only: ' || TG_OP || ' refused'; END $$",
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()",
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_append_only()"]

    def close(self) -> None:
        self.conn.close()

    def notify_inbox(self, channels: list[str]) -> None:
        for channel in channels:
            self._execute("SELECT pg_notify(?, ?)", (INBOX_NOTIFY, channel))


def _redact(dsn: str) -> str:
    return re.sub(r"(password=|:)([^@\s]+)@", r"\1***@", dsn)
