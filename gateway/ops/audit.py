"""The audit log's hash chain: how a record is linked, and the check that finds a record changed, removed or
slipped in.

Each ``audit_log`` row carries ``prev_hash`` (the hash of the record before it, ``""`` for the first) and
``hash = sha256(canonical(prev_hash, at, actor, role, action, subject, reason, detail))``, the detail as the
JSON text stored. The store appends (:meth:`gateway.store.base.Store.append_audit`) with the chain's head row
locked in the same transaction; triggers refuse UPDATE and DELETE. The head row counts the records and keeps
the last hash, so records cut off the end are found too.

Anyone who can write the database can rebuild the whole chain after a change: keep the head hash that
``feikong audit verify`` prints somewhere else (a ticket, the operations log) to pin the chain up to it.

Pure except :func:`verify_chain`, which only reads through the store port.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

PAGE = 1000


def canonical(prev_hash: str, at: float, actor: str, role: str, action: str, subject: str, reason: str,
              detail: str) -> bytes:
    """The bytes a record's hash covers: one JSON array, compact, UTF-8, the time as a float."""
    return json.dumps([prev_hash, float(at), actor, role, action, subject, reason, detail], ensure_ascii=False,
                      separators=(",", ":")).encode()


def link_hash(prev_hash: str, at: float, actor: str, role: str, action: str, subject: str, reason: str,
              detail: str) -> str:
    return hashlib.sha256(canonical(prev_hash, at, actor, role, action, subject, reason, detail)).hexdigest()


class ChainHeadMissing(Exception):
    """The chain's head row is gone (the store raises it): nothing audited can be committed, and the chain
    cannot be checked, until it is restored."""


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    records: int  # records checked
    head: str  # the last record's hash (pin it elsewhere)
    bad_seq: int | None = None  # the first bad record
    why: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"audit chain intact: {self.records} records, head {self.head or '(empty)'}"
        where = f"record {self.bad_seq}" if self.bad_seq is not None else "the chain"
        return f"audit chain broken at {where}: {self.why}"


def verify_chain(store) -> ChainReport:
    """Walk the chain in order and report the first record that does not fit: content not matching its hash
    (edited), a link to a record that is not the one before it (one deleted or inserted), or a chain that
    does not end where the head row says (records cut off the end, or appended around the chain). Safe while
    gateways append: what they commit meanwhile is checked too, or is past the end the walk saw."""
    walk = ChainWalk()
    while (report := walk.step(store)) is None:
        pass
    return report


class ChainWalk:
    """The verification a page at a time: :meth:`step` reads one page (and the head row around it) and returns
    the report when done, else None. The API runs each step through the writer, so a long log never holds it."""

    def __init__(self) -> None:
        self.after, self.n = 0, 0  # the last seq seen, how many records seen
        self.expected, self.before_prev, self.prev_seq = "", None, None  # the last hash, the one before, its seq

    def step(self, store, page: int | None = None) -> ChainReport | None:
        if self.n == 0 and self.after == 0 and store.schema_version() < 4:
            return ChainReport(False, 0, "", None, f"the store is at schema version {store.schema_version()}: the "
                                                   f"audit chain starts with version 4 (start the gateway once)")
        try:
            head = store.audit_head()  # before the page: everything it counts is committed, so in the page or before
            rows = store.audit_chain(self.after, page or PAGE)
            if not rows:
                return self._end(*head)
            counted = store.audit_head()[0]  # after the page: it counts every record the page has
        except ChainHeadMissing as exc:
            return ChainReport(False, self.n, "", None, str(exc))
        for row in rows:
            report = self._feed(row, counted)
            if report is not None:
                return report
        return None

    def _feed(self, row: tuple, counted: int) -> ChainReport | None:
        seq, at, actor, role, action, subject, reason, detail, prev_hash, digest = row
        self.n += 1
        if self.n > counted:
            return self._bad(seq, f"the head row counts {counted} records and ends at record {self.prev_seq}: this "
                                  f"one was not appended through the chain")
        if prev_hash != self.expected:
            if self.before_prev is not None and prev_hash == self.before_prev:
                return self._bad(self.prev_seq, f"inserted: record {seq} links to the record before this one")
            what = f"record {self.prev_seq}" if self.prev_seq is not None else "the start of the chain"
            return self._bad(seq, f"its link does not match {what}: a record before it was deleted, or {what} was "
                                  f"changed and re-hashed")
        if link_hash(prev_hash, at, actor, role, action, subject, reason, detail) != digest:
            return self._bad(seq, "changed: its content does not match its hash")
        self.before_prev, self.expected, self.prev_seq, self.after = self.expected, digest, seq, seq
        return None

    def _bad(self, seq: int | None, why: str) -> ChainReport:
        return ChainReport(False, self.n - 1, self.expected, seq, why)

    def _end(self, count: int, head_hash: str) -> ChainReport:
        if self.n < count:
            return ChainReport(False, self.n, self.expected, None, f"{count - self.n} record(s) missing from the end: "
                                                                  f"the head row counts {count}, the log has {self.n}")
        if self.expected != head_hash:
            return ChainReport(False, self.n, self.expected, self.prev_seq,
                               "the last record is not the one the head row names")
        return ChainReport(True, self.n, self.expected)
