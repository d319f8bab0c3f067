"""Several gateway instances on one PostgreSQL database (gateway/cluster.py, docs/scaling.md): the pure lease
plan, the lease table and the fence on a real PostgreSQL, and gateway child processes over simulated DL/T 645
TCP buses and a real Mosquitto, one of them killed with SIGKILL."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from gateway.cluster import Cluster, Lease, LeaseDb, LeaseLost, fair_share, plan
from gateway.config import check_service_config
from gateway.store import open_store

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the pure decision


def leases(**holders) -> dict[str, Lease]:
    """channel=holder (live) or channel=(holder, live)."""
    out = {}
    for c, h in holders.items():
        holder, live = h if isinstance(h, tuple) else (h, h is not None)
        out[c] = Lease(c, holder, 1, live)
    return out


def test_fair_share_is_the_ceiling_of_channels_per_live_instance():
    assert [fair_share(10, n) for n in (0, 1, 2, 3, 4, 10, 11)] == [10, 10, 5, 4, 3, 1, 1]


def test_a_lone_instance_takes_every_free_channel():
    p = plan(["a", "b", "c"], {}, "gw1", 1)
    assert sorted(p.take) == ["a", "b", "c"] and p.release == ()


def test_an_instance_above_its_share_releases_the_excess_and_takes_nothing():
    p = plan(["a", "b", "c", "d"], leases(a="gw1", b="gw1", c="gw1", d="gw1"), "gw1", 2)
    assert p.release == ("c", "d") and p.take == ()


def test_a_newcomer_takes_only_free_channels_up_to_its_share():
    held = leases(a="gw1", b="gw1", c=None, d=None, e="gw1")
    p = plan(["a", "b", "c", "d", "e"], held, "gw2", 2)
    assert sorted(p.take) == ["c", "d"] and p.release == ()  # share 3, but only two are free
    assert plan(["a", "b", "c", "d", "e"], held, "gw2", 3).take in (("c", "d"), ("d", "c"))


def test_expired_leases_are_free_even_our_own():
    held = leases(a=("gw1", False), b=("gw2", False), c="gw2")
    p = plan(["a", "b", "c"], held, "gw1", 1)
    assert sorted(p.take) == ["a", "b"]  # c is live with gw2: not ours to take
    # an expired lease of our own is not counted as held: it is taken again (a new epoch)
    assert plan(["a"], leases(a=("gw1", False)), "gw1", 1).take == ("a",)


def test_survivors_of_three_share_a_dead_instances_channels():
    chans = [f"bus{i}" for i in range(6)]
    held = leases(bus0="gw1", bus1="gw1", bus2=("gw2", False), bus3=("gw2", False), bus4="gw3", bus5="gw3")
    p1, p3 = plan(chans, held, "gw1", 2), plan(chans, held, "gw3", 2)
    assert len(p1.take) == 1 and len(p3.take) == 1 and set(p1.take) | set(p3.take) <= {"bus2", "bus3"}


# --------------------------------------------------------------------------- the lease table, for real


def test_sqlite_with_cluster_is_a_config_error_naming_the_keys(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[store]\nurl = "sqlite://x.db"\n[cluster]\nlease_ttl_s = 0.5\n')
    config, errors = check_service_config(cfg)
    assert config is None
    text = "\n".join(errors)
    assert "[store] url must be postgresql://" in text and "cluster:" in text
    assert "lease_ttl_s 0.5 is out of bounds; allowed: 1..600 seconds" in text


def test_a_postgresql_config_with_cluster_is_read(tmp_path, pg_dsn):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[store]\nurl = "{pg_dsn}"\n[cluster]\nlease_ttl_s = 3\n')
    config, errors = check_service_config(cfg)
    assert errors == [] and config.cluster.lease_ttl_s == 3.0
    cfg.write_text(f'[store]\nurl = "{pg_dsn}"\n')
    assert check_service_config(cfg)[0].cluster is None
    # the leases are renewed only while the writer commits, and the tick commits every tick_s
    cfg.write_text(f'[store]\nurl = "{pg_dsn}"\n[gateway]\ntick_s = 2\n[cluster]\nlease_ttl_s = 3\n')
    config, errors = check_service_config(cfg)
    assert config is None and len(errors) == 1 and "gateway.tick_s: 2 with [cluster] lease_ttl_s 3" in errors[0]
    assert "allowed: at most lease_ttl_s / 2" in errors[0]


def test_with_cluster_an_account_with_meters_on_two_channels_is_a_config_error(tmp_path, pg_dsn):
    """The instance holding an account's channel makes the commands for all its meters, and can send only on
    channels it holds: with [cluster] such a fleet is refused, naming the account and the channels."""
    (tmp_path / "fleet.csv").write_text("account_id,tariff,meter_id,channel\nA1,flat,000000000001,bus1\n"
                                        "A1,,000000000002,bus2\nA2,flat,000000000003,bus2\n")
    channels = "".join(f'[[channels]]\nkind = "dlt645_tcp"\nname = "{n}"\nhost = "127.0.0.1"\nport = {p}\n'
                       for n, p in (("bus1", 9001), ("bus2", 9002)))
    cfg = tmp_path / "gw.toml"
    base = (f'[store]\nurl = "{pg_dsn}"\n[fleet]\nfile = "fleet.csv"\n'
            f'tariffs = "{ROOT / "config" / "tariffs.example.json"}"\n')
    cfg.write_text(base + channels)
    config, errors = check_service_config(cfg)
    assert errors == [] and len(config.meters) == 3  # one instance: allowed
    cfg.write_text(base + "[cluster]\nlease_ttl_s = 3\n" + channels)
    config, errors = check_service_config(cfg)
    assert config is None and len(errors) == 1, errors
    assert "account A1 has meters on channels bus1, bus2; with [cluster] every meter of an account must be on " \
           "one channel" in errors[0] and "fleet.csv" in errors[0]


def _migrated(dsn: str):
    store = open_store(dsn)
    store.migrate()
    return store


def test_acquire_renew_expire_and_take_over(pg_dsn):
    _migrated(pg_dsn).close()
    a, b = LeaseDb(pg_dsn, "gw1", 1.0), LeaseDb(pg_dsn, "gw2", 1.0)
    try:
        a.ensure(["bus1", "bus2"])
        b.ensure(["bus1", "bus2"])  # twice: nothing changes
        e1 = a.acquire("bus1")
        assert e1 == 1 and b.acquire("bus1") is None  # held, live: not for another
        assert a.renew({"bus1": e1}) == {"bus1"}
        assert a.renew({"bus1": e1 + 1}) == set()  # another epoch is not ours
        time.sleep(1.2)  # expired (the database's clock)
        assert a.leases()["bus1"].live is False
        e2 = b.acquire("bus1")
        assert e2 == e1 + 1
        assert a.renew({"bus1": e1}) == set()  # taken over: the old holder's renewal fails
        assert a.holder("bus1") == "gw2"
        b.release("bus1", e2)
        assert a.holder("bus1") is None and a.acquire("bus1") == e2 + 1  # handed over: free at once
        a.heartbeat()
        b.heartbeat()
        assert sum(a.members().values()) == 2  # live ones
        b.leave()
        assert sum(a.members().values()) == 1
    finally:
        a.close()
        b.close()


def _fenced_holder(dsn: str, ttl: float):
    """A store fenced by a cluster (no keeper thread) that holds and acts for bus1: ``(store, cluster, epoch)``."""
    store = _migrated(dsn)
    cluster = Cluster(dsn, "gw1", ["bus1"], ttl)
    cluster.db = LeaseDb(dsn, "gw1", ttl)
    cluster.db.ensure(["bus1"])
    epoch = cluster.db.acquire("bus1")
    cluster.acting = {"bus1": epoch}
    cluster.held = {"bus1": epoch}
    store.fence = cluster.fence
    return store, cluster, epoch


def test_the_fence_fails_a_transaction_once_the_lease_is_gone_and_nothing_commits(pg_dsn):
    store, cluster, epoch = _fenced_holder(pg_dsn, 1.0)
    other = LeaseDb(pg_dsn, "gw2", 1.0)
    try:
        with store.transaction():
            store.put_inbox([("k1", "bus1", "credit", "{}", 1.0)])
        time.sleep(1.2)
        assert other.acquire("bus1") == epoch + 1
        with pytest.raises(LeaseLost, match="bus1"):
            with store.transaction():
                store.put_inbox([("k2", "bus1", "credit", "{}", 2.0)])
        assert cluster.acting == {} and "bus1" not in cluster.wanted()  # stopped acting for it
        store.fence = None
        assert [k for k, _ in store.inbox(["bus1"], "credit")] == ["k1"]  # k2 rolled back
    finally:
        other.close()
        cluster.db.close()
        store.close()


def test_an_acquirer_waits_for_a_fenced_transaction_of_the_holder(pg_dsn):
    """FOR SHARE: the holder's transaction in progress is finished before another can take the lease, so the
    new holder's reload sees what it committed."""
    store, cluster, epoch = _fenced_holder(pg_dsn, 1.0)
    try:
        taken: list[float] = []

        def acquirer():
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                time.sleep(1.1)  # expired by now, but the holder's transaction holds the row
                row = conn.execute("UPDATE leases SET holder = 'gw2', epoch = epoch + 1 WHERE channel = 'bus1' "
                                   "AND expires_at < now() RETURNING epoch").fetchone()
                taken.append(time.monotonic())
                return row

        import threading

        result: list = []
        t = threading.Thread(target=lambda: result.append(acquirer()))
        with store.transaction():
            t.start()
            time.sleep(1.6)
            store.put_inbox([("k1", "bus1", "credit", "{}", 1.0)])
            committed_at = time.monotonic()
        t.join(5)
        assert result == [(epoch + 1,)] and taken[0] >= committed_at
    finally:
        cluster.db.close()
        store.close()


