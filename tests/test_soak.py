"""The soak's short form (tests/soak): 40 simulated meters, 20% of them misbehaving, one gateway (and then two,
sharing the channels through leases) as `feikong run --config` child processes on a private PostgreSQL
server, a Mosquitto broker, billing that pays with duplicates, replays and out-of-order payments; every kind of
chaos event at least once (gateway SIGKILL, broker restart and SIGKILL, PostgreSQL restart and crash), then a
quiet phase, then every end check. The full run is `./run soak` (docs/chaos.md)."""
from dataclasses import replace

import pytest

from tests.soak.harness import EVENT_KINDS, LEASE_TTL_S, Soak, SoakSpec, schedule

pytestmark = pytest.mark.slow

SHORT = SoakSpec(meters=40, seed=7, chaos_s=60.0, settle_s=60.0, extra_events=1)


def test_the_schedule_has_every_kind_of_event_inside_the_chaos_phase_and_follows_the_seed():
    events = schedule(SHORT)
    assert {e.kind for e in events} == set(EVENT_KINDS)
    assert len(events) == len(EVENT_KINDS) + SHORT.extra_events
    assert all(0 < e.at_s < SHORT.chaos_s for e in events)
    assert [e.at_s for e in events] == sorted(e.at_s for e in events)
    assert schedule(SHORT) == events
    assert schedule(SoakSpec(seed=8)) != schedule(SoakSpec(seed=7))
    kills = [e for e in events if e.kind == "gateway_kill"]
    assert kills[0].in_flight and all(e.down_s < LEASE_TTL_S for e in kills)
    two = [e for e in schedule(replace(SHORT, instances=2)) if e.kind == "gateway_kill"]
    assert two[-1].down_s > LEASE_TTL_S


async def test_short_soak_under_chaos_loses_no_payment_and_breaks_no_relay_rule(tmp_path):
    await short_soak(SHORT, tmp_path)


async def test_short_soak_with_two_instances_sharing_the_channels_through_leases(tmp_path):
    await short_soak(replace(SHORT, instances=2, seed=11), tmp_path)


async def short_soak(spec: SoakSpec, workdir) -> None:
    summary = await Soak(spec, workdir=workdir).run()
    failed = {name: c["failures"] for name, c in summary["checks"].items() if not c["passed"]}
    assert not failed, f"seed {spec.seed}: {failed}"
    assert summary["events_applied"] == {k: sum(e.kind == k for e in schedule(spec)) for k in EVENT_KINDS}
    kills = [e for e in summary["events"] if e["kind"] == "gateway_kill"]
    for target in {e["target"] for e in kills}:  # each scheduled SIGKILL hit a running gateway
        assert summary["gateway_exits"][target].count(-9) >= sum(e["target"] == target for e in kills), target
    assert any(e["in_flight_hit"] for e in kills)  # one while a relay command was on the wire
    if spec.instances > 1:  # one kill outlived the lease, and another instance took the channels over
        assert any(e["takeover"] for e in kills if e["down_s"] > LEASE_TTL_S), kills
    # exactly 20% of the meters misbehave, every kind of fault present
    n = spec.meters
    assert summary["faults"] == {"stuck_relay": round(spec.stuck_relay * n),
                                 "silent_after_trip": round(spec.silent_after_trip * n),
                                 "corrupt_frames": round(spec.corrupt_frames * n)}
    assert sum(summary["faults"].values()) == round(0.2 * n)
    # the checks had something to check: each situation they judge happened
    counts, payments = summary["counts"], summary["payments"]
    assert counts["trip_frames_applied"] > 0 and counts["close_frames_applied"] > 0
    assert counts["protected_ran_out"] > 0  # protected customers ran out of credit and were not tripped
    assert counts["work_orders"] > 0 and summary["crews"]["completed"] > 0
    assert payments["duplicates"] > 0 and payments["replays"] > 0 and payments["out_of_order"] > 0
    assert counts["ledger_payments"] == payments["unique"]
    assert summary["checks"]["paid_reconnected"]["checked"] > 0  # payments cleared open meters' arrears
    assert counts["notices_delivered_by_sim"] > 0
