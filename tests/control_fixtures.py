"""Builders for the relay-control tests: a small utility, its controller, and the upstream systems' replies."""
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from gateway.core.commands import CommandPolicy, ReconnectMode, RelayAction, RelayStatus, StepKind
from gateway.core.control import ControlConfig, Controller, NoticeReceiptIn, Permit, SendResult
from gateway.core.engine import Decision, DecisionKind, Engine
from gateway.core.model import Account, CustomerClass, Meter
from gateway.core.notices import ReceiptOutcome
from protocols.dlt645.client import LinkSettings

from .core_fixtures import POLICY, tariffs

CST = timezone(timedelta(hours=8))

#: a gateway on a real clock that verifies relays within a second (executor and MQTT tests), and its line
_P, _QUICK_VERIFY = CommandPolicy(), dict(settle_s=1.0, verify_first_s=0.2, verify_every_s=0.2)
QUICK = ControlConfig(commands=CommandPolicy(close=replace(_P.close, **_QUICK_VERIFY),
                                             trip=replace(_P.trip, **_QUICK_VERIFY)))
LIVE_LINK = LinkSettings(baud=9600, turnaround_s=0.2, margin_s=0.1, retries=0)


def at_any_hour(config: ControlConfig) -> ControlConfig:
    """``config`` with no forbidden window, notices sent at any hour and the next days working days: for a
    test on the real clock whose outcome must not depend on when it runs (at night, on a weekend, on a
    statutory holiday the default gates would hold every trip and every notice)."""
    today = datetime.now(CST).date()
    notices = replace(config.notices, channels={name: replace(ch, hours="00:00-24:00")
                                                for name, ch in config.notices.channels.items()})
    calendar = replace(config.calendar, extra_workdays=tuple(config.calendar.extra_workdays) + tuple(
        (today + timedelta(days=i)).isoformat() for i in (-1, 0, 1, 2)))
    window = replace(config.trips.window, hours="00:00-24:00", allow_weekends=True)
    return replace(config, notices=notices, calendar=calendar, trips=replace(config.trips, window=window))


def at(y, mo, d, h=0, mi=0) -> int:
    """Local (UTC+8) wall time -> epoch seconds."""
    return int(datetime(y, mo, d, h, mi, tzinfo=CST).timestamp())


MONDAY = at(2026, 3, 2, 10)  # an ordinary working Monday, 10:00


def account(i, klass=CustomerClass.RESIDENTIAL, channels=("sms", "voice", "app"), area="north", contacts=None):
    if contacts is None:
        contacts = {"sms": f"1380000{i:04d}", "voice": f"1380000{i:04d}", "app": f"app-{i}"}
    return Account(f"A{i}", klass, tariff_id="flat", area=area, name=f"Customer {i}", address=f"{i} Main St",
                   lat=31.2 + i / 1000, lon=121.5, channels=channels, contacts=contacts)


def utility(n=3, meters_per_account=1, **kw) -> Engine:
    e = Engine(tariffs(), POLICY)
    e.add_accounts([kw.get("accounts", {}).get(i) or account(i) for i in range(n)])
    e.add_meters([Meter(f"M{i}" + (f"-{k}" if k else ""), f"A{i}", max_kw=20,
                        reconnect_mode=kw.get("reconnect_mode", "direct"))
                  for i in range(n) for k in range(meters_per_account)])
    return e


class Ids:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1
        return f"ev{self.n}"


def controller(engine=None, config=None) -> Controller:
    return Controller(config or ControlConfig(), engine or utility(), Ids())


def decision(kind: DecisionKind, account_id="A0", seq=1, level=3, balance=-5, t=MONDAY) -> Decision:
    return Decision(f"{account_id}#{seq}", account_id, int(account_id[1:]), kind, level, balance, int(t), "test")


def requests(fx, account_id=None):
    return [e.payload for e in fx.events if e.kind == "notice_request"
            and (account_id is None or e.payload["account_id"] == account_id)]


def kinds(fx) -> list[str]:
    return [e.kind for e in fx.events]


