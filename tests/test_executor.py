"""The executor on a real clock against simulated meters over TCP: it sleeps when nothing can be done, and an
unexpected failure on the wire leaves a command in a state that will be read back, never stuck."""
import asyncio
from dataclasses import replace

from gateway.app import Bus, Gateway
from gateway.clock import SystemClock, local_naive

from gateway.core.commands import CommandState, RelayAction
from gateway.core.model import Account, Meter
from protocols.dlt645.client import Dlt645BadReply, Dlt645Link
from simulators.dlt645 import SimBus, SimMeter, serve_tcp
from simulators.dlt645.meter import Faults

from .control_fixtures import LIVE_LINK, QUICK
from .core_fixtures import POLICY, tariffs



async def gateway(tmp_path, meter: SimMeter):
    server = await serve_tcp(SimBus.of([meter], clock=local_naive(SystemClock()), turnaround_s=0.0))
    link = Dlt645Link.tcp("127.0.0.1", server.sockets[0].getsockname()[1], LIVE_LINK)
    gw = await Gateway(f"sqlite://{tmp_path / 'g.db'}", [Bus(link, [meter.address])], QUICK, POLICY).open()
    await gw.writer.call(gw.control.accounting.register, tariffs(), [Account("A1", tariff_id="flat")],
                         [Meter(meter.address, "A1", channel=link.name)])
    return gw, server


async def test_the_executor_sleeps_while_the_only_due_command_waits_behind_one_in_flight(tmp_path, monkeypatch):
    meter = SimMeter("000000000001")
    gw, server = await gateway(tmp_path, meter)
    cc = gw.control
    try:
        now = gw.clock.now()
        trip = await gw.writer.call(cc.manual, meter.address, RelayAction.TRIP, "wang", "supervisor", "test", "r1", now)
        await gw.writer.call(cc.authorize, trip.command_id, now)  # SENDING, never answered: the meter is busy
        await gw.writer.call(cc.manual, meter.address, RelayAction.CLOSE, "li", "operator", "undo", "r2", now)
        calls = {"n": 0}
        real_steps = cc.steps

        def counting(t):
            calls["n"] += 1
            return real_steps(t)

        monkeypatch.setattr(cc, "steps", counting)
        stop = asyncio.Event()
        runner = asyncio.create_task(gw.executor.run(stop, idle_s=0.1))
        await asyncio.sleep(0.5)
        stop.set()
        await runner
        assert calls["n"] <= 10, calls  # about one pass per idle period, not thousands
        assert cc.controller.next_step_at() is None  # the close is not due while the trip is in flight
    finally:
        await gw.close()
        server.close()
        await server.wait_closed()


async def test_unexpected_replies_and_errors_leave_commands_to_be_read_back(tmp_path, monkeypatch):
    meter = SimMeter("000000000001", faults=Faults(ack_instead_of_data=1.0))
    gw, server = await gateway(tmp_path, meter)
    cc = gw.control
    try:
        try:  # the client says what went wrong, it does not crash on the reply
            await gw.channels[0].client.relay_state(meter.address)
            raise AssertionError("an acknowledgement is not a status word")
        except Dlt645BadReply as exc:
            assert "malformed reply" in str(exc) and "read reply needs at least 4 data bytes" in str(exc)
        driver = gw.executor.drivers[gw.channels[0].name]

        async def broken_send(*a, **k):
            raise RuntimeError("driver bug")

        monkeypatch.setattr(driver, "send", broken_send)
        now = gw.clock.now()
        cmd = await gw.writer.call(cc.manual, meter.address, RelayAction.TRIP, "wang", "supervisor", "test", "r1", now)
        await gw.executor.drain()
        state = cc.controller.commands[cmd.command_id]
        assert state.state == CommandState.VERIFYING and "RuntimeError: driver bug" in state.last_error
        await asyncio.sleep(0.3)
        await gw.executor.drain()  # the read-back gets an acknowledgement instead of data: a failed read
        assert state.state == CommandState.VERIFYING
        await asyncio.sleep(1.0)
        await gw.executor.drain()
        assert state.state == CommandState.RETRY_WAIT and state.readback_first
        assert "unreadable status word 3" in state.last_error
    finally:
        await gw.close()
        server.close()
        await server.wait_closed()


