"""Forwarding an inbound referral to our EHR: REF^I12 / OMG^O19 x embedded / referenced C-CDA.

Documents come from the engine's own pipeline (tests/forward_inputs.py). Every message is
read back with python-hl7 (values, escapes), checked with hl7apy 2.5.1 and read by the
loop's correlation reader, as the EHR's answers will be keyed.
"""

from __future__ import annotations

import base64
import re

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import MaxLengthReached
from hl7apy.parser import parse_message

from forward_inputs import ORDER_360X, built, document, non_latin_referral
from hl7referral.cda.model import Code
from hl7referral.cda.referral_reader import ReferralNoteError, read_referral_note
from hl7referral.loop.correlate import read_v2
from hl7referral.v2.forward import ForwardError, build_forward
from hl7referral.v2.framer import Frame, MLLPFramer, encode_frame
from hl7referral.v2.header import read_header

NOW = "20261122100000+0000"
SENDING = ("HL7REFERRAL", "^1.3.6.1.4.1.99999.2^ISO")
RECEIVING = ("LOCAL-EHR", "SPECIALIST CLINIC")
POINTER = "https://docs.example.org/referrals/990001.xml?view=raw&who=ehr"
SAMPLES = ["ref-i12", "vet-ref-i12", "omg-o19"]
MESSAGES = ["REF^I12", "OMG^O19"]
MODES = ["embed", "reference"]


def forward(cda: bytes, message: str = "OMG^O19", cda_mode: str = "embed", order: bytes | None = None,
            **kw) -> bytes:
    args = dict(cda=cda, order=order, message=message, cda_mode=cda_mode, reference=POINTER, control_id="FWD0001",
                now_hl7=NOW, sending=SENDING, receiving=RECEIVING)
    args.update(kw)
    return build_forward(**args)


def parsed(raw: bytes) -> hl7.Message:
    return hl7.parse(raw.decode("utf-8"))


def field(msg: hl7.Message, segment: str, n: int) -> str:
    return str(msg.segment(segment)[n])


def names(raw: bytes) -> list[str]:
    return [s[:3] for s in raw.decode("utf-8").split("\r") if s]


def hl7apy_checked(raw: bytes):
    """hl7apy 2.5.1: STRICT parse + validate with the base64 payload cut short (hl7apy checks every
    OBX-5 component as ST, 199 characters, see mdm.py), then the real message through hl7apy's
    structure and datatype validation after a tolerant parse (lengths are warnings there)."""
    text = raw.decode("utf-8")
    short = re.sub(r"\^Base64\^[A-Za-z0-9+/=]+", "^Base64^PENEQS8+", text)
    strict = parse_message(short, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert strict.validate() is True
    if short != text:
        with pytest.raises(MaxLengthReached):
            parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    full = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)
    assert full.validate() is True
    return strict


def obx_payload(msg: hl7.Message) -> hl7.Repetition:
    (obx,) = [s for s in msg.segments("OBX") if str(s[2]) in ("ED", "RP")]
    return obx


# -- both message types x both modes, for each sample -------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("sample", SAMPLES)
def test_forwarded_message(sample, message, mode):
    cda, processed = built(sample)
    note = read_referral_note(cda)
    raw = forward(cda, message, mode)
    msg = parsed(raw)
    m = hl7apy_checked(raw)
    assert m.name == message.replace("^", "_")

    # header: ours, original-mode acknowledgement, ASCII
    header = read_header(raw)
    assert (header.sending_application, header.sending_facility) == SENDING
    assert (header.receiving_application, header.receiving_facility) == RECEIVING
    assert header.control_id == "FWD0001" and header.field(7) == NOW
    assert header.version == "2.5.1" and header.processing_id == "P"
    assert not header.enhanced_mode and header.charset == ""

    # the structure, in order (hl7apy checks groups and counts, not the order within a group)
    if message == "REF^I12":
        prd = ["PRD", "PRD"] if sample != "omg-o19" else ["PRD"]
        assert names(raw) == ["MSH", "RF1", *prd, "PID", "OBR", "OBX"]
        assert field(msg, "RF1", 1) == "P^Pending"
        assert field(msg, "RF1", 6) == note.referral_ei
        assert str(msg.segments("PRD")[0][1]) == "RP"
        assert str(msg["RF1.F7"]) == "20261122064151+0000"
    else:
        tq1 = ["TQ1"] if sample != "omg-o19" else []   # only the REF samples carry a priority
        assert names(raw) == ["MSH", "PID", "ORC", *tq1, "OBR", "OBX"]
        assert str(msg["ORC.F1"]) == "NW"
        assert field(msg, "ORC", 2) == note.referral_ei
    assert field(msg, "OBR", 2) == note.referral_ei
    assert field(msg, "PID", 3) == note.patient_ids and field(msg, "PID", 5) == note.patient_name

    # the referral id comes back as the key the referral is stored under, strongest first
    observation = read_v2(raw)
    assert observation.keys[0] == ("referral", processed.referral_id)

    # the document
    obx = obx_payload(msg)
    assert field(msg, "OBX", 3) == "57133-1^Referral note^LN" and str(obx[11]) == "F"
    if mode == "embed":
        assert str(obx[2]) == "ED"
        ed = obx[5][0]
        assert [str(c) for c in ed[:4]] == ["", "Application", "XML", "Base64"]
        assert base64.b64decode(str(ed[4]), validate=True) == cda
    else:
        assert str(obx[2]) == "RP"
        assert msg.unescape(str(obx[5][0][0])) == POINTER
        assert [str(c) for c in obx[5][0][2:4]] == ["Application", "XML"]
        assert cda not in raw and base64.b64encode(cda[:60]) not in raw


