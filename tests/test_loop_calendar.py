"""Business days across weekends, holidays and the practice's time zone."""

import datetime as dt

import pytest

from hl7referral.loop.calendar import UTC, Calendar

# 2026-12-24 is a Thursday; the 25th (Friday) a holiday; 26-27 the weekend.
XMAS = Calendar(holidays=frozenset({dt.date(2026, 12, 25)}), zone="America/New_York")


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def test_counting_skips_the_weekend_and_the_holiday():
    visit = utc(2026, 12, 23, 20, 0)                       # Wednesday 15:00 in New York
    days = [XMAS.nth_business_day(visit, n) for n in range(6)]
    assert days == [dt.date(2026, 12, 23), dt.date(2026, 12, 24), dt.date(2026, 12, 28), dt.date(2026, 12, 29),
                    dt.date(2026, 12, 30), dt.date(2026, 12, 31)]


def test_start_and_end_are_the_practices_midnights_in_utc():
    visit = utc(2026, 12, 23, 20, 0)
    assert XMAS.start_of(XMAS.nth_business_day(visit, 4)) == utc(2026, 12, 30, 5, 0)   # EST = UTC-5
    assert XMAS.add_business_days(visit, 5) == utc(2027, 1, 1, 5, 0)


def test_a_start_on_a_non_business_day_counts_from_the_next_one():
    saturday = utc(2026, 12, 26, 15, 0)
    assert XMAS.nth_business_day(saturday, 0) == dt.date(2026, 12, 28)
    assert XMAS.nth_business_day(saturday, 1) == dt.date(2026, 12, 29)


def test_the_local_date_decides_not_utcs():
    # 03:00 UTC on Thursday the 24th is still Wednesday evening in New York.
    assert XMAS.nth_business_day(utc(2026, 12, 24, 3, 0), 0) == dt.date(2026, 12, 23)


def test_daylight_saving_moves_the_utc_midnight():
    cal = Calendar(zone="America/New_York")
    assert cal.start_of(dt.date(2026, 7, 1)) == utc(2026, 7, 1, 4, 0)                # EDT = UTC-4


def test_from_config():
    cal = Calendar.from_config({"weekdays": ["mon", "tue", "wed", "thu", "fri", "sat"],
                                "holidays": ["2026-12-25"], "zone": "Europe/Berlin"})
    assert cal.is_business_day(dt.date(2026, 12, 26)) and not cal.is_business_day(dt.date(2026, 12, 25))
    with pytest.raises(ValueError):
        Calendar.from_config({"weekdays": ["monday"]})
    with pytest.raises(Exception):
        Calendar.from_config({"zone": "Mars/Olympus"})
    with pytest.raises(ValueError):
        Calendar(weekdays=frozenset()).nth_business_day(utc(2026, 1, 1), 1)
