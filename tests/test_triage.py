"""Triage: which answer a frame deserves (reliability-tests.md section 5, test 19-23)."""

import pytest
from hypothesis import given, settings, strategies as st

from hl7referral.v2.triage import Policy, triage
from messages import orm_o01, ref_i12

POLICY = Policy.simple({"REF^I12": "ref-i12", "ORM^O01": "orm-o01", "OMG^O19": "omg-o19"})


def first(t):
    return (t.code, t.errors[0].code, t.errors[0].location) if t.errors else (t.code,)


def test_accepts_a_referral_and_finds_its_referral_id():
    t = triage(ref_i12(), POLICY)
    assert first(t) == ("AA",)
    assert t.channel == "ref-i12" and t.referral_id == "REF0001" and t.text.startswith("MSH")


def test_order_referral_id_is_the_placer_order_number():
    t = triage(orm_o01(placer="PL77^EHR"), POLICY)
    assert t.accepted and t.referral_id == "PL77^EHR" and t.channel == "orm-o01"


@pytest.mark.parametrize("message, expected", [
    (ref_i12(kind="ADT^A01"), ("AR", 200, "MSH-9")),
    (ref_i12(kind="REF^I99"), ("AR", 201, "MSH-9")),
    (ref_i12(kind=""), ("AR", 101, "MSH-9")),
    (ref_i12(version="3.0"), ("AR", 203, "MSH-12")),
    (ref_i12(processing="T"), ("AR", 202, "MSH-11")),
    (ref_i12(rf1=None), ("AE", 101, "RF1")),
    (ref_i12(rf1="RF1|P|R|MED|RP|O|"), ("AE", 101, "RF1-6")),
    (ref_i12(pid="PID|1||"), ("AE", 101, "PID-3")),
    (ref_i12(pid='PID|1||""'), ("AE", 101, "PID-3")),
    (ref_i12(pid=None), ("AE", 101, "PID")),
    (ref_i12(pid="PID|1||M1^^^C^MR||Test^Pat||19701399|F"), ("AE", 102, "PID-7")),
    (ref_i12("X" * 200), ("AE", 104, "MSH-10")),
    (ref_i12(""), ("AE", 101, "MSH-10")),
    (ref_i12(msh_extra="||||||EBCDIC"), ("AE", 103, "MSH-18")),
])
def test_nak_matrix(message, expected):
    assert first(triage(message, POLICY)) == expected


def test_orm_without_any_placer_number_names_both_fields():
    t = triage(b"MSH|^~\\&|A|B|C|D|2026||ORM^O01|O9|P|2.3\rPID|1||M1\rORC|NW|\r", POLICY)
    assert first(t) == ("AE", 101, "ORC-2") and "ORC-2 or OBR-2" in t.errors[0].text


def test_sending_facility_filter():
    policy = Policy({"REF^I12": ((("OTHER",), "ref-other"),)})
    t = triage(ref_i12(), policy)
    assert first(t) == ("AR", 200, "MSH-4")
    policy = Policy({"REF^I12": ((("CLINIC",), "ref-clinic"),)})
    assert triage(ref_i12(), policy).channel == "ref-clinic"


@pytest.mark.parametrize("msh18, text, ok", [
    ("", "Alex", True),
    ("8859/1", "Sørensen", True),
    ("UNICODE UTF-8", "Sørensen 中文", True),
    ("UNICODE", "é", True),
])
def test_charsets_decode(msh18, text, ok):
    codec = {"": "ascii", "8859/1": "latin-1"}.get(msh18, "utf-8")
    pid = f"PID|1||MRN1^^^C^MR||{text}^Alex||19700101|F"
    raw = ref_i12(msh_extra=f"||||||{msh18}" if msh18 else "", pid=pid).decode().encode(codec)
    t = triage(raw, POLICY)
    assert t.accepted is ok and text in t.text


def test_declared_latin1_with_utf8_bytes_is_ae_102():
    raw = ref_i12(msh_extra="||||||8859/1", pid="PID|1||M1^^^C^MR||Sørensen||19700101|F")
    assert first(triage(raw, POLICY)) == ("AE", 102, "MSH-18")


def test_invalid_utf8_is_ae_102():
    raw = ref_i12(msh_extra="||||||UNICODE UTF-8").replace(b"Testpatient", b"Test\xffpatient")
    assert first(triage(raw, POLICY)) == ("AE", 102, "MSH-18")


def test_non_ascii_without_msh18_is_ae_102_by_default():
    raw = ref_i12(pid="PID|1||M1^^^C^MR||Sørensen||19700101|F")
    assert first(triage(raw, POLICY)) == ("AE", 102, "MSH-18")


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_separators_accepted(sep):
    assert triage(ref_i12(sep=sep), POLICY).accepted


def test_double_cr_and_leading_newline_accepted():
    raw = b"\n" + ref_i12().replace(b"\r", b"\r\r")
    assert triage(raw, POLICY).accepted


def test_xml_is_not_hl7_and_never_parsed():
    t = triage(b"<?xml version='1.0'?><!DOCTYPE m [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><m>&x;</m>", POLICY)
    assert t.not_hl7 and "XML" in t.not_hl7 and t.text is None


@pytest.mark.parametrize("raw", [
    b"", b"MSH|0|||||||00|||2.7", b"MSHH0\r", b"MSH|0|||||||||||0", b"MSH|^|||||||^A|||2.2\r^AA",
    b"\nMSH|^~\\&|A|B|C|D|2026||REF^I12|1|P|2.5\r\rPID|1\r", b"MSH|^~&|EPIC||||2026||REF^I12|1|P|2.5\r",
    b"MSH|^~\\&#|A|B|C|D|2026||REF^I12|1|P|2.7\r", b"MSH|^~\\&|A|B|C|D|2026||REF^I12\r", b"MSH#^~\\&#A#B\r",
])
def test_appendix_a2_and_nhapi_inputs_never_crash(raw):
    t = triage(raw, POLICY)
    assert not any(p.code == 207 for p in t.errors), t.errors
    assert t.not_hl7 or t.errors  # each gets a NAK or a logged close, never an exception


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_triage_never_raises(data):
    t = triage(data, POLICY)
    assert (t.code == "AA") == (not t.errors and t.not_hl7 is None)
    assert not any(p.code == 207 for p in t.errors), t.errors  # 207 = triage itself failed


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_triage_msh_prefixed(text):
    t = triage(("MSH|^~\\&|" + text).encode("utf-8", "surrogatepass"), POLICY)
    assert t.not_hl7 is None
    assert not any(p.code == 207 for p in t.errors), t.errors
