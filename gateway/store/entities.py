"""Rows for the control entities (notices, disconnect cases, relay commands, work orders, approval requests),
written once.

Each table's columns are its dataclass's fields, in order (a test holds the migration's DDL to that):
enums are stored as their values, lists, tuples and dicts as JSON, booleans as 0/1, times as REAL seconds.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from gateway.core.approvals import ApprovalRequest
from gateway.core.commands import Command
from gateway.core.control import TripCase
from gateway.core.dispatch import WorkOrder
from gateway.core.notices import Attempt, Notice, ReceiptOutcome


def _json_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _attempts(items: list) -> list[Attempt]:
    return [Attempt(**{**a, "outcome": ReceiptOutcome(a["outcome"])}) for a in items]


@dataclass(frozen=True)
class EntityTable:
    name: str
    cls: type
    key: str
    decoders: dict[str, Callable[[Any], Any]]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.cls))

    def to_row(self, obj) -> tuple:
        row = []
        for name in self.columns:
            v = getattr(obj, name)
            if isinstance(v, Enum):
                v = v.value
            elif isinstance(v, bool):
                v = int(v)
            elif isinstance(v, (list, tuple, dict)):
                v = json.dumps(v, default=_json_default, ensure_ascii=False, sort_keys=True)
            row.append(v)
        return tuple(row)

    def from_row(self, row: tuple):
        return self.cls(**{name: self.decoders[name](v) if v is not None and name in self.decoders else v
                           for name, v in zip(self.columns, row)})


def _table(name: str, cls: type, key: str, **special: Callable[[Any], Any]) -> EntityTable:
    """Decoders from the dataclass's annotations: enums, booleans and JSON come back as they went in."""
    hints = typing.get_type_hints(cls)
    decoders: dict[str, Callable[[Any], Any]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: decode as X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        base = typing.get_origin(hint) or hint
        if f.name in special:
            decoders[f.name] = special[f.name]
        elif isinstance(base, type) and issubclass(base, Enum):
            decoders[f.name] = base
        elif base is bool:
            decoders[f.name] = bool
        elif base is tuple:
            decoders[f.name] = lambda v: tuple(json.loads(v))
        elif base in (list, dict):
            decoders[f.name] = json.loads
    return EntityTable(name, cls, key, decoders)


NOTICES = _table("notices", Notice, "notice_id", attempts=lambda v: _attempts(json.loads(v)))
CASES = _table("trip_cases", TripCase, "case_id")
COMMANDS = _table("relay_commands", Command, "command_id")
ORDERS = _table("work_orders", WorkOrder, "order_id")
REQUESTS = _table("approval_requests", ApprovalRequest, "request_id")
ENTITY_TABLES = (NOTICES, CASES, COMMANDS, ORDERS, REQUESTS)
