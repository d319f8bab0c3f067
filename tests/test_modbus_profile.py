"""Modbus register profiles, pure: loading (and the errors bad files get), decoding, encoding, relay writes."""
import tomllib
from decimal import Decimal

import pytest

from protocols.modbus import (ProfileError, ValueDecodeError, action_of_write, decode, encode, load_profile,
                              parse_profile, read_plan, relay_write, shipped, to_items)
from protocols.modbus.profile import status_word

#: a made-up prepaid meter with every point the gateway knows, over all four tables (not a real model: the
#: shipped profiles are; this one exercises what they lack: time-of-use, purse, coils, keep-power)
FULL_PROFILE = """
[meter]
model = "test: prepaid meter with every point"
source = "synthetic, for tests"
max_gap = 4

[points.voltage_a]
table = "input"
address = 0x0000
type = "f32"
word_order = "little"
unit = "V"

[points.energy_total]
table = "input"
address = 0x0100
type = "u32"
scale = "0.01"
unit = "kWh"

[points.energy_sharp]
table = "input"
address = 0x0102
type = "u32"
scale = "0.01"
unit = "kWh"

[points.energy_peak]
table = "input"
address = 0x0104
type = "u32"
scale = "0.01"
unit = "kWh"

[points.energy_flat]
table = "input"
address = 0x0106
type = "u32"
scale = "0.01"
unit = "kWh"

[points.energy_valley]
table = "input"
address = 0x0108
type = "u32"
scale = "0.01"
unit = "kWh"

[points.remaining_amount]
table = "holding"
address = 0x0200
type = "i32"
scale = "0.01"
unit = "yuan"

[points.relay_state]
table = "discrete"
address = 0x0010

[points.keep_power]
table = "discrete"
address = 0x0011

[points.relay_command]
table = "coil"
address = 0x0000
open = false
closed = true

[relay]
function = "write_coil"
address = 0x0000
trip = false
close = true
"""


def full():
    return parse_profile(tomllib.loads(FULL_PROFILE), "full", "full.toml")


def test_every_shipped_profile_loads_and_names_its_source():
    names = shipped()
    assert {"hiking_dds238_2_znsr", "chint_ddsu666"} <= set(names)
    for name, path in names.items():
        p = load_profile(name)
        assert p.name == name and p.model and p.source and "energy_total" in p.points
        assert load_profile(path) == p  # by name or by path, the same profile
        assert path.read_text().startswith("#"), f"{name}: the file header cites where the map comes from"
        assert read_plan(p), name


def test_dds238_reads_in_one_request_and_switches_its_relay_by_fc16():
    p = load_profile("hiking_dds238_2_znsr")
    (block,) = read_plan(p)
    assert (block.table, block.start, block.count) == ("holding", 0, 27)
    regs = [0] * 27
    regs[0:2] = [0x0001, 0xE240]  # 123456 -> 1234.56 kWh
    regs[12] = 2304  # 230.4 V
    regs[26] = 0  # relay off
    decoded = {pt.name: decode(pt, block.slice(pt, regs)) for pt in block.points}
    items = to_items(p, decoded)
    energy = items["forward_active_energy_block"]
    # total only: it is the flat period, so a time-of-use tariff prices it (at the flat rate), never at zero
    assert energy == {"forward_active_energy_total": Decimal("1234.56"), "forward_active_energy_sharp": 0,
                      "forward_active_energy_peak": 0, "forward_active_energy_flat": Decimal("1234.56"),
                      "forward_active_energy_valley": 0}
    assert items["voltage_a"] == Decimal("230.4") and "remaining_amount" not in items
    assert items["status_word_3"] == {"relay": "open", "relay_command": "open", "keep_power": False}
    trip, close = relay_write(p, "trip"), relay_write(p, "close")
    assert (trip.function, trip.address, trip.values) == ("write_registers", 0x1A, (0,))
    assert close.values == (1,)
    assert relay_write(p, "close_allowed") == close  # no button on these: close-allowed closes directly
    assert action_of_write(p, "holding", 0x1A, [0]) == "trip"
    assert action_of_write(p, "holding", 0x1A, [1]) == "close"
    assert action_of_write(p, "holding", 0x1A, [2]) is None
    assert action_of_write(p, "holding", 0x19, [0]) is None


def test_ddsu666_is_float_input_registers_without_a_relay():
    p = load_profile("chint_ddsu666")
    blocks = read_plan(p)
    assert [(b.table, b.start, b.count) for b in blocks] == [("input", 0x2000, 2), ("input", 0x4000, 2)]
    # 0x43663334 is 230.2 V as Tasmota documents the reply bytes 43 66 33 34
    assert decode(p.points["voltage_a"], [0x4366, 0x3334]) == Decimal("230.2")
    assert decode(p.points["energy_total"], encode(p.points["energy_total"], Decimal("478.49"))) == Decimal("478.49")
    items = to_items(p, {"energy_total": Decimal("478.49"), "voltage_a": Decimal("230.2")})
    assert "status_word_3" not in items and items["forward_active_energy_block"]["forward_active_energy_flat"] == \
        Decimal("478.49")
    with pytest.raises(ProfileError, match="no remotely switched relay"):
        relay_write(p, "trip")


