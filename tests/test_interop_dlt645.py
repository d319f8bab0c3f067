"""Interoperability with an independent DL/T 645 implementation: the PyPI package ``dlt645`` (3.x).

No one here wrote it, so agreeing with it on the wire is evidence that we read the
standard the same way, not that we agree with ourselves. Three directions:

a. the peer's (synchronous, threaded) client reads our simulated meters over TCP;
b. our asyncio client reads the peer's TCP meter server;
c. frames built by one side decode with the other side's codec, with and without
   the FE preamble.

ADDRESS BYTE ORDER TRAP: DL/T 645 sends the address lowest byte first, so meter
``000000000101`` is ``01 01 00 00 00 00`` on the wire. The peer's *string* setters
(``MeterClientService.set_address(str)``, ``MeterServerService.set_address(str)``)
go through ``string_to_bcd``, which is big-endian, and put ``00 00 00 00 01 01`` on
the wire: peer client and peer server then agree with each other but not with any
standard meter or head-end. So everywhere below the peer gets its address as the 6
raw wire bytes (``bytes.fromhex(addr)[::-1]``): ``srv.set_address(bytes)`` takes them
verbatim, and on the client we assign ``cli.address`` directly (its ``set_address``
accepts only ``str``). ``test_peer_string_address_is_big_endian`` pins the trap.

Peer objects take ~0.7 s each to build (each deep-copies a 20k-entry DI map), so
they are module-scoped.
"""
from __future__ import annotations

import asyncio
import struct
import threading
import time
from datetime import datetime
from decimal import Decimal

import pytest

dlt645 = pytest.importorskip("dlt645")

from dlt645 import MeterClientService, MeterServerService  # noqa: E402
from dlt645.common.transform import bcd_to_float, float_to_bcd, string_to_bcd  # noqa: E402
from dlt645.protocol.protocol import DLT645Protocol as Peer  # noqa: E402

from protocols.dlt645.client import Dlt645Client, Dlt645Link, Dlt645Refused, LinkSettings  # noqa: E402
from protocols.dlt645.di import decode_value, encode_value  # noqa: E402
from protocols.dlt645.frame import decode_frame, encode_frame  # noqa: E402
from simulators.dlt645 import SimBus, make_meters, serve_tcp  # noqa: E402

ENERGY_TOTAL = 0x00010000  # forward active energy, total (XXXXXX.XX kWh)
VOLTAGE_A = 0x02010100  # phase A voltage (XXX.X V)
FIXED_NOW = datetime(2024, 5, 1, 12, 0, 0)  # frozen clock: simulated registers do not move during a test


def wire_address(address: str) -> bytes:
    """Nameplate string -> the 6 address bytes in standard DL/T 645 wire order (A0 first)."""
    return bytes.fromhex(address)[::-1]


# --------------------------------------------------------------------------- a. peer client -> our simulator


class _SimThread:
    """Our simulated bus served over TCP from its own event loop in a background thread.

    The peer's client is blocking; with the server on its own loop the tests can call
    the peer directly, and the server survives across tests (pytest-asyncio gives each
    test its own loop).
    """

    def __init__(self) -> None:
        self.meters = make_meters("000000000101", 3, seed=7)
        for i, meter in enumerate(self.meters):
            meter.voltage = Decimal("218.3") + Decimal(i) * Decimal("6.7")  # distinct per meter: 218.3, 225.0, 231.7
        self.bus = SimBus.of(self.meters, clock=lambda: FIXED_NOW, turnaround_s=0.0)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server = None
        self.thread = threading.Thread(target=self._run, name="sim-dlt645", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = self.loop.run_until_complete(serve_tcp(self.bus, "127.0.0.1", 0))
        except BaseException as exc:  # surface bind errors in the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> int:
        self.thread.start()
        assert self._ready.wait(5), "simulator did not start"
        if self._error is not None:
            raise self._error
        return self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), 2.0)

        if self.server is not None:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        assert not self.thread.is_alive(), "simulator thread did not stop"
        self.loop.close()


@pytest.fixture(scope="module")
def sim():
    s = _SimThread()
    s.port = s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def peer_client(sim):
    cli = MeterClientService.new_tcp_client("127.0.0.1", sim.port, timeout=1.0)
    yield cli
    cli.disconnect()


def _peer_read(cli, address: str, di: int, reader: str):
    # standard byte order, bypassing set_address(str) (see the module docstring)
    cli.address = bytearray(wire_address(address))
    item = getattr(cli, reader)(di)
    # the returned DataItem is the client's shared map entry: copy the value now
    return None if item is None else item.value


