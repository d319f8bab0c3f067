"""Configuration files: TOML read from disk, checked into the policies (``gateway.core.config``)."""
from __future__ import annotations

import tomllib
from pathlib import Path

from gateway.core.config import ConfigError, build
from gateway.core.control import ControlConfig
from gateway.northbound.mqtt import BrokerConfig


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


__all__ = ["ConfigError", "load_broker_config", "load_control_config"]
