"""A referral's business state, after ONC 360X, as a function of what has been observed.

Events about one referral arrive in any order (a booking before the accept, a no-show
notice after the rebooking), twice, or not at all. So the state is not stepped event by
event; each event adds a *fact* to :class:`Facts`, and :func:`state` reads the state off
the facts through one precedence table::

    CLOSED            the consult note (referral outcome) is filed in the referring chart
    CANCELLED         the recipient confirmed the initiator's cancel
    DECLINED          the recipient declined, and no booking, visit or note contradicts it
    SEEN              an appointment was completed, or the consult note came (the visit happened)
    CANCEL_REQUESTED  the initiator asked to cancel (and the recipient has not refused)
    SCHEDULED         the latest appointment is booked
    NO_SHOW           the latest appointment was missed
    ACCEPTED          the recipient accepted
    DELIVERED         receipt confirmed (processed MDN, ACK)
    SENT              the packet left
    AUTH_PENDING      prior authorization is needed and not yet approved
    RECEIVED          the order is in, nothing else yet

"Latest appointment" is the one with the latest start time among those not cancelled,
so a rebooking after a no-show wins whatever order the S12 and the S26 arrive in.

Invariants
----------
* :func:`observe` is idempotent, commutative and associative (facts only grow: sets
  union, per-appointment statuses take the higher rank), so every arrival order of the
  same events, with any duplicates, gives the same :class:`Facts`, hence the same state.
* :func:`timeline` depends only on the set of events (sorted by their own time, then a
  fixed order of kinds), never on arrival order, and names each step of the main path
  (SENT, DELIVERED, ACCEPTED, SCHEDULED, SEEN, CLOSED) that the referral passed without
  its own event as *implied*, with the event that implied it.
* Interim notes never change the state; they are recorded (facts and timeline).
* Sans-I/O: no clock, no store; times are the events' own ISO-8601 UTC strings.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, replace


def utc_text(at: dt.datetime) -> str:
    """A datetime as the time string events carry, ``YYYY-MM-DDTHH:MM:SSZ`` (UTC; a naive one is
    local time, as :meth:`~datetime.datetime.astimezone` takes it). The same text as ``strftime``
    at a third of its cost: every event and audit row formats one or more."""
    u = at if at.tzinfo is dt.timezone.utc else at.astimezone(dt.timezone.utc)
    if u.year < 1000:   # strftime writes such a year unpadded: keep its text
        return u.strftime("%Y-%m-%dT%H:%M:%SZ")
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (u.year, u.month, u.day, u.hour, u.minute, u.second)


class State(str, enum.Enum):
    RECEIVED = "RECEIVED"
    AUTH_PENDING = "AUTH_PENDING"
    SENT = "SENT"
    DELIVERED = "DELIVERED"
    ACCEPTED = "ACCEPTED"
    DECLINED = "DECLINED"
    SCHEDULED = "SCHEDULED"
    NO_SHOW = "NO_SHOW"
    SEEN = "SEEN"
    CANCEL_REQUESTED = "CANCEL_REQUESTED"
    CANCELLED = "CANCELLED"
    CLOSED = "CLOSED"

    @property
    def final(self) -> bool:
        return self in (State.DECLINED, State.CANCELLED, State.CLOSED)


class Kind(str, enum.Enum):
    """What an inbound (or our own) message says about the referral."""

    AUTH_REQUIRED = "AUTH_REQUIRED"        # payer rules: hold the send
    AUTH_APPROVED = "AUTH_APPROVED"        # AUT segment, inbound approval, `auth approve`
    SENT = "SENT"                          # a transport accepted the packet (SMTP 250, fax submitted)
    DELIVERED = "DELIVERED"                # processed MDN, HL7 ACK, fax delivered
    ACCEPTED = "ACCEPTED"                  # OSU^O51 ORC-1 OK / ORC-5 IP (per partner table), RRI^I12 accepted
    DECLINED = "DECLINED"                  # OSU^O51 ORC-1 UA / ORC-5 CA, RRI^I12 rejected
    BOOKED = "BOOKED"                      # SIU^S12 / S13 / S14 (appointment id, start time)
    NO_SHOW = "NO_SHOW"                    # SIU^S26
    APPOINTMENT_CANCELLED = "APPOINTMENT_CANCELLED"  # SIU^S15 / S17
    VISIT_DONE = "VISIT_DONE"              # the appointment completed (SIU status, RRI PV1, a visit note)
    INTERIM_NOTE = "INTERIM_NOTE"          # recorded, state unchanged
    CONSULT_NOTE = "CONSULT_NOTE"          # MDM^T02 / C-CDA Consultation Note: the outcome
    NOTE_FILED = "NOTE_FILED"              # the note is in the referring chart (our MDM^T02 ACKed): loop closed
    CANCEL_REQUESTED = "CANCEL_REQUESTED"  # initiator's OSU ORC-1 CA
    CANCEL_CONFIRMED = "CANCEL_CONFIRMED"  # recipient's OSU ORC-1 CR
    CANCEL_REFUSED = "CANCEL_REFUSED"      # recipient's OSU ORC-1 UC: the referral goes on


# One appointment's own status: a later word about it outranks an earlier one, whatever
# the arrival order (a no-show or a cancel is news about a booking; a visit ends it).
_APPOINTMENT_RANK = {Kind.BOOKED: 1, Kind.NO_SHOW: 2, Kind.APPOINTMENT_CANCELLED: 2, Kind.VISIT_DONE: 3}
_FLAGS = (Kind.AUTH_REQUIRED, Kind.AUTH_APPROVED, Kind.SENT, Kind.DELIVERED, Kind.ACCEPTED, Kind.DECLINED,
          Kind.CONSULT_NOTE, Kind.NOTE_FILED, Kind.CANCEL_REQUESTED, Kind.CANCEL_CONFIRMED, Kind.CANCEL_REFUSED)
_KIND_ORDER = {k: i for i, k in enumerate(Kind)}


@dataclass(frozen=True)
class Event:
    kind: Kind
    at: str                    # when it happened, ISO-8601 UTC (the message's own time, not arrival)
    appointment: str = ""      # SIU: the filler appointment id (SCH-2)
    starts: str = ""           # SIU: the appointment's start, ISO-8601 UTC
    source: str = ""           # where it came from ("SIU^S12 #412", "mdn <...>"): for the timeline

    def key(self) -> tuple:
        """Identity for de-duplication: the same message seen twice is one event."""
        return (self.kind, self.at, self.appointment, self.starts, self.source)


@dataclass(frozen=True)
class Appointment:
    status: Kind = Kind.BOOKED
    starts: str = ""


@dataclass(frozen=True)
class Facts:
    flags: frozenset[Kind] = frozenset()
    appointments: tuple[tuple[str, Appointment], ...] = ()   # sorted by id: equal facts compare equal
    interim_notes: frozenset[str] = frozenset()             # their sources

    def appointment(self, appointment_id: str) -> Appointment | None:
        return dict(self.appointments).get(appointment_id)


def observe(facts: Facts, event: Event) -> Facts:
    """The facts after *event* (see the invariants: order and duplicates do not matter)."""
    if event.kind in _FLAGS:
        return replace(facts, flags=facts.flags | {event.kind})
    if event.kind == Kind.INTERIM_NOTE:
        return replace(facts, interim_notes=facts.interim_notes | {event.source or event.at})
    appointments = dict(facts.appointments)
    appointments[event.appointment] = _booking(appointments.get(event.appointment), event)
    return replace(facts, appointments=tuple(sorted(appointments.items())))


def _booking(old: Appointment | None, event: Event) -> Appointment:
    """One appointment's status after *event* about it (the higher rank wins; the first on a tie)."""
    if old is None:
        return Appointment(status=event.kind, starts=event.starts)
    status = max((old.status, event.kind), key=_APPOINTMENT_RANK.__getitem__)
    return Appointment(status=status, starts=max(old.starts, event.starts))


