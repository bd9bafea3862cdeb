"""Each SLA rule fires at its threshold and not before (times passed in, as a test clock would)."""

from __future__ import annotations

import datetime as dt

import pytest

from hl7referral.loop.calendar import UTC, Calendar
from hl7referral.loop.sla import Policy, due
from hl7referral.loop.states import Event, Kind

CAL = Calendar(holidays=frozenset({dt.date(2026, 12, 25)}), zone="America/New_York")
POLICY = Policy()
SECOND = dt.timedelta(seconds=1)


def t(day: int, hour: int = 0, minute: int = 0, month: int = 12) -> dt.datetime:
    return dt.datetime(2026, month, day, hour, minute, tzinfo=UTC)


def iso(at: dt.datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def e(kind: Kind, at: dt.datetime, **kw) -> Event:
    return Event(kind, iso(at), **kw)


def rules(events, now) -> dict[str, object]:
    return {d.rule: d for d in due("REF-1", events, POLICY, CAL, now)}


def fires_exactly_at(events, rule: str, at: dt.datetime) -> None:
    assert rule not in rules(events, at - SECOND), f"{rule} fired before {at}"
    got = rules(events, at)
    assert rule in got, f"{rule} did not fire at {at}"
    assert got[rule].at == at


SENT = e(Kind.SENT, t(1, 14))
DELIVERED = e(Kind.DELIVERED, t(1, 15))


def test_no_receipt_in_48_hours_alerts_a_coordinator_and_receipt_stops_it():
    fires_exactly_at([SENT], "receipt-overdue", t(3, 14))
    assert rules([SENT], t(3, 14))["receipt-overdue"].action == "alert-coordinator"
    assert "receipt-overdue" not in rules([SENT, e(Kind.DELIVERED, t(3, 13))], t(4))
    # Any answer from the specialist proves receipt, even without an MDN.
    assert "receipt-overdue" not in rules([SENT, e(Kind.ACCEPTED, t(2))], t(4))


def test_receipt_notifies_the_patient_within_the_hour():
    d = rules([SENT, DELIVERED], t(1, 15))["notify-patient"]
    assert d.at == t(1, 15) and d.deadline == t(1, 16) and d.action == "notify-patient"
    assert "notify-patient" not in rules([SENT], t(9))


@pytest.mark.parametrize("rule, days", [("booking-reminder-1", 5), ("booking-reminder-2", 10), ("booking-overdue", 14)])
def test_booking_reminders_at_5_and_10_days_and_an_alert_at_14(rule, days):
    fires_exactly_at([SENT, DELIVERED], rule, t(1, 15) + dt.timedelta(days=days))


def test_the_booking_alert_says_how_many_reminders_went_and_a_booking_stops_them():
    alert = rules([SENT, DELIVERED], t(15, 15))["booking-overdue"]
    assert alert.action == "alert-coordinator" and "2 reminders" in alert.detail
    booked = e(Kind.BOOKED, t(3), appointment="A1", starts=iso(t(20, 14)))
    assert not {"booking-reminder-1", "booking-overdue"} & set(rules([SENT, DELIVERED, booked], t(16)))


def test_check_in_reminder_the_day_before_the_appointment():
    booked = e(Kind.BOOKED, t(3), appointment="A1", starts=iso(t(20, 14)))
    fires_exactly_at([SENT, DELIVERED, booked], "check-in-reminder", t(19, 14))
    assert rules([SENT, DELIVERED, booked], t(19, 14))["check-in-reminder"].key == "REF-1/check-in-reminder/A1"
    assert "check-in-reminder" not in rules([SENT, DELIVERED, booked], t(20, 14))   # too late to remind


def test_a_no_show_alerts_the_same_day_and_reaches_out_to_the_patient_within_24_hours():
    booked = e(Kind.BOOKED, t(3), appointment="A1", starts=iso(t(20, 14)))
    missed = e(Kind.NO_SHOW, t(20, 15), appointment="A1")
    got = rules([SENT, DELIVERED, booked, missed], t(20, 15))
    assert got["no-show-alert"].deadline == t(21, 5)          # the practice's midnight (EST)
    assert got["no-show-outreach"].deadline == t(21, 15)
    fires_exactly_at([SENT, DELIVERED, booked, missed], "no-show-alert", t(20, 15))
    rebooked = e(Kind.BOOKED, t(20, 16), appointment="A2", starts=iso(t(28, 14)))
    assert "no-show-alert" not in rules([SENT, DELIVERED, booked, missed, rebooked], t(21))


def test_consult_note_reminder_and_escalation_in_business_days_across_a_weekend_and_a_holiday():
    # Visit on Wednesday 23 December, 15:00 in New York; Friday the 25th is a holiday.
    booked = e(Kind.BOOKED, t(3), appointment="A1", starts=iso(t(23, 20)))
    seen = e(Kind.VISIT_DONE, t(23, 20), appointment="A1")
    events = [SENT, DELIVERED, booked, seen]
    fires_exactly_at(events, "note-request", t(23, 20))
    # Business days after the visit: 24 (Thu) 1, 28 (Mon) 2, 29 3, 30 4, 31 5.
    fires_exactly_at(events, "note-reminder", t(30, 5))                      # start of 30 Dec, EST
    fires_exactly_at(events, "note-escalation", dt.datetime(2027, 1, 1, 5, tzinfo=UTC))   # end of 31 Dec
    assert rules(events, t(30, 5))["note-reminder"].action == "request-note"
    noted = events + [e(Kind.CONSULT_NOTE, t(29))]
    assert not {"note-reminder", "note-escalation"} & set(rules(noted, t(31)))


def test_the_note_creates_a_follow_up_task_and_a_closed_or_cancelled_referral_nags_no_one():
    note = e(Kind.CONSULT_NOTE, t(29))
    got = rules([SENT, DELIVERED, note], t(29))
    assert got["follow-up-task"].action == "task-referrer" and set(got) == {"follow-up-task"}
    cancelled = [SENT, DELIVERED, e(Kind.CANCEL_REQUESTED, t(2)), e(Kind.CANCEL_CONFIRMED, t(2, 1))]
    assert rules(cancelled, t(31)) == {}


def test_thresholds_are_data():
    fast = Policy(receipt_hours=4.0)
    assert [d.rule for d in due("REF-1", [SENT], fast, CAL, t(1, 18))] == ["receipt-overdue"]


def test_a_prior_authorization_hold_does_not_hold_the_patients_notice():
    held = e(Kind.AUTH_REQUIRED, t(1, 9))
    got = rules([held], t(1, 9))
    assert got["notify-patient"].deadline == t(1, 10)
    assert "notify-patient" not in rules([held], t(1, 8))