def test_referral_facts_in_the_built_messages():
    cda, _ = built("ref-i12")
    ref = parsed(forward(cda, "REF^I12"))
    assert field(ref, "RF1", 2) == "R^Routine"
    assert ref.unescape(field(ref, "RF1", 10)).lstrip("^").startswith("Essential hypertension")
    assert field(ref, "PID", 7) == "19800101" and field(ref, "PID", 8) == "F"
    rp, rt = ref.segments("PRD")
    assert (str(rp[1]), str(rp[2]), str(rp[7])) == ("RP", "Referrer^Robin^^^Dr", "1003000126^NPI")
    assert (str(rt[1]), str(rt[7])) == ("RT", "1234567893^NPI")
    assert field(ref, "OBR", 31) == "I10^Essential hypertension^I10"

    omg = parsed(forward(cda, "OMG^O19"))
    xcn = "1003000126^Referrer^Robin^^^Dr^^^&2.16.840.1.113883.4.6&ISO^^^^NPI"
    assert field(omg, "ORC", 12) == xcn == field(omg, "OBR", 16)
    assert field(omg, "TQ1", 9) == "R^Routine"
    assert field(omg, "OBR", 4) == "MED"


def test_veterinary_patient_keeps_species_and_breed():
    cda, _ = built("vet-ref-i12")
    for message in MESSAGES:
        msg = parsed(forward(cda, message))
        assert field(msg, "PID", 5) == "Biscuit"
        assert field(msg, "PID", 35) == "448771007^Canis lupus familiaris^SCT"
        assert str(msg["PID.F36.R1.C2"]) == "Labrador retriever"


def test_no_service_means_the_referral_note_code_and_no_priority_means_no_timing():
    cda, _ = built("omg-o19")
    raw = forward(cda, "OMG^O19")
    assert field(parsed(raw), "OBR", 4) == "57133-1^^LN"   # as 360X writes it
    assert "TQ1" not in names(raw)


# -- a 360X order from the package ------------------------------------------------------------------


def test_360x_order_is_kept_segment_for_segment(corpus):
    cda, processed = built("360x")
    received = ORDER_360X.read_bytes()
    for mode in MODES:
        raw = forward(cda, "OMG^O19", mode, order=received)
        hl7apy_checked(raw)
        original = [s for s in received.decode("ascii").replace("\r\n", "\n").split("\n") if s]
        out = raw.decode("ascii").split("\r")
        assert out[-1] == ""
        out = out[:-1]
        # every segment after MSH as received, the document's OBX right after the OBR
        assert out[1:] == original[1:] + [out[-1]]
        assert out[-1].startswith(f"OBX|1|{'ED' if mode == 'embed' else 'RP'}|57133-1^Referral note^LN||")
        # MSH: ours where the brief says so, the order's elsewhere (MSH-9, 11, 12, 21 "360X")
        msh_in, msh_out = original[0].split("|"), out[0].split("|")
        assert msh_out[2:6] == [*SENDING, *RECEIVING] and msh_out[6] == NOW and msh_out[9] == "FWD0001"
        assert msh_out[14:16] == ["", ""] and msh_in[14:16] == ["NE", "NE"]
        assert msh_out[8] == "OMG^O19^OMG_O19" and msh_out[10:12] == ["P", "2.5.1"] and msh_out[20] == "360X"
        observation = read_v2(raw)
        assert observation.keys[0] == ("referral", processed.referral_id)
        assert observation.keys[0][1] == "889342@1.3.6.1.4.1.21367.2016.10.1.21.15"


