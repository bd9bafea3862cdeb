"""MDM^T02 builder: read back with python-hl7, validated with hl7apy (STRICT), documents round-tripped."""

from __future__ import annotations

import base64

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import MaxLengthReached
from hl7apy.parser import parse_message
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7referral.engine.ingest import hl7_timestamp
from hl7referral.v2.framer import Frame, MLLPFramer, encode_frame
from hl7referral.v2.header import read_header
from hl7referral.v2.mdm import ConsultNote, build_mdm_t02, escape, text_lines

REFERRAL = "889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO"
NOW = hl7_timestamp(1767268800)  # 2026-01-01 12:00:00 UTC
SENDING = ("SPECIALIST", "^1.3.6.1.4.1.21367.2016.10.1.32^ISO")
RECEIVING = ("EHR", "^1.3.6.1.4.1.21367.2016.10.1.21^ISO")
TEXT = "Consultation: cardiology\nAssessment: synthetic findings only.\n\nPlan: follow up in 6 weeks.\n"

# Synthetic documents: a PDF-shaped blob holding every byte value, and a minimal C-CDA.
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
CCDA = (b'<?xml version="1.0" encoding="UTF-8"?>\n<ClinicalDocument xmlns="urn:hl7-org:v3">'
        b'<templateId root="2.16.840.1.113883.10.20.22.1.4"/><code code="11488-4" codeSystem="2.16.840.1.113883.6.1"/>'
        b'<title>Consult note | R&amp;D ^~\\</title><inFulfillmentOf><order><id extension="889342" '
        b'root="1.3.6.1.4.1.21367.2016.10.1.21.15"/></order></inFulfillmentOf></ClinicalDocument>\n')


def note(**kw) -> ConsultNote:
    base = dict(referral_id=REFERRAL, unique_document_id="DOC-77^SPECIALIST", text=TEXT,
                patient_ids="T7190334^^^&1.3.6.1.4.1.21367.2016.10.1.21.5&ISO^MRN", patient_name="Testpatient^Alex",
                author="34225PC^Specialist^Sam^^^Dr", origination_time="202601011130+0000")
    base.update(kw)
    return ConsultNote(**base)


def build(n: ConsultNote | None = None, control_id: str = "MDM0001", **kw) -> bytes:
    return build_mdm_t02(n or note(), control_id=control_id, now_hl7=NOW, sending=SENDING, receiving=RECEIVING, **kw)


def parsed(raw: bytes) -> hl7.Message:
    return hl7.parse(raw.decode("utf-8"))


def field(msg: hl7.Message, segment: str, n: int) -> str:
    """A whole field as ER7 text (python-hl7's ``msg["SEG.Fn"]`` gives its first component)."""
    return str(msg.segment(segment)[n])


def obx_values(msg: hl7.Message) -> list[str]:
    """Each OBX-5 as text, unescaped by python-hl7 (the independent reader)."""
    return [msg.unescape(str(seg[5])) for seg in msg.segments("OBX")]


