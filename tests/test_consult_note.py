"""The Consultation Note builder and its MDM^T02 reader, against the real CDA_SDTC.xsd and C-CDA R2.1 Schematron.

Every document built here must pass XSD + Schematron (errors phase) with the Consultation Note's
document-level rule fired (ccda.md §10.3), and read back through the referring engine's
``read_consult_cda`` as the consult note of its referral. Synthetic data only.
"""

from __future__ import annotations

import dataclasses

import pytest
from lxml import etree

from hl7referral.cda.consult_note import (
    CONSULTATION_NOTE,
    ConsultInput,
    MdmError,
    build_consultation_note,
    consult_input_from_mdm,
    to_bytes,
)
from hl7referral.cda.model import OID, Address, Code, Identifier, Name, Party, Patient, Telecom
from hl7referral.cda.pipeline import referral_key
from hl7referral.cda.referral_note import US_REALM_HEADER
from hl7referral.cda.validate import Validator, document_rule_id
from hl7referral.loop.correlate import PLACER, REFERRAL, read_consult_cda
from hl7referral.loop.states import Kind
from hl7referral.v2.mdm import ConsultNote, build_mdm_t02
from test_referral_note import veterinary as vet_referral

NS = {"cda": "urn:hl7-org:v3", "sdtc": "urn:hl7-org:sdtc"}
V3 = "{urn:hl7-org:v3}"
REASON_FOR_REFERRAL = "1.3.6.1.4.1.19376.1.5.3.1.3.1"
HPI = "1.3.6.1.4.1.19376.1.5.3.1.3.4"
ASSESSMENT_AND_PLAN = "2.16.840.1.113883.10.20.22.2.9"
PROBLEMS = "2.16.840.1.113883.10.20.22.2.5.1"
ALLERGIES = "2.16.840.1.113883.10.20.22.2.6.1"
REFERRAL_ROOT = "1.3.6.1.4.1.21367.2016.10.1.21.15"
CALLBCK_RULE = "r-urn-hl7ii-2.16.840.1.113883.10.20.22.1.4-2015-08-01-31656-branch-31656-errors"


@pytest.fixture
def validator(ccda_validator) -> Validator:
    return ccda_validator


def xp(node, path: str):
    return node.xpath(path, namespaces=NS)


def section(doc, root: str):
    (sec,) = xp(doc, f"cda:component/cda:structuredBody/cda:component/cda:section[cda:templateId/@root='{root}']")
    return sec


def paragraphs(doc) -> list[str]:
    return [p.text or "" for p in section(doc, ASSESSMENT_AND_PLAN).iterfind(f"{V3}text/{V3}paragraph")]


# --- inputs ---------------------------------------------------------------------------------------

TEXT = "Consultation: cardiology\nAssessment: synthetic findings only.\n\nPlan: follow up in 6 weeks.\n"


def human() -> ConsultInput:
    work = [Address(["1 Heart Way"], "Portland", "OR", "99124", "US", "WP")]
    return ConsultInput(
        referral_id=Identifier(REFERRAL_ROOT, "889342", "Good Health Clinic"),
        text=TEXT,
        patient=Patient(
            ids=[Identifier("", "MRN12345", "GHC_MRN")],
            names=[Name("Everywoman", ["Eve", "L"])],
            gender=Code("F"),
            birth_time="19750501",
            addr=[Address(["2222 Home Street"], "Beaverton", "OR", "97867", "US", "H")],
            telecom=[Telecom("tel:+1-555-555-2003", "HP")],
        ),
        author=Party(
            ids=[Identifier(OID["NPI"], "1987654321")],
            name=Name("Heart", ["Henry"], prefix="Dr."),
            organization="Cardiology Associates",
            addr=work,
            telecom=[Telecom("tel:+1-555-555-7000", "WP")],
            direct_address="hheart@direct.cardio.example",
        ),
        custodian=Party(ids=[Identifier("2.16.840.1.113883.19.8")], organization="Cardiology Associates", addr=work,
                        telecom=[Telecom("tel:+1-555-555-7001", "WP")]),
        recipient=Party(ids=[Identifier("", "1234567893", "NPI")], name=Name("Primary", ["Patricia"], suffix="MD"),
                        organization="Good Health Clinic"),
        title="Cardiology consultation",
        effective_time="202603151630-0500",
        encounter_time="202603151400-0500",
        document_id=Identifier("6f1c2d8a-3e4b-4c6d-8e7f-901234567890"),
        encounter_id=Identifier("", "V-2026-77", "CARDIO_VISIT"),
        reason="Intermittent chest pain on exertion",
    )


