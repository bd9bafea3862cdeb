import pytest

from hl7referral.v2.charset import CharsetMismatch, UnknownCharset, codec_for, decode, hl7_name_for


@pytest.mark.parametrize("msh18, codec", [
    ("", "ascii"), ("ASCII", "ascii"), ("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8"),
    ("UNICODE", "utf-8"), ("unicode utf-8", "utf-8"), ("8859/15", "iso8859-15"),
])
def test_table_0211(msh18, codec):
    assert codec_for(msh18) == codec


def test_unknown_charset():
    with pytest.raises(UnknownCharset):
        codec_for("EBCDIC")


def test_utf8_decodes():
    assert decode("é ø 中文".encode(), "utf-8") == "é ø 中文"


def test_latin1_decodes():
    assert decode("Sørensen".encode("latin-1"), "latin-1") == "Sørensen"


def test_declared_latin1_but_utf8_bytes_is_refused():
    with pytest.raises(CharsetMismatch, match="UTF-8"):
        decode("Sørensen".encode("utf-8"), "latin-1")


def test_invalid_utf8_is_refused_with_offset():
    with pytest.raises(CharsetMismatch, match="offset 3"):
        decode(b"abc\xff", "utf-8")


def test_non_ascii_in_ascii_is_refused():
    with pytest.raises(CharsetMismatch):
        decode("é".encode(), "ascii")


def test_hl7_name_round_trip():
    assert hl7_name_for("utf-8") in ("UNICODE UTF-8", "ISO IR192", "UNICODE")
    assert hl7_name_for("ascii") == ""