# --------------------------------------------------------------------------- instances as child processes


def test_a_holder_frozen_inside_a_transaction_neither_blocks_the_keeper_nor_keeps_the_lease(pg_dsn):
    """An instance frozen (SIGSTOP, a paused VM) with a fenced transaction open holds its lease row FOR SHARE:
    another keeper's acquisition gives up at once (lock_timeout, its own renewals go on) instead of hanging,
    and the server ends the frozen session once its transaction has been idle for the ttl, so the lease is
    taken over; the frozen instance's transaction commits nothing."""
    store, cluster, epoch = _fenced_holder(pg_dsn, 1.0)
    store.limit_idle_transactions(2.0)  # (the gateway gives it the ttl; longer here, to see both steps)
    other = LeaseDb(pg_dsn, "gw2", 1.0)
    try:
        with pytest.raises(psycopg.OperationalError):
            with store.transaction():  # the fence's FOR SHARE is taken here; then the instance freezes
                time.sleep(1.2)
                asked = time.monotonic()
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    other.acquire("bus1")  # expired, but its row is locked by the frozen transaction
                assert time.monotonic() - asked < 0.9  # gave up at lock_timeout (ttl / 5), no hang
                time.sleep(1.3)  # idle in the transaction past the limit: the server ends the session
                assert other.acquire("bus1") == epoch + 1  # expired, and its row no longer locked
                store.put_inbox([("k1", "bus1", "credit", "{}", 1.0)])  # the thawed instance: refused
        assert _query(pg_dsn, "SELECT count(*) FROM inbox") == [(0,)]
        assert other.holder("bus1") == "gw2"
    finally:
        other.close()
        cluster.db.close()
        store.close()


def _config(tmp_path: Path, instance: str, dsn: str, broker, buses: dict[str, int], ttl: float) -> Path:
    channels = "".join(f"""
[[channels]]
kind = "dlt645_tcp"
name = "{name}"
host = "127.0.0.1"
port = {port}
baud = 9600
timeout_s = 0.2
margin_s = 0.1
retries = 0
""" for name, port in buses.items())
    path = tmp_path / f"{instance}.toml"
    path.write_text(f"""
[store]
url = "{dsn}"
[control]
file = "control.toml"
[gateway]
poll_interval_s = 1
tick_s = 0.2
[fleet]
file = "fleet.csv"
tariffs = "{ROOT / 'config' / 'tariffs.example.json'}"
[mqtt]
host = "{broker.host}"
port = {broker.port}
instance = "{instance}"
shared_group = "feikong"
[metrics]
port = 0
[http]
port = 0
[cluster]
lease_ttl_s = {ttl}
{channels}""")
    return path


