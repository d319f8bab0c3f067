"""A gateway-like process for the crash tests: replays a deterministic input stream into the store.

Run: python -m tests.crash_child STORE_URL SEED STEPS. It prints ``step N`` after each committed step and
starts over from step 0 on every start, as an upstream that re-delivers everything would: what was
already committed must come back as duplicates, never as second effects.
"""
import random
import sys

from gateway.accounting import Accounting
from gateway.core.engine import ReadingBatch
from gateway.core.model import Account, CustomerClass, Meter, Payment
from gateway.store import open_store
from tests.core_fixtures import POLICY, T0, tariffs

ACCOUNTS = 400
STEP_S = 900


def plan(seed: int, step: int):
    """What arrives at ``step``: a read cycle of every meter, or a burst of payments (with duplicates)."""
    rng = random.Random(seed * 100_003 + step)
    if step % 3 == 2:
        payments = []
        for _ in range(rng.randint(20, 60)):
            k = rng.randrange(step + 1)  # ids from earlier steps too: duplicates and late, out-of-order ones
            r2 = random.Random(seed * 7919 + k * 131 + len(payments) % 5)
            a = r2.randrange(ACCOUNTS)
            payments.append(Payment(f"pay-{k}-{a}-{len(payments) % 5}", f"A{a}", r2.randint(100, 20_000),
                                    T0 + k * STEP_S))
        return "credits", payments
    rows = []
    for m in range(ACCOUNTS):
        r2 = random.Random(seed * 31 + m)
        base = r2.randint(0, 10**7)
        per_step = r2.randint(0, 1200)  # Wh per 15 minutes: up to 4.8 kW
        total = base + per_step * step + (step * m) % 7
        rows.append((m, T0 + step * STEP_S, total, 0, 0, 0, 0))
        if rng.random() < 0.01:  # now and then a glitch: backwards
            rows.append((m, T0 + step * STEP_S + 1, total - 500, 0, 0, 0, 0))
    return "readings", rows


def main() -> None:
    url, seed, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    acc = Accounting(open_store(url), POLICY)
    classes = [CustomerClass.RESIDENTIAL, CustomerClass.COMMERCIAL, CustomerClass.PROTECTED, CustomerClass.VIP]
    acc.register(tariffs(), [Account(f"A{i}", classes[i % 4] if i % 10 == 0 else CustomerClass.RESIDENTIAL,
                                     tariff_id="tiered" if i % 2 else "flat") for i in range(ACCOUNTS)],
                 [Meter(f"M{i}", f"A{i}", max_kw=10) for i in range(ACCOUNTS)])
    acc.reevaluate(T0)
    for step in range(steps):
        kind, items = plan(seed, step)
        now = T0 + step * STEP_S
        if kind == "credits":
            acc.ingest_credits(items, now)
        else:
            acc.ingest_readings(ReadingBatch.from_rows(items), now)
        print(f"step {step}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
