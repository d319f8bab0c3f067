"""Data identifiers: formats, signs, status words, 1997 items, unknown DIs, bad BCD."""
from datetime import date, time
from decimal import Decimal

import pytest
from hypothesis import given, strategies as st

from protocols.dlt645 import di as t
from protocols.dlt645.codes import Edition
from protocols.dlt645.formats import FormatError, decode_bcd, encode_bcd

E97 = Edition.DLT645_1997


@pytest.mark.parametrize("di, name, unit, raw, value", [
    (0x00010000, "forward_active_energy_total", "kWh", "78563412", "123456.78"),
    (0x00010100, "forward_active_energy_sharp", "kWh", "01000000", "0.01"),
    (0x00010200, "forward_active_energy_peak", "kWh", "00000000", "0.00"),
    (0x00010300, "forward_active_energy_flat", "kWh", "99999999", "999999.99"),
    (0x00010400, "forward_active_energy_valley", "kWh", "00010000", "1.00"),
    (0x00020000, "reverse_active_energy_total", "kWh", "34120000", "12.34"),
    (0x02010100, "voltage_a", "V", "0122", "220.1"),
    (0x02010300, "voltage_c", "V", "9923", "239.9"),
    (0x02020100, "current_a", "A", "005000", "5.000"),
    (0x02020200, "current_b", "A", "501280", "-1.250"),  # sign bit in the top byte
    (0x02030000, "active_power_total", "kW", "345612", "12.5634"),
    (0x02030100, "active_power_a", "kW", "000080", "-0.0000"),
    (0x02060000, "power_factor_total", "", "0089", "-0.900"),
    (0x02800002, "frequency", "Hz", "0050", "50.00"),
    (0x00900200, "remaining_amount", "yuan", "50120000", "12.50"),
    (0x00900201, "overdraft_amount", "yuan", "00050000", "5.00"),
    (0x00000000, "combined_active_energy_total", "kWh", "00001080", "-1000.00"),
])
def test_numeric_items(di, name, unit, raw, value):
    v = t.decode_value(di, bytes.fromhex(raw))
    assert (v.name, v.unit) == (name, unit)
    assert v.value == Decimal(value) and isinstance(v.value, Decimal)
    if not (Decimal(value) == 0 and value.startswith("-")):
        assert t.encode_value(di, Decimal(value)) == bytes.fromhex(raw)


def test_date_time_and_address():
    # 2026-11-23 is a Monday (week day 1): YYMMDDWW goes WW first on the wire
    assert t.decode_value(0x04000101, bytes.fromhex("01231126")).value == date(2026, 11, 23)
    assert t.encode_value(0x04000101, date(2026, 11, 23)) == bytes.fromhex("01231126")
    assert t.decode_value(0x04000102, bytes.fromhex("563412")).value == time(12, 34, 56)
    assert t.decode_value(0x04000401, bytes.fromhex("610100000000")).value == "000000000161"
    with pytest.raises(FormatError, match="date"):
        t.decode_value(0x04000101, bytes.fromhex("01321326"))


def test_status_word_3_relay_and_alarm_bits():
    word = t.decode_value(0x04000503, bytes.fromhex("D002")).value  # 0x02D0
    assert word["relay"] == "open"  # bit4
    assert word["relay_command"] == "open"  # bit6
    assert word["pre_trip_alarm"] is True  # bit7
    assert word["meter_type"] == "money_prepaid"  # bits 9-8 = 10
    assert word["keep_power"] is False
    closed = t.decode_value(0x04000503, bytes.fromhex("0010")).value
    assert closed["relay"] == "closed" and closed["keep_power"] is True
    assert t.encode_value(0x04000503, {"relay": "open", "relay_command": "open", "pre_trip_alarm": True,
                                       "meter_type": "money_prepaid"}) == bytes.fromhex("D002")


def test_status_words_1_to_7_decode():
    for w in range(1, 8):
        v = t.decode_value(0x04000500 | w, bytes.fromhex("FFFF")).value
        assert v["raw"] == "FFFF" and any(x is True for x in v.values())


def test_block_reads():
    raw = bytes.fromhex("00000100" "10000000" "20000000" "30000000" "40000000")
    v = t.decode_value(0x0001FF00, raw).value
    assert v == {"forward_active_energy_total": Decimal("100.00"), "forward_active_energy_sharp": Decimal("0.10"),
                 "forward_active_energy_peak": Decimal("0.20"), "forward_active_energy_flat": Decimal("0.30"),
                 "forward_active_energy_valley": Decimal("0.40")}
    assert t.encode_value(0x0001FF00, v) == raw


def test_1997_items():
    assert t.decode_value(0x9010, bytes.fromhex("78563412"), E97).value == Decimal("123456.78")
    assert t.decode_value(0x9010, bytes.fromhex("78563412"), E97).name == "forward_active_energy_total"
    assert t.decode_value(0x9013, bytes.fromhex("00010000"), E97).name == "forward_active_energy_flat"
    assert t.decode_value(0x9020, bytes.fromhex("00010000"), E97).name == "reverse_active_energy_total"
    v = t.decode_value(0xB611, bytes.fromhex("2002"), E97)
    assert (v.name, v.value, v.unit) == ("voltage_a", Decimal(220), "V")
    assert t.decode_value(0xB621, bytes.fromhex("5012"), E97).value == Decimal("12.50")


def test_unknown_di_is_raw_bytes_not_an_error():
    v = t.decode_value(0x12345678, b"\x01\x02\xff")
    assert v.name == "unknown" and v.value == b"\x01\x02\xff"
    assert t.encode_value(0x12345678, b"\x01") == b"\x01"


def test_bad_bcd_and_wrong_length_are_clear_errors():
    with pytest.raises(FormatError, match="not BCD"):
        t.decode_value(0x00010000, bytes.fromhex("7856341A"))
    with pytest.raises(FormatError, match="needs 4 bytes"):
        t.decode_value(0x00010000, bytes.fromhex("785634"))
    with pytest.raises(FormatError, match="decimal places"):
        t.encode_value(0x00010000, Decimal("1.234"))
    with pytest.raises(FormatError, match="does not fit"):
        t.encode_value(0x02010100, Decimal("1000.0"))
    with pytest.raises(FormatError, match="negative"):
        t.encode_value(0x00010000, Decimal("-1"))


@given(st.integers(-(8 * 10**5 - 1), 8 * 10**5 - 1), st.integers(0, 4))
def test_signed_bcd_round_trip(n, decimals):
    value = Decimal(n).scaleb(-decimals)
    assert decode_bcd(encode_bcd(value, 3, decimals, True), decimals, True) == value


def test_resolve_by_name_or_hex():
    assert t.resolve("forward_active_energy_total") == 0x00010000
    assert t.resolve("0x02010100") == 0x02010100
    assert t.resolve("B611", E97) == 0xB611
    with pytest.raises(ValueError, match="8 hex digits"):
        t.resolve("123")
