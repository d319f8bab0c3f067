"""A whole gateway from one config file: the one place that composes store, policies, channels of every
kind, the fleet, the MQTT bridge to billing and the concentrator hub (docs/deployment.md).

``feikong run --config FILE`` is ``Service(load_service_config(FILE))``: :meth:`Service.start`, then
:meth:`Service.run` until a signal sets ``stop``, then :meth:`Service.close`.

**Ops components** (the operator API, the metrics endpoint, anything else that runs beside the gateway)
plug in through one seam: objects with a ``name`` and two coroutines, ``start(service)`` (called after the
store, fleet, channels, hub and bridge are up: the component reads ``service.gateway``,
``service.config.http`` or ``.metrics`` and starts its server) and ``stop()`` (called first on close, in
reverse order). Pass them as ``Service(config, ops=[...])`` or append to ``service.ops`` before
:meth:`start`; :func:`ops_components` is where ``feikong run`` gets its list from the config.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from typing import Callable, Protocol, Sequence

from gateway.app import Bus, Gateway
from gateway.clock import Clock, SystemClock
from gateway.config import ChannelConfig, ServiceConfig
from gateway.core.tariff import tariffs_from_config
from gateway.northbound.mqtt import BillingBridge
from gateway.southbound.concentrator import ConcentratorHub, HubSettings
from gateway.southbound.modbus import ModbusChannel, ModbusMeter
from protocols.dlt645.client import Dlt645Link, LinkSettings
from protocols.dlt645.codes import Edition

log = logging.getLogger(__name__)

#: ``progress(task, done, total)``: long work at start-up ("fleet" registration, the "first read cycle")
Progress = Callable[[str, int, int], None]

#: accounts registered per transaction (with their meters): a 100,000-meter fleet in a few dozen commits
REGISTER_CHUNK = 5_000


class OpsComponent(Protocol):
    """Something that runs beside the gateway (operator API, metrics endpoint): see the module docstring."""

    name: str

    async def start(self, service: "Service") -> None: ...

    async def stop(self) -> None: ...


def ops_components(config: ServiceConfig) -> list[OpsComponent]:
    """The ops components ``feikong run`` starts for ``config``: the metrics endpoint (``[metrics]``) and the
    operator API (``[http]``; without a tokens file it answers only health and readiness)."""
    from gateway.ops.api import ApiComponent
    from gateway.ops.metrics import MetricsEndpoint

    return [MetricsEndpoint(), ApiComponent()]


def safe_url(url: str) -> str:
    """A store URL fit for a log: any password replaced by ``***``."""
    return re.sub(r"^(\w+://[^:/@]+):[^@]*@", r"\1:***@", url)


class Service:
    def __init__(self, config: ServiceConfig, clock: Clock | None = None, *, ops: Sequence[OpsComponent] = (),
                 progress: Progress | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.ops: list[OpsComponent] = list(ops)
        self.progress: Progress = progress or (lambda task, done, total: None)
        self.gateway: Gateway | None = None
        self.bridge: BillingBridge | None = None
        self.hub: ConcentratorHub | None = None
        self.first_cycle = asyncio.Event()  # every configured meter has been read once
        #: after a stop, how long a read cycle or a relay exchange in progress may take to finish
        self.stop_grace_s = 5.0
        self._started: list[OpsComponent] = []

    # -- life ---------------------------------------------------------------------------------------------
    async def start(self) -> "Service":
        """Store opened (migrations run), concentrator hub connected, channels bound, fleet registered,
        bridge connecting, ops components started. On failure, whatever was started is closed again."""
        cfg = self.config
        try:
            if any(c.kind == "concentrator" for c in cfg.channels):
                m = cfg.mqtt
                self.hub = ConcentratorHub(HubSettings(m.host, m.port, client_id=f"{m.client_id}-south",
                                                       username=m.username or None, password=m.password(),
                                                       keepalive_s=m.keepalive_s))
                await self.hub.start()
                log.info("concentrator hub: mqtt://%s:%d as %s (%s)", m.host, m.port, self.hub.settings.client_id,
                         "connected" if self.hub.connected else "not connected yet, retrying")
            channels = [self._channel(c) for c in cfg.channels]
            cluster = None
            if cfg.cluster is not None:
                from gateway.cluster import Cluster

                cluster = Cluster(cfg.store.url, cfg.mqtt.instance, [c.name for c in cfg.channels],
                                  cfg.cluster.lease_ttl_s, digest=cfg.cluster_digest())
                log.info("cluster: instance %s shares %d channels through leases (ttl %.0f s)", cfg.mqtt.instance,
                         len(cfg.channels), cfg.cluster.lease_ttl_s)
            self.gateway = gw = Gateway(cfg.store.url, channels, cfg.policies, cfg.thresholds, self.clock,
                                        poll_interval_s=cfg.gateway.poll_interval_s, tick_s=cfg.gateway.tick_s,
                                        cluster=cluster)
            await gw.open()
            log.info("store %s opened (schema migrated), policies from %s", safe_url(cfg.store.url),
                     cfg.control.file or "the built-in defaults")
            for c, channel in zip(cfg.channels, channels):
                log.info("channel %s: %s %s, %d meters", c.name, c.kind, describe_channel(c), len(channel.meters))
            await self._register()
            self.bridge = BillingBridge(gw, cfg.mqtt)
            await self.bridge.start()
            log.info("billing bridge: mqtt://%s:%d as %s", cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.client_id)
            for op in self.ops:
                await op.start(self)
                self._started.append(op)
                log.info("started %s", op.name)
            if not self.ops:
                log.info("no ops components: [http] %s:%d and [metrics] %s:%d are not served", cfg.http.host,
                         cfg.http.port, cfg.metrics.host, cfg.metrics.port)
            # what start-up built (the fleet's accounts and meters, engine, controller, channels) lives as long as
            # the process: out of the collector's generations, a full collection need not walk it each time
            # (with 100,000 meters such pauses stopped the event loop and the writer for 0.4-0.5 s)
            gc.collect()
            gc.freeze()
        except BaseException:
            await self.close()
            raise
        return self

    async def run(self, stop: asyncio.Event) -> None:
        """Poll loops, executor, ticker and bridge until ``stop`` is set; an unexpected failure of one of
        them stops the others (and is raised)."""
        gw = self.gateway
        total = sum(len(c.meters) for c in gw.channels)
        seen: set[str] = set()  # meters read at least once (a quick channel may go round twice meanwhile)
        started = time.monotonic()

        def counted(channel, reading, seconds: float) -> None:
            if reading.meter in seen:
                return
            seen.add(reading.meter)
            self.progress("first read cycle", len(seen), total)
            if len(seen) >= total:
                gw.reading_hooks.remove(counted)
                self.first_cycle.set()
                log.info("first read cycle: %d meters in %.1f s", total, time.monotonic() - started)

        if total and gw.cluster is None:  # (with leases, an instance reads only its share)
            self.progress("first read cycle", 0, total)
            gw.reading_hooks.append(counted)
        else:
            self.first_cycle.set()

        async def guarded(coro) -> None:
            try:
                await coro
            except BaseException:
                stop.set()
                raise

        gateway = asyncio.create_task(guarded(gw.run(stop)))
        bridge = asyncio.create_task(guarded(self.bridge.run(stop)))
        report = asyncio.create_task(self._report_broker(stop))
        tasks = [gateway, bridge, report]
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopped, gateway, bridge], return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            # a read cycle in progress finishes within the grace period, or is cancelled: its readings are
            # read again (a relay command in flight is verified by read-back before anything is sent again)
            done, _ = await asyncio.wait([gateway], timeout=self.stop_grace_s)
            if not done:
                log.info("read cycles still running %.0f s after the stop: cancelled", self.stop_grace_s)
                gateway.cancel()
        finally:
            stop.set()
            stopped.cancel()
            report.cancel()
            results = await asyncio.gather(*tasks, stopped, return_exceptions=True)
            if counted in gw.reading_hooks:
                gw.reading_hooks.remove(counted)
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            raise failures[0]

    async def close(self) -> None:
        """Ops components stopped (last started first), bridge, channels, store and hub closed."""
        while self._started:
            op = self._started.pop()
            try:
                await op.stop()
            except Exception:
                log.exception("stopping %s failed", op.name)
        if self.bridge is not None:
            await self.bridge.close()
        if self.gateway is not None and self.gateway.control is not None:
            await self.gateway.close()
        elif self.gateway is not None:
            self.gateway.writer.close()
        if self.hub is not None:
            await self.hub.close()

    # -- parts --------------------------------------------------------------------------------------------
    async def _report_broker(self, stop: asyncio.Event) -> None:
        try:
            await self.bridge.ready(timeout=10.0)
            log.info("billing bridge connected and subscribed")
        except TimeoutError as exc:
            if not stop.is_set():
                log.warning("%s; still trying", exc)

    def _channel(self, c: ChannelConfig):
        cfg = self.config
        meters = [m.meter_id for m in cfg.meters_on(c.name)]
        secret = {"password": cfg.passwords[c.name]} if c.name in cfg.passwords else {}
        if c.kind in ("dlt645_tcp", "dlt645_serial"):
            settings = LinkSettings(baud=c.baud, parity=getattr(c, "parity", "E"), bytesize=getattr(c, "bytesize", 8),
                                    stopbits=getattr(c, "stopbits", 1), preamble=c.preamble,
                                    turnaround_s=c.timeout_s, margin_s=c.margin_s, retries=c.retries)
            link = (Dlt645Link.tcp(c.host, c.port, settings, name=c.name) if c.kind == "dlt645_tcp"
                    else Dlt645Link.serial(c.device, settings, name=c.name))
            return Bus(link, meters, items=c.items, edition=Edition(c.edition), operator=c.operator, **secret)
        if c.kind in ("modbus_tcp", "modbus_rtu"):
            from protocols.modbus import load_profile

            profile = load_profile(c.profile)
            devices = [ModbusMeter(m, cfg.devices[m], profile) for m in meters]
            if c.kind == "modbus_tcp":
                return ModbusChannel.tcp(c.host, c.port, devices, name=c.name, timeout_s=c.timeout_s,
                                         unreachable_after=c.unreachable_after)
            return ModbusChannel.rtu(c.device, devices, baudrate=c.baud, parity=c.parity, stopbits=c.stopbits,
                                     bytesize=c.bytesize, timeout_s=c.timeout_s, name=c.name,
                                     unreachable_after=c.unreachable_after)
        if c.mode == "json":
            return self.hub.json_channel(c.id, meters, read_timeout_s=c.read_timeout_s,
                                         relay_timeout_s=c.relay_timeout_s, items=c.items, name=c.name)
        settings = LinkSettings(baud=c.baud, parity="E", turnaround_s=c.timeout_s, margin_s=c.margin_s,
                                retries=c.retries)
        return Bus(Dlt645Link(self.hub.frame_opener(c.id), settings, c.name, "mqtt"), meters, items=c.items,
                   operator=c.operator, **secret)

    async def _register(self) -> None:
        """The fleet file's tariffs, accounts and meters into the store; ids already there are left as they
        are (a meter registered on another channel keeps it: logged)."""
        cfg, gw = self.config, self.gateway
        accounting = gw.control.accounting
        tariffs = tariffs_from_config(cfg.tariffs)
        accounts = list(cfg.accounts)
        engine = gw.control.engine
        new_accounts = sum(a.account_id not in engine.account_no for a in accounts)
        new_meters = sum(m.meter_id not in engine.meter_no for m in cfg.meters)
        by_account: dict[str, list] = {}
        for m in cfg.meters:
            by_account.setdefault(m.account_id, []).append(m)
        total = len(accounts)
        self.progress("fleet", 0, total)
        if not accounts:
            await gw.writer.call(accounting.register, tariffs, [], [])
        for start in range(0, total, REGISTER_CHUNK):
            chunk = accounts[start:start + REGISTER_CHUNK]
            meters = [m for a in chunk for m in by_account.get(a.account_id, ())]
            await gw.writer.call(accounting.register, tariffs, chunk, meters)
            self.progress("fleet", min(start + REGISTER_CHUNK, total), total)
        moved = [(m.meter_id, engine.meter(m.meter_id).channel, m.channel) for m in cfg.meters
                 if engine.meter(m.meter_id).channel != m.channel]
        for meter_id, registered, named in moved[:10]:
            log.warning("meter %s is registered on channel %s; the fleet file says %s: the registration stands",
                        meter_id, registered, named)
        if len(moved) > 10:
            log.warning("... and %d more meters registered on another channel than the fleet file says",
                        len(moved) - 10)
        log.info("fleet: %d accounts, %d meters, %d tariffs (%d accounts and %d meters new)", total,
                 len(cfg.meters), len(tariffs), new_accounts, new_meters)


def describe_channel(c: ChannelConfig) -> str:
    if hasattr(c, "host"):
        return f"{c.host}:{c.port}"
    if hasattr(c, "device"):
        return c.device
    return f"{c.id} ({c.mode} mode)"
