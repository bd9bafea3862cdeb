"""The referral loop played between two engines: what each EHR does, step by step.

The referring EHR sends a REF^I12 (or a 360X OMG^O19) to its engine; the specialist's EHR
(the stand-in receiving what its engine forwards) answers as an EHR would, over MLLP to its
own engine: OSU^O51 accept or decline, SIU^S12 booked, S26 no-show, MDM^T02 with the consult
note as text, OSU^O51 CR confirming a cancel. Every answer names the referral by the id the
specialist's engine forwarded (RF1-6, or ORC-2), as an EHR keeps it; the engines carry it
across by Direct. The referring EHR's cancel (OSU^O51 CA) names it by its own RF1-6 / ORC-2.

Each step waits for its effect on *both* sides (a state in each store), so a scenario is a
sequence of facts checked as it goes; :func:`timelines` prints what each side recorded. The
``*_message`` functions build the same messages without sending them, for a scenario that
must do something between sending one and seeing its effect (kill an engine, hold the relay).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import hl7

from ..loop.states import timeline
from ..store.loop import Loop
from ..v2.answers import Patient, build_osu_o51, build_siu
from ..v2.mdm import ConsultNote, build_mdm_t02
from .ehr import Received
from .harness import REFERRER, SPECIALIST, TwoEngines

EHR = ("EHR", "SPECIALIST CLINIC")
ENGINE = ("HL7REFERRAL", "SPECIALIST")
REFERRING_EHR = ("EHR", "REFERRING CLINIC")
REFERRING_ENGINE = ("HL7REFERRAL", "REFERRER")
# Outbox states of a row still on its way (not sent yet, or a retry due).
UNSENT = ("QUEUED", "RETRY_WAIT")


@dataclass
class Referral:
    """One referral as the specialist's EHR knows it (from the message its engine forwarded)."""

    referral_id: str          # stored form (both engines key it so)
    ei: str                   # as the EHR received it (RF1-6 / ORC-2)
    patient_ids: str
    patient_name: str
    forwarded: bytes          # what the specialist's EHR received
    sent: bytes = b""         # what the referring EHR sent
    placer_ei: str = ""       # the id as the referring EHR sent it (its RF1-6 / ORC-2)
    steps: list[str] = field(default_factory=list)


def _now_hl7() -> str:
    return time.strftime("%Y%m%d%H%M%S+0000", time.gmtime())


def _control(ref: Referral, what: str) -> str:
    return "EHR" + hashlib.sha256(f"{ref.ei}/{what}".encode()).hexdigest()[:12].upper()


def _key(ei: str) -> str:
    from ..loop.correlate import ei_key
    return ei_key(ei)


def _referral_ei(message: bytes) -> str:
    """RF1-6 of a REF^I12, else ORC-2 of an order: the referral id as that message carries it."""
    msg = hl7.parse(message.decode("utf-8").replace("\r\n", "\r").replace("\n", "\r"))
    try:
        return str(msg.segment("RF1")(6))
    except KeyError:
        return str(msg.segment("ORC")(2))


def next_received(h: TwoEngines, side: str, before: int, *, timeout: float = 30.0, what: str = "") -> Received:
    """The message *side*'s EHR received after the first *before* (AssertionError if none comes)."""
    got = h.ehrs[side].wait_for(before + 1, timeout=timeout)
    if len(got) <= before:
        raise AssertionError(f"the {side}'s EHR got nothing new in {timeout} s (waiting for {what or 'a message'})")
    return got[before]


def refer(h: TwoEngines, message: bytes, *, timeout: float = 30.0, expect: str = "DELIVERED") -> Referral:
    """The referring EHR sends *message*; returns the referral once the specialist's EHR has it."""
    before = len(h.ehrs[SPECIALIST].received)
    ack = h.send(REFERRER, message)
    if ack.code not in ("AA", "CA"):   # CA: the commit accept a message asking for one (MSH-15 AL) gets
        raise AssertionError(f"the referring engine answered {ack.code}: {ack.text}")
    got = next_received(h, SPECIALIST, before, timeout=timeout, what="the referral")
    msg = hl7.parse(got.payload.decode("utf-8").replace("\n", "\r"))
    ei = _referral_ei(got.payload)
    pid = msg.segment("PID")
    ref = Referral(referral_id=_key(ei), ei=ei, patient_ids=str(pid(3)), patient_name=str(pid(5)),
                   forwarded=got.payload, sent=message, placer_ei=_referral_ei(message))
    wait_states(h, ref, referrer=expect, specialist="DELIVERED", timeout=timeout)
    ref.steps.append(f"referred: the specialist's EHR has it as {got.message_type}")
    return ref


