"""What an applied loop event owes the other end: 360X answers for the partner, or a message for our EHR.

Called in the transaction that applied the event (LoopService for our EHR's messages, the
Direct thread for the partner's, the ``answer`` command), so "applied" and "owed" commit
together: a crash cannot leave an answer that was never owed, or owed twice (relay keys).

=====================  ==========================  ============================================
the referral is        the event came from          what is owed
=====================  ==========================  ============================================
ours (recipient)       our EHR (MLLP) / `answer`    OSU^O51 / SIU^S12 S15 S26 to the initiator, a
                                                    Consultation Note beside the OSU for a note
ours (initiator)       our EHR (MLLP)               a cancel request (OSU^O51 CA) to the recipient
ours (recipient)       the initiator (Direct)       its cancel request to our EHR (OSU^O51 CA)
=====================  ==========================  ============================================

Invariants
----------
* The referral id goes back exactly as it came (the EI the initiator sent, kept at receipt).
* A text note becomes a C-CDA Consultation Note (``cda/consult_note.py``) with
  ``inFulfillmentOf/order/id`` = that id; a C-CDA the EHR sent is carried as it is.
* Control ids and relay keys are derived from the referral and the event, so owing the same
  event twice (a redelivered message, a replay) owes one answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import hl7

from ..loop.correlate import Observation
from ..loop.states import Event, Kind
from ..store.loop import Loop
from ..store.outbox import Outbox
from ..store.relay import INITIATOR, RECIPIENT, Relay
from ..v2 import answers as v2answers

TO_INITIATOR = frozenset({Kind.ACCEPTED, Kind.DECLINED, Kind.BOOKED, Kind.NO_SHOW, Kind.APPOINTMENT_CANCELLED,
                          Kind.CANCEL_CONFIRMED, Kind.CANCEL_REFUSED, Kind.CONSULT_NOTE, Kind.INTERIM_NOTE})
TO_RECIPIENT = frozenset({Kind.CANCEL_REQUESTED})
NOTES = (Kind.CONSULT_NOTE, Kind.INTERIM_NOTE)


def _event_key(e: Event) -> str:
    return hashlib.sha256("|".join((e.kind.value, e.at, e.appointment, e.starts)).encode()).hexdigest()[:12]


def _facts(loop: Loop, referral_id: str) -> dict:
    row = loop.get(referral_id) or {}
    try:
        return json.loads(row.get("contact") or "{}")
    except ValueError:
        return {}


def _whom(facts: dict, referral_id: str) -> tuple[str, "v2answers.Patient | None"]:
    """The referral id as the other end sent it (EI) and the patient's PID-3/PID-5 for our messages."""
    referral_ei = facts.get("referral_ei") or v2answers.ei_from_key(referral_id)
    patient = v2answers.Patient(ids=facts.get("patient_ids", ""), name=facts.get("patient_name", "")) \
        if facts.get("patient_ids") and facts.get("patient_name") else None
    return referral_ei, patient


def _sending(config) -> tuple[str, str]:
    # 360X identifies facilities by OID (^<oid>^ISO): ours is the engine's local root.
    return ("HL7REFERRAL", f"^{config.local_root}^ISO")


def _reason_in(raw: bytes | None, codec: str) -> str:
    """ORC-16 (order control code reason, CE: its text, else its code) of our EHR's v2 message: why
    it declined or cancels, which the other end's coordinator must read ('' when there is none)."""
    if not raw or raw.lstrip()[:4] != b"MSH|":
        return ""
    try:
        message = hl7.parse(raw.decode(codec, "replace").replace("\r\n", "\r").replace("\n", "\r"))
        for orc in message.segments("ORC"):
            if len(orc) > 16 and str(orc[16]).strip():
                parts = str(orc[16]).split(message.separators[2])[0].split(message.separators[3])
                text = parts[1] if len(parts) > 1 and parts[1].strip() else parts[0]
                return message.unescape(text).strip()
    except (KeyError, IndexError, ValueError, hl7.exceptions.ParseException):
        pass
    return ""


