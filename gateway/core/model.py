"""The domain's plain data: accounts, meters, money, and the events the engine consumes.

Units, everywhere in the core (integers, never float):

* money: **fen** (0.01 yuan); exact per-reading costs in **micro-fen** (1e-6 fen), so
  rounding to the fen happens once, on the cumulative total, and never accumulates;
* energy: **Wh** (DL/T 645 registers count 0.01 kWh = 10 Wh, so the conversion is exact);
* prices: **milli-fen per kWh** (0.4883 yuan/kWh = 48 830); Wh x milli-fen/kWh = micro-fen;
* time: integer **epoch seconds** (UTC); calendars (tier years, windows) use the configured zone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import Enum

UFEN_PER_FEN = 1_000_000


class CustomerClass(str, Enum):
    RESIDENTIAL = "residential"
    COMMERCIAL = "commercial"
    VIP = "vip"  # large accounts: never tripped automatically
    PROTECTED = "protected"  # life support, critical public services: never tripped automatically

    @property
    def auto_trip_allowed(self) -> bool:
        return self not in (CustomerClass.VIP, CustomerClass.PROTECTED)


class CostControlMode(str, Enum):
    REMOTE = "remote"  # the gateway computes the balance from readings x tariff
    LOCAL = "local"  # the meter keeps its own purse; the gateway reads it


class MoneyError(ValueError):
    pass


def yuan_to_fen(value: str | Decimal | int) -> int:
    """'12.34' -> 1234. Refuses fractions of a fen and anything that is not a number (never float)."""
    if isinstance(value, float):
        raise MoneyError(f"money must not be a float ({value!r}): give a string or Decimal")
    try:
        d = Decimal(value)
    except (InvalidOperation, TypeError):
        raise MoneyError(f"{value!r} is not an amount of money") from None
    if not d.is_finite():
        raise MoneyError(f"{value!r} is not an amount of money")
    fen = d * 100
    if fen != fen.to_integral_value():
        raise MoneyError(f"{value} has fractions of a fen")
    return int(fen)



def price_to_mfen(yuan_per_kwh: str | Decimal) -> int:
    """'0.4883' yuan/kWh -> 48830 milli-fen/kWh (five decimals of a yuan are exact)."""
    if isinstance(yuan_per_kwh, float):
        raise MoneyError("prices must not be floats: give a string or Decimal")
    d = Decimal(yuan_per_kwh) * 100_000
    if d != d.to_integral_value():
        raise MoneyError(f"price {yuan_per_kwh} has more than five decimals")
    return int(d)


def kwh_to_wh(kwh: str | Decimal) -> int:
    d = Decimal(kwh) * 1000
    if d != d.to_integral_value():
        raise ValueError(f"{kwh} kWh is not a whole number of Wh")
    return int(d)




def _require_int(what: str, **values) -> None:
    for name, value in values.items():
        if type(value) is not int:  # not bool, not float, not Decimal: fen and seconds are whole numbers
            raise MoneyError(f"{what}: {name} must be a whole number (int), got {value!r}")


@dataclass(frozen=True)
class Account:
    account_id: str
    customer_class: CustomerClass = CustomerClass.RESIDENTIAL
    mode: CostControlMode = CostControlMode.REMOTE
    tariff_id: str = "residential"
    area: str = ""
    name: str = ""
    address: str = ""
    lat: float | None = None  # GPS for field crews; not money, so float is fine
    lon: float | None = None
    channels: tuple[str, ...] = ("sms",)  # notice channels in order
    contacts: dict = field(default_factory=dict)  # channel -> address (phone, e-mail, ...)
    overdraft_limit_fen: int = 0  # trip at -overdraft (0: trip at zero)


@dataclass(frozen=True)
class Meter:
    meter_id: str  # the DL/T 645 address or the Modbus/MQTT identity
    account_id: str
    protocol: str = "dlt645"
    channel: str = ""  # e.g. tcp://10.1.2.3:6001, serial:///dev/ttyS1
    max_kw: int = 60  # readings implying more than this are implausible and held
    # how a reconnect succeeds: "direct" (the relay closes) or "close_allowed" (the customer presses the button)
    reconnect_mode: str = "direct"

    def __post_init__(self) -> None:
        if self.reconnect_mode not in ("direct", "close_allowed"):
            raise ValueError(f"meter {self.meter_id}: reconnect_mode {self.reconnect_mode!r}; "
                             f"allowed: direct, close_allowed")


# ----------------------------------------------------------------------- events


@dataclass(frozen=True)
class Payment:
    payment_id: str  # idempotency key from billing
    account_id: str
    amount_fen: int
    paid_at: int
    channel: str = ""

    def __post_init__(self) -> None:
        _require_int(f"payment {self.payment_id}", amount_fen=self.amount_fen, paid_at=self.paid_at)
        if not self.payment_id:
            raise MoneyError("payment id is empty")
        if self.amount_fen <= 0:
            raise MoneyError(f"payment {self.payment_id}: amount must be positive, got {self.amount_fen} fen")


@dataclass(frozen=True)
class Adjustment:
    """An operator's correction (positive credits the customer) or a refund (negative)."""

    adjustment_id: str
    account_id: str
    amount_fen: int
    at: int
    operator: str
    reason: str
    kind: str = "adjustment"  # or "refund"

    def __post_init__(self) -> None:
        _require_int(f"{self.kind} {self.adjustment_id}", amount_fen=self.amount_fen, at=self.at)
        if not self.operator:
            raise MoneyError(f"{self.kind} {self.adjustment_id}: an authorised operator is required")
        if not self.reason.strip():
            raise MoneyError(f"{self.kind} {self.adjustment_id}: a reason is required")
        if self.amount_fen == 0:
            raise MoneyError(f"{self.kind} {self.adjustment_id}: amount is zero")
        if self.kind == "refund" and self.amount_fen > 0:
            raise MoneyError(f"refund {self.adjustment_id}: a refund takes money out, give a negative amount")
        if self.kind not in ("adjustment", "refund"):
            raise MoneyError(f"unknown adjustment kind {self.kind!r}; allowed: adjustment, refund")


@dataclass(frozen=True)
class RelayStateChanged:
    """A verified read-back of a meter's relay (the only thing that says a relay moved)."""

    meter_id: str
    open: bool
    at: int
    commanded_open: bool | None = None  # the position last commanded, where the meter reports it
    keep_power: bool = False  # 保电: the meter refuses trips


@dataclass(frozen=True)
class MeterReplaced:
    """A new meter on the account: its registers start a new baseline; nothing is charged across the swap."""

    meter_id: str
    at: int
    registers_wh: tuple[int, int, int, int, int]  # total, sharp, peak, flat, valley