class FakeRelay:
    """A meter's relay for the pure tests: obeys (or not), optionally in keep-power."""

    def __init__(self, open_=False, stuck=False, keep_power=False, silent=False, refuse=None):
        self.open, self.commanded_open = open_, open_
        self.stuck, self.keep_power, self.silent, self.refuse = stuck, keep_power, silent, refuse
        self.actions: list[tuple[float, str]] = []

    def status(self) -> RelayStatus:
        return RelayStatus(self.open, self.commanded_open, self.keep_power)


class Sim:
    """Drives a controller through virtual time: ticks, notice receipts from upstream, executor steps."""

    def __init__(self, c: Controller, now: float, relays: dict | None = None, deliver=None):
        self.c, self.now = c, now
        self.relays = relays if relays is not None else {}
        # deliver(request) -> (outcome, delay_s) or None (no receipt ever): upstream notification systems
        self.deliver = deliver or (lambda r: (ReceiptOutcome.DELIVERED, 60))
        self.pending: list[tuple[float, str, ReceiptOutcome]] = []
        self.events: list = []
        self.audit: list = []
        self.balances: dict = {}  # meter -> (fresh balance, trip level) seen at the moment of sending
        self.notices: dict = {}  # every notice ever touched (the controller forgets old ones; the store does not)

    def collect(self):
        fx = self.c.take_effects()
        self.notices.update(fx.notices)
        self.events += fx.events
        self.audit += fx.audit
        for r in requests(fx):
            answer = self.deliver(r)
            if answer is not None:
                outcome, delay = answer
                self.pending.append((self.now + delay, r["request_id"], outcome))
        return fx

    def of(self, kind):
        return [e.payload for e in self.events if e.kind == kind]

    def relay(self, meter_id) -> FakeRelay:
        return self.relays.setdefault(meter_id, FakeRelay())

    def execute(self):
        for _ in range(1000):
            steps = self.c.steps(self.now)
            if not steps:
                return
            s = steps[0]
            r = self.relay(s.meter_id)
            if s.kind == StepKind.SEND:
                p = self.c.authorize(s.subject_id, self.now, *self.balances.get(s.meter_id, (-5, 0)))
                self.collect()
                if not isinstance(p, Permit):
                    continue
                if r.silent:
                    self.c.on_send_result(s.subject_id, self.now, SendResult.NO_ANSWER, "timeout")
                elif r.refuse or (r.keep_power and p.action == RelayAction.TRIP):
                    errors = r.refuse or ("other_error",)
                    self.c.on_send_result(s.subject_id, self.now, SendResult.REFUSED, "refused", errors, r.status())
                else:
                    r.actions.append((self.now, p.action.value))
                    r.commanded_open = p.action == RelayAction.TRIP
                    if not r.stuck and not (p.mode == ReconnectMode.CLOSE_ALLOWED and p.action == RelayAction.CLOSE):
                        r.open = r.commanded_open
                    self.c.on_send_result(s.subject_id, self.now, SendResult.ACKNOWLEDGED)
            else:
                self.c.on_read_result(s, self.now, None if r.silent else r.status(), "timeout" if r.silent else "")
            self.collect()
        raise AssertionError("executor did not settle")

    def do_due(self, execute: bool = True) -> None:
        """Everything due at this instant: time's own work, receipts from upstream, the executor's steps."""
        self.c.tick(self.now)
        self.collect()
        for due, rid, outcome in sorted(p for p in self.pending if p[0] <= self.now):
            self.pending.remove((due, rid, outcome))
            self.c.on_receipts([NoticeReceiptIn(rid, outcome, due)], self.now)
            self.collect()
        if execute:
            self.execute()

    def advance(self, until: float) -> bool:
        """Move to the next instant anything is due (at most ``until``); False once ``until`` is reached."""
        nxt = [t for t in (self.c.next_wakeup(), min((p[0] for p in self.pending), default=None))
               if t is not None and t > self.now]
        t = min(nxt, default=until)
        self.now = min(t, until)
        return t < until

    def run(self, until: float, max_steps=100_000):
        """Advance to ``until``, doing everything that falls due on the way."""
        for _ in range(max_steps):
            self.do_due()
            if not self.advance(until):
                self.do_due()
                return
        raise AssertionError("simulation did not reach its end")
