"""A virtual DL/T 645-2007 meter: energy registers driven by a load profile, a relay, a prepaid purse.

Sans-I/O like the codec: :meth:`SimMeter.handle` takes a parsed request and
the current time and returns the reply message (or ``None`` for silence). The
bus and the transports in this package decide when the bytes go out.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Callable

from protocols.dlt645 import messages as m
from protocols.dlt645.codes import Edition, Function2007, RelayAction, error_word
from protocols.dlt645.di import TARIFF_NAMES, encode_value
from protocols.dlt645.formats import FormatError

E07 = Edition.DLT645_2007
_CENT = Decimal("0.01")

# Time-of-use periods by hour (a common provincial schedule): T1 sharp, T2 peak, T3 flat, T4 valley.
_TOU_BY_HOUR = (4, 4, 4, 4, 4, 4, 4, 3, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 2, 1, 1, 2, 2, 4)
# Relative household load by hour: low at night, peaks morning and evening.
_PROFILE = (0.35, 0.3, 0.28, 0.27, 0.28, 0.35, 0.6, 0.9, 0.8, 0.6, 0.55, 0.6,
            0.7, 0.6, 0.55, 0.55, 0.65, 0.9, 1.2, 1.4, 1.3, 1.1, 0.8, 0.5)


@dataclass
class Faults:
    """Fault injection; probabilities are per request, drawn from the meter's own seeded RNG."""

    no_reply: float = 0.0
    late_reply: float = 0.0
    late_by_s: float = 3.0
    corrupt_checksum: float = 0.0
    wrong_address: float = 0.0
    abnormal: float = 0.0  # answer reads with an abnormal reply
    abnormal_error: str = "other_error"
    ack_instead_of_data: float = 0.0  # answer reads with a bare acknowledgement (a firmware glitch seen in the field)
    stuck_relay: bool = False  # acknowledges relay commands but the contact does not move

    @classmethod
    def uniform(cls, rate: float) -> "Faults":
        """A mix of every transient fault at ``rate`` in total (for fleet-wide chaos)."""
        each = rate / 5
        return cls(no_reply=each, late_reply=each, corrupt_checksum=each, wrong_address=each, abnormal=each)


@dataclass
class ReplyPlan:
    """What the meter will put on the line, and how: the bus turns this into bytes and timing."""

    message: m.Message | None
    delay_s: float = 0.0
    corrupt: bool = False
    as_address: str | None = None


