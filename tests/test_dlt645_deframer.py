"""Streaming deframer: any chunking, noise, FE runs, bad and truncated frames; never raises, never loses a good frame."""
import random

from hypothesis import given, settings, strategies as st

from protocols.dlt645.deframer import Deframer, FrameReceived, FrameRejected, Noise
from protocols.dlt645.frame import Frame, encode_frame

A = encode_frame("000000000161", 0x91, bytes.fromhex("0000010026000000"))
B = encode_frame("000000000002", 0x11, bytes.fromhex("00010102"), preamble=False)
GOOD_A = Frame("000000000161", 0x91, bytes.fromhex("0000010026000000"))
GOOD_B = Frame("000000000002", 0x11, bytes.fromhex("00010102"))


def frames(events):
    return [e.frame for e in events if isinstance(e, FrameReceived)]


def kinds(events):
    return [type(e).__name__ if not isinstance(e, FrameRejected) else e.reason for e in events]


def feed_all(chunks):
    d = Deframer()
    events = []
    for c in chunks:
        events += d.feed(c)
    return d, events


def test_two_frames_in_one_chunk():
    _, ev = feed_all([A + B])
    assert frames(ev) == [GOOD_A, GOOD_B]
    assert ev[0].offset == 4 and ev[1].offset == len(A)


def test_frame_split_byte_by_byte():
    _, ev = feed_all([bytes([b]) for b in A + B])
    assert frames(ev) == [GOOD_A, GOOD_B]


def test_noise_between_frames_is_reported_with_offset():
    _, ev = feed_all([A + b"\x00\x11\x22" + B])
    assert kinds(ev) == ["FrameReceived", "Noise", "FrameReceived"]
    noise = ev[1]
    assert noise.offset == len(A) and noise.data == b"\x00\x11\x22"


def test_fe_runs_are_not_noise():
    _, ev = feed_all([b"\xfe" * 17 + A + b"\xfe" * 3, b"\xfe" + B])
    assert kinds(ev) == ["FrameReceived", "FrameReceived"]


def test_bad_checksum_then_good_frame():
    bad = bytearray(A)
    bad[-2] ^= 0xFF
    _, ev = feed_all([bytes(bad) + B])
    assert kinds(ev) == ["bad_checksum", "FrameReceived"]
    assert ev[0].error_offset == len(A) - 2
    assert frames(ev) == [GOOD_B]


def test_truncated_frame_followed_by_good_frame_is_not_lost():
    # a frame cut off by a power dip: its header announces more bytes than ever come
    _, ev = feed_all([A[:14], B])
    assert frames(ev) == [GOOD_B]
    assert kinds(ev)[0] == "truncated"


def test_false_start_with_huge_length_does_not_hide_good_frame():
    junk = b"\x68" + bytes(6) + b"\x68\x91\xc8"  # length 200: would swallow what follows
    _, ev = feed_all([junk, A])
    assert frames(ev) == [GOOD_A]


def test_length_over_limit_is_rejected_at_once():
    junk = b"\x68" + bytes(6) + b"\x68\x91\xff"
    _, ev = feed_all([junk + A])
    assert "bad_length" in kinds(ev) and frames(ev) == [GOOD_A]


def test_flush_reports_partial_frame():
    d, ev = feed_all([A[:10]])
    assert ev == [] and d.pending == 6
    out = d.flush()
    assert kinds(out) == ["truncated"] and out[0].offset == 4
    assert d.pending == 0
    assert frames(d.feed(B)) == [GOOD_B]


def test_offsets_continue_across_feeds():
    d = Deframer()
    d.feed(A)
    ev = d.feed(b"\x01" + B)
    assert ev[0] == Noise(len(A), b"\x01")
    assert ev[1].offset == len(A) + 1


good_frames = st.builds(
    lambda a, c, d: encode_frame(f"{a:012d}", c, d, preamble=False),
    st.integers(0, 999_999_999_999), st.integers(0, 255), st.binary(max_size=40))
noise_without_start = st.binary(max_size=12).map(lambda b: b.replace(b"\x68", b"\x69"))


@settings(max_examples=300)
@given(st.lists(st.tuples(noise_without_start, good_frames), max_size=6), st.randoms(use_true_random=False))
def test_every_good_frame_survives_noise_and_any_chunking(parts, rnd):
    stream = b"".join(n + f for n, f in parts)
    cuts = sorted(rnd.sample(range(len(stream) + 1), min(len(stream), rnd.randint(0, 8))))
    chunks = [stream[i:j] for i, j in zip([0] + cuts, cuts + [len(stream)])]
    d, ev = feed_all(chunks)
    ev += d.flush()
    from protocols.dlt645.frame import decode_frame
    assert frames(ev) == [decode_frame(f) for _, f in parts]


@settings(max_examples=300)
@given(st.binary(max_size=300), st.randoms(use_true_random=False))
def test_never_raises_on_line_noise_and_accounts_for_every_byte(data, rnd):
    d = Deframer()
    pos, events = 0, []
    while pos < len(data):
        step = rnd.randint(1, 40)
        events += d.feed(data[pos:pos + step])
        pos += step
    events += d.flush()
    assert d.pending == 0
    for e in events:
        assert isinstance(e, (FrameReceived, FrameRejected, Noise))
        assert 0 <= e.offset <= len(data)


def test_good_frame_after_random_corruption_of_previous():
    rng = random.Random(7)
    for _ in range(200):
        bad = bytearray(A)
        i = rng.randrange(4, len(bad))
        bad[i] ^= 1 << rng.randrange(8)
        _, ev = feed_all([bytes(bad) + B])
        assert frames(ev)[-1] == GOOD_B