def _holders(dsn: str) -> dict[str, str | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {c: h for c, h in conn.execute(  # (the channels' leases: not the publisher's, "@outbox")
            "SELECT channel, CASE WHEN expires_at > now() THEN holder END FROM leases "
            "WHERE channel NOT LIKE '@%'")}


def _query(dsn: str, sql: str) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.slow
async def test_two_instances_share_the_buses_and_a_killed_ones_share_is_taken_over(tmp_path, broker, pg_dsn):
    from gateway.clock import SystemClock, local_naive
    from simulators.billing import BillingSim
    from simulators.dlt645 import SimBus, SimMeter, serve_tcp

    from .test_service_run import Log, spawn

    ttl = 2.0
    local = local_naive(SystemClock())
    meters: dict[str, list[SimMeter]] = {
        f"bus{b}": [SimMeter(f"{b * 10 + i:012d}", relay_open=True, relay_command_open=True,
                             energy=[Decimal("100.00")] * 5) for i in range(1, 4)] for b in range(1, 5)}
    servers = {name: await serve_tcp(SimBus.of(group, clock=local, turnaround_s=0.0))
               for name, group in meters.items()}
    ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    rows = ["account_id,tariff,area,notice_channels,contacts,meter_id,channel,device_id"]
    every = {}
    for name, group in meters.items():
        for m in group:
            rows.append(f"A{m.address[-2:]},flat,north,sms,sms=1380000{m.address[-4:]},{m.address},{name},")
            every[m.address] = m
    (tmp_path / "fleet.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "control.toml").write_text("[commands.close]\nsettle_s = 1\nverify_first_s = 0.2\n"
                                           "verify_every_s = 0.2\n")
    cfg1 = _config(tmp_path, "gw1", pg_dsn, broker, ports, ttl)
    cfg2 = _config(tmp_path, "gw2", pg_dsn, broker, ports, ttl)
    billing = await asyncio.to_thread(BillingSim(broker.host, broker.port, client_id="cluster-billing").start)
    procs: dict[str, asyncio.subprocess.Process] = {}
    logs: dict[str, Log] = {}
    loop = asyncio.get_running_loop()

    async def start(name: str, cfg: Path) -> None:
        procs[name] = await spawn("run", "--config", str(cfg))
        logs[name] = Log(procs[name].stderr)

    async def until(predicate, timeout: float, what: str):
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"{what} not within {timeout}s; holders {_holders(pg_dsn)}; logs:\n" +
                                     "\n".join(f"--- {n}\n{lg.text()}" for n, lg in logs.items()))
            await asyncio.sleep(0.1)

    def relays_read() -> bool:
        return _query(pg_dsn, "SELECT COUNT(*) FROM relay_state WHERE is_open = 1")[0][0] == len(every)

    def closed(addresses) -> bool:
        return all(not every[a].relay_open for a in addresses)

    try:
        await start("gw1", cfg1)
        await logs["gw1"].wait_for("fleet: 12 accounts, 12 meters", 60)
        await start("gw2", cfg2)
        # a fair share each (the first hands two buses over when the second joins)
        await until(lambda: sorted(map(str, _holders(pg_dsn).values())) == ["gw1", "gw1", "gw2", "gw2"], 30,
                    "two buses each")
        await until(relays_read, 30, "every relay read open")
        first = [m.address for group in meters.values() for m in group[:1]]
        for a in first:  # both alive: payments reach either instance, the inbox brings them to the owner
            billing.pay(f"A{a[-2:]}", "50.00", f"PAY-{a}")
        await until(lambda: closed(first), 30, "the first payments' closes")

        victim = _holders(pg_dsn)["bus1"]
        survivor = "gw2" if victim == "gw1" else "gw1"
        killed_at = loop.time()
        procs[victim].send_signal(signal.SIGKILL)
        await procs[victim].wait()
        rest = [a for a in every if a not in first]
        for a in rest:  # during the outage
            billing.pay(f"A{a[-2:]}", "50.00", f"PAY-{a}")
        await until(lambda: set(_holders(pg_dsn).values()) == {survivor}, ttl + 10, "the takeover")
        takeover_s = loop.time() - killed_at
        print(f"takeover after SIGKILL: {takeover_s:.2f} s (lease_ttl_s {ttl})")
        assert takeover_s < ttl + 5, takeover_s
        # the survivor closes the meters whose payments reached it, or were queued for the dead instance's
        # session (it adopts that session: tests/test_mqtt_sessions.py)
        await logs[survivor].wait_for("took bus1", 10)
        await start(victim, cfg1 if victim == "gw1" else cfg2)
        await until(lambda: closed(every), 60, "every paid meter closed")
        await until(lambda: sorted(map(str, _holders(pg_dsn).values())) == ["gw1", "gw1", "gw2", "gw2"], 30,
                    "the returned instance's share handed back")

        ledger = _query(pg_dsn, "SELECT entry_id, amount_fen FROM ledger ORDER BY entry_id")
        assert ledger == sorted((f"PAY-{a}", 5000) for a in every)  # every payment once, none lost
        assert _query(pg_dsn, "SELECT COUNT(*) FROM inbox")[0][0] == 0
        for a, m in every.items():  # each meter's own log: one close, nothing applied twice
            assert [action for _, action, _ in m.relay_log] == ["direct_close"], (a, m.relay_log)
        def confirmed() -> list[tuple]:
            return sorted(_query(pg_dsn, "SELECT meter_id, COUNT(*) FROM relay_commands WHERE state = 'confirmed' "
                                         "AND action = 'close' GROUP BY meter_id"))

        await until(lambda: len(confirmed()) == len(every), 30, "every close verified by read-back")
        assert confirmed() == sorted((a, 1) for a in every)  # one close command per meter, whoever sent it

        # paused past its leases (a long GC, a frozen VM), then resumed: it finds them gone and stops acting
        paused = _holders(pg_dsn)["bus3"]
        other = "gw2" if paused == "gw1" else "gw1"
        procs[paused].send_signal(signal.SIGSTOP)
        await until(lambda: set(_holders(pg_dsn).values()) == {other}, ttl + 10, "the takeover from a paused one")
        procs[paused].send_signal(signal.SIGCONT)
        await logs[paused].wait_for("lost", 10)
        await until(lambda: sorted(map(str, _holders(pg_dsn).values())) == ["gw1", "gw1", "gw2", "gw2"], 30,
                    "the resumed instance's share back")
        await asyncio.sleep(2 * ttl)  # polls and ticks on both meanwhile
        for a, m in every.items():
            assert [action for _, action, _ in m.relay_log] == ["direct_close"], (a, m.relay_log)
        for name in list(procs):
            procs[name].send_signal(signal.SIGTERM)
        for name, p in procs.items():
            assert await asyncio.wait_for(p.wait(), 30) == 0, logs[name].text()
        assert all(h is None for h in _holders(pg_dsn).values())  # a clean stop hands the leases back
        for name, lg in logs.items():
            await lg.task
            assert "Traceback" not in lg.text(), lg.text()
    finally:
        for p in procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
        await asyncio.to_thread(billing.stop)
        for s in servers.values():
            s.close()
            await s.wait_closed()


