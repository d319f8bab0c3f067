"""The northbound contract with billing, notification and work-order systems: topics and payloads, v1.

Sans-I/O: topic names, typed payloads (msgspec Structs, which validate as they decode), and the decode and
encode functions. The gateway's MQTT bridge and the billing simulator both use this module; the JSON
Schemas in ``protocols/mqtt/schemas/`` are generated from these Structs (``python -m protocols.mqtt.billing
--write-schemas``) and a test keeps them equal.

Topic tree (``ROOT`` = ``feikong/v1``)::

    ROOT/in/payments          billing -> gateway   Payment          QoS 1, acknowledged after commit
    ROOT/in/notice-receipts   notifier -> gateway  NoticeReceipt
    ROOT/in/field-updates     work orders -> gw    FieldUpdate
    ROOT/in/area-flags        operations -> gw     AreaFlag         extreme weather, disaster: no trips there
    ROOT/in/forecasts         weather -> gw        Forecast
    ROOT/in/tariffs           billing -> gateway   TariffChange
    ROOT/out/<group>/<kind>   gateway -> all       Event            group: readings, balances, payments,
                                                                    notices, cases, relay, orders
    ROOT/dead-letter          gateway -> all       Event(kind=dead_letter, data=DeadLetter)
    ROOT/status/<instance>    gateway, retained    Status           last will: state "offline"

Every inbound message carries its own idempotency key (``payment_id``, ``receipt_id``, ...); every event
out carries a unique ``id`` for consumers to de-duplicate on (QoS 1 may deliver twice).
"""
from __future__ import annotations

import base64
import inspect
import json
import sys
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

ROOT = "feikong/v1"
IN = f"{ROOT}/in"
OUT = f"{ROOT}/out"
DEAD_LETTER = f"{ROOT}/dead-letter"
STATUS = f"{ROOT}/status"

#: a character of an identifier: no whitespace, no control character (a NUL cannot be stored in PostgreSQL text)
ID_CHAR = r"[^\s\x00-\x1f\x7f]"
#: a character of free text: no control character but tab and newlines
TEXT_CHAR = r"[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"

Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=f"^{ID_CHAR}+$",
                         description="an identifier: 1 to 128 characters, no spaces or control characters")]
#: money as a decimal string in yuan, never a float: at most two decimals (fen)
Yuan = Annotated[str, Meta(pattern=r"^[0-9]{1,10}(\.[0-9]{1,2})?$", examples=["50.00"],
                           description="yuan as a decimal string with at most two decimals")]
Price = Annotated[str, Meta(pattern=r"^[0-9]{1,4}(\.[0-9]{1,5})?$", examples=["0.4883"],
                            description="yuan per kWh as a decimal string, at most five decimals")]
