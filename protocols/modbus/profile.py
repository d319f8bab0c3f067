"""Modbus meter register profiles: where a model keeps its energy, voltage, purse and relay; sans-I/O.

A profile is data (a TOML file): a list of *points* (a name the gateway knows, a table, an address, a type
and a scale) and, when the model has a remotely switched relay, the register or coil writes that trip and
close it. Everything here is a pure function over lists of ints (registers) or bools (coils): the asyncio
adapter (``gateway.southbound.modbus``) and the simulator (``simulators.modbus``) both drive from the same
profile file, so what the gateway reads is what the simulated meter serves.
"""
from __future__ import annotations

import math
import struct
import tomllib
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

#: the four Modbus tables: reading function code, and whether it holds bits or 16-bit registers
TABLES = {"coil": (1, True), "discrete": (2, True), "holding": (3, False), "input": (4, False)}
#: register types: number of registers, struct code (big-endian), signed
TYPES = {"u16": (1, "H"), "i16": (1, "h"), "u32": (2, "I"), "i32": (2, "i"), "f32": (2, "f"), "bit": (1, None)}

ENERGY_POINTS = ("energy_total", "energy_sharp", "energy_peak", "energy_flat", "energy_valley")
TOU_POINTS = ENERGY_POINTS[1:]
STATE_POINTS = ("relay_state", "relay_command", "keep_power")
#: every point a profile may define, with the unit its scaled value must be in (None: a state, no unit)
KNOWN_POINTS: dict[str, str | None] = {**{p: "kWh" for p in ENERGY_POINTS}, "voltage_a": "V",
                                       "remaining_amount": "yuan", "relay_state": None, "relay_command": None,
                                       "keep_power": None}
#: which gateway data item each point feeds (the reading vocabulary of ``gateway.southbound.readings``)
ITEM_OF = {**{p: "forward_active_energy_block" for p in ENERGY_POINTS}, "voltage_a": "voltage_a",
           "remaining_amount": "remaining_amount", **{p: "status_word_3" for p in STATE_POINTS}}
#: decimals a value is given with when it came from a float register (an f32 carries ~7 digits of noise)
_DECIMALS = {"kWh": 2, "V": 1, "yuan": 2}
RELAY_ACTIONS = ("trip", "close", "close_allowed")
WRITE_FUNCTIONS = {"write_register": ("holding", 6), "write_registers": ("holding", 16),
                   "write_coil": ("coil", 5)}
MAX_READ = {False: 125, True: 2000}  # the protocol's limits per read request: registers, bits


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


class ValueDecodeError(ValueError):
    """Registers that do not make a value of the point (a relay register holding neither position...)."""


@dataclass(frozen=True)
class Point:
    name: str
    table: str
    address: int
    type: str
    scale: Decimal = Decimal(1)
    word_order: str = "big"  # 32-bit values: "big" = high word first (most meters), "little" = low word first
    open_value: int | bool | None = None  # state points: the raw value meaning open / set
    closed_value: int | bool | None = None

    @property
    def count(self) -> int:
        return TYPES[self.type][0]

    @property
    def bits(self) -> bool:
        return TABLES[self.table][1]

    @property
    def unit(self) -> str | None:
        return KNOWN_POINTS[self.name]


@dataclass(frozen=True)
class RelayControl:
    function: str  # write_register / write_registers / write_coil
    address: int
    writes: dict[str, tuple]  # action -> the values written (ints for registers, one bool for a coil)

    @property
    def table(self) -> str:
        return WRITE_FUNCTIONS[self.function][0]


@dataclass(frozen=True)
class Profile:
    name: str  # the file's stem: what a gateway config names
    model: str
    source: str  # the public document the map comes from
    points: dict[str, Point]
    relay: RelayControl | None = None
    max_gap: int = 0  # registers a read may span over to merge two points into one request
    origin: str = ""  # the file it was loaded from, for messages

    @property
    def has_tou(self) -> bool:
        return all(p in self.points for p in TOU_POINTS)


