"""IHE XDM packages: what build_xdm writes, what read_xdm accepts, and what it refuses.

The UUIDs below are written out again on purpose rather than imported from the module: a wrong constant
in hl7referral.direct.xdm must fail here, not be compared with itself.
"""

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from lxml import etree

from hl7referral.direct.xdm import (
    Code,
    SubmissionSet,
    XdmDocument,
    XdmError,
    build_xdm,
    read_xdm,
    referral_parts,
)

ROOT = Path(__file__).resolve().parents[1]
ORDER = (ROOT / "samples" / "omg-o19.hl7").read_bytes()
CCDA_PATH = Path("/work/shared/standards/examples/C-CDA-Examples/Referral_Note.xml")
CCDA = CCDA_PATH.read_bytes() if CCDA_PATH.exists() else None
needs_ccda = pytest.mark.skipif(CCDA is None, reason="shared C-CDA example not present")

RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
NS = {"rim": RIM, "lcm": LCM}
# ITI TF-3 4.2.5 (checked against NIST toolkit MetadataSupport, NEHTA XDSConstants, Direct RI xd-common)
DOCUMENT_ENTRY = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
SS_LIMITED = "urn:uuid:5003a9db-8d8d-49e6-bf0c-990e34ac7707"
DE_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
DE_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
DE_CLASS = "urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a"
DE_TYPE = "urn:uuid:f0306f51-975f-434e-a61c-c59651d33983"
DE_FORMAT = "urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
DE_CONF = "urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f"
SS_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SS_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
SS_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"

PATIENT = "SMRN0004^^^&1.3.6.1.4.1.99999.1.5&ISO"
LOINC = "2.16.840.1.113883.6.1"


def submission(**kw):
    values = dict(
        unique_id="1.3.6.1.4.1.99999.1.77.1",
        source_id="1.3.6.1.4.1.99999.1",
        submission_time="20261122090300-0500",
        patient_id=PATIENT,
        intended_recipients=["cardiology@direct.example.org"],
        author_institution="Springfield Family Practice^^^^^^^^^1.3.6.1.4.1.99999.1",
        author_person="^Allen^Anthony^^^Dr^MD",
        content_type_code=Code("57133-1", LOINC, "Referral note"),
        title="Referral",
    )
    values.update(kw)
    return SubmissionSet(**values)


def documents():
    return [
        XdmDocument(
            filename="DOC0001.XML", content=CCDA, mime_type="text/xml", title="Referral Note",
            unique_id="1.3.6.1.4.1.99999.1.78.1", class_code=Code("57133-1", LOINC, "Referral note"),
            type_code=Code("57133-1", LOINC, "Referral note"),
            format_code=Code("urn:hl7-org:sdwg:ccda-structuredBody:2.1", "1.3.6.1.4.1.19376.1.2.3", "C-CDA R2.1"),
            creation_time="20261122085900-0500",
        ),
        XdmDocument(
            filename="DOC0002.HL7", content=ORDER, mime_type="x-application/hl7-v2+er7", title="Referral order",
            unique_id="1.3.6.1.4.1.99999.1.78.2", class_code=Code("57133-1", LOINC, "Referral note"),
            type_code=Code("57133-1", LOINC, "Referral note"),
            format_code=Code("urn:ihe:iti:xds:2017:mimeTypeSufficient", "1.3.6.1.4.1.19376.1.2.3", "mimeType"),
        ),
    ]


def metadata_of(data, path="IHE_XDM/SUBSET01/METADATA.XML"):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return etree.fromstring(zf.read(path))


def slot(el, name):
    return [v.text for v in el.findall(f"rim:Slot[@name='{name}']/rim:ValueList/rim:Value", NS)]


