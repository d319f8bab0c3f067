"""The bridge's read-ahead: paho's small reads served from one recv(), and the reader draining what it holds.

Bytes the read-ahead (or TLS) holds are no longer in the socket, so the event loop's selector will not say
"readable" for them: the reader must handle them before it waits again. Here the socket is one end of a
socket pair carrying MQTT 5 PUBLISH packets; the read-ahead rides on paho's private ``_sock`` and
``_sock_recv`` (paho-mqtt is pinned below 3), so this test is also the alarm for a paho that changed them."""
import asyncio
import socket

import pytest

from gateway.northbound.mqtt import BrokerConfig, _OnLoop, make_client


def publish(topic: str, payload: bytes) -> bytes:
    """An MQTT 5 PUBLISH at QoS 0 with no properties."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + b"\x00" + payload
    n, length = len(body), bytearray()
    while True:  # the remaining length: 7 bits a byte, the high bit says more follow
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([0x30]) + bytes(length) + body


@pytest.fixture
def wired():
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = make_client(BrokerConfig())
    client._sock = ours
    got = []
    client.on_message = lambda c, u, m: got.append(m.payload)
    yield _OnLoop(loop, client, 10), theirs, got
    ours.close()
    theirs.close()
    loop.close()


def test_one_readable_event_handles_every_packet_that_arrived_together(wired):
    net, theirs, got = wired
    theirs.sendall(b"".join(publish("feikong/v1/in/payments", f"p{i}".encode()) for i in range(50)))
    net._readable()
    assert got == [f"p{i}".encode() for i in range(50)]
    assert not net.client.pending


def test_a_packet_split_across_reads_is_put_together(wired):
    net, theirs, got = wired
    whole = publish("t", b"x" * 300)
    theirs.sendall(whole[:7])
    net._readable()
    assert got == []
    theirs.sendall(whole[7:] + publish("t", b"next"))
    net._readable()
    assert got == [b"x" * 300, b"next"]