def test_peer_client_reads_energy_and_voltage_from_our_simulator(sim, peer_client):
    seen = set()
    for meter in sim.meters:
        energy = _peer_read(peer_client, meter.address, ENERGY_TOTAL, "read_00")
        voltage = _peer_read(peer_client, meter.address, VOLTAGE_A, "read_02")
        assert energy is not None and voltage is not None, f"no answer from {meter.address}"
        # the peer decodes to float; its shortest repr is the BCD text, so compare exactly as Decimal
        assert Decimal(repr(energy)) == meter.energy[0], meter.address
        assert Decimal(repr(voltage)) == meter.voltage, meter.address
        assert round(energy, 2) == float(meter.energy[0])
        seen.add((energy, voltage))
    assert len(seen) == len(sim.meters)  # every meter answered with its own values
    assert sim.bus.stats.replies >= 2 * len(sim.meters)


def test_peer_client_sees_our_abnormal_reply_as_an_error_not_a_timeout(sim, peer_client):
    meter = sim.meters[0]
    t0 = time.perf_counter()
    # reactive power A (02040100) is not in the simulator's table: it answers D1 (abnormal)
    assert _peer_read(peer_client, meter.address, 0x02040100, "read_02") is None
    assert time.perf_counter() - t0 < 1.0  # a timeout would cost ~2.5 s with timeout=1.0
    # and the connection is still good afterwards
    assert Decimal(repr(_peer_read(peer_client, meter.address, ENERGY_TOTAL, "read_00"))) == meter.energy[0]


# --------------------------------------------------------------------------- b. our client -> peer server

PEER_ADDRESS = "123456789012"  # not a byte palindrome: a byte-order mistake cannot go unnoticed
PEER_VALUES = {  # DI -> (setter, float given to the peer, exact Decimal we must read)
    0x00010000: ("set_00", 123456.78, Decimal("123456.78")),
    0x00010100: ("set_00", 0.01, Decimal("0.01")),
    0x00010400: ("set_00", 799999.99, Decimal("799999.99")),
    0x02010100: ("set_02", 220.1, Decimal("220.1")),
    0x02020100: ("set_02", -5.123, Decimal("-5.123")),
    0x02030000: ("set_02", 1.2345, Decimal("1.2345")),
    0x02800002: ("set_02", 50.01, Decimal("50.01")),
}


@pytest.fixture(scope="module")
def peer_server():
    srv = MeterServerService.new_tcp_server("127.0.0.1", 0, timeout=1.0)
    assert srv.set_address(wire_address(PEER_ADDRESS))  # raw bytes: standard order (see the module docstring)
    for di, (setter, value, _) in PEER_VALUES.items():
        assert getattr(srv, setter)(di, value), f"peer refused {di:08X}={value}"
    assert srv.start()
    yield srv
    assert srv.stop()


@pytest.mark.parametrize("preamble", [True, False], ids=["fe", "nofe"])
async def test_our_client_reads_exact_values_from_peer_server(peer_server, preamble):
    settings = LinkSettings(retries=0, preamble=preamble)
    async with Dlt645Link.tcp("127.0.0.1", peer_server.server.port, settings) as link:
        client = Dlt645Client(link)
        for di, (_, _, expected) in PEER_VALUES.items():
            value = await client.read(PEER_ADDRESS, di)
            assert value.di == di
            assert value.value == expected, f"{di:08X}"
            assert str(value.value) == str(expected), f"{di:08X}: scale differs"  # same decimals too
        assert await client.read_address() == PEER_ADDRESS
        assert link.stats.timeouts == 0 and link.stats.frames_rejected == 0


async def test_our_client_gets_refusal_from_peer_for_other_address(peer_server):
    # the peer answers a foreign address with D1 01 echoing that address (a real meter stays silent)
    async with Dlt645Link.tcp("127.0.0.1", peer_server.server.port, LinkSettings(retries=0)) as link:
        with pytest.raises(Dlt645Refused):
            await Dlt645Client(link).read("000000000001", ENERGY_TOTAL)
        # the link is still usable for the right meter
        assert (await Dlt645Client(link).read(PEER_ADDRESS, ENERGY_TOTAL)).value == Decimal("123456.78")


# --------------------------------------------------------------------------- c. codec both ways