def wait_states(h: TwoEngines, ref: Referral, *, referrer: str | None = None, specialist: str | None = None,
                timeout: float = 30.0) -> None:
    def both() -> bool:
        return ((referrer is None or h.state(REFERRER, ref.referral_id) == referrer)
                and (specialist is None or h.state(SPECIALIST, ref.referral_id) == specialist))
    h.wait_for(both, timeout, f"referral {ref.referral_id}: referrer {referrer}, specialist {specialist} "
                              f"(now {h.state(REFERRER, ref.referral_id)}, {h.state(SPECIALIST, ref.referral_id)})")


def answer(h: TwoEngines, message: bytes) -> None:
    """The specialist's EHR tells its engine (MLLP); the engine must ACK AA."""
    ack = h.send(SPECIALIST, message)
    if ack.code != "AA":
        raise AssertionError(f"the specialist engine answered {ack.code}: {ack.text}")


def _patient(ref: Referral) -> Patient:
    return Patient(ids=ref.patient_ids, name=ref.patient_name)


# -- what the EHRs say (built, not sent) ------------------------------------------------------------


def accept_message(ref: Referral) -> bytes:
    """The specialist's EHR accepts: OSU^O51 OK/IP."""
    return build_osu_o51(order_control="OK", order_status="IP", referral_ei=ref.ei, patient=_patient(ref),
                         control_id=_control(ref, "accept"), now_hl7=_now_hl7(), sending=EHR, receiving=ENGINE,
                         ack_modes=("", ""))


def decline_message(ref: Referral, reason: str) -> bytes:
    """The specialist's EHR declines: OSU^O51 UA/CA, ORC-16 the reason."""
    return build_osu_o51(order_control="UA", order_status="CA", referral_ei=ref.ei, patient=_patient(ref),
                         reason=reason, control_id=_control(ref, "decline"), now_hl7=_now_hl7(), sending=EHR,
                         receiving=ENGINE, ack_modes=("", ""))


def booking_message(ref: Referral, appointment: str, start: str) -> bytes:
    """The specialist's scheduler booked *appointment* (EI) at *start* (HL7 DTM): SIU^S12."""
    return build_siu("S12", referral_ei=ref.ei, appointment_ei=appointment, start=start, patient=_patient(ref),
                     control_id=_control(ref, f"book/{appointment}"), now_hl7=_now_hl7(), sending=EHR,
                     receiving=ENGINE, ack_modes=("", ""))


def no_show_message(ref: Referral, appointment: str, start: str) -> bytes:
    """The patient did not come to *appointment*: SIU^S26."""
    return build_siu("S26", referral_ei=ref.ei, appointment_ei=appointment, start=start, patient=_patient(ref),
                     control_id=_control(ref, f"noshow/{appointment}"), now_hl7=_now_hl7(), sending=EHR,
                     receiving=ENGINE, ack_modes=("", ""))


def note_message(ref: Referral, text: str) -> bytes:
    """The consult note as text: MDM^T02 (TXA-14 the referral id, OBX TX)."""
    return build_mdm_t02(ConsultNote(referral_id=ref.ei, unique_document_id=_control(ref, "note-doc"),
                                     title="Cardiology consult note", text=text, patient_ids=ref.patient_ids,
                                     patient_name=ref.patient_name, author="SPEC01^Specialist^Sam^^^Dr"),
                         control_id=_control(ref, "note"), now_hl7=_now_hl7(), sending=EHR, receiving=ENGINE)


def cancel_message(ref: Referral, reason: str) -> bytes:
    """The referring EHR cancels its referral: OSU^O51 ORC-1 CA, ORC-2 its own id, ORC-16 why."""
    pid = hl7.parse(ref.sent.decode("utf-8").replace("\r\n", "\r").replace("\n", "\r")).segment("PID")
    return build_osu_o51(order_control="CA", referral_ei=ref.placer_ei, reason=reason,
                         patient=Patient(ids=str(pid(3)), name=str(pid(5))), control_id=_control(ref, "cancel"),
                         now_hl7=_now_hl7(), sending=REFERRING_EHR, receiving=REFERRING_ENGINE, ack_modes=("", ""))


def confirm_cancel_message(ref: Referral) -> bytes:
    """The specialist's EHR confirms the cancel: OSU^O51 CR/CA."""
    return build_osu_o51(order_control="CR", order_status="CA", referral_ei=ref.ei, patient=_patient(ref),
                         control_id=_control(ref, "cancel-confirmed"), now_hl7=_now_hl7(), sending=EHR,
                         receiving=ENGINE, ack_modes=("", ""))


# -- steps: send, then wait for the effect on both sides --------------------------------------------


