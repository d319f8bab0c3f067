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
    Every trip frame a meter applied (its own log) follows a ``relay_trip_sent`` audit record of the gateway for
    that meter (each record accounts for one frame at most), and each passed the gates: the engine's command
    (the soak has no operators: any other actor fails); the account's balance at the send, from the ledger's
    credits committed before it less the readings' charges up to it, at or below the trip level (so no payment
    that cleared the arrears had been committed); not a protected account (the harness's set); the
    notification simulator itself answered ``delivered`` to a disconnect notice request (warning 1, 2 or
    disconnect) of the account at least ``notice_lead_s`` before the frame's time on the meter's clock and not
    more than ``notice_max_age_s`` before, and to the case's final reminder at least ``final_reminder_s``
    before it (where the policies ask for one). A crew's trip by hand needs a disconnect work order of the
    meter created before it, and the account still in arrears by the same reckoning.
``protected_never_tripped``
    No meter of an account the harness made protected applied a trip (any operator), the store holds no trip
    command for one, and the store's class of every account agrees with the harness.
``paid_reconnected``
    From each meter's log (a stuck relay's frames do not move it): whenever a payment, any, took the balance of
    an account whose relay was open above the close level (and charges did not take it back below), the relay
    closed (a frame or a crew's hand) within ``reconnect_deadline_s`` of that payment's commit, or the soak
    ended before then; no reconnect work order carries a later deadline.
``no_action_twice``
    A relay action is applied twice when a meter applies an operate frame of the gateway that finds its contact
    already where an earlier frame of the gateway put it (a re-send without reading back first: what invariant
    4 forbids). Walking each meter's log from its start position (closed): a gateway frame must move the
    contact. A crew sets it by hand: a gateway frame that then finds it already there raced the crew (a remote
    retry while the order is open, the crew's report not yet in), which is allowed only within
    ``RACE_WINDOW_S`` of the crew and before the gateway recorded that crew's order completed; at most
    ``MAX_RACED_SHARE`` of crew visits may be raced. Meters with a stuck relay (until a crew repairs them)
    cannot move: their repeats are retries of an action that did not happen, and like every frame each must
    follow a ``relay_*_sent`` audit record of its own (so a retry the gateway did not record is still caught;
    that the gateway read the relay back between them is not checked: the meters do not log their reads).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gateway.config import load_control_config
from gateway.core.model import yuan_to_fen
from gateway.core.notices import DISCONNECT_NOTICES, NoticePurpose
from gateway.store import open_store
from gateway.store.entities import CASES, COMMANDS, NOTICES, ORDERS

METER_ZONE = timezone(timedelta(hours=8))  # the simulated meters keep the utility's local time
SLACK_S = 1.0  # the store keeps whole seconds in places; the meters log local time to the microsecond
GATEWAY_TRIP, GATEWAY_CLOSES = "trip", ("direct_close", "close", "close_allowed")
CREW = "field-crew"
NOT_AUTO = ("protected", "vip")
#: a gateway frame may find the relay where a crew just set it (the crew's report not yet in) this long at most
RACE_WINDOW_S = 30.0
#: and at most this share of crew visits may be raced so (more means the gateway ignores open orders)
MAX_RACED_SHARE = 0.5


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
    confirmations: list[tuple[str, str, str, int]]  # (event id, payment id, account, amount fen)
    ledger: list[tuple[str, str, str, int, int]]  # (entry id, account, kind, amount fen, recorded at epoch s)
    charges: list[tuple[str, int, int]]  # (account, reading time epoch s, its cost in micro-fen): the debits
    commands: list
    cases: dict
    notices: list
    orders: list
    audit: list[dict]  # {at, actor, role, action, subject, detail}
    records: dict[str, dict]  # meter -> {"relay_open", "relay_log": [[iso local, action, operator], ...]}
    faulty: dict[str, str]  # meter -> the fault it was built with
    account_of: dict[str, str]  # meter -> account
    classes: dict[str, str]  # account -> customer class (the store's)
    protected: set[str]  # the accounts the harness made protected (what the checks judge by)
    receipts: dict[str, tuple]  # notice request id -> (outcome, at epoch s, notice id, purpose, account): the sim's
    decisions: list[tuple[str, str]]  # (account, kind) of every engine decision
    policies: dict[str, float]
    ended_at: float

    @classmethod
    def collect(cls, dsn: str, upstream, billing, records: dict, layout: dict, protected: set[str],
                meter_of: dict[str, str], control: Path, ended_at: float, thresholds: dict) -> "Evidence":
        sent = {p: (s.account, yuan_to_fen(s.amount), s.paid_at.timestamp()) for p, s in upstream.sent.items()}
        confirmations = [(ev.id, row[0], row[1], yuan_to_fen(row[2])) for ev in billing.of_kind("payments_applied")
                         for row in ev.data["rows"]]
        store = open_store(dsn)
        try:
            ledger = [tuple(r) for r in store._query(
                "SELECT l.entry_id, a.account_id, l.kind, l.amount_fen, l.recorded_at FROM ledger l "
                "JOIN accounts a ON a.account_no = l.account_no")]
            charges = [tuple(r) for r in store._query(
                "SELECT a.account_id, r.t, r.cost_ufen FROM readings r JOIN accounts a ON a.account_no = r.account_no "
                "WHERE r.cost_ufen <> 0")]
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
                    "reconnect_deadline_s": cfg.dispatch.reconnect_deadline_s, **thresholds}
        return cls(sent, confirmations, ledger, charges, commands, cases, notices, orders, audit, records,
                   dict(layout["faulty"]), {m: a for a, m in meter_of.items()}, classes, set(protected),
                   dict(billing.notice_answers), decisions, policies, ended_at)

    def counts(self) -> dict:
        frames = [e for r in self.records.values() for e in r["relay_log"] if e[2] != CREW]
        return {"ledger_payments": sum(1 for r in self.ledger if r[2] == "payment"),
                "relay_commands": len(self.commands),
                "trip_frames_applied": sum(1 for e in frames if e[1] == GATEWAY_TRIP),
                "close_frames_applied": sum(1 for e in frames if e[1] in GATEWAY_CLOSES),
                "crew_actions": sum(1 for r in self.records.values() for e in r["relay_log"] if e[2] == CREW),
                "work_orders": len(self.orders),
                "protected_accounts": len(self.protected),
                # protected accounts that ran out (the engine raised an account manager's task instead of a trip)
                "protected_ran_out": len({a for a, kind in self.decisions
                                          if kind == "account_manager_task" and a in self.protected}),
                "faulty_meters": len(self.faulty),
                "notices_delivered_by_sim": sum(1 for r in self.receipts.values() if r[0] == "delivered")}


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


def _match_frames(ev: Evidence, r: CheckResult, frame_actions: tuple[str, ...],
                  audit_action: str) -> list[tuple[str, float, dict]]:
    """Each gateway frame of ``frame_actions`` a meter applied must follow an ``audit_action`` record of its own.
    -> (meter, the frame's time on the meter's clock, its record) for every frame that has one."""
    sent = _sent_records(ev, (audit_action,))
    matched = []
    for meter, rec in sorted(ev.records.items()):
        pending = sorted(sent.get(meter, []), key=lambda a: a["at"])
        used = 0
        for when, action, operator in rec["relay_log"]:
            if operator == CREW or action not in frame_actions:
                continue
            # the earliest record not yet used must come before the frame (frames and records both in order)
            if used < len(pending) and pending[used]["at"] <= meter_time(when) + SLACK_S:
                matched.append((meter, meter_time(when), pending[used]))
                used += 1
            else:
                r.failures.append(f"meter {meter} ({ev.account_of.get(meter)}): applied {action} at {when} with no "
                                  f"{audit_action} record of the gateway before it that was not already used "
                                  f"({len(pending)} such records in all)")
    return matched


def _ledger_of(ev: Evidence) -> dict[str, list[tuple[float, float]]]:
    """account -> [(when, signed fen)] in time order: the ledger's rows at their commit, and the charges of the
    readings (kept with the readings, not in the ledger) at the reading's time."""
    out: dict[str, list[tuple[float, float]]] = {}
    rows = [(at, account, fen) for _, account, _, fen, at in ev.ledger]
    rows += [(t, account, -ufen / 1e6) for account, t, ufen in ev.charges]
    for at, account, fen in sorted(rows):
        out.setdefault(account, []).append((at, fen))
    return out


def _lowest_balance_before(rows: list[tuple[float, float]], t: float) -> float:
    """The least the balance can have been at ``t``: credits certainly committed before it (the store keeps whole
    seconds), debits possibly committed before it. Above the trip level, the arrears were certainly cleared."""
    return sum(fen for at, fen in rows if (at + SLACK_S < t if fen > 0 else at <= t + SLACK_S))


def _delivered(ev: Evidence, account: str, purposes: set[str], notice_id: str | None = None) -> list[float]:
    """When the notification simulator itself answered ``delivered`` to a notice request of ``account``."""
    return [at for outcome, at, nid, purpose, acct in ev.receipts.values()
            if outcome == "delivered" and acct == account and purpose in purposes and notice_id in (None, nid)]


def trips_gated(ev: Evidence) -> CheckResult:
    r = CheckResult("trips_gated")
    p = ev.policies
    commands = {c.command_id: c for c in ev.commands}
    ledger = _ledger_of(ev)
    disconnect = {purpose.value for purpose in DISCONNECT_NOTICES}
    for meter, frame_at, a in _match_frames(ev, r, (GATEWAY_TRIP,), "relay_trip_sent"):
        r.checked += 1
        account = ev.account_of.get(meter)
        cid, at = a["detail"].get("command_id", ""), a["at"]
        c = commands.get(cid)
        where = f"trip {cid} of meter {meter} sent at {at:.0f}"
        if c is None:
            r.failures.append(f"{where}: no such command in the store")
            continue
        if c.actor != "engine" or a["actor"] != "engine":
            r.failures.append(f"{where}: by {c.actor} (audit: {a['actor']}): the soak has no operators, every trip "
                              f"is the engine's")
        if c.account_id != account:
            r.failures.append(f"{where}: the command names account {c.account_id}, the meter is {account}'s")
        lowest = _lowest_balance_before(ledger.get(account, []), at)
        if lowest > p["trip_level_fen"]:
            r.failures.append(f"{where}: account {account}'s ledger committed before the send leaves at least "
                              f"{lowest:.0f} fen (above the trip level): the balance checked at the send missed a "
                              f"payment")
        if account in ev.protected:
            r.failures.append(f"{where}: account {account} is protected: never tripped automatically")
        if not any(d + p["notice_lead_s"] <= frame_at + SLACK_S and frame_at - d <= p["notice_max_age_s"]
                   for d in _delivered(ev, account, disconnect)):
            r.failures.append(f"{where}: the notification system delivered no disconnect notice of {account} "
                              f"{p['notice_lead_s']:.0f} s before the meter applied it at {frame_at:.1f}")
        case = ev.cases.get(c.origin)
        if case is None:
            r.failures.append(f"{where}: its disconnect case {c.origin} is not in the store")
        elif p["final_reminder_s"] > 0 and p["final_reminder_confirmed"]:
            delivered = _delivered(ev, account, {NoticePurpose.FINAL_REMINDER.value}, case.final_notice_id)
            if not any(d + p["final_reminder_s"] <= frame_at + SLACK_S for d in delivered):
                r.failures.append(f"{where}: case {case.case_id}'s final reminder {case.final_notice_id or '(none)'} "
                                  f"was not delivered (the notification system's receipts: {delivered}) "
                                  f"{p['final_reminder_s']:.0f} s before the meter applied it at {frame_at:.1f}")
    # a crew's trip: only through a disconnect order of the meter, while the account was still in arrears
    for meter, rec in sorted(ev.records.items()):
        account = ev.account_of.get(meter)
        for when, action, operator in rec["relay_log"]:
            if operator != CREW or action != GATEWAY_TRIP:
                continue
            r.checked += 1
            t = meter_time(when)
            where = f"meter {meter} ({account}): a crew tripped it at {when}"
            if not any(o.meter_id == meter and o.kind.value == "disconnect" and o.created_at <= t + SLACK_S
                       for o in ev.orders):
                r.failures.append(f"{where} with no disconnect work order for it")
            lowest = _lowest_balance_before(ledger.get(account, []), t)
            if lowest > p["trip_level_fen"]:
                r.failures.append(f"{where}, after payments leaving at least {lowest:.0f} fen were committed")
    return r


def protected_never_tripped(ev: Evidence) -> CheckResult:
    """Judged by the harness's own protected set (what it wrote into the fleet file), not the store's classes."""
    r = CheckResult("protected_never_tripped")
    for meter, account in sorted(ev.account_of.items()):
        stored = ev.classes.get(account)
        if (account in ev.protected) != (stored in NOT_AUTO):
            made = "protected" if account in ev.protected else "residential"
            r.failures.append(f"account {account}: the harness made it {made}, the store has class {stored}")
        if account not in ev.protected:
            continue
        r.checked += 1
        trips = [e for e in ev.records.get(meter, {"relay_log": []})["relay_log"] if e[1] == GATEWAY_TRIP]
        if trips:
            r.failures.append(f"meter {meter} of protected account {account}: applied trip(s) {trips}")
        cmds = [c.command_id for c in ev.commands if c.meter_id == meter and c.action.value == "trip"]
        if cmds:
            r.failures.append(f"meter {meter} of protected account {account}: trip commands {cmds}")
    return r


def _positions(ev: Evidence, meter: str) -> list[tuple[float, bool]]:
    """When the meter's contact really moved (a stuck relay's frames do not move it until a crew repairs it):
    [(time, open)], from the start position (closed)."""
    moves, is_open, stuck = [], False, ev.faulty.get(meter) == "stuck_relay"
    for when, action, operator in ev.records[meter]["relay_log"]:
        if operator == CREW:
            stuck = False
        elif stuck or action not in (GATEWAY_TRIP, *GATEWAY_CLOSES):
            continue
        to_open = action == GATEWAY_TRIP
        if to_open != is_open:
            moves.append((meter_time(when), to_open))
            is_open = to_open
    return moves


def paid_reconnected(ev: Evidence) -> CheckResult:
    """From each meter's own log: every time a payment cleared the arrears while its relay was open, the relay
    closed (by a frame of the gateway or a crew's hand) within ``reconnect_deadline_s`` of that payment's commit,
    or the soak ended before then; a reconnect work order carries that deadline (the payment's), no later one."""
    r = CheckResult("paid_reconnected")
    p, ledger = ev.policies, _ledger_of(ev)
    limit, close_above = p["reconnect_deadline_s"], p["trip_level_fen"] + p["close_margin_fen"]
    for meter, account in sorted(ev.account_of.items()):
        if account in ev.protected:
            continue
        moves = _positions(ev, meter)
        rows = ledger.get(account, [])
        for i, (opened_at, is_open) in enumerate(moves):
            if not is_open:
                continue
            closed_at = moves[i + 1][0] if i + 1 < len(moves) else None
            balance = sum(fen for at, fen in rows if at <= opened_at)
            due_from = None  # the commit of the payment that cleared the arrears
            for at, fen in rows:
                if at <= opened_at or closed_at is not None and at > closed_at:
                    continue
                balance += fen
                if due_from is None and fen > 0 and balance > close_above:
                    due_from = at
                elif due_from is not None and balance <= close_above:
                    due_from = None  # charges read late took it back below: no longer owed a close
            if due_from is None:
                continue
            r.checked += 1
            where = f"account {account} (meter {meter}, open since {opened_at:.1f}) paid up at {due_from}"
            deadline = due_from + limit
            late = [o.order_id for o in ev.orders if o.meter_id == meter and o.kind.value == "reconnect"
                    and opened_at - SLACK_S <= o.created_at and o.deadline_at > deadline + SLACK_S
                    and (closed_at is None or o.created_at <= closed_at + SLACK_S)]
            if late:
                r.failures.append(f"{where}: reconnect order(s) {late} with a deadline later than the payment + "
                                  f"{limit:.0f} s ({deadline:.0f})")
            if closed_at is None and ev.ended_at > deadline + SLACK_S:
                r.failures.append(f"{where}: still open when the soak ended at {ev.ended_at:.0f}, past its deadline "
                                  f"{deadline:.0f}")
            elif closed_at is not None and closed_at > deadline + SLACK_S:
                r.failures.append(f"{where}: closed only at {closed_at:.1f}, after its deadline {deadline:.0f}")
    return r


def _crew_order(ev: Evidence, meter: str, action: str, t: float):
    """The work order a crew was completing when it set ``meter``'s relay at ``t``: the meter's order of the
    matching kind created before and recorded completed the soonest after (or None)."""
    kind = "disconnect" if action == GATEWAY_TRIP else "reconnect"
    candidates = [o for o in ev.orders if o.meter_id == meter and o.kind.value == kind and o.created_at <= t + SLACK_S
                  and o.state.value == "completed" and o.closed_at is not None and o.closed_at >= t - SLACK_S]
    return min(candidates, key=lambda o: o.closed_at, default=None)


def no_action_twice(ev: Evidence) -> CheckResult:
    r = CheckResult("no_action_twice", len(ev.records))
    _match_frames(ev, r, GATEWAY_CLOSES, "relay_close_sent")
    for meter, rec in sorted(ev.records.items()):
        is_open, since, crew = False, "the start", None
        stuck = ev.faulty.get(meter) == "stuck_relay"
        for when, action, operator in rec["relay_log"]:
            if operator == CREW:
                is_open, since, stuck = action == GATEWAY_TRIP, f"a crew at {when}", False
                crew = (meter_time(when), _crew_order(ev, meter, action, meter_time(when)))
                continue
            if action not in (GATEWAY_TRIP, *GATEWAY_CLOSES):
                continue
            to_open, t = action == GATEWAY_TRIP, meter_time(when)
            if stuck:
                continue  # the contact does not move: a repeat is a retry (each matched to its own sent record)
            if is_open == to_open:
                where = f"meter {meter} ({ev.account_of.get(meter)}): {action} at {when} found the relay already " \
                        f"{'open' if is_open else 'closed'} since {since}"
                if crew is None:
                    r.failures.append(f"{where}: applied twice")
                elif crew[1] is None:
                    r.failures.append(f"{where}: no completed work order of that crew's visit")
                elif t > crew[1].closed_at + SLACK_S:
                    r.failures.append(f"{where}, after the gateway had recorded order {crew[1].order_id} completed "
                                      f"at {crew[1].closed_at:.1f}")
                elif t > crew[0] + RACE_WINDOW_S:
                    r.failures.append(f"{where}: more than {RACE_WINDOW_S:.0f} s after the crew, still racing it")
                else:
                    r.raced_crew += 1
            is_open, since, crew = to_open, f"{action} at {when}", None
        if not stuck and is_open != rec["relay_open"]:
            r.failures.append(f"meter {meter}: its log ends {'open' if is_open else 'closed'} but its relay is "
                              f"{'open' if rec['relay_open'] else 'closed'} (the record is incomplete)")
    crew_visits = sum(1 for rec in ev.records.values() for e in rec["relay_log"] if e[2] == CREW)
    if r.raced_crew > max(MAX_RACED_SHARE * crew_visits, 1):
        r.failures.append(f"{r.raced_crew} gateway frames raced a crew, of {crew_visits} crew visits (at most "
                          f"{MAX_RACED_SHARE:.0%} may)")
    return r
