"""Ledger: oldest arrears first, statements, exact money."""
from gateway.core.ledger import Entry, allocate, charges_from_cumulative


def test_payment_settles_oldest_charges_first():
    entries = [Entry("c1", "charge", -300, 1), Entry("c2", "charge", -500, 2), Entry("c3", "charge", -200, 3),
               Entry("p1", "payment", 600, 4)]
    st = allocate("A", entries)
    assert st.balance_fen == -400
    assert [(a.debit_id, a.amount_fen) for a in st.settles("p1")] == [("c1", 300), ("c2", 300)]
    assert st.arrears == [("c2", 200), ("c3", 200)]


def test_prepaid_credit_settles_later_charges_and_shows_which():
    entries = [Entry("p1", "payment", 1000, 1), Entry("c1", "charge", -300, 2), Entry("p2", "payment", 500, 3),
               Entry("c2", "charge", -900, 4)]
    st = allocate("A", entries)
    assert st.balance_fen == 300
    assert [(a.credit_id, a.amount_fen) for a in st.settled_by("c2")] == [("p1", 700), ("p2", 200)]
    assert st.unused_credit_fen == 300 and st.arrears == []


def test_refund_is_a_debit():
    st = allocate("A", [Entry("p1", "payment", 1000, 1), Entry("r1", "refund", -400, 2)])
    assert st.balance_fen == 600 and st.settled_by("r1")[0].credit_id == "p1"


def test_charges_round_once_on_the_cumulative_total():
    # 100 readings of 0.4 fen each: per-reading rounding would charge 0 or 100 fen; the total is 40 fen
    rows = [(f"r{i}", i, 400_000) for i in range(100)]
    charges = charges_from_cumulative(rows)
    assert sum(c.amount_fen for c in charges) == -40
    assert all(c.amount_fen == -1 for c in charges)