def accept(h: TwoEngines, ref: Referral, **wait) -> None:
    answer(h, accept_message(ref))
    wait_states(h, ref, referrer="ACCEPTED", specialist="ACCEPTED", **wait)
    ref.steps.append("accepted")


def decline(h: TwoEngines, ref: Referral, reason: str = "Not a cardiology problem", **wait) -> None:
    answer(h, decline_message(ref, reason))
    wait_states(h, ref, referrer="DECLINED", specialist="DECLINED", **wait)
    ref.steps.append(f"declined: {reason}")


def book(h: TwoEngines, ref: Referral, appointment: str, start: str, **wait) -> None:
    answer(h, booking_message(ref, appointment, start))
    wait_states(h, ref, referrer="SCHEDULED", specialist="SCHEDULED", **wait)
    ref.steps.append(f"booked {appointment} at {start}")


def no_show(h: TwoEngines, ref: Referral, appointment: str, start: str, **wait) -> None:
    answer(h, no_show_message(ref, appointment, start))
    wait_states(h, ref, referrer="NO_SHOW", specialist="NO_SHOW", **wait)
    ref.steps.append(f"no-show for {appointment}")


def consult_note(h: TwoEngines, ref: Referral, text: str, **wait) -> None:
    """The note as text (MDM^T02 TX): the specialist's engine makes the Consultation Note; the loop
    closes on both sides (the referring EHR ACKs the MDM^T02; the referrer's MDN files ours)."""
    before = len(h.ehrs[REFERRER].received)
    answer(h, note_message(ref, text))
    wait_states(h, ref, referrer="CLOSED", specialist="CLOSED", **wait)
    next_received(h, REFERRER, before, timeout=wait.get("timeout", 30.0), what="the MDM^T02")
    ref.steps.append("consult note: in the referring chart (MDM^T02 ACKed), loop closed on both sides")


def cancel(h: TwoEngines, ref: Referral, reason: str = "Patient moved out of the area", **wait) -> Received:
    """The referring EHR cancels at its engine; both sides go CANCEL_REQUESTED and the specialist's
    EHR is told (its engine forwards an OSU^O51 CA over MLLP): returns what that EHR received."""
    before = len(h.ehrs[SPECIALIST].received)
    ack = h.send(REFERRER, cancel_message(ref, reason))
    if ack.code != "AA":
        raise AssertionError(f"the referring engine answered {ack.code}: {ack.text}")
    wait_states(h, ref, referrer="CANCEL_REQUESTED", specialist="CANCEL_REQUESTED", **wait)
    got = next_received(h, SPECIALIST, before, timeout=wait.get("timeout", 30.0), what="the cancel request")
    ref.steps.append(f"cancel requested: {reason}; the specialist's EHR got {got.message_type}")
    return got


def confirm_cancel(h: TwoEngines, ref: Referral, **wait) -> None:
    """The specialist's EHR confirms the cancel: CANCELLED on both sides."""
    answer(h, confirm_cancel_message(ref))
    wait_states(h, ref, referrer="CANCELLED", specialist="CANCELLED", **wait)
    ref.steps.append("cancel confirmed")


def _in_flight(row: dict) -> bool:
    # An MDN is SENT for good (nothing answers an MDN); any other Direct packet in SENT waits for its MDN.
    return row["state"] in UNSENT or (row["transport"] == "direct" and row["state"] == "SENT"
                                      and not row["kind"].startswith("mdn"))


def settle(h: TwoEngines, *, timeout: float = 30.0) -> None:
    """Wait until nothing is on its way: no message queued at the relay, no outbox row of either
    engine unsent or waiting for its MDN, no mail an engine received and has not opened yet.
    Counts taken after this cannot still grow by a duplicate that was already under way."""
    def quiet() -> bool:
        if any(r.result == "queued" for r in h.relay.records()):
            return False
        return not any(_in_flight(r) for side in (REFERRER, SPECIALIST) for r in h.outbox(side)) and \
            not any(m["status"] == "received" for side in (REFERRER, SPECIALIST) for m in h.mail(side))
    h.wait_for(quiet, timeout, "the relay and both outboxes to settle")


def timelines(h: TwoEngines, ref: Referral) -> str:
    """Both sides' timelines of one referral, as `hl7referral status` words them."""
    lines = [f"referral {ref.referral_id}"]
    for side in (REFERRER, SPECIALIST):
        events = h.read(side, lambda s: Loop(s).events(ref.referral_id))
        row = h.referral(side, ref.referral_id) or {}
        lines.append(f"  {side} ({row.get('side', '?')}): {row.get('state', '?')}")
        for step in timeline(events):
            detail = f"  {step.detail}" if step.detail else ""
            lines.append(f"    {step.at}  {step.kind:<18} -> {step.state.value:<12}{detail}")
    return "\n".join(lines)
