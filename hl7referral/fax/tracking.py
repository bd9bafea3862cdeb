"""The transport state of one fax attempt, as a transition table.

::

    QUEUED / RETRY_WAIT ─SUBMITTED─▶ SUBMITTED ─STATUS sending─▶ SENDING ─STATUS delivered─▶ DELIVERED
    QUEUED / RETRY_WAIT ─SUBMIT_RETRY (refused, 5xx) | SUBMIT_UNKNOWN (timeout)─▶ RETRY_WAIT
    QUEUED / RETRY_WAIT ─SUBMIT_REJECTED (4xx, bad number) | GIVE_UP (attempts spent)─▶ FAILED
    SUBMITTED / SENDING ─STATUS failed─▶ FAILED
    SUBMITTED / SENDING ─TIMEOUT (no final status in time)─▶ FAILED
    QUEUED / RETRY_WAIT ─STATUS *─▶ as from SUBMITTED     (a callback that names our key overtook
                                                          the submit answer: the job exists)

Sans-I/O: :func:`step` maps (state, event) to the next state and the effects the caller
carries out; it reads no clock and touches no store.

Invariants
----------
* :func:`step` is total: every (State, Event) pair has a :class:`Transition`; it never raises.
* Statuses only move forward (QUEUED < SENDING < DELIVERED | FAILED). A status at or below the
  current one (a duplicated or out-of-order callback, a poll that lags a callback) leaves the
  state alone and is only recorded (``audit-stale``; ``audit-same`` for a poll that confirms
  the state); nothing leaves DELIVERED or FAILED.
* Every entry into FAILED carries ``alert`` (a coordinator alert naming the referral), and
  nothing else does: a fax attempt raises at most one alert.
* SUBMIT_UNKNOWN (the gateway may hold the job) moves to RETRY_WAIT with ``find-first``: the
  next attempt asks the gateway for a job with this key before it submits again, so one attempt
  is at most one fax.
* Only SUBMITTED and SENDING wait for the gateway (polls and the final-status deadline run there).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .gateway import Status


class State(str, Enum):
    """Values are the names: the outbox stores them as text."""

    QUEUED = "QUEUED"
    RETRY_WAIT = "RETRY_WAIT"
    SUBMITTED = "SUBMITTED"
    SENDING = "SENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class Event(str, Enum):
    SUBMITTED = "SUBMITTED"
    SUBMIT_RETRY = "SUBMIT_RETRY"
    SUBMIT_UNKNOWN = "SUBMIT_UNKNOWN"
    SUBMIT_REJECTED = "SUBMIT_REJECTED"
    GIVE_UP = "GIVE_UP"
    STATUS_QUEUED = "STATUS_QUEUED"
    STATUS_SENDING = "STATUS_SENDING"
    STATUS_DELIVERED = "STATUS_DELIVERED"
    STATUS_FAILED = "STATUS_FAILED"
    TIMEOUT = "TIMEOUT"


WAITING = (State.SUBMITTED, State.SENDING)      # the gateway holds the job
UNSENT = (State.QUEUED, State.RETRY_WAIT)        # we still have to submit it
FINAL = (State.DELIVERED, State.FAILED)

_STATUS_EVENT = {Status.QUEUED: Event.STATUS_QUEUED, Status.SENDING: Event.STATUS_SENDING,
                 Status.DELIVERED: Event.STATUS_DELIVERED, Status.FAILED: Event.STATUS_FAILED}
_STATUS_STATE = {Event.STATUS_QUEUED: State.SUBMITTED, Event.STATUS_SENDING: State.SENDING,
                 Event.STATUS_DELIVERED: State.DELIVERED, Event.STATUS_FAILED: State.FAILED}
_RANK = {State.QUEUED: 0, State.RETRY_WAIT: 0, State.SUBMITTED: 1, State.SENDING: 2,
         State.DELIVERED: 3, State.FAILED: 3}


@dataclass(frozen=True)
class Transition:
    state: State
    effects: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return not {"audit-stale", "audit-same", "ignore"} & set(self.effects)


def status_event(status: Status) -> Event:
    return _STATUS_EVENT[status]


def step(state: State, event: Event) -> Transition:
    """The next state and effects for *event* in *state* (total; see the module's invariants)."""
    if event in _STATUS_STATE:
        target = _STATUS_STATE[event]
        if state == target and state not in FINAL:
            return Transition(state, ("audit-same",))  # a poll that confirms what we know
        if state in FINAL or _RANK[target] <= _RANK[state]:
            return Transition(state, ("audit-stale",))
        return _enter(target, ("cancel-retry",) if state in UNSENT else ())
    if state in FINAL:
        return Transition(state, ("ignore",))
    if event == Event.TIMEOUT:
        return _enter(State.FAILED) if state in WAITING else Transition(state, ("ignore",))
    if state in WAITING:
        # A submit outcome for a job the gateway already holds: a late answer to an attempt
        # that a callback has already settled.
        return Transition(state, ("ignore",))
    if event == Event.SUBMITTED:
        return _enter(State.SUBMITTED)
    if event == Event.SUBMIT_RETRY:
        return Transition(State.RETRY_WAIT, ("schedule-retry",))
    if event == Event.SUBMIT_UNKNOWN:
        return Transition(State.RETRY_WAIT, ("schedule-retry", "find-first"))
    return _enter(State.FAILED)  # SUBMIT_REJECTED, GIVE_UP


def _enter(state: State, extra: tuple[str, ...] = ()) -> Transition:
    if state == State.FAILED:
        return Transition(state, (*extra, "alert"))
    if state in WAITING:
        return Transition(state, (*extra, "await-status"))
    return Transition(state, extra)
