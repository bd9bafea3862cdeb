"""hl7referral.loop.inbound: is a Direct message a new referral for us, and which one?

Packages come from the referring engine's own pipeline and packer (tests/specialist_inputs.py):
the 360X sample (OMG^O19 + C-CDA), and the REF^I12 samples, which travel as a bare C-CDA.
Answers (OSU, SIU, MDM, a Consultation Note) must stay answers, and nothing a sender puts in
a package makes the reader raise: what it cannot read is a problem, for the work queue.
"""

from __future__ import annotations

import pytest

import loop_messages as lm
from hl7referral.cda.consult_note import ConsultInput, build_consultation_note, to_bytes
from hl7referral.cda.model import Identifier, Name, Patient
from hl7referral.loop.inbound import is_referral, read_inbound
from specialist_inputs import PATIENT_CX, REFERRAL_EI, REFERRAL_ID, answer_documents, order_of, referral_documents

OMG = order_of("omg-o19")


def without(raw: bytes, segment: str, field: int) -> bytes:
    """*raw* with one field emptied (python-hl7 would re-encode the rest; this keeps every other byte)."""
    lines = raw.split(b"\r")
    for i, line in enumerate(lines):
        if line.startswith(segment.encode() + b"|"):
            parts = line.split(b"|")
            parts[field] = b""
            lines[i] = b"|".join(parts)
    return b"\r".join(lines)


# -- referrals --------------------------------------------------------------------------------

def test_a_360x_package_is_a_referral_keyed_by_the_initiators_order_number():
    documents = referral_documents("omg-o19")
    assert is_referral(documents)
    ref = read_inbound(documents)
    assert ref.problems == ()
    assert (ref.referral_id, ref.referral_ei) == (REFERRAL_ID, REFERRAL_EI)
    assert ref.order == OMG
    assert ref.cda is not None and b"57133-1" in ref.cda
    assert ref.patient_cx == PATIENT_CX
    assert ref.patient_ids == "SMRN0004^^^&1.3.6.1.4.1.99999.1.5&ISO^MRN"
    assert ref.patient_name == "Sample^Drew^^^L"
    assert ref.veterinary is False and ref.facts["veterinary"] is False


@pytest.mark.parametrize("name, referral_id, patient, veterinary, purpose", [
    ("ref-i12", "SAMPLEREF0001", "Sample^Alex^J", False, "Essential hypertension"),
    ("vet-ref-i12", "VETREF0001", "Biscuit", True, "Heart murmur"),
])
def test_a_bare_referral_note_is_a_referral_keyed_by_its_referral_act(name, referral_id, patient, veterinary,
                                                                      purpose):
    documents = referral_documents(name)
    assert not any(d.startswith(b"MSH|") for _, d in documents)   # no v2 order travelled
    assert is_referral(documents)
    ref = read_inbound(documents)
    assert ref.problems == ()
    # The id the referring engine stored for the same sample: both ends key the referral alike.
    from forward_inputs import built
    assert ref.referral_id == built(name)[1].referral_id == referral_id
    assert ref.order is None and ref.cda is not None
    assert (ref.patient_name, ref.veterinary, ref.facts["purpose"]) == (patient, veterinary, purpose)


def test_the_order_alone_is_a_referral():
    documents = [("DOC0001.HL7", OMG)]
    assert is_referral(documents)
    ref = read_inbound(documents)
    assert (ref.referral_id, ref.cda, ref.problems) == (REFERRAL_ID, None, ())


def test_an_order_without_orc2_is_keyed_by_obr2():
    order = without(OMG, "ORC", 2)
    assert b"\rORC|NW|\r" in order and order.count(b"990001") == 1   # OBR-2 alone names it
    ref = read_inbound([("DOC0002.HL7", order)])
    assert (ref.referral_id, ref.problems) == (REFERRAL_ID, ())


def test_an_order_without_any_id_is_a_problem_unless_the_note_names_the_referral():
    order = without(without(OMG, "ORC", 2), "OBR", 2)
    alone = read_inbound([("DOC0002.HL7", order)])
    assert alone.referral_id == ""
    assert any("no referral id" in p for p in alone.problems)
    # Beside the Referral Note, its Referral Act id keys it (and no problem is left).
    documents = [(n, order if d.startswith(b"MSH|") else d) for n, d in referral_documents("omg-o19")]
    ref = read_inbound(documents)
    assert ref.referral_id == REFERRAL_ID and ref.problems == ()


