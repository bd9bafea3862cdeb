"""The Referral Note builder against the real CDA_SDTC.xsd and C-CDA R2.1 Schematron (errors phase).

Every document built here must pass XSD + Schematron with the document-level
rule fired (ccda.md §10.3); content is checked by XPath; the negative tests
show the validator catches a wrong template extension, a missing required
section and an XSD order error.
"""

from __future__ import annotations

import pytest
from lxml import etree

from hl7referral.cda.model import (
    OID,
    Address,
    Allergy,
    Authorization,
    Code,
    Identifier,
    Medication,
    Name,
    Party,
    Patient,
    Payer,
    Problem,
    Referral,
    Result,
    Telecom,
)
from hl7referral.cda.referral_note import (
    BuildOptions,
    REFERRAL_NOTE,
    US_REALM_HEADER,
    build_referral_note,
    ii_attrs,
    to_bytes,
    ts_value,
)
from hl7referral.cda.validate import Validator, document_rule_id

NS = {"cda": "urn:hl7-org:v3", "sdtc": "urn:hl7-org:sdtc", "xsi": "http://www.w3.org/2001/XMLSchema-instance"}
V3 = "{urn:hl7-org:v3}"
REASON_FOR_REFERRAL = "1.3.6.1.4.1.19376.1.5.3.1.3.1"
_VALIDATORS: dict = {}


@pytest.fixture
def validator(standards, tmp_path_factory) -> Validator:
    """One Validator per test session (schemas load once; the XSLT cache lives in the session tmp dir)."""
    if not (standards / "ccda-r2.1" / "ccda-r2.1.sch").is_file():
        pytest.skip(f"C-CDA standards not found under {standards}")
    if standards not in _VALIDATORS:
        _VALIDATORS[standards] = Validator(standards, cache_dir=tmp_path_factory.getbasetemp() / "xslt-cache")
    return _VALIDATORS[standards]


# --- referrals ------------------------------------------------------------------------------------


