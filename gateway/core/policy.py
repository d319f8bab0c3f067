"""Trip gates: what a disconnection for arrears must pass. Pure, clock injected, each gate explains itself.

Every gate answers two questions for an account at an instant: does it block, and if so, why and when to
look again. The disconnect case (``gateway.core.control``) asks them when it plans a trip and again at the
moment of sending, so a weather flag raised or a payment committed in between still stops the trip.

Calendars are the utility's (UTC+8 by default). Statutory holidays come from the maintained ``holidays``
package (CN: the State Council's yearly schedule, with its substituted days off and working weekend days),
plus local additions in config for announcements the package has not caught up with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from enum import Enum

import holidays as holiday_calendars

from .model import CustomerClass


class Gate(str, Enum):
    """Why a trip did not happen (yet). Names are stable: metrics and events carry them."""

    CUSTOMER_CLASS = "customer_class"  # protected or VIP: an account-manager task instead
    GRACE = "grace_period"
    NOTICE = "notice"  # no confirmed notice at least the lead time old and not stale
    FINAL_REMINDER = "final_reminder"
    WINDOW = "forbidden_window"  # night, weekend, Friday
    HOLIDAY = "holiday"  # statutory holiday or its eve
    WEATHER = "weather"  # area flag or forecast beyond limits
    DAILY_CAP = "daily_cap"
    BALANCE = "balance"  # the fresh balance check at send time found the arrears cleared
    KEEP_POWER = "keep_power"  # the meter is in keep-power (保电) and refuses trips
    EXPIRED = "expired"  # a trip decided for another window is not a trip for now


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Block:
    gate: Gate
    reason: str
    retry_at: int | None = None  # when the gate may open again (None: on an event, not on time)


# --------------------------------------------------------------------------- hours and calendars


@dataclass(frozen=True)
class Hours:
    """A daily window in local time, ``HH:MM-HH:MM``, start inclusive, end exclusive, within one day."""

    start_min: int
    end_min: int

    @classmethod
    def parse(cls, text: str, what: str = "hours") -> "Hours":
        try:
            a, b = str(text).split("-")
            start = _minutes(a)
            end = 24 * 60 if b.strip() == "24:00" else _minutes(b)
        except ValueError:
            raise PolicyError(f"{what}: {text!r} is not a window like '09:00-16:00'") from None
        if not start < end:
            raise PolicyError(f"{what}: {text!r} must start before it ends, within one day")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start_min // 60:02d}:{self.start_min % 60:02d}-{self.end_min // 60:02d}:{self.end_min % 60:02d}"

    @property
    def length_s(self) -> int:
        return (self.end_min - self.start_min) * 60


def _minutes(hhmm: str) -> int:
    h, m = hhmm.strip().split(":")
    h, m = int(h), int(m)
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ValueError(hhmm)
    return h * 60 + m


class WorkCalendar:
    """The utility's days: local dates, statutory holidays (maintained package + local additions), weekends."""

    def __init__(self, utc_offset_s: int = 8 * 3600, country: str = "CN", extra_holidays: tuple[str, ...] = (),
                 extra_workdays: tuple[str, ...] = ()) -> None:
        self.zone = timezone(timedelta(seconds=utc_offset_s))
        try:
            self._holidays = holiday_calendars.country_holidays(country)
        except NotImplementedError:
            raise PolicyError(f"country: no holiday calendar for {country!r} "
                              f"(ISO 3166 codes such as CN)") from None
        self._extra_holidays = {_iso_date(d, "extra_holidays") for d in extra_holidays}
        self._extra_workdays = {_iso_date(d, "extra_workdays") for d in extra_workdays}

    def local(self, t: int) -> datetime:
        return datetime.fromtimestamp(t, self.zone)

    def day(self, t: int) -> date:
        return self.local(t).date()

    def at(self, day: date, minute: int) -> int:
        """Epoch seconds of ``minute`` after local midnight of ``day``."""
        return int(datetime(day.year, day.month, day.day, tzinfo=self.zone).timestamp()) + minute * 60

    def minute_of_day(self, t: int) -> int:
        local = self.local(t)
        return local.hour * 60 + local.minute

    def next_within(self, hours: "Hours", t: int, days: int, day_allowed=lambda day: True) -> int | None:
        """The earliest instant >= ``t`` inside ``hours`` of a day that ``day_allowed``, within ``days`` days."""
        first = self.day(t)
        for i in range(days):
            d = first + timedelta(days=i)
            if not day_allowed(d):
                continue
            start, end = self.at(d, hours.start_min), self.at(d, hours.end_min)
            if t < end:
                return max(t, start)
        return None

    def holiday(self, day: date) -> str | None:
        """The holiday's name, or None. A working weekend day (调休) is never a holiday."""
        if day in self._extra_workdays:
            return None
        if day in self._extra_holidays:
            return "holiday (local calendar)"
        name = self._holidays.get(day)
        return str(name) if name else None

    def is_weekend(self, day: date) -> bool:
        return day.weekday() >= 5

    def is_weekend_workday(self, day: date) -> bool:
        """A Saturday or Sunday made a working day to bridge a holiday (调休)."""
        return self.is_weekend(day) and (day in self._extra_workdays
                                         or day in getattr(self._holidays, "weekend_workdays", ()))


