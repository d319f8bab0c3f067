"""A gateway process for the relay crash tests: runs the executor in real time against a simulated meter.

Run: python -m tests.relay_crash_child STORE_URL HOST PORT PAUSE STEPS. It asks for STEPS manual commands on
one meter, alternately trip and close, each only once the one before is confirmed, and prints ``confirmed K``
after each and ``done`` at the end. Every start asks again from the first: requests are idempotent, so what
was already done comes back as the same command. PAUSE makes the first frame of this run stop the process
dead at one point, for the parent to kill it there: ``after_authorize`` (SENDING committed, nothing on the
wire), ``after_send`` (the frame acted, its result not committed) or ``none``.
"""
import asyncio
import sys

from gateway.clock import SystemClock
from gateway.core.commands import CommandPolicy, CommandState, RelayAction, RetryPolicy
from gateway.core.control import ControlConfig
from gateway.core.model import Account, Meter
from gateway.costcontrol import CostControl
from gateway.southbound.executor import CommandExecutor
from gateway.southbound.relay import Dlt645RelayDriver
from gateway.store import open_store
from gateway.writer import Writer
from protocols.dlt645.client import Dlt645Client, Dlt645Link, LinkSettings
from tests.core_fixtures import POLICY, tariffs

METER = "000000000001"
FAST = dict(max_attempts=50, max_elapsed_s=600, backoff_s=0.2, backoff_max_s=0.5, refusal_backoff_s=0.5,
            settle_s=2.0, verify_first_s=0.1, verify_every_s=0.2, ttl_s=3600)
CONFIG = ControlConfig(commands=CommandPolicy(close=RetryPolicy(**FAST, dispatch_after_failures=40),
                                              trip=RetryPolicy(**FAST)))


class PausingDriver:
    def __init__(self, driver, pause: str) -> None:
        self.driver, self.pause, self.name = driver, pause, driver.name

    def reserved(self):
        return self.driver.reserved()

    async def open(self):
        await self.driver.open()

    async def read(self, meter_id):
        return await self.driver.read(meter_id)

    async def send(self, meter_id, action, mode, valid_until):
        if self.pause == "after_authorize":
            await self._stop_here()
        await self.driver.send(meter_id, action, mode, valid_until)
        if self.pause == "after_send":
            await self._stop_here()

    @staticmethod
    async def _stop_here():
        print("paused", flush=True)
        await asyncio.sleep(3600)


async def main(url: str, host: str, port: int, pause: str, steps: int) -> None:
    clock = SystemClock()
    writer = Writer()
    cc = await writer.call(CostControl, open_store(url), CONFIG, POLICY, clock.now())
    writer.group = lambda: cc.group(clock.now())  # as the gateway does (gateway/app.py)
    if not cc.engine.account_ids:
        await writer.call(cc.accounting.register, tariffs(), [Account("A1", tariff_id="flat")],
                          [Meter(METER, "A1", channel=f"tcp://{host}:{port}")])
    link = Dlt645Link.tcp(host, port, LinkSettings(baud=9600, turnaround_s=0.3, margin_s=0.1, retries=1))
    driver = PausingDriver(Dlt645RelayDriver(Dlt645Client(link)), pause)
    executor = CommandExecutor(cc, writer, {link.name: driver}, lambda m: link.name, clock)
    stop = asyncio.Event()
    runner = asyncio.create_task(executor.run(stop, idle_s=0.05))
    for k in range(steps):
        action = RelayAction.TRIP if k % 2 == 0 else RelayAction.CLOSE
        cmd = await writer.call(cc.manual, METER, action, "ops-1", "supervisor", f"crash test step {k}",
                                f"seq-{k}", clock.now())
        executor.wake()
        while True:
            state = (await writer.call(cc.store.command, cmd.command_id)).state
            if state == CommandState.CONFIRMED:
                break
            if not state.active:
                print(f"command {cmd.command_id} ended {state.value}", flush=True)
                sys.exit(1)
            await asyncio.sleep(0.02)
        print(f"confirmed {k}", flush=True)
    stop.set()
    await runner
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
