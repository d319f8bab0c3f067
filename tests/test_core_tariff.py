"""Tariffs: flat, time-of-use, annual tiers split exactly, versions over time."""
import numpy as np
import pytest

from gateway.core.model import MoneyError, price_to_mfen, yuan_to_fen
from gateway.core.tariff import Tariff, TariffError, Tier, TariffVersion, TierCalendar, cost_ufen, split_interval, tier_split

from .core_fixtures import CST, DAY, T0, engine, read, tariffs


def test_units_are_exact():
    assert price_to_mfen("0.4883") == 48830
    assert yuan_to_fen("12.34") == 1234
    with pytest.raises(MoneyError, match="float"):
        yuan_to_fen(12.34)
    with pytest.raises(MoneyError, match="fractions of a fen"):
        yuan_to_fen("0.001")
    with pytest.raises(MoneyError):
        price_to_mfen("0.123456")


def test_flat_tariff_cost():
    v = tariffs()["flat"].versions[0]
    # 10 kWh at 0.50 yuan = 5 yuan = 500 fen = 5e8 micro-fen
    assert cost_ufen(v, np.array([10_000]), np.zeros((1, 4), np.int64), np.zeros(1, np.int64))[0] == 500_000_000


def test_time_of_use_prices_each_register():
    v = tariffs()["tou"].versions[0]
    d_tou = np.array([[1000, 2000, 3000, 4000]])  # kWh*1000 in sharp/peak/flat/valley
    cost = cost_ufen(v, np.array([10_000]), d_tou, np.zeros(1, np.int64))[0]
    assert cost == (1 * 100_000 + 2 * 80_000 + 3 * 50_000 + 4 * 30_000) * 1000


def test_tier_boundary_inside_one_interval_is_split_exactly():
    tiers = tariffs()["tiered"].versions[0].tiers
    # 2100 kWh used this year; 5000 kWh more crosses both boundaries
    split = tier_split(np.array([2_100_000]), np.array([5_000_000]), tiers)
    assert split.tolist() == [[60_000, 2_040_000, 2_900_000]]
    assert split.sum() == 5_000_000
    v = tariffs()["tiered"].versions[0]
    cost = cost_ufen(v, np.array([5_000_000]), np.zeros((1, 4), np.int64), np.array([2_100_000]))[0]
    assert cost == 5_000_000 * 48_830 + 2_040_000 * 5_000 + 2_900_000 * 30_000


def test_tier_split_property():
    rng = np.random.default_rng(1)
    tiers = tariffs()["tiered"].versions[0].tiers
    ytd = rng.integers(0, 6_000_000, 1000)
    d = rng.integers(0, 3_000_000, 1000)
    s = tier_split(ytd, d, tiers)
    assert (s.sum(axis=1) == d).all() and (s >= 0).all()


def test_engine_uses_tariff_in_force_and_splits_across_a_change():
    t = tariffs()
    t["flat"].add_version(TariffVersion(T0 + DAY, "flat", (price_to_mfen("1.0000"),)))
    from gateway.core.engine import Engine
    from gateway.core.model import Account, Meter
    from .core_fixtures import POLICY
    e = Engine(t, POLICY)
    e.add_accounts([Account("A0", tariff_id="flat")])
    e.add_meters([Meter("M0", "A0")])
    read(e, [("M0", T0 - DAY, 100)])  # baseline
    read(e, [("M0", T0, 110)])  # 10 kWh at 0.50 = 500 fen
    assert e.cost[0] == 500 * 10**6
    read(e, [("M0", T0 + 2 * DAY, 130)])  # 20 kWh over two days: half at 0.50, half at 1.00
    assert e.cost[0] == (500 + 500 + 1000) * 10**6