def adult() -> Referral:
    """A human adult with every section filled, an NPI-identified referring provider, payer + authorization."""
    work = [Address(["1004 Healthcare Drive"], "Portland", "OR", "99123", "US", "WP")]
    return Referral(
        referral_id=Identifier("2.16.840.1.113883.19.5.1", "REF-0001", "Good Health Clinic"),
        document_id=Identifier("1c2d8a3e-4b5f-4c6d-8e7f-901234567890"),
        created="20250301103000-0500",
        reason=Code("R07.9", OID["ICD10CM"], "Chest pain, unspecified", "ICD-10-CM"),
        reason_text="Intermittent chest pain on exertion",
        priority=Code("R", OID["ACT_PRIORITY"], "Routine"),
        requested_service=Code("183519002", OID["SNOMED"], "Referral to cardiology service", "SNOMED CT"),
        patient=Patient(
            ids=[Identifier("", "MRN12345", "GHC_MRN")],
            names=[Name("Everywoman", ["Eve", "L"])],
            gender=Code("F"),
            birth_time="19750501",
            addr=[Address(["2222 Home Street"], "Beaverton", "OR", "97867", "US", "H")],
            telecom=[Telecom("tel:+1-555-555-2003", "HP")],
            race=Code("2106-3", OID["RACE"], "White"),
            ethnicity=Code("2186-5", OID["RACE"], "Not Hispanic or Latino"),
            language="en",
            marital_status=Code("M", "2.16.840.1.113883.5.2", "Married"),
        ),
        referring=Party(
            ids=[Identifier("", "1234567893", "NPI")],
            name=Name("Primary", ["Patricia"], suffix="MD"),
            organization="Good Health Clinic",
            addr=work,
            telecom=[Telecom("tel:+1-555-555-1004", "WP")],
            specialty=Code("207Q00000X", OID["NUCC"], "Family Medicine"),
            direct_address="ppatricia@direct.goodhealth.example",
        ),
        recipient=Party(
            ids=[Identifier(OID["NPI"], "1987654321")],
            name=Name("Heart", ["Henry"], prefix="Dr."),
            organization="Cardiology Associates",
            addr=[Address(["1 Heart Way"], "Portland", "OR", "99124", "US", "WP")],
            telecom=[Telecom("tel:+1-555-555-7000", "WP")],
        ),
        custodian=Party(
            ids=[Identifier("2.16.840.1.113883.19.5")],
            organization="Good Health Clinic",
            addr=work,
            telecom=[Telecom("tel:+1-555-555-1000", "WP")],
        ),
        problems=[
            Problem(Code("I10", OID["ICD10CM"], "Essential hypertension", "ICD-10-CM"), "2015", "active"),
            Problem(Code("44054006", OID["SNOMED"], "Diabetes mellitus type 2", "SNOMED CT"), "20180301", "resolved"),
        ],
        allergies=[
            Allergy(
                Code("7980", OID["RXNORM"], "Penicillin G", "RxNorm"),
                Code("247472004", OID["SNOMED"], "Hives"),
                Code("6736007", OID["SNOMED"], "Moderate"),
                "2001",
            ),
            Allergy(Code(original_text="Peanuts"), severity=Code("24484000", OID["SNOMED"], "Severe")),
        ],
        medications=[
            Medication(
                Code("197361", OID["RXNORM"], "Amlodipine 5 MG Oral Tablet", "RxNorm"), "1 tablet daily", "20200101"
            ),
            Medication(Code(original_text="Aspirin 81 mg")),
        ],
        results=[
            Result(
                Code("2345-7", OID["LOINC"], "Glucose [Mass/volume] in Serum or Plasma", "LOINC"),
                "95",
                "PQ",
                "mg/dL",
                effective_time="20250220",
                interpretation="N",
                reference_range="70-99",
            ),
            Result(Code("2093-3", OID["LOINC"], "Cholesterol"), "210", "PQ", "mg/dL", effective_time="20250220"),
            Result(Code("8601-7", OID["LOINC"], "EKG impression"), "Normal sinus rhythm", effective_time="20250221"),
            Result(
                Code("5778-6", OID["LOINC"], "Color of Urine", "LOINC"),
                value_type="CD",
                coded_value=Code("371244009", OID["SNOMED"], "Yellow"),
                reference_range="yellow",
            ),
        ],
        plan=["Cardiology consult", "Stress test if indicated"],
        payers=[
            Payer(
                "Good Health Insurance",
                [Identifier("2.16.840.1.113883.19.7", "GHI")],
                "Gold PPO",
                "MEM123",
                "GRP9",
                Authorization("AUTH-777", "Good Health Insurance", "20250301", "20250601", "3"),
            )
        ],
    )


def empty() -> Referral:
    return Referral()


def veterinary() -> Referral:
    return Referral(
        referral_id=Identifier("", "VR-1", "VETCLINIC"),
        created="20250301",
        veterinary=True,
        reason_text="Lameness right hind leg",
        patient=Patient(
            ids=[Identifier("", "P-77", "VETCLINIC")],
            names=[Name("Smith", ["Rex"])],
            gender=Code("M"),
            birth_time="2019",
            species=Code("448771007", OID["SNOMED"], "Canis lupus subsp. familiaris (organism)", "SNOMED CT"),
            breed=Code(original_text="Labrador Retriever"),
            owner=Party(
                name=Name("Smith", ["John"]),
                telecom=[Telecom("+1 555 555 0199", "HP")],
                relationship=Code("OWN", OID["HL70063"], "Owner"),
            ),
        ),
        referring=Party(ids=[Identifier("", "V123", "STATE_VET_LICENSE")], name=Name("Vet", ["Val"])),
        recipient=Party(name=Name("Ortho", ["Olga"]), organization="Animal Orthopedics"),
    )


def non_latin() -> Referral:
    r = adult()
    r.patient.names = [Name("Ørsted", ["Zoë"])]
    r.recipient.name = Name("王", ["小明"])
    r.reason_text = "胸痛 — Brustschmerz"
    return r


