"""TLS, passwords and the shipped ACL (config/mosquitto/acl) on a real broker; and clients no one here wrote
(mosquitto_pub, mosquitto_sub) paying and hearing the relay close."""
import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from gateway.northbound.mqtt import BillingBridge, BrokerConfig, _OnLoop
from protocols.mqtt import billing as contract
from simulators.billing import BillingSim

from simulators.broker import Broker, make_tls
from .mqtt_fixtures import LiveGateway, tripped_meter

ACL = Path(__file__).resolve().parent.parent / "config" / "mosquitto" / "acl"
USERS = {"gateway": "gw-secret", "billing": "bill-secret", "notifier": "n-secret"}


@pytest.fixture
def secure_broker(tmp_path):
    tls = make_tls(tmp_path / "certs")
    with Broker(tmp_path / "secure", users=USERS, acl=ACL.read_text(), tls=tls) as b:
        yield b


def _watched_by_a_bridge() -> bool:
    """Is any descriptor still watched for a bridge? (A stale one makes a later socket with the same number
    deaf: asyncio would only swap the handler of the old registration.)"""
    selector = asyncio.get_running_loop()._selector
    handles = [h for key in selector.get_map().values() for h in key.data if h is not None]
    return any(isinstance(getattr(h._callback, "__self__", None), _OnLoop) for h in handles)


def gateway_config(broker, tmp_path, password="gw-secret") -> BrokerConfig:
    secret = tmp_path / "gateway.password"
    secret.write_text(password + "\n")
    return BrokerConfig(broker.host, broker.port, instance="gw-tls", username="gateway",
                        password_file=str(secret), tls_ca_file=str(broker.tls.ca))


async def test_over_tls_with_the_shipped_acl_billing_pays_but_cannot_command_relays_or_forge_events(
        secure_broker, tmp_path):
    b = secure_broker
    meter = tripped_meter(7)
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", b, meters=[meter],
                           mqtt=gateway_config(b, tmp_path)) as live:
        await live.gw.poll_once(live.gw.channels[0])
        # the gateway user hears everything on the concentrator tree: a forged command would reach it
        with BillingSim(b.host, b.port, client_id="spy", username="gateway", password="gw-secret",
                        tls_ca=str(b.tls.ca), subscribe=False) as spy:
            heard = []
            spy.client.on_message = lambda c, u, m: heard.append(m.topic)
            spy.client.subscribe([("feikong/v1/concentrator/#", 1)])
            assert await asyncio.to_thread(spy.subscribed.wait, 10)  # its SUBACK: from here it hears everything
            billing_login = dict(username="billing", password="bill-secret", tls_ca=str(b.tls.ca))
            with BillingSim(b.host, b.port, **billing_login) as billing, \
                    BillingSim(b.host, b.port, client_id="rogue", subscribe=False, **billing_login) as rogue:
                # with billing's credentials: a relay command to a concentrator, and a forged relay event
                rogue.publish("feikong/v1/concentrator/C1/down/cmd", b'{"op":"relay","action":"trip"}')
                rogue.publish(contract.event_topic("relay_confirmed"), b'{"forged":true}')
                await asyncio.to_thread(rogue.wait_acked, 10)
                billing.pay("A0", "20.00", "TLS1")
                await asyncio.to_thread(billing.wait_for, lambda s: s.of_kind("relay_confirmed"), 20,
                                        "relay confirmed")
                refused = [reason for _, reason in rogue.refused]
                confirmed, forged = billing.of_kind("relay_confirmed"), billing.undecodable
        assert refused == ["Not authorized", "Not authorized"]
        assert heard == [] and forged == []  # neither the command nor the forged event reached anyone
        assert len(confirmed) == 1 and confirmed[0].instance == "gw-tls"
        assert await live.ledger() == [("TLS1", "A0", 2000)] and not meter.relay_open


async def test_a_wrong_password_or_a_plain_connection_is_refused_and_said_so(secure_broker, tmp_path):
    from gateway.app import Gateway

    gw = await Gateway(f"sqlite://{tmp_path / 'g.db'}", []).open()
    try:
        bridge = BillingBridge(gw, gateway_config(secure_broker, tmp_path, password="wrong"))
        await bridge.start()
        with pytest.raises(TimeoutError, match="Not authorized|Bad user name or password"):
            await bridge.ready(timeout=3)
        assert bridge._net.attempts <= 6  # backing off (0, 0.5, 1, 2 s...), not hammering the broker
        await bridge.close()
        assert not _watched_by_a_bridge()
        plain = BillingBridge(gw, BrokerConfig(secure_broker.host, secure_broker.port, instance="plain",
                                               username="gateway", password_file=str(tmp_path / "gateway.password")))
        await plain.start()
        with pytest.raises(TimeoutError):
            await plain.ready(timeout=2)
        await plain.close()
        assert not _watched_by_a_bridge()
    finally:
        await gw.close()


