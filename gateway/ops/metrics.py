"""Prometheus metrics of a running gateway (prometheus-client, on its own HTTP port).

Where each figure comes from:

* **Commits** (:class:`gateway.costcontrol.Committed`, on the writer thread, after the commit): relay
  commands, retries, payment-to-close latency, blocked trips, disconnect cases, field orders created, notices
  and their receipts, engine batches, payments. Counted from the events the controller committed (one event per
  transition: ``relay_confirmed``, ``trip_deferred`` once per gate met...), so a rolled-back transaction counts
  nothing and a re-delivered input that changed nothing counts nothing.
* **Reads** (``Gateway.reading_hooks``, on the event loop): every meter read of a poll cycle, its outcome
  and its time, per channel kind. A read is I/O: it counts when it happened, whatever becomes of its batch.
* **A sampler** (:meth:`GatewayMetrics.run`, every ``sample_s``): state that belongs to the writer thread
  (open relays, field orders, pending reconnects and their deadlines, due executor steps, the outbox) is read
  *through* the writer (``gateway.writer.call``), in its queue like any transaction, never from another thread
  while it changes. The result is a snapshot the scrape reads.
* **At scrape** (a collector): counters the bridge and the concentrator hub keep in memory
  (:class:`~gateway.northbound.mqtt.BridgeStats`, ``HubStats``: plain ints and flags) and the queue lengths
  (``qsize()``), read as they are: one attribute read each, safe from the HTTP server's thread.

No label names a meter or an account (per-meter state is the store's and the operator API's); every label
takes a few fixed values, and the label children of the hot paths are bound once, here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.core.commands import CommandState, RelayAction
from gateway.core.control import ENGINE
from gateway.core.dispatch import OrderKind
from gateway.core.notices import NoticePurpose, ReceiptOutcome
from gateway.core.policy import Gate
from gateway.core.model import Payment
from gateway.costcontrol import Committed
from gateway.southbound.channel import KINDS

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.northbound.mqtt import BillingBridge
    from gateway.southbound.concentrator import ConcentratorHub

log = logging.getLogger(__name__)

#: the kind of a meter whose channel is not configured in this gateway
UNCONFIGURED = "unconfigured"
METER_STATES = ("online", "tripped", "unreachable", "unknown")
READ_RESULTS = ("ok", "partial", "failed")
RELAY_OUTCOMES = ("confirmed", "already", "field", "failed", "cancelled", "blocked")
ACTORS = ("engine", "operator")
CASE_EVENTS = ("opened", "tripped", "cancelled", "failed")
DEADLINES = ("ok", "at_risk", "passed")
QUEUES = ("writer", "executor_due", "bridge_inbound")
ENGINE_RESULTS = ("accepted", "held", "duplicate", "rejected")
PAYMENT_RESULTS = ("applied", "duplicate", "conflict")
RECEIPT_OUTCOMES = tuple(o.value for o in ReceiptOutcome if o != ReceiptOutcome.PENDING)

READ_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: payment to verified close: seconds when remote, hours when a crew goes (the deadline is 24 h)
RECONNECT_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 16 * 3600,
                     24 * 3600, 48 * 3600)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10_000, 50_000, 100_000)
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    """The gateway's metrics: ``attach`` it to a gateway (and its bridge, and a concentrator hub), ``serve``
    them, ``run`` its sampler beside the gateway, ``close`` it at the end."""

    def __init__(self, registry: CollectorRegistry | None = None, *, sample_s: float = 5.0,
                 unreachable_after: int = 3) -> None:
        """``registry``: None for one of its own (with the process and Python collectors); ``sample_s``: how
        often the writer's state is sampled; ``unreachable_after``: reads in a row without an answer that make
        a meter unreachable (the pollers' own threshold)."""
        disable_created_metrics()
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.sample_s = sample_s
        self.unreachable_after = unreachable_after
        self.gateway: Gateway | None = None
        self.bridge: BillingBridge | None = None
        self.hub: ConcentratorHub | None = None
        self._server = None
        self._thread = None
        r = registry

        # reads (event loop)
        reads = Counter("feikong_meter_reads_total", "Meter reads in poll cycles, by channel kind and result "
                        "(ok: every item read; partial: some; failed: the meter did not answer)",
                        ["kind", "result"], registry=r)
        read_s = Histogram("feikong_meter_read_duration_seconds", "Time to read one meter (all its items) in a "
                           "poll cycle, by channel kind", ["kind"], buckets=READ_BUCKETS, registry=r)
        self._reads = {(k, res): reads.labels(k, res) for k in KINDS + (UNCONFIGURED,) for res in READ_RESULTS}
        self._read_s = {k: read_s.labels(k) for k in KINDS + (UNCONFIGURED,)}

        # engine batches and payments (writer thread, committed)
        self._batch_size = Histogram("feikong_engine_batch_readings", "Readings per committed engine batch",
                                     buckets=BATCH_SIZE_BUCKETS, registry=r)
        self._batch_s = Histogram("feikong_engine_batch_duration_seconds", "Time of a reading batch's "
                                  "transaction (engine, controller, store) until its commit",
                                  buckets=BATCH_SECONDS_BUCKETS, registry=r)
        eng = Counter("feikong_engine_readings_total", "Readings in committed batches, by what the engine did "
                      "with them", ["result"], registry=r)
        self._eng = {res: eng.labels(res) for res in ENGINE_RESULTS}
        pay = Counter("feikong_payments_total", "Payments committed (applied), re-delivered (duplicate) or "
                      "refused for an id reused with other content (conflict)", ["result"], registry=r)
        self._pay = {res: pay.labels(res) for res in PAYMENT_RESULTS}

        # relay commands
        actions = [a.value for a in RelayAction]
        req = Counter("feikong_relay_commands_requested_total", "Relay commands made, by action and by whom "
                      "(the engine, or an operator)", ["action", "actor"], registry=r)
        self._req = {(a, who): req.labels(a, who) for a in actions for who in ACTORS}
        fin = Counter("feikong_relay_commands_finished_total", "Relay commands ended, by action and outcome "
                      "(confirmed: verified by read-back after our frame; already: found in place; field: "
                      "closed by a crew; failed: remote budget spent; cancelled; blocked by keep-power)",
                      ["action", "outcome"], registry=r)
        self._fin = {(a, o): fin.labels(a, o) for a in actions for o in RELAY_OUTCOMES}
        # a command ends once: one that failed remotely and a crew closed later is not finished a second time
        rescued = Counter("feikong_relay_failed_then_closed_by_field_total", "Relay commands that had ended "
                          "failed (counted so in feikong_relay_commands_finished_total) and a field crew then "
                          "closed, verified by a read", ["action"], registry=r)
        self._rescued = {a: rescued.labels(a) for a in actions}
        retries = Counter("feikong_relay_retries_total", "Failed attempts of relay commands that will be "
                          "tried again", ["action"], registry=r)
        self._retries = {a: retries.labels(a) for a in actions}
        rec = Histogram("feikong_reconnect_duration_seconds", "From the payment that cleared the arrears to "
                        "the verified close, by how it closed (remote, or a field crew)", ["via"],
                        buckets=RECONNECT_BUCKETS, registry=r)
        self._reconnect = {v: rec.labels(v) for v in ("remote", "field")}

        # trips, cases, orders, notices
        blocked = Counter("feikong_trips_blocked_total", "Trips held or stopped by a gate (once per gate met "
                          "by a disconnect case, at planning or at the moment of sending)", ["gate"], registry=r)
        self._blocked = {g.value: blocked.labels(g.value) for g in Gate}
        cases = Counter("feikong_disconnect_cases_total", "Disconnect cases opened and ended, by event",
                        ["event"], registry=r)
        self._cases = {e: cases.labels(e) for e in CASE_EVENTS}
        orders = Counter("feikong_field_orders_created_total", "Field work orders created, by kind", ["kind"],
                         registry=r)
        self._orders = {k.value: orders.labels(k.value) for k in OrderKind}
        self._notice_req = Counter("feikong_notice_requests_total", "Notice deliveries requested from "
                                   "upstream, by channel", ["channel"], registry=r)
        self._receipts = Counter("feikong_notice_receipts_total", "Ends of notice delivery attempts, by channel "
                                 "and receipt outcome (timeout and skipped are the gateway's own)",
                                 ["channel", "outcome"], registry=r)
        exhausted = Counter("feikong_notices_exhausted_total", "Notices no channel confirmed, by purpose",
                            ["purpose"], registry=r)
        self._exhausted = {p.value: exhausted.labels(p.value) for p in NoticePurpose}
        self._req_of: dict[str, object] = {}
        self._rcpt_of: dict[tuple[str, str], object] = {}

        self._handlers = {
            "relay_requested": self._relay_requested, "relay_confirmed": self._relay_confirmed,
            "relay_failed": self._relay_ended, "relay_cancelled": self._relay_ended,
            "relay_blocked": self._relay_ended, "relay_retry": self._relay_retry,
            "trip_deferred": self._trip_deferred, "account_manager_task": self._account_manager,
            "field_order_created": self._order_created, "notice_request": self._notice_request,
            "notice_escalated": self._notice_receipt, "notice_delivered": self._notice_receipt,
            "notice_exhausted": self._notice_exhausted,
            **{f"disconnect_case_{e}": self._case for e in CASE_EVENTS},
        }

        # meter health from reads (event loop only)
        self._kind_of: dict[str, str] = {}  # meter -> its channel's kind
        self._total: dict[str, int] = {}  # kind -> meters
        self._failures: dict[str, int] = {}  # meter -> reads in a row without an answer
        self._answered: set[str] = set()  # meters that answered since the gateway started
        self._unreachable: set[str] = set()
        self._snapshot: dict = {}
        r.register(_Collector(self))

    # -- wiring -------------------------------------------------------------------------------------------
    def attach(self, gateway: "Gateway", bridge: "BillingBridge | None" = None,
               hub: "ConcentratorHub | None" = None) -> None:
        """Listen to ``gateway`` (opened: its shell exists) and read the bridge's and hub's stats."""
        if gateway.control is None:
            raise RuntimeError("attach the metrics to an opened gateway (await gateway.open() first)")
        self.gateway, self.bridge, self.hub = gateway, bridge, hub
        for channel in gateway.config.notices.channels:
            self._notice_children(channel)
        gateway.control.listeners.append(self._on_commit)
        gateway.reading_hooks.append(self._on_read)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """prometheus-client's own HTTP server on a thread of its own; returns the port it bound."""
        if self._server is not None:
            raise RuntimeError("already serving")
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self.gateway is not None:
            for listeners, fn in ((self.gateway.control.listeners, self._on_commit),
                                  (self.gateway.reading_hooks, self._on_read)):
                if fn in listeners:
                    listeners.remove(fn)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = self._thread = None

    async def run(self, stop: asyncio.Event) -> None:
        """The sampler: the writer's state every ``sample_s`` until ``stop``."""
        while not stop.is_set():
            try:
                await self.sample()
            except Exception:
                log.exception("sampling the gateway's state for metrics failed")
            try:
                await asyncio.wait_for(stop.wait(), self.sample_s)
            except asyncio.TimeoutError:
                pass

    async def sample(self) -> None:
        """One sample, now (the sampler's step; tests call it to see a state at once)."""
        gw = self.gateway
        started = time.perf_counter()
        snap = await gw.writer.call(self._sample_writer, gw.clock.now())
        snap["meters"] = self._meter_states(snap.pop("open"), snap.pop("kinds"))
        snap["sample_s"] = time.perf_counter() - started
        self._snapshot = snap

    # -- the writer's side (runs on the writer thread) ----------------------------------------------------
    def _sample_writer(self, now: float) -> dict:
        control = self.gateway.control
        c = control.controller
        kinds = None
        if len(self._kind_of) != len(control.engine.meters):  # meters added: learn their channels' kinds
            by_channel = {ch.name: ch.kind for ch in self.gateway.channels}
            kinds = {m.meter_id: by_channel.get(m.channel, UNCONFIGURED) for m in control.engine.meters}
        open_relays = {m for m, st in c.relays.items() if st.open}
        orders_open = {k.value: 0 for k in OrderKind}
        orders_overdue = dict(orders_open)
        for o in c.orders.values():
            if o.state.active:
                orders_open[o.kind.value] += 1
                orders_overdue[o.kind.value] += now >= o.deadline_at
        at_risk = c.cfg.dispatch.escalate_before_s
        reconnects = dict.fromkeys(DEADLINES, 0)
        for cmd in c.commands.values():
            if cmd.action != RelayAction.CLOSE or cmd.actor != ENGINE or cmd.deadline_at is None:
                continue
            order = c.orders.get(cmd.order_id) if cmd.order_id else None
            if cmd.state.active or (cmd.state == CommandState.FAILED and order is not None and order.state.active):
                left = cmd.deadline_at - now
                reconnects["passed" if left <= 0 else "at_risk" if left <= at_risk else "ok"] += 1
        return {"kinds": kinds, "open": open_relays, "orders_open": orders_open, "orders_overdue": orders_overdue,
                "reconnects": reconnects, "executor_due": len(control.steps(now)),
                "outbox": control.store.outbox_pending()}

    def _meter_states(self, open_relays: set[str], kinds: dict[str, str] | None) -> dict:
        if kinds is not None:
            self._kind_of = kinds
            self._total = {}
            for k in kinds.values():
                self._total[k] = self._total.get(k, 0) + 1
        by_kind: dict[str, list[set]] = {}
        for group, meters in ((0, self._unreachable), (1, open_relays), (2, self._answered)):
            for m in meters:
                k = self._kind_of.get(m)
                if k is not None:
                    by_kind.setdefault(k, [set(), set(), set()])[group].add(m)
        out = {}
        for k in set(KINDS) | set(self._total):
            unreachable, tripped, answered = by_kind.get(k, (set(), set(), set()))
            tripped = tripped - unreachable
            online = answered - unreachable - tripped
            total = self._total.get(k, 0)
            out[k] = {"unreachable": len(unreachable), "tripped": len(tripped), "online": len(online),
                      "unknown": total - len(unreachable) - len(tripped) - len(online)}
        return out

    # -- reads (event loop) ---------------------------------------------------------------------------
    def _on_read(self, channel, reading, seconds: float) -> None:
        kind = channel.kind if channel.kind in self._read_s else UNCONFIGURED
        m = reading.meter
        if reading.values:
            self._reads[kind, "partial" if reading.errors else "ok"].inc()
            self._failures[m] = 0
            self._answered.add(m)
            self._unreachable.discard(m)
        else:
            self._reads[kind, "failed"].inc()
            n = self._failures[m] = self._failures.get(m, 0) + 1
            if n >= self.unreachable_after:
                self._unreachable.add(m)
        self._read_s[kind].observe(seconds)

    # -- commits (writer thread) ---------------------------------------------------------------------------
    def _on_commit(self, c: Committed) -> None:
        fx = c.effects
        handlers = self._handlers
        for e in fx.events:
            h = handlers.get(e.kind)
            if h is not None:
                h(e, fx)
        r = c.result
        if c.input == "readings" and r is not None:
            self._batch_size.observe(c.size)
            self._batch_s.observe(c.seconds)
            for key, n in (("accepted", r.accepted), ("held", r.held), ("duplicate", r.duplicates),
                           ("rejected", len(r.rejected))):
                if n:
                    self._eng[key].inc(n)
        elif c.input == "credits" and r is not None and r.credits is not None:
            # payments only: operators' adjustments (opening credit, refunds) are not billing's payments
            applied = sum(isinstance(p, Payment) for p in r.credits.new)
            for key, n in (("applied", applied),
                           ("duplicate", sum(isinstance(p, Payment) for p in r.credits.duplicates)),
                           ("conflict", sum(isinstance(p, Payment) for p, _ in r.credits.conflicts))):
                if n:
                    self._pay[key].inc(n)

    def _relay_requested(self, e, fx) -> None:
        p = e.payload
        self._req[p["action"], "engine" if p["actor"] == ENGINE else "operator"].inc()

    def _relay_confirmed(self, e, fx) -> None:
        p = e.payload
        outcome = p["outcome"]
        via = "field" if outcome == "closed_by_field" else "remote"
        cmd = fx.commands.get(p["command_id"])
        if via == "field" and cmd is not None and any(h["event"] == "failed" for h in cmd.history):
            self._rescued[p["action"]].inc()
        else:
            self._fin[p["action"], "field" if via == "field" else
                      "already" if outcome.startswith("already_") else "confirmed"].inc()
        if p["action"] == RelayAction.CLOSE.value:
            if cmd is not None and cmd.actor == ENGINE and cmd.payment_at is not None and cmd.confirmed_at is not None:
                self._reconnect[via].observe(max(cmd.confirmed_at - cmd.payment_at, 0.0))

    def _relay_ended(self, e, fx) -> None:
        self._fin[e.payload["action"], e.kind.removeprefix("relay_")].inc()

    def _relay_retry(self, e, fx) -> None:
        self._retries[e.payload["action"]].inc()

    def _trip_deferred(self, e, fx) -> None:
        child = self._blocked.get(e.payload["gate"])
        if child is not None:
            child.inc()

    def _account_manager(self, e, fx) -> None:
        self._blocked[Gate.CUSTOMER_CLASS.value].inc()

    def _case(self, e, fx) -> None:
        self._cases[e.kind.removeprefix("disconnect_case_")].inc()

    def _order_created(self, e, fx) -> None:
        self._orders[e.payload["kind"]].inc()

    def _notice_children(self, channel: str):
        if channel not in self._req_of:
            self._req_of[channel] = self._notice_req.labels(channel)
            for o in RECEIPT_OUTCOMES:
                self._rcpt_of[channel, o] = self._receipts.labels(channel, o)
        return self._req_of[channel]

    def _notice_request(self, e, fx) -> None:
        self._notice_children(e.payload["channel"]).inc()

    def _notice_receipt(self, e, fx) -> None:
        p = e.payload
        if "channel" in p and not p.get("late"):  # a late delivery: its attempt's end (timeout) was counted
            self._notice_children(p["channel"])
            self._rcpt_of[p["channel"], p["outcome"]].inc()

    def _notice_exhausted(self, e, fx) -> None:
        self._exhausted[e.payload["purpose"]].inc()


class _Collector:
    """What is read at scrape time: the sampler's last snapshot, the bridge's and hub's stats, queue lengths."""

    def __init__(self, m: GatewayMetrics) -> None:
        self.m = m

    def describe(self):
        return []  # names are produced at collect time; nothing clashes with the metrics above

    def collect(self):
        m, snap = self.m, self.m._snapshot
        meters = GaugeMetricFamily("feikong_meters", "Meters by channel kind and state (unreachable: no answer "
                                   "to the last reads; tripped: relay verified open; online: answered, relay "
                                   "closed; unknown: not answered since the gateway started)",
                                   labels=["kind", "state"])
        for kind, states in sorted(snap.get("meters", {}).items()):
            for state in METER_STATES:
                meters.add_metric([kind, state], states[state])
        yield meters
        for name, key, doc in (("feikong_field_orders_open", "orders_open", "Field work orders not completed "
                                "or cancelled, by kind"),
                               ("feikong_field_orders_overdue", "orders_overdue", "Open field work orders past "
                                "their deadline, by kind")):
            g = GaugeMetricFamily(name, doc, labels=["kind"])
            for kind, n in sorted(snap.get(key, {}).items()):
                g.add_metric([kind], n)
            yield g
        rec = GaugeMetricFamily("feikong_reconnects_pending", "Reconnects after a payment not yet verified, by "
                                "their deadline (at_risk: less than the dispatch policy's escalate_before_s "
                                "left; passed: deadline gone)", labels=["deadline"])
        for d, n in snap.get("reconnects", {}).items():
            rec.add_metric([d], n)
        yield rec
        if "outbox" in snap:
            yield GaugeMetricFamily("feikong_outbox_unpublished_events", "Committed events not yet published "
                                    "to the broker", value=snap["outbox"])
            yield GaugeMetricFamily("feikong_metrics_sample_duration_seconds", "Time of the last sample of the "
                                    "writer's state (through the writer's queue)", value=snap["sample_s"])
        q = GaugeMetricFamily("feikong_queue_depth", "Work waiting: calls queued for the writer thread, relay "
                              "steps due for the executor, inbound MQTT messages waiting for the consumer",
                              labels=["queue"])
        if m.gateway is not None:
            q.add_metric(["writer"], m.gateway.writer.pending())
        if "executor_due" in snap:
            q.add_metric(["executor_due"], snap["executor_due"])
        if m.bridge is not None:
            q.add_metric(["bridge_inbound"], m.bridge.backlog)
        yield q
        if m.bridge is not None:
            yield from _bridge(m.bridge.stats)
        if m.hub is not None:
            yield GaugeMetricFamily("feikong_concentrator_hub_connected", "1 when the concentrator hub is "
                                    "connected to its broker", value=int(m.hub.connected))
            states = {"online": 0, "offline": 0, "unknown": 0}
            for st in list(m.hub.states.values()):
                states["unknown" if st.online is None else "online" if st.online else "offline"] += 1
            g = GaugeMetricFamily("feikong_concentrators", "Concentrators by last status heard", labels=["state"])
            for s, n in states.items():
                g.add_metric([s], n)
            yield g


def _bridge(s):
    yield GaugeMetricFamily("feikong_mqtt_connected", "1 when the billing bridge is connected to its broker",
                            value=int(s.connected))
    yield GaugeMetricFamily("feikong_mqtt_adopted_sessions", "Sessions of other instances that are down, adopted "
                            "by this one (the publisher) now", value=s.adopted)
    for name, value, doc in (
            ("feikong_mqtt_connects", s.connects, "Broker connections the billing bridge made"),
            ("feikong_mqtt_messages_received", s.received, "Inbound billing messages received"),
            ("feikong_mqtt_messages_committed", s.committed, "Inbound billing messages committed (then acked)"),
            ("feikong_mqtt_payment_duplicates", s.duplicates, "Re-delivered payments (acknowledged, not counted)"),
            ("feikong_mqtt_dead_letters", s.dead_letters, "Inbound messages sent to the dead letters"),
            ("feikong_mqtt_events_published", s.published, "Outbox events published and acknowledged"),
            ("feikong_mqtt_publish_refused", s.publish_refused, "Outbox events the broker refused"),
            ("feikong_mqtt_batch_retries", s.retries, "Inbound batches tried again"),
            ("feikong_mqtt_adoptions", s.adoptions, "Sessions of other instances that were down, adopted")):
        yield CounterMetricFamily(name, doc, value=value)


class MetricsEndpoint:
    """The metrics as an ops component of :class:`gateway.service.Service` (its ``[metrics]`` host and port):
    attached to the service's gateway, bridge and hub, served, sampled until stopped."""

    name = "metrics"

    def __init__(self, metrics: GatewayMetrics | None = None) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.port: int | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, service) -> None:
        m = self.metrics
        m.attach(service.gateway, service.bridge, service.hub)
        self.port = m.serve(service.config.metrics.host, service.config.metrics.port)
        self._task = asyncio.create_task(m.run(self._stop), name="metrics-sampler")
        log.info("metrics: http://%s:%d/metrics", service.config.metrics.host, self.port)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        self.metrics.close()