def veterinary() -> ConsultInput:
    return ConsultInput(
        referral_id=Identifier("", "VR-1", "VETCLINIC"),
        text="Gait analysis: grade 2/5 lameness, right hind.\nPlan: TPLO surgery discussed with the owner.",
        patient=vet_referral().patient,   # the dog tests/test_referral_note.py refers
        author=Party(ids=[Identifier("", "V987", "STATE_VET_LICENSE")], name=Name("Ortho", ["Olga"]),
                     organization="Animal Orthopedics"),
        recipient=Party(name=Name("Vet", ["Val"])),
        effective_time="20260310",
        document_id=Identifier("", "VDOC-1", "ANIMAL_ORTHO_DOCS"),
        veterinary=True,
    )


def non_ascii() -> ConsultInput:
    c = human()
    c.patient.names = [Name("Ørsted", ["Zoë"])]
    c.text = "Befund: Brustschmerz — unauffällig.\n胸痛: 無し\n\tEingerückt & <markiert> ]]>\x07\n"
    return c


def long_note() -> ConsultInput:
    c = human()
    c.text = "\n".join(f"Line {i}: " + "synthetic observation " * (i % 7) for i in range(1, 1501))
    c.text += "\n" + "x" * 20000 + "\n\n\n"
    return c


INPUTS = {"human": human, "veterinary": veterinary, "non_ascii": non_ascii, "long": long_note, "empty": ConsultInput}


# --- MDM^T02 ------------------------------------------------------------------------------------

MDM_REFERRAL = f"889342^^{REFERRAL_ROOT}^ISO"
NOW = "20260315170000+0000"


def mdm(text: str | None = TEXT, *, control_id: str = "MDM0001", **kw) -> bytes:
    base = dict(referral_id=MDM_REFERRAL, unique_document_id="DOC-77^SPECIALIST", text=text,
                patient_ids="T7190334^^^&1.3.6.1.4.1.21367.2016.10.1.21.5&ISO^MRN", patient_name="Testpatient^Alex",
                author="34225PC^Specialist^Sam^^^Dr", activity_time="202603151400-0500",
                origination_time="202603151630-0500")
    base.update(kw)
    return build_mdm_t02(ConsultNote(**base), control_id=control_id, now_hl7=NOW,
                         sending=("SPECIALIST", "Cardio Associates^1.3.6.1.4.1.21367.2016.10.1.32^ISO"),
                         receiving=("EHR", "^1.3.6.1.4.1.21367.2016.10.1.21^ISO"))


def edit(raw: bytes, segment: str, field: int | None = None, value: str = "", *, drop: bool = False,
         add: str = "") -> bytes:
    """*raw* with one field of its first *segment* set (or that segment dropped, or a segment added after it)."""
    segments = raw.decode("utf-8").split("\r")
    i = next(n for n, s in enumerate(segments) if s.startswith(segment + "|"))
    if drop:
        del segments[i]
    elif add:
        segments.insert(i + 1, add)
    else:
        fields = segments[i].split("|")
        n = field - 1 if segment == "MSH" else field  # MSH-1 is the separator itself
        fields += [""] * (n + 1 - len(fields))
        fields[n] = value
        segments[i] = "|".join(fields)
    return "\r".join(segments).encode("utf-8")


def vet_mdm() -> bytes:
    """A PIMS's MDM: the animal's species and breed in PID-35/36, its owner as NK1 OWN."""
    raw = mdm("Lameness grade 2/5.\nPlan: TPLO.", patient_name="Smith^Rex", patient_ids="P-77^^^VETCLINIC^MR")
    raw = edit(raw, "PID", 35, "448771007^Canis lupus subsp. familiaris^SCT")
    raw = edit(raw, "PID", 36, "^Labrador Retriever")
    raw = edit(raw, "PID", 8, "M")
    return edit(raw, "PV1", add="NK1|1|Smith^John|OWN^Owner^HL70063||^PRN^PH^^1^555^5550199")


# --- validity -------------------------------------------------------------------------------------


def _assert_valid(validator, tree):
    report = validator.validate(tree, expect=CONSULTATION_NOTE)
    assert report.ok, "\n".join(report.lines())
    assert report.known == []
    for rule in (
        document_rule_id(CONSULTATION_NOTE),
        document_rule_id(US_REALM_HEADER),
        document_rule_id((REASON_FOR_REFERRAL, "2014-06-09")),
        document_rule_id((HPI, "")),
        document_rule_id((ASSESSMENT_AND_PLAN, "2014-06-09")),
        document_rule_id((PROBLEMS, "2015-08-01")),
        document_rule_id((ALLERGIES, "2015-08-01")),
    ):
        assert rule in report.fired_rules, rule
    return report