REFERRALS = {"adult": adult, "empty": empty, "veterinary": veterinary, "non_latin": non_latin}


def xp(tree, path: str):
    return tree.xpath(path, namespaces=NS)


# --- validity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(REFERRALS))
def test_document_passes_xsd_schematron_and_template_check(validator, kind):
    report = validator.validate(build_referral_note(REFERRALS[kind]()))
    assert report.ok, "\n".join(report.lines())
    assert report.known == []
    assert document_rule_id(REFERRAL_NOTE) in report.fired_rules
    assert document_rule_id(US_REALM_HEADER) in report.fired_rules
    assert document_rule_id((REASON_FOR_REFERRAL, "2014-06-09")) in report.fired_rules


def test_adult_entries_are_checked_by_their_rules(validator):
    report = validator.validate(build_referral_note(adult()))
    for rule in (
        "r-urn-oid-2.16.840.1.113883.10.20.22.4.140-errors",  # Referral Act
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.3-2015-08-01-errors",  # Problem Concern Act
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.4-2015-08-01-errors",  # Problem Observation
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.30-2015-08-01-errors",  # Allergy Concern Act
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.7-2014-06-09-errors",  # Allergy - Intolerance Observation
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.9-2014-06-09-errors",  # Reaction
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.8-2014-06-09-errors",  # Severity
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.16-2014-06-09-errors",  # Medication Activity
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.1-2015-08-01-errors",  # Result Organizer
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.2-2015-08-01-errors",  # Result Observation
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.60-2015-08-01-errors",  # Coverage Activity
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.61-2015-08-01-errors",  # Policy Activity
        "r-urn-oid-2.16.840.1.113883.10.20.1.19-errors",  # Authorization Activity
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.4.19-2014-06-09-errors",  # Indication
        "r-urn-hl7ii-2.16.840.1.113883.10.20.22.1.14-2015-08-01-31647-branch-31647-errors",  # CALLBCK
    ):
        assert rule in report.fired_rules, rule


# --- content --------------------------------------------------------------------------------------


def test_adult_header_and_referral_content():
    r = adult()
    tree = build_referral_note(r)
    doc = tree.getroot()
    assert xp(doc, "cda:code/@code") == ["57133-1"]
    assert [(t.get("root"), t.get("extension")) for t in xp(doc, "cda:templateId")] == [
        (US_REALM_HEADER[0], None),
        US_REALM_HEADER,
        REFERRAL_NOTE,
    ]

    # Patient: a namespace-only MRN keeps its namespace name and gets a local root of its own.
    (pid,) = xp(doc, "cda:recordTarget/cda:patientRole/cda:id")
    assert pid.get("extension") == "MRN12345"
    assert pid.get("assigningAuthorityName") == "GHC_MRN"
    assert pid.get("root").startswith(BuildOptions().local_root + ".")
    patient = "cda:recordTarget/cda:patientRole/cda:patient"
    assert xp(doc, f"{patient}/cda:name/cda:given/text()") == ["Eve", "L"]
    assert xp(doc, f"{patient}/cda:name/cda:family/text()") == ["Everywoman"]
    assert xp(doc, f"{patient}/cda:administrativeGenderCode/@code") == ["F"]

    # The referral id in the Referral Act is exactly the model's.
    (act,) = xp(doc, "//cda:act[cda:templateId/@root='2.16.840.1.113883.10.20.22.4.140']")
    (act_id,) = xp(act, "cda:id")
    assert (act_id.get("root"), act_id.get("extension")) == (r.referral_id.root, r.referral_id.extension)
    assert xp(act, "cda:code/@code") == ["44383000"]  # default Referral Type
    assert xp(act, "cda:priorityCode/@code") == ["R"]
    assert xp(act, "cda:entryRelationship[@typeCode='RSON']/cda:observation/cda:value/@code") == ["R07.9"]
    assert xp(act, "cda:entryRelationship[@typeCode='SUBJ']/cda:observation/cda:value/@code") == ["183519002"]
    assert xp(act, "cda:participant[@typeCode='REFT']/cda:participantRole/cda:id/@extension") == ["1987654321"]
    assert xp(act, "cda:text/cda:reference/@value") == ["#rfr-reason"]
    assert "Intermittent chest pain" in xp(doc, "string(//cda:td[@ID='rfr-reason'])")

    # Referring provider: author with the NPI root, and the call-back contact with their phone.
    npi = "2.16.840.1.113883.4.6"
    assert xp(doc, "cda:author/cda:assignedAuthor/cda:id/@root") == [npi]
    assert xp(doc, "cda:author/cda:assignedAuthor/cda:id/@extension") == ["1234567893"]
    callback = "cda:participant[@typeCode='CALLBCK']/cda:associatedEntity[@classCode='ASSIGNED']"
    assert xp(doc, f"{callback}/cda:id/@root") == [npi]
    assert "tel:+1-555-555-1004" in xp(doc, f"{callback}/cda:telecom/@value")
    assert "mailto:ppatricia@direct.goodhealth.example" in xp(doc, f"{callback}/cda:telecom/@value")
    assert xp(doc, f"{callback}/cda:associatedPerson/cda:name/cda:family/text()") == ["Primary"]

    # The referred-to clinician.
    recipient = "cda:informationRecipient/cda:intendedRecipient"
    assert xp(doc, f"{recipient}/cda:informationRecipient/cda:name/cda:family/text()") == ["Heart"]
    assert xp(doc, f"{recipient}/cda:informationRecipient/cda:name/cda:given/text()") == ["Henry"]
    assert xp(doc, f"{recipient}/cda:receivedOrganization/cda:name/text()") == ["Cardiology Associates"]
    assert xp(doc, "cda:custodian//cda:representedCustodianOrganization/cda:name/text()") == ["Good Health Clinic"]