async def test_a_meter_on_a_bus_without_a_driver_fails_its_command_instead_of_spinning(tmp_path):
    meter = SimMeter("000000000001")
    gw, server = await gateway(tmp_path, meter)
    cc = gw.control
    try:
        gw.executor.drivers.clear()  # the meter's channel names a bus nothing was configured for
        now = gw.clock.now()
        cmd = await gw.writer.call(cc.manual, meter.address, RelayAction.TRIP, "wang", "supervisor", "test", "r1", now)
        await asyncio.wait_for(gw.executor.drain(), 5)
        state = cc.controller.commands[cmd.command_id]
        assert state.state == CommandState.RETRY_WAIT and "no channel configured for bus" in state.last_error
        assert meter.relay_log == []
    finally:
        await gw.close()
        server.close()
        await server.wait_closed()


async def test_a_command_on_one_bus_does_not_wait_behind_a_silent_meter_on_another(tmp_path):
    """Each bus has its own worker: a close on a healthy bus is done while the other bus is still waiting out
    a silent meter's timeouts (one pass over every bus held the close until the slow bus was done)."""
    silent, healthy = SimMeter("000000000001", faults=Faults(no_reply=1.0)), SimMeter("000000000002")
    clock = SystemClock()
    servers = [await serve_tcp(SimBus.of([m], clock=local_naive(clock), turnaround_s=0.0)) for m in (silent, healthy)]
    slow = replace(LIVE_LINK, turnaround_s=1.5)  # the silent meter's exchanges take 1.5 s each to give up
    links = [Dlt645Link.tcp("127.0.0.1", s.sockets[0].getsockname()[1], link)
             for s, link in zip(servers, (slow, LIVE_LINK))]
    gw = await Gateway(f"sqlite://{tmp_path / 'g.db'}", [Bus(links[0], [silent.address]),
                                                          Bus(links[1], [healthy.address])], QUICK, POLICY).open()
    cc = gw.control
    stop = asyncio.Event()
    runner = asyncio.create_task(gw.executor.run(stop, idle_s=0.1))
    try:
        await gw.writer.call(cc.accounting.register, tariffs(), [Account("A1", tariff_id="flat"),
                                                                 Account("A2", tariff_id="flat")],
                             [Meter(silent.address, "A1", channel=links[0].name),
                              Meter(healthy.address, "A2", channel=links[1].name)])
        now = gw.clock.now()
        await gw.writer.call(cc.manual, silent.address, RelayAction.CLOSE, "li", "operator", "test", "r1", now)
        gw.executor.wake()
        await asyncio.sleep(0.2)  # the silent meter's close is on the wire now
        t0 = asyncio.get_running_loop().time()
        cmd = await gw.writer.call(cc.manual, healthy.address, RelayAction.CLOSE, "li", "operator", "test", "r2",
                                   gw.clock.now())
        gw.executor.wake()
        while cc.controller.commands[cmd.command_id].state != CommandState.CONFIRMED:
            assert asyncio.get_running_loop().time() - t0 < 1.2, cc.controller.commands[cmd.command_id]
            await asyncio.sleep(0.02)
        assert healthy.relay_log and not silent.relay_log
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await gw.close()
        for s in servers:
            s.close()
            await s.wait_closed()