def test_the_example_broker_config_is_one_mosquitto_accepts(tmp_path):
    """The shipped config parses: mosquitto is run on it with its paths pointed at this test's files."""
    tls = make_tls(tmp_path / "certs")
    conf = (ACL.parent / "mosquitto.conf").read_text()
    (tmp_path / "passwd").write_text("gateway:x\n")
    (tmp_path / "passwd").chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(tmp_path / "passwd")], check=True)
    (tmp_path / "acl").write_text(ACL.read_text())
    (tmp_path / "acl").chmod(0o600)
    for old, new in (("/etc/mosquitto/certs/ca.crt", tls.ca), ("/etc/mosquitto/certs/server.crt", tls.cert),
                     ("/etc/mosquitto/certs/server.key", tls.key), ("/etc/mosquitto/passwd", tmp_path / "passwd"),
                     ("/etc/mosquitto/acl", tmp_path / "acl"), ("/var/lib/mosquitto/", f"{tmp_path}/"),
                     ("listener 8883", f"listener {Broker(tmp_path / 'port').port} 127.0.0.1")):
        assert old in conf
        conf = conf.replace(old, str(new))
    (tmp_path / "m.conf").write_text(conf + "user root\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "m.conf")], stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.5)  # still running: the config was accepted
    finally:
        proc.kill()
        proc.wait()


async def test_mosquitto_pub_pays_and_mosquitto_sub_hears_the_verified_close(broker, tmp_path):
    meter = tripped_meter(9)
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker, meters=[meter]) as live:
        await live.gw.poll_once(live.gw.channels[0])
        # line-buffered: its SUBACK line must be seen before the payment is published
        sub = await asyncio.create_subprocess_exec(
            "stdbuf", "-oL", "mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5", "-q", "1", "-d",
            "-t", contract.event_topic("relay_confirmed"), "-C", "1", "-W", "30",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        while b"SUBACK" not in (await asyncio.wait_for(sub.stdout.readline(), 30)):
            pass
        payment = json.dumps({"payment_id": "CLI-1", "account": "A0", "amount": "30.00",
                              "paid_at": "2026-11-25T10:00:00+08:00", "channel": "counter"})
        pub = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5", "-q", "1",
            "-t", f"{contract.IN}/payments", "-m", payment)
        assert await pub.wait() == 0
        out = (await asyncio.wait_for(sub.communicate(), 30))[0].decode()
        event = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        assert event["kind"] == "relay_confirmed" and event["subject"] == meter.address
        assert event["data"]["action"] == "close" and event["data"]["account_id"] == "A0"
        assert not meter.relay_open and await live.ledger() == [("CLI-1", "A0", 3000)]


async def test_events_the_broker_refuses_stay_in_the_outbox_and_are_counted(tmp_path):
    """An ACL that does not let the gateway write dead letters: the refused event is not marked published
    (it goes again once the ACL is fixed), the refusal is counted, and the rest of the outbox flows."""
    acl = ACL.read_text().replace("topic write feikong/v1/dead-letter\ntopic readwrite feikong/v1/status/#",
                                  "topic readwrite feikong/v1/status/#")
    assert acl != ACL.read_text()
    with Broker(tmp_path / "b", users=USERS, acl=acl) as b:
        secret = tmp_path / "pw"
        secret.write_text("gw-secret")
        mqtt = BrokerConfig(b.host, b.port, instance="gw-acl", username="gateway", password_file=str(secret))
        async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", b, mqtt=mqtt) as live:
            with BillingSim(b.host, b.port, username="billing", password="bill-secret") as billing:
                billing.publish(f"{contract.IN}/payments", b"{not json")
                billing.pay("A0", "5.00", "OK1")
                await asyncio.to_thread(billing.wait_for, lambda s: s.applied, 10, "applied")
                await live.until(lambda: live.bridge.stats.publish_refused >= 1, 10, "the refusal counted")
            pending = await live.call(live.gw.control.store.outbox, 0, 10, True)
            assert [kind for _, _, kind, *_ in pending] == ["dead_letter"]


async def test_a_burst_over_tls_larger_than_the_receive_maximum_is_all_applied(secure_broker, tmp_path):
    """The bridge's read-ahead and acknowledgements over TLS: more payments than the broker may have in flight
    to the gateway, so every one of them has to be acknowledged for the rest to come."""
    b, n = secure_broker, 5000
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", b, accounts=10,
                           mqtt=gateway_config(b, tmp_path)) as live:
        with BillingSim(b.host, b.port, username="billing", password="bill-secret", tls_ca=str(b.tls.ca),
                        in_flight=200) as billing:
            for i in range(n):
                billing.pay(f"A{i % 10}", "1.00", f"T{i:05d}")
            await asyncio.to_thread(billing.wait_for, lambda s: len(s.applied) == n, 60, "every payment confirmed")
        assert len(await live.ledger()) == n


async def test_a_bridge_that_stops_leaves_nothing_watched(broker, tmp_path):
    async with LiveGateway(f"sqlite://{tmp_path / 'g.db'}", broker):
        assert _watched_by_a_bridge()
    assert not _watched_by_a_bridge()


async def test_two_instances_with_one_name_back_off_instead_of_taking_the_session_from_each_other(
        broker, tmp_path):
    from gateway.app import Gateway

    gws = [await Gateway(f"sqlite://{tmp_path / f'g{i}.db'}", []).open() for i in range(2)]
    bridges = [BillingBridge(gw, BrokerConfig(broker.host, broker.port, instance="same")) for gw in gws]
    try:
        for b in bridges:
            await b.start()
        await asyncio.sleep(3)
        assert sum(b._net.attempts for b in bridges) <= 14, [b._net.attempts for b in bridges]
    finally:
        for b, gw in zip(bridges, gws):
            await b.close()
            await gw.close()
