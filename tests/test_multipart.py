"""direct/multipart.py: header blocks and multipart bodies read off the bytes (RFC 2045/2046)."""

from __future__ import annotations

import email
import email.policy

from hypothesis import given, settings
from hypothesis import strategies as st

from hl7referral.direct import multipart


def entity(bodies: list[bytes], boundary: bytes = b"b1", eol: bytes = b"\r\n", padding: bytes = b"",
           epilogue: bytes = b"") -> bytes:
    head = b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"" + eol + eol + b"preamble" + eol
    out = head
    for body in bodies:
        out += b"--" + boundary + padding + eol + b"Content-Type: text/plain" + eol + eol + body + eol
    return out + b"--" + boundary + b"--" + padding + eol + epilogue


def test_head_reads_fields_folds_and_parameters():
    raw = (b"Content-Type: multipart/signed;\r\n protocol=\"application/pkcs7-signature\";\r\n"
           b"\tboundary=\"a \\\"b\\\"\"; micalg=sha-256\r\nX-Twice: one\r\nx-twice: two\r\nno colon here\r\n\r\nbody")
    h = multipart.head(raw)
    assert raw[h.body:] == b"body"
    assert h.fields["x-twice"] == "one"
    assert h.content_type() == ("multipart/signed", {"protocol": "application/pkcs7-signature",
                                                     "boundary": 'a "b"', "micalg": "sha-256"})
    assert h.transfer_encoding() == "7bit"


def test_head_without_fields_and_without_body():
    assert multipart.head(b"\r\nbody").body == 2
    assert multipart.head(b"\nbody").body == 1
    h = multipart.head(b"Subject: x")
    assert h.fields == {"subject": "x"} and h.body == len(b"Subject: x")
    assert h.content_type() == ("text/plain", {})   # RFC 2045's default


def test_parts_are_the_exact_bytes_between_delimiters():
    raw = entity([b"one\r\n\r\n", b"two --b1 inside", b""], padding=b" \t", epilogue=b"epilogue\r\n")
    body = multipart.head(raw).body
    assert multipart.parts(raw, body, b"b1") == [b"Content-Type: text/plain\r\n\r\none\r\n\r\n",
                                                 b"Content-Type: text/plain\r\n\r\ntwo --b1 inside",
                                                 b"Content-Type: text/plain\r\n\r\n"]


def test_a_longer_boundary_is_not_ours():
    raw = entity([b"--b1x is content\r\n--b1-- (a close delimiter needs a line break)x", b"two"])
    body = multipart.head(raw).body
    assert [p.split(b"\r\n\r\n", 1)[1] for p in multipart.parts(raw, body, b"b1")] == [
        b"--b1x is content\r\n--b1-- (a close delimiter needs a line break)x", b"two"]


def test_bare_lf_and_a_close_delimiter_ending_the_data():
    raw = entity([b"one", b"two"], eol=b"\n")[:-1]   # no line break after "--b1--": allowed (RFC 2046)
    body = multipart.head(raw).body
    assert multipart.parts(raw, body, b"b1") == [b"Content-Type: text/plain\n\none",
                                                 b"Content-Type: text/plain\n\ntwo"]


def test_without_a_close_delimiter_there_are_no_parts():
    raw = entity([b"one", b"two"]).rpartition(b"--b1--")[0]
    body = multipart.head(raw).body
    assert multipart.parts(raw, body, b"b1") is None
    assert multipart.parts(b"no delimiter at all", 0, b"b1") is None
    assert [d.closing for d in multipart.delimiters(raw, body, b"b1")] == [False, False]


def test_a_delimiter_right_after_another_gives_no_parts():
    """The line break between them would belong to both; the stdlib takes the second for content."""
    for raw in (b"\r\n--b1\r\n--b1--\r\n", b"\r\n--b1\r\n--b1\r\npart\r\n--b1--\r\n"):
        assert multipart.parts(raw, 2, b"b1") is None
    assert multipart.parts(b"\r\n--b1\r\n\r\n--b1--\r\n", 2, b"b1") == [b""]   # an empty part is a part


def test_delimiters_stop_at_the_limit():
    raw = entity([b"one", b"two", b"three"])
    body = multipart.head(raw).body
    assert len(multipart.delimiters(raw, body, b"b1", limit=2)) == 2
    assert [d.closing for d in multipart.delimiters(raw, body, b"b1")] == [False, False, False, True]


LINE = st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(LINE | st.sampled_from([b"--b1x", b" --b1", b"--b", b"b1--"]), max_size=5), min_size=1,
                max_size=4),
       st.sampled_from([b"\r\n", b"\n"]), st.sampled_from([b"", b" ", b"\t "]))
def test_parts_agree_with_the_stdlib_parser(bodies, eol, padding):
    """The stdlib's parser (the reference) finds the same parts, with the same contents."""
    raw = entity([eol.join(lines) for lines in bodies], eol=eol, padding=padding)
    mine = multipart.parts(raw, multipart.head(raw).body, b"b1")
    theirs = email.message_from_bytes(raw, policy=email.policy.compat32).get_payload()
    assert len(mine) == len(theirs) == len(bodies)
    for piece, part, lines in zip(mine, theirs, bodies):
        assert piece.partition(eol + eol)[2] == eol.join(lines)
        assert part.get_payload(decode=True) == eol.join(lines)
