"""hl7referral.engine.answering: what our EHR's answer about a referral owes the other end.

The specialist's engine received the 360X sample over Direct (tests/specialist_inputs.py);
its EHR answers over MLLP with ordinary v2 messages (tests/loop_messages.py), read by
``read_v2`` and applied by the tracker as LoopService does, then owed. What is owed is read
back the way the referring engine will read it: the v2 message by ``read_v2`` (the kind and
the referral's key), the Consultation Note by the CDA schema + C-CDA R2.1 Schematron and by
``read_consult_cda``. Synthetic data only.
"""

from __future__ import annotations

import hl7
import pytest
from lxml import etree

import loop_messages as lm
from hl7referral.cda.consult_note import CONSULTATION_NOTE
from hl7referral.cda.validate import Validator
from hl7referral.engine import answering
from hl7referral.loop.correlate import REFERRAL, Note, Observation, read_consult_cda, read_v2
from hl7referral.loop.reread import read_documents
from hl7referral.loop.states import Event, Kind
from hl7referral.loop.tracker import Tracker
from hl7referral.store.loop import Loop
from hl7referral.store.outbox import Outbox
from hl7referral.store.relay import INITIATOR, Relay
from specialist_inputs import (
    AT,
    CHANNEL,
    EHR_ENDPOINT,
    NOW,
    NOW_HL7,
    RECEIVER,
    REFERRAL_EI,
    REFERRAL_ID,
    SENDER,
    answer_documents,
    receive,
    specialist_config,
    utc,
)

NS = {"cda": "urn:hl7-org:v3"}
ORIGINAL_MODE = {"accept_ack": "", "application_ack": ""}
NOTE_TEXT = "Seen for exertional chest pain.\nAssessment: stable angina, synthetic.\nPlan: stress echo & recheck."


@pytest.fixture
def validator(ccda_validator) -> Validator:
    return ccda_validator


@pytest.fixture
def config(tmp_path):
    return specialist_config(tmp_path)


@pytest.fixture
def recipient(store, config):
    """The 360X sample, received over Direct: ours to answer (side recipient, partner = the referrer)."""
    receive(store, config)
    assert Relay(store).side_of(REFERRAL_ID).side == "recipient"
    return store


def from_ehr(store, config, raw: bytes, *, reason: str = "") -> list[str]:
    """Our EHR's message, as LoopService handles it: read, applied, and what it owes, in one transaction."""
    obs = read_v2(raw, "ascii", tables=config.loop.osu, local_root=config.local_root)
    assert obs.problems == (), obs.problems
    with store.atomic():
        out = Tracker(store, config.loop).observe(obs, now=utc(NOW + 60), origin="message #1", raw=raw)
        assert out.referral_id == REFERRAL_ID, out.reason
        return answering.owe_from_ehr(store, config, referral_id=out.referral_id, obs=obs, raw=raw, now_hl7=NOW_HL7,
                                      at=AT, reason=reason, origin="message #1")


def relay_rows(store) -> list[dict]:
    return list(store.db.query("SELECT * FROM relay ORDER BY id"))


def read_back(message: bytes) -> Observation:
    """The answer as the referring engine reads it."""
    obs = read_v2(message)
    assert obs.problems == (), obs.problems
    return obs


# -- each answer kind --------------------------------------------------------------------------

# kind, our EHR's message, what goes to the initiator (MSH-9)
ANSWERS = [
    (Kind.ACCEPTED, lambda: lm.osu_accept(referral_id=REFERRAL_EI, **ORIGINAL_MODE), "OSU^O51^OSU_O51"),
    (Kind.DECLINED, lambda: lm.osu_decline(referral_id=REFERRAL_EI, **ORIGINAL_MODE), "OSU^O51^OSU_O51"),
    (Kind.BOOKED, lambda: lm.siu_s12(referral_id=REFERRAL_EI, **ORIGINAL_MODE), "SIU^S12^SIU_S12"),
    (Kind.APPOINTMENT_CANCELLED, lambda: lm.siu_s15(referral_id=REFERRAL_EI, **ORIGINAL_MODE), "SIU^S15^SIU_S12"),
    (Kind.NO_SHOW, lambda: lm.siu_s26(referral_id=REFERRAL_EI, **ORIGINAL_MODE), "SIU^S26^SIU_S12"),
    (Kind.CANCEL_CONFIRMED, lambda: lm.osu_confirm_cancel(referral_id=REFERRAL_EI, **ORIGINAL_MODE),
     "OSU^O51^OSU_O51"),
    (Kind.CANCEL_REFUSED, lambda: lm.osu_refuse_cancel(referral_id=REFERRAL_EI, **ORIGINAL_MODE), "OSU^O51^OSU_O51"),
    (Kind.INTERIM_NOTE, lambda: lm.osu_interim(referral_id=REFERRAL_EI, **ORIGINAL_MODE), "OSU^O51^OSU_O51"),
]