@dataclass(frozen=True)
class ReadBlock:
    table: str
    start: int
    count: int
    points: tuple[Point, ...] = field(default=())

    @property
    def bits(self) -> bool:
        return TABLES[self.table][1]

    def slice(self, point: Point, raw: Sequence) -> list:
        offset = point.address - self.start
        return list(raw[offset : offset + point.count])


@dataclass(frozen=True)
class RelayWrite:
    function: str
    address: int
    values: tuple


# ------------------------------------------------------------------------------------------------ loading


def shipped() -> dict[str, Path]:
    """The profiles that come with the gateway: name -> file."""
    return {p.stem: p for p in sorted(PROFILES_DIR.glob("*.toml"))}


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (``hiking_dds238_2_znsr``) or any profile file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        known = shipped()
        if str(name_or_path) not in known:
            raise ProfileError(f"no shipped Modbus profile {str(name_or_path)!r}; shipped: {sorted(known)}")
        path = known[str(name_or_path)]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc}") from None
    return parse_profile(data, path.stem, str(path))


def parse_profile(data: Mapping[str, Any], name: str, origin: str = "<profile>") -> Profile:
    def fail(key: str, msg: str) -> ProfileError:
        return ProfileError(f"{origin}: {key}: {msg}")

    _only(data, {"meter", "points", "relay"}, "", fail)
    meter = data.get("meter")
    if not isinstance(meter, Mapping):
        raise fail("meter", "missing table [meter] (model, source)")
    _only(meter, {"model", "source", "max_gap"}, "meter.", fail)
    model, source = meter.get("model"), meter.get("source")
    for key, v in (("meter.model", model), ("meter.source", source)):
        if not isinstance(v, str) or not v.strip():
            raise fail(key, "required, a non-empty string")
    max_gap = meter.get("max_gap", 0)
    if not isinstance(max_gap, int) or isinstance(max_gap, bool) or not 0 <= max_gap <= 100:
        raise fail("meter.max_gap", f"must be an integer 0..100, not {max_gap!r}")
    raw_points = data.get("points")
    if not isinstance(raw_points, Mapping) or not raw_points:
        raise fail("points", "missing table [points.*]: at least points.energy_total")
    points = {pname: _point(pname, spec, fail) for pname, spec in raw_points.items()}
    if "energy_total" not in points:
        raise fail("points.energy_total", "required: the gateway charges from forward active energy")
    tou = [p for p in TOU_POINTS if p in points]
    if tou and len(tou) != len(TOU_POINTS):
        missing = [p for p in TOU_POINTS if p not in points]
        raise fail(f"points.{missing[0]}", f"time-of-use registers come as all four or none; missing {missing}")
    if "relay_command" in points and "relay_state" not in points:
        raise fail("points.relay_state", "required when points.relay_command is given")
    _check_overlaps(points, fail)
    relay = _relay(data["relay"], fail) if "relay" in data else None
    return Profile(name, model.strip(), source.strip(), points, relay, max_gap, origin)


def _only(table: Mapping, allowed: set[str], prefix: str, fail) -> None:
    for key in table:
        if key not in allowed:
            raise fail(f"{prefix}{key}", f"unknown key (expected one of {sorted(allowed)})")


def _address(v: Any, key: str, fail) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF:
        raise fail(key, f"must be a register address 0..65535 (0x0000..0xFFFF), not {v!r}")
    return v


