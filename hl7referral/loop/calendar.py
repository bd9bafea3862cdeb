"""Business days: which days count for SLA deadlines stated in business days.

A :class:`Calendar` is data (configuration): the working weekdays, the holidays, and the
time zone the practice keeps, because "business day 4" ends at the practice's midnight,
not UTC's.

Invariants
----------
* :meth:`Calendar.nth_business_day` counts the start's own day as day 0 when it is a
  business day (else the next business day is day 0); :meth:`Calendar.start_of` and
  :meth:`Calendar.end_of` turn a day into the practice's midnights, as aware UTC
  datetimes. "A reminder on business day 4" is ``start_of(nth_business_day(t, 4))``;
  "after 5 business days" is ``add_business_days(t, 5)``, the end of day 5.
* Holidays and weekends never count; a holiday on a weekend changes nothing.
* Sans-I/O: no clock is read; every function takes the times it needs.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

UTC = dt.timezone.utc


@dataclass(frozen=True)
class Calendar:
    weekdays: frozenset[int] = frozenset(range(5))   # Monday = 0 ... Friday = 4
    holidays: frozenset[dt.date] = field(default_factory=frozenset)
    zone: str = "UTC"

    @classmethod
    def from_config(cls, data: dict) -> "Calendar":
        """``{"weekdays": ["mon", ...], "holidays": ["2026-12-25", ...], "zone": "America/New_York"}``."""
        names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        days = data.get("weekdays", names[:5])
        unknown = [d for d in days if d not in names]
        if unknown:
            raise ValueError(f"weekdays: {', '.join(unknown)} (use {', '.join(names)})")
        ZoneInfo(data.get("zone", "UTC"))  # raises for an unknown zone
        return cls(frozenset(names.index(d) for d in days),
                   frozenset(dt.date.fromisoformat(h) for h in data.get("holidays", [])), data.get("zone", "UTC"))

    def is_business_day(self, day: dt.date) -> bool:
        return day.weekday() in self.weekdays and day not in self.holidays

    def local_date(self, at: dt.datetime) -> dt.date:
        return at.astimezone(ZoneInfo(self.zone)).date()

    def start_of(self, day: dt.date) -> dt.datetime:
        """The practice's midnight that opens *day*, in UTC."""
        return dt.datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(self.zone)).astimezone(UTC)

    def end_of(self, day: dt.date) -> dt.datetime:
        """The practice's midnight that closes *day*, in UTC."""
        return self.start_of(day + dt.timedelta(days=1))

    def nth_business_day(self, start: dt.datetime, n: int) -> dt.date:
        """Business day *n* after *start*: day 0 is the start's own day (or the next business day)."""
        if not self.weekdays:
            raise ValueError("a calendar with no working weekdays has no business days")
        day = self.local_date(start)
        while not self.is_business_day(day):
            day += dt.timedelta(days=1)
        for _ in range(n):
            day += dt.timedelta(days=1)
            while not self.is_business_day(day):
                day += dt.timedelta(days=1)
        return day

    def add_business_days(self, start: dt.datetime, n: int) -> dt.datetime:
        """The end of business day *n* after *start* ("after 5 business days")."""
        return self.end_of(self.nth_business_day(start, n))
