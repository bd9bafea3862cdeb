"""Reading a C-CDA Referral Note back: the engine's own documents, HL7's sample, broken input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forward_inputs import built, document, non_latin_referral
from hl7referral.cda.model import OID, Code, Identifier, Patient
from hl7referral.cda.referral_reader import (
    ReferralNoteError,
    ReferralSummary,
    cx,
    ei,
    read_referral_note,
)
from hl7referral.loop.correlate import ei_key, read_consult_cda
from hl7referral.loop.tracker import referral_facts

HUMAN = ["ref-i12", "omg-o19", "orm-o01"]


def read(name: str) -> ReferralSummary:
    return read_referral_note(built(name)[0])


# -- the referral id: what the referring engine stored, and what correlate reads back ------------------


@pytest.mark.parametrize("name", HUMAN + ["vet-ref-i12"])
def test_referral_id_is_the_one_the_referring_engine_stored(name):
    _, processed = built(name)
    s = read(name)
    assert s.referral_id == processed.referral_id != ""
    # as a v2 EI it reads back to the same stored form
    assert ei_key(s.referral_ei) == s.referral_id


def test_referral_id_forms(corpus):
    s = read("360x")
    assert s.referral_ei == "889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO"
    assert s.referral_id == "889342@1.3.6.1.4.1.21367.2016.10.1.21.15"
    # a bare v2 id (RF1-6 without an assigning authority): the builder's local root stands in for none
    assert (read("ref-i12").referral_ei, read("ref-i12").referral_id) == ("SAMPLEREF0001", "SAMPLEREF0001")
    # a namespace-only v2 id (ORC-2 SAMPLEORD0001^SAMPLE-EHR): the namespace comes back
    assert read("orm-o01").referral_ei == "SAMPLEORD0001^SAMPLE-EHR"
    assert ei_key("SAMPLEORD0001^SAMPLE-EHR") == read("orm-o01").referral_id == "SAMPLEORD0001"


def test_ids_agree_with_how_correlate_reads_a_document():
    """The stored form is correlate's ii_key: a consult note answering this referral (its
    inFulfillmentOf/order/id = the Referral Act id) is keyed the same way."""
    xml = built("omg-o19")[0]
    act_id = b'<id root="1.3.6.1.4.1.99999.1.15" extension="990001"'
    assert act_id in xml
    answer = (b'<ClinicalDocument xmlns="urn:hl7-org:v3"><inFulfillmentOf><order>' + act_id
              + b'/></order></inFulfillmentOf></ClinicalDocument>')
    assert read_consult_cda(answer).referral_ids == [read("omg-o19").referral_id]


@pytest.mark.parametrize("ident, as_ei, as_cx", [
    (Identifier("1.2.3.4", "X1"), "X1^^1.2.3.4^ISO", "X1^^^&1.2.3.4&ISO"),
    (Identifier("2.16.840.1.113883.19", "X1"), "X1", "X1"),
    (Identifier("2.16.840.1.113883.19.12345", "X1", "HOSP_MRN"), "X1^HOSP_MRN", "X1^^^HOSP_MRN"),
    (Identifier("70bdd7db-e02d-4eff-9829-35e3b7d9e154", ""), "70bdd7db-e02d-4eff-9829-35e3b7d9e154",
     "70bdd7db-e02d-4eff-9829-35e3b7d9e154"),
    (Identifier("70bdd7db-e02d-4eff-9829-35e3b7d9e154", "X1"), "X1^^70bdd7db-e02d-4eff-9829-35e3b7d9e154^UUID",
     "X1^^^&70bdd7db-e02d-4eff-9829-35e3b7d9e154&UUID"),
    (Identifier("1.2.3.4", "A^B&C|D~E\\F"), "A\\S\\B\\T\\C\\F\\D\\R\\E\\E\\F^^1.2.3.4^ISO",
     "A\\S\\B\\T\\C\\F\\D\\R\\E\\E\\F^^^&1.2.3.4&ISO"),
])
def test_identifiers_as_v2_text(ident, as_ei, as_cx):
    assert (ei(ident), cx(ident)) == (as_ei, as_cx)


# -- what the engine's own documents say --------------------------------------------------------------


def test_human_referral_from_ref_i12():
    s = read("ref-i12")
    assert s.document_id == "2ec95490-5ab2-4d33-8e39-863f80dfc62c"
    assert (s.document_code.code, s.document_code.display) == ("57133-1", "Referral note")
    assert s.effective_time == s.referral_time == "20261122064151+0000"
    assert s.patient_ids == "SMRN0001^^^SAMPLE CLINIC" == s.patient_cx
    assert s.patient_name == "Sample^Alex^J"
    assert (s.patient.birth_time, s.patient.sex) == ("19800101", "F")
    assert s.referring.npi == "1003000126"
    assert (s.referring.name.family, s.referring.name.given) == ("Referrer", ["Robin"])
    assert s.recipient.npi == "1234567893" and s.recipient.name.family == "Specialist"
    assert s.recipient.organization == "Example Cardiology Associates"
    assert s.reason_code.code == "I10" and s.reason_code.display == "Essential hypertension"
    assert "Essential hypertension" in s.reason
    assert s.service.code == "MED"
    assert (s.priority.code, s.priority.system) == ("R", OID["ACT_PRIORITY"])
    assert s.veterinary is False and s.patient.owner is None and not s.patient.species


def test_360x_order_referral(corpus):
    s = read("360x")
    assert s.patient_ids == "T7190334^^^&1.3.6.1.4.1.21367.2016.10.1.21.5&ISO"
    assert s.patient_name == "Packton^Peter^^^L"
    assert s.reason == "Rule out headache"
    assert (s.service.code, s.service.system_name) == ("57133-1", "LN")
    # the ordering provider (ORC-12 = OBR-16) is the author, once
    assert [(i.root, i.extension) for i in s.referring.ids] == [("1.3.6.1.4.1.21367.2016.10.1.21.10", "34225PC")]
    assert s.referring.name.family == "Allen"


def test_veterinary_referral_keeps_species_breed_and_owner():
    s = read("vet-ref-i12")
    assert s.veterinary is True
    assert s.patient_name == "Biscuit" and s.patient_ids == "PET0042^^^SAMPLE VET CLINIC"
    assert (s.patient.species.code, s.patient.species.display) == ("448771007", "Canis lupus familiaris")
    assert (s.patient.breed.code, s.patient.breed.display) == ("VETCARD", "Labrador retriever")
    assert s.patient.owner is not None and s.patient.owner.name.family == "Ownerson"
    assert s.facts()["phone"] == "5555550199"   # the owner answers for the animal


def test_species_from_the_description_when_there_is_no_coded_entry():
    xml = document(non_latin_referral(veterinary=True, patient=Patient(
        ids=[Identifier("1.2.3", "P1")], species=Code(original_text="Felis catus"))))
    # the builder states an uncoded species in sdtc:desc and as an uncoded assertion
    s = read_referral_note(xml.replace(b'ID="pt-species"', b'ID="x"').replace(b'"#pt-species"', b'"#x"'))
    assert s.veterinary and s.patient.species.display == "Felis catus" and not s.patient.species.code


@pytest.mark.parametrize("name", HUMAN + ["vet-ref-i12"])
def test_facts_match_what_the_referring_engine_notifies_with(name):
    _, processed = built(name)
    facts = read(name).facts()
    expected = referral_facts(processed.referral)
    assert facts.keys() == expected.keys()
    for key in ("email", "phone", "veterinary", "specialist", "specialist_phone", "purpose", "referring_provider"):
        assert facts[key] == expected[key], key


def test_non_ascii_text_is_read_as_written():
    s = read_referral_note(document(non_latin_referral()))
    assert (s.patient.name.family, s.patient.name.given) == ("Ørsted", ["Zoë"])
    assert s.patient_name == "Ørsted^Zoë"
    assert s.recipient.name.family == "王"
    assert "Brustschmerz" in s.reason
    assert (s.priority.code, s.priority.display) == ("UR", "urgent")


# -- HL7's published Referral Note ----------------------------------------------------------------


def test_hl7_sample_referral_note(standards):
    path = standards / "examples" / "C-CDA-Examples" / "Referral_Note.xml"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    s = read_referral_note(path.read_bytes())
    # its Referral Act id has a UUID root and no extension: the root is the id
    assert s.referral_id == s.referral_ei == "70bdd7db-e02d-4eff-9829-35e3b7d9e154"
    assert s.document_code.code == "57113-1"   # HL7's typo (ccda.md §10.2), read as written
    assert s.patient_ids == "444222222^^^&2.16.840.1.113883.4.1&ISO"
    assert s.patient_name == "Betterhalf^Eve" and s.patient.sex == "F" and s.patient.birth_time == "19750501"
    assert s.referring.npi == "5555555555" and s.referring.name.family == "Primary"
    assert s.recipient.name.family == "Nightingale" and s.recipient.organization == "Community Health and Hospitals"
    assert s.reason.startswith("Patient referral for consultation for full care")
    assert (s.service.code, s.service.display) == ("268528005", "Full care by specialist")
    assert (s.priority.code, s.priority.display) == ("A", "ASAP")
    assert s.referral_time == "20130311" and not s.veterinary


def test_a_referral_note_without_a_referral_act_reads_as_empty_id(standards):
    path = standards / "examples" / "CDA-ccda" / "referral-note-header-example.xml"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    s = read_referral_note(path.read_bytes())
    assert s.referral_id == s.referral_ei == "" and s.reason == ""   # its Reason section is nullFlavor NI
    assert s.patient_name == "Betterhalf^Eve"


# -- missing parts and broken input ------------------------------------------------------------------


def test_an_empty_clinical_document_reads_as_empty_values():
    s = read_referral_note(b'<ClinicalDocument xmlns="urn:hl7-org:v3"/>')
    assert s == ReferralSummary()
    assert s.patient_name == s.patient_ids == s.patient_cx == ""
    assert set(s.facts().values()) <= {"", False}


def test_null_flavors_and_stray_values_read_as_empty():
    xml = b"""<ClinicalDocument xmlns="urn:hl7-org:v3"><id nullFlavor="NI"/>
      <effectiveTime nullFlavor="UNK"/><recordTarget><patientRole><id nullFlavor="UNK"/><id/>
      <patient><name nullFlavor="UNK"/><administrativeGenderCode nullFlavor="UNK"/><birthTime/></patient>
      </patientRole></recordTarget><author><assignedAuthor><id nullFlavor="UNK"/>
      <assignedPerson><name><given nullFlavor="UNK"/><family>Solo</family></name></assignedPerson>
      </assignedAuthor></author>
      <component><structuredBody><component><section><code code="42349-1"/>
      <text>Please see <content>this</content>   patient.</text>
      <entry><act><templateId root="2.16.840.1.113883.10.20.22.4.140"/><id extension="R9"/>
      <text><reference value="#nowhere"/></text></act></entry></section></component></structuredBody></component>
      </ClinicalDocument>"""
    s = read_referral_note(xml)
    assert s.document_id == "" and s.effective_time == ""
    assert s.patient == ReferralSummary().patient
    assert s.referring.ids == () and s.patient_name == ""
    assert s.referring.name.family == "Solo" and s.referring.name.given == []
    assert s.referral_id == "R9" and s.referral_ei == "R9"
    assert s.reason == "Please see this patient."   # a dangling reference: the section's free text


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"   \n", "empty"),
    (b"MSH|^~\\&|not|xml", "not well-formed"),
    (b"<ClinicalDocument xmlns='urn:hl7-org:v3'><unclosed></ClinicalDocument>", "not well-formed"),
    (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e 'boom'>]><ClinicalDocument xmlns='urn:hl7-org:v3'>"
     b"<title>&e;</title></ClinicalDocument>", "DOCTYPE"),
    (b"<ClinicalDocument/>", "not a CDA document"),   # no HL7 v3 namespace
    (b"<html><body>hello</body></html>", "not a CDA document"),
    ("<ClinicalDocument xmlns='urn:hl7-org:v3'/>", "expected the document's bytes"),
])
def test_not_a_cda_is_a_named_error(data, reason):
    with pytest.raises(ReferralNoteError, match=reason) as err:
        read_referral_note(data)
    assert isinstance(err.value, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.text(max_size=300).map(lambda t: f'<ClinicalDocument xmlns="urn:hl7-org:v3">{t}'
                                                     '</ClinicalDocument>'.encode("utf-8"))))
def test_any_bytes_give_a_summary_or_the_named_error(data):
    try:
        s = read_referral_note(data)
    except ReferralNoteError:
        return
    assert isinstance(s, ReferralSummary)
    s.facts()