def test_adult_entries_content():
    doc = build_referral_note(adult()).getroot()
    problem_values = xp(doc, "//cda:observation[cda:templateId/@root='2.16.840.1.113883.10.20.22.4.4']/cda:value")
    assert [(v.get("code"), v.get("codeSystem")) for v in problem_values] == [
        ("I10", OID["ICD10CM"]),
        ("44054006", OID["SNOMED"]),
    ]
    assert all(v.get("{%s}type" % NS["xsi"]) == "CD" for v in problem_values)
    concern = "//cda:act[cda:templateId/@root='2.16.840.1.113883.10.20.22.4.3']"
    assert xp(doc, f"{concern}/cda:statusCode/@code") == ["active", "completed"]

    allergen = xp(doc, "//cda:participant[@typeCode='CSM']//cda:playingEntity/cda:code")
    assert allergen[0].get("code") == "7980"
    assert allergen[1].get("nullFlavor") == "OTH"  # text only: "Peanuts"
    assert xp(allergen[1], "cda:originalText/cda:reference/@value") == ["#alg-2"]

    values = xp(doc, "//cda:observation[cda:templateId/@root='2.16.840.1.113883.10.20.22.4.2']/cda:value")
    assert [(v.get("{%s}type" % NS["xsi"]), v.get("value"), v.get("unit")) for v in values[:3]] == [
        ("PQ", "95", "mg/dL"),
        ("PQ", "210", "mg/dL"),
        ("ST", None, None),
    ]
    assert values[2].text == "Normal sinus rhythm"
    assert values[3].get("code") == "371244009"

    auth = "//cda:act[cda:templateId/@root='2.16.840.1.113883.10.20.1.19']"
    assert xp(doc, f"{auth}/cda:id/@extension") == ["AUTH-777"]
    assert xp(doc, f"{auth}//cda:act[@moodCode='PRMS']/cda:effectiveTime/cda:high/@value") == ["20250601"]
    assert xp(doc, "//cda:participant[@typeCode='COV']//cda:id/@extension") == ["MEM123"]


