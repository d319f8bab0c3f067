"""Ledger arithmetic: balances and the oldest-arrears-first allocation behind a customer's statement.

Charges come from readings (exact micro-fen per interval; the fen amount of a
charge is the step of the cumulative total rounded down, so rounding never
accumulates). Credits are payments and positive adjustments; refunds and
negative adjustments are debits like charges. Every credit settles the oldest
outstanding debit first; credit left over waits for the next debit.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .model import UFEN_PER_FEN

@dataclass(frozen=True)
class Entry:
    entry_id: str
    kind: str  # charge, payment, adjustment, refund
    amount_fen: int  # signed as the customer sees it: charges and refunds negative, credits positive
    at: int
    note: str = ""


@dataclass(frozen=True)
class Allocation:
    credit_id: str
    debit_id: str
    amount_fen: int


@dataclass
class Statement:
    account_id: str
    entries: list[Entry]
    allocations: list[Allocation]
    balance_fen: int
    arrears: list[tuple[str, int]] = field(default_factory=list)  # debits still unpaid, oldest first
    unused_credit_fen: int = 0

    def settled_by(self, debit_id: str) -> list[Allocation]:
        return [a for a in self.allocations if a.debit_id == debit_id]

    def settles(self, credit_id: str) -> list[Allocation]:
        return [a for a in self.allocations if a.credit_id == credit_id]


def charges_from_cumulative(rows: list[tuple[str, int, int]], before_ufen: int = 0) -> list[Entry]:
    """``(reading_id, at, cost_ufen)`` in time order -> charge entries in whole fen (cumulative floor steps),
    continuing from ``before_ufen`` already charged earlier."""
    out, cum = [], before_ufen
    prev_fen = cum // UFEN_PER_FEN
    for reading_id, at, cost in rows:
        cum += cost
        fen = cum // UFEN_PER_FEN
        if fen != prev_fen:
            out.append(Entry(reading_id, "charge", -(fen - prev_fen), at))
            prev_fen = fen
    return out


def allocate(account_id: str, entries: list[Entry]) -> Statement:
    """Match credits to debits oldest first; ``entries`` in the order they happened."""
    debts: deque[list] = deque()  # [debit_id, outstanding]
    credits: deque[list] = deque()  # [credit_id, unused]
    allocations: list[Allocation] = []
    balance = 0
    for e in entries:
        balance += e.amount_fen
        if e.amount_fen > 0:
            left = e.amount_fen
            while left and debts:
                debt = debts[0]
                take = min(left, debt[1])
                allocations.append(Allocation(e.entry_id, debt[0], take))
                debt[1] -= take
                left -= take
                if not debt[1]:
                    debts.popleft()
            if left:
                credits.append([e.entry_id, left])
        elif e.amount_fen < 0:
            owed = -e.amount_fen
            while owed and credits:
                credit = credits[0]
                take = min(owed, credit[1])
                allocations.append(Allocation(credit[0], e.entry_id, take))
                credit[1] -= take
                owed -= take
                if not credit[1]:
                    credits.popleft()
            if owed:
                debts.append([e.entry_id, owed])
    return Statement(account_id, list(entries), allocations, balance,
                     arrears=[(d, o) for d, o in debts], unused_credit_fen=sum(c for _, c in credits))