@dataclass
class SimMeter:
    address: str
    password: str = "000000"
    power_kw: float = 1.5  # mean load; the hourly profile shapes it
    price_per_kwh: Decimal = Decimal("0.5600")
    remaining_amount: Decimal = Decimal("100.00")  # prepaid purse (local cost-control meters)
    overdraft_limit: Decimal = Decimal("0.00")
    local_cost_control: bool = False  # the meter itself trips when the purse is empty
    relay_open: bool = False
    #: the contact moves this long after the command (real relays take a moment; status word 3 shows the old
    #: position until then)
    relay_delay_s: float = 0.0
    relay_command_open: bool = False
    close_allowed_pending: bool = False  # close-allowed received: waits for the customer's button
    keep_power: bool = False
    pre_trip_alarm: bool = False
    voltage: Decimal = Decimal("220.0")
    faults: Faults = field(default_factory=Faults)
    seed: int | None = None
    energy: list[Decimal] = field(default_factory=lambda: [Decimal("0.00")] * 5)
    reverse_energy: list[Decimal] = field(default_factory=lambda: [Decimal("0.00")] * 5)
    last_update: datetime | None = None
    relay_log: list[tuple[datetime, str, str]] = field(default_factory=list)  # (when, action, operator)
    requests: int = 0
    #: split read replies longer than this into follow-up frames (real meters do for big blocks)
    max_reply_data: int = 200

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed if self.seed is not None else int(self.address))
        self._fractional_kwh = 0.0
        self._followups: dict[int, list[bytes]] = {}  # DI -> remaining chunks of a multi-frame reply
        self._relay_moves: tuple[datetime, bool] | None = None  # (when, to open?) of a contact still moving
        self._payload_cache: dict[int, tuple[object, bytes]] = {}  # DI -> (the value's key, its encoded payload)

    # -- physics ------------------------------------------------------------

    def advance(self, now: datetime) -> None:
        """Integrate consumption up to ``now`` (hour by hour, so the TOU split is right)."""
        if self._relay_moves is not None and now >= self._relay_moves[0]:
            self.relay_open, self._relay_moves = self._relay_moves[1], None
        if self.last_update is None:
            self.last_update = now
            return
        t = self.last_update
        while t < now:
            hour_end = t.replace(minute=0, second=0, microsecond=0).timestamp() + 3600
            step_end = min(hour_end, now.timestamp())
            hours = (step_end - t.timestamp()) / 3600
            if not self.relay_open:
                self._consume(self.power_kw * _PROFILE[t.hour] * hours, _TOU_BY_HOUR[t.hour])
            t = datetime.fromtimestamp(step_end)
        self.last_update = now

    def _consume(self, kwh: float, tariff: int) -> None:
        # registers count in 0.01 kWh like the real thing; carry the remainder
        self._fractional_kwh += kwh
        whole = Decimal(self._fractional_kwh).quantize(_CENT, rounding=ROUND_DOWN)
        if whole <= 0:
            return
        self._fractional_kwh -= float(whole)
        self.energy[0] += whole
        self.energy[tariff] += whole
        if self.local_cost_control:
            self.remaining_amount -= (whole * self.price_per_kwh).quantize(_CENT)
            if self.remaining_amount <= -self.overdraft_limit and not self.keep_power:
                self._set_relay(True)

    def _set_relay(self, open_: bool, now: datetime | None = None) -> None:
        self.relay_command_open = open_
        if self.faults.stuck_relay:
            return
        if self.relay_delay_s and now is not None:
            self._relay_moves = (now + timedelta(seconds=self.relay_delay_s), open_)
        else:
            self.relay_open, self._relay_moves = open_, None

    def press_button(self) -> None:
        """The customer presses the button after a close-allowed command."""
        if self.close_allowed_pending and not self.faults.stuck_relay:
            self.relay_open = False
            self.close_allowed_pending = False

    def current_a(self) -> Decimal:
        if self.relay_open:
            return Decimal("0.000")
        return (Decimal(self.power_kw * 1000 / float(self.voltage))).quantize(Decimal("0.001"))

    # -- protocol -----------------------------------------------------------------

    def value(self, di: int) -> object | None:
        """Current value of one DI (``None``: not served): a read computes only what it was asked for."""
        get = _SERVED.get(di)
        return None if get is None else get(self)

    def _status3(self) -> dict:
        return {"relay": "open" if self.relay_open else "closed",
                "relay_command": "open" if self.relay_command_open else "closed",
                "pre_trip_alarm": self.pre_trip_alarm, "keep_power": self.keep_power,
                "meter_type": "money_prepaid" if self.local_cost_control else "not_prepaid",
                "remote_account_open": True, "identity_authenticated": False}

    def _power(self) -> Decimal:
        return Decimal("0.0000") if self.relay_open else Decimal(str(round(self.power_kw, 4)))

    def _payload(self, di: int, value) -> bytes:
        """The encoded value, reused while the value is unchanged: at 100,000 meters the encoding (BCD of
        Decimals, construct for status words) was most of the simulator's time, and most reads repeat it."""
        if isinstance(value, dict):  # status words and blocks: many meters show the same few; share them
            key = (di, *value.values())
            payload = _SHARED_PAYLOADS.get(key)
            if payload is None:
                if len(_SHARED_PAYLOADS) >= 50_000:
                    _SHARED_PAYLOADS.clear()
                payload = _SHARED_PAYLOADS[key] = encode_value(di, value, E07)
            return payload
        cached = self._payload_cache.get(di)
        if cached is not None and cached[0] == value:
            return cached[1]
        payload = encode_value(di, value, E07)
        self._payload_cache[di] = (value, payload)
        return payload

    def handle(self, request: m.Message, now: datetime) -> ReplyPlan:
        """Decide the reply to one request addressed to this meter."""
        self.requests += 1
        self.advance(now)
        f = self.faults
        rng = self.rng
        if f.no_reply and rng.random() < f.no_reply:
            return ReplyPlan(None)
        reply = self._reply(request, now)
        plan = ReplyPlan(reply)
        if reply is None:
            return plan
        if f.late_reply and rng.random() < f.late_reply:
            plan.delay_s = f.late_by_s
        if f.corrupt_checksum and rng.random() < f.corrupt_checksum:
            plan.corrupt = True
        if f.wrong_address and rng.random() < f.wrong_address:
            plan.as_address = f"{(int(self.address) + 1) % 10**12:012d}"
        return plan

    def _reply(self, request: m.Message, now: datetime) -> m.Message | None:
        addr = self.address
        if isinstance(request, m.ReadRequest):
            if self.faults.abnormal and self.rng.random() < self.faults.abnormal:
                return m.AbnormalReply(addr, Function2007.READ_DATA, error_word(self.faults.abnormal_error))
            if self.faults.ack_instead_of_data and self.rng.random() < self.faults.ack_instead_of_data:
                return m.Ack(addr, Function2007.READ_DATA)
            value = self.value(request.di)
            if value is None:
                return m.AbnormalReply(addr, Function2007.READ_DATA, error_word("no_data_requested"))
            try:
                payload = self._payload(request.di, value)
            except FormatError:
                return m.AbnormalReply(addr, Function2007.READ_DATA, error_word("other_error"))
            if len(payload) > self.max_reply_data:
                step = self.max_reply_data
                chunks = [payload[i : i + step] for i in range(0, len(payload), step)]
                self._followups[request.di] = chunks[1:]
                return m.ReadReply(addr, request.di, chunks[0], E07, followup=True)
            return m.ReadReply(addr, request.di, payload, E07)
        if isinstance(request, m.ReadFollowupRequest):
            chunks = self._followups.get(request.di)
            if not chunks:
                return m.AbnormalReply(addr, Function2007.READ_FOLLOWUP, error_word("no_data_requested"))
            chunk = chunks.pop(0)
            return m.ReadReply(addr, request.di, chunk, E07, followup=bool(chunks), seq=request.seq)
        if isinstance(request, m.ReadAddressRequest):
            return m.ReadAddressReply(addr)
        if isinstance(request, m.RelayControlRequest):
            return self._relay(request, now)
        if isinstance(request, m.BroadcastTime):
            return None
        if isinstance(request, m.FreezeRequest):
            return m.Ack(addr, Function2007.FREEZE)
        if isinstance(request, m.ChangeBaudRequest):
            return m.ChangeBaudReply(addr, request.baud)
        if isinstance(request, m.WriteRequest):
            if request.password != self.password:
                return m.AbnormalReply(addr, Function2007.WRITE_DATA, error_word("password_error_or_unauthorized"))
            return m.Ack(addr, Function2007.WRITE_DATA)
        fn = request.frame().control & 0x1F
        return m.AbnormalReply(addr, fn, error_word("other_error"))

    def _relay(self, request: m.RelayControlRequest, now: datetime) -> m.Message:
        addr, fn = self.address, Function2007.RELAY_CONTROL
        if request.password != self.password:
            return m.AbnormalReply(addr, fn, error_word("password_error_or_unauthorized"))
        if request.valid_until < now.replace(microsecond=0):
            # an expired command must never act: a trip decided yesterday is not a trip for today
            return m.AbnormalReply(addr, fn, error_word("other_error"))
        action = request.action
        if action == RelayAction.TRIP:
            if self.keep_power:
                return m.AbnormalReply(addr, fn, error_word("other_error"))
            self._set_relay(True, now)
            self.close_allowed_pending = False
        elif action == RelayAction.DIRECT_CLOSE:
            self._set_relay(False, now)
            self.close_allowed_pending = False
        elif action == RelayAction.CLOSE_ALLOWED:
            self.relay_command_open = False
            self.close_allowed_pending = True
        elif action == RelayAction.ALARM:
            self.pre_trip_alarm = True
        elif action == RelayAction.ALARM_RELEASE:
            self.pre_trip_alarm = False
        elif action == RelayAction.KEEP_POWER:
            self.keep_power = True
            self._set_relay(False, now)
        elif action == RelayAction.KEEP_POWER_RELEASE:
            self.keep_power = False
        self.relay_log.append((now, action.label, request.operator))
        return m.Ack(addr, fn)


