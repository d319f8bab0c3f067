"""The northbound MQTT bridge against a real Mosquitto broker: payments in (acknowledged after commit), events
out through the outbox, dead letters, the retained status with its last will."""
import asyncio
from datetime import datetime, timedelta, timezone

import msgspec

from protocols.mqtt import billing as contract
from simulators.billing import BillingSim

from .mqtt_fixtures import LiveGateway, tripped_meter


async def test_a_payment_over_mqtt_closes_the_tripped_meter_and_the_verified_close_comes_back(broker, tmp_path):
    meter = tripped_meter(1)
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, meters=[meter]) as live:
        await live.gw.poll_once(live.gw.channels[0])  # the gateway sees the relay open
        with BillingSim(broker.host, broker.port) as billing:
            await asyncio.to_thread(billing.wait_for, lambda b: b.status.get("gw-test") is not None
                                    and b.status["gw-test"].state == "online", 10, "gateway online")
            billing.pay("A0", "50.00", "P1")
            await asyncio.to_thread(billing.wait_for, lambda b: b.of_kind("relay_confirmed"), 20, "relay confirmed")
            confirmed = msgspec.convert(billing.of_kind("relay_confirmed")[0].data, contract.RelayCommand)
            assert (confirmed.action, confirmed.account_id, confirmed.state) == ("close", "A0", "confirmed")
            assert [(r.payment_id, r.account, r.amount) for r in billing.applied.values()] == [("P1", "A0", "50.00")]
            assert not meter.relay_open
            assert await live.ledger() == [("P1", "A0", 5000)]


PAYMENTS = f"{contract.IN}/payments"
PAID = datetime(2026, 11, 25, 10, 0, tzinfo=timezone(timedelta(hours=8)))


def _payment(pid: str, account: str = "A0", amount: str = "10.00") -> bytes:
    return (f'{{"payment_id":"{pid}","account":"{account}","amount":"{amount}",'
            f'"paid_at":"2026-11-25T10:00:00+08:00","channel":"bank"}}').encode()


async def test_bad_messages_go_to_the_dead_letter_topic_with_the_reason_and_the_consumer_carries_on(broker, tmp_path):
    bad = {
        "not json": (PAYMENTS, b"{not json"),
        "float money": (PAYMENTS, _payment("P2").replace(b'"10.00"', b"10.00")),
        "three decimals": (PAYMENTS, _payment("P3", amount="10.001")),
        "no offset": (PAYMENTS, _payment("P4").replace(b"+08:00", b"")),
        "misspelt field": (PAYMENTS, _payment("P5").replace(b'"account"', b'"acount"')),
        "zero": (PAYMENTS, _payment("P6", amount="0.00")),
        "unknown account": (PAYMENTS, _payment("P7", account="NOBODY")),
        "same id, other amount": (PAYMENTS, _payment("P1", amount="99.00")),
        "not utf-8": (PAYMENTS, b"\xff\xfe\x00payment"),
        "bad receipt outcome": (f"{contract.IN}/notice-receipts",
                                b'{"receipt_id":"R1","request_id":"N1","outcome":"maybe",'
                                b'"at":"2026-11-25T10:00:00+08:00"}'),
        "bad tariff": (f"{contract.IN}/tariffs",
                       b'{"change_id":"T1","tariff_id":"flat","versions":[{"effective_from":'
                       b'"2026-01-01T00:00:00+08:00","kind":"flat"}]}'),
    }
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, accounts=2) as live:
        with BillingSim(broker.host, broker.port) as billing:
            billing.publish(PAYMENTS, _payment("P1"))
            await asyncio.to_thread(billing.wait_for, lambda b: b.applied, 10, "P1 applied")
            for topic, payload in bad.values():
                billing.publish(topic, payload)
            billing.publish(PAYMENTS, _payment("P1"))  # a plain re-delivery: acknowledged, not counted
            billing.publish(PAYMENTS, _payment("P8", account="A1"))  # and the consumer carries on
            await asyncio.to_thread(billing.wait_for, lambda b: len(b.applied) == 2
                                    and b.count("dead_letter") == len(bad), 10, "dead letters")
            letters = {(e.data["topic"], e.data["payload"]): e.data for e in billing.of_kind("dead_letter")}
        reasons = {name: letters[(topic, payload.decode("utf-8", "replace"))]["reason"]
                   for name, (topic, payload) in bad.items() if name != "not utf-8"}
        assert "not JSON" in reasons["not json"]
        assert "Expected `str`, got `float` - at `$.amount`" in reasons["float money"]
        assert "$.amount" in reasons["three decimals"]
        assert "timezone" in reasons["no offset"]
        assert "unknown field `acount`" in reasons["misspelt field"]
        assert "must be positive" in reasons["zero"]
        assert "NOBODY" in reasons["unknown account"]
        assert "P1" in reasons["same id, other amount"] and "different" in reasons["same id, other amount"]
        assert "$.outcome" in reasons["bad receipt outcome"]
        assert "price" in reasons["bad tariff"]
        binary = [d for d in letters.values() if d["encoding"] == "base64"]
        assert len(binary) == 1 and "not JSON" in binary[0]["reason"]
        assert sorted(await live.ledger()) == [("P1", "A0", 1000), ("P8", "A1", 1000)]
        assert live.bridge.stats.duplicates == 1 and live.bridge.stats.dead_letters == len(bad)