@pytest.mark.parametrize("kind", list(INPUTS))
def test_document_passes_xsd_schematron_and_template_check(validator, kind):
    report = _assert_valid(validator, build_consultation_note(INPUTS[kind]()))
    # the call-back contact (the author) was checked against the Consultation Note's participant rule
    assert (CALLBCK_RULE in report.fired_rules) == (kind != "empty")


@pytest.mark.parametrize("raw", [mdm, vet_mdm], ids=["human", "veterinary"])
def test_documents_from_mdm_pass(validator, raw):
    _assert_valid(validator, build_consultation_note(consult_input_from_mdm(raw())))


def test_validator_catches_a_consultation_note_without_its_referral(validator):
    """The rules really run: without inFulfillmentOf the Consultation Note rule fails (CONF:1198-8382)."""
    tree = build_consultation_note(human())
    (link,) = xp(tree, "/cda:ClinicalDocument/cda:inFulfillmentOf")
    link.getparent().remove(link)
    rules = {f.rule for f in validator.validate(tree, expect=CONSULTATION_NOTE).findings}
    assert {"a-1198-8382", "a-1198-29923", "a-1198-29924"} <= rules


def test_an_owner_as_participant_would_fail_the_consultation_note_rules(validator):
    """Why the owner is a guardian here and not a participant IND (as in the Referral Note)."""
    tree = build_consultation_note(veterinary())
    doc = tree.getroot()
    extra = etree.fromstring(
        f'<participant xmlns="{NS["cda"]}" typeCode="IND"><associatedEntity classCode="PRS">'
        "<associatedPerson><name><given>John</given><family>Smith</family></name></associatedPerson>"
        "</associatedEntity></participant>"
    )
    xp(doc, "cda:participant")[0].addnext(extra)
    rules = {f.rule for f in validator.validate(tree, expect=CONSULTATION_NOTE).findings}
    assert "a-1198-31657-branch-31656" in rules


# --- content --------------------------------------------------------------------------------------


def test_header_identifies_the_document_and_its_referral():
    c = human()
    doc = build_consultation_note(c).getroot()
    templates = [(t.get("root"), t.get("extension")) for t in xp(doc, "cda:templateId")]
    assert templates == [(US_REALM_HEADER[0], None), US_REALM_HEADER, (CONSULTATION_NOTE[0], None), CONSULTATION_NOTE]
    assert (xp(doc, "string(cda:code/@code)"), xp(doc, "string(cda:code/@codeSystem)")) == ("11488-4", OID["LOINC"])
    assert xp(doc, "string(cda:title)") == "Cardiology consultation"
    assert xp(doc, "string(cda:effectiveTime/@value)") == "202603151630-0500"
    assert xp(doc, "string(cda:id/@root)") == xp(doc, "string(cda:setId/@root)") == c.document_id.root
    assert [(i.get("root"), i.get("extension")) for i in xp(doc, "cda:inFulfillmentOf/cda:order/cda:id")] == [
        (REFERRAL_ROOT, "889342")
    ]
    enc = xp(doc, "cda:componentOf/cda:encompassingEncounter")[0]
    assert xp(enc, "string(cda:effectiveTime/@value)") == "202603151400-0500"
    assert xp(enc, "string(cda:id/@extension)") == "V-2026-77"
    assert xp(enc, "cda:responsibleParty/cda:assignedEntity/cda:id/@extension") == ["1987654321"]
    assert xp(doc, "cda:author/cda:assignedAuthor/cda:assignedPerson/cda:name/cda:family/text()") == ["Heart"]
    assert xp(doc, "cda:author/cda:time/@value") == ["202603151630-0500"]
    recipient = "cda:informationRecipient/cda:intendedRecipient/cda:informationRecipient/cda:name/cda:family/text()"
    assert xp(doc, recipient) == ["Primary"]
    assert xp(doc, "cda:participant/@typeCode") == ["CALLBCK"]
    assert "mailto:hheart@direct.cardio.example" in xp(doc, "cda:participant//cda:telecom/@value")
    rfr = etree.tostring(section(doc, REASON_FOR_REFERRAL).find(V3 + "text"), method="text", encoding="unicode")
    assert "889342" in rfr and "Patricia Primary MD" in rfr and "Intermittent chest pain" in rfr