def _patient_of_our_referral(store, config, referral_id: str) -> dict:
    """patient_cx / patient_ids / patient_name of a referral we initiated, as the recipient reads them
    (engine/inbound.py): from the Referral Note we sent; {} when there is none to read."""
    from ..cda.referral_reader import ReferralNoteError, read_referral_note

    row = store.ready_document_for(referral_id)
    if not row or not row.get("xml"):
        return {}
    try:
        note = read_referral_note(row["xml"], local_root=config.local_root)
    except ReferralNoteError:
        return {}
    found = {"patient_cx": note.patient_cx, "patient_ids": note.patient_ids, "patient_name": note.patient_name}
    return {k: v for k, v in found.items() if v}


def owe_from_ehr(store, config, *, referral_id: str, obs: Observation, raw: bytes | None, now_hl7: str,
                 at: str, codec: str = "ascii", reason: str = "", origin: str = "") -> list[str]:
    """Our EHR (or a person, through ``answer``) said something about *referral_id*: owe the partner
    the 360X answer. Returns the kinds owed (for the log). The reason is *reason*, else our EHR's
    own (ORC-16 of *raw*), else the answer's default."""
    relay = Relay(store)
    side = relay.side_of(referral_id)
    if side is None:
        return []
    wanted = TO_INITIATOR if side.side == RECIPIENT else TO_RECIPIENT
    events = [e for e in obs.events if e.kind in wanted]
    if not events:
        return []
    loop = Loop(store)
    if not side.partner:
        loop.alert(key=f"relay/{referral_id}/no-partner", kind="answer-not-sent", at=at,
                   owner=config.loop.owner_of(loop.get(referral_id) or {}), referral_id=referral_id,
                   text="the other end's Direct address is not known: answers cannot go back")
        return []
    if side.side == RECIPIENT and obs.note is not None and obs.note.revision:
        # A revision (MDM^T04-T10) of a note the initiator has: sent as a new Consultation Note it
        # would be filed as a second original. Not built here yet (relatedDocument): a person sends it.
        loop.alert(key=f"relay/{referral_id}/revision/{obs.note.unique_id or origin}", kind="answer-not-sent",
                   at=at, owner=config.loop.owner_of(loop.get(referral_id) or {}), referral_id=referral_id,
                   text=f"a revised consult note (MDM^{obs.note.revision}, {origin or 'our EHR'}) is kept but not "
                        "sent to the initiator: send the correction to them by hand")
        return []
    facts = _facts(loop, referral_id)
    if side.side == INITIATOR and not facts.get("patient_cx"):
        # Our own referral's facts are the mapped ones (contact, purpose): the patient its packets
        # need (XDM patientId, the OSU's PID) is read off the Referral Note we sent, and kept.
        ours = _patient_of_our_referral(store, config, referral_id)
        if ours:
            relay.keep_facts(referral_id, ours)
            facts = {**ours, **facts}
    referral_ei, patient = _whom(facts, referral_id)
    reason = reason or _reason_in(raw, codec)
    prefix = "HRA" + hashlib.sha256(referral_id.encode()).hexdigest()[:6].upper()
    owed = []
    for event in events:
        one = replace(obs, events=(event,))
        built = v2answers.answers_for(one, referral_ei=referral_ei,
                                      control_id_prefix=f"{prefix}{_event_key(event)[:6].upper()}",
                                      now_hl7=now_hl7, sending=_sending(config), receiving=("", ""),
                                      patient=patient, reason=reason)
        document = None
        if event.kind in NOTES:
            document = consult_document(config, obs, raw, codec=codec, referral_ei=referral_ei, facts=facts)
        for answer in built:
            key = f"{referral_id}/{event.kind.value}/{_event_key(event)}"
            if relay.add(key=key, at=at, referral_id=referral_id, kind=event.kind.value,
                         message_type=answer.message_type, message=answer.raw, document=document,
                         recipient=side.partner, actor=origin or "relay") is not None:
                owed.append(event.kind.value)
    return owed