# --------------------------------------------------------------------------- two shells on one database


@pytest.fixture
def two_shells(pg_dsn):
    """Two cost-control shells on one database: gw1 acting for bus1 (A0, A1; and A3, which has no meter: the
    first channel's), gw2 for bus2 (A2); -> (shells by instance, now). Closed after the test."""
    from gateway.core.model import Meter
    from gateway.costcontrol import CostControl

    from .control_fixtures import MONDAY, Ids, account
    from .core_fixtures import POLICY, tariffs

    shells = {}
    for me in ("gw1", "gw2"):
        cc = CostControl(open_store(pg_dsn), policy=POLICY, now=MONDAY, new_id=Ids())
        cc.accounting.register(tariffs(), [account(i) for i in range(4)],
                               [Meter(f"M{i}", f"A{i}", channel="bus1" if i < 2 else "bus2", max_kw=20)
                                for i in range(3)])
        cluster = Cluster(pg_dsn, me, ["bus1", "bus2"], 5.0)
        cluster.db = LeaseDb(pg_dsn, me, 5.0)
        cluster.db.ensure(["bus1", "bus2"])
        bus = "bus1" if me == "gw1" else "bus2"
        cluster.held = {bus: cluster.db.acquire(bus)}
        cc.attach(cluster, MONDAY)
        cc.rescope(cluster.held, MONDAY)
        shells[me] = cc
    yield shells, MONDAY
    for cc in shells.values():
        cc.cluster.db.close()
        cc.store.close()


def test_a_payment_for_another_instances_account_goes_through_the_inbox_once(two_shells):
    from gateway.core.model import Payment

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    pay = Payment("p-A2", "A2", 700, now - 60)
    gw1.ingest_credits([pay, Payment("p-A0", "A0", 300, now - 60)], now)  # gw1 received both
    assert [r[0] for r in gw1.store._query("SELECT entry_id FROM ledger")] == ["p-A0"]  # its own, directly
    assert gw1.store.inbox_pending() == 1
    assert gw2.engine.balance_of("A2") == 0  # not yet: the owner has not drained
    assert gw2.drain_inbox(now) == 1
    assert gw2.engine.balance_of("A2") == 700 and gw2.store.inbox_pending() == 0
    # a re-delivery reaching the other instance again: queued again, then a duplicate for the ledger
    gw1.ingest_credits([pay], now + 1)
    gw2.drain_inbox(now + 1)
    assert gw2.engine.balance_of("A2") == 700
    assert gw2.store._query("SELECT COUNT(*) FROM ledger WHERE entry_id = 'p-A2'")[0][0] == 1
    # the same id with another amount: the owner refuses it, as a dead letter naming the conflict
    gw1.ingest_credits([Payment("p-A2", "A2", 9999, now - 60)], now + 2)
    gw2.drain_inbox(now + 2)
    letters = [p for _, _, kind, _, _, p in gw2.store.outbox() if kind == "dead_letter"]
    assert len(letters) == 1 and "already used" in letters[0]["reason"]
    assert gw2.engine.balance_of("A2") == 700 and gw2.store.inbox_pending() == 0


def test_payments_and_adjustments_for_an_account_without_meters_reach_one_instance(two_shells):
    """An account without meters (the fleet allows it) belongs to the first channel by name: whichever instance
    receives its payment, the holder of that channel applies it (before, nobody drained it: acknowledged, lost)."""
    from gateway.core.model import Adjustment, Payment

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    gw2.ingest_credits([Payment("p-A3", "A3", 700, now - 60),
                        Adjustment("adj-A3", "A3", 50, now - 60, "olga", "goodwill")], now)
    assert gw2.store.inbox_pending() == 2 and gw2.drain_inbox(now) == 0  # not gw2's to apply
    assert gw1.drain_inbox(now) == 2
    assert gw1.engine.balance_of("A3") == 750 and gw1.store.inbox_pending() == 0
    gw1.ingest_credits([Payment("p2-A3", "A3", 100, now - 30)], now + 1)  # received by its owner: directly
    assert gw1.engine.balance_of("A3") == 850 and gw1.store.inbox_pending() == 0
    # a row an earlier version queued under channel "" (nobody drained those) is drained by the same owner
    from gateway.costcontrol import _inbox_body, inbox_key

    old = Payment("p3-A3", "A3", 25, now - 20)
    with gw2.store.transaction():
        gw2.store.put_inbox([(inbox_key(old, _inbox_body(old)), "", "credit", _inbox_body(old), now + 2)])
    assert gw2.drain_inbox(now + 2) == 0 and gw1.drain_inbox(now + 2) == 1
    assert gw1.engine.balance_of("A3") == 875 and gw1.store.inbox_pending() == 0


def test_an_operator_command_for_a_meter_held_elsewhere_is_refused_naming_the_holder(two_shells):
    from gateway.cluster import NotHeld
    from gateway.core.commands import RelayAction

    shells, now = two_shells
    with pytest.raises(NotHeld, match="meter M2 is on channel 'bus2', held by instance 'gw2'"):
        shells["gw1"].manual("M2", RelayAction.CLOSE, "olga", "operator", "test", "k1", now)
    made = shells["gw2"].manual("M2", RelayAction.CLOSE, "olga", "operator", "test", "k1", now)
    assert made.meter_id == "M2"
    # the controller of each holds only its own accounts' commands
    assert "M2" not in {c.meter_id for c in shells["gw1"].controller.commands.values()}
    shells["gw1"].reload(now)
    assert "M2" not in {c.meter_id for c in shells["gw1"].controller.commands.values()}


