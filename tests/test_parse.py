import pytest

from hl7referral.send import read_messages
from hl7referral.v2.parse import ParseError, normalise, parse_message
from messages import ref_i12


def test_parses_with_python_hl7_after_normalising():
    m = parse_message(b"\xef\xbb\xbf" + ref_i12("P1", sep="\r\n"))
    assert str(m.segment("MSH")[10]) == "P1" and str(m.segment("RF1")[6]) == "REF0001"


def test_missing_escape_keeps_ampersand_as_subcomponent():
    raw = b"MSH|^~&|A|B|C|D|1994||REF^I11|T1|P|2.9\rPRD|RP|X|^^^TUMMD&EWHIN\r"
    m = parse_message(raw)
    assert str(m.segment("PRD")[3][0][3][0]) == "TUMMD" and str(m.segment("PRD")[3][0][3][1]) == "EWHIN"


def test_escapes_are_unescaped_by_python_hl7():
    m = parse_message(ref_i12(pid="PID|1||M1^^^C^MR||Smith\\T\\Jones^Pat||19700101|F"))
    assert m.unescape(str(m.segment("PID")[5][0][0])) == "Smith&Jones"


def test_latin1_declared():
    raw = ref_i12(msh_extra="||||||8859/1", pid="PID|1||M^^^C^MR||Sørensen||19700101|F").decode().encode("latin-1")
    assert "Sørensen" in str(parse_message(raw).segment("PID")[5])


@pytest.mark.parametrize("raw", [b"", b"GET / HTTP/1.1", b"MSHH0\r", ref_i12(msh_extra="||||||EBCDIC")])
def test_parse_errors_are_readable(raw):
    with pytest.raises(ParseError):
        parse_message(raw)


def test_normalise():
    assert normalise("\ufeffMSH|1\nPID|2\n") == "MSH|1\rPID|2"


def test_every_corpus_message_parses(corpus):
    for path in sorted(corpus.glob("*.hl7")):
        for raw in read_messages(path):
            m = parse_message(raw)
            kinds = {"ACK", "MDM", "OMG", "ORM", "OSU", "REF", "RRI", "SIU"}
            assert str(m.segment("MSH")[9]).split("^")[0] in kinds, path.name