def forward_from_partner(store, config, *, referral_id: str, obs: Observation, now_hl7: str, at: str,
                         now: float, raw: bytes | None = None) -> list[str]:
    """The initiator said something our EHR must hear (its cancel request): queue it for our EHR.
    *raw*: the initiator's v2 message (its OSU^O51), whose reason (ORC-16) our EHR is given."""
    relay = Relay(store)
    side = relay.side_of(referral_id)
    if side is None or side.side != RECIPIENT:
        return []
    events = [e for e in obs.events if e.kind in TO_RECIPIENT]
    loop = Loop(store)
    row = loop.get(referral_id) or {}
    channel = next((c for c in config.channels if c.inbound and c.name == row.get("channel")), None)
    if not events or channel is None:
        return []
    referral_ei, patient = _whom(_facts(loop, referral_id), referral_id)
    fwd = channel.forward
    out = []
    for event in events:
        control_id = "HRC" + hashlib.sha256(f"{referral_id}/{_event_key(event)}".encode()).hexdigest()[:12].upper()
        built = v2answers.answers_for(replace(obs, events=(event,)), referral_ei=referral_ei,
                                      control_id_prefix=control_id, now_hl7=now_hl7,
                                      sending=(fwd.sending_application, fwd.sending_facility),
                                      receiving=(fwd.receiving_application, fwd.receiving_facility),
                                      patient=patient, reason=_reason_in(raw, "utf-8"),
                                      ack_modes=("", ""))   # over MLLP: original mode, our EHR ACKs it
        for answer in built:
            Outbox(store).enqueue(key=f"{referral_id}/ehr/{event.kind.value}/{_event_key(event)}",
                                  referral_id=referral_id, document_id=None, channel=channel.name, transport="mllp",
                                  kind="cancel-request", sender=fwd.sending_application, recipient=fwd.endpoint,
                                  message_id=answer.control_id, payload=answer.raw, at=at, now=now,
                                  detail="the initiator's cancel request, for our EHR")
            out.append(event.kind.value)
    return out


def consult_document(config, obs: Observation, raw: bytes | None, *, codec: str, referral_ei: str,
                     facts: dict) -> bytes | None:
    """The C-CDA that travels beside a note's OSU: the EHR's own C-CDA as it is, or a Consultation
    Note built from its text (an MDM^T02 TX, or the text given to ``answer note``)."""
    from ..cda.consult_note import ConsultInput, build_consultation_note, consult_input_from_mdm
    from ..cda.model import Identifier, Name, Patient
    from ..cda.referral_note import BuildOptions, to_bytes

    note = obs.note
    if note is None:
        return None
    if note.format == "cda":
        return note.content
    if note.format != "text":
        return None   # a PDF or an image: the OSU goes alone; the initiator's coordinator is told by the note kind
    ei = referral_ei.split("^") + ["", "", ""]
    referral_id = Identifier(root=ei[2], extension=ei[0])   # EI: entity id ^ namespace ^ universal id ^ type
    consult = None
    if raw is not None and b"MDM^T02" in raw[:400]:
        consult = consult_input_from_mdm(raw, default_charset=codec)
    if consult is None:
        family, _, given = (facts.get("patient_name", "").split("~")[0] + "^^").partition("^")
        ids = []
        for cx in filter(None, facts.get("patient_ids", "").split("~")):
            parts = cx.split("^")
            authority = parts[3] if len(parts) > 3 else ""
            ids.append(Identifier(root=authority.split("&")[1] if "&" in authority else "", extension=parts[0],
                                  authority=authority.split("&")[0]))
        consult = ConsultInput(text=note.content.decode("utf-8", "replace"), title=note.title or "Consultation Note",
                               patient=Patient(ids=ids, names=[Name(family=family, given=[g for g in
                                                                                          given.split("^")[:1] if g])]),
                               veterinary=bool(facts.get("veterinary")))
    consult.referral_id = referral_id
    if not consult.effective_time:
        # A typed note has no time of its own: it was written when the note event happened. Without
        # an effectiveTime the initiator's engine cannot date the note and parks it for a person.
        when = next((e.at for e in obs.events if e.kind in NOTES), "")
        consult.effective_time = v2answers.hl7_from_iso(when) if when else ""
    return to_bytes(build_consultation_note(consult, BuildOptions(local_root=config.local_root)))


__all__ = ["owe_from_ehr", "forward_from_partner", "consult_document", "INITIATOR", "RECIPIENT"]
