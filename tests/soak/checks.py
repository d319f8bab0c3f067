"""The soak's end checks: what the store says (SQL over the gateway's tables) against what the simulators
themselves recorded (each meter's log of the relay actions it applied; what billing published and saw
confirmed). Pure functions over :class:`Evidence`; each failure names the payment, account or meter and what
was wrong.

The checks, precisely:

``payments_exactly_once``
    Every payment billing sent (unique ids, however often it was published) is in the ledger exactly once,
    on its account, with its amount; the ledger holds no payment billing did not send; and billing saw each
    confirmed (``payments_applied``) by exactly one event, with the same amount.
``trips_gated``
    Every trip frame a meter applied (its own log; a crew's hand is not a frame) follows a ``relay_trip_sent``
    audit record of the gateway for that meter (each record accounts for one frame at most), and every such
    record passed the gates: an automatic (engine) command, sent before any clearing payment of its account
    was committed (the fresh balance at the send sees every committed payment), of an account whose class may
    be tripped automatically, with a disconnect notice (warning 1, 2 or disconnect) confirmed at least ``notice_lead_s``
    before the send and not older than ``notice_max_age_s``, and the case's final reminder confirmed at least
    ``final_reminder_s`` before it (where the policies ask for one).
``protected_never_tripped``
    No meter of a protected or VIP account applied a trip (any operator), and the store holds no trip command
    for one.
``paid_reconnected``
    Every account billing paid up (a ``CLEAR-`` payment, far more than any arrears) ends with its relay closed
    in the simulator, or has a reconnect work order for its meter whose deadline is at most the payment's time
    plus ``reconnect_deadline_s`` and holds: completed by then, or still open and not yet due.
``no_action_twice``
    A relay action is applied twice when a meter applies an operate frame of the gateway that finds its contact
    already where an earlier frame of the gateway put it (a re-send without reading back first: what invariant
    4 forbids). Walking each meter's log from its start position (closed): a gateway frame must move the
    contact. A crew sets it by hand: a gateway frame that then finds it already there raced the crew (a remote
    retry while the order is open, the crew's report not yet in), which is allowed only until the gateway has
    recorded the order completed. Meters with a stuck relay (until a crew repairs them) cannot move: their
    repeats are retries of an action that did not happen, and like every frame each must follow a
    ``relay_*_sent`` audit record of its own (so a retry the gateway did not record is still caught).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gateway.config import load_control_config
from gateway.core.model import yuan_to_fen
from gateway.core.notices import DISCONNECT_NOTICES
from gateway.store import open_store
from gateway.store.entities import CASES, COMMANDS, NOTICES, ORDERS

METER_ZONE = timezone(timedelta(hours=8))  # the simulated meters keep the utility's local time
SLACK_S = 1.0  # the store keeps whole seconds in places; the meters log local time to the microsecond
GATEWAY_TRIP, GATEWAY_CLOSES = "trip", ("direct_close", "close", "close_allowed")
CREW = "field-crew"
NOT_AUTO = ("protected", "vip")


@dataclass
class CheckResult:
    name: str
    checked: int = 0
    failures: list[str] = field(default_factory=list)
    raced_crew: int = 0  # no_action_twice: gateway frames that found the relay where a crew had just set it

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Evidence:
    sent: dict[str, tuple[str, int, float]]  # payment id -> (account, amount fen, paid at epoch s)
    cleared: dict[str, float]  # account -> paid_at of the payment that cleared it
    confirmations: list[tuple[str, str, str, int]]  # (event id, payment id, account, amount fen)
    ledger: list[tuple[str, str, str, int, int]]  # (entry id, account, kind, amount fen, recorded at epoch s)
    commands: list
    cases: dict
    notices: list
    orders: list
    audit: list[dict]  # {at, actor, role, action, subject, detail}
    records: dict[str, dict]  # meter -> {"relay_open", "relay_log": [[iso local, action, operator], ...]}
    faulty: dict[str, str]  # meter -> the fault it was built with
    account_of: dict[str, str]  # meter -> account
    classes: dict[str, str]  # account -> customer class (the store's)
    decisions: list[tuple[str, str]]  # (account, kind) of every engine decision
    policies: dict[str, float]
    ended_at: float

    @classmethod
    def collect(cls, dsn: str, upstream, billing, records: dict, layout: dict, protected: set[str],
                meter_of: dict[str, str], control: Path, ended_at: float) -> "Evidence":
        sent = {p: (s.account, yuan_to_fen(s.amount), s.paid_at.timestamp()) for p, s in upstream.sent.items()}
        cleared = {s.account: s.paid_at.timestamp() for p, s in upstream.sent.items() if p.startswith("CLEAR-")}
        confirmations = [(ev.id, row[0], row[1], yuan_to_fen(row[2])) for ev in billing.of_kind("payments_applied")
                         for row in ev.data["rows"]]
        store = open_store(dsn)
        try:
            ledger = [tuple(r) for r in store._query(
                "SELECT l.entry_id, a.account_id, l.kind, l.amount_fen, l.recorded_at FROM ledger l "
                "JOIN accounts a ON a.account_no = l.account_no")]
            classes = dict(store._query("SELECT account_id, customer_class FROM accounts"))
            decisions = [tuple(r) for r in store._query(
                "SELECT a.account_id, d.kind FROM decisions d JOIN accounts a ON a.account_no = d.account_no")]
            commands = store.load_entities(COMMANDS, "1 = 1 ORDER BY created_at")
            cases = {c.case_id: c for c in store.load_entities(CASES, "1 = 1")}
            notices = store.load_entities(NOTICES, "1 = 1")
            orders = store.load_entities(ORDERS, "1 = 1")
            audit = [{"at": r[0], "actor": r[1], "role": r[2], "action": r[3], "subject": r[4],
                      "detail": json.loads(r[5]) if r[5] else {}}
                     for r in store._query("SELECT at, actor, role, action, subject, detail FROM audit_log "
                                           "ORDER BY seq") if r[3].startswith("relay_")]
        finally:
            store.close()
        cfg = load_control_config(control)
        policies = {"notice_lead_s": cfg.trips.notice_lead_s, "notice_max_age_s": cfg.trips.notice_max_age_s,
                    "final_reminder_s": cfg.trips.final_reminder_s,
                    "final_reminder_confirmed": cfg.trips.final_reminder_confirmed,
                    "reconnect_deadline_s": cfg.dispatch.reconnect_deadline_s}
        return cls(sent, cleared, confirmations, ledger, commands, cases, notices, orders, audit, records,
                   dict(layout["faulty"]), {m: a for a, m in meter_of.items()}, classes, decisions, policies,
                   ended_at)

    def counts(self) -> dict:
        frames = [e for r in self.records.values() for e in r["relay_log"] if e[2] != CREW]
        return {"ledger_payments": sum(1 for r in self.ledger if r[2] == "payment"),
                "relay_commands": len(self.commands),
                "trip_frames_applied": sum(1 for e in frames if e[1] == GATEWAY_TRIP),
                "close_frames_applied": sum(1 for e in frames if e[1] in GATEWAY_CLOSES),
                "crew_actions": sum(1 for r in self.records.values() for e in r["relay_log"] if e[2] == CREW),
                "work_orders": len(self.orders),
                "protected_accounts": sum(1 for c in self.classes.values() if c in NOT_AUTO),
                # protected accounts that ran out (the engine raised an account manager's task instead of a trip)
                "protected_ran_out": len({a for a, kind in self.decisions
                                          if kind == "account_manager_task" and self.classes.get(a) in NOT_AUTO}),
                "faulty_meters": len(self.faulty)}


def meter_time(iso: str) -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=METER_ZONE).timestamp()


def run_checks(ev: Evidence) -> list[CheckResult]:
    return [payments_exactly_once(ev), trips_gated(ev), protected_never_tripped(ev), paid_reconnected(ev),
            no_action_twice(ev)]


def payments_exactly_once(ev: Evidence) -> CheckResult:
    r = CheckResult("payments_exactly_once", len(ev.sent))
    ledger: dict[str, list[tuple]] = {}
    for row in ev.ledger:
        ledger.setdefault(row[0], []).append(row)
    for pid, (account, fen, _) in sorted(ev.sent.items()):
        rows = ledger.get(pid, [])
        if not rows:
            r.failures.append(f"payment {pid} ({account}, {fen} fen): not in the ledger (lost)")
        elif len(rows) > 1:
            r.failures.append(f"payment {pid}: {len(rows)} ledger rows (counted more than once)")
        elif rows[0][1:4] != (account, "payment", fen):
            r.failures.append(f"payment {pid}: ledger has {rows[0][1:4]}, billing sent ({account}, payment, {fen})")
    for eid, rows in ledger.items():
        if rows[0][2] == "payment" and eid not in ev.sent:
            r.failures.append(f"ledger payment {eid} ({rows[0][1]}, {rows[0][3]} fen): billing never sent it")
    by_payment: dict[str, list[tuple]] = {}
    for event_id, pid, account, fen in ev.confirmations:
        by_payment.setdefault(pid, []).append((event_id, account, fen))
    for pid, (account, fen, _) in sorted(ev.sent.items()):
        seen = by_payment.get(pid, [])
        events = {e for e, _, _ in seen}
        if not seen:
            r.failures.append(f"payment {pid}: never confirmed to billing (payments_applied)")
        elif len(events) > 1:
            r.failures.append(f"payment {pid}: confirmed by {len(events)} different events {sorted(events)} "
                              f"(applied more than once)")
        elif any((a, f) != (account, fen) for _, a, f in seen):
            r.failures.append(f"payment {pid}: confirmed as {seen[0][1:]}, sent as ({account}, {fen})")
    return r


def _sent_records(ev: Evidence, kinds: tuple[str, ...]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for a in ev.audit:
        if a["action"] in kinds:
            out.setdefault(a["subject"], []).append(a)
    return out


def _match_frames(ev: Evidence, r: CheckResult, frame_actions: tuple[str, ...], audit_action: str) -> None:
    """Each gateway frame of ``frame_actions`` a meter applied must follow an ``audit_action`` record of its own."""
    sent = _sent_records(ev, (audit_action,))
    for meter, rec in sorted(ev.records.items()):
        pending = sorted(a["at"] for a in sent.get(meter, []))
        used = 0
        for when, action, operator in rec["relay_log"]:
            if operator == CREW or action not in frame_actions:
                continue
            # the earliest record not yet used must come before the frame (frames and records both in order)
            if used < len(pending) and pending[used] <= meter_time(when) + SLACK_S:
                used += 1
            else:
                r.failures.append(f"meter {meter} ({ev.account_of.get(meter)}): applied {action} at {when} with no "
                                  f"{audit_action} record of the gateway before it that was not already used "
                                  f"({len(pending)} such records in all)")


def trips_gated(ev: Evidence) -> CheckResult:
    r = CheckResult("trips_gated")
    _match_frames(ev, r, (GATEWAY_TRIP,), "relay_trip_sent")
    commands = {c.command_id: c for c in ev.commands}
    notices_of: dict[str, list] = {}
    for n in ev.notices:
        notices_of.setdefault(n.account_id, []).append(n)
    by_id = {n.notice_id: n for n in ev.notices}
    p = ev.policies
    committed_clearing = {row[1]: row[4] for row in ev.ledger if row[0].startswith("CLEAR-")}
    for a in (x for x in ev.audit if x["action"] == "relay_trip_sent"):
        r.checked += 1
        cid, at = a["detail"].get("command_id", ""), a["at"]
        c = commands.get(cid)
        where = f"trip {cid} of meter {a['subject']} sent at {at:.0f}"
        if c is None:
            r.failures.append(f"{where}: no such command in the store")
            continue
        if c.actor != "engine":
            continue  # an operator's trip: their role and approval are the API's checks (none in the soak)
        cleared_at = committed_clearing.get(c.account_id)
        if cleared_at is not None and cleared_at + SLACK_S < at:
            r.failures.append(f"{where}: account {c.account_id}'s clearing payment was committed at {cleared_at}: the "
                              f"balance checked at the send did not see it")
        cls = ev.classes.get(c.account_id)
        if cls in NOT_AUTO:
            r.failures.append(f"{where}: account {c.account_id} is {cls}: never tripped automatically")
        confirmed = [n for n in notices_of.get(c.account_id, []) if n.purpose in DISCONNECT_NOTICES and
                     n.delivered_at is not None and n.delivered_at + p["notice_lead_s"] <= at + SLACK_S and
                     at - n.delivered_at <= p["notice_max_age_s"]]
        if not confirmed:
            r.failures.append(f"{where}: account {c.account_id} has no disconnect notice confirmed "
                              f"{p['notice_lead_s']:.0f} s before it")
        case = ev.cases.get(c.origin)
        if case is None:
            r.failures.append(f"{where}: its disconnect case {c.origin} is not in the store")
        elif p["final_reminder_s"] > 0 and p["final_reminder_confirmed"]:
            fin = by_id.get(case.final_notice_id)
            if fin is None or fin.delivered_at is None or fin.delivered_at + p["final_reminder_s"] > at + SLACK_S:
                r.failures.append(f"{where}: case {case.case_id}'s final reminder {case.final_notice_id or '(none)'} "
                                  f"was not confirmed {p['final_reminder_s']:.0f} s before it "
                                  f"(confirmed at {getattr(fin, 'delivered_at', None)})")
    return r


def protected_never_tripped(ev: Evidence) -> CheckResult:
    r = CheckResult("protected_never_tripped")
    for meter, account in sorted(ev.account_of.items()):
        if ev.classes.get(account) not in NOT_AUTO:
            continue
        r.checked += 1
        trips = [e for e in ev.records.get(meter, {"relay_log": []})["relay_log"] if e[1] == GATEWAY_TRIP]
        if trips:
            r.failures.append(f"meter {meter} of {ev.classes[account]} account {account}: applied trip(s) {trips}")
        cmds = [c.command_id for c in ev.commands if c.meter_id == meter and c.action.value == "trip"]
        if cmds:
            r.failures.append(f"meter {meter} of {ev.classes[account]} account {account}: trip commands {cmds}")
    return r


def paid_reconnected(ev: Evidence) -> CheckResult:
    r = CheckResult("paid_reconnected", len(ev.cleared))
    meter_of = {a: m for m, a in ev.account_of.items()}
    limit = ev.policies["reconnect_deadline_s"]
    for account, paid_at in sorted(ev.cleared.items()):
        meter = meter_of[account]
        if not ev.records[meter]["relay_open"]:
            continue
        orders = [o for o in ev.orders if o.meter_id == meter and o.kind.value == "reconnect"
                  and o.created_at >= paid_at - SLACK_S]
        if not orders:
            r.failures.append(f"account {account} paid up at {paid_at:.0f}: meter {meter}'s relay is open and it "
                              f"has no reconnect work order")
            continue
        o = min(orders, key=lambda o: o.created_at)
        if o.deadline_at > paid_at + limit + SLACK_S:
            r.failures.append(f"account {account}: order {o.order_id}'s deadline {o.deadline_at:.0f} is later than "
                              f"payment + {limit:.0f} s ({paid_at + limit:.0f})")
        done = o.closed_at if o.state.value == "completed" else None
        if done is not None and done > o.deadline_at:
            r.failures.append(f"account {account}: order {o.order_id} completed at {done:.0f}, after its deadline "
                              f"{o.deadline_at:.0f}")
        if done is None and ev.ended_at > o.deadline_at:
            r.failures.append(f"account {account}: order {o.order_id} is {o.state.value} past its deadline "
                              f"{o.deadline_at:.0f} (the soak ended at {ev.ended_at:.0f}) and meter {meter} is open")
    return r


def no_action_twice(ev: Evidence) -> CheckResult:
    r = CheckResult("no_action_twice", len(ev.records))
    _match_frames(ev, r, GATEWAY_CLOSES, "relay_close_sent")
    completed: dict[str, list[float]] = {}  # meter -> when the gateway recorded its field orders completed
    for o in ev.orders:
        if o.state.value == "completed" and o.closed_at is not None:
            completed.setdefault(o.meter_id, []).append(o.closed_at)
    for meter, rec in sorted(ev.records.items()):
        is_open, since, by_crew = False, "the start", False
        stuck = ev.faulty.get(meter) == "stuck_relay"
        for when, action, operator in rec["relay_log"]:
            if operator == CREW:
                is_open, since, stuck, by_crew = action == GATEWAY_TRIP, f"a crew at {when}", False, True
                continue
            if action not in (GATEWAY_TRIP, *GATEWAY_CLOSES):
                continue
            to_open, t = action == GATEWAY_TRIP, meter_time(when)
            if stuck:
                continue  # the contact does not move: a repeat is a retry (each matched to its own sent record)
            if is_open == to_open:
                where = f"meter {meter} ({ev.account_of.get(meter)}): {action} at {when} found the relay already " \
                        f"{'open' if is_open else 'closed'} since {since}"
                if not by_crew:
                    r.failures.append(f"{where}: applied twice")
                elif any(c + SLACK_S < t for c in completed.get(meter, ())):
                    r.failures.append(f"{where}, after the gateway had recorded the order completed")
                else:
                    r.raced_crew += 1
            is_open, since, by_crew = to_open, f"{action} at {when}", False
        if not stuck and is_open != rec["relay_open"]:
            r.failures.append(f"meter {meter}: its log ends {'open' if is_open else 'closed'} but its relay is "
                              f"{'open' if rec['relay_open'] else 'closed'} (the record is incomplete)")
    return r
