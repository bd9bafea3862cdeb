"""SLA rules: from a referral's events and a time, which reminders and escalations are due.

Defaults are the field's (``../shared/DESIGN.md`` §5, issue 6); every threshold is data
(:class:`Policy`), chosen per channel, payer and specialty by the caller.

==========================  ==================================  =========================
rule                        due at                              while
==========================  ==================================  =========================
receipt-overdue             sent + 48 h                         not delivered
notify-patient              delivered, or auth hold (+ 1 h)     not yet booked, once
booking-reminder-1, -2      delivered + 5 d, + 10 d             nothing booked
booking-overdue             delivered + 14 d (alert, attempts)  nothing booked
check-in-reminder           appointment start − 1 d             that appointment booked
no-show-alert               the no-show (same day)              no later booking
no-show-outreach            the no-show (deadline + 24 h)       no later booking
note-request                visit done                          no consult note
note-reminder               start of business day 4 after it    no consult note
note-escalation             end of business day 5 after it      no consult note
follow-up-task              consult note received               always, once
==========================  ==================================  =========================

Invariants
----------
* :func:`due` is a pure function of (events, policy, calendar, now): it fires a rule at
  its threshold (``now >= at``) and never before; it reads no clock.
* Each due item has a stable ``key`` (referral, rule, appointment): the caller records
  the keys it has acted on, so one stall is one alert however often timers run.
* Nothing is due for a referral in a final state except what closes it (the follow-up
  task after a consult note); a cancelled or declined referral raises no reminders.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .calendar import Calendar
from .states import Event, Kind, State, observe_all, state

ALERT, PATIENT, SPECIALIST, REFERRER = "alert-coordinator", "notify-patient", "request-note", "task-referrer"


@dataclass(frozen=True)
class Policy:
    receipt_hours: float = 48.0
    notify_patient_hours: float = 1.0
    booking_reminder_days: tuple[float, ...] = (5.0, 10.0)
    booking_alert_days: float = 14.0
    checkin_days_before: float = 1.0
    no_show_outreach_hours: float = 24.0
    note_reminder_business_day: int = 4
    note_escalation_business_days: int = 5


@dataclass(frozen=True)
class Due:
    rule: str
    action: str              # who must act: alert-coordinator, notify-patient, request-note, task-referrer
    at: dt.datetime          # when it fell due
    key: str                 # referral/rule[/appointment]: act on it once
    deadline: dt.datetime | None = None
    detail: str = ""


def _t(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _first(events: list[Event], *kinds: Kind) -> dt.datetime | None:
    times = [_t(e.at) for e in events if e.kind in kinds]
    return min(times) if times else None


FAR = dt.datetime.max.replace(tzinfo=dt.timezone.utc) - dt.timedelta(days=2)


def due(referral_id: str, events, policy: Policy, calendar: Calendar, now: dt.datetime,
        horizon: dt.datetime | None = None) -> list[Due]:
    """Every rule due at *now* for this referral (the caller skips keys it has acted on).

    With *horizon* (later than *now*), also the rules that will fall due by then if nothing
    else happens: the tracker uses it to know when to look at this referral again.
    """
    horizon = horizon or now
    events = list({e.key(): e for e in events}.values())
    facts = observe_all(events)
    current = state(facts)
    out: list[Due] = []

    def fire(rule: str, action: str, at: dt.datetime | None, suffix: str = "", deadline=None, detail="") -> None:
        if at is not None and horizon >= at:
            out.append(Due(rule, action, at, f"{referral_id}/{rule}" + (f"/{suffix}" if suffix else ""),
                           deadline, detail))

    note = _first(events, Kind.CONSULT_NOTE)
    fire("follow-up-task", REFERRER, note)
    if current.final:
        return out

    hours, days = dt.timedelta(hours=1), dt.timedelta(days=1)
    sent = _first(events, Kind.SENT)
    delivered = _first(events, Kind.DELIVERED, Kind.ACCEPTED, Kind.DECLINED, Kind.BOOKED, Kind.NO_SHOW,
                       Kind.VISIT_DONE, Kind.INTERIM_NOTE)   # any answer proves receipt
    if sent is not None and delivered is None:
        fire("receipt-overdue", ALERT, sent + policy.receipt_hours * hours,
             detail=f"no receipt {policy.receipt_hours:g} h after sending")
    # The patient hears at receipt, or at once when prior authorization holds the send (the notice
    # is not held with it); never once booked or seen.
    notice_from = delivered if delivered is not None else _first(events, Kind.AUTH_REQUIRED)
    if notice_from is not None and current in (State.AUTH_PENDING, State.RECEIVED, State.SENT, State.DELIVERED,
                                               State.ACCEPTED):
        fire("notify-patient", PATIENT, notice_from, deadline=notice_from + policy.notify_patient_hours * hours)

    appointments = list(facts.appointments)
    if delivered is not None and not appointments and current not in (State.SEEN, State.CANCEL_REQUESTED):
        for n, after in enumerate(policy.booking_reminder_days, start=1):
            fire(f"booking-reminder-{n}", PATIENT, delivered + after * days)
        fire("booking-overdue", ALERT, delivered + policy.booking_alert_days * days,
             detail=f"not booked {policy.booking_alert_days:g} days after receipt; "
                    f"{len(policy.booking_reminder_days)} reminders sent")

    if current == State.SCHEDULED:
        for a_id, a in appointments:
            if a.status == Kind.BOOKED and a.starts and now < _t(a.starts):
                fire("check-in-reminder", PATIENT, _t(a.starts) - policy.checkin_days_before * days, a_id)

    if current == State.NO_SHOW:
        missed = max(_t(e.at) for e in events if e.kind == Kind.NO_SHOW)
        fire("no-show-alert", ALERT, missed, calendar.local_date(missed).isoformat(),
             deadline=calendar.end_of(calendar.local_date(missed)))
        fire("no-show-outreach", PATIENT, missed, calendar.local_date(missed).isoformat(),
             deadline=missed + policy.no_show_outreach_hours * hours)

    seen = _first(events, Kind.VISIT_DONE)
    if seen is not None and note is None:
        fire("note-request", SPECIALIST, seen)
        fire("note-reminder", SPECIALIST,
             calendar.start_of(calendar.nth_business_day(seen, policy.note_reminder_business_day)))
        fire("note-escalation", ALERT, calendar.add_business_days(seen, policy.note_escalation_business_days),
             detail=f"no consult note {policy.note_escalation_business_days} business days after the visit")
    return out
