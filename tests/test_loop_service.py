"""The loop service on a test clock: SLA timers fire at their threshold and not before, from one clock.

``task.Clock`` is the service's clock and reactor; the committer runs each job at once on the
test's thread against a real store. Advancing the clock runs the service's own LoopingCall.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from twisted.internet.task import Clock

from committers import InlineCommitter
from hl7referral.config import load_engine
from hl7referral.loop.calendar import Calendar
from hl7referral.loop.states import Event, Kind
from hl7referral.engine.loop_service import LoopService
from hl7referral.store import Store
from hl7referral.store.loop import Loop
from loop_messages import REFERRAL_EI, REFERRAL_ID, siu_s12

UTC = dt.timezone.utc
HOLIDAY = dt.date(2026, 12, 25)   # a Friday


def at(day: int, hour: int = 0, month: int = 12, year: int = 2026) -> float:
    return dt.datetime(year, month, day, hour, tzinfo=UTC).timestamp()


@pytest.fixture
def world(tmp_path):
    base = load_engine()
    loop_cfg = dataclasses.replace(base.loop, timer_interval=1.0,
                                   calendar=Calendar(holidays=frozenset({HOLIDAY}), zone="UTC"))
    config = dataclasses.replace(base, loop=loop_cfg)
    store = Store.open(tmp_path / "svc.db")
    clock = Clock()
    clock.advance(at(1, 9))
    service = LoopService(config, InlineCommitter(store), store, clock, clock=clock)
    service.startService()
    yield clock, service, Loop(store)
    service.stopService()
    store.close()


def rules(loop: Loop, ref: str) -> list[str]:
    return [a["rule"] for a in loop.sla_actions(ref)]


def advance_to(clock: Clock, when: float) -> None:
    clock.advance(when - clock.seconds())


def test_receipt_overdue_fires_at_48_hours_on_the_test_clock(world):
    clock, service, loop = world
    loop.open_referral("R1", at="2026-12-01T09:00:00Z", channel="ref-i12")
    loop.apply("R1", [Event(Kind.SENT, "2026-12-01T09:00:00Z")], at="2026-12-01T09:00:00Z", actor="test")
    advance_to(clock, at(3, 9) - 1)
    assert rules(loop, "R1") == []
    clock.advance(1)
    assert rules(loop, "R1") == ["receipt-overdue"]
    assert [a["owner"] for a in loop.alerts("R1")] == ["role:referral-coordinators"]
    for _ in range(5):
        clock.advance(3600)
    assert rules(loop, "R1") == ["receipt-overdue"]        # one stall, one alert


def test_note_reminder_and_escalation_count_business_days_across_a_weekend_and_a_holiday(world):
    clock, service, loop = world
    advance_to(clock, at(24, 15))                           # Thursday 24 December, the visit
    loop.open_referral("R2", at="2026-12-01T09:00:00Z", channel="ref-i12")
    loop.apply("R2", [Event(Kind.SENT, "2026-12-01T09:00:00Z"), Event(Kind.DELIVERED, "2026-12-01T10:00:00Z"),
                      Event(Kind.BOOKED, "2026-12-02T10:00:00Z", appointment="A1", starts="2026-12-24T14:00:00Z"),
                      Event(Kind.VISIT_DONE, "2026-12-24T15:00:00Z", appointment="A1")],
               at="2026-12-24T15:00:00Z", actor="test")
    clock.advance(1)
    assert "note-request" in rules(loop, "R2")
    # Business days after Thu 24: (Fri 25 holiday, weekend) Mon 28 = 1, Tue 29 = 2, Wed 30 = 3, Thu 31 = 4.
    advance_to(clock, at(31) - 1)
    assert "note-reminder" not in rules(loop, "R2")
    clock.advance(1)
    assert "note-reminder" in rules(loop, "R2")
    # Escalation "after 5 business days": the end of day 5, Fri 1 January (a working day in this calendar).
    advance_to(clock, at(2, month=1, year=2027) - 1)
    assert "note-escalation" not in rules(loop, "R2")
    clock.advance(1)
    assert "note-escalation" in rules(loop, "R2")


def test_a_loop_message_is_applied_and_marked_applied_in_one_step(world, tmp_path):
    clock, service, loop = world
    loop.open_referral(REFERRAL_ID, at="2026-12-01T09:00:00Z", channel="ref-i12")
    store = loop.store
    raw = siu_s12(referral_id=REFERRAL_EI)
    from hl7referral.store import ACCEPTED, Inbound
    [outcome] = store.commit_batch([Inbound(received_at="2026-12-01T09:00:01Z", listener="main", peer="t",
                                            channel="loop-events", status=ACCEPTED, sending_application="SCHED",
                                            sending_facility="SPEC", message_type="SIU^S12", control_id="S1",
                                            referral_id="", charset="ascii", raw=raw, text="", ack=b"",
                                            ack_code="AA", error="")])
    assert loop.unapplied(["loop-events"]) != []
    service.submit(outcome.message_id, "loop-events", raw)
    assert loop.get(REFERRAL_ID)["state"] == "SCHEDULED" and loop.unapplied(["loop-events"]) == []
