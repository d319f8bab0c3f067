"""Group commit (gateway/writer.py, Store.group): calls waiting together share one COMMIT; each caller hears
back only after it; a call that fails is undone alone; a COMMIT that fails fails them all and memory is
rebuilt from the store. On both stores, checked through a second connection (it sees only what is committed)."""
import asyncio
import threading

import pytest

from gateway.core.commands import RelayAction
from gateway.core.model import Account, Meter
from gateway.costcontrol import CostControl
from gateway.store import open_store
from gateway import writer as writer_module
from gateway.writer import Writer

from .control_fixtures import QUICK
from .core_fixtures import POLICY, tariffs

NOW = 1_780_000_000.0
METERS = ["000000000001", "000000000002", "000000000003"]


async def open_control(url: str):
    writer = Writer()
    cc = await writer.call(CostControl, open_store(url), QUICK, POLICY, NOW)
    writer.group = lambda: cc.group(NOW)
    await writer.call(cc.accounting.register, tariffs(), [Account("A1", tariff_id="flat")],
                      [Meter(m, "A1", channel="bus1") for m in METERS])
    return writer, cc


def committed_commands(url: str) -> set[str]:
    """The relay commands another connection sees: the committed ones."""
    other = open_store(url)
    try:
        return {r[0] for r in other._query("SELECT meter_id FROM relay_commands")}
    finally:
        other.close()


def trip(cc: CostControl, meter: str):
    return cc.manual(meter, RelayAction.TRIP, "wang", "supervisor", "group test", f"k-{meter}", NOW)


async def in_one_group(writer: Writer, *calls):
    """Hold the writer while ``calls`` queue up, so they run as one group; their outcomes, errors included."""
    gate = threading.Event()
    held = asyncio.ensure_future(writer.call(gate.wait, 10))
    await asyncio.sleep(0.05)
    futures = [asyncio.ensure_future(writer.call_grouped(fn, *args)) for fn, *args in calls]
    await asyncio.sleep(0.05)  # every one of them in the queue
    gate.set()
    await held
    return await asyncio.gather(*futures, return_exceptions=True)


async def test_calls_waiting_together_share_one_commit_and_listeners_hear_after_it(store_url):
    writer, cc = await open_control(store_url)
    heard: list[set[str]] = []
    cc.listeners.append(lambda done: heard.append(committed_commands(store_url)) if done.input == "manual" else None)
    try:
        made = await in_one_group(writer, *[(trip, cc, m) for m in METERS])
        assert [c.meter_id for c in made] == METERS
        assert (writer.groups, writer.grouped_calls) == (1, 3)
        assert committed_commands(store_url) == set(METERS)
        # each listener ran after the one COMMIT: every one saw all three committed
        assert heard == [set(METERS)] * 3
    finally:
        await writer.call(cc.store.close)
        writer.close()


async def test_a_group_is_fenced_once_and_its_commit_counts_as_the_writer_committing(store_url):
    """The lease keeper renews only while the writer commits (Store.committed_at): a group's COMMIT is one;
    the fence (leases of several instances) runs once for the group, not once per savepoint."""
    writer, cc = await open_control(store_url)
    fenced: list[bool] = []
    try:
        cc.store.fence = lambda store: fenced.append(store._group is not None)
        before = cc.store.committed_at
        made = await in_one_group(writer, *[(trip, cc, m) for m in METERS])
        assert [c.meter_id for c in made] == METERS and writer.groups == 1
        assert fenced == [True]  # once, at the group's top
        assert cc.store.committed_at > before
    finally:
        cc.store.fence = None
        await writer.call(cc.store.close)
        writer.close()