def zip_of(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            # ZipInfo as given keeps odd names (../, C:\\) that ZipFile.write would clean up
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------------------------------


@needs_ccda
def test_build_writes_exactly_the_xdm_layout():
    data = build_xdm(submission(), documents())
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == sorted([
            "README.TXT", "INDEX.HTM", "IHE_XDM/SUBSET01/METADATA.XML",
            "IHE_XDM/SUBSET01/DOC0001.XML", "IHE_XDM/SUBSET01/DOC0002.HL7",
        ])
        assert zf.read("IHE_XDM/SUBSET01/DOC0001.XML") == CCDA
        assert zf.read("IHE_XDM/SUBSET01/DOC0002.HL7") == ORDER
        index = zf.read("INDEX.HTM").decode()
        assert 'href="IHE_XDM/SUBSET01/DOC0001.XML"' in index and 'href="IHE_XDM/SUBSET01/DOC0002.HL7"' in index
        # the index and readme name no patient
        for name in ("INDEX.HTM", "README.TXT"):
            text = zf.read(name).decode()
            assert "SMRN0004" not in text and "Sample" not in text


@needs_ccda
def test_metadata_has_submission_set_entries_hashes_and_associations():
    data = build_xdm(submission(), documents())
    root = metadata_of(data)
    assert root.tag == f"{{{LCM}}}SubmitObjectsRequest"
    rol = root.find("rim:RegistryObjectList", NS)
    packages = rol.findall("rim:RegistryPackage", NS)
    assert len(packages) == 1
    ss = packages[0]
    ss_id = ss.get("id")
    assert ss_id.startswith("urn:uuid:")
    node = [c for c in rol.findall("rim:Classification", NS) if c.get("classificationNode") == SUBMISSION_SET]
    assert [c.get("classifiedObject") for c in node] == [ss_id]
    # -0500 → UTC: XDS times are UTC
    assert slot(ss, "submissionTime") == ["20261122140300"]
    assert slot(ss, "intendedRecipient") == ["^^Internet^cardiology@direct.example.org"]
    ss_ids = {e.get("identificationScheme"): e.get("value") for e in ss.findall("rim:ExternalIdentifier", NS)}
    assert ss_ids == {SS_UNIQUE_ID: "1.3.6.1.4.1.99999.1.77.1", SS_SOURCE_ID: "1.3.6.1.4.1.99999.1",
                      SS_PATIENT_ID: PATIENT}

    entries = rol.findall("rim:ExtrinsicObject", NS)
    assert len(entries) == 2
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for eo, doc in zip(entries, documents()):
            assert eo.get("objectType") == DOCUMENT_ENTRY
            assert eo.get("mimeType") == doc.mime_type
            assert eo.get("id").startswith("urn:uuid:")
            (uri,) = slot(eo, "URI")
            stored = zf.read(f"IHE_XDM/SUBSET01/{uri}")
            assert slot(eo, "hash") == [hashlib.sha1(stored).hexdigest()]
            assert slot(eo, "size") == [str(len(stored))]
            assert slot(eo, "sourcePatientId") == [PATIENT]
            assert slot(eo, "languageCode") == ["en-US"]
            cls = {c.get("classificationScheme"): c for c in eo.findall("rim:Classification", NS)}
            assert cls[DE_CLASS].get("nodeRepresentation") == "57133-1"
            assert slot(cls[DE_CLASS], "codingScheme") == [LOINC]
            assert cls[DE_TYPE].get("nodeRepresentation") == "57133-1"
            assert cls[DE_FORMAT].get("nodeRepresentation") == doc.format_code.code
            assert cls[DE_CONF].get("nodeRepresentation") == "N"
            assert all(c.get("classifiedObject") == eo.get("id") for c in cls.values())
            eis = {e.get("identificationScheme"): e.get("value") for e in eo.findall("rim:ExternalIdentifier", NS)}
            assert eis == {DE_PATIENT_ID: PATIENT, DE_UNIQUE_ID: doc.unique_id}
    assert slot(entries[0], "creationTime") == ["20261122135900"]
    assert slot(entries[1], "creationTime") == ["20261122140300"]  # defaults to the submission time

    links = {(a.get("sourceObject"), a.get("targetObject")) for a in rol.findall("rim:Association", NS)
             if a.get("associationType") == HAS_MEMBER}
    assert links == {(ss_id, eo.get("id")) for eo in entries}


@needs_ccda
def test_build_is_deterministic_and_depends_on_the_inputs():
    first = build_xdm(submission(), documents())
    assert build_xdm(submission(), documents()) == first
    changed = documents()
    changed[1].content = ORDER.replace(b"990001", b"990002")
    assert build_xdm(submission(), changed) != first
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        assert {i.date_time for i in zf.infolist()} == {(2026, 11, 22, 14, 3, 0)}


@pytest.mark.parametrize("name", ["../DOC.XML", "doc0001.xml", "SUB/DOC.XML", "LONGNAME01.XML", "METADATA.XML"])
def test_build_refuses_names_that_are_not_8_3(name):
    with pytest.raises(XdmError):
        build_xdm(submission(), [XdmDocument(filename=name, content=ORDER, mime_type="x-application/hl7-v2+er7")])


def test_build_refuses_duplicates_and_empty():
    doc = XdmDocument(filename="DOC1.HL7", content=ORDER, mime_type="x-application/hl7-v2+er7")
    with pytest.raises(XdmError, match="twice"):
        build_xdm(submission(), [doc, doc])
    with pytest.raises(XdmError):
        build_xdm(submission(), [])
    with pytest.raises(XdmError, match="DTM"):
        build_xdm(submission(submission_time="yesterday"), [doc])


# --------------------------------------------------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------------------------------------------------


@needs_ccda
def test_round_trip_keeps_documents_and_metadata():
    sent = documents()
    pkg = read_xdm(build_xdm(submission(), sent))
    assert pkg.metadata == "full"
    assert pkg.warnings == []
    assert [(d.filename, d.content, d.mime_type, d.title, d.unique_id) for d in pkg.documents] == [
        (d.filename, d.content, d.mime_type, d.title, d.unique_id) for d in sent
    ]
    for got, want in zip(pkg.documents, sent):
        assert (got.class_code, got.type_code, got.format_code) == (want.class_code, want.type_code, want.format_code)
        assert got.hash == hashlib.sha1(want.content).hexdigest() and got.size == len(want.content)
        assert got.source_patient_id == PATIENT
        assert got.author_institution == submission().author_institution
    sub = pkg.submission
    assert (sub.unique_id, sub.source_id, sub.patient_id) == ("1.3.6.1.4.1.99999.1.77.1", "1.3.6.1.4.1.99999.1",
                                                              PATIENT)
    assert sub.intended_recipients == ["cardiology@direct.example.org"]
    assert sub.submission_time == "20261122140300"
    assert sub.content_type_code == Code("57133-1", LOINC, "Referral note")
    parts = referral_parts(pkg)
    assert parts.ccda.content == CCDA and parts.order.content == ORDER


LIMITED_METADATA = b"""<?xml version="1.0" encoding="UTF-8"?>
<SubmitObjectsRequest xmlns="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
    xmlns:r="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">
 <r:RegistryObjectList>
  <r:ExtrinsicObject id="Doc1" mimeType="text/xml" objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">
   <r:Slot name="URI"><r:ValueList><r:Value>CCDA.XML</r:Value></r:ValueList></r:Slot>
   <r:Classification classifiedObject="Doc1" classificationNode="urn:uuid:ab9b591b-83ab-4d03-8f5d-f93b1fb92e85"
       id="c1"/>
   <r:ExternalIdentifier identificationScheme="urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab" value="2.25.1"
       id="e1" registryObject="Doc1"/>
  </r:ExtrinsicObject>
  <r:ExtrinsicObject id="Doc2" mimeType="text/plain" objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">
   <r:Slot name="hash"><r:ValueList><r:Value>%(order_hash)s</r:Value></r:ValueList></r:Slot>
  </r:ExtrinsicObject>
  <r:RegistryPackage id="SS1">
   <r:Slot name="submissionTime"><r:ValueList><r:Value>20261122</r:Value></r:ValueList></r:Slot>
   <r:Slot name="intendedRecipient"><r:ValueList>
     <r:Value>Spec Group^^^^^^^^^1.2.3|^Doe^Jane|^^Internet^jane@direct.example.org</r:Value>
   </r:ValueList></r:Slot>
   <r:ExternalIdentifier identificationScheme="urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8" value="2.25.9"
       id="e2" registryObject="SS1"/>
  </r:RegistryPackage>
  <r:Classification classifiedObject="SS1" classificationNode="urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"
      id="c2"/>
  <r:Classification classifiedObject="SS1" classificationNode="urn:uuid:5003a9db-8d8d-49e6-bf0c-990e34ac7707"
      id="c3"/>
  <r:Association associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember" id="a1"
      sourceObject="SS1" targetObject="Doc1"/>
  <r:Association associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember" id="a2"
      sourceObject="SS1" targetObject="Doc2"/>
 </r:RegistryObjectList>
</SubmitObjectsRequest>
"""


DE_LABEL = (
    b"""   <r:Classification classifiedObject="Doc1" """
    b"""classificationNode="urn:uuid:ab9b591b-83ab-4d03-8f5d-f93b1fb92e85"
       id="c1"/>
"""
)
SS_LABEL = (
    b"""  <r:Classification classifiedObject="SS1" """
    b"""classificationNode="urn:uuid:5003a9db-8d8d-49e6-bf0c-990e34ac7707"
      id="c3"/>
"""
)


@needs_ccda
@pytest.mark.parametrize("drop", [b"", DE_LABEL, SS_LABEL], ids=["both-labels", "ss-label-only", "de-label-only"])
def test_reads_a_limited_metadata_package_from_another_vendor(drop):
    # Another vendor: own subset folder name, lower-case names, default-namespace lcm, 'r:' prefix, no hash
    # for the C-CDA, no URI for the order (found by its hash), nothing but a bare order file name.
    # Either label alone (submission set or document entry) makes the package "limited".
    assert DE_LABEL in LIMITED_METADATA and SS_LABEL in LIMITED_METADATA
    meta = LIMITED_METADATA.replace(drop, b"") % {b"order_hash": hashlib.sha1(ORDER).hexdigest().encode()}
    data = zip_of({
        "readme.txt": b"hello", "index.htm": b"<html/>",
        "ihe_xdm/subset_a/metadata.xml": meta,
        "ihe_xdm/subset_a/ccda.xml": CCDA,
        "ihe_xdm/subset_a/msg1.txt": ORDER,
    })
    pkg = read_xdm(data)
    assert pkg.metadata == "limited"
    assert sorted(d.filename for d in pkg.documents) == ["ccda.xml", "msg1.txt"]
    assert pkg.submission.unique_id == "2.25.9"
    assert pkg.submission.intended_recipients == ["jane@direct.example.org"]
    assert pkg.warnings == []
    parts = referral_parts(pkg)
    assert parts.ccda.content == CCDA and parts.ccda.unique_id == "2.25.1"
    assert parts.order.content == ORDER  # text/plain, found by sniffing MSH


FULL_METADATA = """<?xml version="1.0" encoding="UTF-8"?>
<lcm:SubmitObjectsRequest xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
    xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">
 <rim:RegistryObjectList>
  <rim:RegistryPackage id="urn:uuid:11111111-1111-4111-8111-111111111111"
      objectType="urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:RegistryPackage">
   <rim:Slot name="submissionTime"><rim:ValueList><rim:Value>20261122140300</rim:Value></rim:ValueList></rim:Slot>
   <rim:Slot name="intendedRecipient"><rim:ValueList>
     <rim:Value>^^Internet^cardio@direct.example.org</rim:Value>
   </rim:ValueList></rim:Slot>
   <rim:Classification id="urn:uuid:22222222-2222-4222-8222-222222222222"
       classificationScheme="urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
       classifiedObject="urn:uuid:11111111-1111-4111-8111-111111111111" nodeRepresentation="57133-1">
    <rim:Slot name="codingScheme"><rim:ValueList><rim:Value>2.16.840.1.113883.6.1</rim:Value></rim:ValueList>
    </rim:Slot>
    <rim:Name><rim:LocalizedString value="Referral note"/></rim:Name>
   </rim:Classification>
   <rim:ExternalIdentifier id="urn:uuid:33333333-3333-4333-8333-333333333333"
       identificationScheme="urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
       registryObject="urn:uuid:11111111-1111-4111-8111-111111111111" value="1.2.3.4.5"/>
   <rim:ExternalIdentifier id="urn:uuid:44444444-4444-4444-8444-444444444444"
       identificationScheme="urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
       registryObject="urn:uuid:11111111-1111-4111-8111-111111111111" value="P1^^^&amp;1.2.3&amp;ISO"/>
  </rim:RegistryPackage>
  <rim:Classification id="urn:uuid:55555555-5555-4555-8555-555555555555"
      classifiedObject="urn:uuid:11111111-1111-4111-8111-111111111111"
      classificationNode="urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"/>
  <rim:ExtrinsicObject id="urn:uuid:66666666-6666-4666-8666-666666666666" mimeType="text/xml"
      objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">
   <rim:Slot name="hash"><rim:ValueList><rim:Value>{hash}</rim:Value></rim:ValueList></rim:Slot>
   <rim:Slot name="size"><rim:ValueList><rim:Value>{size}</rim:Value></rim:ValueList></rim:Slot>
   <rim:Slot name="URI"><rim:ValueList><rim:Value>Document01.xml</rim:Value></rim:ValueList></rim:Slot>
   <rim:Name><rim:LocalizedString value="Consultation"/></rim:Name>
   <rim:Classification id="urn:uuid:77777777-7777-4777-8777-777777777777"
       classificationScheme="urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d"
       classifiedObject="urn:uuid:66666666-6666-4666-8666-666666666666"
       nodeRepresentation="urn:hl7-org:sdwg:ccda-structuredBody:2.1">
    <rim:Slot name="codingScheme"><rim:ValueList><rim:Value>1.3.6.1.4.1.19376.1.2.3</rim:Value></rim:ValueList>
    </rim:Slot>
   </rim:Classification>
  </rim:ExtrinsicObject>
  <rim:Association id="urn:uuid:88888888-8888-4888-8888-888888888888"
      associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
      sourceObject="urn:uuid:11111111-1111-4111-8111-111111111111"
      targetObject="urn:uuid:66666666-6666-4666-8666-666666666666"/>
 </rim:RegistryObjectList>
</lcm:SubmitObjectsRequest>
"""


def full_package(content, declared=None, size=None):
    declared = declared or hashlib.sha1(content).hexdigest()
    meta = FULL_METADATA.format(hash=declared.upper(), size=size if size is not None else len(content))
    # The Direct RI's own sample layout: METADATA.xml, Document01.xml, a CCD.xsl, INDEX.htm, README.txt
    return zip_of({
        "IHE_XDM/SUBSET01/METADATA.xml": meta.encode(), "IHE_XDM/SUBSET01/Document01.xml": content,
        "IHE_XDM/SUBSET01/CCD.xsl": b"<xsl/>", "INDEX.htm": b"<html/>", "README.txt": b"readme",
    })


@needs_ccda
def test_reads_a_full_package_from_another_vendor():
    pkg = read_xdm(full_package(CCDA))
    assert pkg.metadata == "full"
    assert pkg.warnings == []
    (doc,) = pkg.documents  # the stylesheet is not a document
    assert (doc.filename, doc.content, doc.title) == ("Document01.xml", CCDA, "Consultation")
    assert doc.format_code.code == "urn:hl7-org:sdwg:ccda-structuredBody:2.1"
    assert pkg.submission.patient_id == "P1^^^&1.2.3&ISO"
    assert pkg.submission.intended_recipients == ["cardio@direct.example.org"]
    assert pkg.submission.content_type_code == Code("57133-1", LOINC, "Referral note")
    assert referral_parts(pkg).ccda is doc and referral_parts(pkg).order is None


def test_hash_or_size_mismatch_warns_or_fails_when_strict():
    content = b"<ClinicalDocument xmlns='urn:hl7-org:v3'/>"
    bad_hash = full_package(content, declared=hashlib.sha1(b"other").hexdigest())
    pkg = read_xdm(bad_hash)
    assert any("hash" in w for w in pkg.warnings)
    assert pkg.documents[0].content == content
    with pytest.raises(XdmError, match="hash"):
        read_xdm(bad_hash, strict=True)
    bad_size = full_package(content, size=len(content) + 1)
    assert any("bytes" in w for w in read_xdm(bad_size).warnings)
    with pytest.raises(XdmError):
        read_xdm(bad_size, strict=True)


def test_missing_metadata_lists_the_subset_files():
    pkg = read_xdm(zip_of({"IHE_XDM/SUBSET01/DOC0001.HL7": ORDER, "IHE_XDM/SUBSET01/DOC0002.XML": b"<a/>",
                           "README.TXT": b"x"}))
    assert pkg.metadata == "none" and pkg.submission is None
    assert [(d.filename, d.mime_type) for d in pkg.documents] == [
        ("DOC0001.HL7", "x-application/hl7-v2+er7"), ("DOC0002.XML", "text/xml")]
    assert pkg.warnings
    assert referral_parts(pkg).order.content == ORDER


# --------------------------------------------------------------------------------------------------------------------
# hostile input
# --------------------------------------------------------------------------------------------------------------------


def one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("name", ["../evil.txt", "IHE_XDM/SUBSET01/../../evil.txt", "/etc/passwd",
                                  "C:\\Windows\\evil.txt", "IHE_XDM\\..\\..\\evil.txt"])
def test_traversal_names_are_refused(name):
    data = zip_of({"IHE_XDM/SUBSET01/DOC0001.XML": b"<a/>", name: b"x"})
    with pytest.raises(XdmError) as exc:
        read_xdm(data)
    one_line(exc)


def test_zip_bomb_is_refused():
    data = zip_of({"IHE_XDM/SUBSET01/DOC0001.XML": b"\0" * (50 * 1024 * 1024 + 1)})
    assert len(data) < 1024 * 1024  # small on the wire, large once inflated
    with pytest.raises(XdmError, match="inflates") as exc:
        read_xdm(data)
    one_line(exc)


def test_too_many_entries_are_refused():
    data = zip_of({f"IHE_XDM/SUBSET01/D{i:05d}.TXT": b"" for i in range(1001)})
    with pytest.raises(XdmError, match="entries"):
        read_xdm(data)


@pytest.mark.parametrize("doctype, body", [
    (b'<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>', b"&b;"),
    (b'<!DOCTYPE r SYSTEM "http://example.invalid/x.dtd">', b"x"),
    (b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>', b"&x;"),
])
def test_metadata_with_doctype_is_refused(doctype, body):
    root = b'<r xmlns="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0">' + body + b"</r>"
    meta = b'<?xml version="1.0"?>' + doctype + root
    data = zip_of({"IHE_XDM/SUBSET01/METADATA.XML": meta, "IHE_XDM/SUBSET01/DOC0001.XML": b"<a/>"})
    with pytest.raises(XdmError, match="DOCTYPE") as exc:
        read_xdm(data)
    assert "passwd" not in str(exc.value) and "root:" not in str(exc.value)
    one_line(exc)


@pytest.mark.parametrize("data", [b"", b"not a zip at all", zip_of({"README.TXT": b"x", "doc.xml": b"<a/>"})])
def test_non_xdm_input_is_refused(data):
    with pytest.raises(XdmError) as exc:
        read_xdm(data)
    one_line(exc)


def test_metadata_not_well_formed_is_refused():
    data = zip_of({"IHE_XDM/SUBSET01/METADATA.XML": b"<lcm:SubmitObjectsRequest", "IHE_XDM/SUBSET01/A.XML": b"x"})
    with pytest.raises(XdmError, match="well-formed") as exc:
        read_xdm(data)
    one_line(exc)
