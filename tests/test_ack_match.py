"""ack_match.classify: our ACK or not, and what it says. Never raises (hypothesis)."""

from __future__ import annotations

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hl7referral.v2.ack import build_ack
from hl7referral.v2.ack_match import AckResult, classify
from hl7referral.v2.header import read_header
from hl7referral.v2.triage import Problem

KINDS = {"accept", "error", "reject", "commit", "mismatch", "not-ack"}
MSH = "MSH|^~\\&|EHR|CLINIC|SPECIALIST|SPECFAC|20260101120000||ACK^T02^ACK|A1|P|2.5.1"


def ack(code: str = "AA", acked: str = "M1", *extra: str, msh: str = MSH, sep: str = "\r") -> bytes:
    return (sep.join([msh, f"MSA|{code}|{acked}", *extra]) + sep).encode("utf-8")


@pytest.mark.parametrize("code,kind", [
    ("AA", "accept"), ("CA", "accept"), ("AE", "error"), ("CE", "error"), ("AR", "reject"), ("CR", "reject"),
    ("aa", "accept"), (" AA ", "accept"),
])
def test_codes_when_the_id_matches(code, kind):
    r = classify("M1", ack(code))
    assert r == AckResult(kind, code.strip().upper(), "M1", "", r.error)
    assert r.final and r.delivered == (kind == "accept")
    assert (r.error == "") == (kind == "accept")


@pytest.mark.parametrize("code,kind", [("CA", "commit"), ("AA", "accept"), ("CE", "error"), ("CR", "reject"),
                                       ("AE", "error"), ("AR", "reject")])
def test_waiting_for_the_application_ack_makes_ca_a_step_not_a_delivery(code, kind):
    r = classify("M1", ack(code), need_application_ack=True)
    assert r.kind == kind
    assert r.delivered == (code == "AA")
    if code == "CA":
        assert not r.final


@pytest.mark.parametrize("acked", ["M0", "M10", "m1", "", "M1X"])
@pytest.mark.parametrize("code", ["AA", "CA", "AE", "AR"])
def test_another_control_id_is_a_mismatch_whatever_the_code(code, acked):
    r = classify("M1", ack(code, acked))
    assert r.kind == "mismatch" and not r.delivered and not r.final
    assert r.control_id == acked and r.code == code
    assert "M1" in r.error


def test_surrounding_spaces_in_msa_2_are_ignored():
    assert classify("M1", ack("AA", " M1 ")).kind == "accept"


def test_an_empty_expected_control_id_matches_nothing():
    assert classify("", ack("AA", "")).kind == "mismatch"
    assert classify("  ", ack("AA", "")).kind == "mismatch"


@pytest.mark.parametrize("payload,why", [
    (b"", "empty"),
    (b"hello", "does not start with MSH"),
    (b"\x16\x03\x01\x02\x00", "TLS"),
    (b"<ClinicalDocument/>", "XML"),
    (MSH.encode() + b"\rPID|1\r", "no MSA"),
    (b"MSH|^~\\&|\rMSA|AA|M1\r", None),  # a short MSH still has delimiters: readable
    (b"MSH|\rMSA|AA|M1\r", "truncated"),
])
def test_what_is_not_an_ack(payload, why):
    r = classify("M1", payload)
    if why is None:
        assert r.kind == "accept"
    else:
        assert r.kind == "not-ack" and not r.delivered
        assert why.lower() in r.error.lower()


def test_unknown_msa_1_is_not_an_ack():
    r = classify("M1", ack("ZZ"))
    assert r.kind == "not-ack" and r.code == "ZZ" and "ZZ" in r.error
    assert classify("M1", ack("")).kind == "not-ack"


def test_the_first_msa_decides():
    payload = ack("AA", "M0", "MSA|AA|M1")
    assert classify("M1", payload).kind == "mismatch"


def test_error_text_and_code_come_from_msa_3_or_err():
    r = classify("M1", ack("AE", "M1", "ERR||PID^1^3|101^Required field missing^HL70357|E||||PID-3 is empty"))
    assert r.kind == "error"
    assert r.text == "PID-3 is empty"  # ERR-8 when MSA-3 is empty
    assert r.error == "AE: application error (HL7 error 101)"
    r = classify("M1", ack("AR", "M1|Unsupported \\F\\ type", "ERR||MSH^1^9|200^Unsupported message type^HL70357|E"))
    assert r.text == "Unsupported | type"  # MSA-3, unescaped
    assert r.error == "AR: rejected (HL7 error 200)"
    r = classify("M1", ack("AE", "M1", "ERR||PID^1^3|207^Application internal error^HL70357|E"))
    assert r.text == "Application internal error"  # ERR-3.2 as the last resort


