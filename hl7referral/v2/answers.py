"""Build the 360X answers a specialist's engine sends back: OSU^O51 and SIU^S12/S15/S26 (sans-I/O).

The specialist's EHR or scheduler tells its engine (over MLLP) what happened to a referral; the
engine reads that with :func:`~hl7referral.loop.correlate.read_v2` and :func:`answers_for` turns
the observation into the 360X messages the referring engine expects (``v2-messages.md`` §1.3,
§1.5, §3), as bytes. They travel in an XDM package over Direct; packaging is not done here.

Messages (HL7 v2.5.1, as the 360X samples write them)
-----------------------------------------------------
::

    MSH  MSH-3/4 sending app / facility, MSH-5/6 receiving (360X: facilities by OID, ^<oid>^ISO),
         MSH-7 now, MSH-9 OSU^O51^OSU_O51 or SIU^<trigger>^SIU_S12, MSH-10 control id, MSH-11 P,
         MSH-12 2.5.1, MSH-15/16 NE/NE (``ack_modes``), MSH-18 "UNICODE UTF-8" only when the message holds
         non-ASCII text (else empty = ASCII), MSH-21 360X
    OSU_O51 = MSH [PID] ORC        (HL7 v2+'s MSH [{ARV}] [{SFT}] [UAC] [{NTE}] [PID] [{PRT}]
                                    {ORC [{PRT}]} reduced to 2.5.1 segments; no OBR: the structure
                                    has none, and 360X pre-adopts it into 2.5.1)
         ORC-1 order control, ORC-2 referral id (EI), ORC-3 filler order id, ORC-5 order status,
         ORC-9 transaction time, ORC-12 ordering provider, ORC-16 reason (CE ``^text``)
    SIU_S12 = MSH SCH [TQ1] [PID] RGS [AIS] [AIL] [AIP]   (S12, S15 and S26 all use SIU_S12)
         SCH-1 placer appointment id, SCH-2 filler appointment id, SCH-6 event reason
         (57133-1^^LN), SCH-16 filler contact, SCH-20 entered by (both required in 2.5.1),
         SCH-25 filler status (table 0278: Booked / Cancelled / Noshow), SCH-26 referral id;
         TQ1-7/8 start/end (where the 360X no-show sample and read_v2 look first); RGS-2 A for
         a booking, D for a cancel or a no-show (as the 360X no-show sample); the resources
         carry the start too (AIS-4, AIL-6, AIP-6)

Why NE/NE: 360X messages ride in an XDM zip over Direct, never over MLLP, so no HL7 ACK can
come back on the same connection; Direct MDNs (processed, dispatched) are the delivery
assurance, and the business answer to a message is another OSU/SIU, not an ACK.

What each observed event becomes (:data:`ANSWERS`; the pairs are the ones the referring
engine's ``DEFAULT_RULES`` decodes to the same kind, and 360X implementers use):

==========================  =====================  ==================================
event kind                  message                ORC-1 / ORC-5, SIU trigger
==========================  =====================  ==================================
ACCEPTED                    OSU^O51                OK / IP (Royal-Jay 360X accept)
DECLINED                    OSU^O51                UA / CA, ORC-16 reason
CANCEL_CONFIRMED            OSU^O51                CR / CA
CANCEL_REFUSED              OSU^O51                UC / IP
INTERIM_NOTE                OSU^O51                SC / A  (C-CDA beside it in the XDM)
CONSULT_NOTE                OSU^O51                SC / CM (C-CDA beside it in the XDM)
CANCEL_REQUESTED            OSU^O51                CA, ORC-16 reason (initiator -> specialist)
BOOKED                      SIU^S12                Booked (also for a reschedule: 360X has no S13)
APPOINTMENT_CANCELLED       SIU^S15                Cancelled
NO_SHOW                     SIU^S26                Noshow
anything else               nothing                (SENT, DELIVERED, VISIT_DONE, NOTE_FILED, AUTH_*)
==========================  =====================  ==================================

Invariants
----------
* Free text (reasons) is escaped by :func:`hl7referral.v2.mdm.escape` (python-hl7's escape with
  the message's delimiters; non-ASCII kept as UTF-8 and declared in MSH-18; control characters
  as ``\\XHH\\``), after line breaks and tabs become spaces. ER7-typed inputs (ids, names,
  providers, locations, codes) are checked, not escaped: a field separator, a segment break or
  a control character raises ``ValueError`` naming the input, as does ``~`` in a field that
  does not repeat, a malformed timestamp, order code or control id.
* Deterministic: the same arguments give the same bytes. :func:`answers_for` derives each
  control id from the caller's prefix and the answer (``<prefix>-OKIP``, ``<prefix>-S12``), and
  every time from the observation or ``now_hl7``, so rebuilding after a crash gives the bytes
  already sent, with the same MSH-10.
* Every segment ends with ``\\r``, the last one too; no ``\\n``; trailing empty fields are
  dropped.
* The output passes hl7apy's STRICT validation: SIU against its 2.5.1 SIU_S12; OSU against
  OSU_O51 assembled from hl7apy's 2.5.1 segments (hl7apy has no OSU_O51 in any version;
  ``tests/test_answers.py`` holds that structure);
  PID is only valid with both ids and name (PID-3 and PID-5 are required), and is left out
  when neither is given.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from ..loop.correlate import FILLER, Observation
from ..loop.states import Kind
# mdm.py's escaping and ER7 checks, so both builders refuse and escape the same things.
from .mdm import COMPONENT, ENCODING_CHARACTERS, FIELD, SEGMENT, _er7, _single_line, _timestamp, escape

VERSION = "2.5.1"
PROFILE = "360X"                     # MSH-21, as every 360X sample
OSU_TYPE = "OSU^O51^OSU_O51"
SIU_TRIGGERS = ("S12", "S15", "S26")
REFERRAL_NOTE_EVENT = "57133-1^^LN"  # SCH-6 in the 360X sample: LOINC "Referral note"
SCHEDULING_CONTACT = "^Scheduling"   # SCH-16 / SCH-20 default (required in 2.5.1; the sample: ^Name^Registrar)

# Table 0278 filler status and RGS-2 segment action code per trigger (see the module docstring).
FILLER_STATUS = {"S12": "Booked", "S15": "Cancelled", "S26": "Noshow"}
_RESOURCE_ACTION = {"S12": "A", "S15": "D", "S26": "D"}

DIRECT_ACKS = ("NE", "NE")            # MSH-15 / MSH-16 over Direct: MDNs, never an HL7 ACK
_ACK_TYPES = {"", "AL", "NE", "ER", "SU"}   # table 0155 (empty: original mode)

_ORDER_CONTROL = re.compile(r"[A-Z]{2}\Z")     # table 0119: ID, two letters
_ORDER_STATUS = re.compile(r"([A-Z]{1,2})?\Z")  # table 0038: ID, one or two letters, optional
_OID = re.compile(r"[0-2](\.\d+)+\Z")           # as correlate reads EI roots


@dataclass(frozen=True, slots=True)
class Patient:
    """The patient as the referral's PID carried it, ER7 text unchanged: ``ids`` = PID-3 (CX~CX),
    ``name`` = PID-5 (XPN). Both empty: no PID segment."""

    ids: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True)
class Osu:
    """An answer sent as OSU^O51: ORC-1 / ORC-5, and the reason used when the caller gives none."""

    order_control: str
    order_status: str
    default_reason: str = ""

    @property
    def suffix(self) -> str:
        return self.order_control + self.order_status


@dataclass(frozen=True, slots=True)
class Siu:
    """An answer sent as SIU^<trigger>^SIU_S12."""

    trigger: str

    @property
    def suffix(self) -> str:
        return self.trigger


ANSWERS: dict[Kind, Osu | Siu] = {
    Kind.ACCEPTED: Osu("OK", "IP"),
    Kind.DECLINED: Osu("UA", "CA", "Declined"),
    Kind.CANCEL_CONFIRMED: Osu("CR", "CA"),
    Kind.CANCEL_REFUSED: Osu("UC", "IP"),
    Kind.INTERIM_NOTE: Osu("SC", "A"),
    Kind.CONSULT_NOTE: Osu("SC", "CM"),
    Kind.CANCEL_REQUESTED: Osu("CA", "", "Cancelled by the referring provider"),
    Kind.BOOKED: Siu("S12"),
    Kind.APPOINTMENT_CANCELLED: Siu("S15"),
    Kind.NO_SHOW: Siu("S26"),
}


@dataclass(frozen=True, slots=True)
class Answer:
    """One message to send: what it says (``kind``), MSH-9 (``message_type``), MSH-10, the bytes."""

    kind: Kind
    message_type: str   # "OSU^O51^OSU_O51", "SIU^S12^SIU_S12", ...
    control_id: str
    raw: bytes


# -- values -----------------------------------------------------------------------------------

def ei_from_key(key: str) -> str:
    """A stored id (``ext@oid``, :func:`~hl7referral.loop.correlate.ei_key`'s form) as an EI
    (``ext^^oid^ISO``); a bare extension stays as it is. '' for ''."""
    key = (key or "").strip()
    ext, at, root = key.rpartition("@")
    if at and ext and _OID.match(root):
        return f"{ext}{COMPONENT}{COMPONENT}{root}{COMPONENT}ISO"
    return key


def hl7_from_iso(value: str) -> str:
    """An ISO-8601 time (``2026-11-20T14:00:00Z``, the loop's event times) as HL7 DTM in UTC
    (``20261120140000+0000``); '' for ''. A time without offset is taken as UTC."""
    value = (value or "").strip()
    if not value:
        return ""
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO-8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def _reason(text: str) -> str:
    """ORC-16 (CE in 2.5.1, CWE in 360X's 2.8.2): the text in component 2, as the 360X sample."""
    text = _single_line(text or "").strip()
    return COMPONENT + escape(text) if text else ""


def _control_id(control_id: str) -> str:
    if not control_id or any(c in control_id for c in ENCODING_CHARACTERS):
        raise ValueError("control_id must be non-empty and hold no delimiter or control character")
    return _er7(control_id, "control_id")


def _required(value: str, name: str) -> str:
    value = _er7(value, name)
    if not value:
        raise ValueError(f"{name} is required")
    return value


def _segment(name: str, fields: list[str]) -> str:
    """``name|f1|f2...`` with trailing empty fields dropped; ``fields[0]`` is field 1."""
    fields = list(fields)
    while fields and not fields[-1]:
        fields.pop()
    return FIELD.join([name, *fields])


def _fields(n: int, values: dict[int, str]) -> list[str]:
    out = [""] * n
    for i, v in values.items():
        out[i - 1] = v
    return out


def _pid(patient: Patient | None) -> list[str]:
    if patient is None or not (patient.ids or patient.name):
        return []
    ids = _er7(patient.ids, "patient.ids", repeats=True)
    name = _er7(patient.name, "patient.name", repeats=True)
    return [_segment("PID", _fields(5, {1: "1", 3: ids, 5: name}))]


def _message(structure: str, body: list[str], *, control_id: str, now_hl7: str, sending: tuple[str, str],
             receiving: tuple[str, str], processing_id: str, ack_modes: tuple[str, str]) -> bytes:
    control_id = _control_id(control_id)
    accept_ack, application_ack = ack_modes
    if not {accept_ack, application_ack} <= _ACK_TYPES:
        raise ValueError(f"ack_modes {ack_modes!r}: MSH-15/16 are AL, NE, ER, SU or '' (table 0155)")
    if not _timestamp(now_hl7 or "", "now_hl7"):
        raise ValueError("now_hl7 is not an HL7 timestamp")
    send_app, send_fac = (_er7(v, f"sending[{i}]") for i, v in enumerate(sending))
    recv_app, recv_fac = (_er7(v, f"receiving[{i}]") for i, v in enumerate(receiving))
    msh = {3: send_app, 4: send_fac, 5: recv_app, 6: recv_fac, 7: now_hl7, 9: structure, 10: control_id,
           11: _required(processing_id, "processing_id"), 12: VERSION, 15: accept_ack, 16: application_ack, 21: PROFILE}
    if not all(s.isascii() for s in [*body, *msh.values()]):
        msh[18] = "UNICODE UTF-8"
    # MSH-1 is the field separator itself, so the fields listed start at MSH-2.
    header = _segment("MSH", [ENCODING_CHARACTERS, *(msh.get(n, "") for n in range(3, 22))])
    return (SEGMENT.join([header, *body]) + SEGMENT).encode("utf-8")


# -- builders ---------------------------------------------------------------------------------

def build_osu_o51(*, order_control: str, referral_ei: str, order_status: str = "", filler_ei: str = "",
                  transaction_time: str = "", reason: str = "", ordering_provider: str = "",
                  patient: Patient | None = None, control_id: str, now_hl7: str, sending: tuple[str, str],
                  receiving: tuple[str, str], processing_id: str = "P",
                  ack_modes: tuple[str, str] = DIRECT_ACKS) -> bytes:
    """OSU^O51^OSU_O51 (360X referral status / cancellation), as bytes (UTF-8; ASCII unless not).

    ``order_control`` is ORC-1 (table 0119: OK, UA, CA, CR, UC, SC, ...), ``order_status``
    ORC-5 (table 0038: IP, CA, A, CM, ...), ``referral_ei`` ORC-2 (the initiator's placer order
    number as an EI, ``ext^^oid^ISO``), ``filler_ei`` ORC-3 (the specialist's own order id),
    ``transaction_time`` ORC-9 (HL7 DTM; ``now_hl7`` when empty), ``reason`` ORC-16 (plain
    text, escaped), ``ordering_provider`` ORC-12 (XCN ER7). ``control_id`` is MSH-10,
    ``now_hl7`` MSH-7, ``sending`` / ``receiving`` (application, facility) HD ER7 text.

    MSH-15/16 are NE/NE (``ack_modes``): the message travels over Direct, where MDNs are the
    delivery assurance, and no HL7 ACK is ever expected for it. Only for a copy sent over MLLP
    (the initiator's cancel forwarded to the specialist's EHR) pass ``("", "")`` (original mode:
    one ACK comes back) or ``("AL", "NE")``; an MLLP receiver never ACKs NE/NE.
    """
    if not _ORDER_CONTROL.match(order_control or ""):
        raise ValueError(f"order_control {order_control!r} is not an ORC-1 code (two letters, table 0119)")
    if not _ORDER_STATUS.match(order_status or ""):
        raise ValueError(f"order_status {order_status!r} is not an ORC-5 code (table 0038)")
    orc = _fields(16, {
        1: order_control,
        2: _required(referral_ei, "referral_ei"),
        3: _er7(filler_ei, "filler_ei"),
        5: order_status,
        9: _timestamp(transaction_time, "transaction_time") or now_hl7,
        12: _er7(ordering_provider, "ordering_provider", repeats=True),
        16: _reason(reason),
    })
    body = [*_pid(patient), _segment("ORC", orc)]
    return _message(OSU_TYPE, body, control_id=control_id, now_hl7=now_hl7, sending=sending, receiving=receiving,
                    processing_id=processing_id, ack_modes=ack_modes)


def build_siu(trigger: str, *, referral_ei: str, appointment_ei: str = "", placer_appointment_ei: str = "",
              start: str = "", end: str = "", event_reason: str = REFERRAL_NOTE_EVENT, filler_status: str | None = None,
              filler_contact: str = SCHEDULING_CONTACT, entered_by: str = SCHEDULING_CONTACT,
              patient: Patient | None = None, service: str = "", location: str = "", provider: str = "",
              control_id: str, now_hl7: str, sending: tuple[str, str], receiving: tuple[str, str],
              processing_id: str = "P", ack_modes: tuple[str, str] = DIRECT_ACKS) -> bytes:
    """SIU^<trigger>^SIU_S12 for ``trigger`` S12 (booked), S15 (cancelled) or S26 (no-show), as bytes.

    ``referral_ei`` is SCH-26 (the initiator's placer order number, EI), ``appointment_ei``
    SCH-2 (the specialist's own appointment id, EI), ``placer_appointment_ei`` SCH-1; ``start``
    / ``end`` (HL7 DTM) TQ1-7 / TQ1-8 (no TQ1 when both are empty); ``event_reason`` SCH-6 (CE
    ER7); ``filler_status`` SCH-25 (default per trigger: Booked / Cancelled / Noshow; '' leaves
    it empty); ``filler_contact`` / ``entered_by`` SCH-16 / SCH-20 (XCN ER7, required by 2.5.1).
    Resources, each only when given: ``service`` AIS-3 (CE ER7), ``location`` AIL-3 (PL ER7),
    ``provider`` AIP-3 (XCN ER7). Header arguments as :func:`build_osu_o51`.
    """
    if trigger not in SIU_TRIGGERS:
        raise ValueError(f"trigger {trigger!r} is not one of {', '.join(SIU_TRIGGERS)}")
    status = FILLER_STATUS[trigger] if filler_status is None else filler_status
    start = _timestamp(start, "start")
    end = _timestamp(end, "end")
    sch = _fields(26, {
        1: _er7(placer_appointment_ei, "placer_appointment_ei"),
        2: _er7(appointment_ei, "appointment_ei"),
        6: _required(event_reason, "event_reason"),
        16: _er7(filler_contact, "filler_contact", repeats=True),
        20: _er7(entered_by, "entered_by", repeats=True),
        25: _er7(status, "filler_status"),
        26: _required(referral_ei, "referral_ei"),
    })
    body = [_segment("SCH", sch)]
    if start or end:
        body.append(_segment("TQ1", _fields(8, {1: "1", 7: start, 8: end})))
    body += _pid(patient)
    action = _RESOURCE_ACTION[trigger]
    body.append(_segment("RGS", ["1", action]))
    # SIU_S12's RESOURCES group order: SERVICE (AIS), GENERAL (AIG), LOCATION (AIL), PERSONNEL (AIP).
    if service:
        body.append(_segment("AIS", _fields(4, {1: "1", 2: action, 3: _er7(service, "service"), 4: start})))
    if location:
        body.append(_segment("AIL", _fields(6, {1: "1", 2: action, 3: _er7(location, "location"), 6: start})))
    if provider:
        body.append(_segment("AIP", _fields(6, {1: "1", 2: action, 3: _er7(provider, "provider", repeats=True),
                                                6: start})))
    return _message(f"SIU{COMPONENT}{trigger}{COMPONENT}SIU_S12", body, control_id=control_id, now_hl7=now_hl7,
                    sending=sending, receiving=receiving, processing_id=processing_id, ack_modes=ack_modes)


# -- from what the EHR said to what goes back ------------------------------------------------

def answers_for(observation: Observation, *, referral_ei: str, control_id_prefix: str, now_hl7: str,
                sending: tuple[str, str], receiving: tuple[str, str], patient: Patient | None = None,
                reason: str = "", filler_ei: str | None = None, ordering_provider: str = "", service: str = "",
                location: str = "", provider: str = "", ack_modes: tuple[str, str] = DIRECT_ACKS) -> list[Answer]:
    """The 360X messages that answer *observation* (read from the specialist EHR's message, or,
    for CANCEL_REQUESTED, from the referring EHR's), one per event with an answer in
    :data:`ANSWERS`, in the observation's event order; ``[]`` when none has one.

    ``referral_ei`` is the referral id as the referring engine sent it (EI, ``ext^^oid^ISO``;
    :func:`ei_from_key` converts the stored ``ext@oid``): the caller has correlated the
    observation, so its keys are not consulted for it. Control ids are
    ``<control_id_prefix>-<suffix>`` (suffix ``OKIP``, ``UACA``, ``S12``, ...; a second answer
    with the same suffix in one observation gets ``-2``, and so on): give a prefix naming the
    inbound message (its store id) and the same ``now_hl7`` (that message's receipt time), and
    a retry rebuilds the same bytes. MSH-10 is ST(20) in 2.5.1, so keep the prefix to 15
    characters. SIU has no EVN in 2.5.1, so the referring side dates a booking by MSH-7.

    OSU: ORC-9 is the event's own time (``now_hl7`` when it has none); ORC-16 is ``reason``,
    else the kind's default (DECLINED, CANCEL_REQUESTED); ORC-3 is ``filler_ei``, else the
    observation's first ``filler`` key (an RRI's RF1-11, an ORC-3) as an EI. SIU: SCH-2 is the
    event's appointment id as an EI, TQ1-7 its start; ``service`` / ``location`` / ``provider``
    become AIS / AIL / AIP. Events carry no reason, so a decline's reason is the caller's.
    Ids come back from their stored form: an OID-rooted id exactly, a namespace-only one
    (``EXT77^SPEC``) as its bare extension (pass ``filler_ei`` to keep the namespace).

    ``ack_modes`` (MSH-15/16) stays NE/NE for Direct; see :func:`build_osu_o51` for MLLP.

    The observation's ``problems`` are not looked at: they are about correlation or reading,
    which the caller resolved before naming ``referral_ei``; events a reader withheld are absent.
    """
    if filler_ei is None:
        filler_ei = next((ei_from_key(v) for v in observation.values(FILLER)), "")
    header = dict(now_hl7=now_hl7, sending=sending, receiving=receiving, patient=patient, ack_modes=ack_modes)
    answers: list[Answer] = []
    used: dict[str, int] = {}
    for event in observation.events:
        rule = ANSWERS.get(event.kind)
        if rule is None:
            continue
        used[rule.suffix] = n = used.get(rule.suffix, 0) + 1
        control_id = f"{control_id_prefix}-{rule.suffix}" + (f"-{n}" if n > 1 else "")
        if isinstance(rule, Osu):
            raw = build_osu_o51(order_control=rule.order_control, order_status=rule.order_status,
                                referral_ei=referral_ei, filler_ei=filler_ei,
                                transaction_time=hl7_from_iso(event.at), reason=reason.strip() or rule.default_reason,
                                ordering_provider=ordering_provider, control_id=control_id, **header)
            message_type = OSU_TYPE
        else:
            raw = build_siu(rule.trigger, referral_ei=referral_ei, appointment_ei=ei_from_key(event.appointment),
                            start=hl7_from_iso(event.starts), service=service, location=location, provider=provider,
                            control_id=control_id, **header)
            message_type = f"SIU{COMPONENT}{rule.trigger}{COMPONENT}SIU_S12"
        answers.append(Answer(event.kind, message_type, control_id, raw))
    return answers
