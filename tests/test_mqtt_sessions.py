"""Several instances on one broker (docs/scaling.md, gateway/northbound/mqtt.py): the persistent MQTT session
of an instance that is down is adopted by the publisher, so no payment waits in it; the outbox is published by
an instance connected to the broker. Gateway child processes, a real Mosquitto, a real PostgreSQL, simulated
DL/T 645 TCP buses; one instance killed with SIGKILL, another's broker link cut by a relay the test runs."""
from __future__ import annotations

import asyncio
import re
import signal
from decimal import Decimal
from pathlib import Path

import time

import pytest

from gateway.cluster import Cluster
from gateway.northbound.mqtt import AdoptionEnded, StatusSeen, adoptable
from simulators.broker import free_port

from .test_cluster import _config, _holders, _migrated, _query

# --------------------------------------------------------------------------- the pure decision

OFF, ON = "offline", "online"


def test_a_member_that_is_down_is_adopted_and_a_live_one_or_this_one_never():
    members = {"gw1": True, "gw2": False, "gw3": True, "gw4": True, "gw5": True}
    statuses = {"gw1": StatusSeen(OFF, 3), "gw2": StatusSeen(ON, 1), "gw3": StatusSeen(OFF, 2),
                "gw4": StatusSeen(ON, 5)}
    # gw1 is this one; gw2's heartbeat stopped (its "online" is stale: it died while the broker was away);
    # gw3 is alive but its bridge is down (its last will); gw4 is up; gw5 never said anything and beats
    assert adoptable(members, statuses, "gw1", {}, 100.0, 10.0) == {"gw2", "gw3"}
    # an instance that is not a member (another cluster's gateway on the broker) is never adopted
    assert adoptable({"gw1": True}, {"gw9": StatusSeen(OFF, 1)}, "gw1", {}, 100.0, 10.0) == set()


def test_an_adoption_that_ended_waits_for_a_new_offline_or_the_grace():
    members, ended = {"gw1": True, "gw2": False}, {"gw2": AdoptionEnded(4, 100.0)}
    # ended (taken over, most likely) and nothing new heard: not again within the grace, not even with its
    # heartbeat still stale (an instance coming back connects before it beats)
    for status in (StatusSeen(OFF, 4), StatusSeen(ON, 5)):
        assert adoptable(members, {"gw2": status}, "gw1", ended, 105.0, 10.0) == set()
    # it came back and went down again: a new "offline" -> at once
    assert adoptable(members, {"gw2": StatusSeen(OFF, 6)}, "gw1", ended, 105.0, 10.0) == {"gw2"}
    # the grace passed (our own link dropped, say): again, for what may still be queued there
    assert adoptable(members, {"gw2": StatusSeen(OFF, 4)}, "gw1", ended, 110.0, 10.0) == {"gw2"}


# --------------------------------------------------------------------------- the publisher lease, for real


def test_the_publisher_lease_is_held_only_while_the_bridge_is_connected(pg_dsn):
    _migrated(pg_dsn).close()
    connected = {"gw1": True, "gw2": True}
    keepers = {me: Cluster(pg_dsn, me, ["bus1"], 1.0) for me in connected}
    for me, keeper in keepers.items():
        keeper.broker_connected = lambda me=me: connected[me]

    def until(predicate, timeout: float, what: str) -> float:
        started = time.monotonic()
        while not predicate():
            assert time.monotonic() - started < timeout, what
            time.sleep(0.02)
        return time.monotonic() - started

    a, b = keepers["gw1"], keepers["gw2"]
    try:
        a.start()
        assert a.is_publisher()  # taken in the first round, before start() returns
        b.start()
        until(lambda: b.members == {"gw1": True, "gw2": True}, 2, "both members live")
        assert not b.is_publisher()  # one publisher at a time
        connected["gw1"] = False  # its broker link is down, its database is not
        moved = until(lambda: b.is_publisher(), 3, "the lease moves to the connected instance")
        assert not a.is_publisher() and moved < 1.0, moved  # two rounds of ttl / 5 (with room)
        connected["gw1"] = True
        time.sleep(0.5)
        assert b.is_publisher() and not a.is_publisher()  # it stays with its holder while that is connected
        b.stop()  # a clean stop: the lease back at once; the member row stays, its heartbeat cleared
        until(lambda: a.is_publisher(), 2, "the lease taken after a clean stop")
        until(lambda: a.members == {"gw1": True, "gw2": False}, 2, "the stopped member kept, not live")
    finally:
        for keeper in (a, b):
            if not keeper._stop.is_set():
                keeper.stop()