@pytest.mark.parametrize("kind, message, message_type", ANSWERS, ids=[a[0].value for a in ANSWERS])
def test_each_answer_from_our_ehr_is_owed_to_the_initiator(recipient, config, kind, message, message_type):
    raw = message()
    assert kind in [e.kind for e in read_v2(raw).events]
    assert from_ehr(recipient, config, raw) == [kind.value]
    [row] = [r for r in relay_rows(recipient) if r["kind"] == kind.value]
    assert (row["recipient"], row["message_type"], row["referral_id"]) == (SENDER, message_type, REFERRAL_ID)
    assert row["document"] is None   # no note came with it
    back = read_back(row["message"])
    assert back.message_type == "^".join(message_type.split("^")[:2])
    assert [e.kind for e in back.events] == [kind]
    assert back.referral_ids == [REFERRAL_ID]
    # The referral id goes back as the EI the initiator sent (ORC-2 / SCH-26), byte for byte.
    parsed = hl7.parse(row["message"].decode("ascii"))
    carried = str(parsed.segment("ORC")(2)) if message_type.startswith("OSU") else str(parsed.segment("SCH")(26))
    assert carried == REFERRAL_EI


def test_a_decline_carries_our_ehrs_reason_and_a_booking_its_appointment(recipient, config):
    # ORC-16 of our EHR's OSU is what the referring coordinator must read, not a default word.
    decline = lm.osu_decline(referral_id=REFERRAL_EI, reason="Outside our scope: see electrophysiology",
                             **ORIGINAL_MODE)
    from_ehr(recipient, config, decline)
    from_ehr(recipient, config, lm.siu_s12(referral_id=REFERRAL_EI, control_id="SIU0002", **ORIGINAL_MODE))
    by_kind = {r["kind"]: r for r in relay_rows(recipient)}
    message = hl7.parse(by_kind["DECLINED"]["message"].decode("ascii"))
    assert message.unescape(str(message.segment("ORC")(16)(1)(2))) == "Outside our scope: see electrophysiology"
    [booked] = read_back(by_kind["BOOKED"]["message"]).events
    assert (booked.appointment, booked.starts) == (lm.APPOINTMENT_ID, "2026-11-20T14:00:00Z")


def test_a_text_note_goes_back_as_a_valid_consultation_note_for_the_referral(recipient, config, validator):
    mdm = lm.mdm_t02(referral_id=REFERRAL_EI, text=NOTE_TEXT, control_id="MDM0001", **ORIGINAL_MODE)
    assert from_ehr(recipient, config, mdm) == ["CONSULT_NOTE"]
    [row] = relay_rows(recipient)
    assert [e.kind for e in read_back(row["message"]).events] == [Kind.CONSULT_NOTE]
    document = row["document"]
    assert document is not None
    report = validator.validate(document, expect=CONSULTATION_NOTE)
    assert report.ok, "\n".join(report.lines())
    doc = etree.fromstring(document)
    orders = doc.xpath("cda:inFulfillmentOf/cda:order/cda:id", namespaces=NS)
    ids = [(i.get("root"), i.get("extension")) for i in orders]
    assert ids == [("1.3.6.1.4.1.99999.1.15", "990001")]
    text = " ".join(doc.xpath("//cda:section//cda:paragraph//text()", namespaces=NS))
    assert "stable angina, synthetic" in text and "stress echo & recheck" in text
    # The referring engine files it under its referral.
    back = read_consult_cda(document)
    assert (REFERRAL, REFERRAL_ID) in back.keys and [e.kind for e in back.events] == [Kind.CONSULT_NOTE]
    assert back.problems == ()


def test_a_revised_note_from_our_ehr_is_kept_and_a_person_told_not_sent_as_a_second_original(recipient, config):
    """MDM^T10 after the T02: the initiator would file a new Consultation Note as another original."""
    assert from_ehr(recipient, config, lm.mdm_t02(referral_id=REFERRAL_EI, text=NOTE_TEXT, control_id="MDM0001",
                                                  **ORIGINAL_MODE)) == ["CONSULT_NOTE"]
    revised = lm.mdm_t02(referral_id=REFERRAL_EI, text="Corrected.", trigger="T10", control_id="MDM0002",
                         document_id="D0002^^2.999.1.32.20^ISO", parent_document_id=lm.DOCUMENT_EI, **ORIGINAL_MODE)
    assert from_ehr(recipient, config, revised) == []
    assert len(relay_rows(recipient)) == 1
    [alert] = [a for a in recipient.list_alerts() if a["kind"] == "answer-not-sent"]
    assert "MDM^T10" in alert["text"] and alert["referral_id"] == REFERRAL_ID
    assert len(Loop(recipient).notes(REFERRAL_ID)) == 2   # kept