def _served() -> dict:
    """DI -> how a meter computes its current value: the 2007 items this simulator serves."""
    out: dict[int, Callable[[SimMeter], object]] = {
        0x00000000: lambda mt: mt.energy[0] - mt.reverse_energy[0]}
    for t, _ in enumerate(TARIFF_NAMES):
        out[0x00010000 | t << 8] = lambda mt, t=t: mt.energy[t]
        out[0x00020000 | t << 8] = lambda mt, t=t: mt.reverse_energy[t]
    out[0x0001FF00] = lambda mt: {f"forward_active_energy_{n}": mt.energy[t] for t, n in enumerate(TARIFF_NAMES)}
    for p in (1, 2, 3):
        out[0x02010000 | p << 8] = lambda mt: mt.voltage
        out[0x02020000 | p << 8] = lambda mt: mt.current_a()
        out[0x02030000 | p << 8] = lambda mt: (mt._power() / 3).quantize(Decimal("0.0001"))
    out[0x02030000] = lambda mt: mt._power()
    out[0x02800002] = lambda mt: Decimal("50.00")
    out[0x04000101] = lambda mt: (mt.last_update or datetime.now()).date()
    out[0x04000102] = lambda mt: (mt.last_update or datetime.now()).time().replace(microsecond=0)
    out[0x04000401] = out[0x04000402] = lambda mt: mt.address
    out[0x04000501] = out[0x04000502] = lambda mt: {}
    out[0x04000503] = SimMeter._status3
    for w in (4, 5, 6, 7):
        out[0x04000500 | w] = lambda mt: {}
    out[0x00900200] = lambda mt: max(mt.remaining_amount, Decimal("0.00"))
    out[0x00900201] = lambda mt: max(-mt.remaining_amount, Decimal("0.00"))
    return out


_SERVED = _served()
#: (DI, the dict value's items) -> encoded payload, across meters
_SHARED_PAYLOADS: dict[tuple, bytes] = {}


def fleet_addresses(first: str | int, count: int) -> list[str]:
    start = int(first)
    if start + count - 1 > 999_999_999_999:
        raise ValueError("address range runs past 999999999999")
    return [f"{a:012d}" for a in range(start, start + count)]


def make_meters(first: str | int, count: int, *, faults: Faults | None = None, seed: int = 0,
                power_kw: float | None = None) -> list[SimMeter]:
    rng = random.Random(seed)
    meters = []
    for address in fleet_addresses(first, count):
        per_tariff = [Decimal(rng.randrange(0, 1_500_000)) / 100 for _ in range(4)]
        meters.append(SimMeter(
            address=address,
            power_kw=power_kw if power_kw is not None else round(rng.uniform(0.4, 3.0), 3),
            remaining_amount=Decimal(rng.randrange(0, 30000)) / 100,
            energy=[sum(per_tariff, Decimal("0.00"))] + per_tariff,
            faults=faults or Faults(),
            seed=seed * 1_000_003 + int(address),
        ))
    return meters