def test_narrative_tables_and_references_resolve():
    doc = build_referral_note(adult()).getroot()
    for section in xp(doc, "//cda:section[not(@nullFlavor)]"):
        title = section.findtext(V3 + "title")
        tables = xp(section, "cda:text/cda:table")
        if title == "Plan of Treatment":
            items = xp(section, "cda:text/cda:list/cda:item/text()")
            assert items == ["Cardiology consult", "Stress test if indicated"]
            continue
        assert tables, title
        for table in tables:
            assert xp(table, "cda:thead/cda:tr/cda:th"), title
            assert xp(table, "cda:tbody/cda:tr/cda:td"), title
    ids = set(xp(doc, "//@ID"))
    references = xp(doc, "//cda:reference/@value")
    assert references and all(ref.startswith("#") and ref[1:] in ids for ref in references)
    assert len(ids) == len(xp(doc, "//@ID"))  # unique


def test_empty_referral_gets_no_information_sections():
    doc = build_referral_note(empty()).getroot()
    sections = xp(doc, "cda:component/cda:structuredBody/cda:component/cda:section")
    assert len(sections) == 8
    for section in sections:
        assert section.get("nullFlavor") == "NI"
        assert section.findtext(V3 + "text") == "No information"
        assert section.find(V3 + "entry") is None
    required = ["42349-1", "11450-4", "48765-2", "10160-0", "51848-0", "18776-5"]
    assert set(required) <= set(xp(doc, "//cda:section/cda:code/@code"))
    patient = "cda:recordTarget/cda:patientRole"
    for path in (
        "cda:id",
        "cda:addr",
        "cda:telecom",
        "cda:patient/cda:name",
        "cda:patient/cda:birthTime",
        "cda:patient/cda:administrativeGenderCode",
        "cda:patient/cda:raceCode",
    ):
        assert xp(doc, f"{patient}/{path}/@nullFlavor") == ["UNK"], path
    assert xp(doc, "cda:participant") == []  # no call-back contact made up from nothing


def test_veterinary_species_and_owner():
    tree = build_referral_note(veterinary())
    doc = tree.getroot()
    patient = "cda:recordTarget/cda:patientRole/cda:patient"
    assert xp(doc, f"{patient}/cda:name/cda:given/text()") == ["Rex"]
    desc = xp(doc, f"string({patient}/sdtc:desc)")
    assert "Canis lupus subsp. familiaris" in desc and "Labrador Retriever" in desc
    assert xp(doc, f"{patient}/cda:raceCode/@nullFlavor") == ["NA"]

    owner = "cda:participant[@typeCode='IND']/cda:associatedEntity"
    assert xp(doc, f"{owner}/@classCode") == ["PRS"]
    assert xp(doc, f"{owner}/cda:associatedPerson/cda:name/cda:given/text()") == ["John"]
    assert xp(doc, f"{owner}/cda:telecom/@value") == ["tel:+15555550199"]
    assert xp(doc, f"{owner}/cda:code/@code") == ["OWN"]

    reason = xp(doc, f"//cda:section[cda:templateId/@root='{REASON_FOR_REFERRAL}']")[0]
    narrative = etree.tostring(reason.find(V3 + "text"), method="text", encoding="unicode")
    assert "John Smith" in narrative and "Labrador Retriever" in narrative
    species = xp(reason, "cda:entry/cda:observation[cda:text/cda:reference/@value='#pt-species']/cda:value")
    assert [(v.get("code"), v.get("codeSystem")) for v in species] == [("448771007", OID["SNOMED"])]
    assert xp(reason, "cda:entry/cda:act/cda:id/@extension") == ["VR-1"]


def test_non_latin_names_survive_utf8():
    data = to_bytes(build_referral_note(non_latin()))
    assert data.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")
    for text in ("Zoë", "Ørsted", "王", "小明", "胸痛"):
        assert text.encode("utf-8") in data, text
    assert b"&#" not in data  # not character references: real UTF-8
    doc = etree.fromstring(data)
    assert xp(doc, "cda:recordTarget//cda:patient/cda:name/cda:family/text()") == ["Ørsted"]
    assert xp(doc, "cda:informationRecipient//cda:informationRecipient/cda:name/cda:given/text()") == ["小明"]