async def test_a_call_that_fails_in_a_group_is_undone_alone(store_url):
    writer, cc = await open_control(store_url)
    heard: list[str] = []
    cc.listeners.append(lambda done: heard.extend(c.meter_id for c in done.effects.commands.values()))

    def trip_then_fail(meter: str):
        def work():
            cc.controller.manual(meter, RelayAction.TRIP, "wang", "supervisor", "group test", f"k-{meter}", NOW)
            raise RuntimeError("the call fails after writing")
        cc._control(work, NOW, "manual")

    try:
        first, failed, last = await in_one_group(writer, (trip, cc, METERS[0]), (trip_then_fail, METERS[1]),
                                                 (trip, cc, METERS[2]))
        assert isinstance(failed, RuntimeError) and "after writing" in str(failed)
        assert (first.meter_id, last.meter_id) == (METERS[0], METERS[2])
        assert writer.groups == 1
        assert committed_commands(store_url) == {METERS[0], METERS[2]}
        # memory rebuilt from the store as it stood inside the group: the failed call's command is nowhere
        assert {c.meter_id for c in cc.controller.commands.values()} == {METERS[0], METERS[2]}
        assert sorted(heard) == [METERS[0], METERS[2]]
    finally:
        await writer.call(cc.store.close)
        writer.close()


async def test_a_failing_commit_fails_every_call_of_the_group_and_memory_follows_the_store(store_url):
    writer, cc = await open_control(store_url)
    heard: list = []
    cc.listeners.append(heard.append)

    def setup():  # a deferred foreign key: checked at COMMIT, so the COMMIT itself fails
        if cc.store.dialect == "sqlite":
            cc.store._execute("PRAGMA foreign_keys = ON")
        with cc.store.transaction():
            cc.store._execute("CREATE TABLE parent_t (id INTEGER PRIMARY KEY)")
            cc.store._execute("CREATE TABLE child_t (id INTEGER PRIMARY KEY, parent INTEGER "
                              "REFERENCES parent_t (id) DEFERRABLE INITIALLY DEFERRED)")

    def orphan():
        with cc.store.transaction():
            cc.store._execute("INSERT INTO child_t (id, parent) VALUES (1, 42)")

    try:
        await writer.call(setup)
        outcomes = await in_one_group(writer, (trip, cc, METERS[0]), (orphan,), (trip, cc, METERS[1]))
        assert all(isinstance(o, Exception) for o in outcomes), outcomes
        assert "foreign key" in str(outcomes[0]).lower()
        assert len({id(o) for o in outcomes}) == 1  # the COMMIT's error, to each caller
        assert writer.groups == 0
        assert committed_commands(store_url) == set()
        assert not cc.controller.commands  # nothing in memory the store does not have
        assert heard == []  # no listener told of what was never committed
        # the writer goes on: the same trip, asked again, is made and committed
        again = await in_one_group(writer, (trip, cc, METERS[0]), (trip, cc, METERS[1]))
        assert [c.meter_id for c in again] == METERS[:2]
        assert committed_commands(store_url) == set(METERS[:2])
        assert [h.input for h in heard] == ["manual", "manual"]
    finally:
        await writer.call(cc.store.close)
        writer.close()


async def test_grouped_calls_go_first_and_an_ungrouped_one_waits_at_most_max_behind_s(tmp_path, monkeypatch):
    """A close's calls are grouped: they go ahead of a read cycle's batch (ungrouped), which still runs once it
    has waited MAX_BEHIND_S (never starved by a stream of grouped calls)."""
    writer, cc = await open_control(f"sqlite://{tmp_path / 'g.db'}")
    order: list[str] = []

    def note(name: str, grouped_in: bool):
        order.append(name)
        assert (cc.store._group is not None) == grouped_in
        return name

    async def queued_behind_the_writer(calls):
        gate = threading.Event()
        held = asyncio.ensure_future(writer.call(gate.wait, 10))
        await asyncio.sleep(0.05)
        futures = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)
        gate.set()
        await held
        return await asyncio.gather(*futures)

    try:
        done = await queued_behind_the_writer([
            writer.call_grouped(note, "a", True), writer.call_grouped(note, "b", True),
            writer.call(note, "plain", False), writer.call_grouped(note, "c", True)])
        assert done == ["a", "b", "plain", "c"]  # each caller gets its own result
        assert order == ["a", "b", "c", "plain"]
        assert (writer.groups, writer.grouped_calls) == (1, 3)
        order.clear()
        monkeypatch.setattr(writer_module, "MAX_BEHIND_S", 0.0)  # "plain" has waited long enough: its turn
        await queued_behind_the_writer([writer.call(note, "plain", False), writer.call_grouped(note, "a", True),
                                        writer.call_grouped(note, "b", True)])
        assert order == ["plain", "a", "b"]
    finally:
        await writer.call(cc.store.close)
        writer.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        await writer.call(print)
