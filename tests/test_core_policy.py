"""Trip gates and calendars: forbidden windows, statutory holidays (maintained calendar), weather, config errors."""
from datetime import date

import pytest

from gateway.core.policy import (
    AreaFlag,
    Conditions,
    Forecast,
    Gate,
    Gates,
    Hours,
    PolicyError,
    TripPolicy,
    TripWindowPolicy,
    TripWindows,
    WorkCalendar,
)

from .control_fixtures import at

CAL = WorkCalendar()


def windows(**kw) -> TripWindows:
    return TripWindows(TripWindowPolicy(**kw), CAL)


def test_nights_are_forbidden_and_the_next_window_opens_in_the_morning():
    w = windows()
    assert w.block(at(2026, 3, 2, 10)) is None  # Monday 10:00
    b = w.block(at(2026, 3, 2, 16, 0))  # the window ends at 16:00 (end exclusive)
    assert b.gate == Gate.WINDOW and "16:00 is outside the trip hours 09:00-16:00" in b.reason
    assert b.retry_at == at(2026, 3, 3, 9)
    assert w.block(at(2026, 3, 3, 3)).retry_at == at(2026, 3, 3, 9)  # 3 a.m.


def test_weekends_are_forbidden_unless_allowed():
    b = windows().block(at(2026, 3, 7, 10))  # Saturday
    assert b.gate == Gate.WINDOW and "Saturday" in b.reason and b.retry_at == at(2026, 3, 9, 9)
    assert windows(allow_weekends=True).block(at(2026, 3, 7, 10)) is None


def test_statutory_holidays_come_from_the_maintained_calendar():
    # National Day 2026: 1-7 October off (substituted days included), Saturday 10 October a working day
    b = windows().block(at(2026, 10, 1, 10))
    assert b.gate == Gate.HOLIDAY and "National Day" in b.reason
    assert b.retry_at == at(2026, 10, 8, 9)
    assert windows().block(at(2026, 10, 6, 10)).gate == Gate.HOLIDAY  # a substituted day off
    # the working Saturday (调休): a weekend for trips by default, a working day where configured
    assert windows().block(at(2026, 10, 10, 10)).gate == Gate.WINDOW
    assert windows(weekend_workdays_allow_trips=True).block(at(2026, 10, 10, 10)) is None
    assert CAL.holiday(date(2026, 2, 17)) and CAL.holiday(date(2026, 2, 17)).startswith("Chinese New Year")


def test_fridays_and_holiday_eves_where_regulators_forbid_them():
    assert windows().block(at(2026, 3, 6, 10)) is None  # a Friday
    b = windows(forbid_fridays=True).block(at(2026, 3, 6, 10))
    assert b.gate == Gate.WINDOW and "Friday" in b.reason and b.retry_at == at(2026, 3, 9, 9)
    eve = at(2026, 9, 30, 10)  # Wednesday before National Day
    assert windows().block(eve) is None
    b = windows(forbid_holiday_eves=True).block(eve)
    assert b.gate == Gate.HOLIDAY and "eve" in b.reason


def test_local_calendar_additions_override_the_package():
    cal = WorkCalendar(extra_holidays=("2026-03-04",), extra_workdays=("2026-10-01",))
    w = TripWindows(TripWindowPolicy(), cal)
    assert w.block(at(2026, 3, 4, 10)).gate == Gate.HOLIDAY
    assert w.block(at(2026, 10, 1, 10)) is None
    with pytest.raises(PolicyError, match="extra_holidays: '2026-13-01' is not an ISO date"):
        WorkCalendar(extra_holidays=("2026-13-01",))


def test_weather_flags_and_forecasts_block_their_area_only():
    cond = Conditions()
    gates = Gates(TripPolicy(), CAL, cond)
    t = at(2026, 3, 2, 10)
    assert gates.time_block("north", t) is None
    cond.flags[("north", "extreme_weather")] = AreaFlag("north", "extreme_weather", True, t - 60, None, "ops",
                                                        "blizzard")
    b = gates.time_block("north", t)
    assert b.gate == Gate.WEATHER and "blizzard" in b.reason and b.retry_at is None
    assert gates.time_block("south", t) is None
    cond.flags[("north", "extreme_weather")] = AreaFlag("north", "extreme_weather", False, t, None)
    assert gates.time_block("north", t) is None
    cond.forecasts[("south", "2026-03-02")] = Forecast("south", "2026-03-02", -3.0, 5.0)
    b = gates.time_block("south", t)
    assert b.gate == Gate.WEATHER and "-3..5" in b.reason and b.retry_at == at(2026, 3, 3, 9)
    cond.forecasts[("south", "2026-03-03")] = Forecast("south", "2026-03-03", 25.0, 35.0)  # at the hot limit
    when, last = gates.next_permitted("south", t)
    assert when == at(2026, 3, 4, 9) and last.gate == Gate.WEATHER and "2026-03-03: 25..35" in last.reason


def test_bad_configuration_says_what_and_where():
    with pytest.raises(PolicyError, match="hours: '25:00-26:00' is not a window"):
        TripWindowPolicy(hours="25:00-26:00")
    with pytest.raises(PolicyError, match="must start before it ends"):
        Hours.parse("16:00-09:00")
    with pytest.raises(PolicyError, match="unknown customer class 'gold'"):
        TripPolicy(grace_s={"gold": 10})
    with pytest.raises(PolicyError, match="daily cap for area east must be a whole number >= 1"):
        TripPolicy(area_caps={"east": 0})
    with pytest.raises(PolicyError, match="notice_max_age_s must exceed"):
        TripPolicy(notice_lead_s=86400, notice_max_age_s=3600)
    with pytest.raises(PolicyError, match="no day of the week is permitted"):
        TripWindows(TripWindowPolicy(), _NoWorkdays())


class _NoWorkdays(WorkCalendar):
    def holiday(self, day):
        return "every day is a holiday here"