Instant = Annotated[datetime, Meta(tz=True, description="RFC 3339 date-time with its offset")]
#: free text: no control characters but tab and newlines (a NUL cannot be stored in PostgreSQL text)
Text = Annotated[str, Meta(max_length=500, pattern=f"^{TEXT_CHAR}*$")]
Name = Annotated[str, Meta(max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")]


class _In(Struct, forbid_unknown_fields=True, frozen=True):
    """Inbound payloads refuse unknown fields: a misspelt field is an error, not a silently lost value."""


class Payment(_In):
    """A payment that cleared at the billing system; ``payment_id`` is its idempotency key."""

    payment_id: Id
    account: Id
    amount: Yuan
    paid_at: Instant
    channel: Name = ""  # counter, bank, wechat, alipay, ...

    @property
    def amount_fen(self) -> int:
        return yuan_to_fen(self.amount)


class NoticeReceipt(_In):
    """What a notification channel reports for one notice request (the ``request_id`` of notice_request)."""

    receipt_id: Id
    request_id: Id
    outcome: Literal["delivered", "failed", "empty"]
    at: Instant
    detail: Text = ""


class FieldUpdate(_In):
    update_id: Id
    order_id: Id
    status: Literal["accepted", "on_site", "completed", "failed"]
    at: Instant
    crew: Name = ""
    note: Text = ""


class AreaFlag(_In):
    """While active, no automatic trips in the area (extreme weather, disaster, a civil event)."""

    flag_id: Id
    area: Id
    flag: Id  # e.g. extreme_weather
    active: bool
    since: Instant
    until: Instant | None = None
    actor: Name = ""
    reason: Text = ""


class Forecast(_In):
    forecast_id: Id
    area: Id
    day: date
    min_c: Annotated[float, Meta(ge=-90, le=70)]
    max_c: Annotated[float, Meta(ge=-90, le=70)]


class Tier(_In):
    from_kwh: Annotated[int, Meta(ge=0)]
    surcharge: Price = "0"


class TariffVersion(_In):
    effective_from: Instant
    kind: Literal["flat", "tou"]
    price: Price | None = None  # flat
    prices: dict[Literal["sharp", "peak", "flat", "valley"], Price] | None = None  # time of use
    tiers: list[Tier] | None = None


class TariffChange(_In):
    """The whole version list of one tariff (versions already in force must be repeated unchanged)."""

    change_id: Id
    tariff_id: Id
    versions: Annotated[list[TariffVersion], Meta(min_length=1)]

    def as_config(self) -> dict:
        """In the shape of config/tariffs.example.json, for ``gateway.core.tariff.tariffs_from_config``."""
        out = []
        for v in self.versions:
            item: dict[str, Any] = {"effective_from": int(v.effective_from.timestamp()), "kind": v.kind}
            if v.price is not None:
                item["price"] = v.price
            if v.prices is not None:
                item["prices"] = dict(v.prices)
            if v.tiers is not None:
                item["tiers"] = [{"from_kwh": t.from_kwh, "surcharge": t.surcharge} for t in v.tiers]
            out.append(item)
        return {self.tariff_id: out}


Inbound = Union[Payment, NoticeReceipt, FieldUpdate, AreaFlag, Forecast, TariffChange]

#: inbound topic -> payload type
INBOUND: dict[str, type] = {
    f"{IN}/payments": Payment,
    f"{IN}/notice-receipts": NoticeReceipt,
    f"{IN}/field-updates": FieldUpdate,
    f"{IN}/area-flags": AreaFlag,
    f"{IN}/forecasts": Forecast,
    f"{IN}/tariffs": TariffChange,
}


# --------------------------------------------------------------------------------------------- outbound


class Event(Struct, frozen=True):
    """Every event out: ``id`` is unique (de-duplicate on it), ``seq`` orders one gateway's events."""

    id: str
    kind: str
    subject: str  # the account, meter or message the event is about
    at: Instant
    seq: int
    instance: str
    data: dict[str, Any]


class PaymentAppliedRow(Struct, frozen=True, array_like=True):
    """One payment committed, as an array: [payment_id, account, amount, balance] (yuan; the balance the
    account had once the batch holding this payment was applied)."""

    payment_id: str
    account: str
    amount: str
    balance: str


class PaymentsApplied(Struct, frozen=True):
    """Payments committed together (``kind`` = ``payments_applied``): billing's confirmation of each."""

    rows: list[PaymentAppliedRow]


class RelayCommand(Struct, frozen=True, forbid_unknown_fields=True):
    """The data of every relay_* event: the command as it stands after the change the event names."""

    command_id: str
    account_id: str
    action: Literal["trip", "close"]
    mode: Literal["direct", "close_allowed"]
    state: str  # queued, sending, verifying, confirmed, retry_wait, failed, dispatched, cancelled, blocked
    actor: str
    reason: str
    attempts: int
    outcome: str
    error: str
    deadline_at: float | None  # reconnects: the payment time plus the limit (epoch s)
    order_id: str | None  # the field order, once there is one


class ReadingRow(Struct, frozen=True, array_like=True):
    """One accepted reading as an array: [meter, taken_at (epoch s), total_wh, account balance_fen after it]."""

    meter: str
    taken_at: int
    total_wh: int
    balance_fen: int


class Readings(Struct, frozen=True):
    """A poll batch of accepted readings (``kind`` = ``readings``)."""

    rows: list[ReadingRow]


class BalanceRow(Struct, frozen=True, array_like=True):
    """[account, balance_fen, band] with band one of normal, warning_1, warning_2, trip."""

    account: str
    balance_fen: int
    band: str


class Balances(Struct, frozen=True):
    rows: list[BalanceRow]


class DeadLetter(Struct, frozen=True):
    """A message the gateway could not use, with why, and the original as sent (text, or base64)."""

    topic: str
    reason: str
    payload: str
    encoding: Literal["utf-8", "base64"]


class Status(Struct, frozen=True):
    instance: str
    state: Literal["online", "offline"]
    at: Instant
    version: str = ""


#: outbound event kind -> topic group (by prefix; the first match wins)
_GROUPS = (("payments_", "payments"), ("readings", "readings"), ("balances", "balances"), ("notice_", "notices"),
           ("disconnect_case_", "cases"), ("trip_", "cases"), ("account_manager_task", "cases"),
           ("relay_", "relay"), ("close_withheld", "relay"), ("field_order_", "orders"))


def event_topic(kind: str) -> str:
    if kind == "dead_letter":
        return DEAD_LETTER
    for prefix, group in _GROUPS:
        if kind.startswith(prefix):
            return f"{OUT}/{group}/{kind}"
    return f"{OUT}/events/{kind}"


def status_topic(instance: str) -> str:
    return f"{STATUS}/{instance}"


# ------------------------------------------------------------------------------------------- codec

_decoders = {topic: msgspec.json.Decoder(kind) for topic, kind in INBOUND.items()}
_encoder = msgspec.json.Encoder()


class BadMessage(ValueError):
    """A message that cannot be used, and why (the text goes to the dead-letter topic)."""


def decode(topic: str, payload: bytes) -> Inbound:
    """Inbound bytes -> a typed payload, or BadMessage saying what was wrong and where."""
    decoder = _decoders.get(topic)
    if decoder is None:
        raise BadMessage(f"no such inbound topic {topic!r} (known: {', '.join(sorted(INBOUND))})")
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise BadMessage(f"invalid {INBOUND[topic].__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadMessage(f"not JSON: {exc}") from None


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def yuan_to_fen(amount: str) -> int:
    """'50.05' -> 5005, exactly (the pattern has already allowed at most two decimals)."""
    return int(Decimal(amount) * 100)


def fen_to_yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def dead_letter(topic: str, payload: bytes, reason: str) -> DeadLetter:
    try:
        return DeadLetter(topic, reason, payload.decode("utf-8"), "utf-8")
    except UnicodeDecodeError:
        return DeadLetter(topic, reason, base64.b64encode(payload).decode("ascii"), "base64")


# ------------------------------------------------------------------------------------------- schemas

SCHEMA_DIR = Path(__file__).with_name("schemas")

#: schema file name -> the type it describes
SCHEMAS: dict[str, Any] = {
    "payment.json": Payment,
    "notice-receipt.json": NoticeReceipt,
    "field-update.json": FieldUpdate,
    "area-flag.json": AreaFlag,
    "forecast.json": Forecast,
    "tariff-change.json": TariffChange,
    "event.json": Event,
    "event-data-payments-applied.json": PaymentsApplied,
    "event-data-relay.json": RelayCommand,
    "event-data-readings.json": Readings,
    "event-data-balances.json": Balances,
    "event-data-dead-letter.json": DeadLetter,
    "status.json": Status,
}


def schema(kind: Any) -> dict:
    out = msgspec.json.schema(kind)
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["$id"] = f"https://feikong.example/schemas/v1/{kind.__name__}"
    return out


def schema_text(kind: Any) -> str:
    return json.dumps(_clean_descriptions(schema(kind)), indent=2, sort_keys=True) + "\n"


def _clean_descriptions(node: Any) -> Any:
    """Docstrings as ``inspect.cleandoc`` gives them, whichever msgspec made the schema (0.23 began dedenting
    descriptions itself; older releases kept the indentation)."""
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean_descriptions(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_clean_descriptions(v) for v in node]
    return node


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(exist_ok=True)
    written = []
    for name, kind in SCHEMAS.items():
        path = directory / name
        path.write_text(schema_text(kind))
        written.append(path)
    return written


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-schemas"]:
        sys.exit("usage: python -m protocols.mqtt.billing --write-schemas")
    for p in write_schemas():
        print(p)