async def test_a_bus_worker_does_a_read_back_due_soon_itself_without_waiting_for_the_next_pass(tmp_path):
    """The trip's read-back falls due 0.2 s after its frame: the worker that sent it stays for it (linger_s).
    The run loop's passes are 60 s apart here, so only the worker can have read the meter back."""
    meter = SimMeter("000000000001")
    gw, server = await gateway(tmp_path, meter)
    cc = gw.control
    stop = asyncio.Event()
    try:
        cmd = await gw.writer.call(cc.manual, meter.address, RelayAction.TRIP, "wang", "supervisor", "test", "r1",
                                   gw.clock.now())
        asked = []
        real_call = gw.writer.call_grouped
        gw.writer.call_grouped = lambda fn, *a, **k: asked.append(fn.__name__) or real_call(fn, *a, **k)
        runner = asyncio.create_task(gw.executor.run(stop, idle_s=60, min_pass_s=60))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while cc.controller.commands[cmd.command_id].state != CommandState.CONFIRMED:
            assert loop.time() - t0 < 10, cc.controller.commands[cmd.command_id]
            await asyncio.sleep(0.02)
        assert meter.relay_open and len(meter.relay_log) == 1
        # the worker was told of the read-back with the frame's outcome: it did not ask again when it fell due
        assert asked.count("_next") == 1 and asked.count("_reported") == 2, asked
        del gw.writer.call_grouped
        # and with nothing due soon it goes: a worker does not wait for steps beyond linger_s
        gw.executor.linger_s = 0.0
        cmd = await gw.writer.call(cc.manual, meter.address, RelayAction.CLOSE, "wang", "supervisor", "undo", "r2",
                                   gw.clock.now())
        stop.set()
        await asyncio.wait_for(runner, 10)
        stop.clear()
        runner = asyncio.create_task(gw.executor.run(stop, idle_s=60, min_pass_s=60))
        await asyncio.sleep(1.0)  # the close went out in the first pass; its read-back waits for the next one
        assert cc.controller.commands[cmd.command_id].state == CommandState.VERIFYING
        assert not meter.relay_open
    finally:
        stop.set()
        await asyncio.wait_for(runner, 10)
        await gw.close()
        server.close()
        await server.wait_closed()


async def test_a_batch_holds_the_bus_so_polling_waits_for_all_its_steps(tmp_path):
    """A batch's sends and read-backs go back to back: the poller's exchanges wait for the whole batch (before,
    one poll exchange went between every read-back of a batch, and the closes behind it waited that long)."""
    meters = [SimMeter(f"00000000000{i}") for i in range(1, 4)]
    clock = SystemClock()
    server = await serve_tcp(SimBus.of(meters, clock=local_naive(clock), turnaround_s=0.0))
    link = Dlt645Link.tcp("127.0.0.1", server.sockets[0].getsockname()[1], LIVE_LINK)
    gw = await Gateway(f"sqlite://{tmp_path / 'g.db'}", [Bus(link, [m.address for m in meters])], QUICK,
                       POLICY).open()
    cc = gw.control
    try:
        await gw.writer.call(cc.accounting.register, tariffs(), [Account(f"A{i}", tariff_id="flat") for i in (1, 2, 3)],
                             [Meter(m.address, f"A{i}", channel=link.name) for i, m in enumerate(meters, 1)])
        now = gw.clock.now()
        for i, m in enumerate(meters, 1):
            await gw.writer.call(cc.manual, m.address, RelayAction.TRIP, "wang", "supervisor", "test", f"r{i}", now)
        await gw.executor.drain()  # the three frames, back to back
        await asyncio.sleep(0.3)  # the read-backs are due
        steps = await gw.writer.call(cc.controller.next_steps, gw.clock.now(), link.name, 16)
        assert [s.kind.value for s in steps] == ["read"] * 3
        seen = []
        for m in meters:  # which meter each request on the line was for, in order
            m.handle = lambda request, now, m=m, real=m.handle: (seen.append(m.address), real(request, now))[1]
        poll = asyncio.create_task(gw.channels[0].poller.read_meter(meters[0].address))
        await gw.executor._perform(steps, None)
        await poll
        # the three read-backs first (status word 3), then the poll's items of meter 1
        assert seen[:3] == [m.address for m in meters] and seen[3:] and set(seen[3:]) == {meters[0].address}
    finally:
        await gw.close()
        server.close()
        await server.wait_closed()