def _point(pname: str, spec: Any, fail) -> Point:
    key = f"points.{pname}"
    if pname not in KNOWN_POINTS:
        raise fail(key, f"unknown point (expected one of {sorted(KNOWN_POINTS)})")
    if not isinstance(spec, Mapping):
        raise fail(key, "must be a table")
    _only(spec, {"table", "address", "type", "scale", "unit", "word_order", "open", "closed"}, f"{key}.", fail)
    table = spec.get("table")
    if table not in TABLES:
        raise fail(f"{key}.table", f"unknown table {table!r} (expected one of {sorted(TABLES)})")
    address = _address(spec.get("address"), f"{key}.address", fail)
    bits = TABLES[table][1]
    typ = spec.get("type", "bit" if bits else None)
    if typ not in TYPES:
        raise fail(f"{key}.type", f"unknown type {typ!r} (expected one of {sorted(TYPES)})")
    if bits != (typ == "bit"):
        raise fail(f"{key}.type", f"type {typ!r} does not fit table {table!r}: coils and discrete inputs are "
                                  f"bits, holding and input registers are u16/i16/u32/i32/f32")
    if address + TYPES[typ][0] - 1 > 0xFFFF:
        raise fail(f"{key}.address", "the value runs past register 65535")
    unit = KNOWN_POINTS[pname]
    if unit is not None:
        if spec.get("unit") != unit:
            raise fail(f"{key}.unit", f"must be {unit!r} (after scaling), not {spec.get('unit')!r}")
        if typ == "bit":
            raise fail(f"{key}.type", "a measured value cannot be a bit")
    elif "unit" in spec or "scale" in spec:
        raise fail(key, "a state point takes open/closed values, not unit or scale")
    try:
        scale = Decimal(str(spec.get("scale", "1")))
    except InvalidOperation:
        raise fail(f"{key}.scale", f"not a number: {spec.get('scale')!r}") from None
    if not scale.is_finite() or scale <= 0:
        raise fail(f"{key}.scale", f"must be a positive number, not {spec.get('scale')!r}")
    order = spec.get("word_order", "big")
    if order not in ("big", "little"):
        raise fail(f"{key}.word_order", f"must be 'big' or 'little', not {order!r}")
    open_v = closed_v = None
    if unit is None:
        # bits default to set = open; a register's values must be stated (models differ)
        open_v, closed_v = spec.get("open", True if bits else None), spec.get("closed", False if bits else None)
        want = bool if bits else int
        for k, v in (("open", open_v), ("closed", closed_v)):
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise fail(f"{key}.{k}", f"required, {'true/false' if bits else 'an integer'} "
                                         f"(the raw value meaning {'set' if pname == 'keep_power' else k})")
            if want is int and not _fits(v, typ):
                raise fail(f"{key}.{k}", f"{v} does not fit type {typ}")
        if open_v == closed_v:
            raise fail(f"{key}.closed", "must differ from open")
    return Point(pname, table, address, typ, scale, order, open_v, closed_v)


def _fits(v: int, typ: str) -> bool:
    if typ == "f32":
        return False
    n = TYPES[typ][0] * 16
    return (0 <= v < 2**n) if typ.startswith("u") else (-(2 ** (n - 1)) <= v < 2 ** (n - 1))


def _check_overlaps(points: dict[str, Point], fail) -> None:
    seen: dict[tuple[str, int], str] = {}
    for p in points.values():
        for a in range(p.address, p.address + p.count):
            other = seen.get((p.table, a))
            # a relay's state and command may be one register on some models; nothing else may share
            if other is not None and {other, p.name} != {"relay_state", "relay_command"}:
                raise fail(f"points.{p.name}.address", f"overlaps points.{other} in table {p.table!r}")
            seen[(p.table, a)] = p.name