def test_a_trip_check_counts_a_payment_waiting_in_the_inbox(two_shells):
    """The fresh balance before a trip sees every acknowledged payment, also one another instance received
    and queued for the owner that has not drained it yet."""
    from gateway.core.model import Payment

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    assert gw2._inbox_paid("A2") == 0
    gw1.ingest_credits([Payment("p1", "A2", 700, now - 60), Payment("p2", "A1", 50, now - 60)], now)
    gw1.ingest_credits([Payment("p1", "A2", 700, now - 60)], now)  # a re-delivery, queued once
    assert gw2._inbox_paid("A2") == 700
    gw2.drain_inbox(now)
    assert gw2._inbox_paid("A2") == 0  # in the ledger now, counted there
    gw1.ingest_credits([Payment("p1", "A2", 700, now - 60)], now + 1)  # again: the ledger has the id
    assert gw2._inbox_paid("A2") == 0


def test_a_paused_holder_cannot_commit_sending_after_a_takeover(two_shells):
    """The duplicate-relay guarantee: the old holder's authorisation (SENDING, before any frame) is fenced
    off; the new holder, reloaded after taking the lease, has the command and sends it once."""
    from gateway.core.commands import RelayAction
    from gateway.core.control import Permit

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    cmd = gw2.manual("M2", RelayAction.CLOSE, "olga", "operator", "test", "k1", now)
    # gw2 pauses past its lease: expired at the database, and gw1 takes bus2 over
    gw1.store._execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE channel = 'bus2'")
    epoch = gw1.cluster.db.acquire("bus2")
    gw1.cluster.held["bus2"] = epoch
    gw1.rescope(gw1.cluster.held, now)
    assert cmd.command_id in gw1.controller.commands  # the new holder sees what the old one committed
    with pytest.raises(LeaseLost, match="bus2"):
        gw2.authorize(cmd.command_id, now + 1)
    assert gw2.store.command(cmd.command_id).state.value == "queued"  # nothing committed: nothing sent
    assert "bus2" not in gw2.cluster.acting and cmd.command_id not in gw2.controller.commands
    assert isinstance(gw1.authorize(cmd.command_id, now + 2), Permit)
    assert gw1.store.command(cmd.command_id).state.value == "sending"
    # gw2's readings of bus2 no longer count, and its payments for A2 go to the inbox for gw1
    from gateway.core.model import Payment

    gw2.ingest_credits([Payment("p9", "A2", 100, now)], now + 3)
    assert gw2.store.inbox_pending() == 1 and gw1.drain_inbox(now + 3) == 1
    assert gw1.engine.balance_of("A2") == 100


def test_an_area_flag_set_through_one_instance_counts_on_the_others(two_shells):
    from gateway.core.policy import AreaFlag

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    flag = AreaFlag("north", "extreme_weather", True, int(now) - 60, None, "olga", "storm")
    gw1.set_area_flag(flag, now, role="supervisor")
    assert ("north", "extreme_weather") not in gw2.controller.conditions.flags
    gw2.tick(now + 1)
    assert gw2.controller.conditions.flags[("north", "extreme_weather")] == flag
    # the same flag again changes nothing, an older one does not replace it
    gw2.tick(now + 2)
    gw1.store._execute("UPDATE area_flags SET since = since - 3600, active = 0")
    gw2.tick(now + 3)
    assert gw2.controller.conditions.flags[("north", "extreme_weather")] == flag


def test_the_keeper_thread_shares_out_hands_over_takes_over_and_hears_the_inbox(pg_dsn):
    store = _migrated(pg_dsn)
    chans = ["bus1", "bus2", "bus3", "bus4"]
    heard: list[str] = []
    a = Cluster(pg_dsn, "gw1", chans, 1.0)
    b = Cluster(pg_dsn, "gw2", chans, 1.0, on_inbox=heard.append)

    def until(predicate, timeout: float, what: str) -> float:
        started = time.monotonic()
        while not predicate():
            assert time.monotonic() - started < timeout, f"{what}: a {a.wanted()}, b {b.wanted()}"
            time.sleep(0.02)
        return time.monotonic() - started

    try:
        a.start()
        assert sorted(a.wanted()) == chans  # alone: every channel, before start() returns
        b.start()
        until(lambda: len(a.releasing) == 2, 3, "the first one marks its excess")
        for c in sorted(a.releasing):  # (the gateway does this once no exchange is in progress on the bus)
            a.release(c)
        until(lambda: len(b.wanted()) == 2, 3, "the newcomer takes its share")
        assert set(a.wanted()) | set(b.wanted()) == set(chans) and not set(a.wanted()) & set(b.wanted())
        mine = sorted(b.wanted())[0]
        with store.transaction():
            store.put_inbox([("k1", mine, "credit", "{}", 1.0)])
        until(lambda: mine in heard, 2, "the inbox notification")
        a.stop(leave=False)  # dies: its leases expire
        took = until(lambda: sorted(b.wanted()) == chans, 3, "the takeover")
        assert took < 1.0 + 1.0 / 5 + 0.5, took
        assert all(b.may_send(c) is False for c in chans)  # not acting until the gateway reloaded for them
        b.acting = b.wanted()
        assert all(b.may_send(c) for c in chans)
    finally:
        a.stop(leave=False)
        b.stop()
        store.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # a clean stop hands the leases back
        assert conn.execute("SELECT COUNT(*) FROM leases WHERE holder IS NOT NULL").fetchone()[0] == 0


async def test_the_api_refuses_a_relay_command_for_a_meter_another_instance_holds(pg_dsn, broker, tmp_path):
    from .api_fixtures import LiveApi, meter_address

    async with LiveApi(pg_dsn, broker, tmp_path, meters=1) as api:
        gw = api.gw
        channel = gw.control.engine.meter(meter_address(0)).channel
        other = LeaseDb(pg_dsn, "gw9", 30.0)
        try:
            other.ensure([channel])
            other.acquire(channel)
            cluster = Cluster(pg_dsn, "gw1", [channel], 30.0)
            cluster.db = LeaseDb(pg_dsn, "gw1", 30.0)
            await gw.writer.call(gw.control.attach, cluster, gw.clock.now())
            status, body = await api.call("olga", "POST", f"/api/v1/meters/{meter_address(0)}/close",
                                          {"reason": "customer called", "key": "k1"})
            assert status == 409, body
            assert f"is on channel {channel!r}, held by instance 'gw9'" in body["error"]
            status, body = await api.call("olga", "POST", f"/api/v1/meters/{meter_address(0)}/read")
            assert status == 409 and "held by instance 'gw9'" in body["error"], body
            # nothing was made for it here
            assert gw.control.store.meter_commands(meter_address(0)) == []
        finally:
            other.close()
            cluster.db.close()


# --------------------------------------------------------------------------- a gateway with leases, in process