def test_the_document_goes_after_the_orders_own_observations_and_notes(corpus):
    cda, _ = built("360x")
    segs = ORDER_360X.read_bytes().decode("ascii").replace("\r\n", "\n").split("\n")
    segs = [s for s in segs if s]
    order = segs[:5] + ["NTE|1||order note", "DG1|1||R51^Headache^I10|||W",
                        "OBX|1|ST|8661-1^Chief complaint^LN||Headache||||||F", "NTE|1||observation note",
                        "OBX|2|NM|8867-4^Heart rate^LN||72|/min|||||F", "SPM|1|||119297000^Blood^SCT"] + segs[5:]
    raw = forward(cda, "OMG^O19", "embed", order="\r".join(order).encode("ascii"))
    hl7apy_checked(raw)
    assert names(raw) == ["MSH", "PID", "ORC", "TQ1", "OBR", "NTE", "DG1", "OBX", "NTE", "OBX", "OBX", "SPM"]
    assert [str(s[1]) for s in parsed(raw).segments("OBX")] == ["1", "2", "3"]


def test_a_referral_id_from_the_order_wins_over_the_documents(corpus):
    """A REF^I12 asked for, a 360X order in the package: RF1-6 is the order's ORC-2 (what the
    initiator's answers carry), though this document names another referral."""
    cda, _ = built("ref-i12")
    raw = forward(cda, "REF^I12", order=ORDER_360X.read_bytes())
    msg = parsed(raw)
    assert field(msg, "RF1", 6) == "889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO" == field(msg, "OBR", 2)
    assert read_v2(raw).keys[0] == ("referral", "889342@1.3.6.1.4.1.21367.2016.10.1.21.15")
    hl7apy_checked(raw)


def test_an_order_of_another_type_is_not_kept_but_lends_its_referral_id():
    cda, _ = built("orm-o01")
    orm = (b"MSH|^~\\&|SAMPLE-EHR|SAMPLE CLINIC|HL7REFERRAL|HUB|20261122090200||ORM^O01^ORM_O01|ORM1|P|2.3.1\r"
           b"PID|1||SMRN0003^^^SAMPLE CLINIC^MR||Sample^Casey||19750303|F\r"
           b"ORC|NW|ORD-77^SAMPLE-EHR\rOBR|1|ORD-77^SAMPLE-EHR||REFCARD^Referral to cardiology^L\r")
    raw = forward(cda, "OMG^O19", order=orm)
    msg = parsed(raw)
    assert str(msg["MSH.F9"]) == "OMG" and field(msg, "MSH", 12) == "2.5.1"
    assert field(msg, "ORC", 2) == "ORD-77^SAMPLE-EHR" == field(msg, "OBR", 2)
    assert field(msg, "OBR", 4) == "REFCARD^Referral to cardiology^L"
    assert read_v2(raw).keys[0] == ("referral", "ORD-77")
    hl7apy_checked(raw)


def test_an_order_in_another_charset_comes_out_as_utf8(corpus):
    cda, _ = built("360x")
    msh, rest = ORDER_360X.read_bytes().decode("ascii").split("\n", 1)
    fields = msh.split("|")
    fields[17] = "8859/1"   # MSH-18 (fields[0] is "MSH", fields[1] MSH-2)
    text = "|".join(fields) + "\n" + rest.replace("Packton^Peter", "Ørsted^Zoë")
    raw = forward(cda, "OMG^O19", order=b"\xef\xbb\xbf" + text.encode("latin-1"))
    assert read_header(raw).charset == "UNICODE UTF-8"
    assert field(parsed(raw), "PID", 5) == "Ørsted^Zoë^^^L"


# -- non-ASCII text and escaping -------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES)
def test_non_ascii_names_survive_with_msh18_utf8(message):
    cda = document(non_latin_referral())
    raw = forward(cda, message)
    header = read_header(raw)
    assert header.charset == "UNICODE UTF-8" and raw.decode("utf-8")
    msg = parsed(raw)
    assert field(msg, "PID", 5) == "Ørsted^Zoë"
    assert len(str(msg.segment("MSH")).split("|")) == 18   # MSH-18 is the 18th field
    if message == "REF^I12":
        assert str(msg.segments("PRD")[1][2]) == "王^小明"
        assert "Brustschmerz" in msg.unescape(field(msg, "RF1", 10))
        assert field(msg, "RF1", 2) == "^urgent"   # ActPriority UR has no table 0280 code: words only
    else:
        assert field(msg, "TQ1", 9) == "^urgent"
    hl7apy_checked(raw)
    obx = obx_payload(msg)
    assert base64.b64decode(str(obx[5][0][4])) == cda


