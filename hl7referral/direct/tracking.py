"""The transport state of one outbound Direct message, as a transition table.

::

    QUEUED ─SEND_OK (250)─▶ SENT ─MDN_PROCESSED─▶ MDN_PROCESSED ─MDN_DISPATCHED─▶ MDN_DISPATCHED
    QUEUED ─SEND_RETRY (4xx, dropped)─▶ RETRY_WAIT ─RETRY_DUE─▶ QUEUED
    RETRY_WAIT ─SEND_OK─▶ SENT, ─SEND_RETRY─▶ RETRY_WAIT (a sender that retries without RETRY_DUE)
    SENT ─MDN_DISPATCHED─▶ MDN_DISPATCHED           (HISPs that skip the processed MDN)
    QUEUED / RETRY_WAIT / SENT / MDN_PROCESSED ─SEND_FAILED | MDN_FAILED | DSN_FAILED─▶ FAILED
    SENT ─TIMEOUT─▶ TIMED_OUT                        (no processed MDN in time)
    MDN_PROCESSED ─TIMEOUT─▶ TIMED_OUT               (only when timely-and-reliable was requested)

Sans-I/O: :func:`step` maps (state, event, was final delivery requested) to the next state and
the effects the caller must carry out; :func:`deadline` says when the caller's timer should fire
TIMEOUT. Times are floats from the caller's clock; nothing here reads the time.

Invariants:

* :func:`step` is total: every (State, Event, bool) has a :class:`Transition`; it never raises.
* MDN_DISPATCHED, FAILED and TIMED_OUT are terminal: no event leaves them. Anything arriving
  there is recorded (``audit-duplicate`` / ``audit-late``) or ``ignore``-d, state unchanged.
* Every entry into FAILED or TIMED_OUT carries ``notify-sender-failure`` (the failure notice to
  our own user, ETT tests 27/28) and ``fallback`` (the channel's fax fallback, if it has one),
  and ``cancel-timers``; nothing else produces those two effects, so a message is notified and
  faxed at most once.
* A timer runs only in SENT (processed MDN) and, when final delivery was requested, in
  MDN_PROCESSED (dispatched MDN); a TIMEOUT in any other state is a stale timer and is ignored.
* A "processed" MDN when no final delivery was requested leaves MDN_PROCESSED with no timer:
  the receiver owes nothing more, so that is success.

Choices:

* **Late MDN after TIMED_OUT.** Recorded (``audit-late``) but the state stays TIMED_OUT: the fax
  fallback has already gone, so the specialist may now hold the referral twice; flipping the
  state back to "delivered" would hide that from the coordinator, who should see both.
* **MDN before the SMTP 250** (QUEUED / RETRY_WAIT, e.g. the connection dropped after DATA but
  the HISP had taken the message). The MDN proves delivery, so the state moves on as from SENT
  and ``cancel-timers`` also cancels the pending retry, which would otherwise send it twice.
* **Dispatched timer** starts at the processed MDN (``processed_at + dispatched_timeout``). The
  worst case from sending is therefore processed_timeout + dispatched_timeout: declare that sum
  as "N" to the ETT for test 28.
* **Max attempts** is the sender's count, not a state: it reports SEND_FAILED instead of
  SEND_RETRY when attempts are exhausted (:func:`send_event` does that mapping).
* Dispositions other than processed / dispatched / failed (displayed, deleted, denied) arrive as
  MDN_OTHER and are only recorded (``audit-other``); Direct gives them no transport meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .mdn import Mdn


class State(str, Enum):
    """Values are the names: the outbox stores them and queries them as text ('QUEUED', 'SENT', ...)."""

    QUEUED = "QUEUED"
    RETRY_WAIT = "RETRY_WAIT"
    SENT = "SENT"
    MDN_PROCESSED = "MDN_PROCESSED"
    MDN_DISPATCHED = "MDN_DISPATCHED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"


class Event(str, Enum):
    SEND_OK = "SEND_OK"  # SMTP 250 after DATA
    SEND_RETRY = "SEND_RETRY"  # 4xx or a dropped connection, attempts left
    SEND_FAILED = "SEND_FAILED"  # 5xx, or attempts exhausted
    RETRY_DUE = "RETRY_DUE"  # the retry back-off elapsed
    MDN_PROCESSED = "MDN_PROCESSED"
    MDN_DISPATCHED = "MDN_DISPATCHED"
    MDN_FAILED = "MDN_FAILED"  # disposition failed, or an "error" modifier
    MDN_OTHER = "MDN_OTHER"  # displayed / deleted / denied / extensions
    DSN_FAILED = "DSN_FAILED"  # an RFC 3464 delivery-status report with Action: failed
    TIMEOUT = "TIMEOUT"  # the deadline() timer fired


TERMINAL = frozenset({State.MDN_DISPATCHED, State.FAILED, State.TIMED_OUT})

# Effects, in the order the caller should apply them.
START_PROCESSED_TIMER = "start-processed-timer"
START_DISPATCHED_TIMER = "start-dispatched-timer"
CANCEL_TIMERS = "cancel-timers"
SCHEDULE_RETRY = "schedule-retry"
RESEND = "resend"
NOTIFY_SENDER_FAILURE = "notify-sender-failure"
FALLBACK = "fallback"
AUDIT_DUPLICATE = "audit-duplicate"
AUDIT_LATE = "audit-late"
AUDIT_OTHER = "audit-other"
IGNORE = "ignore"


@dataclass(frozen=True)
class Transition:
    state: State
    effects: tuple[str, ...]


S, E = State, Event
_FAIL = (CANCEL_TIMERS, NOTIFY_SENDER_FAILURE, FALLBACK)
# An MDN that proves delivery before we saw the 250 (see "Choices" above).
_EARLY_DISPATCHED = Transition(S.MDN_DISPATCHED, (CANCEL_TIMERS,))

# (state, event) → transition when it does not depend on final_delivery_requested.
# Pairs missing here fall to _default(): "ignore" outside terminal states, audits inside them.
_TABLE: dict[tuple[State, Event], Transition] = {
    (S.QUEUED, E.SEND_OK): Transition(S.SENT, (START_PROCESSED_TIMER,)),
    (S.QUEUED, E.SEND_RETRY): Transition(S.RETRY_WAIT, (SCHEDULE_RETRY,)),
    (S.QUEUED, E.SEND_FAILED): Transition(S.FAILED, _FAIL),
    (S.QUEUED, E.MDN_DISPATCHED): _EARLY_DISPATCHED,
    (S.QUEUED, E.MDN_FAILED): Transition(S.FAILED, _FAIL),
    (S.QUEUED, E.DSN_FAILED): Transition(S.FAILED, _FAIL),
    (S.RETRY_WAIT, E.RETRY_DUE): Transition(S.QUEUED, (RESEND,)),
    # A sender may attempt straight from RETRY_WAIT without reporting RETRY_DUE; a 250 is never lost.
    (S.RETRY_WAIT, E.SEND_OK): Transition(S.SENT, (START_PROCESSED_TIMER,)),
    (S.RETRY_WAIT, E.SEND_RETRY): Transition(S.RETRY_WAIT, (SCHEDULE_RETRY,)),
    (S.RETRY_WAIT, E.SEND_FAILED): Transition(S.FAILED, _FAIL),  # the sender gave up (e.g. expiry)
    (S.RETRY_WAIT, E.MDN_DISPATCHED): _EARLY_DISPATCHED,
    (S.RETRY_WAIT, E.MDN_FAILED): Transition(S.FAILED, _FAIL),
    (S.RETRY_WAIT, E.DSN_FAILED): Transition(S.FAILED, _FAIL),
    (S.SENT, E.MDN_DISPATCHED): Transition(S.MDN_DISPATCHED, (CANCEL_TIMERS,)),
    (S.SENT, E.MDN_FAILED): Transition(S.FAILED, _FAIL),
    (S.SENT, E.DSN_FAILED): Transition(S.FAILED, _FAIL),
    (S.SENT, E.TIMEOUT): Transition(S.TIMED_OUT, _FAIL),
    (S.MDN_PROCESSED, E.MDN_PROCESSED): Transition(S.MDN_PROCESSED, (AUDIT_DUPLICATE,)),
    # A receiver may send dispatched even when not asked (ETT test 40); it still completes.
    (S.MDN_PROCESSED, E.MDN_DISPATCHED): Transition(S.MDN_DISPATCHED, (CANCEL_TIMERS,)),
    (S.MDN_PROCESSED, E.MDN_FAILED): Transition(S.FAILED, _FAIL),
    (S.MDN_PROCESSED, E.DSN_FAILED): Transition(S.FAILED, _FAIL),
}

# (state, event, final_delivery_requested) → transition, where the request changes the answer.
_BY_REQUEST: dict[tuple[State, Event, bool], Transition] = {}
for _state in (S.QUEUED, S.RETRY_WAIT, S.SENT):
    _BY_REQUEST[(_state, E.MDN_PROCESSED, True)] = Transition(
        S.MDN_PROCESSED, (CANCEL_TIMERS, START_DISPATCHED_TIMER)
    )
    _BY_REQUEST[(_state, E.MDN_PROCESSED, False)] = Transition(S.MDN_PROCESSED, (CANCEL_TIMERS,))
_BY_REQUEST[(S.MDN_PROCESSED, E.TIMEOUT, True)] = Transition(S.TIMED_OUT, _FAIL)
_BY_REQUEST[(S.MDN_PROCESSED, E.TIMEOUT, False)] = Transition(S.MDN_PROCESSED, (IGNORE,))  # stale timer
del _state

_MDN_EVENTS = frozenset({E.MDN_PROCESSED, E.MDN_DISPATCHED, E.MDN_FAILED, E.DSN_FAILED})


def _default(state: State, event: Event) -> Transition:
    """What happens to a pair the tables do not name: nothing, but recorded when it is a report."""
    if event is E.MDN_OTHER:
        return Transition(state, (AUDIT_OTHER,))
    if state in TERMINAL and event in _MDN_EVENTS:
        # The same news again is a duplicate; anything after a failure or a timeout is late.
        same = (state is S.MDN_DISPATCHED and event in (E.MDN_DISPATCHED, E.MDN_PROCESSED)) or (
            state is S.FAILED and event in (E.MDN_FAILED, E.DSN_FAILED)
        )
        return Transition(state, (AUDIT_DUPLICATE if same else AUDIT_LATE,))
    return Transition(state, (IGNORE,))


def step(state: State, event: Event, *, final_delivery_requested: bool) -> Transition:
    """The next state and the effects to carry out. Total; never raises; terminal states stay."""
    key = (state, event)
    found = _BY_REQUEST.get((state, event, bool(final_delivery_requested))) or _TABLE.get(key)
    return found if found is not None else _default(state, event)


def deadline(
    state: State,
    sent_at: float,
    processed_at: float | None,
    *,
    processed_timeout: float = 3600,
    dispatched_timeout: float = 3600,
    final_delivery_requested: bool,
) -> float | None:
    """When TIMEOUT fires in ``state``, or None when no timer runs there.

    SENT: ``sent_at + processed_timeout`` (the RI monitor's 1 h default). MDN_PROCESSED with
    final delivery requested: ``processed_at + dispatched_timeout`` (``sent_at`` if the caller
    lost the processed time). The retry back-off of RETRY_WAIT is the sender's, not a TIMEOUT.
    """
    if state is S.SENT:
        return sent_at + processed_timeout
    if state is S.MDN_PROCESSED and final_delivery_requested:
        start = processed_at if processed_at is not None else sent_at
        return start + dispatched_timeout
    return None


def event_for_mdn(mdn: Mdn) -> Event:
    """The tracker event a parsed MDN stands for.

    failed, or any disposition with failure text (a Failure:/Error: field or an "error"
    modifier, RFC 3798 §3.2.6.3: an error prevented processing) → MDN_FAILED.
    """
    if mdn.disposition == "failed" or mdn.failure:
        return E.MDN_FAILED
    if mdn.disposition == "processed":
        return E.MDN_PROCESSED
    if mdn.disposition == "dispatched":
        return E.MDN_DISPATCHED
    return E.MDN_OTHER


def send_event(smtp_code: int | None, attempts: int, max_attempts: int) -> Event:
    """The event for one SMTP attempt: 2xx → SEND_OK; 5xx → SEND_FAILED; 4xx or no reply
    (``None``: dropped connection, timeout) → SEND_RETRY while ``attempts < max_attempts``,
    then SEND_FAILED. ``attempts`` counts the attempt just made."""
    if smtp_code is not None and 200 <= smtp_code < 300:
        return E.SEND_OK
    if smtp_code is not None and not 400 <= smtp_code < 500:
        return E.SEND_FAILED  # 5xx, and nonsense codes, are permanent: retrying will not help
    return E.SEND_RETRY if attempts < max_attempts else E.SEND_FAILED