@contextlib.asynccontextmanager
async def _sim_buses(groups: dict[str, list]):
    """Simulated DL/T 645 buses over TCP: name -> port."""
    from gateway.clock import SystemClock, local_naive
    from simulators.dlt645 import SimBus, serve_tcp

    local = local_naive(SystemClock())
    servers = {name: await serve_tcp(SimBus.of(group, clock=local, turnaround_s=0.0)) for name, group in groups.items()}
    try:
        yield {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()
            await s.wait_closed()


@contextlib.asynccontextmanager
async def _instance(dsn: str, me: str, ports: dict[str, int], meters: dict[str, list[str]], ttl: float,
                    poll_s: float = 0.3, tick_s: float = 0.2):
    """A running gateway with leases (account A<i> owns the i-th meter, bus by bus), stopped cleanly at the end."""
    from gateway.app import Bus, Gateway
    from gateway.clock import SystemClock
    from gateway.core.model import Meter
    from protocols.dlt645.client import Dlt645Link

    from .control_fixtures import LIVE_LINK, QUICK, account
    from .core_fixtures import POLICY, tariffs

    channels = [Bus(Dlt645Link.tcp("127.0.0.1", port, LIVE_LINK, name=name), meters[name])
                for name, port in ports.items()]
    gw = await Gateway(dsn, channels, QUICK, POLICY, SystemClock(), poll_interval_s=poll_s, tick_s=tick_s,
                       cluster=Cluster(dsn, me, list(ports), ttl)).open()
    if not gw.control.engine.account_ids:
        ids = [m for name in ports for m in meters[name]]
        bus_of = {m: name for name in ports for m in meters[name]}
        await gw.writer.call(gw.control.accounting.register, tariffs(), [account(i) for i in range(len(ids))],
                             [Meter(m, f"A{i}", channel=bus_of[m]) for i, m in enumerate(ids)])
    stop = asyncio.Event()
    gw.test_stop, gw.test_run = stop, asyncio.create_task(gw.run(stop))  # (for a test that stops it itself)
    try:
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(gw.test_run, 30)
        await gw.close()


async def _until(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


def _take_over(dsn: str, channel: str, me: str = "gw2", ttl: float = 30.0) -> int:
    """Another instance takes the channel, as after this one's lease expired (a pause, a lost connection)."""
    other = LeaseDb(dsn, me, ttl)
    try:
        other.conn.execute("UPDATE leases SET expires_at = now() - interval '1 second' WHERE channel = %s",
                           (channel,))
        epoch = other.acquire(channel)
        assert epoch is not None
        return epoch
    finally:
        other.close()


async def test_a_lease_the_fence_finds_lost_stops_the_poll_loop_and_closes_the_link(pg_dsn):
    """The fence notices first (the keeper renews only every ttl / 5): the poll loop still stops, the link is
    closed for the new holder, and the bus is not read again."""
    from simulators.dlt645 import SimMeter

    sim = SimMeter("000000000001", energy=[Decimal("100.00")] * 5)
    async with _sim_buses({"bus1": [sim]}) as ports, \
            _instance(pg_dsn, "gw1", ports, {"bus1": [sim.address]}, ttl=30.0) as gw:
        link = gw.channels[0].link
        await _until(lambda: gw.cluster.acting and link.is_open and sim.requests > 0, 10, "polling bus1")
        _take_over(pg_dsn, "bus1")
        await _until(lambda: not gw.cluster.acting, 5, "the next tick's fence")
        await _until(lambda: not link.is_open, 5, "the link closed")
        seen = sim.requests
        await asyncio.sleep(1.5)  # five poll intervals
        assert sim.requests == seen and not link.is_open


def test_a_lease_lost_in_a_store_only_transaction_rebuilds_memory_without_the_channel(pg_dsn, two_shells):
    """add_events and mark_published change nothing in memory, but a lease they find lost must still drop the
    channel's commands and cases from it (else SENDING over the new holder's rows, duplicate notices)."""
    from gateway.core.commands import RelayAction
    from gateway.core.control import Event

    shells, now = two_shells
    gw2 = shells["gw2"]
    cmd = gw2.manual("M2", RelayAction.CLOSE, "olga", "operator", "test", "k1", now)
    _take_over(pg_dsn, "bus2", "gw1")
    with pytest.raises(LeaseLost, match="bus2"):
        gw2.add_events([Event("dl-1", "dead_letter", "", now, {})])
    assert cmd.command_id not in gw2.controller.commands
    assert gw2.steps(now + 60) == [] and gw2.due_buses(now + 60) == set()
    assert "dl-1" not in {e[1] for e in gw2.store.outbox()}


async def test_a_clean_stop_hands_the_leases_back_only_once_the_buses_are_quiet(pg_dsn):
    """SIGTERM while a relay exchange is on a bus: the lease is handed back after it, never during it (the next
    holder would read the relay back before our frame is out, and send again)."""
    from simulators.dlt645 import SimMeter

    sim = SimMeter("000000000001", energy=[Decimal("100.00")] * 5)
    async with _sim_buses({"bus1": [sim]}) as ports, \
            _instance(pg_dsn, "gw1", ports, {"bus1": [sim.address]}, ttl=4.0) as gw:
        await _until(lambda: gw.cluster.acting, 10, "bus1 taken")
        async with gw.executor.drivers["bus1"].reserved():  # an exchange in progress (as the executor holds it)
            gw.test_stop.set()
            await asyncio.sleep(2.0)  # the keeper's round (every 0.8 s) has ended meanwhile
            assert _holders(pg_dsn) == {"bus1": "gw1"}  # not handed back under a busy bus
            assert not gw.test_run.done()
        await asyncio.wait_for(gw.test_run, 10)
        assert _holders(pg_dsn) == {"bus1": None}  # handed back once it was quiet


async def test_an_instance_whose_writer_commits_nothing_lets_its_leases_go_and_takes_them_back_after(pg_dsn):
    """The keeper has a connection of its own: it could renew forever for a writer that cannot commit (its
    connection lost, a stuck transaction). It renews only while the writer has committed within the ttl."""
    from simulators.dlt645 import SimMeter

    sim = SimMeter("000000000001", energy=[Decimal("100.00")] * 5)
    async with _sim_buses({"bus1": [sim]}) as ports, \
            _instance(pg_dsn, "gw1", ports, {"bus1": [sim.address]}, ttl=2.0) as gw:
        await _until(lambda: gw.cluster.acting and _holders(pg_dsn) == {"bus1": "gw1"}, 10, "bus1 taken")
        stuck = asyncio.ensure_future(gw.writer.call(time.sleep, 6.0))  # the writer commits nothing meanwhile
        await _until(lambda: _holders(pg_dsn) == {"bus1": None}, 2 * 2.0 + 1.0, "the lease let go")
        assert not gw.cluster.may_send("bus1") and gw.cluster.wanted() == {}
        assert _query(pg_dsn, "SELECT COUNT(*) FROM members WHERE seen_at > now() - interval '2 seconds'") == [(0,)]
        await stuck
        await _until(lambda: gw.cluster.acting and _holders(pg_dsn) == {"bus1": "gw1"}, 10, "bus1 taken again")


async def test_the_lease_is_checked_after_the_link_is_open_right_before_the_frame(pg_dsn):
    """A TCP connect can take seconds: it comes before the last lease check, so only the write follows it."""
    from gateway.core.commands import RelayAction
    from simulators.dlt645 import SimMeter

    sim = SimMeter("000000000001", relay_open=True, relay_command_open=True, energy=[Decimal("100.00")] * 5)
    async with _sim_buses({"bus1": [sim]}) as ports, \
            _instance(pg_dsn, "gw1", ports, {"bus1": [sim.address]}, ttl=30.0, poll_s=3600) as gw:
        link = gw.channels[0].link
        await _until(lambda: gw.cluster.acting and sim.requests > 0, 10, "bus1 taken and read")
        async with gw.executor.drivers["bus1"].reserved():
            await gw.channels[0].close()  # (a TCP serial server dropped us, say)
        assert not link.is_open
        open_at_check: list[bool] = []
        lease_check = gw.executor.may_send
        gw.executor.may_send = lambda bus: open_at_check.append(link.is_open) or lease_check(bus)
        await gw.writer.call(gw.control.manual, sim.address, RelayAction.CLOSE, "olga", "operator", "test", "k1",
                             gw.clock.now())
        gw.executor.wake()
        await _until(lambda: not sim.relay_open, 10, "the close sent")
        assert open_at_check == [True], open_at_check


async def test_a_connect_that_is_never_answered_times_out():
    """A TCP serial server whose accept queue is full drops the SYN: the connect would hang for minutes."""
    import socket

    from protocols.dlt645.client import CONNECT_TIMEOUT_S, Dlt645Link, Dlt645LinkError

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    queued = []
    for _ in range(2):  # fill the accept queue (never accepted)
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        queued.append(c)
    await asyncio.sleep(0.2)
    link = Dlt645Link.tcp("127.0.0.1", port, name="bus1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(Dlt645LinkError, match="cannot open bus1"):
            await asyncio.wait_for(link.open(), CONNECT_TIMEOUT_S + 10)
        assert loop.time() - started < CONNECT_TIMEOUT_S + 1
    finally:
        for c in queued:
            c.close()
        server.close()


def test_levels_one_instance_recalibrated_reach_the_others_at_their_next_tick(two_shells):
    """Only the instance that finds recalibration due recalibrates (for every account); the others take the
    stored levels up at their next tick and re-evaluate their own accounts against them."""
    import numpy as np

    from gateway.core.model import Payment
    from gateway.core.thresholds import BAND_NAMES, Levels

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    gw2.ingest_credits([Payment("p-A2", "A2", 4000, now - 60)], now)  # between warning 2 and warning 1
    a2 = gw2.engine.account_no["A2"]
    assert BAND_NAMES[int(gw2.engine.state[a2])] != "normal"
    gw1.tick(now)  # due: gw1 recalibrates, for every account
    gw2.tick(now + 1)
    assert gw2.store.last_calibration() == now
    # gw1's view of the cost data gave lower levels (here written as its recalibration writes them)
    n = len(gw1.engine.account_ids)
    lower = Levels(np.full(n, 3000), np.full(n, 1000), np.zeros(n, np.int64), np.full(n, 1500))
    with gw1.store.transaction():
        gw1.store.save_levels(lower, now + 2)
    gw2.tick(now + 3)
    assert int(gw2.engine.levels.warn1[a2]) == 3000 and int(gw2.engine.levels.warn2[a2]) == 1000
    assert BAND_NAMES[int(gw2.engine.state[a2])] == "normal"  # re-evaluated against them
    assert gw2.store._query("SELECT state FROM account_state WHERE account_no = ?", (a2,))[0][0] == \
        int(gw2.engine.state[a2])  # and committed


def test_a_lease_the_fence_finds_lapsed_while_a_renewal_is_in_flight_stays_renewed_and_is_taken_up_again(pg_dsn):
    """The fence sees the lease expired while the keeper's renewal (from its snapshot of held) is on its way
    and succeeds: the database says it is ours, so the keeper must keep renewing it, and the gateway act for it
    again (before, nobody renewed it: unserved for up to a ttl)."""
    store, cluster, epoch = _fenced_holder(pg_dsn, 30.0)
    try:
        store._execute("UPDATE leases SET expires_at = now() - interval '1 second'")  # lapsed (a pause)
        with pytest.raises(LeaseLost, match="bus1"):
            with store.transaction():
                pass
        assert cluster.acting == {} and cluster.wanted() == {}
        assert cluster.db.renew({"bus1": epoch}) == {"bus1"}  # the renewal that was in flight
        cluster._round()  # the keeper's next round
        assert cluster.wanted() == {"bus1": epoch}  # ours again, same epoch: nobody acted meanwhile
        assert _holders(pg_dsn) == {"bus1": "gw1"}
        cluster.acting = cluster.wanted()  # (the gateway reloaded for it)
        with store.transaction():
            pass
    finally:
        cluster.db.close()
        store.close()


def test_an_inbox_item_the_owner_refuses_is_dead_lettered_in_the_transaction_that_consumes_it(two_shells):
    """Consumed and dead-lettered together: a crash (or a lost lease) between two transactions would otherwise
    lose the dead letter of an item already taken out of the inbox."""
    from gateway.core.model import Payment

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    gw2.ingest_credits([Payment("p-A0", "A0", 700, now - 60)], now)  # gw1's account: to the inbox
    gw2.ingest_credits([Payment("p-A0", "A0", 9999, now - 60)], now + 1)  # the same id, another amount
    assert gw1.store.inbox_pending() == 2
    at_commit: list[tuple] = []

    def look(done) -> None:  # right after each commit, before anything else runs on the writer
        at_commit.append((done.input, gw1.store.inbox_pending(),
                          [p["reason"] for *_, kind, _, _, p in gw1.store.outbox() if kind == "dead_letter"]))

    gw1.listeners.append(look)
    assert gw1.drain_inbox(now) == 2
    assert gw1.engine.balance_of("A0") == 700
    assert len(at_commit) == 1 and at_commit[0][:2] == ("credits", 0)
    assert len(at_commit[0][2]) == 1 and "already used" in at_commit[0][2][0]


def test_the_trip_check_sums_every_queued_credit_of_the_account_adjustments_too(two_shells):
    """The fresh balance before a trip counts every payment and adjustment for the account waiting in the
    inbox (before: at most the channel's 10,000 oldest payments, adjustments not at all)."""
    from gateway.core.model import Adjustment, Payment

    shells, now = two_shells
    gw1, gw2 = shells["gw1"], shells["gw2"]
    gw1.ingest_credits([Payment(f"p{i}", "A2", 1, now - 60) for i in range(10_001)], now)
    gw1.ingest_credits([Adjustment("adj1", "A2", 500, now - 30, "olga", "goodwill")], now + 1)
    assert gw2._inbox_paid("A2") == 10_001 + 500
    gw1.ingest_credits([Payment("p0", "A2", 7, now - 60)], now + 2)  # p0 again, another amount: the smaller
    assert gw2._inbox_paid("A2") == 10_001 + 500
    assert gw2._inbox_paid("A0") == 0


def test_an_instance_with_another_config_does_not_join(tmp_path, pg_dsn):
    """Routing, the fair share and the inbox assume every instance has the same channels and fleet: the
    config's digest is in the members table, and an instance whose digest differs from a live one's refuses
    to start, naming both."""
    from gateway.cluster import ConfigMismatch

    (tmp_path / "fleet.csv").write_text("account_id,tariff,meter_id,channel\nA1,flat,000000000001,bus1\n"
                                        "A2,flat,000000000002,bus2\n")
    channels = "".join(f'[[channels]]\nkind = "dlt645_tcp"\nname = "{n}"\nhost = "127.0.0.1"\nport = {p}\n'
                       for n, p in (("bus1", 9001), ("bus2", 9002)))

    def digest(instance: str, fleet: str = "fleet.csv") -> str:
        cfg = tmp_path / f"{instance}.toml"
        cfg.write_text(f'[store]\nurl = "{pg_dsn}"\n[mqtt]\ninstance = "{instance}"\n[fleet]\nfile = "{fleet}"\n'
                       f'tariffs = "{ROOT / "config" / "tariffs.example.json"}"\n[cluster]\nlease_ttl_s = 3\n'
                       + channels)
        config, errors = check_service_config(cfg)
        assert errors == []
        return config.cluster_digest()

    assert digest("gw1") == digest("gw2")  # only the instance differs
    (tmp_path / "fleet2.csv").write_text("account_id,tariff,meter_id,channel\nA1,flat,000000000001,bus1\n"
                                         "A2,flat,000000000002,bus1\n")  # a meter on another channel
    other = digest("gw2", "fleet2.csv")
    assert other != digest("gw1")
    _migrated(pg_dsn).close()
    a = Cluster(pg_dsn, "gw1", ["bus1", "bus2"], 3.0, digest=digest("gw1"))
    try:
        a.start()
        with pytest.raises(ConfigMismatch, match=r"instance 'gw2' has config digest .* live instance\(s\) 'gw1' "
                                                 r"has .*: every instance must run the same config"):
            Cluster(pg_dsn, "gw2", ["bus1", "bus2"], 3.0, digest=other).start()
        Cluster(pg_dsn, "gw3", ["bus1", "bus2"], 3.0, digest=digest("gw3")).check_config()  # the same: joins
    finally:
        a.stop()
    Cluster(pg_dsn, "gw2", ["bus1", "bus2"], 3.0, digest=other).check_config()  # gw1 gone: nothing to compare


def test_a_keeper_whose_writer_commits_nothing_hands_the_publisher_lease_back_at_once(pg_dsn):
    from gateway.cluster import PUBLISHER

    _migrated(pg_dsn).close()
    committed = [time.monotonic()]
    a = Cluster(pg_dsn, "gw1", ["bus1"], 3.0)
    a.broker_connected = lambda: True
    a.writer_committed_at = lambda: committed[0]

    def publisher() -> str | None:
        return _query(pg_dsn, f"SELECT CASE WHEN expires_at > now() THEN holder END FROM leases "
                              f"WHERE channel = '{PUBLISHER}'")[0][0]

    try:
        a.start()
        assert a.is_publisher() and publisher() == "gw1"
        committed[0] = time.monotonic() - 4.0  # nothing committed for more than the ttl
        started = time.monotonic()
        while publisher() is not None or a.wanted():  # (not renewed, it would expire only after up to 3 s)
            assert time.monotonic() - started < 1.5, "the publisher lease handed back in the next round"
            time.sleep(0.02)
        assert not a.is_publisher()
    finally:
        a.stop()


async def test_after_its_database_connection_is_cut_the_writer_reconnects_and_the_instance_acts_again(pg_dsn):
    """A PostgreSQL restart or failover cuts every connection. The writer's store opens a new one before its
    next transaction, so the instance commits again and keeps (or takes back) its channels, and a payment is
    applied and closes its meter."""
    from gateway.core.model import Payment
    from simulators.dlt645 import SimMeter

    sim = SimMeter("000000000001", relay_open=True, relay_command_open=True, energy=[Decimal("100.00")] * 5)
    async with _sim_buses({"bus1": [sim]}) as ports, \
            _instance(pg_dsn, "gw1", ports, {"bus1": [sim.address]}, ttl=2.0) as gw:
        await _until(lambda: gw.cluster.acting and _holders(pg_dsn) == {"bus1": "gw1"}, 10, "bus1 taken")
        store = gw.control.store
        _query(pg_dsn, f"SELECT pg_terminate_backend({store.conn.info.backend_pid})")
        cut_at = time.monotonic()
        await _until(lambda: store.committed_at > cut_at + 1.0 and gw.cluster.acting
                     and _holders(pg_dsn) == {"bus1": "gw1"}, 15, "committing and acting for bus1 again")
        await gw.credits([Payment("p1", "A0", 50_000, int(gw.clock.now()) - 60)])
        await _until(lambda: not sim.relay_open, 15, "the payment's close")