def _iso_date(text: str, what: str) -> date:
    try:
        return date.fromisoformat(str(text))
    except ValueError:
        raise PolicyError(f"{what}: {text!r} is not an ISO date (YYYY-MM-DD)") from None


# --------------------------------------------------------------------------- forbidden windows


@dataclass(frozen=True)
class TripWindowPolicy:
    """When automatic trips may happen. Defaults: working days 09:00-16:00 (a customer tripped late in the
    window can still pay and be reconnected the same day); never on weekends or statutory holidays."""

    hours: str = "09:00-16:00"
    allow_weekends: bool = False
    weekend_workdays_allow_trips: bool = False  # a 调休 working Saturday counts as a working day
    forbid_fridays: bool = False  # some regulators: no trip before a weekend
    forbid_holiday_eves: bool = False  # ...nor on the last working day before a holiday

    def __post_init__(self) -> None:
        Hours.parse(self.hours, "hours")

    @property
    def window(self) -> Hours:
        return Hours.parse(self.hours)


class TripWindows:
    """The permitted trip hours over a calendar: blocks with reasons, and the next permitted instant."""

    SEARCH_DAYS = 400

    def __init__(self, policy: TripWindowPolicy, calendar: WorkCalendar) -> None:
        self.policy = policy
        self.calendar = calendar
        self.hours = policy.window
        if not any(self.day_block(date(2026, 1, 5) + timedelta(days=i)) is None for i in range(14)):
            raise PolicyError("no day of the week is permitted: trips could never happen")

    def day_block(self, day: date) -> Block | None:
        """Whether automatic trips are forbidden on the whole of ``day``."""
        cal, p = self.calendar, self.policy
        name = cal.holiday(day)
        if name:
            return Block(Gate.HOLIDAY, f"{day.isoformat()} is a statutory holiday ({name})")
        if cal.is_weekend(day) and not p.allow_weekends and not (
                p.weekend_workdays_allow_trips and cal.is_weekend_workday(day)):
            return Block(Gate.WINDOW, f"{day.isoformat()} is a {day.strftime('%A')}: no trips on weekends")
        if p.forbid_fridays and day.weekday() == 4:
            return Block(Gate.WINDOW, f"{day.isoformat()} is a Friday: no trips before a weekend")
        if p.forbid_holiday_eves and cal.holiday(day + timedelta(days=1)):
            return Block(Gate.HOLIDAY, f"{day.isoformat()} is the eve of a holiday "
                                       f"({cal.holiday(day + timedelta(days=1))})")
        return None

    def block(self, t: int) -> Block | None:
        day = self.calendar.day(t)
        b = self.day_block(day)
        if b is None:
            minute = self.calendar.minute_of_day(t)
            if self.hours.start_min <= minute < self.hours.end_min:
                return None
            b = Block(Gate.WINDOW, f"{self.calendar.local(t):%H:%M} is outside the trip hours {self.hours}")
        return Block(b.gate, b.reason, self.next_open(t))

    def next_open(self, t: int) -> int:
        """The earliest permitted instant at or after ``t``."""
        when = self.calendar.next_within(self.hours, t, self.SEARCH_DAYS, lambda d: self.day_block(d) is None)
        if when is None:
            raise PolicyError(f"no permitted trip window within {self.SEARCH_DAYS} days of {self.calendar.local(t)}")
        return when

    def window_of(self, t: int) -> tuple[int, int]:
        """Start and end of the permitted window of ``t``'s local day (whether or not that day is permitted)."""
        d = self.calendar.day(t)
        return self.calendar.at(d, self.hours.start_min), self.calendar.at(d, self.hours.end_min)


