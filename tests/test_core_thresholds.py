"""Threshold bands, hysteresis and calibration."""
import numpy as np
import pytest

from gateway.core.thresholds import Levels, ThresholdPolicy, calibrate, evaluate

P = ThresholdPolicy(hysteresis_fen=500)


def levels(n, w1=5000, w2=2000, trip=0, close=0):
    return Levels(np.full(n, w1), np.full(n, w2), np.full(n, trip), np.full(n, close))


def test_bands_downward():
    bal = np.array([6000, 5000, 2000, 1, 0, -100])
    new = evaluate(bal, np.zeros(6, np.int8), levels(6), 500)
    assert new.tolist() == [0, 1, 2, 2, 3, 3]


def test_hysteresis_holds_state_until_level_plus_margin():
    lv = levels(1)
    s = np.array([1], np.int8)
    assert evaluate(np.array([5100]), s, lv, 500).tolist() == [1]  # just above warning 1: still warned
    assert evaluate(np.array([5500]), s, lv, 500).tolist() == [1]
    assert evaluate(np.array([5501]), s, lv, 500).tolist() == [0]


def test_trip_band_is_left_only_above_the_close_level():
    lv = levels(1, close=1000)
    s = np.array([3], np.int8)
    assert evaluate(np.array([500]), s, lv, 500).tolist() == [3]
    assert evaluate(np.array([1001]), s, lv, 500).tolist() == [2]
    assert evaluate(np.array([10_000]), s, lv, 500).tolist() == [0]


def test_calibration_from_average_daily_cost_within_bounds():
    p = ThresholdPolicy(warn1_days=7, warn2_days=3, warn1_min_fen=2000, warn1_max_fen=50_000,
                        warn2_min_fen=1000, warn2_max_fen=20_000, default_warn1_fen=5000, default_warn2_fen=2000)
    lv = calibrate(np.array([100, 1000, 100_000, -1]), np.array([0, 0, 0, 5000]), p)
    assert lv.warn1.tolist() == [2000, 7000, 50_000, 5000]
    assert lv.warn2.tolist() == [1000, 3000, 20_000, 2000]
    assert lv.trip.tolist() == [0, 0, 0, -5000]


def test_policy_rejects_nonsense_with_the_key():
    with pytest.raises(ValueError, match="warn2_days must not exceed warn1_days"):
        ThresholdPolicy(warn1_days=2, warn2_days=5)
    with pytest.raises(ValueError, match="thresholds.warn1_min_fen must not exceed"):
        ThresholdPolicy(warn1_min_fen=10, warn1_max_fen=5)