def test_a_malformed_escape_keeps_the_raw_text():
    r = classify("M1", ack("AE", "M1|bad \\.brX\\ escape"))
    assert r.kind == "error" and r.text == "bad \\.brX\\ escape"


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_separators_and_bom(sep):
    assert classify("M1", ack("AA", "M1", sep=sep)).kind == "accept"
    assert classify("M1", b"\xef\xbb\xbf" + ack("AA", "M1")).kind == "accept"


def test_the_frame_own_delimiters_are_used():
    payload = b"MSH#$%\\*#EHR#CLINIC####ACK$T02#A1#P#2.5.1\rMSA#AE#M1#text \\F\\ here\r"
    r = classify("M1", payload)
    assert r.kind == "error" and r.text == "text # here"


def test_latin1_and_utf8_texts():
    msh = MSH + "||||||8859/1"
    r = classify("M1", ack("AE", "M1|Patient M\xfcller", msh=msh).decode("utf-8").encode("latin-1"))
    assert r.text == "Patient Müller"
    r = classify("M1", ack("AE", "M1|Patient Müller", msh=MSH + "||||||UNICODE UTF-8"))
    assert r.text == "Patient Müller"
    r = classify("M1", ack("AE", "M1|x", msh=MSH + "||||||KLINGON"))
    assert r.kind == "error"  # an unknown charset does not hide the answer


def test_application_acks_carry_msa_too():
    rri = (b"MSH|^~\\&|SPEC|SPECFAC|EHR|CLINIC|20260101||RRI^I12^RRI_I12|R1|P|2.5.1\rMSA|AA|M1\rRF1|A||||||REF1\r")
    assert classify("M1", rri).kind == "accept"


def test_acks_built_by_our_ack_module_and_by_python_hl7():
    from hl7referral.v2.mdm import ConsultNote, build_mdm_t02
    sent = build_mdm_t02(ConsultNote("REF1", "DOC1", text="note"), control_id="M7", now_hl7="20260101120000",
                         sending=("SPEC", "SF"), receiving=("EHR", "CL"))
    ours = build_ack(read_header(sent), "AE", [Problem(207, "TXA", 1, "cannot file the note")],
                     control_id="A9", timestamp="20260101120001")
    r = classify("M7", ours)
    assert (r.kind, r.code, r.control_id, r.text) == ("error", "AE", "M7", "cannot file the note")
    theirs = str(hl7.parse(sent.decode()).create_ack("AA")).encode()
    assert classify("M7", theirs) == AckResult("accept", "AA", "M7")
    assert classify("M8", theirs).kind == "mismatch"


# -- never raises ------------------------------------------------------------------------


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=512), st.text(max_size=20), st.booleans())
def test_never_raises_on_any_bytes(payload, control_id, need_app):
    r = classify(control_id, payload, need_application_ack=need_app)
    assert isinstance(r, AckResult) and r.kind in KINDS


_HL7ISH = st.text(alphabet="MSHAEC|^~\\&\r\n #X.0123456789brFRST\x0b\x1c\xe9", max_size=120)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(["MSH|^~\\&|", "MSH|^~\\&#|", "MSH|^|", "MSH|^~&|", "MSH||", "MSH|", "\ufeffMSH|^~\\&|"]),
       _HL7ISH, st.sampled_from(["\rMSA|", "\nMSA|", "\rERR|", "\r"]), _HL7ISH,
       st.sampled_from(["utf-8", "latin-1", "utf-16"]))
def test_never_raises_on_hl7_shaped_input(head, middle, seg, tail, codec):
    payload = (head + middle + seg + tail).encode(codec, errors="replace")
    r = classify("M1", payload)
    assert r.kind in KINDS
    if r.delivered:  # whatever the shape, delivery needs our id in MSA-2
        assert r.control_id.strip() == "M1"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="|^~\\&"),
               min_size=1, max_size=20),
       st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="|^~\\&"),
               min_size=1, max_size=20),
       st.sampled_from(["AA", "CA", "AE", "AR", "CE", "CR"]))
def test_an_ack_for_another_id_never_delivers(ours, theirs, code):
    r = classify(ours, ack(code, theirs))
    assert r.delivered == (ours == theirs and code in ("AA", "CA"))
    assert (r.kind == "mismatch") == (ours != theirs)
