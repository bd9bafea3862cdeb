"""The fax attempt's state machine: total, forward-only, one alert per failure."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from hl7referral.fax.gateway import Status
from hl7referral.fax.tracking import FINAL, Event, State, status_event, step


def test_step_is_total():
    for state, event in itertools.product(State, Event):
        t = step(state, event)
        assert isinstance(t.state, State)


def test_the_happy_path():
    s = step(State.QUEUED, Event.SUBMITTED)
    assert s.state == State.SUBMITTED and "await-status" in s.effects
    s = step(s.state, Event.STATUS_SENDING)
    assert s.state == State.SENDING
    assert step(s.state, Event.STATUS_DELIVERED).state == State.DELIVERED


def test_an_unknown_submit_outcome_looks_before_it_submits_again():
    t = step(State.QUEUED, Event.SUBMIT_UNKNOWN)
    assert t.state == State.RETRY_WAIT and "find-first" in t.effects
    assert "find-first" not in step(State.QUEUED, Event.SUBMIT_RETRY).effects


def test_rejection_and_giving_up_fail_with_an_alert():
    for event in (Event.SUBMIT_REJECTED, Event.GIVE_UP):
        t = step(State.RETRY_WAIT, event)
        assert t.state == State.FAILED and "alert" in t.effects


def test_late_and_duplicate_statuses_change_nothing():
    assert step(State.SENDING, Event.STATUS_QUEUED).state == State.SENDING
    assert step(State.DELIVERED, Event.STATUS_SENDING).effects == ("audit-stale",)
    assert step(State.DELIVERED, Event.STATUS_FAILED).state == State.DELIVERED
    assert step(State.FAILED, Event.STATUS_DELIVERED).state == State.FAILED
    assert step(State.SUBMITTED, Event.STATUS_QUEUED).effects == ("audit-same",)


def test_a_callback_that_overtakes_the_submit_answer_settles_the_attempt():
    t = step(State.RETRY_WAIT, Event.STATUS_SENDING)
    assert t.state == State.SENDING and "cancel-retry" in t.effects


def test_timeout_only_while_the_gateway_holds_the_job():
    assert step(State.SUBMITTED, Event.TIMEOUT).state == State.FAILED
    assert step(State.QUEUED, Event.TIMEOUT).state == State.QUEUED
    assert step(State.DELIVERED, Event.TIMEOUT).state == State.DELIVERED


@given(st.lists(st.sampled_from(list(Status)), min_size=1, max_size=12))
def test_any_order_of_statuses_ends_at_the_highest_and_alerts_at_most_once(statuses):
    state, alerts = State.SUBMITTED, 0
    for status in statuses:
        t = step(state, status_event(status))
        alerts += "alert" in t.effects
        state = t.state
    first_final = next((s for s in statuses if s.final), None)
    if first_final is not None:
        # The first final status wins; nothing after it moves the attempt.
        assert state == {Status.DELIVERED: State.DELIVERED, Status.FAILED: State.FAILED}[first_final]
    elif Status.SENDING in statuses:
        assert state == State.SENDING
    else:
        assert state == State.SUBMITTED
    assert alerts == (1 if state == State.FAILED else 0)
    assert state in FINAL or first_final is None