def test_markup_and_control_characters_in_data(validator):
    r = adult()
    r.patient.names = [Name("O'Brien <b>&amp;</b>", ["Bell\x07e"])]
    r.plan = ["]]> & <script>"]
    tree = build_referral_note(r)
    assert validator.schema.validate(tree)
    doc = etree.fromstring(to_bytes(tree))
    assert xp(doc, "cda:recordTarget//cda:patient/cda:name/cda:family/text()") == ["O'Brien <b>&amp;</b>"]
    assert xp(doc, "cda:recordTarget//cda:patient/cda:name/cda:given/text()") == ["Belle"]
    assert xp(doc, "//cda:list/cda:item/text()") == ["]]> & <script>"]


def test_a_specialty_that_is_not_a_code_is_left_out_of_the_author_not_made_invalid(validator):
    """A taxonomy "code" with inner spaces cannot be a cs token: the author's code SHALL have @code
    (CONF:1198-16788), so it is left out there; the call-back contact keeps it as text (OTH)."""
    r = adult()
    r.referring.specialty = Code("207Q 00000X", OID["NUCC"], "Family Medicine")
    tree = build_referral_note(r)
    report = validator.validate(tree)
    assert report.ok, "\n".join(report.lines())
    doc = etree.fromstring(to_bytes(tree))
    assert xp(doc, "cda:author/cda:assignedAuthor/cda:code") == []
    assert xp(doc, "cda:participant/cda:associatedEntity/cda:code/@nullFlavor") == ["OTH"]


def test_same_referral_same_bytes():
    assert to_bytes(build_referral_note(adult())) == to_bytes(build_referral_note(adult()))


def test_template_skeletons_hold_constants_only():
    """The skeletons parsed once and copied into every document (``_Proto``, ``nv.Columns``) never change and
    never take document data: nothing of one patient's document can reach the next one. That holds for the
    skeletons made on first use too (one per shape of a name, an address, a result…; whole tables)."""
    from hl7referral.cda import narrative as nv
    from hl7referral.cda import referral_note as rn

    def skeletons() -> dict[str, bytes]:
        found = {}
        for name, value in vars(rn).items():
            for key, item in (value.items() if isinstance(value, dict) else [("", value)]):
                if isinstance(item, rn._Proto):
                    for form, proto in (("", item), ("empty", item.empty), ("with_text", item.with_text)):
                        if proto is not None:
                            found[f"{name}{key}{form}"] = etree.tostring(proto.root)
                elif isinstance(item, nv.Columns):
                    found[name] = etree.tostring(item._table) + etree.tostring(item._row)
                    for rows, table in item._tables.items():
                        found[f"{name}{rows}"] = etree.tostring(table)
        return found

    before = skeletons()
    assert len(before) > 20
    for make in REFERRALS.values():
        build_referral_note(make())
    build_referral_note(adult(), BuildOptions(title="Other title", language="de-DE", confidentiality="R"))
    after = skeletons()
    assert {name: after[name] for name in before} == before  # and new ones for shapes not seen before
    kept = b"".join(after.values()).decode()
    for data in ("Everywoman", "MRN12345", "REF-0001", "Rex", "Chest pain", "Other title", "de-DE", "1c2d8a3e",
                 "Penicillin", "Glucose", "Portland", "Patricia", "Good Health"):
        assert data not in kept


def test_a_cell_has_its_id_only_while_it_has_text_table_after_table():
    """Whole tables are copied from skeletons that hold the cells' IDs: a blank cell must not keep one."""
    from hl7referral.cda import narrative as nv

    columns = nv.Columns("A", "B")
    cells = []
    for rows in ([[nv.Cell("x", "a1"), nv.Cell("", "b1")]], [[nv.Cell("", "a1"), nv.Cell("y", "b1")]],
                 [[nv.Cell("x", "a1"), nv.Cell("", "b1")], ["", nv.Cell("z", "b2")]]):
        parent = etree.Element(V3 + "text")
        nv.table(parent, columns, rows)
        cells.append([(td.text, td.get("ID")) for td in parent.iter(V3 + "td")])
    assert cells == [[("x", "a1"), (None, None)], [(None, None), ("y", "b1")],
                     [("x", "a1"), (None, None), (None, None), ("z", "b2")]]