def observe_all(events, facts: Facts | None = None) -> Facts:
    """:func:`observe` of each event in turn, folded in mutable sets: one :class:`Facts` built at
    the end instead of one per event (the tracker recomputes a referral from all its events)."""
    facts = facts or Facts()
    flags, notes, appointments = set(facts.flags), set(facts.interim_notes), dict(facts.appointments)
    for e in events:
        if e.kind in _FLAGS:
            flags.add(e.kind)
        elif e.kind == Kind.INTERIM_NOTE:
            notes.add(e.source or e.at)
        else:
            appointments[e.appointment] = _booking(appointments.get(e.appointment), e)
    return Facts(frozenset(flags), tuple(sorted(appointments.items())), frozenset(notes))


def state(facts: Facts) -> State:
    f = facts.flags
    appointments = [a for _, a in facts.appointments]
    visited = any(a.status == Kind.VISIT_DONE for a in appointments)
    if Kind.NOTE_FILED in f:
        return State.CLOSED
    if Kind.CONSULT_NOTE in f:
        return State.SEEN  # the outcome is in (so the visit happened); CLOSED once it is filed
    if Kind.CANCEL_CONFIRMED in f:
        return State.CANCELLED
    if Kind.DECLINED in f and not appointments and not facts.interim_notes:
        return State.DECLINED
    if visited:
        return State.SEEN
    if Kind.CANCEL_REQUESTED in f and Kind.CANCEL_REFUSED not in f:
        return State.CANCEL_REQUESTED
    live = [(a.starts, i) for i, a in enumerate(appointments) if a.status != Kind.APPOINTMENT_CANCELLED]
    if live:
        latest = appointments[max(live)[1]]
        return State.SCHEDULED if latest.status == Kind.BOOKED else State.NO_SHOW
    if Kind.ACCEPTED in f or facts.interim_notes or appointments:
        return State.ACCEPTED
    if Kind.DELIVERED in f:
        return State.DELIVERED
    if Kind.SENT in f:
        return State.SENT
    if Kind.AUTH_REQUIRED in f and Kind.AUTH_APPROVED not in f:
        return State.AUTH_PENDING
    return State.RECEIVED


