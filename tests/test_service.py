"""The Service in process, on SQLite and PostgreSQL: ops components start after the rest and stop first,
registration from the fleet file is idempotent across restarts, a failed start closes what it opened."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import load_service_config
from gateway.service import Service, safe_url

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path, store_url: str, broker, rows: list[str]) -> Path:
    (tmp_path / "fleet.csv").write_text("account_id,tariff,meter_id,channel\n" + "\n".join(rows) + "\n")
    path = tmp_path / "gw.toml"
    path.write_text(f"""
[store]
url = "{store_url}"
[fleet]
file = "fleet.csv"
tariffs = "{ROOT / 'config' / 'tariffs.example.json'}"
[mqtt]
host = "{broker.host}"
port = {broker.port}
instance = "svc-inproc"
[[channels]]
kind = "dlt645_tcp"
name = "tcp"
host = "127.0.0.1"
port = 1
""")
    return path


class Recorder:
    def __init__(self, name: str, events: list) -> None:
        self.name, self.events = name, events

    async def start(self, service: Service) -> None:
        assert service.gateway.control is not None and service.bridge is not None
        self.events.append(("start", self.name, len(service.gateway.control.engine.account_ids)))

    async def stop(self) -> None:
        self.events.append(("stop", self.name))


async def test_ops_components_and_idempotent_registration(tmp_path, broker, store_url):
    path = write_config(tmp_path, store_url, broker, [f"A{i},flat,{i},tcp" for i in range(1, 4)])
    events: list = []
    progress: list = []
    service = Service(load_service_config(path), ops=[Recorder("api", events), Recorder("metrics", events)],
                      progress=lambda *p: progress.append(p))
    await service.start()
    assert events == [("start", "api", 3), ("start", "metrics", 3)]
    assert progress == [("fleet", 0, 3), ("fleet", 3, 3)]
    stop = asyncio.Event()
    run = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.bridge.ready(), 10)
    stop.set()
    await asyncio.wait_for(run, 20)
    await service.close()
    assert events[2:] == [("stop", "metrics"), ("stop", "api")]

    # again, with one more account: the three are left as they are, one is added
    path = write_config(tmp_path, store_url, broker, [f"A{i},flat,{i},tcp" for i in range(1, 5)])
    service = Service(load_service_config(path))
    await service.start()
    try:
        engine = service.gateway.control.engine
        assert sorted(engine.account_ids) == ["A1", "A2", "A3", "A4"]
        assert engine.meter("000000000004").channel == "tcp"
    finally:
        await service.close()


async def test_a_start_that_fails_closes_what_it_opened(tmp_path, broker):
    path = write_config(tmp_path, f"sqlite://{tmp_path / 'db.sqlite'}", broker, ["A1,flat,1,tcp"])
    events: list = []

    class Broken(Recorder):
        async def start(self, service):
            raise RuntimeError("port taken")

    service = Service(load_service_config(path), ops=[Recorder("first", events), Broken("second", events)])
    with pytest.raises(RuntimeError, match="port taken"):
        await service.start()
    assert events == [("start", "first", 1), ("stop", "first")]
    assert service.bridge._client is None  # the bridge closed its connection
    with pytest.raises(RuntimeError, match="shutdown"):  # the writer (and the store it owned) closed
        await service.gateway.writer.call(print)


def test_store_passwords_are_masked_for_logs():
    assert safe_url("postgresql://feikong:s3cret@db:5432/feikong") == "postgresql://feikong:***@db:5432/feikong"
    assert safe_url("postgresql://feikong@db/feikong") == "postgresql://feikong@db/feikong"
    assert safe_url("sqlite:///var/lib/feikong/feikong.db") == "sqlite:///var/lib/feikong/feikong.db"


async def test_the_first_read_cycle_counts_each_meter_once_across_channels(tmp_path, broker):
    """A quick channel going round twice does not finish the first cycle of a slow one."""
    from decimal import Decimal

    from simulators.dlt645 import SimBus, SimMeter, serve_tcp

    quick = await serve_tcp(SimBus.of([SimMeter("000000000001", energy=[Decimal("1.00")] * 5)], turnaround_s=0.0))
    slow_meters = [SimMeter(f"{i:012d}", energy=[Decimal("1.00")] * 5) for i in (2, 3, 4)]
    slow = await serve_tcp(SimBus.of(slow_meters, turnaround_s=0.25))
    (tmp_path / "fleet.csv").write_text("account_id,tariff,meter_id,channel\nA1,flat,1,quick\n"
                                        "A2,flat,2,slow\nA3,flat,3,slow\nA4,flat,4,slow\n")
    path = tmp_path / "gw.toml"
    path.write_text(f"""
[store]
url = "sqlite://db.sqlite"
[gateway]
poll_interval_s = 0.05
[fleet]
file = "fleet.csv"
tariffs = "{ROOT / 'config' / 'tariffs.example.json'}"
[mqtt]
host = "{broker.host}"
port = {broker.port}
[[channels]]
kind = "dlt645_tcp"
name = "quick"
host = "127.0.0.1"
port = {quick.sockets[0].getsockname()[1]}
timeout_s = 0.2
[[channels]]
kind = "dlt645_tcp"
name = "slow"
host = "127.0.0.1"
port = {slow.sockets[0].getsockname()[1]}
timeout_s = 0.5
""")
    progress: list = []
    service = await Service(load_service_config(path),
                            progress=lambda *p: progress.append(p) if p[0] == "first read cycle" else None).start()
    stop = asyncio.Event()
    run = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.first_cycle.wait(), 30)
        assert progress == [("first read cycle", n, 4) for n in range(5)]
        assert all(m.requests for m in slow_meters)  # every slow meter was read before the cycle counted done
    finally:
        stop.set()
        await asyncio.wait_for(run, 20)
        await service.close()
        for server in (quick, slow):
            server.close()
            await server.wait_closed()
