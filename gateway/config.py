"""Configuration files: TOML read from disk, checked into the policies (``gateway.core.config``), and the
whole service's config (``load_service_config``): store, policies, broker, API and metrics ports, channels
of every kind, the fleet file and the tariffs. Every wrong value is a :class:`ConfigError` naming the file
and the key (``channels[2].parity``) or the fleet file's line and column, with the allowed values; a whole
service config reports every error at once (:class:`ConfigErrors`)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.core.config import ConfigError, build, build_all
from gateway.core.control import ControlConfig
from gateway.core.model import Account, Meter
from gateway.core.thresholds import ThresholdPolicy
from gateway.northbound.mqtt import BrokerConfig
from gateway.southbound.poller import DEFAULT_ITEMS


class ConfigErrors(ConfigError):
    """Several errors found at once; ``errors`` lists each one (file, key or line:column, what is allowed)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _build(cls, data, path: Path, where: str):
    try:
        return build(cls, data, where)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_control_config(path: str | Path) -> ControlConfig:
    """The disconnect/reconnect policies from a TOML file (see config/control.example.toml)."""
    path = Path(path)
    return _build(ControlConfig, _read(path), path, "")


def load_broker_config(path: str | Path) -> BrokerConfig:
    """The ``[mqtt]`` table of a gateway config file (see config/gateway.example.toml): the broker, TLS,
    credentials and session of the northbound bridge."""
    path = Path(path)
    data = _read(path)
    if "mqtt" not in data:
        raise ConfigError(f"{path}: no [mqtt] table")
    return _build(BrokerConfig, data["mqtt"], path, "mqtt")


# --------------------------------------------------------------------------- the service's tables


def _port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} {port} is not a TCP port; allowed: 1..65535 (0: any free port)")


@dataclass(frozen=True)
class StoreSettings:
    """``[store]``: ``sqlite://PATH`` (embedded; a relative path is the config file's directory) or
    ``postgresql://USER@HOST/DB``."""

    url: str = "sqlite://feikong.db"

    def __post_init__(self) -> None:
        if not self.url.startswith(("sqlite://", "postgresql://", "postgres://")) or self.url == "sqlite://":
            raise ValueError(f"url {self.url!r}: allowed: sqlite://PATH, postgresql://USER@HOST/DB")


@dataclass(frozen=True)
class ControlSettings:
    """``[control]``: the policies file (config/control.example.toml); "" = the built-in defaults."""

    file: str = ""


@dataclass(frozen=True)
class HttpSettings:
    """``[http]``: the operator API's listener and its tokens file."""

    host: str = "127.0.0.1"
    port: int = 8080
    tokens_file: str = ""

    def __post_init__(self) -> None:
        _port("port", self.port)
        if not self.host:
            raise ValueError("host must not be empty (0.0.0.0: every interface)")


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus scrape endpoint's listener."""

    host: str = "127.0.0.1"
    port: int = 9108

    def __post_init__(self) -> None:
        _port("port", self.port)
        if not self.host:
            raise ValueError("host must not be empty (0.0.0.0: every interface)")


