"""A gateway process with its MQTT bridge, for the crash tests: killed with SIGKILL while payments pour in.

Run: python -m tests.mqtt_crash_child STORE_URL HOST PORT ACCOUNTS. Registers ACCOUNTS accounts on first
start, connects as instance ``gw-crash`` (a persistent session) and prints ``ready`` once subscribed.
"""
import asyncio
import sys

from gateway.app import Gateway
from gateway.core.model import Account
from gateway.northbound.mqtt import BillingBridge, BrokerConfig
from tests.core_fixtures import POLICY, tariffs


async def main(store_url: str, host: str, port: int, accounts: int) -> None:
    gw = await Gateway(store_url, [], policy=POLICY).open()
    if not gw.control.engine.account_ids:
        await gw.writer.call(gw.control.accounting.register, tariffs(),
                             [Account(f"A{i}", tariff_id="flat") for i in range(accounts)], [])
    bridge = BillingBridge(gw, BrokerConfig(host, port, instance="gw-crash"))
    await bridge.start()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(gw.run(stop)), asyncio.create_task(bridge.run(stop))]
    await bridge.ready()
    print("ready", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