def _relay(spec: Any, fail) -> RelayControl:
    if not isinstance(spec, Mapping):
        raise fail("relay", "must be a table")
    _only(spec, {"function", "address", *RELAY_ACTIONS}, "relay.", fail)
    function = spec.get("function")
    if function not in WRITE_FUNCTIONS:
        raise fail("relay.function", f"unknown function {function!r} (expected one of {sorted(WRITE_FUNCTIONS)})")
    address = _address(spec.get("address"), "relay.address", fail)
    writes: dict[str, tuple] = {}
    for action in RELAY_ACTIONS:
        if action not in spec:
            if action != "close_allowed":
                raise fail(f"relay.{action}", "required: the value(s) written to " + action)
            continue
        v = spec[action]
        if function == "write_coil":
            if not isinstance(v, bool):
                raise fail(f"relay.{action}", f"write_coil takes true or false, not {v!r}")
            writes[action] = (v,)
            continue
        values = v if isinstance(v, list) else [v]
        if not values or any(not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= 0xFFFF
                             for x in values):
            raise fail(f"relay.{action}", f"must be a register value 0..65535 or a list of them, not {v!r}")
        if function == "write_register" and len(values) != 1:
            raise fail(f"relay.{action}", "write_register writes exactly one register")
        if address + len(values) - 1 > 0xFFFF:
            raise fail(f"relay.{action}", "the write runs past register 65535")
        writes[action] = tuple(values)
    if writes["trip"] == writes["close"]:
        raise fail("relay.close", "must differ from relay.trip")
    return RelayControl(function, address, writes)


# ------------------------------------------------------------------------------------------- decoding


def read_plan(profile: Profile, names: Iterable[str] | None = None) -> list[ReadBlock]:
    """The read requests that fetch ``names`` (default: every point): points in one table merged into one
    request when at most ``profile.max_gap`` unread registers lie between them, within the protocol's limits."""
    wanted = [profile.points[n] for n in (names if names is not None else profile.points) if n in profile.points]
    blocks: list[ReadBlock] = []
    for table in TABLES:
        pts = sorted((p for p in wanted if p.table == table), key=lambda p: (p.address, p.name))
        cur: list[Point] = []
        start = end = 0
        for p in pts:
            p_end = p.address + p.count
            if cur and p.address - end <= profile.max_gap and max(end, p_end) - start <= MAX_READ[p.bits]:
                cur.append(p)
                end = max(end, p_end)
                continue
            if cur:
                blocks.append(ReadBlock(table, start, end - start, tuple(cur)))
            cur, start, end = [p], p.address, p_end
        if cur:
            blocks.append(ReadBlock(table, start, end - start, tuple(cur)))
    return blocks


def _words(point: Point, regs: Sequence[int]) -> bytes:
    if len(regs) != point.count:
        raise ValueDecodeError(f"{point.name}: {len(regs)} registers, the type {point.type} needs {point.count}")
    words = list(regs) if point.word_order == "big" else list(reversed(regs))
    return b"".join(int(w & 0xFFFF).to_bytes(2, "big") for w in words)


def decode_raw(point: Point, regs: Sequence) -> int | float | bool:
    if point.type == "bit":
        if len(regs) != 1:
            raise ValueDecodeError(f"{point.name}: expected one bit, got {len(regs)}")
        return bool(regs[0])
    return struct.unpack(">" + TYPES[point.type][1], _words(point, regs))[0]


def decode(point: Point, regs: Sequence) -> Decimal | bool:
    """Registers (or one bit) -> the point's value: a Decimal in its unit, or for a state point True when
    the raw value is the ``open`` (set) one and False when it is the ``closed`` one."""
    raw = decode_raw(point, regs)
    if point.unit is None:
        if raw == point.open_value:
            return True
        if raw == point.closed_value:
            return False
        raise ValueDecodeError(f"{point.name}: raw value {raw!r} is neither open ({point.open_value!r}) "
                               f"nor closed ({point.closed_value!r})")
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ValueDecodeError(f"{point.name}: register holds {raw}")
        # the float's own noise below the meter's resolution is not a value
        places = Decimal(1).scaleb(-_DECIMALS[point.unit])
        return (Decimal(repr(raw)) * point.scale).quantize(places)
    return Decimal(raw) * point.scale


