"""Shared builders for core tests: a small utility with flat, TOU and tiered tariffs."""
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gateway.core.engine import Engine, ReadingBatch
from gateway.core.model import Account, CostControlMode, CustomerClass, Meter
from gateway.core.tariff import tariffs_from_config
from gateway.core.thresholds import ThresholdPolicy

CST = timezone(timedelta(hours=8))
T0 = int(datetime(2026, 3, 1, tzinfo=CST).timestamp())
HOUR, DAY = 3600, 86400


EXAMPLE_TARIFFS = Path(__file__).resolve().parent.parent / "config" / "tariffs.example.json"


def tariffs():
    """flat 0.50; time of use 1.00/0.80/0.50/0.30; residential blocks 0.4883 (+0.05 above 2160 kWh, +0.30 above 4200)"""
    return tariffs_from_config(json.loads(EXAMPLE_TARIFFS.read_text()))


POLICY = ThresholdPolicy(default_warn1_fen=5000, default_warn2_fen=2000, hysteresis_fen=500)


def engine(n=3, tariff="flat", klass=CustomerClass.RESIDENTIAL, mode=CostControlMode.REMOTE, overdraft=0):
    e = Engine(tariffs(), POLICY)
    e.add_accounts([Account(f"A{i}", klass, mode, tariff, area="north", overdraft_limit_fen=overdraft)
                    for i in range(n)])
    e.add_meters([Meter(f"M{i}", f"A{i}", max_kw=20) for i in range(n)])
    return e


def read(e, rows, now=None):
    """rows: (meter_id, t, total_kwh[, (sharp, peak, flat, valley) kWh][, balance_fen])"""
    out = []
    for r in rows:
        mid, t, total = r[0], r[1], r[2]
        tou = r[3] if len(r) > 3 and r[3] is not None else (0, 0, 0, 0)
        row = [e.meter_no.get(mid, 10**9), t, round(total * 1000)] + [round(x * 1000) for x in tou]
        if len(r) > 4:
            row.append(r[4])
        out.append(row)
    if any(len(x) == 8 for x in out):
        from gateway.core.engine import NO_BALANCE
        out = [x if len(x) == 8 else x + [NO_BALANCE] for x in out]
    return e.apply_readings(ReadingBatch.from_rows(out), now or max(r[1] for r in rows))
