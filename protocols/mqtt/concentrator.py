"""The southbound contract with MQTT concentrators and 4G DTUs: topics and payloads, v1. Sans-I/O.

A concentrator (or a DTU) keeps one MQTT connection and serves the meters on its RS-485 bus, in one of two
modes:

* ``frame`` (transparent): the gateway sends DL/T 645 frames, the concentrator puts them on its bus and
  returns whatever the bus answered, byte for byte. The gateway speaks DL/T 645 end to end.
* ``json``: the gateway sends commands (read these items of that meter; trip or close that meter's relay)
  and the concentrator does the DL/T 645 exchange itself and answers with a typed response.

Topic tree (``ROOT`` = ``feikong/v1/concentrator``, ``{cid}`` the concentrator's id)::

    ROOT/{cid}/status       concentrator -> gateway  Status     QoS 1, retained; the last will says offline
    ROOT/{cid}/down/frame   gateway -> concentrator  FrameDown  QoS 1   (frame mode)
    ROOT/{cid}/up/frame     concentrator -> gateway  FrameUp    QoS 1   (frame mode)
    ROOT/{cid}/down/cmd     gateway -> concentrator  ReadCommand | RelayCommand   QoS 1   (json mode)
    ROOT/{cid}/up/resp      concentrator -> gateway  Response   QoS 1   (json mode)

Every request carries an ``id``; its replies carry the same ``id``. QoS 1 may deliver a message twice and a
reply may come after the gateway gave up on it: the gateway takes the first reply to the request it is
waiting for and drops everything else (duplicates, late replies, replies from before a restart). A
concentrator answers a repeated command id with its first answer and does not act twice.

Payloads are JSON, decoded with msgspec Structs that validate as they decode; unknown fields in what a
concentrator sends are ignored (firmware may add some), unknown fields in what the gateway sends are refused
by the simulator. Money and energy are decimal strings, never floats.
"""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct

ROOT = "feikong/v1/concentrator"

STATUS = "status"
DOWN_FRAME = "down/frame"
UP_FRAME = "up/frame"
DOWN_CMD = "down/cmd"
UP_RESP = "up/resp"
KINDS = (STATUS, DOWN_FRAME, UP_FRAME, DOWN_CMD, UP_RESP)

#: what the gateway subscribes to: every concentrator's status and replies
GATEWAY_SUBSCRIPTIONS = (f"{ROOT}/+/{STATUS}", f"{ROOT}/+/up/+")

Mode = Literal["frame", "json"]

Cid = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                          description="a concentrator id: letters, digits, '_', '.', '-'")]
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[^\s#+/]+$",
                         description="a message id: no spaces and no MQTT wildcard or level characters")]
Address = Annotated[str, Meta(pattern=r"^[0-9]{12}$", description="a DL/T 645 meter address, 12 digits")]
#: a DL/T 645 frame (or whatever the bus carried) in hex; a frame is at most 12 + 200 data bytes plus preamble
Hex = Annotated[str, Meta(min_length=2, max_length=1024, pattern=r"^([0-9A-Fa-f]{2})+$")]
Instant = Annotated[datetime, Meta(tz=True, description="RFC 3339 date-time with its offset")]
Text = Annotated[str, Meta(max_length=500)]


def _is_valid(value: str, kind) -> bool:
    try:
        msgspec.convert(value, kind)
        return True
    except msgspec.ValidationError:
        return False


# --------------------------------------------------------------------------- topics


