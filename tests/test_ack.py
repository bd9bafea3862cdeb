"""ACK/NAK building (reliability-tests.md 19-22), read back with python-hl7."""

import hl7
import pytest
from hypothesis import given, settings, strategies as st

from hl7referral.v2.ack import build_ack, escape, fallback_ack, response_code
from hl7referral.v2.header import DEFAULT_DELIMITERS, read_header
from hl7referral.v2.triage import Policy, Problem, triage
from messages import ref_i12

TS = "20260102030405+0000"
POLICY = Policy.simple({"REF^I12": "ref-i12"})


def ack_for(raw: bytes, code=None, errors=None, codec=None):
    t = triage(raw, POLICY)
    code = code or response_code(t.header, t.code)
    return build_ack(t.header, code, t.errors if errors is None else errors, control_id="ACK1",
                     timestamp=TS, codec=codec or t.codec)


def parsed(ack: bytes, codec="ascii") -> hl7.Message:
    assert ack.endswith(b"\r"), "every segment, the last included, ends with CR (Mirth #504)"
    return hl7.parse(ack.decode(codec))


def test_positive_ack_mirrors_the_header():
    m = parsed(ack_for(ref_i12("CTL42")))
    msh = m.segment("MSH")
    assert str(msh[3]) == "HL7REF" and str(msh[4]) == "HUB"        # our side = original receiver
    assert str(msh[5]) == "EHR" and str(msh[6]) == "CLINIC"        # back to the sender
    assert str(msh[9]) == "ACK^I12^ACK" and str(msh[10]) == "ACK1"
    assert str(msh[11]) == "P" and str(msh[12]) == "2.5.1" and str(msh[7]) == TS
    assert str(m.segment("MSA")[1]) == "AA" and str(m.segment("MSA")[2]) == "CTL42"
    with pytest.raises(KeyError):
        m.segment("ERR")


def test_ack_structure_validates_with_hl7apy():
    from hl7apy.parser import parse_message
    from hl7apy.consts import VALIDATION_LEVEL
    raw = ack_for(ref_i12("CTL43"), code="AE",
                  errors=(Problem(101, "RF1", 6, "required originating referral identifier missing"),))
    msg = parse_message(raw.decode().replace("\r", "\r"), validation_level=VALIDATION_LEVEL.STRICT,
                        find_groups=False)
    msg.validate()
    assert msg.msa.msa_1.value == "AE" and msg.err.err_3.err_3_1.value == "101"


def test_nak_carries_code_location_and_text_in_err():
    m = parsed(ack_for(ref_i12(rf1="RF1|P|R|MED|RP|O|")))
    assert str(m.segment("MSA")[1]) == "AE"
    err = m.segment("ERR")
    assert str(err[2]) == "RF1^1^6"
    assert str(err[3][0][0]) == "101" and str(err[3][0][2]) == "HL70357"
    assert str(err[4]) == "E"
    assert "referral identifier" in str(err[8])


def test_old_versions_get_err_1():
    raw = ref_i12(version="2.3", rf1=None)
    m = parsed(ack_for(raw))
    err1 = m.segment("ERR")[1]
    assert str(err1[0][0]) == "RF1" and str(err1[0][3]).startswith("101&")
    assert str(m.segment("MSH")[9]) == "ACK^I12"  # no structure component before 2.3.1


@pytest.mark.parametrize("msh15_16, outcome, expected", [
    ("", "AA", "AA"), ("", "AE", "AE"), ("", "AR", "AR"),
    ("|||AL|AL", "AA", "CA"), ("|||AL|AL", "AE", "CE"), ("|||AL|NE", "AR", "CR"),
    ("|||NE|AL", "AA", None), ("|||NE|NE", "AE", None),
    ("|||ER|AL", "AA", None), ("|||ER|AL", "AE", "CE"),
    ("|||SU|AL", "AA", "CA"), ("|||SU|AL", "AR", None),
    ("||||AL", "AA", "CA"),
])
def test_acknowledgement_modes(msh15_16, outcome, expected):
    h = read_header(ref_i12(msh_extra=msh15_16))
    assert response_code(h, outcome) == expected


def test_senders_delimiters_are_used():
    raw = ref_i12(delims="#$%*!", kind="REF$I12$REF_I12", rf1="RF1#P#R#MED#RP#O#",
                  pid="PID#1##M1$$$C$MR##Test$Pat##19700101#F")
    ack = ack_for(raw)
    assert ack.startswith(b"MSH#$%*!#HL7REF#HUB#EHR#CLINIC#")
    assert b"#ACK$I12$ACK#" in ack
    assert b"MSA#AE#C1#" in ack
    assert b"ERR##RF1$1$6#101$Required field missing$HL70357#E#" in ack


def test_text_is_escaped_with_senders_escape():
    d = DEFAULT_DELIMITERS
    assert escape("a|b^c~d\\e&f", d) == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f"


def test_missing_escape_neutralises_delimiters():
    raw = ref_i12(delims="|^~&", kind="REF^I99")
    ack = ack_for(raw)
    assert ack.startswith(b"MSH|^~&|") and b"REF I99" in ack


def test_ack_in_the_senders_charset():
    raw = ref_i12(msh_extra="||||||8859/1", pid="PID|1||M1^^^C^MR||Sørensen||19700101|F").decode().encode("latin-1")
    ack = ack_for(raw)
    assert b"|8859/1\r" in ack.split(b"\r")[0] + b"\r"
    err_ack = build_ack(read_header(raw), "AE", (Problem(102, "PID", 5, "Sørensen is wrong"),),
                        control_id="A", timestamp=TS, codec="latin-1")
    assert "Sørensen".encode("latin-1") in err_ack


def test_fallback_when_header_unusable():
    ack = fallback_ack("A9", TS, "AR", (Problem(102, "MSH", 2, "unreadable encoding characters"),))
    m = parsed(ack)
    assert str(m.segment("MSA")[1]) == "AR" and str(m.segment("MSA")[2]) == ""
    assert str(m.segment("ERR")[3][0][0]) == "102"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["AA", "AE", "AR", "CA", "CE", "CR"]))
def test_fuzz_nak_builder_never_raises(data, code):
    t = triage(data, POLICY)
    ack = build_ack(t.header, code, t.errors, control_id="Z", timestamp=TS, codec=t.codec)
    assert ack.startswith(b"MSH") and ack.endswith(b"\r")
    assert b"\rMSA" in ack and read_header(ack).control_id == "Z"
