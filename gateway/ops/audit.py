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
    does not end where the head row says (records cut off the end, or appended around the chain)."""
    if store.schema_version() < 4:
        return ChainReport(False, 0, "", None, f"the store is at schema version {store.schema_version()}: "
                                               f"the audit chain starts with version 4 (start the gateway once)")
    head_count, head_hash = store.audit_head()
    expected, before_prev = "", None  # the previous record's hash, and the one before that
    prev_seq, n = None, 0
    after = 0
    while True:
        rows = store.audit_chain(after, PAGE)
        if not rows:
            break
        for seq, at, actor, role, action, subject, reason, detail, prev_hash, digest in rows:
            n += 1
            if n > head_count:
                return ChainReport(False, n - 1, expected, seq, f"the head row counts {head_count} records and "
                                   f"ends at record {prev_seq}: this one was not appended through the chain")
            if prev_hash != expected:
                if before_prev is not None and prev_hash == before_prev:
                    return ChainReport(False, n - 1, expected, prev_seq,
                                       f"inserted: record {seq} links to the record before this one")
                what = f"record {prev_seq}" if prev_seq is not None else "the start of the chain"
                return ChainReport(False, n - 1, expected, seq,
                                   f"its link does not match {what}: a record before it was deleted, or "
                                   f"{what} was changed and re-hashed")
            if link_hash(prev_hash, at, actor, role, action, subject, reason, detail) != digest:
                return ChainReport(False, n - 1, expected, seq, "changed: its content does not match its hash")
            before_prev, expected, prev_seq = expected, digest, seq
        after = rows[-1][0]
    if n < head_count:
        return ChainReport(False, n, expected, None, f"{head_count - n} record(s) missing from the end: the head "
                                                     f"row counts {head_count}, the log has {n}")
    if expected != head_hash:
        return ChainReport(False, n, expected, prev_seq, "the last record is not the one the head row names")
    return ChainReport(True, n, expected)
