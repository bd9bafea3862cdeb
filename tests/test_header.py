import pytest
from hypothesis import given, settings, strategies as st

from hl7referral.v2.header import BrokenHeader, NotHL7, read_header, split_segments


def test_reads_msh_fields_with_default_delimiters():
    h = read_header(b"MSH|^~\\&|APP|FAC|RAPP|RFAC|20260101||REF^I12^REF_I12|C1|P|2.5.1|||AL|NE||UNICODE UTF-8\rPID|1\r")
    assert (h.sending_application, h.sending_facility, h.receiving_application, h.receiving_facility) == \
        ("APP", "FAC", "RAPP", "RFAC")
    assert (h.message_type, h.trigger_event, h.structure, h.control_id) == ("REF", "I12", "REF_I12", "C1")
    assert (h.processing_id, h.version, h.accept_ack_type, h.application_ack_type) == ("P", "2.5.1", "AL", "NE")
    assert h.charset == "UNICODE UTF-8" and h.enhanced_mode


def test_senders_own_delimiters():
    h = read_header(b"MSH#$%*!#APP#FAC$X#R#F#2026##REF$I12#C2#P#2.5\r")
    d = h.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == ("#", "$", "%", "*", "!")
    assert h.sending_facility == "FAC$X" and h.type_and_event == "REF^I12"


def test_v27_truncation_character():
    h = read_header(b"MSH|^~\\&#|A|B|C|D|2026||REF^I12|C3|P|2.7\r")
    assert h.delimiters.truncation == "#" and h.control_id == "C3"


def test_missing_escape_character_keeps_ampersand_as_subcomponent():
    h = read_header(b"MSH|^~&|TUMMD|EWHIN|H|EWHIN|1994||REF^I11|T1|P|2.9\r")
    assert h.delimiters.escape == "" and h.delimiters.subcomponent == "&"


def test_bom_and_leading_newlines_are_skipped():
    h = read_header(b"\xef\xbb\xbf\r\nMSH|^~\\&|A|B|C|D|2026||ORM^O01|C4|P|2.6\n")
    assert h.control_id == "C4"


def test_control_id_with_leading_space_kept_as_sent():
    assert read_header(b"MSH|^~\\&|A|B|C|D|2026||SIU^S14| 38762|P|2.3\r").control_id == " 38762"


@pytest.mark.parametrize("data, what", [
    (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><x>&e;</x>", "XML"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP"),
    (b"\x16\x03\x01\x00\xa5\x01\x00", "TLS"),
    (b"", "empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"FHS|^~\\&|A\rBHS|^~\\&|\r", "batch"),
])
def test_not_hl7(data, what):
    with pytest.raises(NotHL7, match=what):
        read_header(data)


@pytest.mark.parametrize("data", [b"MSH", b"MSHH0\r", b"MSH|^^~&|x", b"MSH|||", b"MSHA^~\\&A"])
def test_broken_header(data):
    with pytest.raises(BrokenHeader):
        read_header(data)


@pytest.mark.parametrize("text, expected", [
    ("MSH|1\rPID|2\r", ["MSH|1", "PID|2"]),
    ("MSH|1\nPID|2\n", ["MSH|1", "PID|2"]),
    ("MSH|1\r\nPID|2\r\n", ["MSH|1", "PID|2"]),
    ("MSH|1\r\rPID|2", ["MSH|1", "PID|2"]),
    ("\nMSH|1\rNTE|line one\nline two\r", ["MSH|1", "NTE|line one\nline two"]),
])
def test_segment_separators(text, expected):
    assert split_segments(text) == expected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_only_declared_exceptions(data):
    try:
        read_header(data)
    except (NotHL7, BrokenHeader):
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_msh_prefixed(text):
    try:
        h = read_header(b"MSH" + text.encode("utf-8"))
    except (NotHL7, BrokenHeader):
        return
    for n in range(20):  # every accessor works on whatever was read
        h.field(n), h.component(n, 2)
    h.type_and_event, h.sending_facility, h.enhanced_mode
