"""The controller's indexes (pure, virtual clock): ``due_buses``, ``next_step_at`` and ``bus_work`` from per-bus
heaps kept up by what changed, and a tick that looks only at what changed or fell due, give what a full scan of every
entity gives, through days of trips, closes, silent and stuck meters, retries and field orders."""
import random

from gateway.core.commands import RelayAction
from gateway.core.control import Controller
from gateway.core.engine import DecisionKind as K
from gateway.core.engine import Engine
from gateway.core.model import Meter

from .control_fixtures import MONDAY, FakeRelay, Ids, Sim, account, at_any_hour, decision
from .core_fixtures import POLICY, tariffs
from gateway.core.control import ControlConfig

BUSES = 4
ACCOUNTS = 24


def fleet() -> Engine:
    e = Engine(tariffs(), POLICY)
    e.add_accounts([account(i) for i in range(ACCOUNTS)])
    e.add_meters([Meter(f"M{i}", f"A{i}", max_kw=20, channel=f"bus{i % BUSES}") for i in range(ACCOUNTS)])
    return e


def scanned_due_buses(c: Controller, now: float) -> set[str]:
    return {c.dir.meter(s.meter_id).channel for s in c.steps(now)}  # steps(): a full scan, sorted


def scanned_next_step_at(c: Controller) -> float | None:
    """Every active command and order, as the executor's rule says: a meter with a command in flight has
    only that command's time."""
    active = [x for x in c.commands.values() if x.state.active]
    busy = {x.meter_id for x in active if x.state.in_flight}
    times = [x.next_at for x in active if x.next_at is not None and (x.state.in_flight or x.meter_id not in busy)]
    times += [o.verify_next_at for o in c.orders.values() if o.verify_next_at is not None and o.meter_id not in busy]
    return min(times, default=None)


def scanned_bus_work(c: Controller, now: float, bus: str, limit: int, soon_s: float):
    """A bus's next batch, its read-backs due soon and its next step's time, each from a scan of its own."""
    later = c.steps(float("inf"), bus)
    soon = sorted((s for s in later if now < s.due_at <= now + soon_s and s.kind.value == "read"
                   and s.subject == "command"), key=lambda s: (s.due_at, s.subject_id))[:limit]
    return c.next_steps(now, bus, limit), soon, min((s.due_at for s in later), default=None)


class CheckedSim(Sim):
    """After every change: the indexes agree with a full scan, now and later; and after every tick nothing
    that time alone had made due is left undone (an order for every failing close, every escalation)."""

    checks = 0

    def collect(self):
        fx = super().collect()
        c = self.c
        for t in (self.now, self.now + 1, self.now + 60, self.now + 3600, self.now + 86400):
            assert c.due_buses(t) == scanned_due_buses(c, t), t - self.now
        assert c.next_step_at() == scanned_next_step_at(c)
        for bus in (f"bus{i}" for i in range(BUSES)):  # the executor's one scan gives what three would
            assert tuple(c.bus_work(self.now, bus, 3, 60.0)) == scanned_bus_work(c, self.now, bus, 3, 60.0)
        CheckedSim.checks += 1
        return fx

    def do_due(self, execute: bool = True) -> None:
        super().do_due(execute)
        c = self.c
        assert not [x for x in c.commands.values() if (x.state.active or x.state.name == "FAILED")
                    and c.machine.needs_order(x, self.now)]
        assert not [o for o in c.orders.values() if c.dispatcher.escalation_due(o, self.now) > o.escalation]


def test_the_indexes_agree_with_a_full_scan_through_days_of_mixed_faults():
    rnd = random.Random(7)
    relays = {f"M{i}": FakeRelay(stuck=rnd.random() < 0.2, silent=rnd.random() < 0.2) for i in range(ACCOUNTS)}
    c = Controller(at_any_hour(ControlConfig()), fleet(), Ids())
    sim = CheckedSim(c, MONDAY, relays=relays)
    c.on_decisions([decision(K.TRIP, f"A{i}", t=MONDAY) for i in range(ACCOUNTS)], MONDAY)
    sim.collect()
    sim.run(MONDAY + 2 * 86400)
    for i in range(0, ACCOUNTS, 2):  # operators' closes, some superseding trips still underway
        c.manual(f"M{i}", RelayAction.CLOSE, "li", "operator", "paid at the counter", f"k{i}", sim.now)
        sim.collect()
    sim.run(sim.now + 3 * 86400)
    assert c.orders, "the stuck and silent meters reached field crews"
    assert CheckedSim.checks > 100


def test_next_steps_batches_a_bus_closes_one_per_meter_and_a_trip_always_alone():
    """The executor's batch: closes (most urgent first, one step per meter, at most ``limit``); a trip's
    send never rides along, since its gate check must stay right before its own frame."""
    c = Controller(at_any_hour(ControlConfig()), fleet(), Ids())
    on_bus0 = [f"M{i}" for i in range(0, ACCOUNTS, BUSES)]  # six meters
    for m in on_bus0[:2]:
        c.manual(m, RelayAction.TRIP, "wang", "supervisor", "tamper found on site", f"trip-{m}", MONDAY)
    for m in on_bus0[2:]:
        c.manual(m, RelayAction.CLOSE, "li", "operator", "paid at the counter", f"close-{m}", MONDAY + 1)
    c.manual(on_bus0[2], RelayAction.CLOSE, "li", "operator", "a second request", "close-again", MONDAY + 2)
    now = MONDAY + 3
    steps = c.next_steps(now, "bus0", 16)
    # the closes, each meter once (M8's second request supersedes its first: due last), the trips not with them
    assert [s.meter_id for s in steps] == on_bus0[3:] + on_bus0[2:3]
    assert all(c.commands[s.subject_id].action == RelayAction.CLOSE for s in steps)
    assert [s.meter_id for s in c.next_steps(now, "bus0", 2)] == on_bus0[3:5]
    for s in steps:
        c.authorize(s.subject_id, now)  # in flight: those meters take no other step until they land
    trips = c.next_steps(now, "bus0", 16)
    assert len(trips) == 1 and c.commands[trips[0].subject_id].action == RelayAction.TRIP
    assert c.next_steps(now, "bus1", 16) == []