@dataclass(frozen=True)
class GatewaySettings:
    """``[gateway]``: how often every meter is read, how often timers (notices, gates, dispatch) run."""

    poll_interval_s: float = 900.0
    tick_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("poll_interval_s", "tick_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``: present = this instance shares the channels with other instances on the same PostgreSQL
    database through leases (docs/scaling.md)."""

    #: a lease not renewed within this is free for another instance to take: the takeover time after a crash
    lease_ttl_s: float = 15.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.lease_ttl_s <= 600.0:
            raise ValueError(f"lease_ttl_s {self.lease_ttl_s} is out of bounds; allowed: 1..600 seconds "
                             f"(renewed every lease_ttl_s / 5)")


@dataclass(frozen=True)
class FleetSettings:
    """``[fleet]``: the accounts and meters (CSV, see docs/deployment.md) and the tariffs (JSON, as
    config/tariffs.example.json)."""

    file: str = ""
    tariffs: str = ""


# --------------------------------------------------------------------------- channels

Parity = Literal["E", "N", "O"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/+@-]*$")


def _check_channel(c) -> None:
    if not _NAME.match(c.name):
        raise ValueError(f"name {c.name!r}: letters, digits and _ . : / + @ - (not starting with a symbol)")
    if hasattr(c, "port"):
        _port("port", c.port)
    for name in ("timeout_s", "margin_s", "read_timeout_s", "relay_timeout_s"):
        if getattr(c, name, 1) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(c, name)}")
    if getattr(c, "retries", 0) < 0:
        raise ValueError(f"retries must be 0 or more, got {c.retries}")
    if getattr(c, "baud", 1) <= 0:
        raise ValueError(f"baud must be positive, got {c.baud}")
    if getattr(c, "unreachable_after", 1) < 1:
        raise ValueError(f"unreachable_after must be 1 or more (failed cycles), got {c.unreachable_after}")


#: what every poll must read: the energy registers (billing) and status word 3 (the relay's position)
_REQUIRED_ITEMS = ("forward_active_energy_block", "status_word_3")


def _check_items(items: tuple[str, ...]) -> None:
    missing = [name for name in _REQUIRED_ITEMS if name not in items]
    if missing:
        raise ValueError(f"items {list(items)}: must include {', '.join(missing)} (the energy registers bill, "
                         f"status word 3 is the relay's position)")
    if len(set(items)) != len(items):
        raise ValueError(f"items {list(items)}: an item is named twice")


@dataclass(frozen=True, kw_only=True)
class _Dlt645Line:
    """What every DL/T 645 channel has: the line's rate, the timeouts, the edition, the meters' credentials."""

    name: str
    #: the RS-485 line (behind a TCP server: its rate sets the wire time in the timeouts)
    baud: int = 2400
    #: how long a meter may take to answer (the standard: up to 500 ms), and slack for the host
    timeout_s: float = 0.5
    margin_s: float = 0.2
    retries: int = 2
    edition: Literal[2007, 1997] = 2007
    preamble: bool = True
    #: a file holding the meters' relay password (6 hex digits); "" = 000000
    password_file: str = ""
    operator: str = "00000000"
    #: what each poll reads from every meter (DL/T 645 data item names)
    items: tuple[str, ...] = DEFAULT_ITEMS

    def __post_init__(self) -> None:
        _check_channel(self)
        from protocols.dlt645 import di
        from protocols.dlt645.codes import Edition

        _check_items(self.items)
        missing = [name for name in self.items if di.by_name(name, Edition(self.edition)) is None]
        if missing:
            raise ValueError(f"edition {self.edition}: the gateway reads {', '.join(self.items)} from every meter "
                             f"and DL/T 645-{self.edition} has no {', '.join(missing)} (the relay's read-back); "
                             f"allowed: 2007")


@dataclass(frozen=True, kw_only=True)
class Dlt645TcpChannel(_Dlt645Line):
    """DL/T 645 through a TCP transparent serial server (or a DTU): the server's RS-485 line behind it."""

    host: str
    port: int
    kind: Literal["dlt645_tcp"] = "dlt645_tcp"
    margin_s: float = 0.3  # the network too


@dataclass(frozen=True, kw_only=True)
class Dlt645SerialChannel(_Dlt645Line):
    """DL/T 645 on an RS-485 line (a serial device: /dev/ttyUSB0, /dev/ttyS1)."""

    device: str
    kind: Literal["dlt645_serial"] = "dlt645_serial"
    #: real DL/T 645 lines run 8E1; Linux pseudo-terminals refuse E (use N there)
    parity: Parity = "E"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1


@dataclass(frozen=True)
class ModbusTcpChannel:
    """Modbus TCP meters at one endpoint (each meter's device id in the fleet file)."""

    name: str
    host: str
    port: int = 502
    kind: Literal["modbus_tcp"] = "modbus_tcp"
    #: a shipped register map (protocols/modbus/profiles/NAME.toml) or the path of a profile file
    profile: str = "hiking_dds238_2_znsr"
    timeout_s: float = 1.0
    unreachable_after: int = 3

    def __post_init__(self) -> None:
        _check_channel(self)


@dataclass(frozen=True)
class ModbusRtuChannel:
    """Modbus RTU meters on an RS-485 line."""

    name: str
    device: str
    kind: Literal["modbus_rtu"] = "modbus_rtu"
    profile: str = "hiking_dds238_2_znsr"
    baud: int = 9600
    parity: Parity = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout_s: float = 1.0
    unreachable_after: int = 3

    def __post_init__(self) -> None:
        _check_channel(self)


@dataclass(frozen=True)
class ConcentratorChannel:
    """An MQTT concentrator or 4G DTU (docs/concentrators.md), reached through the ``[mqtt]`` broker:
    ``frame`` mode forwards DL/T 645 frames, ``json`` mode takes typed commands."""

    name: str
    id: str
    kind: Literal["concentrator"] = "concentrator"
    mode: Literal["frame", "json"] = "frame"
    #: frame mode: the concentrator's RS-485 line and the network margin (two broker hops and a 4G link)
    baud: int = 2400
    timeout_s: float = 0.5
    margin_s: float = 2.0
    retries: int = 1
    #: json mode: how long a read or a relay command may take end to end
    read_timeout_s: float = 10.0
    relay_timeout_s: float = 10.0
    password_file: str = ""
    operator: str = "00000000"
    #: what each poll reads from every meter (frame mode: DL/T 645 item names; json mode: the contract's)
    items: tuple[str, ...] = DEFAULT_ITEMS

    def __post_init__(self) -> None:
        _check_channel(self)
        _check_items(self.items)
        from protocols.mqtt import concentrator as contract

        known = contract.ITEMS if self.mode == "json" else None
        if known is None:
            from protocols.dlt645 import di
            from protocols.dlt645.codes import Edition

            unknown = [name for name in self.items if di.by_name(name, Edition.DLT645_2007) is None]
        else:
            unknown = [name for name in self.items if name not in known]
        if unknown:
            raise ValueError(f"items: unknown item(s) {unknown} in {self.mode} mode")

        try:
            contract.topic(self.id, contract.STATUS)
        except ValueError as exc:
            raise ValueError(f"id: {exc}") from None


ChannelConfig = Dlt645TcpChannel | Dlt645SerialChannel | ModbusTcpChannel | ModbusRtuChannel | ConcentratorChannel
CHANNEL_KINDS = {c.__dataclass_fields__["kind"].default: c for c in
                 (Dlt645TcpChannel, Dlt645SerialChannel, ModbusTcpChannel, ModbusRtuChannel, ConcentratorChannel)}
#: the channel kinds whose meters speak DL/T 645 (their meter ids are DL/T 645 addresses)
DLT645_KINDS = {"dlt645_tcp", "dlt645_serial", "concentrator"}


def channel_protocol(channel: ChannelConfig) -> str:
    if channel.kind.startswith("modbus"):
        return "modbus"
    if channel.kind == "concentrator" and channel.mode == "json":
        return "mqtt-json"
    return "dlt645"


# --------------------------------------------------------------------------- the whole service


#: the tables of a gateway config file
TABLES = ("store", "control", "mqtt", "http", "metrics", "gateway", "thresholds", "fleet", "cluster", "channels")


@dataclass(frozen=True)
class ServiceConfig:
    """A whole gateway from one file. The tables are the file's, with relative paths resolved against the
    file's directory; ``policies``, ``tariffs``, ``accounts`` and ``meters`` are what the files it names
    hold."""

    store: StoreSettings = StoreSettings()
    control: ControlSettings = ControlSettings()
    mqtt: BrokerConfig = BrokerConfig()
    http: HttpSettings = HttpSettings()
    metrics: MetricsSettings = MetricsSettings()
    gateway: GatewaySettings = GatewaySettings()
    thresholds: ThresholdPolicy = ThresholdPolicy()
    fleet: FleetSettings = FleetSettings()
    channels: tuple[ChannelConfig, ...] = ()
    #: None: a single instance (the table is absent)
    cluster: ClusterSettings | None = None
    policies: ControlConfig = field(default_factory=ControlConfig)
    tariffs: dict = field(default_factory=dict)  # as config/tariffs.example.json (tariff id -> versions)
    accounts: tuple[Account, ...] = ()
    meters: tuple[Meter, ...] = ()
    #: the Modbus meters' device ids on their lines (meter id -> unit id), from the fleet file
    devices: dict = field(default_factory=dict)
    #: the meter passwords read from the channels' password files (channel name -> password); never logged
    passwords: dict = field(default_factory=dict, repr=False, compare=False)
    path: Path | None = field(default=None, compare=False)

    def cluster_digest(self) -> str:
        """What every instance of a cluster must have alike: the channels, the fleet (each meter's account and
        channel, the accounts without meters) and the lease ttl. Not the instance's own settings."""
        fleet = sorted((m.meter_id, m.account_id, m.channel) for m in self.meters)
        with_meters = {m.account_id for m in self.meters}
        text = json.dumps({"channels": sorted(c.name for c in self.channels), "meters": fleet,
                           "without_meters": sorted(a.account_id for a in self.accounts
                                                    if a.account_id not in with_meters),
                           "lease_ttl_s": self.cluster.lease_ttl_s if self.cluster else None})
        return hashlib.sha256(text.encode()).hexdigest()

    def meters_on(self, name: str) -> list[Meter]:
        return self._by_channel.get(name, [])

    @functools.cached_property
    def _by_channel(self) -> dict[str, list[Meter]]:
        out: dict[str, list[Meter]] = {}
        for m in self.meters:
            out.setdefault(m.channel, []).append(m)
        return out


def load_service_config(path: str | Path) -> ServiceConfig:
    """The whole service from a gateway config file and the files it names; every error at once
    (:class:`ConfigErrors`)."""
    config, errors = check_service_config(path)
    if errors:
        raise ConfigErrors(errors)
    return config


def check_service_config(path: str | Path) -> tuple[ServiceConfig | None, list[str]]:
    """The config and every error found (each a line naming the file, the key or line:column, and what is
    allowed); the config is ``None`` when there is any error."""
    path = Path(path)
    try:
        data = _read(path)
    except ConfigError as exc:
        return None, [str(exc)]
    check = _Check(path)
    errors: list[ConfigError] = []
    for key in sorted(set(data) - set(TABLES)):
        errors.append(ConfigError(f"{key}: unknown table; allowed: {', '.join(TABLES)}"))
    tables = {key: build_all(cls, data[key], key, errors) if key in data else cls() for key, cls in
              (("store", StoreSettings), ("control", ControlSettings), ("mqtt", BrokerConfig),
               ("http", HttpSettings), ("metrics", MetricsSettings), ("gateway", GatewaySettings),
               ("thresholds", ThresholdPolicy), ("fleet", FleetSettings))}
    if "cluster" in data:
        tables["cluster"] = build_all(ClusterSettings, data["cluster"], "cluster", errors)
        store = tables["store"]
        if store is not None and not store.url.startswith(("postgresql://", "postgres://")):
            errors.append(ConfigError("cluster: several instances share a PostgreSQL database: [store] url must "
                                      "be postgresql://USER@HOST/DB with [cluster] (SQLite: one instance, "
                                      "remove [cluster])"))
    raw = data.get("channels", [])
    channels = _channels(raw, errors)
    check.problems += [f"{path}: {e}" for e in errors]
    tables.update(check.files(tables, channels))
    passwords = check.channels(raw if isinstance(raw, list) else [], channels)
    check.listeners(tables["http"], tables["metrics"])
    policies = check.policies(tables["control"])
    tariffs, accounts, meters, devices = check.fleet(tables["fleet"], raw if isinstance(raw, list) else [],
                                                     channels, policies)
    if tables.get("cluster") is not None and tables["fleet"] is not None:
        check.one_channel_per_account(tables["fleet"].file, meters)
    cluster, gateway = tables.get("cluster"), tables["gateway"]
    if cluster is not None and gateway is not None and gateway.tick_s > cluster.lease_ttl_s / 2:
        check.error("gateway.tick_s", f"{gateway.tick_s:g} with [cluster] lease_ttl_s {cluster.lease_ttl_s:g}: the "
                                      f"leases are renewed only while the writer commits, and the tick commits "
                                      f"every tick_s; allowed: at most lease_ttl_s / 2")
    if any(t is None for t in tables.values()) or any(c is None for c in channels) or check.problems:
        return None, check.problems
    return ServiceConfig(**tables, channels=tuple(channels), policies=policies, tariffs=tariffs,
                         accounts=tuple(accounts), meters=tuple(meters), devices=devices, passwords=passwords,
                         path=path), []


class _Check:
    """The checks that look beyond one table: files named, channels against each other, the policies file,
    the fleet and tariffs. Errors go to ``problems``, each naming the file and the key or line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent
        self.problems: list[str] = []

    def error(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    def resolved(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(self.base / p))

    def existing(self, key: str, value: str) -> str:
        """A file setting resolved against the config's directory; an error when it names no file."""
        if not value:
            return value
        p = self.resolved(value)
        if not p.is_file():
            self.error(key, f"{p}: no such file")
        return str(p)

    def files(self, tables: dict, channels: list) -> dict:
        """The tables whose paths are resolved (and checked)."""
        out = {}
        store, mqtt, http = tables["store"], tables["mqtt"], tables["http"]
        if store is not None and store.url.startswith("sqlite://"):
            out["store"] = StoreSettings("sqlite://" + str(self.resolved(store.url.removeprefix("sqlite://"))))
        if mqtt is not None:
            out["mqtt"] = dataclasses.replace(mqtt, **{k: self.existing(f"mqtt.{k}", getattr(mqtt, k)) for k in
                                                       ("password_file", "tls_ca_file", "tls_cert_file",
                                                        "tls_key_file")})
            if mqtt.tls_ca_file and any(c.kind == "concentrator" for c in channels if c is not None):
                self.error("mqtt.tls_ca_file", "concentrators are reached through the [mqtt] broker without TLS "
                                               "(not supported yet); allowed with concentrator channels: \"\"")
        if http is not None:
            out["http"] = dataclasses.replace(http, tokens_file=self.existing("http.tokens_file", http.tokens_file))
        if tables["control"] is not None:
            out["control"] = ControlSettings(self.existing("control.file", tables["control"].file))
        fleet = tables["fleet"]
        if fleet is not None:
            out["fleet"] = FleetSettings(self.existing("fleet.file", fleet.file),
                                         self.existing("fleet.tariffs", fleet.tariffs))
        return out

    def channels(self, raw: list, channels: list) -> dict[str, str]:
        """Names unique (as written: a channel with errors still has one), password files read (channel name
        -> password), Modbus profiles loaded; ``channels`` updated with resolved paths."""
        seen: dict[str, int] = {}
        for i, name in enumerate(_names(raw)):
            if name in seen:
                self.error(f"channels[{i}].name", f"{name!r} is also channels[{seen[name]}]'s; channel names "
                                                  f"must be unique")
            if name is not None:
                seen.setdefault(name, i)
        self._one_channel_per_line(channels)
        passwords = {}
        for i, c in enumerate(channels):
            if c is not None and getattr(c, "password_file", ""):
                key = f"channels[{i}].password_file"
                channels[i] = c = dataclasses.replace(c, password_file=self.existing(key, c.password_file))
                try:
                    secret = Path(c.password_file).read_text(encoding="utf-8").strip()
                except OSError:
                    continue  # reported above
                if not re.fullmatch(r"[0-9A-Fa-f]{6}", secret):  # the file's content is never shown
                    self.error(key, "the password must be 6 hex digits (P0..P2 as printed)")
                passwords[c.name] = secret
            if c is not None and c.kind.startswith("modbus"):
                from protocols.modbus import load_profile
                from protocols.modbus.profile import shipped

                profile = str(self.resolved(c.profile)) if c.profile.endswith(".toml") else c.profile
                try:
                    load_profile(profile)
                except Exception as exc:  # ProfileError, or a file that cannot be read
                    known = "" if "shipped" in str(exc) else f"; shipped: {', '.join(sorted(shipped()))}"
                    self.error(f"channels[{i}].profile", f"{exc}{known}")
                channels[i] = dataclasses.replace(c, profile=profile)
        return passwords

    def _one_channel_per_line(self, channels: list) -> None:
        """Two channels on one line (a TCP endpoint, a serial device, a concentrator id) would poll it twice,
        their frames colliding on a half-duplex bus: an error naming both."""
        seen: dict[tuple, int] = {}
        for i, c in enumerate(channels):
            if c is None:
                continue
            if hasattr(c, "host"):
                line, key, shown = ("tcp", c.host.lower(), c.port), f"channels[{i}].port", f"{c.host}:{c.port}"
            elif hasattr(c, "device"):
                line, key, shown = ("device", os.path.normpath(c.device)), f"channels[{i}].device", c.device
            else:
                line, key, shown = ("concentrator", c.id), f"channels[{i}].id", f"concentrator id {c.id!r}"
            if line in seen:
                self.error(key, f"{shown} is also channels[{seen[line]}]'s line; one channel per line (a bus "
                                f"answers one request at a time)")
            seen.setdefault(line, i)

    def listeners(self, http: HttpSettings | None, metrics: MetricsSettings | None) -> None:
        if http is not None and metrics is not None and http.port and http.port == metrics.port and \
                (http.host == metrics.host or "0.0.0.0" in (http.host, metrics.host)):
            self.error("metrics.port", f"{metrics.port} is also [http]'s port on {http.host}; the operator API "
                                       f"and the metrics need a port each")

    def policies(self, control: ControlSettings | None) -> ControlConfig:
        """The policies file's, every error in it reported (the built-in defaults when none is named)."""
        if control is None or not control.file or not Path(control.file).is_file():
            return ControlConfig()
        file = control.file
        try:
            found: list[ConfigError] = []
            policies = build_all(ControlConfig, _read(Path(file)), "", found)
            self.problems += [f"{file}: {e}" for e in found]
            return policies or ControlConfig()
        except ConfigError as exc:  # not readable, not TOML
            self.problems.append(str(exc))
            return ControlConfig()

    def fleet(self, fleet: FleetSettings | None, raw: list, channels: list, policies: ControlConfig):
        """(tariffs, accounts, meters, Modbus device ids) from the fleet and tariffs files."""
        from gateway.fleet import read_fleet

        if fleet is None:
            return {}, (), (), {}
        tariffs = _tariffs(Path(fleet.tariffs), self.problems) if fleet.tariffs and Path(fleet.tariffs).is_file() \
            else {}
        if not fleet.file or not Path(fleet.file).is_file():
            return tariffs, (), (), {}
        fleet_file = fleet.file
        named: dict = {}  # name -> channel (None: one with errors, reported above; its rows are not checked)
        for name, c in zip(_names(raw), channels):
            if name is not None:
                named.setdefault(name, c)
        return (tariffs, *read_fleet(Path(fleet_file), named, set(tariffs), set(policies.notices.channels),
                                     self.problems))

    def one_channel_per_account(self, fleet_file: str, meters) -> None:
        """With ``[cluster]``: the instance holding an account's channel acts for all its meters (notices,
        cases, every relay command), so they must all be on that one channel."""
        channels: dict[str, list[str]] = {}
        for m in meters:
            if m.channel not in channels.setdefault(m.account_id, []):
                channels[m.account_id].append(m.channel)
        for account, names in channels.items():
            if len(names) > 1:
                self.problems.append(
                    f"{fleet_file}: account {account} has meters on channels {', '.join(sorted(names))}; with "
                    f"[cluster] every meter of an account must be on one channel (one instance acts for the "
                    f"whole account and can send only on the channels it holds): put them on one channel")


def _names(raw: list) -> list[str | None]:
    return [item.get("name") if isinstance(item, dict) and isinstance(item.get("name"), str) else None
            for item in raw]


def _channels(items, errors: list) -> list:
    """``[[channels]]``: each table built by its ``kind``; ``None`` in place of one with errors."""
    if not isinstance(items, list):
        errors.append(ConfigError(f"channels: expected [[channels]] tables, got {items!r}"))
        return []
    out = []
    for i, item in enumerate(items):
        where = f"channels[{i}]"
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind not in CHANNEL_KINDS:
            shown = "missing" if kind is None else repr(kind)
            errors.append(ConfigError(f"{where}.kind: {shown}; allowed: {', '.join(CHANNEL_KINDS)}"))
            out.append(None)
            continue
        cls = CHANNEL_KINDS[kind]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in item]
        for name in missing:
            errors.append(ConfigError(f"{where}.{name}: required for kind {kind!r}"))
        if missing:
            # the rest is still checked, each setting on its own
            build_all(cls, {k: v for k, v in item.items() if k not in required}, where, errors,
                      base=_placeholder(cls))
            out.append(None)
            continue
        out.append(build_all(cls, item, where, errors))
    return out


def _placeholder(cls):
    """An instance with stand-ins for the required settings, to check the others against."""
    stand_in = {"name": "x", "host": "x", "port": 1, "device": "x", "id": "x"}
    return cls(**{f.name: stand_in[f.name] for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING})


def _tariffs(path: Path, problems: list[str]) -> dict:
    from gateway.core.tariff import Tariff

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: not valid JSON: {exc}")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected an object of tariff id -> versions")
        return {}
    good = {}
    for tid, versions in data.items():
        if tid.startswith("_"):
            continue
        try:
            Tariff.from_config(tid, versions)
        except Exception as exc:  # TariffError, MoneyError, a wrong shape
            problems.append(f"{path}: {tid}: {exc}")
            continue
        good[tid] = versions
    return good


__all__ = ["ConfigError", "ConfigErrors", "ServiceConfig", "check_service_config", "load_broker_config",
           "load_control_config", "load_service_config"]
