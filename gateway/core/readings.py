"""Readings: what a meter said, when, over which channel. Plain data, no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Reading:
    meter: str  # meter address
    taken_at: datetime
    channel: str  # e.g. tcp://127.0.0.1:6001 or serial:///dev/pts/3
    values: dict[str, Any] = field(default_factory=dict)  # data-item name -> decoded value
    errors: dict[str, str] = field(default_factory=dict)  # data-item name -> why it could not be read

    @property
    def complete(self) -> bool:
        return not self.errors