def strict(raw: bytes):
    m = parse_message(raw.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert m.validate() is True
    return m


# -- structure ---------------------------------------------------------------------------


def test_header_and_segments_read_back_by_path():
    raw = build()
    msg = parsed(raw)
    assert [str(s[0]) for s in msg] == ["MSH", "EVN", "PID", "PV1", "TXA", "OBX", "OBX", "OBX", "OBX"]
    assert field(msg, "MSH", 9) == "MDM^T02^MDM_T02"
    assert str(msg["MSH.F10"]) == "MDM0001"
    assert str(msg["MSH.F11"]) == "P" and str(msg["MSH.F12"]) == "2.5.1"
    assert str(msg["MSH.F3"]) == "SPECIALIST" and str(msg["MSH.F5"]) == "EHR"
    assert field(msg, "MSH", 4) == SENDING[1] and field(msg, "MSH", 6) == RECEIVING[1]
    assert str(msg["MSH.F7"]) == NOW == str(msg["EVN.F2"])
    # original mode: MSH-15/16 absent, so one ACK (AA/AE/AR) comes back
    header = read_header(raw)
    assert not header.enhanced_mode and header.charset == ""
    assert field(msg, "PID", 3) == "T7190334^^^&1.3.6.1.4.1.21367.2016.10.1.21.5&ISO^MRN"
    assert field(msg, "PID", 5) == "Testpatient^Alex"
    assert str(msg["PV1.F2"]) == "O"
    assert str(msg["TXA.F2"]) == "CN" and str(msg["TXA.F3"]) == "TX"
    assert field(msg, "TXA", 5) == "34225PC^Specialist^Sam^^^Dr"
    assert str(msg["TXA.F6"]) == "202601011130+0000"
    assert field(msg, "TXA", 12) == "DOC-77^SPECIALIST"
    assert str(msg["TXA.F13"]) == ""
    assert str(msg["TXA.F17"]) == "AU"


def test_referral_id_is_the_first_placer_order_number_in_txa_14():
    msg = parsed(build())
    assert field(msg, "TXA", 14) == REFERRAL
    assert str(msg["TXA.F14.R1.C1"]) == "889342"
    assert str(msg["TXA.F14.R1.C3"]) == "1.3.6.1.4.1.21367.2016.10.1.21.15"
    # a distinct placer order (REF^I12's order next to RF1-6) is the second repetition
    msg = parsed(build(note(referral_id="REF0001", placer_order="ORD0001^EHR")))
    assert field(msg, "TXA", 14) == "REF0001~ORD0001^EHR"
    assert str(msg["TXA.F14.R1"]) == "REF0001" and str(msg["TXA.F14.R2.C2"]) == "EHR"
    # the same value twice is written once
    msg = parsed(build(note(referral_id="REF0001", placer_order="REF0001")))
    assert field(msg, "TXA", 14) == "REF0001"


def test_a_revision_names_its_trigger_and_the_document_it_revises():
    replaced = hl7.parse(build(note(parent_document_id="DOC-76^SPECIALIST"), trigger="T10").decode())
    assert str(replaced.segment("MSH")(9)) == "MDM^T10^MDM_T02"
    assert str(replaced.segment("TXA")(12)) == "DOC-77^SPECIALIST"
    assert str(replaced.segment("TXA")(13)) == "DOC-76^SPECIALIST"
    strict_t10 = strict(build(note(parent_document_id="DOC-76^SPECIALIST"), trigger="T10"))   # hl7apy, strict
    assert strict_t10.name == "MDM_T02" and strict_t10.TXA.TXA_13.value == "DOC-76^SPECIALIST"
    original = hl7.parse(build().decode())
    assert str(original.segment("MSH")(9)) == "MDM^T02^MDM_T02" and str(original.segment("TXA")(13)) == ""
    with pytest.raises(ValueError, match="parent_document_id"):
        build(trigger="T06")   # an addendum must say what it adds to
    with pytest.raises(ValueError, match="trigger"):
        build(trigger="T11")   # a cancel notification carries no content: not built here


def test_text_is_one_tx_observation_per_line():
    msg = parsed(build())
    obx = msg.segments("OBX")
    assert [str(s[1]) for s in obx] == ["1", "2", "3", "4"]
    assert {str(s[2]) for s in obx} == {"TX"}
    assert {str(s[3]) for s in obx} == {"11488-4^Consult note^LN"}
    assert {str(s[4]) for s in obx} == {"1"}
    assert {str(s[11]) for s in obx} == {"F"}
    assert obx_values(msg) == TEXT.split("\n")[:-1]  # the blank line is kept, the final newline is not a line


def test_preliminary_document_gets_preliminary_observations():
    msg = parsed(build(note(completion_status="IP")))
    assert str(msg["TXA.F17"]) == "IP"
    assert {str(s[11]) for s in msg.segments("OBX")} == {"P"}


def test_every_segment_ends_with_cr_and_there_is_no_lf():
    raw = build()
    assert raw.endswith(b"\r") and b"\n" not in raw and not raw.endswith(b"\r\r")


# -- hl7apy structure validation ---------------------------------------------------------


@pytest.mark.parametrize("version", ["2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"])
def test_hl7apy_strict_validation_of_the_text_note(version):
    m = strict(build(version=version))
    assert m.name == "MDM_T02"
    assert m.TXA.TXA_14.value == REFERRAL
    assert m.TXA.TXA_12.value == "DOC-77^SPECIALIST"


@pytest.mark.parametrize("document,media_type", [(PDF, "application/pdf"), (CCDA, "text/xml")])
def test_hl7apy_strict_validation_of_an_embedded_document(document, media_type):
    """Structure check of the ED layout with a document small enough for hl7apy (see below)."""
    m = strict(build(note(text=None, document=document[:120], media_type=media_type)))
    assert m.TXA.TXA_3.value == "AP"


@pytest.mark.parametrize("kw", [
    {"text": None, "document": PDF, "media_type": "application/pdf"},
    {"text": None, "document": CCDA, "media_type": "text/xml"},
    {"text": "x" * 200},
])
def test_hl7apy_obx5_length_limit_is_hl7apys_not_hl7s(kw):
    """hl7apy does not resolve OBX-5 ``varies`` from OBX-2: each component is checked as ST (199).

    So STRICT fails on any real document or a line over 199 characters, though HL7 allows
    them (TX 65536, base64 ED of any size in practice). The message is still built and
    python-hl7 reads it back intact; MLLP's frame limit (16 MiB by default) is what
    bounds size on the wire.
    """
    raw = build(note(**kw))
    with pytest.raises(MaxLengthReached, match="max length: 199"):
        strict(raw)
    (obx,) = parsed(raw).segments("OBX")
    if kw["text"] is None:
        assert base64.b64decode(str(obx[5][0][4])) == kw["document"]
    else:
        assert str(obx[5]) == kw["text"]


def test_hl7apy_rejects_a_note_without_patient_identifiers():
    """PID-3 is required in 2.5.1: the builder allows leaving it out, validation says why not to."""
    from hl7apy.exceptions import ValidationError
    with pytest.raises(ValidationError, match="PID_3"):
        strict(build(note(patient_ids="")))


# -- documents through base64 -------------------------------------------------------------


@pytest.mark.parametrize("document,media_type,kind,subtype", [
    (PDF, "application/pdf", "Application", "PDF"),
    (CCDA, "text/xml", "Application", "XML"),
    (CCDA, "application/xml", "Application", "XML"),
])
def test_document_round_trips_through_base64(document, media_type, kind, subtype):
    msg = parsed(build(note(text=None, document=document, media_type=media_type)))
    obx = msg.segments("OBX")
    assert len(obx) == 1
    assert str(obx[0][2]) == "ED"
    assert str(msg["TXA.F3"]) == "AP"
    ed = obx[0][5][0]  # components of the first repetition
    assert [str(c) for c in ed[:4]] == ["", kind, subtype, "Base64"]
    assert base64.b64decode(str(ed[4]), validate=True) == document


def test_a_pdf_payload_cannot_break_the_frame():
    raw = build(note(text=None, document=PDF, media_type="application/pdf"))
    assert b"\x0b" not in raw and b"\x1c" not in raw
    assert [e for e in MLLPFramer().feed(encode_frame(raw)) if isinstance(e, Frame)] == [Frame(raw)]


# -- escaping ---------------------------------------------------------------------------


def test_delimiters_in_the_note_text_and_title_are_escaped():
    text = "a|b^c~d\\e&f\nsecond | line"
    raw = build(note(text=text, title="Title with | and ^ and &"))
    first = [s for s in raw.split(b"\r") if s.startswith(b"OBX|1|")][0]
    assert first.endswith(b"|1|a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f||||||F")
    msg = parsed(raw)
    assert obx_values(msg) == ["a|b^c~d\\e&f", "second | line"]
    assert msg.unescape(str(msg.segments("OBX")[0][3][0][1])) == "Title with | and ^ and &"
    assert len(msg.segments("OBX")[0]) == 12  # no extra fields from the text


def test_control_characters_become_zero_padded_hex():
    raw = build(note(text="vt\x0bfs\x1cnul\x00del\x7f"))
    assert b"vt\\X0B\\fs\\X1C\\nul\\X00\\del\\X7F\\" in raw
    assert obx_values(parsed(raw)) == ["vt\x0bfs\x1cnul\x00del\x7f"]


def test_tabs_are_expanded_and_a_title_is_one_line():
    msg = parsed(build(note(text="a\tb", title="two\nlines")))
    assert obx_values(msg) == ["a       b"]
    assert str(msg.segments("OBX")[0][3][0][1]) == "two lines"


def test_non_ascii_text_is_utf8_and_declared_in_msh_18():
    raw = build(note(text="Müller: naïve → 心臓 ok", patient_name="Müller^Zoë"))
    assert read_header(raw).charset == "UNICODE UTF-8"
    assert "Müller: naïve → 心臓 ok".encode() in raw
    msg = parsed(raw)
    assert obx_values(msg) == ["Müller: naïve → 心臓 ok"]
    assert str(msg["MSH.F18"]) == "UNICODE UTF-8" and str(msg["MSH.F12"]) == "2.5.1"
    strict(raw)


def test_ascii_messages_do_not_declare_a_charset():
    assert b"UNICODE" not in build()


@pytest.mark.parametrize("field,value", [
    ("referral_id", "REF|1"), ("referral_id", "REF~1"), ("referral_id", "REF\r1"), ("unique_document_id", "D\n1"),
    ("patient_name", "A|B"), ("patient_ids", "X\x0b"), ("author", "A\x1c"), ("placer_order", "O~2"),
    ("document_type", "C|N"), ("completion_status", "A\rU"), ("loinc", "1|2"),
])
def test_er7_inputs_that_would_break_the_structure_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        build(note(**{field: value}))


def test_repeating_er7_fields_may_repeat():
    msg = parsed(build(note(patient_ids="A1^^^CLINIC^MR~B2^^^SPEC^MR")))
    assert str(msg["PID.F3.R2.C1"]) == "B2"


@pytest.mark.parametrize("kw,match", [
    ({"text": None}, "exactly one"),
    ({"document": b"x", "media_type": "application/pdf"}, "exactly one"),
    ({"text": None, "document": b"x", "media_type": "application/msword"}, "media_type"),
    ({"text": None, "document": b"", "media_type": "application/pdf"}, "empty"),
    ({"media_type": "text/xml"}, "media_type goes with document"),
    ({"text": ""}, "empty"),
    ({"text": "\n \t\r\n"}, "empty"),
])
def test_malformed_notes_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        note(**kw)


@pytest.mark.parametrize("kw", [
    {"control_id": ""}, {"control_id": "A|B"}, {"control_id": "A^B"}, {"now_hl7": "yesterday"},
    {"sending": ("A|B", "F")}, {"receiving": ("R", "F\r")},
])
def test_malformed_header_values_are_refused(kw):
    args = dict(control_id="M1", now_hl7=NOW, sending=SENDING, receiving=RECEIVING) | kw
    with pytest.raises(ValueError):
        build_mdm_t02(note(), **args)


def test_timestamps_are_checked():
    with pytest.raises(ValueError, match="origination_time"):
        build(note(origination_time="01/01/2026"))


# -- property: any text survives ---------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_reads_back_line_for_line(text, title):
    lines = text_lines(text)
    if not text.strip():
        with pytest.raises(ValueError):
            note(text=text)
        return
    raw = build(note(text=text, title=title))
    assert b"\x0b" not in raw and b"\x1c" not in raw and b"\n" not in raw
    msg = parsed(raw)
    assert len(msg.segments("OBX")) == len(lines)
    assert obx_values(msg) == [line.expandtabs() for line in lines]
    assert field(msg, "TXA", 14) == REFERRAL


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127)))
def test_escape_of_ascii_leaves_no_delimiter(text):
    out = escape(text.replace("\r", ""))
    assert not set(out) & set("|^~&\r\n\x0b\x1c")
