"""Requests and replies: every message survives wire encoding and parses back; refusals name their errors."""
from datetime import datetime

import pytest

from protocols.dlt645 import messages as m
from protocols.dlt645.codes import Edition, RelayAction, error_names, error_word
from protocols.dlt645.frame import decode_frame, encode_frame

ADDR = "000000000161"
WHEN = datetime(2026, 11, 23, 12, 30, 15)


def wire_roundtrip(message, edition=None):
    f = message.frame()
    return m.parse(decode_frame(encode_frame(f.address, f.control, f.data)), edition)


@pytest.mark.parametrize("message", [
    m.ReadRequest(ADDR, 0x00010000),
    m.ReadRequest(ADDR, 0x9010, Edition.DLT645_1997),
    m.ReadFollowupRequest(ADDR, 0x0001FF00, 3),
    m.ReadAddressRequest(),
    m.WriteRequest(ADDR, 0x04000102, bytes.fromhex("563412"), "123456", 4, "12345678"),
    m.BroadcastTime(WHEN),
    m.FreezeRequest(ADDR, minute=0, hour=0, day=1, month=99),
    m.ChangeBaudRequest(ADDR, 9600),
    m.RelayControlRequest(ADDR, RelayAction.TRIP, WHEN, "123456", 2, "00000001"),
    m.RelayControlRequest(ADDR, RelayAction.CLOSE_ALLOWED, WHEN),
    m.RelayControlRequest(ADDR, RelayAction.DIRECT_CLOSE, WHEN),
    m.RelayControlRequest(ADDR, RelayAction.ALARM, WHEN),
    m.RelayControlRequest(ADDR, RelayAction.ALARM_RELEASE, WHEN),
    m.RelayControlRequest(ADDR, RelayAction.KEEP_POWER, WHEN),
    m.RelayControlRequest(ADDR, RelayAction.KEEP_POWER_RELEASE, WHEN),
    m.ReadReply(ADDR, 0x00010000, bytes.fromhex("78563412")),
    m.ReadReply(ADDR, 0x0001FF00, bytes(8), followup=True),
    m.ReadReply(ADDR, 0x0001FF00, bytes(8), followup=False, seq=2),
    m.ReadReply(ADDR, 0x9010, bytes.fromhex("78563412"), Edition.DLT645_1997),
    m.ReadAddressReply(ADDR),
    m.Ack(ADDR, 0x1C),
    m.ChangeBaudReply(ADDR, 2400),
    m.AbnormalReply(ADDR, 0x11, 0x02),
])
def test_message_round_trip(message):
    assert wire_roundtrip(message) == message


def test_relay_control_layout_matches_the_standard():
    f = m.RelayControlRequest(ADDR, RelayAction.TRIP, WHEN, "123456", 2, "00000001").frame()
    assert f.control == 0x1C and len(f.data) == 16
    # PA P0 P1 P2 | C0..C3 | N1 N2 | ss mm hh DD MM YY
    assert f.data.hex() == "02563412" "01000000" "1a00" "153012231126"


def test_relay_control_with_unknown_action_is_rejected():
    f = m.RelayControlRequest(ADDR, RelayAction.TRIP, WHEN).frame()
    bad = f._replace(data=f.data[:8] + b"\x99" + f.data[9:])
    with pytest.raises(m.MessageError, match="N1 99"):
        m.parse(bad)


def test_abnormal_reply_error_names():
    reply = m.parse(decode_frame(encode_frame(ADDR, 0xD1, b"\x02")))
    assert isinstance(reply, m.AbnormalReply)
    assert reply.errors == ("no_data_requested",)
    assert error_names(0x05) == ("other_error", "password_error_or_unauthorized")
    assert error_names(0x04, Edition.DLT645_1997) == ("password_error",)
    assert error_names(0x80) == ("reserved_bits_80",)
    assert error_word("password_error_or_unauthorized") == 0x04


def test_short_data_is_a_message_error():
    with pytest.raises(m.MessageError, match="at least 4"):
        m.parse(decode_frame(encode_frame(ADDR, 0x91, b"\x00\x00")))
    with pytest.raises(m.MessageError, match="relay-control"):
        m.parse(decode_frame(encode_frame(ADDR, 0x1C, bytes(10))))


def test_describe_masks_passwords_and_gives_value_with_unit():
    d = m.describe(m.RelayControlRequest(ADDR, RelayAction.TRIP, WHEN, "123456"))
    assert d["password"] == "******" and "123456" not in str(d)
    d = m.describe(m.ReadReply(ADDR, 0x02010100, bytes.fromhex("0122")))
    assert (d["di"], d["di_name"], d["value"], d["unit"]) == ("02010100", "voltage_a", "220.1", "V")
    d = m.describe(m.ReadReply(ADDR, 0x00010000, bytes.fromhex("7856341A")))
    assert "not BCD" in d["value_error"]


def test_edition_hint_settles_shared_function_codes():
    f = m.BroadcastTime(WHEN).frame()
    assert m.describe(m.parse(f))["edition"] == "2007/1997"
    assert m.describe(m.parse(f, Edition.DLT645_1997), Edition.DLT645_1997)["edition"] == 1997