def test_a_note_typed_by_a_person_becomes_a_consultation_note_about_the_referred_patient(
        recipient, config, validator):
    # `hl7referral answer REF note FILE`: no v2 message; the patient comes from the referral as received.
    note = Note(format="text", media_type="text/plain", content=NOTE_TEXT.encode(), title="Consultation Note")
    obs = Observation("answer note", (("referral", REFERRAL_ID),), (Event(Kind.CONSULT_NOTE, AT, source="answer"),),
                      note=note)
    assert answering.owe_from_ehr(recipient, config, referral_id=REFERRAL_ID, obs=obs, raw=None, now_hl7=NOW_HL7,
                                  at=AT) == ["CONSULT_NOTE"]
    [row] = relay_rows(recipient)
    report = validator.validate(row["document"], expect=CONSULTATION_NOTE)
    assert report.ok, "\n".join(report.lines())
    doc = etree.fromstring(row["document"])
    assert doc.xpath("string(cda:inFulfillmentOf/cda:order/cda:id/@extension)", namespaces=NS) == "990001"
    patient = doc.xpath("cda:recordTarget/cda:patientRole", namespaces=NS)[0]
    assert (patient.xpath("string(cda:id/@root)", namespaces=NS),
            patient.xpath("string(cda:id/@extension)", namespaces=NS)) == ("1.3.6.1.4.1.99999.1.5", "SMRN0004")
    assert patient.xpath("string(cda:patient/cda:name/cda:family)", namespaces=NS) == "Sample"
    assert patient.xpath("string(cda:patient/cda:name/cda:given)", namespaces=NS) == "Drew"
    # Written when the person answered; the referring engine files it without a person looking.
    assert doc.xpath("string(cda:effectiveTime/@value)", namespaces=NS) == "20261118110640+0000"
    back = read_consult_cda(row["document"])
    assert back.problems == () and [(e.kind, e.at) for e in back.events] == [(Kind.CONSULT_NOTE, AT)]


def test_an_answer_naming_the_referral_by_its_bare_order_number_is_still_ours(recipient, config):
    # Our EHR kept RF1-6 / ORC-2 but dropped the assigning authority: found as a referral we sent would be.
    assert from_ehr(recipient, config, lm.osu_accept(referral_id="990001", **ORIGINAL_MODE)) == ["ACCEPTED"]
    [row] = relay_rows(recipient)
    assert read_back(row["message"]).referral_ids == [REFERRAL_ID]


def test_a_cda_note_from_our_ehr_travels_as_it_is(recipient, config):
    cda = lm.consult_note_cda(referral_root="1.3.6.1.4.1.99999.1.15", referral_extension="990001")
    mdm = lm.mdm_t02(referral_id=REFERRAL_EI, document=cda, control_id="MDM0002", **ORIGINAL_MODE)
    assert from_ehr(recipient, config, mdm) == ["CONSULT_NOTE"]
    [row] = relay_rows(recipient)
    assert row["document"] == cda


# -- once, and only where it belongs -----------------------------------------------------------

def test_the_same_event_twice_owes_one_answer(recipient, config):
    raw = lm.osu_accept(referral_id=REFERRAL_EI, **ORIGINAL_MODE)
    assert from_ehr(recipient, config, raw) == ["ACCEPTED"]
    obs = read_v2(raw)
    # Replayed (the tracker finds nothing new, the owing runs again): still one row.
    assert answering.owe_from_ehr(recipient, config, referral_id=REFERRAL_ID, obs=obs, raw=raw, now_hl7=NOW_HL7,
                                  at=AT) == []
    assert [r["kind"] for r in relay_rows(recipient)] == ["ACCEPTED"]


def test_our_cancel_of_a_referral_we_sent_is_owed_to_the_recipient(store, config):
    Loop(store).open_referral(REFERRAL_ID, at=AT, channel="omg-o19")
    Relay(store).set_side(REFERRAL_ID, INITIATOR, RECEIVER, at=AT)
    cancel = lm.osu_cancel(referral_id=REFERRAL_EI, **ORIGINAL_MODE)
    assert from_ehr(store, config, cancel) == ["CANCEL_REQUESTED"]
    [row] = relay_rows(store)
    assert (row["recipient"], row["kind"], row["message_type"]) == (RECEIVER, "CANCEL_REQUESTED", "OSU^O51^OSU_O51")
    back = read_back(row["message"])
    assert [e.kind for e in back.events] == [Kind.CANCEL_REQUESTED] and back.referral_ids == [REFERRAL_ID]
    # Our EHR's reason (ORC-16) is the one the recipient reads.
    assert "Symptoms resolved" in str(hl7.parse(row["message"].decode("ascii")).segment("ORC")(16))