# The main path: a step reached without its own event is recorded as implied by the later one.
_PATH = (State.SENT, State.DELIVERED, State.ACCEPTED, State.SCHEDULED, State.SEEN, State.CLOSED)
_EVIDENCE = {State.SENT: {Kind.SENT}, State.DELIVERED: {Kind.DELIVERED}, State.ACCEPTED: {Kind.ACCEPTED},
             State.SCHEDULED: {Kind.BOOKED}, State.SEEN: {Kind.VISIT_DONE}, State.CLOSED: {Kind.NOTE_FILED}}
# The furthest main-path step an event proves.
_PROVES = {Kind.SENT: State.SENT, Kind.DELIVERED: State.DELIVERED, Kind.ACCEPTED: State.ACCEPTED,
           Kind.BOOKED: State.SCHEDULED, Kind.NO_SHOW: State.SCHEDULED, Kind.APPOINTMENT_CANCELLED: State.SCHEDULED,
           Kind.INTERIM_NOTE: State.ACCEPTED, Kind.VISIT_DONE: State.SEEN, Kind.CONSULT_NOTE: State.SEEN,
           Kind.NOTE_FILED: State.CLOSED}


@dataclass(frozen=True)
class Step:
    at: str
    kind: str          # an event kind, or "IMPLIED"
    state: State       # the state after this step (from the events up to it)
    detail: str        # the source, or what implied the step


def timeline(events) -> list[Step]:
    """The referral's history from its events: one step each (duplicates once), in their own time order."""
    unique = {e.key(): e for e in events}
    ordered = sorted(unique.values(), key=lambda e: (e.at, _KIND_ORDER[e.kind], e.appointment, e.source))
    steps: list[Step] = []
    facts, evidenced = Facts(), set()
    for e in ordered:
        proved = _PROVES.get(e.kind)
        if proved is not None:
            own = e.kind in _EVIDENCE[proved]
            for earlier in _PATH[:_PATH.index(proved) + (0 if own else 1)]:
                if earlier not in evidenced:
                    evidenced.add(earlier)
                    steps.append(Step(e.at, "IMPLIED", state(facts), f"{earlier.value} implied by {e.kind.value}"
                                                                     + (f" ({e.source})" if e.source else "")))
            if own:
                evidenced.add(proved)
        facts = observe(facts, e)
        steps.append(Step(e.at, e.kind.value, state(facts), e.source))
    return steps


STAGES = _PATH


def stage_times(events) -> dict[State, str]:
    """When each main-path stage was first reached (own event or implied by a later one), and the final state's time.

    Used for reports (time per stage); the same events in any order give the same times.
    """
    unique = {e.key(): e for e in events}
    out: dict[State, str] = {}
    for e in sorted(unique.values(), key=lambda e: (e.at, _KIND_ORDER[e.kind])):
        proved = _PROVES.get(e.kind)
        if proved is not None:
            for stage in _PATH[:_PATH.index(proved) + 1]:
                out.setdefault(stage, e.at)
        final = {Kind.DECLINED: State.DECLINED, Kind.CANCEL_CONFIRMED: State.CANCELLED}.get(e.kind)
        if final is not None:
            out.setdefault(final, e.at)
    return out
