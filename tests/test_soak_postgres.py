"""The soak's private PostgreSQL server (tests/soak/postgres.py), and what the gateway's PostgreSQL store does
when that server restarts under it: the statement that meets the dropped connection fails, the next
transaction runs on a new connection, nothing committed is lost and nothing half-done survives."""
import psycopg
import pytest

from gateway.store import open_store
from tests.soak.postgres import PrivatePostgres

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with PrivatePostgres() as pg:
        yield pg


def count(store) -> int:
    return store._query("SELECT COUNT(*) FROM tariffs")[0][0]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_the_store_reconnects_after_the_server_restarts_and_keeps_what_was_committed(server, mode):
    store = open_store(server.dsn)
    try:
        store.migrate()
        with store.transaction():
            store._execute("DELETE FROM tariffs")
            store._execute("INSERT INTO tariffs (tariff_id, definition) VALUES ('kept', '[]')")
        server.restart(mode)
        with pytest.raises(psycopg.OperationalError):  # the connection it had is gone: this call says so
            with store.transaction():
                store._execute("INSERT INTO tariffs (tariff_id, definition) VALUES ('lost', '[]')")
        with store.transaction():  # the next one runs on a new connection
            store._execute("INSERT INTO tariffs (tariff_id, definition) VALUES ('after', '[]')")
        assert sorted(r[0] for r in store._query("SELECT tariff_id FROM tariffs")) == ["after", "kept"]
    finally:
        store.close()


def test_while_the_server_is_down_every_call_fails_as_the_store_being_away(server):
    store = open_store(server.dsn)
    try:
        assert count(store) >= 0
        server.stop("fast")
        try:
            failures = []
            for _ in range(3):
                try:
                    count(store)
                except (psycopg.OperationalError, OSError) as exc:  # what the MQTT bridge waits out
                    failures.append(type(exc).__name__)
            assert len(failures) == 3 and "ConnectionError" in failures
        finally:
            server.start()
        assert count(store) >= 0
    finally:
        store.close()


def test_a_transaction_cut_by_a_restart_commits_nothing(server):
    store = open_store(server.dsn)
    try:
        store.migrate()
        with pytest.raises(psycopg.OperationalError):
            with store.transaction():
                store._execute("INSERT INTO tariffs (tariff_id, definition) VALUES ('half', '[]')")
                server.restart("immediate")
                store._execute("INSERT INTO tariffs (tariff_id, definition) VALUES ('done', '[]')")
        assert not store._query("SELECT tariff_id FROM tariffs WHERE tariff_id IN ('half', 'done')")
    finally:
        store.close()