# --------------------------------------------------------------------------- weather


@dataclass(frozen=True)
class WeatherPolicy:
    """No trips in an area flagged for extreme weather, or whose forecast for the day is at or beyond a limit."""

    cold_limit_c: float = 0.0
    hot_limit_c: float = 35.0

    def __post_init__(self) -> None:
        if self.cold_limit_c >= self.hot_limit_c:
            raise PolicyError("cold_limit_c must be below hot_limit_c")


@dataclass(frozen=True)
class AreaFlag:
    """An area flagged (extreme weather, disaster, civil event): no automatic trips there while active."""

    area: str
    flag: str
    active: bool
    since: int
    until: int | None = None  # None: until cleared
    actor: str = ""
    reason: str = ""

    def covers(self, t: int) -> bool:
        return self.active and self.since <= t and (self.until is None or t < self.until)


@dataclass(frozen=True)
class Forecast:
    area: str
    day: str  # ISO local date
    min_c: float
    max_c: float
    received_at: int = 0


@dataclass
class Conditions:
    """What the gates know of the world beyond the account: area flags and weather forecasts."""

    flags: dict[tuple[str, str], AreaFlag] = field(default_factory=dict)  # (area, flag) -> flag
    forecasts: dict[tuple[str, str], Forecast] = field(default_factory=dict)  # (area, day) -> forecast

    def weather_block(self, area: str, t: int, policy: WeatherPolicy, calendar: WorkCalendar) -> Block | None:
        for (a, _), flag in self.flags.items():
            if a == area and flag.covers(t):
                why = f"area {area} is flagged {flag.flag}" + (f" ({flag.reason})" if flag.reason else "")
                return Block(Gate.WEATHER, why, flag.until)  # None: looked at again when the flag changes
        day = calendar.day(t)
        fc = self.forecasts.get((area, day.isoformat()))
        if fc is not None and (fc.min_c <= policy.cold_limit_c or fc.max_c >= policy.hot_limit_c):
            nxt = calendar.at(day + timedelta(days=1), 0)
            return Block(Gate.WEATHER, f"forecast for {area} on {day.isoformat()}: {fc.min_c:g}..{fc.max_c:g} °C, "
                                       f"beyond the limits ({policy.cold_limit_c:g} / {policy.hot_limit_c:g} °C)", nxt)
        return None


# --------------------------------------------------------------------------- the trip policy