def test_types_round_trip_with_scale_sign_and_word_order():
    p = full()
    cases = [("voltage_a", Decimal("229.9")), ("energy_total", Decimal("98765.43")),
             ("remaining_amount", Decimal("-12.34")), ("remaining_amount", Decimal("300.00"))]
    for name, value in cases:
        pt = p.points[name]
        assert decode(pt, encode(pt, value)) == value, name
    # little word order: the low word first
    assert encode(p.points["voltage_a"], Decimal("230.2")) == [0x3333, 0x4366]
    assert encode(p.points["remaining_amount"], Decimal("-0.01")) == [0xFFFF, 0xFFFF]
    # counters are truncated to their resolution, like a meter's
    assert encode(p.points["energy_total"], Decimal("1.239")) == [0, 123]
    with pytest.raises(ValueError, match="out of range"):
        encode(p.points["energy_total"], Decimal("-1"))
    with pytest.raises(ValueDecodeError, match="needs 2"):
        decode(p.points["energy_total"], [1])


def test_state_points_and_the_status_word():
    p = full()
    assert decode(p.points["relay_state"], [True]) is True  # a set discrete input: open
    assert decode(p.points["relay_command"], [True]) is False  # this coil is set when commanded closed
    dds = load_profile("hiking_dds238_2_znsr")
    with pytest.raises(ValueDecodeError, match="neither open"):
        decode(dds.points["relay_state"], [7])
    word = status_word(p, {"relay_state": True, "relay_command": False, "keep_power": True})
    assert word == {"relay": "open", "relay_command": "closed", "keep_power": True}
    # a state point the profile has but the read lost: no status word rather than a guessed one
    assert status_word(p, {"relay_state": True}) is None


def test_time_of_use_block_and_partial_reads():
    p = full()
    decoded = {"energy_total": Decimal("10.00"), "energy_sharp": Decimal("1.00"), "energy_peak": Decimal("2.00"),
               "energy_flat": Decimal("3.00"), "energy_valley": Decimal("4.00"), "remaining_amount": Decimal("5")}
    items = to_items(p, decoded)
    assert items["forward_active_energy_block"]["forward_active_energy_valley"] == Decimal("4.00")
    assert items["remaining_amount"] == Decimal("5")
    del decoded["energy_peak"]
    assert "forward_active_energy_block" not in to_items(p, decoded)  # half a block is no block
    plan = read_plan(p)
    assert [(b.table, b.start, b.count) for b in plan] == [
        ("coil", 0, 1), ("discrete", 0x10, 2), ("holding", 0x200, 2), ("input", 0, 2), ("input", 0x100, 10)]
    assert read_plan(p, ["relay_state", "relay_command", "keep_power"]) == plan[:2]


# ----------------------------------------------------------------------------------------- bad profiles


def bad(edit) -> str:
    data = tomllib.loads(FULL_PROFILE)
    edit(data)
    with pytest.raises(ProfileError) as exc:
        parse_profile(data, "bad", "site/bad.toml")
    return str(exc.value)


@pytest.mark.parametrize("edit, key, why", [
    (lambda d: d["points"]["voltage_a"].update(type="u17"), "points.voltage_a.type", "unknown type 'u17'"),
    (lambda d: d["points"]["voltage_a"].update(table="holdings"), "points.voltage_a.table", "unknown table"),
    (lambda d: d["points"]["energy_total"].update(address=70000), "points.energy_total.address", "0..65535"),
    (lambda d: d["points"]["energy_total"].update(address="0x10"), "points.energy_total.address", "0..65535"),
    (lambda d: d["points"].pop("energy_total"), "points.energy_total", "required"),
    (lambda d: d["points"].pop("energy_peak"), "points.energy_peak", "all four or none"),
    (lambda d: d["points"]["energy_total"].update(unit="Wh"), "points.energy_total.unit", "must be 'kWh'"),
    (lambda d: d["points"]["energy_total"].update(scale="-1"), "points.energy_total.scale", "positive"),
    (lambda d: d["points"]["energy_total"].update(type="bit"), "points.energy_total.type", "does not fit"),
    (lambda d: d["points"].update(frequency={"table": "input", "address": 1}), "points.frequency", "unknown point"),
    (lambda d: d["points"]["energy_sharp"].update(address=0x0101), "points.energy_sharp.address", "overlaps"),
    (lambda d: d["meter"].pop("source"), "meter.source", "required"),
    (lambda d: d["meter"].update(colour="red"), "meter.colour", "unknown key"),
    (lambda d: d["relay"].pop("trip"), "relay.trip", "required"),
    (lambda d: d["relay"].update(function="write_everything"), "relay.function", "unknown function"),
    (lambda d: d["relay"].update(close=False), "relay.close", "must differ"),
    (lambda d: d["relay"].update(function="write_registers", trip=[0, 70000], close=[1]), "relay.trip",
     "0..65535"),
])
def test_bad_profiles_name_the_file_and_the_key(edit, key, why):
    msg = bad(edit)
    assert msg.startswith(f"site/bad.toml: {key}: "), msg
    assert why in msg, msg


def test_a_register_state_point_needs_its_values_stated():
    dds = tomllib.loads(shipped()["hiking_dds238_2_znsr"].read_text())
    del dds["points"]["relay_state"]["closed"]
    with pytest.raises(ProfileError, match=r"x\.toml: points\.relay_state\.closed: required, an integer"):
        parse_profile(dds, "x", "x.toml")


def test_files_that_are_not_profiles(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[meter\nmodel = 1")
    with pytest.raises(ProfileError, match=f"{broken}: not valid TOML"):
        load_profile(broken)
    with pytest.raises(ProfileError, match="no shipped Modbus profile 'acme_9000'"):
        load_profile("acme_9000")
    empty = tmp_path / "empty.toml"
    empty.write_text('[meter]\nmodel = "x"\nsource = "y"\n')
    with pytest.raises(ProfileError, match=f"{empty}: points: missing"):
        load_profile(empty)
