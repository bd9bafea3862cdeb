"""The referral's business state: the 360X path, out-of-order arrivals, and order independence."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hl7referral.loop.states import Event, Facts, Kind, State, observe, observe_all, state, timeline


def ev(kind: Kind, at: str, **kw) -> Event:
    return Event(kind, f"2026-11-{at}Z", **kw)


HAPPY = [
    ev(Kind.SENT, "02T09:00:00", source="outbox #1"),
    ev(Kind.DELIVERED, "02T09:00:05", source="mdn processed"),
    ev(Kind.ACCEPTED, "03T10:00:00", source="OSU^O51 OK/IP"),
    ev(Kind.BOOKED, "04T08:00:00", appointment="A1", starts="2026-11-20T14:00:00Z", source="SIU^S12"),
    ev(Kind.VISIT_DONE, "20T15:00:00", appointment="A1", source="SIU^S14 completed"),
    ev(Kind.CONSULT_NOTE, "21T11:00:00", source="MDM^T02"),
    ev(Kind.NOTE_FILED, "21T11:00:09", source="MDM^T02 to the referring EHR, AA"),
]


def test_the_happy_path_step_by_step():
    facts, seen = Facts(), []
    for e in HAPPY:
        facts = observe(facts, e)
        seen.append(state(facts))
    assert seen == [State.SENT, State.DELIVERED, State.ACCEPTED, State.SCHEDULED, State.SEEN, State.SEEN,
                    State.CLOSED]
    assert [s.kind for s in timeline(HAPPY)] == [e.kind.value for e in HAPPY]   # nothing implied


def test_a_booking_before_the_accept_schedules_and_records_the_accept_as_implied():
    events = [HAPPY[0], HAPPY[1], HAPPY[3]]
    assert state(observe_all(events)) == State.SCHEDULED
    implied = [s for s in timeline(events) if s.kind == "IMPLIED"]
    assert [s.detail for s in implied] == ["ACCEPTED implied by BOOKED (SIU^S12)"]
    # The accept arriving later changes nothing but the timeline: it now has its own step.
    late = events + [HAPPY[2]]
    assert state(observe_all(late)) == State.SCHEDULED
    assert not [s for s in timeline(late) if s.kind == "IMPLIED"]


def test_a_consult_note_alone_implies_the_visit_and_filing_it_closes_the_loop():
    steps = timeline([HAPPY[-2]])
    assert steps[-1].state == State.SEEN
    assert [s.detail.split()[0] for s in steps if s.kind == "IMPLIED"] == ["SENT", "DELIVERED", "ACCEPTED",
                                                                           "SCHEDULED", "SEEN"]
    assert timeline(HAPPY[-2:])[-1].state == State.CLOSED


def test_a_rebooking_after_a_no_show_wins_in_either_order():
    booked = ev(Kind.BOOKED, "04T08:00:00", appointment="A1", starts="2026-11-10T14:00:00Z")
    missed = ev(Kind.NO_SHOW, "10T15:00:00", appointment="A1")
    again = ev(Kind.BOOKED, "10T16:00:00", appointment="A2", starts="2026-11-17T14:00:00Z")
    assert state(observe_all([booked, missed])) == State.NO_SHOW
    for order in ([booked, missed, again], [again, missed, booked], [missed, again, booked]):
        assert state(observe_all(order)) == State.SCHEDULED


def test_a_no_show_notice_alone_implies_the_booking():
    steps = timeline([ev(Kind.NO_SHOW, "10T15:00:00", appointment="A1", source="SIU^S26")])
    assert steps[-1].state == State.NO_SHOW
    assert "SCHEDULED implied by NO_SHOW (SIU^S26)" in [s.detail for s in steps]


def test_an_appointment_cancelled_goes_back_to_accepted():
    booked = ev(Kind.BOOKED, "04T08:00:00", appointment="A1", starts="2026-11-10T14:00:00Z")
    cancelled = ev(Kind.APPOINTMENT_CANCELLED, "05T08:00:00", appointment="A1")
    assert state(observe_all([HAPPY[2], booked, cancelled])) == State.ACCEPTED


def test_decline_is_final_unless_a_visit_or_note_contradicts_it():
    declined = ev(Kind.DECLINED, "03T10:00:00", source="OSU^O51 UA/CA")
    assert state(observe_all(HAPPY[:2] + [declined])) == State.DECLINED and State.DECLINED.final
    assert state(observe_all(HAPPY + [declined])) == State.CLOSED


def test_cancel_requested_confirmed_or_refused():
    request = ev(Kind.CANCEL_REQUESTED, "05T09:00:00", source="OSU^O51 CA")
    assert state(observe_all(HAPPY[:4] + [request])) == State.CANCEL_REQUESTED
    assert state(observe_all(HAPPY[:4] + [request, ev(Kind.CANCEL_CONFIRMED, "05T10:00:00")])) == State.CANCELLED
    assert state(observe_all(HAPPY[:4] + [request, ev(Kind.CANCEL_REFUSED, "05T10:00:00")])) == State.SCHEDULED


def test_interim_notes_are_recorded_and_change_nothing():
    note = ev(Kind.INTERIM_NOTE, "12T09:00:00", source="C-CDA interim #7")
    facts = observe_all(HAPPY[:4] + [note])
    assert state(facts) == State.SCHEDULED and facts.interim_notes == {"C-CDA interim #7"}


def test_prior_authorization_holds_the_referral_until_approved():
    required = ev(Kind.AUTH_REQUIRED, "01T09:00:00")
    assert state(observe_all([required])) == State.AUTH_PENDING
    assert state(observe_all([required, ev(Kind.AUTH_APPROVED, "01T12:00:00")])) == State.RECEIVED
    assert state(observe_all([required, HAPPY[0]])) == State.SENT


# -- every order, with duplicates: the same end state and the same timeline --------------------

LOOP = HAPPY + [
    ev(Kind.INTERIM_NOTE, "12T09:00:00", source="interim"),
    ev(Kind.NO_SHOW, "20T15:00:00", appointment="A0"),
    ev(Kind.BOOKED, "05T08:00:00", appointment="A0", starts="2026-11-12T09:00:00Z"),
    ev(Kind.DECLINED, "03T09:00:00"),
    ev(Kind.CANCEL_REQUESTED, "06T09:00:00"),
    ev(Kind.CANCEL_REFUSED, "06T10:00:00"),
    ev(Kind.AUTH_REQUIRED, "01T08:00:00"),
    ev(Kind.AUTH_APPROVED, "01T09:00:00"),
    ev(Kind.APPOINTMENT_CANCELLED, "04T09:00:00", appointment="A9"),
]


class ArrivalOrder(RuleBasedStateMachine):
    """Deliver the loop's events one at a time, in any order, any number of times each."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = list(LOOP)
        self.delivered: list[Event] = []
        self.facts = Facts()

    @rule(i=st.integers(min_value=0, max_value=len(LOOP) - 1))
    def deliver_once_more(self, i):
        # Any event, whether delivered before or not: duplicates included.
        self._deliver(LOOP[i])

    @precondition(lambda self: self.pool)
    @rule(data=st.data())
    def deliver_a_new_one(self, data):
        e = self.pool.pop(data.draw(st.integers(min_value=0, max_value=len(self.pool) - 1)))
        self._deliver(e)

    def _deliver(self, e: Event) -> None:
        self.delivered.append(e)
        self.facts = observe(self.facts, e)

    @invariant()
    def state_and_timeline_depend_only_on_what_was_delivered(self):
        distinct = list({e.key(): e for e in self.delivered}.values())
        reference = observe_all(sorted(distinct, key=lambda e: (e.at, e.kind.value)))
        assert self.facts == reference and state(self.facts) == state(reference)
        shuffled = list(self.delivered)
        random.Random(len(shuffled)).shuffle(shuffled)
        assert timeline(shuffled) == timeline(distinct)

    def teardown(self) -> None:
        # Everything delivered in the end: the loop is closed, whatever the order was.
        for e in self.pool:
            self._deliver(e)
        assert state(self.facts) == State.CLOSED
        assert timeline(self.delivered)[-1].state == State.CLOSED


TestArrivalOrder = ArrivalOrder.TestCase
TestArrivalOrder.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