def test_two_orders_in_one_message_is_a_problem():
    second = OMG.replace(b"990001", b"990002").replace(b"OMGSAMPLE1", b"OMGSAMPLE2")
    documents = referral_documents("omg-o19") + [("DOC0003.HL7", second)]
    assert is_referral(documents)
    ref = read_inbound(documents)
    assert ref.referral_id == REFERRAL_ID   # the first one, named; a person decides
    assert any("2 orders in one message" in p for p in ref.problems)


# -- answers are not referrals ----------------------------------------------------------------

ANSWERS = {
    "OSU accept": lambda: answer_documents(message=lm.osu_accept(referral_id=REFERRAL_EI)),
    "OSU cancel (the initiator's)": lambda: answer_documents(message=lm.osu_cancel(referral_id=REFERRAL_EI)),
    "SIU^S12": lambda: answer_documents(message=lm.siu_s12(referral_id=REFERRAL_EI)),
    "SIU^S26": lambda: answer_documents(message=lm.siu_s26(referral_id=REFERRAL_EI)),
    "MDM^T02": lambda: answer_documents(message=lm.mdm_t02(referral_id=REFERRAL_EI)),
    "OSU + Consultation Note": lambda: answer_documents(message=lm.osu_outcome(referral_id=REFERRAL_EI),
                                                        cda=lm.consult_note_cda()),
    "Consultation Note alone": lambda: answer_documents(cda=lm.consult_note_cda()),
    "OMG^O19 cancel (ORC-1 CA)": lambda: [("DOC0001.HL7", OMG.replace(b"ORC|NW|", b"ORC|CA|"))],
}


@pytest.mark.parametrize("name", list(ANSWERS))
def test_answers_are_not_referrals(name):
    assert not is_referral(ANSWERS[name]())


def test_a_consultation_note_built_by_the_engine_is_not_a_referral():
    note = to_bytes(build_consultation_note(ConsultInput(
        text="Seen.\nPlan: echo in 3 months.", referral_id=Identifier("1.3.6.1.4.1.99999.1.15", "990001"),
        patient=Patient(ids=[Identifier("1.3.6.1.4.1.99999.1.5", "SMRN0004")], names=[Name("Sample", ["Drew"])]))))
    assert not is_referral(answer_documents(cda=note))


def test_a_consultation_note_naming_the_referral_note_it_answers_is_not_a_referral():
    # An EHR may code the order it fulfils (inFulfillmentOf/order/code) or cite the Referral
    # Note (an external document reference) with LOINC 57133-1: the document is still a
    # Consultation Note, an answer; only the document's own type makes it a referral.
    note = lm.consult_note_cda().replace(
        b'<order classCode="ACT" moodCode="RQO">',
        b'<order classCode="ACT" moodCode="RQO"><code code="57133-1" codeSystem="2.16.840.1.113883.6.1"/>')
    assert b"57133-1" in note
    assert not is_referral(answer_documents(cda=note))


# -- junk: problems, never exceptions ---------------------------------------------------------

JUNK = {
    "nothing": [],
    "binary": [("part1", b"\x00\x01\x02\xff")],
    "an MSH and nothing else": [("a.hl7", b"MSH|")],
    "a REF^I12 without RF1 or PID": [("a.hl7", b"MSH|^~\\&|||||||REF^I12|1|P|2.5.1\r")],
    "an order with broken bytes": [("a.hl7", b"MSH|^~\\&|||||||OMG^O19|1|P|2.5.1\rPID|1||\xff\xfe\rORC|NW|\rOBR")],
    "a Referral Note that is not XML": [("a.xml", b"<ClinicalDocument><code code='57133-1'/>broken")],
    "a Referral Note with a DOCTYPE": [("a.xml", b"<!DOCTYPE x [<!ENTITY a 'b'>]><ClinicalDocument "
                                                 b"xmlns='urn:hl7-org:v3'><code code='57133-1'/>&a;"
                                                 b"</ClinicalDocument>")],
    "a Referral Note without a referral act": [("a.xml", b"<ClinicalDocument xmlns='urn:hl7-org:v3'>"
                                                         b"<code code='57133-1'/></ClinicalDocument>")],
}


@pytest.mark.parametrize("name", list(JUNK))
def test_junk_gives_problems_not_exceptions(name):
    documents = JUNK[name]
    is_referral(documents)
    ref = read_inbound(documents)
    assert ref.referral_id == "" and ref.problems
    assert all(isinstance(p, str) and p for p in ref.problems)