def test_tier_year_resets_and_interval_across_new_year_is_split():
    e = engine(1, "tiered")
    from datetime import datetime
    dec31 = int(datetime(2025, 12, 31, tzinfo=CST).timestamp())
    jan2 = int(datetime(2026, 1, 2, tzinfo=CST).timestamp())
    read(e, [("M0", dec31 - 300 * DAY, 0)])
    read(e, [("M0", dec31, 5000)])  # 5000 kWh in 2025: into tier 3
    assert e.ytd_wh[0] == 5_000_000
    read(e, [("M0", jan2, 5020)])  # 20 kWh over two days, one in each year
    assert e.ytd_year[0] == 2026 and e.ytd_wh[0] == 10_000
    # 10 kWh in 2025 at tier 3 (+0.30), 10 kWh in 2026 at tier 1
    before = 5_000_000 * 48_830 + (4_200_000 - 2_160_000) * 5_000 + (5_000_000 - 4_200_000) * 30_000
    assert e.cost[0] - before == 20_000 * 48_830 + 10_000 * 30_000


def test_split_interval_loses_no_energy():
    parts = split_interval(0, 10, [3, 7], [1001, 7])
    assert [p[:2] for p in parts] == [(0, 3), (3, 7), (7, 10)]
    assert [sum(p[2][i] for p in parts) for i in range(2)] == [1001, 7]


def test_bad_tariff_configs_are_refused_with_where():
    with pytest.raises(TariffError, match="tariff x version 0: missing 'price'"):
        Tariff.from_config("x", [{"effective_from": 0, "kind": "flat"}])
    with pytest.raises(TariffError, match="kind 'weird'"):
        Tariff.from_config("x", [{"effective_from": 0, "kind": "weird", "price": "1"}])
    with pytest.raises(TariffError, match="tiers must start at 0"):
        TariffVersion(0, "flat", (1,), (Tier(5, 1),))
    with pytest.raises(TariffError, match="no versions"):
        Tariff("x", [])


def test_tier_calendar_uses_local_year():
    cal = TierCalendar()
    from datetime import datetime, timezone
    # 2025-12-31 20:00 UTC is already 2026 in Beijing
    t = int(datetime(2025, 12, 31, 20, tzinfo=timezone.utc).timestamp())
    assert cal.year(np.array([t]))[0] == 2026


def test_naive_effective_from_is_in_the_utilitys_zone_not_the_hosts():
    t = Tariff.from_config("x", [{"effective_from": "2026-07-01T00:00:00", "kind": "flat", "price": "1"}])
    assert t.versions[0].effective_from == 1782835200  # 2026-06-30 16:00 UTC
    with pytest.raises(TariffError, match="surcharges must not be negative"):
        TariffVersion(0, "flat", (1,), (Tier(0, 0), Tier(5, -1)))


def test_a_late_reading_of_last_year_does_not_reset_this_years_blocks():
    from datetime import datetime
    from gateway.core.engine import Engine
    from gateway.core.model import Account, Meter
    from .core_fixtures import POLICY
    e = Engine(tariffs(), POLICY)
    e.add_accounts([Account("A", tariff_id="tiered")])
    e.add_meters([Meter("M1", "A", max_kw=100), Meter("M2", "A", max_kw=100)])
    start = int(datetime(2025, 1, 2, tzinfo=CST).timestamp())
    dec31 = int(datetime(2025, 12, 31, 23, 59, tzinfo=CST).timestamp())
    jan1 = int(datetime(2026, 1, 1, 0, 10, tzinfo=CST).timestamp())
    read(e, [("M1", start, 0), ("M2", start, 0)])
    read(e, [("M1", dec31 - 7200, 5000)])  # 5000 kWh in 2025: into block 3
    read(e, [("M1", jan1, 5000.5)])  # 0.5 kWh, partly 2026
    before_year, before_ytd = int(e.ytd_year[0]), int(e.ytd_wh[0])
    cost0 = int(e.cost[0])
    read(e, [("M2", dec31, 10)])  # M2's 2025 reading arrives late: 10 kWh of 2025, at block 3
    assert (int(e.ytd_year[0]), int(e.ytd_wh[0])) == (before_year, before_ytd) == (2026, before_ytd)
    assert int(e.cost[0]) - cost0 == 10_000 * (48_830 + 30_000)
