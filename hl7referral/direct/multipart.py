"""MIME header blocks and multipart bodies read straight off the bytes (sans-I/O, RFC 2045/2046).

Two readers need the exact bytes rather than the stdlib's parsed tree:

* S/MIME verification (:mod:`.smime`): the signature covers the first part of a
  ``multipart/signed`` exactly as transmitted, which only slicing the received bytes gives;
* the MDN reader (:mod:`.mdn`): CPython before 3.13 compiles a new regular expression for
  every boundary its feed parser meets (python/cpython gh-106628), about 110 µs of the 190 µs
  an MDN took to parse; split here, each part is still parsed by the stdlib, none of them
  with a boundary of its own.

Invariants
----------
* :func:`head` never raises on any bytes: headers are read as latin-1 (every byte maps),
  a line without a colon is skipped, a repeated field keeps its first value.
* :func:`delimiters` follows RFC 2046 section 5.1.1: a delimiter is ``--boundary`` at the
  start of a line, then transport padding (spaces, tabs), then a line break (or the end);
  the CRLF before it belongs to it, so a part is exactly the bytes between two delimiters.
  Bare LF is accepted for messages that went through a Unix mailbox. A longer boundary
  that merely starts with ours is not a delimiter of ours.
* :func:`parts` returns ``None`` unless the body has an opening and a closing delimiter, none
  of them right after another: a truncated or ambiguous body is left to a lenient parser,
  never guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
_QUOTED_PAIR = re.compile(r"\\(.)")


@dataclass
class Head:
    fields: dict[str, str]  # lower-case name -> unfolded value (first occurrence)
    body: int  # offset of the body in the bytes parsed

    def content_type(self) -> tuple[str, dict[str, str]]:
        """(lower-case type/subtype, {lower-case parameter: value}); text/plain when absent (RFC 2045)."""
        value = self.fields.get("content-type", "text/plain")
        semi = value.find(";")
        mime_type = (value if semi < 0 else value[:semi]).strip().lower()
        params = {}
        if semi >= 0:
            for name, raw in _PARAM.findall(value[semi:]):
                if raw.startswith('"'):
                    raw = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
                params.setdefault(name.lower(), raw)
        return mime_type, params

    def transfer_encoding(self) -> str:
        return self.fields.get("content-transfer-encoding", "7bit").strip().lower()


def head(data: bytes, start: int = 0) -> Head:
    """The header block of the entity beginning at *start*, and where its body begins."""
    if data.startswith(b"\r\n", start) or data.startswith(b"\n", start):  # no headers at all
        return Head({}, start + (2 if data[start] == 0x0D else 1))
    match = _HEADER_END.search(data, start)
    end, body = (match.start(), match.end()) if match else (len(data), len(data))
    fields: dict[str, str] = {}
    current = None  # the field a continuation line extends (None: a repeated or broken field)
    # Headers are ASCII (DTS 196); latin-1 maps any byte so hostile input cannot raise here.
    for line in data[start:end].decode("latin-1").splitlines():
        if line[:1] in (" ", "\t"):  # folded continuation (RFC 5322 section 2.2.3)
            if current is not None:
                fields[current] += " " + line.strip()
            continue
        colon = line.find(":")
        name = line[:colon].strip().lower() if colon > 0 else ""
        current = name if name and name not in fields else None
        if current is not None:
            fields[current] = line[colon + 1:].strip()
    return Head(fields, body)


@dataclass(frozen=True)
class Delimiter:
    start: int     # where it begins, its leading line break included
    end: int       # just after its line break
    closing: bool  # ``--boundary--``


def delimiters(data: bytes, body: int, boundary: bytes, limit: int | None = None) -> list[Delimiter]:
    """The delimiters of *boundary* in the body starting at offset *body*, up to the closing one
    (or *limit* of them)."""
    # bytes.find rather than one regex: a pattern with an optional leading CRLF is tried at
    # every offset and took 3 ms on a 40 KB entity.
    dash = b"--" + boundary
    found: list[Delimiter] = []
    pos = body
    while limit is None or len(found) < limit:
        at = data.find(dash, pos)
        if at < 0:
            break
        pos = at + len(dash)
        if at != body and data[at - 1] != 0x0A:
            continue  # "--boundary" not at the start of a line: part of the content
        closing = data.startswith(b"--", pos)
        end = pos + 2 if closing else pos
        while end < len(data) and data[end] in b" \t":  # transport padding
            end += 1
        if data.startswith(b"\r\n", end):
            end += 2
        elif data.startswith(b"\n", end):
            end += 1
        elif end != len(data):
            continue  # a longer boundary that merely starts with ours
        start = at - 2 if data[at - 2:at] == b"\r\n" else at - 1 if at != body else at
        found.append(Delimiter(start, end, closing))
        if closing:
            break
    return found


def parts(data: bytes, body: int, boundary: bytes) -> list[bytes] | None:
    """The exact bytes of each body part, or None when the body has no opening and closing delimiter,
    or when a delimiter line follows another directly (the line break between them would belong to
    both: readers differ there, the stdlib's takes the second for content)."""
    found = delimiters(data, body, boundary)
    if len(found) < 2 or not found[-1].closing or any(b.start < a.end for a, b in zip(found, found[1:])):
        return None
    return [data[a.end:b.start] for a, b in zip(found, found[1:])]
