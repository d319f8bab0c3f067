
import pytest

from protocols.dlt645.client import Dlt645Client, Dlt645Link, LinkSettings
from simulators.dlt645 import PtyBus, SimBus, make_meters, serve_tcp

FAST = dict(turnaround_s=0.15, margin_s=0.05, baud=9600)


@pytest.fixture
async def tcp_bus():
    """A simulated bus of five meters behind a TCP listener; yields (bus, client)."""
    bus = SimBus.of(make_meters(1, 5, seed=3))
    server = await serve_tcp(bus)
    port = server.sockets[0].getsockname()[1]
    link = Dlt645Link.tcp("127.0.0.1", port, LinkSettings(retries=0, **FAST))
    await link.open()
    yield bus, Dlt645Client(link)
    await link.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def pty_bus():
    """The same over a real pseudo-terminal, opened 8N1 (ptys refuse even parity)."""
    bus = SimBus.of(make_meters(1001, 3, seed=4))
    pty = PtyBus(bus)
    link = Dlt645Link.serial(pty.path, LinkSettings(parity="N", retries=0, **FAST))
    await link.open()
    yield bus, Dlt645Client(link)
    await link.close()
    pty.close()


# ---------------------------------------------------------------- stores (real SQLite file, real PostgreSQL)

import os
import uuid
from contextlib import contextmanager

PG_DSN = os.environ.get("FEIKONG_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_server():
    """The PostgreSQL server the tests use: FEIKONG_PG_DSN, else the local one. Never skipped: `./run test`
    makes sure one is running, and a missing server is a failure, not a pass."""
    import psycopg

    try:
        with psycopg.connect(PG_DSN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_DSN} ({exc}); `./run test` starts one, "
                    f"or set FEIKONG_PG_DSN")
    return PG_DSN


@contextmanager
def fresh_schema(server: str):
    """A DSN whose search_path is a new schema, dropped afterwards."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in server else "?"
    try:
        yield f"{server}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_dsn(pg_server):
    with fresh_schema(pg_server) as dsn:
        yield dsn


@pytest.fixture
def pg_dsn_2(pg_server):
    """A second fresh schema, for tests that compare two databases."""
    with fresh_schema(pg_server) as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'feikong.db'}"
    return request.getfixturevalue("pg_dsn")



# ---------------------------------------------------------------- a real Mosquitto broker on a free port

from simulators.broker import Broker, mosquitto_available


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto broker of this test's own (anonymous, persistent, unlimited queues), killed at the end.
    Never skipped: `./run test` installs mosquitto where it is missing."""
    if not mosquitto_available():
        pytest.fail("mosquitto is not installed; `./run test` installs it (Debian: mosquitto mosquitto-clients)")
    with Broker(tmp_path / "broker") as b:
        yield b