def test_text_goes_line_by_line_into_assessment_and_plan_and_the_rest_says_no_information():
    doc = build_consultation_note(human()).getroot()
    assert paragraphs(doc) == ["Consultation: cardiology", "Assessment: synthetic findings only.", "",
                               "Plan: follow up in 6 weeks."]
    assert section(doc, ASSESSMENT_AND_PLAN).get("nullFlavor") is None
    for root in (HPI, PROBLEMS, ALLERGIES):
        sec = section(doc, root)
        assert sec.get("nullFlavor") == "NI"
        assert sec.findtext(V3 + "text") == "No information"
        assert sec.find(V3 + "entry") is None


def test_blank_lines_around_the_text_are_dropped_inside_kept():
    c = human()
    c.text = "\r\n  \n\nFirst\r\n\r\n\r\nLast  \n\n"
    assert paragraphs(build_consultation_note(c).getroot()) == ["First", "", "", "Last  "]
    c.text = " \n\t\n"
    doc = build_consultation_note(c).getroot()
    assert section(doc, ASSESSMENT_AND_PLAN).get("nullFlavor") == "NI"


def test_non_ascii_markup_and_control_characters_in_the_text(validator):
    data = to_bytes(build_consultation_note(non_ascii()))
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    for text in ("Zoë", "Ørsted", "Brustschmerz — unauffällig", "胸痛: 無し"):
        assert text.encode("utf-8") in data, text
    assert b"&#" not in data  # real UTF-8, not character references
    doc = etree.fromstring(data)
    assert paragraphs(doc) == ["Befund: Brustschmerz — unauffällig.", "胸痛: 無し", "\tEingerückt & <markiert> ]]>"]


def test_long_note_keeps_every_line():
    c = long_note()
    doc = etree.fromstring(to_bytes(build_consultation_note(c)))
    lines = paragraphs(doc)
    assert len(lines) == 1501 and lines[0] == "Line 1: synthetic observation "
    assert lines[-1] == "x" * 20000


def test_veterinary_patient_owner_and_species():
    doc = build_consultation_note(veterinary()).getroot()
    patient = "cda:recordTarget/cda:patientRole/cda:patient"
    assert xp(doc, f"{patient}/cda:name/cda:given/text()") == ["Rex"]
    desc = xp(doc, f"string({patient}/sdtc:desc)")
    assert "Canis lupus subsp. familiaris" in desc and "Labrador Retriever" in desc
    assert xp(doc, f"{patient}/cda:raceCode/@nullFlavor") == xp(doc, f"{patient}/cda:ethnicGroupCode/@nullFlavor") \
        == ["NA"]
    assert xp(doc, f"{patient}/cda:guardian/cda:guardianPerson/cda:name/cda:given/text()") == ["John"]
    assert xp(doc, "cda:participant/@typeCode") == ["CALLBCK"]  # the owner is not a participant here
    rfr = section(doc, REASON_FOR_REFERRAL)
    narrative = etree.tostring(rfr.find(V3 + "text"), method="text", encoding="unicode")
    assert "John Smith" in narrative and "Labrador Retriever" in narrative and "VR-1" in narrative
    species = xp(rfr, "cda:entry/cda:observation[cda:text/cda:reference/@value='#pt-species']/cda:value")
    assert [(v.get("code"), v.get("codeSystem")) for v in species] == [("448771007", OID["SNOMED"])]


def test_same_input_same_bytes_and_the_document_id_decides():
    assert to_bytes(build_consultation_note(human())) == to_bytes(build_consultation_note(human()))
    assert to_bytes(build_consultation_note(veterinary())) == to_bytes(build_consultation_note(veterinary()))
    other = dataclasses.replace(human(), document_id=Identifier("0b7e4a52-2d1c-4e8f-9a3b-5c6d7e8f9a0b"))
    assert to_bytes(build_consultation_note(other)) != to_bytes(build_consultation_note(human()))
    assert to_bytes(build_consultation_note(consult_input_from_mdm(mdm()))) == to_bytes(
        build_consultation_note(consult_input_from_mdm(mdm()))
    )


# --- read back by the referring engine ---------------------------------------------------------------


