"""A billing system on the other side of the MQTT contract (``protocols.mqtt.billing``).

It publishes payments (and any other inbound message) at QoS 1, pipelined, on a persistent session so
paho re-sends what the broker had not acknowledged when the connection drops; and it subscribes to
everything the gateway publishes, keeping events by id (QoS 1 may deliver twice: it counts each once, and
counts the repeats). With :meth:`BillingSim.answer_notices` it is also the notification system: it answers
every ``notice_request`` with a receipt (delivered, failed, empty, or none at all, as the caller decides).
Used by the tests, the benchmark and the demo. paho runs its own network thread.
"""
from __future__ import annotations

import itertools
import ssl
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Callable

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocols.mqtt import billing as contract

CN = timezone(timedelta(hours=8))
_event = msgspec.json.Decoder(contract.Event)
_status = msgspec.json.Decoder(contract.Status)


class BillingSim:
    def __init__(self, host: str, port: int, *, client_id: str = "billing-sim", username: str = "",
                 password: str = "", tls_ca: str = "", in_flight: int = 100, subscribe: bool = True) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        self.client.max_inflight_messages_set(in_flight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.host, self.port, self.subscribe = host, port, subscribe
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self.unacked: set[int] = set()
        self._early: set[int] = set()
        self.refused: list[tuple[int, str]] = []  # (mid, reason code) the broker refused (an ACL, say)
        self.events: dict[str, contract.Event] = {}  # id -> event, once each
        self._by_kind: dict[str, list[contract.Event]] = {}  # kind -> events, once each, in arrival order
        #: payment id -> its confirmation (from payments_applied events) and when it arrived (monotonic)
        self.applied: dict[str, contract.PaymentAppliedRow] = {}
        self.applied_at: dict[str, float] = {}
        self.repeats = Counter()  # event id -> extra deliveries
        self.arrived: dict[str, float] = {}  # id -> monotonic time of first delivery
        self.status: dict[str, contract.Status] = {}  # instance -> last status seen
        self.undecodable: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        #: notice_request event -> (outcome, detail) to answer with, or None for no receipt at all
        self._notice_answer: Callable[[contract.Event], tuple[str, str] | None] | None = None
        self.receipts = Counter()  # outcome ("delivered", "failed", "empty", "none") -> notice requests answered
        #: request id -> (outcome, epoch s, notice id, purpose, account) of every receipt sent: what was delivered
        #: according to the notification system itself, not the gateway
        self.notice_answers: dict[str, tuple[str, float, str, str, str]] = {}

    # -- connection -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "BillingSim":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async(self.host, self.port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"billing simulator: no connection to {self.host}:{self.port} in {timeout}s")
        if self.subscribe and not self.subscribed.wait(timeout):
            raise TimeoutError("billing simulator: subscription not acknowledged")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "BillingSim":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            return
        if self.subscribe:
            client.subscribe([(f"{contract.OUT}/#", 1), (contract.DEAD_LETTER, 1), (f"{contract.STATUS}/+", 1)])
        self.connected.set()

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.subscribed.set()

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        with self._lock:
            if mid in self.unacked:
                self.unacked.discard(mid)
            else:  # acknowledged before publish() had recorded it
                self._early.add(mid)
            if reason.is_failure:
                self.refused.append((mid, str(reason)))
            self._lock.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            if msg.topic.startswith(contract.STATUS + "/"):
                st = _status.decode(msg.payload)
                with self._lock:
                    self.status[st.instance] = st
                    self._lock.notify_all()
                return
            ev = _event.decode(msg.payload)
        except msgspec.MsgspecError:
            with self._lock:
                self.undecodable.append((msg.topic, msg.payload))
            return
        with self._lock:
            if ev.id in self.events:
                self.repeats[ev.id] += 1
            else:
                self.events[ev.id] = ev
                self._by_kind.setdefault(ev.kind, []).append(ev)
                self.arrived[ev.id] = time.monotonic()
                if ev.kind == "notice_request" and self._notice_answer is not None:
                    self._answer_notice(ev)
                if ev.kind == "payments_applied":
                    for row in msgspec.convert(ev.data, contract.PaymentsApplied).rows:
                        if row.payment_id not in self.applied:
                            self.applied[row.payment_id] = row
                            self.applied_at[row.payment_id] = self.arrived[ev.id]
            self._lock.notify_all()

    # -- publishing -------------------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self.unacked.add(info.mid)
        return info.mid

    def pay(self, account: str, amount: str, payment_id: str | None = None, paid_at: datetime | None = None,
            channel: str = "wechat") -> str:
        pid = payment_id or f"PAY{next(self._ids):08d}"
        msg = contract.Payment(pid, account, amount, paid_at or datetime.now(CN), channel)
        self.publish(f"{contract.IN}/payments", contract.encode(msg))
        return pid

    def send(self, msg) -> None:
        """Any inbound contract message, to its topic."""
        topic = next(t for t, kind in contract.INBOUND.items() if isinstance(msg, kind))
        self.publish(topic, contract.encode(msg))

    def wait_acked(self, timeout: float = 30.0) -> None:
        """Until the broker has acknowledged everything published (paho re-sends across reconnects)."""
        with self._lock:
            if not self._lock.wait_for(lambda: not self.unacked, timeout):
                raise TimeoutError(f"{len(self.unacked)} publishes not acknowledged in {timeout}s")

    # -- the notification system -------------------------------------------------------------------------------
    def answer_notices(self, decide: Callable[[contract.Event], tuple[str, str] | None]) -> None:
        """Answer every notice_request from now on: ``decide(event)`` gives (outcome, detail) with outcome
        ``delivered``, ``failed`` or ``empty``, or None to send no receipt (the gateway's timeout escalates)."""
        with self._lock:
            self._notice_answer = decide

    def _answer_notice(self, ev: contract.Event) -> None:
        """Runs in paho's thread with the lock held (publishing from a callback is fine with paho)."""
        answer = self._notice_answer(ev)
        if answer is None:
            self.receipts["none"] += 1
            return
        outcome, detail = answer
        request_id, now = ev.data["request_id"], datetime.now(CN)
        self.notice_answers.setdefault(request_id, (outcome, now.timestamp(), ev.data["notice_id"],
                                                    ev.data["purpose"], ev.data["account_id"]))
        receipt = contract.NoticeReceipt(f"R-{request_id}", request_id, outcome, now, detail)
        self.publish(f"{contract.IN}/notice-receipts", contract.encode(receipt))  # the lock is re-entrant
        self.receipts[outcome] += 1

    # -- what came back ---------------------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[["BillingSim"], bool], timeout: float = 30.0, what: str = "") -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"billing simulator: not seen in {timeout}s: {what or predicate}")

    def of_kind(self, kind: str) -> list[contract.Event]:
        with self._lock:
            return list(self._by_kind.get(kind, ()))

    def count(self, kind: str) -> int:
        """How many events of ``kind`` arrived (cheap enough for a wait_for predicate at thousands a second)."""
        with self._lock:
            return len(self._by_kind.get(kind, ()))
