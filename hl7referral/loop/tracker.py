"""The loop tracker: referrals in, events applied, SLA items acted on, all through one store.

A :class:`Tracker` is bound to one :class:`~hl7referral.store.Store` (in the engine: the
writer's, through the committer; in the CLI: its own) and one clock reading per call
(``now``), so ``hl7referral timers run --now ISO`` and the running service do exactly
the same thing, and tests drive it with a test clock.

Invariants
----------
* Correlation is exact: an observation applies to the one referral its keys name, or the
  message goes to the work queue whole with the reason (no match, two matches, nothing
  readable); a note is kept either way.
* An SLA item is acted on once (its key in ``sla_actions``); acting means an alert with an
  owner, a queued notification, or a task. Each of those is itself unique by the item's
  key, and is written before the ledger entry: a crash between them repeats the act at the
  next run, which then changes nothing; it is never skipped.
* Nothing here sends: notifications are queued; a notifier service sends them.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Callable

from ..config.loop import LoopConfig
from ..store.loop import Loop
from ..store.sqlite import Store
from . import sla
from .states import Event, Kind, State, utc_text

UTC = dt.timezone.utc
RECIPIENT_SKIPS = (sla.PATIENT, sla.REFERRER)   # not ours to do for a referral sent to us
AUDIENCE = {sla.ALERT: "coordinator", sla.PATIENT: "patient", sla.SPECIALIST: "specialist", sla.REFERRER: "referrer"}


def iso(at: dt.datetime) -> str:
    return utc_text(at)


def parse_iso(text: str) -> dt.datetime:
    at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Outcome:
    referral_id: str | None
    added: int = 0
    before: State | None = None
    after: State | None = None
    workqueue_id: int | None = None
    note_id: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Acted:
    key: str
    referral_id: str
    rule: str
    action: str
    owner: str
    how: str          # "alert", "notification", "task"


# (audience, rule, referral row, values, owner) -> [(notifier, recipient, subject, body)]: the notify layer
# picks the notifiers for the audience, resolves the address (the owner's, the contact's) and renders the
# channel's template; an empty list means nobody can be reached that way.
Render = Callable[[str, str, dict, dict, str], list[tuple[str, str, str, str]]]


def referral_facts(referral, destination=None) -> dict:
    """What a referral's notifications need (contact, specialist, purpose), from the mapped model."""
    patient = referral.patient
    contact_party = patient.owner if referral.veterinary and patient.owner else None
    telecoms = (contact_party.telecom if contact_party else patient.telecom) or []
    email = next((t.value[7:] for t in telecoms if t.value.startswith("mailto:")), "")
    phone = next((t.value[4:] for t in telecoms if t.value.startswith("tel:")), "")
    recipient = referral.recipient
    spec_phone = next((t.value[4:] for t in recipient.telecom if t.value.startswith("tel:")), "")
    payer = referral.payers[0] if referral.payers else None
    return {
        "email": email, "phone": phone, "veterinary": bool(referral.veterinary),
        "specialist": (getattr(destination, "name", "") or recipient.organization
                       or " ".join([*recipient.name.given, recipient.name.family]).strip()),
        "specialist_phone": spec_phone or getattr(destination, "phone", ""),
        "specialist_email": getattr(destination, "email", ""),
        "scheduling_link": getattr(destination, "scheduling_link", ""),
        "how_to_book": getattr(destination, "how_to_book", ""),
        "purpose": referral.reason.display or referral.reason_text or referral.requested_service.display,
        "referring_provider": next((i.extension for i in referral.referring.ids if i.extension), ""),
        "payer": (payer.name if payer else ""),
        "authorization": (payer.authorization.number if payer and payer.authorization else ""),
    }