@dataclass(frozen=True)
class TripPolicy:
    """Every gate of an automatic trip, with the field reports' defaults."""

    notice_lead_s: int = 24 * 3600  # a confirmed notice at least this old...
    notice_max_age_s: int = 7 * 24 * 3600  # ...and not older than this (else a fresh one is sent)
    renotice_before_s: int = 2 * 24 * 3600  # a fresh notice goes out this long before the lead time starts
    final_reminder_s: int = 30 * 60  # a re-notice this long before the cut
    final_reminder_confirmed: bool = True  # ...whose delivery is confirmed (only a confirmed delivery counts)
    final_reminder_max_age_s: int = 4 * 3600  # an older reminder is not "shortly before"
    # after reaching the trip level, by customer class
    grace_s: dict[str, int] = field(default_factory=lambda: {"residential": 0, "commercial": 0})
    daily_cap_per_area: int = 200
    area_caps: dict[str, int] = field(default_factory=dict)  # area -> cap, overriding the default
    trip_command_ttl_s: int = 2 * 3600  # a trip command expires this long after it was planned (or at window end)
    window: TripWindowPolicy = field(default_factory=TripWindowPolicy)
    weather: WeatherPolicy = field(default_factory=WeatherPolicy)

    def __post_init__(self) -> None:
        for name in ("notice_lead_s", "final_reminder_s"):
            if getattr(self, name) < 0:
                raise PolicyError(f"{name} must not be negative")
        if self.trip_command_ttl_s <= 0:
            raise PolicyError("trip_command_ttl_s must be positive: a command that expires at once is never sent")
        if self.notice_max_age_s <= self.notice_lead_s + self.renotice_before_s:
            raise PolicyError("notice_max_age_s must exceed notice_lead_s + renotice_before_s, "
                              "or a fresh notice would be stale before the cut")
        if self.final_reminder_max_age_s <= self.final_reminder_s:
            raise PolicyError("final_reminder_max_age_s must exceed final_reminder_s")
        classes = {c.value for c in CustomerClass}
        for k, v in self.grace_s.items():
            if k not in classes:
                raise PolicyError(f"grace_s: unknown customer class {k!r}; allowed: {', '.join(sorted(classes))}")
            if not isinstance(v, int) or v < 0:
                raise PolicyError(f"grace_s.{k} must be a whole number of seconds >= 0, got {v!r}")
        for area, cap in {"(default)": self.daily_cap_per_area, **self.area_caps}.items():
            if not isinstance(cap, int) or cap < 1:
                raise PolicyError(f"the daily cap for area {area} must be a whole number >= 1, got {cap!r}")

    def grace_for(self, klass: CustomerClass) -> int:
        return int(self.grace_s.get(klass.value, 0))

    def cap_for(self, area: str) -> int:
        return int(self.area_caps.get(area, self.daily_cap_per_area))


class Gates:
    """The gates over one calendar and the world's conditions."""

    def __init__(self, policy: TripPolicy, calendar: WorkCalendar, conditions: Conditions | None = None) -> None:
        self.policy = policy
        self.calendar = calendar
        self.windows = TripWindows(policy.window, calendar)
        self.conditions = conditions or Conditions()

    def time_block(self, area: str, t: int) -> Block | None:
        """Forbidden windows, holidays and weather at ``t`` (the gates that depend on when, not on whom)."""
        b = self.windows.block(t)
        if b is not None:
            return b
        w = self.conditions.weather_block(area, t, self.policy.weather, self.calendar)
        if w is not None:
            if w.retry_at is not None:
                w = Block(w.gate, w.reason, self.windows.next_open(w.retry_at))
            return w
        return None

    def next_permitted(self, area: str, t: int) -> tuple[int | None, Block | None]:
        """The earliest instant >= ``t`` that no time gate blocks, and the last block met on the way (the one
        that decided it: a holiday after an evening, say).

        None if a block has no end in time (an area flag without ``until``): it is looked at again when
        the flag changes.
        """
        last: Block | None = None
        for _ in range(500):
            b = self.time_block(area, t)
            if b is None:
                return t, last
            last = b
            if b.retry_at is None:
                return None, last
            t = max(b.retry_at, t + 1)
        raise PolicyError(f"no permitted trip time found for area {area}")

    @staticmethod
    def class_block(klass: CustomerClass) -> Block | None:
        if klass.auto_trip_allowed:
            return None
        return Block(Gate.CUSTOMER_CLASS, f"{klass.value} accounts are never tripped automatically: "
                                          f"an account manager handles them")
