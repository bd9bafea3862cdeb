import pytest

from hl7referral.v2.paths import PathError, Reader, parse_path

MSG = ("MSH|^~\\&|EHR|CLINIC|HUB|HUB|20260101||REF^I12^REF_I12|P1|P|2.5.1\r"
       "PRD|RP^Referring^HL70286|Ref^Robin^^^Dr|1 Main^^Town^ST^00001||^WPN^PH^^1^555^5550100|1234567893^NPI\r"
       "PRD|RT|Spec^Sam|2 Side^^City^ST^00002\r"
       "PID|1||M1^^^CLINIC^MR~S1^^^SSA^SS~M2^^^&1.2.3&ISO^MR||Smith\\T\\Jones^Pat||19700101|F\r"
       "NK1|1|Owner^Olive|OWN^Owner|3 Farm Rd^^Village^ST|^PRN^PH^^^555^5550199\r"
       "NK1|2|Other^Kin|SIB\r"
       "DG1|1||I10^Hypertension^I10\rDG1|2||E11.9^Type 2 diabetes^I10\r").encode()


@pytest.fixture(scope="module")
def reader():
    return Reader(MSG.decode())


@pytest.mark.parametrize("path, expected", [
    ("PID-5.1", ["Smith&Jones"]),                       # unescaped
    ("PRD[RT]-2.1", ["Spec"]),
    ("PRD[RP]-2.2", ["Robin"]),
    ("PRD[1=RP]-6.2", ["NPI"]),
    ("PID-3(*).1", ["M1", "S1", "M2"]),
    ("PID-3(2).1", ["S1"]),
    ("PID-3[5=MR].1", ["M1", "M2"]),
    ("PID-3(3).4.2", ["1.2.3"]),
    ("NK1[3=OWN]-2.2", ["Olive"]),
    ("DG1(*)-3.1", ["I10", "E11.9"]),
    ("DG1(2)-3.2", ["Type 2 diabetes"]),
    ("MSH-9.2", ["I12"]),
    ("MSH-10", [[["P1"]]]),
    ("OBX-5", []),                                      # absent segment: no value, no error
    ("PID-99", []),
])
def test_paths(reader, path, expected):
    assert reader.values(parse_path(path)) == expected


def test_relative_path_reads_the_given_segment(reader):
    dg1s = reader.values(parse_path("DG1(*)"))
    assert [reader.values(parse_path("3.1"), seg) for seg in dg1s] == [["I10"], ["E11.9"]]


@pytest.mark.parametrize("bad", ["", "PID-", "pid-3", "PID-0", "PID-3.0", "[RT]-2", "PID-3(0)", "P-3"])
def test_bad_paths_are_named(bad):
    with pytest.raises(PathError):
        parse_path(bad)


@pytest.mark.parametrize("raw", [
    MSG,
    b"\xef\xbb\xbf\r\n" + MSG.replace(b"Smith", "Sm\u00eft\u00e9".encode()).replace(
        b"2.5.1\r", b"2.5.1||||||UNICODE UTF-8\r"),  # BOM, a blank line, UTF-8 text
    MSG.replace(b"|", b"#").replace(b"^~\\&", b"@!$%"),  # other delimiters
])
def test_a_message_read_from_bytes_reads_as_its_text(raw):
    """read_message reuses the header it read for the charset: the reader must equal one made from the text."""
    from hl7referral.cda.mapping import read_message
    from hl7referral.v2.header import BOM, read_header
    from hl7referral.v2.charset import codec_for

    from_bytes = read_message(raw)
    from_text = Reader(raw.removeprefix(BOM).decode(codec_for(read_header(raw).charset)))
    assert from_bytes.segments_list == from_text.segments_list
    for path in ("PID-5.1", "PID-5", "PRD[RP]-2.2", "PID-3(*)", "DG1(*)-3.1", "MSH-2"):
        assert from_bytes.values(parse_path(path)) == from_text.values(parse_path(path)), path