def topic(cid: str, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown concentrator topic kind {kind!r}")
    if not _is_valid(cid, Cid):
        raise ValueError(f"concentrator id {cid!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return f"{ROOT}/{cid}/{kind}"


def parse_topic(name: str) -> tuple[str, str] | None:
    """``(cid, kind)`` of a concentrator topic, or None for anything else."""
    prefix = ROOT + "/"
    if not name.startswith(prefix):
        return None
    cid, _, kind = name[len(prefix):].partition("/")
    if kind not in KINDS or not _is_valid(cid, Cid):
        return None
    return cid, kind


# --------------------------------------------------------------------------- payloads


class Status(Struct, frozen=True, omit_defaults=True):
    """Retained on ``status``. ``session`` is new on every connection and the last will carries the same one:
    an offline for a session that is not the current one is stale (the old connection died after the new one
    was up) and changes nothing."""

    state: Literal["online", "offline"]
    session: Id
    mode: Mode | None = None
    at: Instant | None = None  # when the concentrator said it (absent in the last will: set at connect)
    meters: int | None = None  # how many meters it serves
    firmware: Annotated[str, Meta(max_length=64)] = ""


class FrameDown(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Bytes for the concentrator's bus. ``expires_at``: not put on the bus after this (the gateway gave up)."""

    id: Id
    hex: Hex
    expires_at: Instant | None = None


class FrameUp(Struct, frozen=True, omit_defaults=True):
    """What the bus carried after the request ``id`` (one reply frame, usually); ``seq`` numbers the pieces
    when the concentrator splits what it heard into several messages."""

    id: Id
    hex: Hex
    seq: Annotated[int, Meta(ge=0, le=255)] = 0


#: the data items a json-mode read may ask for (the gateway's names for them)
Item = Literal["forward_active_energy_block", "voltage_a", "remaining_amount", "overdraft_amount",
               "status_word_3"]
ITEMS: tuple[str, ...] = Item.__args__  # type: ignore[attr-defined]

RelayOp = Literal["trip", "direct_close", "close_allowed"]


class ReadCommand(Struct, frozen=True, tag="read", tag_field="op", forbid_unknown_fields=True, omit_defaults=True):
    id: Id
    meter: Address
    items: Annotated[list[Item], Meta(min_length=1, max_length=len(ITEMS))]
    expires_at: Instant | None = None


class RelayCommand(Struct, frozen=True, tag="relay", tag_field="op", forbid_unknown_fields=True,
                   omit_defaults=True):
    """Relay control (DL/T 645 command 1C). ``valid_until`` goes into the frame: the meter ignores the command
    after it, by its own clock (the concentrator converts it to the meter's local time)."""

    id: Id
    meter: Address
    action: RelayOp
    valid_until: Instant
    expires_at: Instant | None = None


Command = Union[ReadCommand, RelayCommand]

Kwh = Annotated[Decimal, Meta(description="kWh as a decimal string, 2 decimals")]
Yuan = Annotated[Decimal, Meta(description="yuan as a decimal string, 2 decimals")]


class EnergyBlock(Struct, frozen=True):
    """Forward active energy, total and per tariff (kWh)."""

    total: Kwh
    sharp: Kwh
    peak: Kwh
    flat: Kwh
    valley: Kwh


class RelayWord(Struct, frozen=True):
    """Run status word 3, the bits that matter: the contact, the commanded position, keep-power (保电)."""

    relay: Literal["open", "closed"]
    relay_command: Literal["open", "closed"]
    keep_power: bool = False


class Values(Struct, frozen=True, omit_defaults=True):
    forward_active_energy_block: EnergyBlock | None = None
    voltage_a: Annotated[Decimal, Meta(description="volts")] | None = None
    remaining_amount: Yuan | None = None
    overdraft_amount: Yuan | None = None
    status_word_3: RelayWord | None = None


ResponseStatus = Literal["ok", "refused", "no_answer", "bad_reply", "rejected"]


class Response(Struct, frozen=True, omit_defaults=True):
    """The answer to one command.

    ``ok``: the read was done (``values``; items the meter could not give are in ``errors``), or the meter
    acknowledged the relay command. ``refused``: the meter answered with an abnormal reply (``error_words``).
    ``no_answer``: the meter did not answer on the bus (a relay command's outcome is unknown). ``bad_reply``:
    something answered that could not be used (outcome unknown). ``rejected``: the concentrator did not put
    anything on the bus (expired, unknown meter, busy): nothing happened.
    """

    id: Id
    status: ResponseStatus
    values: Values | None = None
    errors: dict[str, Text] = {}
    error_words: list[Annotated[str, Meta(max_length=64)]] = []
    detail: Text = ""


class _IdOnly(Struct):
    id: Id


# --------------------------------------------------------------------------- encode / decode

_enc = msgspec.json.Encoder()
_status = msgspec.json.Decoder(Status)
_frame_down = msgspec.json.Decoder(FrameDown)
_frame_up = msgspec.json.Decoder(FrameUp)
_command = msgspec.json.Decoder(Command)
_response = msgspec.json.Decoder(Response)
_id_only = msgspec.json.Decoder(_IdOnly)


class PayloadError(ValueError):
    """A payload that does not follow the contract; ``reason`` says why (for the log)."""


def encode(message: Struct) -> bytes:
    return _enc.encode(message)


def _decode(decoder, payload: bytes, what: str):
    try:
        return decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise PayloadError(f"bad {what}: {exc}") from None


def decode_status(payload: bytes) -> Status:
    return _decode(_status, payload, "status")


def decode_frame_down(payload: bytes) -> FrameDown:
    return _decode(_frame_down, payload, "down frame")


def decode_frame_up(payload: bytes) -> FrameUp:
    return _decode(_frame_up, payload, "up frame")


def decode_command(payload: bytes) -> Command:
    return _decode(_command, payload, "command")


def decode_response(payload: bytes) -> Response:
    return _decode(_response, payload, "response")


def salvage_id(payload: bytes) -> str | None:
    """The ``id`` of a payload that failed to decode, if it has a usable one: the request it answers can then
    fail at once, instead of waiting out its timeout."""
    try:
        return _id_only.decode(payload).id
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def frame_down(id: str, data: bytes, expires_at: datetime | None = None) -> FrameDown:
    return FrameDown(id, data.hex().upper(), expires_at)


def frame_up(id: str, data: bytes, seq: int = 0) -> FrameUp:
    return FrameUp(id, data.hex().upper(), seq)


def instant(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


# --------------------------------------------------------------------------- values <-> the gateway's vocabulary

_TARIFFS = ("total", "sharp", "peak", "flat", "valley")


def values_to_items(values: Values) -> dict:
    """Response values -> what the DL/T 645 decoder gives for the same data items (the gateway's vocabulary)."""
    out: dict = {}
    if values.forward_active_energy_block is not None:
        block = values.forward_active_energy_block
        out["forward_active_energy_block"] = {f"forward_active_energy_{t}": getattr(block, t) for t in _TARIFFS}
    for name in ("voltage_a", "remaining_amount", "overdraft_amount"):
        if getattr(values, name) is not None:
            out[name] = getattr(values, name)
    if values.status_word_3 is not None:
        w = values.status_word_3
        out["status_word_3"] = {"relay": w.relay, "relay_command": w.relay_command, "keep_power": w.keep_power}
    return out


def items_to_values(items: dict) -> Values:
    """The DL/T 645 decoder's values (by item name) -> response values; items not in the contract are left out."""
    kw: dict = {}
    block = items.get("forward_active_energy_block")
    if block is not None:
        kw["forward_active_energy_block"] = EnergyBlock(
            *(Decimal(block[f"forward_active_energy_{t}"]) for t in _TARIFFS))
    for name in ("voltage_a", "remaining_amount", "overdraft_amount"):
        if items.get(name) is not None:
            kw[name] = Decimal(items[name])
    word = items.get("status_word_3")
    if word is not None:
        kw["status_word_3"] = RelayWord(word["relay"], word["relay_command"], bool(word.get("keep_power")))
    return Values(**kw)


__all__ = ["ROOT", "STATUS", "DOWN_FRAME", "UP_FRAME", "DOWN_CMD", "UP_RESP", "GATEWAY_SUBSCRIPTIONS", "ITEMS",
           "Status", "FrameDown", "FrameUp", "ReadCommand", "RelayCommand", "Command", "Response", "Values",
           "EnergyBlock", "RelayWord", "PayloadError", "topic", "parse_topic", "encode", "decode_status",
           "decode_frame_down", "decode_frame_up", "decode_command", "decode_response", "salvage_id",
           "frame_down", "frame_up", "instant", "values_to_items", "items_to_values"]
