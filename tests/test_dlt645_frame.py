"""Frame codec: known captures, exact inverse (property), every malformed case named with its offset."""
import pytest
from hypothesis import given, strategies as st

from protocols.dlt645.frame import (
    BROADCAST_ADDRESS, WILDCARD_ADDRESS, Frame, FrameError, address_matches, decode_frame, encode_frame,
    normalise_address,
)

# A read of 00010000 from meter 000000000161 and its reply (0.26 kWh), as captured on a real line.
REQUEST = bytes.fromhex("FEFEFEFE68610100000000681104333334331416")
REPLY = bytes.fromhex("6861010000000068910833333433593333338A16")


def test_decodes_real_capture():
    req = decode_frame(REQUEST)
    assert req == Frame("000000000161", 0x11, bytes.fromhex("00000100"))
    assert not req.is_reply and req.function == 0x11
    rep = decode_frame(REPLY)
    assert rep.address == "000000000161" and rep.control == 0x91 and rep.is_reply
    assert rep.data == bytes.fromhex("0000010026000000")


def test_encodes_real_capture_byte_for_byte():
    assert encode_frame("000000000161", 0x11, bytes.fromhex("00000100")) == REQUEST
    assert encode_frame("000000000161", 0x91, bytes.fromhex("0000010026000000"), preamble=False) == REPLY


def test_control_bits():
    f = Frame("000000000001", 0xF1)
    assert f.is_reply and f.is_abnormal and f.has_followup and f.function == 0x11
    g = Frame("000000000001", 0x11)
    assert not (g.is_reply or g.is_abnormal or g.has_followup)


addresses = st.one_of(
    st.integers(0, 999_999_999_999).map(lambda n: f"{n:012d}"),
    st.lists(st.sampled_from(["AA"] + [f"{i:02d}" for i in range(100)]), min_size=6, max_size=6).map("".join),
)


@given(addresses, st.integers(0, 255), st.binary(max_size=200), st.booleans())
def test_encode_decode_are_exact_inverses(address, control, data, preamble):
    wire = encode_frame(address, control, data, preamble)
    assert decode_frame(wire) == Frame(address, control, data)
    # and the other way round: re-encoding what was decoded gives the same bytes
    f = decode_frame(wire)
    assert encode_frame(f.address, f.control, f.data, preamble) == wire


@pytest.mark.parametrize("wire, reason, offset", [
    (b"", "truncated", 0),
    (b"\xfe\xfe", "truncated", 2),
    (REPLY[:11], "truncated", 11),
    (REPLY[:-1], "truncated", 19),
    (REPLY + b"\x00", "trailing_bytes", 20),
    (b"\x69" + REPLY[1:], "bad_start", 0),
    (REPLY[:7] + b"\x00" + REPLY[8:], "bad_header", 7),
    (REPLY[:-2] + b"\x8b\x16", "bad_checksum", 18),
    (REPLY[:-1] + b"\x17", "bad_end", 19),
    (b"\xfe\xfe" + REPLY[:-2] + b"\x8b\x16", "bad_checksum", 20),
    (REPLY[:9] + b"\xc9" + REPLY[10:], "bad_length", 9),
])
def test_malformed_frames_name_reason_and_offset(wire, reason, offset):
    with pytest.raises(FrameError) as info:
        decode_frame(wire)
    assert info.value.reason == reason
    assert info.value.offset == offset
    assert f"offset {offset}" in str(info.value)


@given(st.binary(max_size=64))
def test_decode_never_raises_anything_but_frame_error(data):
    try:
        decode_frame(data)
    except FrameError:
        pass


def test_wildcard_and_broadcast_addresses():
    wire = encode_frame(WILDCARD_ADDRESS, 0x13)
    assert wire[5:11] == b"\xaa" * 6
    assert decode_frame(wire).address == WILDCARD_ADDRESS
    assert encode_frame(BROADCAST_ADDRESS, 0x08, bytes(6))[5:11] == b"\x99" * 6
    assert address_matches("AAAAAAAAAAAA", "123456789012")
    assert address_matches("AAAAAAAA9012", "123456789012")
    assert not address_matches("AAAAAAAA9013", "123456789012")
    assert not address_matches("000000000001", "000000000002")


@pytest.mark.parametrize("bad", ["12345", "00000000000B", "0000000000AB", "x" * 12, "1234567890123"])
def test_bad_addresses_are_refused_clearly(bad):
    with pytest.raises(ValueError, match="address"):
        encode_frame(bad, 0x11)


def test_normalise_address():
    assert normalise_address(1) == "000000000001"
    assert normalise_address("161") == "000000000161"
    assert normalise_address("aaaaaaaaaaaa") == WILDCARD_ADDRESS
    with pytest.raises(ValueError):
        normalise_address(10**12)


def test_oversized_data_refused_on_encode():
    with pytest.raises(ValueError, match="200"):
        encode_frame("000000000001", 0x91, bytes(201))