@pytest.mark.parametrize(
    "referral_id",
    [Identifier(REFERRAL_ROOT, "889342", "Good Health Clinic"), Identifier("", "REF-0001", "GHC_ORDERS")],
    ids=["oid-root", "namespace-only"],
)
def test_read_consult_cda_finds_the_referral_and_sees_a_consult_note(referral_id):
    c = dataclasses.replace(human(), referral_id=referral_id)
    obs = read_consult_cda(to_bytes(build_consultation_note(c)))
    assert obs.problems == ()
    # the key is the referral id in the form the referring engine stored it (pipeline.referral_key)
    assert obs.values(REFERRAL) == [referral_key(referral_id)]
    assert [e.kind for e in obs.events] == [Kind.CONSULT_NOTE]
    assert obs.events[0].at == "2026-03-15T21:30:00Z"
    assert obs.note.format == "cda" and obs.note.title == "Cardiology consultation"


def test_read_consult_cda_on_a_note_built_from_mdm():
    obs = read_consult_cda(to_bytes(build_consultation_note(consult_input_from_mdm(mdm()))))
    assert obs.problems == ()
    assert obs.keys[:2] == ((REFERRAL, f"889342@{REFERRAL_ROOT}"), (PLACER, "889342"))
    assert [e.kind for e in obs.events] == [Kind.CONSULT_NOTE]


# --- consult_input_from_mdm ---------------------------------------------------------------------


def test_mdm_fields_become_the_input():
    text = "Findings | with ^ all ~ the \\ delimiters & more\n\nNon-ASCII: Zoë Ørsted 胸痛\n"
    c = consult_input_from_mdm(mdm(text))
    assert c.referral_id == Identifier(REFERRAL_ROOT, "889342", REFERRAL_ROOT)
    assert c.text == text.rstrip("\n")
    assert c.title == "Consult note"  # OBX-3.2 as build_mdm_t02 writes it
    assert [(i.root, i.extension) for i in c.patient.ids] == [("1.3.6.1.4.1.21367.2016.10.1.21.5", "T7190334")]
    assert c.patient.names == [Name("Testpatient", ["Alex"])]
    assert c.author.ids[0].extension == "34225PC" and c.author.name == Name("Specialist", ["Sam"], prefix="Dr")
    assert c.custodian.organization == "Cardio Associates"
    assert [i.root for i in c.custodian.ids] == ["1.3.6.1.4.1.21367.2016.10.1.32"]
    assert (c.effective_time, c.encounter_time) == ("202603151630-0500", "202603151400-0500")
    assert (c.document_id.extension, c.document_id.authority) == ("DOC-77", "SPECIALIST")
    assert c.recipient is None and c.final and not c.veterinary
    doc = build_consultation_note(c).getroot()
    assert paragraphs(doc) == ["Findings | with ^ all ~ the \\ delimiters & more", "", "Non-ASCII: Zoë Ørsted 胸痛"]


def test_veterinary_mdm_reads_species_breed_and_owner():
    c = consult_input_from_mdm(vet_mdm())
    assert c.veterinary
    assert (c.patient.species.code, c.patient.species.system) == ("448771007", OID["SNOMED"])
    assert c.patient.breed.display == "Labrador Retriever"
    assert c.patient.owner.name == Name("Smith", ["John"])
    assert [t.value for t in c.patient.owner.telecom] == ["tel:+1-5555550199"]
    assert c.patient.gender.code == "M"


