"""The outbound Direct message state machine, driven by explicit times.

``Tracker`` below is a test double for the caller: it keeps one timer the way the real sender
will (set from deadline() after each transition, cancelled by "cancel-timers"), advances a fake
clock, and fires TIMEOUT when the clock reaches the deadline, before any event at a later time.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7referral.direct.mdn import Mdn, build_mdn, parse_mdn
from hl7referral.direct.tracking import (
    TERMINAL,
    Event,
    State,
    Transition,
    deadline,
    event_for_mdn,
    send_event,
    step,
)

HOUR = 3600.0
FAILURE_EFFECTS = {"notify-sender-failure", "fallback"}


@dataclass
class Tracker:
    final: bool
    processed_timeout: float = HOUR
    dispatched_timeout: float = HOUR
    state: State = State.QUEUED
    now: float = 0.0
    sent_at: float | None = None
    processed_at: float | None = None
    timer: float | None = None
    log: list[tuple[float, Event, State, tuple[str, ...]]] = field(default_factory=list)

    def _apply(self, event: Event) -> Transition:
        t = step(self.state, event, final_delivery_requested=self.final)
        before, self.state = self.state, t.state
        if before is not State.SENT and t.state is State.SENT:
            self.sent_at = self.now
        if before is not State.MDN_PROCESSED and t.state is State.MDN_PROCESSED:
            self.processed_at = self.now
        if "cancel-timers" in t.effects:
            self.timer = None
        if before is not t.state:
            self.timer = deadline(
                t.state,
                self.sent_at if self.sent_at is not None else self.now,
                self.processed_at,
                processed_timeout=self.processed_timeout,
                dispatched_timeout=self.dispatched_timeout,
                final_delivery_requested=self.final,
            )
        self.log.append((self.now, event, t.state, t.effects))
        return t

    def advance(self, to: float) -> None:
        """Move the clock to ``to``, firing the timer on the way if it is due."""
        assert to >= self.now
        if self.timer is not None and self.timer <= to:
            self.now, self.timer = self.timer, None
            self._apply(Event.TIMEOUT)
        self.now = to

    def at(self, when: float, event: Event) -> Transition:
        self.advance(when)
        return self._apply(event)

    def effects(self) -> list[str]:
        return [e for *_, effects in self.log for e in effects]

    def timeouts(self) -> list[float]:
        return [t for t, event, *_ in self.log if event is Event.TIMEOUT]


def sent(final: bool, **kw) -> Tracker:
    tr = Tracker(final=final, **kw)
    assert tr.at(0.0, Event.SEND_OK).effects == ("start-processed-timer",)
    assert tr.state is State.SENT and tr.timer == tr.processed_timeout
    return tr


# -- the scenarios of the issue ---------------------------------------------------------------


def test_processed_only_without_final_delivery_is_done():
    tr = sent(final=False)
    tr.at(120, Event.MDN_PROCESSED)
    assert tr.state is State.MDN_PROCESSED and tr.timer is None
    tr.advance(48 * HOUR)
    assert tr.state is State.MDN_PROCESSED and tr.timeouts() == []
    assert not FAILURE_EFFECTS & set(tr.effects())


def test_stale_timer_after_processed_without_final_delivery_is_ignored():
    """A timer the caller forgot to cancel must not turn a finished message into a timeout."""
    t = step(State.MDN_PROCESSED, Event.TIMEOUT, final_delivery_requested=False)
    assert t == Transition(State.MDN_PROCESSED, ("ignore",))


def test_processed_then_dispatched_when_requested():
    tr = sent(final=True)
    tr.at(120, Event.MDN_PROCESSED)
    assert tr.timer == 120 + HOUR  # the dispatched timer starts at the processed MDN
    tr.at(1800, Event.MDN_DISPATCHED)
    assert tr.state is State.MDN_DISPATCHED and tr.timer is None
    tr.advance(48 * HOUR)
    assert tr.state is State.MDN_DISPATCHED and tr.timeouts() == []
    assert not FAILURE_EFFECTS & set(tr.effects())


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize("after_processed", [False, True])
def test_failed_mdn(final, after_processed):
    tr = sent(final=final)
    if after_processed:
        tr.at(60, Event.MDN_PROCESSED)
    t = tr.at(300, Event.MDN_FAILED)
    assert tr.state is State.FAILED
    assert FAILURE_EFFECTS <= set(t.effects) and "cancel-timers" in t.effects
    tr.advance(48 * HOUR)
    assert tr.timeouts() == [] and tr.effects().count("fallback") == 1


@pytest.mark.parametrize("final", [False, True])
def test_no_mdn_times_out_after_one_hour(final):
    tr = sent(final=final)
    tr.advance(HOUR - 1)
    assert tr.state is State.SENT
    tr.advance(HOUR + 1)
    assert tr.state is State.TIMED_OUT and tr.timeouts() == [HOUR]
    *_, (when, event, state, effects) = tr.log
    assert (when, event, state) == (HOUR, Event.TIMEOUT, State.TIMED_OUT)
    assert FAILURE_EFFECTS <= set(effects)


def test_processed_but_no_dispatched_when_requested_times_out():
    tr = sent(final=True)
    tr.at(600, Event.MDN_PROCESSED)
    tr.advance(10 * HOUR)
    assert tr.state is State.TIMED_OUT and tr.timeouts() == [600 + HOUR]
    assert FAILURE_EFFECTS <= set(tr.log[-1][3])


def test_dispatched_delayed_past_the_timeout_is_late_and_fallback_stands():
    """NIST MU2 'dispatched delayed 1 h 05 m': the timeout wins, the late MDN is only recorded."""
    tr = sent(final=True)
    tr.at(30, Event.MDN_PROCESSED)
    t = tr.at(HOUR + 5 * 60, Event.MDN_DISPATCHED)
    assert tr.timeouts() == [30 + HOUR]
    assert tr.state is State.TIMED_OUT and t.effects == ("audit-late",)
    assert tr.effects().count("fallback") == 1 and tr.effects().count("notify-sender-failure") == 1


def test_dispatched_without_processed():
    tr = sent(final=True)
    tr.at(200, Event.MDN_DISPATCHED)
    assert tr.state is State.MDN_DISPATCHED and tr.timer is None
    tr.advance(10 * HOUR)
    assert tr.timeouts() == []


def test_unrequested_dispatched_still_completes():
    tr = sent(final=False)
    tr.at(10, Event.MDN_PROCESSED)
    tr.at(20, Event.MDN_DISPATCHED)
    assert tr.state is State.MDN_DISPATCHED


@pytest.mark.parametrize("final", [False, True])
def test_duplicate_processed_mdn(final):
    tr = sent(final=final)
    tr.at(60, Event.MDN_PROCESSED)
    timer = tr.timer
    t = tr.at(61, Event.MDN_PROCESSED)
    assert t == Transition(State.MDN_PROCESSED, ("audit-duplicate",))
    assert tr.timer == timer  # the duplicate neither restarts nor cancels the dispatched timer


@pytest.mark.parametrize(
    "reach, late, expected",
    [
        ([Event.MDN_DISPATCHED], Event.MDN_DISPATCHED, "audit-duplicate"),
        ([Event.MDN_DISPATCHED], Event.MDN_PROCESSED, "audit-duplicate"),
        ([Event.MDN_FAILED], Event.MDN_FAILED, "audit-duplicate"),
        ([Event.MDN_FAILED], Event.DSN_FAILED, "audit-duplicate"),
        ([Event.MDN_FAILED], Event.MDN_PROCESSED, "audit-late"),
        ([Event.TIMEOUT], Event.MDN_PROCESSED, "audit-late"),
        ([Event.TIMEOUT], Event.MDN_DISPATCHED, "audit-late"),
        ([Event.TIMEOUT], Event.MDN_FAILED, "audit-late"),
        ([Event.MDN_DISPATCHED], Event.TIMEOUT, "ignore"),
        ([Event.MDN_DISPATCHED], Event.MDN_OTHER, "audit-other"),
    ],
)
def test_mdn_for_a_message_already_terminal(reach, late, expected):
    tr = sent(final=True)
    for event in reach:
        tr._apply(event)
    terminal = tr.state
    assert terminal in TERMINAL
    t = tr._apply(late)
    assert t == Transition(terminal, (expected,))


def test_configured_timeouts_are_used():
    tr = sent(final=True, processed_timeout=600, dispatched_timeout=7200)
    tr.advance(599)
    assert tr.state is State.SENT
    tr.at(599, Event.MDN_PROCESSED)
    tr.advance(599 + 7199)
    assert tr.state is State.MDN_PROCESSED
    tr.advance(599 + 7200)
    assert tr.state is State.TIMED_OUT and tr.timeouts() == [599 + 7200]


def test_retry_then_send_then_mdn():
    tr = Tracker(final=False)
    assert tr.at(0, send_event(451, attempts=1, max_attempts=3)).effects == ("schedule-retry",)
    assert tr.state is State.RETRY_WAIT and tr.timer is None  # back-off is the sender's timer
    assert tr.at(300, Event.RETRY_DUE).effects == ("resend",)
    tr.at(301, send_event(None, attempts=2, max_attempts=3))  # dropped connection
    tr.at(900, Event.RETRY_DUE)
    tr.at(901, send_event(250, attempts=3, max_attempts=3))
    assert tr.state is State.SENT and tr.timer == 901 + HOUR
    tr.at(1000, Event.MDN_PROCESSED)
    assert tr.state is State.MDN_PROCESSED


def test_retry_straight_from_retry_wait():
    """A sender that retries without reporting RETRY_DUE (the outbox picks RETRY_WAIT rows) still progresses."""
    tr = Tracker(final=False)
    tr.at(0, Event.SEND_RETRY)
    assert tr.at(60, Event.SEND_RETRY).state is State.RETRY_WAIT
    assert tr.at(180, Event.SEND_OK).effects == ("start-processed-timer",)
    assert tr.state is State.SENT and tr.timer == 180 + HOUR


def test_enum_values_are_their_names():
    """The outbox stores and queries states as text ('QUEUED', 'SENT', 'MDN_PROCESSED', ...)."""
    assert [s.value for s in State] == [s.name for s in State]
    assert [e.value for e in Event] == [e.name for e in Event]


def test_retries_exhausted_fail_with_fallback():
    tr = Tracker(final=False)
    tr.at(0, send_event(421, attempts=1, max_attempts=2))
    tr.at(60, Event.RETRY_DUE)
    t = tr.at(61, send_event(421, attempts=2, max_attempts=2))
    assert tr.state is State.FAILED and FAILURE_EFFECTS <= set(t.effects)


def test_permanent_smtp_failure():
    tr = Tracker(final=True)
    t = tr.at(0, send_event(550, attempts=1, max_attempts=5))
    assert tr.state is State.FAILED and FAILURE_EFFECTS <= set(t.effects)


def test_mdn_before_the_250_cancels_the_retry():
    tr = Tracker(final=True)
    tr.at(0, send_event(None, attempts=1, max_attempts=3))
    t = tr.at(30, Event.MDN_PROCESSED)
    assert tr.state is State.MDN_PROCESSED and t.effects == ("cancel-timers", "start-dispatched-timer")
    assert tr.timer == 30 + HOUR


@pytest.mark.parametrize(
    "code, attempts, expected",
    [
        (250, 1, Event.SEND_OK),
        (421, 1, Event.SEND_RETRY),
        (451, 2, Event.SEND_RETRY),
        (None, 2, Event.SEND_RETRY),
        (451, 3, Event.SEND_FAILED),
        (None, 3, Event.SEND_FAILED),
        (550, 1, Event.SEND_FAILED),
        (554, 1, Event.SEND_FAILED),
        (354, 1, Event.SEND_FAILED),
    ],
)
def test_send_event(code, attempts, expected):
    assert send_event(code, attempts, max_attempts=3) is expected


def test_deadline_per_state():
    kw = dict(processed_timeout=100, dispatched_timeout=1000)
    assert deadline(State.SENT, 10, None, final_delivery_requested=False, **kw) == 110
    assert deadline(State.MDN_PROCESSED, 10, 50, final_delivery_requested=True, **kw) == 1050
    assert deadline(State.MDN_PROCESSED, 10, None, final_delivery_requested=True, **kw) == 1010
    assert deadline(State.MDN_PROCESSED, 10, 50, final_delivery_requested=False, **kw) is None
    assert deadline(State.SENT, 0, None, final_delivery_requested=True) == HOUR
    for state in (State.QUEUED, State.RETRY_WAIT, *TERMINAL):
        for final in (False, True):
            assert deadline(state, 10, 50, final_delivery_requested=final, **kw) is None


@pytest.mark.parametrize(
    "disposition, failure, final, event",
    [
        ("processed", "", False, Event.MDN_PROCESSED),
        ("dispatched", "", True, Event.MDN_DISPATCHED),
        ("dispatched", "", False, Event.MDN_DISPATCHED),
        ("failed", "550 5.1.1 recipient unknown", False, Event.MDN_FAILED),
        ("displayed", "", False, Event.MDN_OTHER),
    ],
)
def test_event_for_built_and_parsed_mdn(disposition, failure, final, event):
    _, entity = build_mdn(
        original_message_id="<m1@sender.test>",
        original_from="a@sender.test",
        original_to="b@receiver.test",
        reporting_ua="receiver.test; hl7referral",
        disposition=disposition,
        failure=failure,
        final_destination_delivery=final,
    )
    assert event_for_mdn(parse_mdn(entity)) is event


@pytest.mark.parametrize(
    "disposition, failure, event",
    [
        ("processed", "error", Event.MDN_FAILED),  # processed/error: an error prevented processing
        ("dispatched", "content could not be decrypted", Event.MDN_FAILED),
        ("failed", "", Event.MDN_FAILED),
        ("deleted", "", Event.MDN_OTHER),
        ("denied", "", Event.MDN_OTHER),
    ],
)
def test_event_for_peer_dispositions(disposition, failure, event):
    mdn = Mdn("<m1@sender.test>", disposition, "automatic-action/MDN-sent-automatically", "b@r.test", "", "", failure)
    assert event_for_mdn(mdn) is event


# -- properties -------------------------------------------------------------------------------


ALL = list(itertools.product(State, Event, (False, True)))


@pytest.mark.parametrize("state, event, final", ALL)
def test_step_is_total_and_terminal_states_stay(state, event, final):
    t = step(state, event, final_delivery_requested=final)
    assert isinstance(t, Transition) and isinstance(t.state, State) and t.effects
    assert all(isinstance(e, str) for e in t.effects)
    if state in TERMINAL:
        assert t.state is state
        assert set(t.effects) <= {"audit-duplicate", "audit-late", "audit-other", "ignore"}
    # The failure notice and the fallback come exactly with entering FAILED or TIMED_OUT.
    entering_failure = state not in TERMINAL and t.state in (State.FAILED, State.TIMED_OUT)
    assert (FAILURE_EFFECTS <= set(t.effects)) == entering_failure
    assert bool(FAILURE_EFFECTS & set(t.effects)) == entering_failure
    if t.state is State.MDN_PROCESSED and state is not State.MDN_PROCESSED:
        assert ("start-dispatched-timer" in t.effects) == final


def test_table_covers_every_combination():
    assert len(ALL) == len(State) * len(Event) * 2
    assert {step(s, e, final_delivery_requested=f).state for s, e, f in ALL} == set(State)


@settings(max_examples=500, deadline=None)
@given(st.booleans(), st.lists(st.sampled_from(list(Event)), max_size=30))
def test_any_event_sequence_notifies_and_falls_back_at_most_once(final, events):
    state, seen_terminal = State.QUEUED, None
    notices = 0
    for event in events:
        t = step(state, event, final_delivery_requested=final)
        notices += t.effects.count("notify-sender-failure")
        assert t.effects.count("fallback") == t.effects.count("notify-sender-failure")
        if seen_terminal is not None:
            assert t.state is seen_terminal
        state = t.state
        if state in TERMINAL and seen_terminal is None:
            seen_terminal = state
    assert notices <= 1