async def test_a_broker_restart_in_a_burst_of_10000_payments_loses_none_and_applies_none_twice(broker, store_url):
    n, accounts = 10_000, 20
    async with LiveGateway(store_url, broker, accounts=accounts) as live:
        with BillingSim(broker.host, broker.port, in_flight=200) as billing:
            sent = {}
            for i in range(n):
                pid = f"B{i:05d}"
                billing.pay(f"A{i % accounts}", "1.00", pid)
                sent[pid] = f"A{i % accounts}"
                if i == n // 3:
                    # mid-burst, with payments in flight both ways: the broker goes down and comes back
                    await live.until(lambda: live.bridge.stats.committed > 500, 20, "some committed")
                    await asyncio.to_thread(broker.restart)
            await asyncio.to_thread(billing.wait_acked, 60)
            await live.until(lambda: live.bridge.stats.committed - live.bridge.stats.duplicates >= n, 60,
                             "every payment committed")
            await asyncio.to_thread(billing.wait_for, lambda b: len(b.applied) == n, 60,
                                    "every payment confirmed")
        ledger = await live.ledger()
        assert len(ledger) == n and {pid: acc for pid, acc, _ in ledger} == sent
        assert sum(fen for *_, fen in ledger) == n * 100
        balances = {acc: fen for acc, fen in [(a, await live.call(live.gw.control.engine.balance_of, a))
                                               for a in (f"A{i}" for i in range(accounts))]}
        assert balances == {f"A{i}": n // accounts * 100 for i in range(accounts)}
        stats = live.bridge.stats
        assert stats.connects >= 2 and stats.dead_letters == 0
        assert stats.committed == stats.received  # re-deliveries included: each acknowledged after its commit
        print(f"burst of {n} through a broker restart: {stats}")


async def test_two_instances_share_the_inbound_load_and_still_apply_each_payment_once(broker, pg_dsn):
    """$share/<group>/...: the broker deals payments to both instances; re-sent payments may land on the other
    instance, and the shared PostgreSQL ledger still holds each once."""
    from gateway.northbound.mqtt import BrokerConfig

    n, accounts = 2000, 10
    group = dict(shared_group="feikong")
    a = LiveGateway(pg_dsn, broker, accounts=accounts,
                    mqtt=BrokerConfig(broker.host, broker.port, instance="gw-a", **group))
    b = LiveGateway(pg_dsn, broker, accounts=accounts,
                    mqtt=BrokerConfig(broker.host, broker.port, instance="gw-b", **group))
    async with a, b:
        with BillingSim(broker.host, broker.port, in_flight=100) as billing:
            for i in range(n):
                billing.pay(f"A{i % accounts}", "2.00", f"S{i:05d}", paid_at=PAID)
            for i in range(0, n, 10):  # billing re-sends a tenth of them
                billing.pay(f"A{i % accounts}", "2.00", f"S{i:05d}", paid_at=PAID)
            await asyncio.to_thread(billing.wait_acked, 30)
            total = lambda: a.bridge.stats.committed + b.bridge.stats.committed  # noqa: E731
            await a.until(lambda: total() >= n + n // 10, 30, "every message committed by one of the two")
        ledger = await a.ledger()
    assert sorted(pid for pid, *_ in ledger) == [f"S{i:05d}" for i in range(n)]
    assert sum(fen for *_, fen in ledger) == n * 200
    assert a.bridge.stats.committed > n // 10 and b.bridge.stats.committed > n // 10  # both took a share
    assert a.bridge.stats.duplicates + b.bridge.stats.duplicates == n // 10


async def test_flags_forecasts_and_tariffs_are_applied_and_receipts_or_updates_naming_nothing_are_dead_lettered(
        broker, tmp_path):
    from datetime import date

    at = datetime(2026, 11, 25, 10, 0, tzinfo=timezone(timedelta(hours=8)))
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker) as live:
        with BillingSim(broker.host, broker.port) as billing:
            billing.send(contract.AreaFlag("F1", "north", "extreme_weather", True, at, None, "dispatch", "blizzard"))
            billing.send(contract.Forecast("FC1", "north", date(2026, 11, 26), -12.5, -3.0))
            billing.send(contract.TariffChange("T1", "flat", [
                contract.TariffVersion(datetime(1970, 1, 1, 8, tzinfo=at.tzinfo), "flat", price="0.5000"),
                contract.TariffVersion(datetime(2027, 1, 1, tzinfo=at.tzinfo), "flat", price="0.5200")]))
            billing.send(contract.NoticeReceipt("R1", "nosuchnotice/1", "delivered", at))
            billing.send(contract.FieldUpdate("U1", "nosuchorder", "completed", at, "crew-1"))
            await asyncio.to_thread(billing.wait_for, lambda b: b.count("dead_letter") == 2, 10,
                                    "two dead letters")
            reasons = sorted(e.data["reason"] for e in billing.of_kind("dead_letter"))
        conditions = live.gw.control.controller.conditions
        assert conditions.flags[("north", "extreme_weather")].active
        assert conditions.forecasts[("north", "2026-11-26")].min_c == -12.5
        assert [v.effective_from for v in live.gw.control.engine.tariffs["flat"].versions][-1] == \
            int(datetime(2027, 1, 1, tzinfo=at.tzinfo).timestamp())
        assert any("unknown notice request 'nosuchnotice/1'" in r for r in reasons), reasons
        assert any("unknown or closed work order 'nosuchorder'" in r for r in reasons), reasons


async def test_a_message_the_store_refuses_goes_to_the_dead_letters_alone_and_an_outage_is_waited_out(
        broker, tmp_path, monkeypatch):
    """Fault injection at the store: a payment that makes the commit fail for its own reasons is found among
    its batch and dead-lettered alone (the others are applied); while the store is away (an
    OperationalError) nothing is acknowledged or dead-lettered, and everything is applied once it is back."""
    import sqlite3

    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, accounts=2) as live:
        real = live.gw.control.ingest_credits
        outage = {"left": 0}

        def faulty(items, now):
            if outage["left"]:
                outage["left"] -= 1
                raise sqlite3.OperationalError("disk I/O error")
            if any(p.payment_id == "POISON" for p in items):
                raise RuntimeError("value out of range for the ledger")
            return real(items, now)

        monkeypatch.setattr(live.gw.control, "ingest_credits", faulty)
        with BillingSim(broker.host, broker.port) as billing:
            for pid in ("G1", "POISON", "G2"):
                billing.publish(PAYMENTS, _payment(pid, account="A1"))
            await asyncio.to_thread(billing.wait_for, lambda b: len(b.applied) == 2
                                    and b.of_kind("dead_letter"), 10, "two applied, one dead letter")
            letter = billing.of_kind("dead_letter")[0].data
            assert "POISON" in letter["payload"] and "RuntimeError: value out of range" in letter["reason"]
            before = live.bridge.stats.retries
            outage["left"] = 5  # more than a poison message is given: the store's outage never dead-letters
            billing.publish(PAYMENTS, _payment("G3", account="A1"))
            await asyncio.to_thread(billing.wait_for, lambda b: len(b.applied) == 3, 60,
                                    "applied after the outage")
        assert sorted(pid for pid, *_ in await live.ledger()) == ["G1", "G2", "G3"]
        assert live.bridge.stats.retries - before == 5 and live.bridge.stats.dead_letters == 1