def test_names_and_addresses_of_any_shape_keep_every_part(validator):
    """Names and addresses are copied from a skeleton per shape; unusual ones are built part by part."""
    r = adult()
    r.patient.names = [Name("Many", ["A", "B", "C", "D", "E", "F"], "Dr", "Jr"), Name("", ["Solo"])]
    r.patient.addr = [Address(["1 A St", "Unit 2", "Floor 3", "Wing 4", "Door 5"], "Lyon", "", "69001", "FR", "HP"),
                      Address(["9 B St"])]
    tree = build_referral_note(r)
    assert validator.schema.validate(tree)
    pt = "cda:recordTarget/cda:patientRole"
    names = xp(tree, f"{pt}/cda:patient/cda:name")
    assert [[(part.tag[len(V3):], part.text, part.get("nullFlavor")) for part in name] for name in names] == [
        [("prefix", "Dr", None), *[("given", g, None) for g in "ABCDEF"], ("family", "Many", None),
         ("suffix", "Jr", None)],
        [("given", "Solo", None), ("family", None, "UNK")],
    ]
    addrs = xp(tree, f"{pt}/cda:addr")
    assert [(a.get("use"), [(part.tag[len(V3):], part.text, part.get("nullFlavor")) for part in a]) for a in addrs] == [
        ("HP", [("streetAddressLine", "1 A St", None), ("streetAddressLine", "Unit 2", None),
                ("streetAddressLine", "Floor 3", None), ("streetAddressLine", "Wing 4", None),
                ("city", "Lyon", None), ("postalCode", "69001", None), ("country", "FR", None)]),
        ("H", [("streetAddressLine", "9 B St", None), ("city", None, "UNK"), ("state", None, "UNK"),
               ("postalCode", None, "UNK")]),
    ]


# --- negative: the validator catches what the Schematron alone would not ----------------------------


def test_wrong_referral_template_extension_is_reported(validator):
    tree = build_referral_note(adult())
    (tid,) = xp(tree, f"/cda:ClinicalDocument/cda:templateId[@root='{REFERRAL_NOTE[0]}']")
    tid.set("extension", "2014-06-09")
    report = validator.validate(tree)
    assert not report.ok
    rules = {f.rule for f in report.of_kind("template")}
    assert rules == {"template-declared", "template-rule-fired"}
    assert document_rule_id(REFERRAL_NOTE) not in report.fired_rules
    assert all(f.line for f in report.of_kind("template"))


def test_missing_reason_for_referral_section_fails_schematron(validator):
    tree = build_referral_note(adult())
    (section,) = xp(tree, f"//cda:section[cda:templateId/@root='{REASON_FOR_REFERRAL}']")
    component = section.getparent()
    component.getparent().remove(component)
    report = validator.validate(tree)
    assert not report.ok
    findings = report.of_kind("schematron")
    assert "a-1198-30924" in {f.rule for f in findings}
    assert all(f.rule.startswith("a-") and f.location and f.line for f in findings)
    assert any(line.startswith("<document>:2: a-1198-30924: ") for line in report.lines())


def test_element_out_of_order_is_an_xsd_finding_with_line(validator):
    tree = build_referral_note(adult())
    doc = tree.getroot()
    doc.find(V3 + "code").addprevious(doc.find(V3 + "title"))
    report = validator.validate(tree, schematron=False)
    xsd = report.of_kind("xsd")
    assert xsd and report.findings[0].kind == "xsd"
    assert "title" in xsd[0].text
    lines = to_bytes(tree).decode("utf-8").splitlines()
    assert "<title>" in lines[xsd[0].line - 1]


