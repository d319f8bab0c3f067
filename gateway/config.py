"""Configuration files: TOML read from disk, checked into the policies (``gateway.core.config``)."""
from __future__ import annotations

import tomllib
from pathlib import Path

from gateway.core.config import ConfigError, build
from gateway.core.control import ControlConfig


def load_control_config(path: str | Path) -> ControlConfig:
    """The disconnect/reconnect policies from a TOML file (see config/control.example.toml)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return build(ControlConfig, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


__all__ = ["ConfigError", "load_control_config"]