CODEC_CASES = [  # (address, DI, peer format string, value)
    ("000000000001", 0x00010000, "XXXXXX.XX", "123456.78"),
    ("123456789012", 0x00010000, "XXXXXX.XX", "0.00"),
    ("999999999998", 0x00010300, "XXXXXX.XX", "799999.99"),
    ("000000000101", 0x02010100, "XXX.X", "231.7"),
    ("201801020304", 0x02020100, "XXX.XXX", "-5.123"),
    ("201801020304", 0x02020200, "XXX.XXX", "79.999"),
    ("000000123456", 0x02030000, "XX.XXXX", "-1.2345"),
    ("000000123456", 0x02800002, "XX.XX", "50.01"),
    ("000000000101", 0x00900200, "XXXXXX.XX", "42.42"),
]


def _case_id(case):
    return f"{case[0]}-{case[1]:08X}-{case[3]}"


@pytest.mark.parametrize("preamble", [True, False], ids=["fe", "nofe"])
@pytest.mark.parametrize("case", CODEC_CASES, ids=_case_id)
def test_peer_built_reply_decodes_with_our_codec(case, preamble):
    address, di, fmt, text = case
    payload = struct.pack("<I", di) + bytes(float_to_bcd(float(text), fmt, "little"))
    raw = bytes(Peer.build_frame(wire_address(address), 0x91, payload, preamble_count=4 if preamble else 0))
    assert raw.startswith(b"\xfe" * 4) == preamble

    frame = decode_frame(raw)
    assert frame.address == address
    assert frame.control == 0x91
    assert int.from_bytes(frame.data[:4], "little") == di
    value = decode_value(di, frame.data[4:])
    assert value.value == Decimal(text)
    # and we would have put exactly the same bytes on the wire
    assert encode_frame(address, 0x91, struct.pack("<I", di) + encode_value(di, Decimal(text)), preamble) == raw


@pytest.mark.parametrize("preamble", [True, False], ids=["fe", "nofe"])
@pytest.mark.parametrize("case", CODEC_CASES, ids=_case_id)
def test_our_reply_decodes_with_peer_deserializer(case, preamble):
    address, di, fmt, text = case
    raw = encode_frame(address, 0x91, struct.pack("<I", di) + encode_value(di, Decimal(text)), preamble)

    remaining, fr = Peer.deserialize_with_remaining(raw)
    assert fr is not None, raw.hex()
    assert remaining == b""
    assert bytes(fr.preamble) == (b"\xfe" * 4 if preamble else b"")
    assert bytes(fr.addr) == wire_address(address)
    assert bytes(fr.addr)[::-1].hex() == address
    assert fr.ctrl_code == 0x91
    assert fr.data_len == len(fr.data) == 4 + len(encode_value(di, Decimal(text)))
    assert struct.unpack("<I", bytes(fr.data[:4]))[0] == di
    assert Decimal(repr(bcd_to_float(bytes(fr.data[4:]), fmt, "little"))) == Decimal(text)
    # the convenience wrapper agrees
    assert bytes(Peer.deserialize(raw).data) == bytes(fr.data)


@pytest.mark.parametrize("preamble", [True, False], ids=["fe", "nofe"])
@pytest.mark.parametrize("address", ["000000000001", "123456789012", "AAAAAAAAAAAA", "999999999999"])
def test_read_requests_cross_decode(address, preamble):
    di = VOLTAGE_A
    ours = encode_frame(address, 0x11, struct.pack("<I", di), preamble)
    peers = bytes(Peer.build_frame(wire_address(address), 0x11, struct.pack("<I", di),
                                   preamble_count=4 if preamble else 0))
    assert ours == peers

    frame = decode_frame(peers)
    assert (frame.address, frame.control, frame.data) == (address, 0x11, struct.pack("<I", di))
    _, fr = Peer.deserialize_with_remaining(ours)
    assert (bytes(fr.addr), fr.ctrl_code, bytes(fr.data)) == (wire_address(address), 0x11, struct.pack("<I", di))


def test_peer_rejects_our_frame_when_corrupted():
    """Negative control: the peer's deserializer is not accepting anything we hand it."""
    raw = bytearray(encode_frame("000000000001", 0x91, struct.pack("<I", ENERGY_TOTAL) + bytes(4)))
    raw[-2] ^= 0x01  # checksum
    assert Peer.deserialize_with_remaining(bytes(raw))[1] is None


def test_peer_string_address_is_big_endian():
    """The trap the module docstring describes: the peer's string address is NOT wire order."""
    assert bytes(string_to_bcd("000000000101")) == bytes.fromhex("000000000101")  # what set_address(str) sends
    raw = bytes(Peer.build_frame(string_to_bcd("000000000101"), 0x11, struct.pack("<I", ENERGY_TOTAL)))
    assert decode_frame(raw).address == "010100000000"  # a different meter for any standard head-end