def encode(point: Point, value: Decimal | bool | int) -> list:
    """The inverse of :func:`decode` (for simulators and tests): value -> registers (or one bit). Measured
    values are truncated to the register's resolution like a meter's counters."""
    if point.unit is None:
        raw = point.open_value if value else point.closed_value
        return [bool(raw)] if point.type == "bit" else _pack(point, raw)
    if point.type == "f32":
        return _pack(point, float(Decimal(value) / point.scale))
    raw = int((Decimal(value) / point.scale).to_integral_value(ROUND_DOWN))
    if not _fits(raw, point.type):
        raise ValueError(f"{point.name}: {value} is out of range for {point.type} at scale {point.scale}")
    return _pack(point, raw)


def _pack(point: Point, raw) -> list[int]:
    data = struct.pack(">" + TYPES[point.type][1], raw)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    return words if point.word_order == "big" else list(reversed(words))


def to_items(profile: Profile, decoded: Mapping[str, Decimal | bool]) -> dict[str, Any]:
    """Decoded points -> the gateway's data items. An item is present only when every point it needs was
    read: a half-read energy block would look like consumption on some registers and none on others."""
    items: dict[str, Any] = {}
    if all(p in decoded for p in ENERGY_POINTS if p in profile.points):
        total = decoded["energy_total"]
        if profile.has_tou:
            tou = {p: decoded[p] for p in TOU_POINTS}
        else:
            # a total-only meter: its energy is priced as the flat period, so a time-of-use tariff charges it
            # the flat rate (never nothing: zero in every period would price all of it at zero)
            tou = {"energy_sharp": Decimal(0), "energy_peak": Decimal(0), "energy_flat": total,
                   "energy_valley": Decimal(0)}
        items["forward_active_energy_block"] = {
            "forward_active_energy_total": total,
            **{f"forward_active_energy_{p.split('_')[1]}": v for p, v in tou.items()}}
    for name in ("voltage_a", "remaining_amount"):
        if name in decoded:
            items[name] = decoded[name]
    word = status_word(profile, decoded)
    if word is not None:
        items["status_word_3"] = word
    return items


def status_word(profile: Profile, decoded: Mapping[str, Decimal | bool]) -> dict | None:
    """The relay points in the shape of DL/T 645 run status word 3 (what the gateway's relay logic takes).
    A model that does not report the commanded position separately reports the contact's as both."""
    if "relay_state" not in decoded or any(p in profile.points and p not in decoded for p in STATE_POINTS):
        return None
    is_open = bool(decoded["relay_state"])
    commanded = bool(decoded.get("relay_command", is_open))
    return {"relay": "open" if is_open else "closed", "relay_command": "open" if commanded else "closed",
            "keep_power": bool(decoded.get("keep_power", False))}


# --------------------------------------------------------------------------------------------- relay


def relay_write(profile: Profile, action: str) -> RelayWrite:
    """The write that performs ``action`` (trip / close / close_allowed). A model without close-allowed
    closes directly: on Modbus meters there is no button to wait for."""
    if profile.relay is None:
        raise ProfileError(f"{profile.origin}: relay: profile {profile.name!r} ({profile.model}) has no "
                           f"remotely switched relay")
    if action not in RELAY_ACTIONS:
        raise ValueError(f"unknown relay action {action!r}")
    writes = profile.relay.writes
    values = writes.get(action, writes["close"] if action == "close_allowed" else None)
    return RelayWrite(profile.relay.function, profile.relay.address, values)


def action_of_write(profile: Profile, table: str, address: int, values: Sequence) -> str | None:
    """What a write means to a meter of this profile: the relay action, or None if it is not one (the
    simulator's side of :func:`relay_write`)."""
    relay = profile.relay
    if relay is None or table != relay.table or address != relay.address:
        return None
    got = tuple(bool(v) for v in values) if relay.table == "coil" else tuple(int(v) for v in values)
    for action, want in relay.writes.items():
        if got == want:
            return action
    return None