class Tracker:
    def __init__(self, store: Store, config: LoopConfig, *, render: Render | None = None,
                 reader: Callable[[dict], object] | None = None) -> None:
        self.loop = Loop(store)
        self.config = config
        self.render = render
        self.reader = reader   # work-queue item -> Observation (reread.py): replays early arrivals at open

    # -- referrals in ----------------------------------------------------------------------

    def open(self, referral_id: str, *, now: dt.datetime, channel: str, facts: dict, message_id: int | None = None,
             specialty: str = "", destination: str = "", keys=()) -> State:
        """Record a new referral; with payer rules needing authorization (and none in the message), hold it."""
        at = iso(now)
        payer = facts.get("payer", "")
        hold = self.config.auth_required(payer=payer, specialty=specialty, channel=channel) \
            and not facts.get("authorization")
        created = self.loop.open_referral(
            referral_id, at=at, channel=channel, specialty=specialty, destination=destination, payer=payer,
            veterinary=bool(facts.get("veterinary")), contact=facts, message_id=message_id, keys=keys,
            source=f"message #{message_id}" if message_id else "", auth="required" if hold else "",
            owner=self.config.owner_for(channel, payer, specialty))
        if created and hold:
            why = f"auth rules: payer {payer or '-'}, specialty {specialty or '-'}"
            self.loop.apply(referral_id, [Event(Kind.AUTH_REQUIRED, at, source=why)], at=at, actor="auth-rules")
        if created and self.reader is not None:
            # A booking or an accept can overtake its referral (the answer came while the Referral
            # Note was being built): what waits in the work queue for this id is applied now.
            for item in self.loop.waiting_for([referral_id, *(k for k, _ in keys)]):
                self.replay(item, self.reader(item), now=now, by="engine", referral_id=None)
        row = self.loop.get(referral_id)
        return State(row["state"]) if row else State.RECEIVED

    def held(self, referral_id: str) -> bool:
        row = self.loop.get(referral_id)
        return bool(row) and row["state"] == State.AUTH_PENDING.value

    def approve(self, referral_id: str, *, number: str, now: dt.datetime, actor: str, source: str = "") -> State:
        """Authorization approved (CLI, inbound message): the held send may go."""
        at = iso(now)
        self.loop.set_auth(referral_id, auth="approved", number=number, at=at, actor=actor, source=source)
        applied = self.loop.apply(referral_id, [Event(Kind.AUTH_APPROVED, at, source=source or f"auth {number}")],
                                  at=at, actor=actor)
        return applied.after

    # -- events in ---------------------------------------------------------------------------

    def transport_event(self, referral_id: str, kind: Kind, *, at: str, source: str, now: dt.datetime) -> Outcome:
        if self.loop.get(referral_id) is None:
            return Outcome(None, reason=f"no referral {referral_id}")
        a = self.loop.apply(referral_id, [Event(kind, at, source=source)], at=iso(now), actor="transport")
        return Outcome(referral_id, a.added, a.before, a.after)

    def observe(self, obs, *, now: dt.datetime, origin: str, raw: bytes | None) -> Outcome:
        """Apply what an inbound message says (a :class:`~hl7referral.loop.correlate.Observation`).

        It applies only when the keys name exactly one referral and the message was read
        without problems; otherwise it is parked whole (its events stay derivable from the
        raw bytes, for whoever resolves the item).
        """
        at = iso(now)
        match = self.loop.find(obs.keys)
        reasons = list(obs.problems)
        if match.referral_id is None:
            reasons.append(match.reason)
        elif not obs.events and obs.note is None:
            reasons.append(f"{obs.message_type}: nothing to apply")
        if reasons:
            why = "; ".join(reasons)
            item = self.loop.park(at=at, origin=origin, message_type=obs.message_type, keys=obs.keys,
                                  reason=why, raw=raw)
            note_id = self._keep_note(obs, None, at, origin, item)
            return Outcome(None, workqueue_id=item, note_id=note_id, reason=why)
        # Later messages may name this referral only by an appointment or document id.
        learned = [(f"{kind}:{value}", 5) for kind, value in obs.keys
                   if kind not in ("referral", "placer", "control", "message-id") and value]
        with self.loop.store.atomic():
            note_id = self._keep_note(obs, match.referral_id, at, origin, None)
            a = self.loop.apply(match.referral_id, obs.events, at=at, actor="tracker", origin=origin)
            if learned:
                self.loop.add_keys(match.referral_id, learned)
        return Outcome(match.referral_id, a.added, a.before, a.after, note_id=note_id)

    def replay(self, item: dict, obs, *, now: dt.datetime, by: str, referral_id: str | None = None) -> Outcome:
        """A parked item read again (:mod:`reread`): applied to *referral_id* when a person names it,
        else to what its keys name now (the referral may have arrived since); resolved if applied."""
        at = iso(now)
        match = None if referral_id else self.loop.find(obs.keys)
        target = referral_id or match.referral_id
        if referral_id is None and obs.problems:
            return Outcome(None, workqueue_id=item["id"], reason="; ".join(obs.problems))   # a person must look
        if target is None or self.loop.get(target) is None:
            return Outcome(None, workqueue_id=item["id"], reason=(match or self.loop.find(obs.keys)).reason)
        with self.loop.store.atomic():
            events = [e for e in obs.events if e.at]   # an event whose time could not be read is not guessed
            a = self.loop.apply(target, events, at=at, actor=by, origin=f"workqueue #{item['id']}")
            # resolve() also gives the item's kept note (if any) to the referral.
            self.loop.resolve(item["id"], at=at, by=by, referral_id=target,
                              resolution=f"replayed onto {target}" + ("" if referral_id else " (keys match now)"))
        return Outcome(target, a.added, a.before, a.after, workqueue_id=item["id"],
                       note_id=self.loop.note_of_item(item["id"]))

    def _keep_note(self, obs, referral_id, at, origin, workqueue_id) -> int | None:
        note = obs.note
        if note is None:
            return None
        kind = "consult" if any(e.kind == Kind.CONSULT_NOTE for e in obs.events) else "interim"
        return self.loop.save_note(referral_id=referral_id, at=at, kind=kind, format=note.format,
                                   media_type=note.media_type, title=note.title, content=note.content, origin=origin,
                                   workqueue_id=workqueue_id, document_id=note.unique_id,
                                   parent_document_id=note.parent_id, revision=note.revision)

    # -- timers ------------------------------------------------------------------------------

    def run_timers(self, now: dt.datetime, limit: int = 1000) -> list[Acted]:
        """Act on every SLA item due by *now*, once each; reschedule each referral looked at."""
        acted: list[Acted] = []
        for referral_id in self.loop.due(iso(now), limit):
            acted += self.evaluate(referral_id, now)
        return acted

    def evaluate(self, referral_id: str, now: dt.datetime) -> list[Acted]:
        row = self.loop.get(referral_id)
        if row is None:
            return []
        events = self.loop.events(referral_id)
        policy = self.config.policy_for(row["channel"] or "", row["payer"] or "", row["specialty"] or "")
        calendar = self.config.calendar
        done = self.loop.done_keys(referral_id)
        owner = self.config.owner_of(row)
        acted = []
        # One evaluation serves all three: what is due now, when to look again, and since when overdue.
        upcoming = sla.due(referral_id, events, policy, calendar, now, horizon=sla.FAR)
        if row.get("side") == "recipient":
            # A referral sent to us: the patient hears from the initiator, and the referring
            # provider's follow-up is theirs; what stalls on our side is our coordinators' alert.
            upcoming = [d for d in upcoming if d.action not in RECIPIENT_SKIPS]
        due_now = [d for d in upcoming if d.at <= now]
        for item in due_now:
            if item.key in done:
                continue
            how = self._act(row, item, now, events, owner)
            if self.loop.fire(key=item.key, referral_id=referral_id, rule=item.rule, action=item.action,
                              due_at=iso(item.at), at=iso(now), owner=owner, outcome=how):
                acted.append(Acted(item.key, referral_id, item.rule, item.action, owner, how))
            done.add(item.key)
        nxt = min((d.at for d in upcoming if d.key not in done), default=None)
        overdue = min((d.at for d in due_now if d.action == sla.ALERT), default=None)
        self.loop.set_schedule(referral_id, iso(nxt) if nxt else None, iso(overdue) if overdue else None)
        return acted

    def _values(self, row: dict, item: sla.Due, events: list[Event]) -> dict:
        contact = json.loads(row.get("contact") or "{}")
        booking = sum(1 for e in events if e.kind == Kind.BOOKED)
        values = {k: str(v) for k, v in contact.items() if k not in ("email", "phone")}
        values.update(referral_id=row["referral_id"], rule=item.rule, due_at=iso(item.at),
                      deadline=iso(item.deadline) if item.deadline else "", detail=item.detail,
                      state=row["state"], channel=row["channel"] or "", specialty=row["specialty"] or "",
                      destination=row["destination"] or "", bookings=str(booking),
                      patient_or_pet="your pet" if row.get("veterinary") else "you")
        if item.key.count("/") >= 2:
            values["appointment"] = item.key.split("/", 2)[2]   # check-in and no-show items name the appointment
        return values

    def _act(self, row: dict, item: sla.Due, now: dt.datetime, events: list[Event], owner: str) -> str:
        at = iso(now)
        referral_id = row["referral_id"]
        contact = json.loads(row.get("contact") or "{}")
        audience = AUDIENCE[item.action]
        values = self._values(row, item, events)
        hows = []
        if item.action == sla.ALERT:
            self.loop.alert(key=item.key, kind=f"sla-{item.rule}", referral_id=referral_id, channel=row["channel"],
                            at=at, owner=owner, text=item.detail or item.rule)
            hows.append("alert")
        if item.action == sla.REFERRER:
            task_owner = f"provider:{contact['referring_provider']}" if contact.get("referring_provider") else owner
            self.loop.add_task(key=item.key, at=at, referral_id=referral_id, kind="follow-up", owner=task_owner,
                               text="Review the specialist's consult note and follow up (recheck, medication, "
                                    "call the patient or owner)")
            return "task"
        messages = self.render(audience, item.rule, row, values, owner) if self.render else []
        queued = 0
        for notifier, recipient, subject, body in messages:
            if self.loop.queue_notification(key=item.key, at=at, referral_id=referral_id, rule=item.rule,
                                            audience=audience, notifier=notifier, owner=owner, recipient=recipient,
                                            subject=subject, body=body, data=values, now=now.timestamp()):
                queued += 1
        if queued:
            hows.append("notification")
        if item.action in (sla.PATIENT, sla.SPECIALIST) and not queued:
            # Nobody can be reached by a notifier: a person makes the call, and owns it.
            who = "the patient or owner" if item.action == sla.PATIENT else "the specialist's office"
            self.loop.add_task(key=item.key, at=at, referral_id=referral_id, kind=f"call-{audience}", owner=owner,
                               text=f"{item.rule}: contact {who} (no address to notify)"
                                    + (f"; due by {iso(item.deadline)}" if item.deadline else ""),
                               due_at=iso(item.deadline) if item.deadline else None)
            hows.append("task")
        return "+".join(hows) or "recorded"
