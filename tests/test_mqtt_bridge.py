"""The northbound MQTT bridge against a real Mosquitto broker: payments in (acknowledged after commit), events
out through the outbox, dead letters, the retained status with its last will."""
import asyncio

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
            applied = billing.of_kind("payment_applied")
            assert [(e.data["payment_id"], e.data["amount"]) for e in applied] == [("P1", "50.00")]
            assert not meter.relay_open
            assert await live.ledger() == [("P1", "A0", 5000)]