# --- datatypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ident, expected",
    [
        (Identifier("2.16.840.1.113883.19.5", "42"), {"root": "2.16.840.1.113883.19.5", "extension": "42"}),
        (
            Identifier("", "1234567893", "NPI"),
            {"root": OID["NPI"], "extension": "1234567893", "assigningAuthorityName": "NPI"},
        ),
        (Identifier("", "7", ""), {"root": "1.2.3", "extension": "7"}),
    ],
)
def test_identifier_roots(ident, expected):
    assert ii_attrs(ident, "1.2.3") == expected


def test_namespace_only_identifiers_get_distinct_stable_roots():
    a = ii_attrs(Identifier("", "7", "HOSP_A"), "1.2.3")
    b = ii_attrs(Identifier("", "7", "HOSP_B"), "1.2.3")
    invalid_root = ii_attrs(Identifier("HOSP_A", "7"), "1.2.3")  # a name in the root field is a namespace too
    assert a["root"] != b["root"] and a["root"].startswith("1.2.3.")
    assert a == ii_attrs(Identifier("", "7", "HOSP_A"), "1.2.3") == invalid_root
    assert a["assigningAuthorityName"] == "HOSP_A"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("20250301103000-0500", "20250301103000-0500"),
        ("20250301103000.1234+0100", "20250301103000.1234+0100"),
        ("202503011030.5", "202503011030"),  # fraction only after seconds
        ("20250301-0500", "20250301"),  # no zone on a date (CDA_SDTC.xsd ts pattern)
        ("2025", "2025"),
        ("2025-03-01", ""),
        ("", ""),
    ],
)
def test_ts_value(value, expected):
    assert ts_value(value) == expected


def test_sloppy_model_values_still_give_a_valid_document(validator):
    """What a mapping may pass through unnormalised never makes the document invalid."""
    r = adult()
    r.created = "2025-03-01T10:30"  # not an HL7 TS: nullFlavor
    r.patient.birth_time = "19750501-0500"  # zone on a date: the schema has no such form
    r.patient.gender = Code("female")
    r.patient.language = "en US"
    r.patient.telecom = [Telecom("(555) 555-2003", "PRN"), Telecom("eve@example.org", "")]
    r.patient.addr = [Address(["1 Main St"], "Lyon", "", "69001", "FR", "HOME")]
    r.problems = [Problem(Code("R07 .9", "I10", "Chest pain"), "yesterday")]
    r.allergies = [Allergy(Code("7980", "RXNORM", "Penicillin G"))]
    r.results = [
        Result(Code("2345-7", "LN", "Glucose"), "<5", "PQ", "mg / dL", interpretation="very high"),
        Result(Code("2093-3", "LN", "Cholesterol"), "210", "PQ", "mg / dL", reference_range="<200"),
    ]
    tree = build_referral_note(r)
    report = validator.validate(tree)
    assert report.ok, "\n".join(report.lines())
    doc = tree.getroot()
    telecoms = xp(doc, "cda:recordTarget/cda:patientRole/cda:telecom/@value")
    assert telecoms == ["tel:5555552003", "mailto:eve@example.org"]
    problem = xp(doc, "//cda:observation[cda:templateId/@root='2.16.840.1.113883.10.20.22.4.4']/cda:value")[0]
    assert problem.get("nullFlavor") == "OTH" and problem.get("code") is None
    assert xp(doc, "//cda:playingEntity/cda:code/@codeSystem") == [OID["RXNORM"]]
    values = xp(doc, "//cda:observation[cda:templateId/@root='2.16.840.1.113883.10.20.22.4.2']/cda:value")
    assert values[0].text == "<5 mg / dL" and values[1].get("unit") == "mg/dL"
    result_codes = "//cda:observation[cda:templateId/@root='2.16.840.1.113883.10.20.22.4.2']/cda:code/@codeSystem"
    assert xp(doc, result_codes) == [OID["LOINC"], OID["LOINC"]]


def test_uuid5_matches_the_standard_library():
    import uuid

    from hl7referral.cda.referral_note import uuid5

    ns = uuid.uuid4()
    for name in ("problem-1", "Zoë", ""):
        assert uuid5(ns.bytes, name) == str(uuid.uuid5(ns, name))