def test_delimiters_in_text_are_escaped():
    awkward = "Pain | left ^ arm & jaw ~ since \\ Monday"
    cda = document(non_latin_referral(reason=Code(), reason_text=awkward,
                                      requested_service=Code(original_text="Cardiology & echo")))
    for message in MESSAGES:
        raw = forward(cda, message, "reference", reference="file:///srv/docs/a|b^c.xml")
        msg = parsed(raw)
        assert names(raw)[-1] == "OBX" and len(names(raw)) == len(raw.decode().split("\r")) - 1
        assert msg.unescape(field(msg, "OBR", 31)) == "^" + awkward
        assert msg.unescape(str(obx_payload(msg)[5][0][0])) == "file:///srv/docs/a|b^c.xml"
        hl7apy_checked(raw)


# -- the wire ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", MESSAGES)
def test_segments_end_with_cr_and_the_frame_holds(message):
    cda, _ = built("ref-i12")
    raw = forward(cda, message)
    assert raw.endswith(b"\r") and b"\n" not in raw and b"\r\r" not in raw
    assert b"\x0b" not in raw and b"\x1c" not in raw
    assert [e for e in MLLPFramer().feed(encode_frame(raw)) if isinstance(e, Frame)] == [Frame(raw)]


# -- what cannot be forwarded -------------------------------------------------------------------------


@pytest.mark.parametrize("order", [None, "360x"])
@pytest.mark.parametrize("cda", [b"", b"not xml", b"<html/>",
                                 b"<!DOCTYPE x [<!ENTITY e 'x'>]><ClinicalDocument xmlns='urn:hl7-org:v3'/>"])
def test_a_broken_cda_is_the_named_error(cda, order, corpus):
    with pytest.raises(ReferralNoteError):
        forward(cda, "OMG^O19", order=ORDER_360X.read_bytes() if order else None)


def test_no_referral_id_anywhere_is_a_forward_error():
    with pytest.raises(ForwardError, match="no referral id"):
        forward(b'<ClinicalDocument xmlns="urn:hl7-org:v3"/>', "REF^I12")


@pytest.mark.parametrize("order, reason", [
    (b"PID|1||X", "order: text that does not start with MSH"),
    (b"MSH|^~", "order: MSH segment is truncated"),
    (b"MSH#^~\\&#A#B#C#D#20260101##OMG^O19^OMG_O19#1#P#2.5.1\rORC#NW#X1\rOBR#1#X1\r", "delimiters"),
    (b"MSH|^~\\&|A|B|C|D|20260101||OMG^O19^OMG_O19|1|P|2.5.1\rPID|1||X^^^Y\rORC|NW|X1\r", "no OBR"),
    (b"MSH|^~\\&|A|B|C|D|20260101||OMG^O19^OMG_O19|1|P|2.5.1\rORC|NW|X1\x1c\rOBR|1|X1\r", "VT or FS"),
    (b"MSH|^~\\&|A|B|C|D|20260101||OMG^O19^OMG_O19|1|P|2.5.1||||||KLINGON\rORC|NW|X1\rOBR|1|X1\r", "MSH-18"),
    (b"MSH|^~\\&|A|B|C|D|20260101||OMG^O19^OMG_O19|1|P|2.5.1\rORC|NW|\xff\rOBR|1|X1\r", "MSH-18"),
])
def test_an_order_that_cannot_be_kept_is_a_forward_error(order, reason):
    cda, _ = built("omg-o19")
    with pytest.raises(ForwardError, match=reason):
        forward(cda, "OMG^O19", order=order)


@pytest.mark.parametrize("kw, reason", [
    ({"message": "MDM^T02"}, "message must be"),
    ({"cda_mode": "inline"}, "cda_mode must be"),
    ({"cda_mode": "reference", "reference": ""}, "reference"),
    ({"cda_mode": "reference", "reference": "file:///a\rb"}, "reference"),
    ({"control_id": ""}, "control_id"),
    ({"control_id": "A|B"}, "control_id"),
    ({"now_hl7": "yesterday"}, "now_hl7"),
    ({"sending": ("APP|X", "FAC")}, "sending"),
])
def test_bad_arguments_are_value_errors(kw, reason):
    cda, _ = built("omg-o19")
    args = dict(message="OMG^O19", cda_mode="embed")
    args.update(kw)
    with pytest.raises(ValueError, match=reason):
        forward(cda, **args)