def test_an_ehrs_own_mdm_with_ft_lines_out_of_order_and_extra_fields(validator):
    """Hand-written ER7, as another EHR sends it: OBX in any order (OBX-1 decides), FT with \\.br\\, TXA-9
    originator, PV1-8 referring doctor and PV1-19 visit number, ISO-8859-1 declared in MSH-18."""
    segments = [
        "MSH|^~\\&|CARDIO|Cardio Associates|EHR|GHC|20260315170000||MDM^T02^MDM_T02|X1|P|2.5.1||||||8859/1",
        "EVN|T02|20260315170000",
        "PID|1||MRN9^^^GHC&2.16.840.1.113883.19.5&ISO^MR||Ærø^Åse||19800101|F|||1 Main St^^Portland^OR^97201^US"
        "||^PRN^PH^^1^555^5550123",
        "|".join(["PV1", "1", "O", "", "", "", "", "", "1234567893^Primary^Patricia^^^^^^NPI^^^^NPI"]
                 + [""] * 10 + ["V-88^^^CARDIO_VISIT"]),
        "|".join(["TXA", "1", "CN^Cardiology consult note", "TX", "20260315140000", "", "", "", "",
                  "1987654321^Heart^Henry^^^Dr^^^NPI^^^^NPI", "", "", "DOC-9^CARDIO", "", "REF-7^GHC_ORDERS~PO-1^EHR",
                  "", "", "AU"]),
        "OBX|2|FT|11488-4^Consult note^LN||Plan: echo in 3 months.\\.br\\Recheck BP.||||||F",
        "OBX|1|TX|11488-4^Consult note^LN||Assessment: stable angina, café visit.||||||F",
        "OBX|3|TX|11488-4^Consult note^LN||||||||F",
        "OBX|4|TX|11488-4^Consult note^LN||Signed \\T\\ dated||||||F",
    ]
    raw = ("\r".join(segments) + "\r").encode("latin-1")
    c = consult_input_from_mdm(raw)
    assert c.text.split("\n") == ["Assessment: stable angina, café visit.", "Plan: echo in 3 months.", "Recheck BP.",
                                  "", "Signed & dated"]
    assert c.referral_id == Identifier("", "REF-7", "GHC_ORDERS")  # the first TXA-14 repetition only
    assert c.author.ids == [Identifier(OID["NPI"], "1987654321", "NPI")]
    assert c.recipient.name == Name("Primary", ["Patricia"]) and c.recipient.ids[0].root == OID["NPI"]
    assert c.encounter_id.extension == "V-88"
    assert c.patient.names == [Name("Ærø", ["Åse"])] and c.patient.birth_time == "19800101"
    assert c.patient.addr[0].city == "Portland" and c.patient.telecom[0].value == "tel:+1-5555550123"
    assert c.title == "Consult note" and c.custodian.organization == "Cardio Associates"
    assert c.effective_time == "20260315170000"  # no TXA-6: EVN-2
    tree = build_consultation_note(c)
    _assert_valid(validator, tree)
    obs = read_consult_cda(to_bytes(tree))
    assert obs.values(REFERRAL) == ["REF-7"] and obs.problems == ()


def test_mdm_carrying_a_document_gives_none():
    ccda = to_bytes(build_consultation_note(human()))
    assert consult_input_from_mdm(mdm(None, document=ccda, media_type="text/xml")) is None
    assert consult_input_from_mdm(mdm(None, document=b"%PDF-1.4 synthetic", media_type="application/pdf")) is None


def test_without_txa12_the_document_id_comes_from_the_message_header():
    raw = edit(mdm(), "TXA", 12, "")
    a, b = consult_input_from_mdm(raw), consult_input_from_mdm(raw)
    assert a.document_id == b.document_id and a.document_id.root and not a.document_id.extension
    other = consult_input_from_mdm(edit(mdm(control_id="MDM0002"), "TXA", 12, ""))
    assert other.document_id != a.document_id


def test_preliminary_note_is_flagged():
    assert consult_input_from_mdm(mdm(completion_status="IP")).final is False


@pytest.mark.parametrize(
    "raw, segment, field, words",
    [
        (lambda: edit(mdm(), "TXA", 14, ""), "TXA", 14, "referral id"),
        (lambda: edit(mdm(), "TXA", 14, "^^1.2.3^ISO"), "TXA", 14, "referral id"),
        (lambda: edit(mdm(), "TXA", 14, "~PO-1^EHR"), "TXA", 14, "referral id"),  # a placer order is not it
        (lambda: edit(mdm(), "TXA", drop=True), "TXA", None, "no TXA"),
        (lambda: edit(mdm(), "PID", drop=True), "PID", None, "no PID"),
        (lambda: edit(mdm("only line\n"), "OBX", drop=True), "OBX", 5, "no note text"),
        (lambda: edit(mdm("x\n"), "OBX", 5, "   "), "OBX", 5, "empty"),
        (lambda: edit(mdm(), "MSH", 9, "ADT^A08^ADT_A01"), "MSH", 9, "not an MDM^T02"),
        (lambda: edit(mdm(), "MSH", 9, "MDM^T10^MDM_T02"), "MSH", 9, "MDM^T10"),
        (lambda: b"this is not HL7", "MSH", None, "not readable"),
    ],
    ids=["no-txa14", "txa14-without-id", "txa14-first-rep-empty", "no-txa", "no-pid", "no-obx", "blank-text", "adt",
         "t10", "not-hl7"],
)
def test_malformed_mdm_names_segment_and_field(raw, segment, field, words):
    with pytest.raises(MdmError) as caught:
        consult_input_from_mdm(raw())
    err = caught.value
    assert (err.segment, err.field) == (segment, field)
    prefix = f"{segment}-{field}: " if field is not None else f"{segment}: "
    assert str(err).startswith(prefix) and words in str(err)
    assert isinstance(err, ValueError)