# --------------------------------------------------------------------------- instances as child processes


class CuttableLink:
    """A TCP relay from one instance to the broker. ``cut`` closes both sides of every connection (as a failed
    link does: the broker sees the instance go) and refuses new ones until ``restore``."""

    def __init__(self, broker) -> None:
        self.target = (broker.host, broker.port)
        self.host, self.port = "127.0.0.1", free_port()
        self.server: asyncio.Server | None = None
        self.transports: set[asyncio.Transport] = set()

    async def restore(self) -> None:
        self.server = await asyncio.start_server(self._relay, self.host, self.port)

    async def cut(self) -> None:
        self.server.close()
        for t in self.transports:
            t.abort()
        self.transports.clear()
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.transports |= {writer.transport, up_writer.transport}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


class Instances:
    """gw1 and gw2 over two simulated DL/T 645 buses of three tripped meters each (accounts A11..A13 on bus1,
    A21..A23 on bus2), each instance reaching the broker directly or through its own ``links``."""

    ttl = 2.0

    def __init__(self, tmp_path: Path, broker, dsn: str, links: dict[str, CuttableLink] | None = None) -> None:
        self.tmp_path, self.broker, self.dsn, self.links = tmp_path, broker, dsn, links or {}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.logs: dict = {}
        self.configs: dict[str, Path] = {}

    async def __aenter__(self) -> "Instances":
        from gateway.clock import SystemClock, local_naive
        from simulators.billing import BillingSim
        from simulators.dlt645 import SimBus, SimMeter, serve_tcp

        local = local_naive(SystemClock())
        self.meters = {f"bus{b}": [SimMeter(f"{b * 10 + i:012d}", relay_open=True, relay_command_open=True,
                                            energy=[Decimal("100.00")] * 5) for i in range(1, 4)] for b in (1, 2)}
        self.servers = {name: await serve_tcp(SimBus.of(group, clock=local, turnaround_s=0.0))
                        for name, group in self.meters.items()}
        ports = {name: s.sockets[0].getsockname()[1] for name, s in self.servers.items()}
        rows = ["account_id,tariff,area,notice_channels,contacts,meter_id,channel,device_id"]
        self.every = {}
        for name, group in self.meters.items():
            for m in group:
                rows.append(f"A{m.address[-2:]},flat,north,sms,sms=1380000{m.address[-4:]},{m.address},{name},")
                self.every[m.address] = m
        (self.tmp_path / "fleet.csv").write_text("\n".join(rows) + "\n")
        (self.tmp_path / "control.toml").write_text("[commands.close]\nsettle_s = 1\nverify_first_s = 0.2\n"
                                                    "verify_every_s = 0.2\n")
        for name in ("gw1", "gw2"):
            self.configs[name] = _config(self.tmp_path, name, self.dsn, self.links.get(name, self.broker), ports,
                                         self.ttl)
        self.billing = await asyncio.to_thread(BillingSim(self.broker.host, self.broker.port,
                                                          client_id="sessions-billing").start)
        return self

    async def __aexit__(self, *exc) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.kill()
                await p.wait()
        await asyncio.to_thread(self.billing.stop)
        for s in self.servers.values():
            s.close()
            await s.wait_closed()

    async def start(self, name: str) -> None:
        from .test_service_run import Log, spawn

        self.procs[name] = await spawn("run", "--config", str(self.configs[name]))
        self.logs[name] = Log(self.procs[name].stderr)
        await self.logs[name].wait_for("fleet: 6 accounts, 6 meters", 60)

    async def until(self, predicate, timeout: float, what: str) -> float:
        """Seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not predicate():
            if loop.time() - started > timeout:
                raise AssertionError(f"{what} not within {timeout}s; holders {_holders(self.dsn)}, publisher "
                                     f"{self.publisher()}; logs:\n" +
                                     "\n".join(f"--- {n}\n{lg.text()}" for n, lg in self.logs.items()))
            await asyncio.sleep(0.05)
        return loop.time() - started

    async def shared_out(self) -> None:
        """Both up, a bus each, a publisher, every relay read open."""
        await self.until(lambda: sorted(map(str, _holders(self.dsn).values())) == ["gw1", "gw2"], 30, "a bus each")
        await self.until(lambda: self.publisher() is not None, 10, "a publisher")
        await self.until(lambda: _query(self.dsn, "SELECT COUNT(*) FROM relay_state WHERE is_open = 1")[0][0]
                         == len(self.every), 30, "every relay read open")

    async def metrics(self, name: str) -> str:
        import urllib.request

        url = re.search(r"metrics: (http://\S+/metrics)", self.logs[name].text()).group(1)
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    def publisher(self) -> str | None:
        rows = _query(self.dsn, "SELECT holder FROM leases WHERE channel = '@outbox' AND expires_at > now()")
        return rows[0][0] if rows else None

    def pay_everyone(self, round_: str) -> list[str]:
        ids = []
        for a in self.every:
            self.billing.pay(f"A{a[-2:]}", "50.00", f"PAY-{round_}-{a}")
            ids.append(f"PAY-{round_}-{a}")
        return ids

    def ledger(self) -> list[str]:
        return [r[0] for r in _query(self.dsn, "SELECT entry_id FROM ledger ORDER BY entry_id")]

    def closed(self) -> bool:
        return all(not m.relay_open for m in self.every.values())

    async def stop_all(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            assert await asyncio.wait_for(p.wait(), 30) == 0, self.logs[name].text()
        for name, lg in self.logs.items():
            await lg.task
            assert "Traceback" not in lg.text(), lg.text()

    def one_close_each(self) -> None:
        for a, m in self.every.items():  # each meter's own log: one close, nothing applied twice
            assert [action for _, action, _ in m.relay_log] == ["direct_close"], (a, m.relay_log)


def _adopted_messages(log_text: str, instance: str) -> list[int]:
    return [int(n) for n in re.findall(rf"adoption of instance {instance}'s session ended after (\d+) messages",
                                       log_text)]


@pytest.mark.slow
async def test_a_killed_instances_session_is_adopted_and_its_payments_applied_while_it_stays_down(
        tmp_path, broker, pg_dsn):
    async with Instances(tmp_path, broker, pg_dsn) as cl:
        await cl.start("gw1")
        await cl.start("gw2")
        await cl.shared_out()
        # the publisher dies: the worst case (its lease, and with it the adoption, moves first)
        victim = cl.publisher()
        survivor = "gw2" if victim == "gw1" else "gw1"
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        cl.procs[victim].send_signal(signal.SIGKILL)
        await cl.procs[victim].wait()
        # at once, before the broker knows anything but the victim's will: half of them are dealt to its session
        paid = cl.pay_everyone("1")
        await cl.until(lambda: sorted(cl.ledger()) == sorted(paid), cl.ttl + 15, "every payment applied")
        applied_s = loop.time() - killed_at
        print(f"every payment applied {applied_s:.2f} s after the SIGKILL (lease_ttl_s {cl.ttl})")
        # the lease expires (ttl), the survivor takes it (a keeper round, ttl / 5), adopts (another round) and
        # the inbox is drained once the victim's bus is taken over and reloaded
        assert applied_s < cl.ttl + 5, applied_s
        assert cl.procs[victim].returncode == -signal.SIGKILL  # all that while, it stayed down
        await cl.logs[survivor].wait_for(f"adopting its session feikong-{victim}", 1)
        assert "feikong_mqtt_adopted_sessions 1.0" in await cl.metrics(survivor)
        await cl.until(cl.closed, 30, "every paid meter closed")
        await asyncio.to_thread(cl.billing.wait_for, lambda b: len(b.applied) == len(paid), 10, "payments_applied")
        assert {e.instance for e in cl.billing.of_kind("payments_applied")} == {survivor}  # the new publisher

        # back: it takes its session over from the adoption, which ends and is not started again
        await cl.start(victim)
        ended = await cl.logs[survivor].wait_for(f"adoption of instance {victim}'s session ended", 20)
        await cl.until(lambda: sorted(map(str, _holders(pg_dsn).values())) == ["gw1", "gw2"], 30, "a bus each")
        await asyncio.sleep(3 * cl.ttl)
        survivor_log = cl.logs[survivor].text()
        assert survivor_log.count(f"adopting its session feikong-{victim}") == 1, survivor_log
        adopted = _adopted_messages(survivor_log, victim)
        assert len(adopted) == 1 and adopted[0] >= 1, ended  # some payments had been dealt to the dead session
        assert cl.logs[victim].text().count("MQTT: connected") == 1  # never taken back from it
        assert "feikong_mqtt_adopted_sessions 0.0" in await cl.metrics(survivor)
        # back in the group: payments reach both again, and all are applied, each once
        again = cl.pay_everyone("2")
        await cl.until(lambda: sorted(cl.ledger()) == sorted(paid + again), 30, "the second payments")
        assert "MQTT: adopted the session" not in cl.logs[victim].text()

        # a clean stop: the broker would deal it its share all the same; its session is adopted at once
        cl.procs[victim].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(cl.procs[victim].wait(), 30) == 0
        assert _query(pg_dsn, "SELECT instance FROM members WHERE seen_at = '-infinity'") == [(victim,)]
        third = cl.pay_everyone("3")
        await cl.until(lambda: sorted(cl.ledger()) == sorted(paid + again + third), cl.ttl + 15,
                       "the payments made while it is stopped")
        await asyncio.sleep(cl.ttl)  # (keeper and adoption rounds meanwhile)
        assert cl.logs[survivor].text().count(f"adopting its session feikong-{victim}") == 2
        assert len(_adopted_messages(cl.logs[survivor].text(), victim)) == 1  # adopted while it stays stopped
        await cl.stop_all()
        cl.one_close_each()


@pytest.mark.slow
async def test_a_publisher_cut_off_from_the_broker_hands_the_outbox_to_a_connected_instance(
        tmp_path, broker, pg_dsn):
    links = {name: CuttableLink(broker) for name in ("gw1", "gw2")}
    for link in links.values():
        await link.restore()
    async with Instances(tmp_path, broker, pg_dsn, links) as cl:
        await cl.start("gw1")
        await cl.start("gw2")
        await cl.shared_out()
        cut = cl.publisher()
        other = "gw2" if cut == "gw1" else "gw1"
        await links[cut].cut()  # its database is fine: it still holds its bus and applies its payments
        moved_s = await cl.until(lambda: cl.publisher() == other, 10, "the publisher lease moved")
        print(f"publisher lease moved {moved_s:.2f} s after the link was cut (lease_ttl_s {cl.ttl})")
        # the cut instance hands it back in its next keeper round, the other takes it in its own: two rounds of
        # ttl / 5 (a bound for liveness, with room for a busy machine)
        assert moved_s < cl.ttl + 2, moved_s
        await cl.logs[cut].wait_for("handed the publisher lease back: not connected to the broker", 5)
        # payments dealt to the cut instance's session are handled by the publisher's adoption; those for the cut
        # instance's accounts go to it through the inbox; its events are published by the other
        paid = cl.pay_everyone("1")
        await asyncio.to_thread(cl.billing.wait_for, lambda b: len(b.applied) == len(paid), 20,
                                "payments_applied published")
        assert {e.instance for e in cl.billing.of_kind("payments_applied")} == {other}
        await cl.until(cl.closed, 30, "every paid meter closed")
        await cl.logs[other].wait_for(f"adopting its session feikong-{cut}", 5)

        await links[cut].restore()  # its bridge reconnects (backing off), taking its session back
        await cl.logs[other].wait_for(f"adoption of instance {cut}'s session ended", 30)
        await asyncio.sleep(3 * cl.ttl)
        assert cl.logs[other].text().count(f"adopting its session feikong-{cut}") == 1
        assert cl.publisher() == other  # it stays where it is while that instance is connected
        assert sorted(cl.ledger()) == sorted(paid)
        await cl.stop_all()
        cl.one_close_each()
    for link in links.values():
        if link.server is not None and link.server.is_serving():
            await link.cut()