def test_an_answer_from_our_ehr_about_a_referral_we_sent_owes_nothing(store, config):
    Loop(store).open_referral(REFERRAL_ID, at=AT, channel="omg-o19")
    Relay(store).set_side(REFERRAL_ID, INITIATOR, RECEIVER, at=AT)
    assert from_ehr(store, config, lm.osu_accept(referral_id=REFERRAL_EI, **ORIGINAL_MODE)) == []
    assert relay_rows(store) == []


def test_without_the_partners_address_nothing_is_owed_and_a_person_is_told(store, config):
    Loop(store).open_referral(REFERRAL_ID, at=AT, channel="omg-o19")   # a v6 referral: ours, partner unknown
    assert from_ehr(store, config, lm.osu_cancel(referral_id=REFERRAL_EI, **ORIGINAL_MODE)) == []
    assert relay_rows(store) == []
    [alert] = Loop(store).alerts(REFERRAL_ID)
    assert alert["kind"] == "answer-not-sent" and "Direct address is not known" in alert["text"]


# -- the initiator's cancel, for our EHR -------------------------------------------------------

def test_the_initiators_cancel_by_direct_is_queued_for_our_ehr(recipient, config):
    cancel = lm.osu_cancel(referral_id=REFERRAL_EI, control_id="OSUCA1", reason="Seen elsewhere sooner")
    documents = answer_documents(message=cancel)
    obs = read_documents(documents, local_root=config.local_root)
    assert [e.kind for e in obs.events] == [Kind.CANCEL_REQUESTED]
    with recipient.atomic():
        out = Tracker(recipient, config.loop).observe(obs, now=utc(NOW + 60), origin="mail #2", raw=b"")
        assert out.referral_id == REFERRAL_ID
        queued = answering.forward_from_partner(recipient, config, referral_id=REFERRAL_ID, obs=obs,
                                                now_hl7=NOW_HL7, at=AT, now=NOW + 60, raw=cancel)
    assert queued == ["CANCEL_REQUESTED"]
    assert Loop(recipient).get(REFERRAL_ID)["state"] == "CANCEL_REQUESTED"
    rows = [r for r in Outbox(recipient).list(referral_id=REFERRAL_ID) if r["kind"] == "cancel-request"]
    assert [(r["transport"], r["recipient"], r["channel"], r["state"]) for r in rows] == [
        ("mllp", EHR_ENDPOINT, CHANNEL, "QUEUED")]
    payload = Outbox(recipient).get(rows[0]["id"])["payload"]
    message = hl7.parse(payload.decode("ascii"))
    msh, orc = message.segment("MSH"), message.segment("ORC")
    assert str(msh(9)) == "OSU^O51^OSU_O51"
    assert (str(msh(5)), str(msh(6))) == ("EHR", "CARDIOLOGY")
    assert (str(msh(15)) if len(msh) > 15 else "", str(msh(16)) if len(msh) > 16 else "") == ("", "")  # our EHR ACKs
    assert (str(orc(1)), str(orc(2))) == ("CA", REFERRAL_EI)
    assert message.unescape(str(orc(16)(1)(2))) == "Seen elsewhere sooner"   # the initiator's reason
    assert str(msh(10)) == Outbox(recipient).get(rows[0]["id"])["message_id"]
    assert [e.kind for e in read_back(payload).events] == [Kind.CANCEL_REQUESTED]

    # The same cancel again (a resent mail): one row for our EHR.
    answering.forward_from_partner(recipient, config, referral_id=REFERRAL_ID, obs=obs, now_hl7=NOW_HL7, at=AT,
                                   now=NOW + 120)
    assert len([r for r in Outbox(recipient).list(referral_id=REFERRAL_ID) if r["kind"] == "cancel-request"]) == 1


def test_a_cancel_about_a_referral_we_sent_is_not_forwarded(store, config):
    Loop(store).open_referral(REFERRAL_ID, at=AT, channel="omg-o19")
    obs = read_v2(lm.osu_cancel(referral_id=REFERRAL_EI))
    assert answering.forward_from_partner(store, config, referral_id=REFERRAL_ID, obs=obs, now_hl7=NOW_HL7, at=AT,
                                          now=NOW) == []
    assert Outbox(store).list(referral_id=REFERRAL_ID) == []
