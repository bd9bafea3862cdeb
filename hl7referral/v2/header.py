"""Read MSH (and the segment list) from raw bytes, without the full parser.

The ACK path must answer within microseconds and must never depend on the
full parser (python-hl7 takes ~1.2 ms for 1.9 KB and raises on several inputs
that still deserve a NAK, reliability-tests Appendix A2). This module reads
what the ACK needs straight from the bytes.

Invariants
----------
* :func:`read_header` never raises anything but :class:`NotHL7` and
  :class:`BrokenHeader`, whatever the input. ``NotHL7`` means no ACK can be
  built (no MSH): XML, HTTP, a TLS hello, binary. ``BrokenHeader`` means MSH is
  there but its delimiters are unusable; the caller answers from a fallback
  template.
* Delimiters are the sender's own (MSH-1 and MSH-2), never assumed.
* Segment separators: if the message contains ``\\r`` it alone separates
  segments (``\\r\\n`` counts as one; a lone ``\\n`` is content, since real
  NTE/OBX text carries literal LF); a message with no ``\\r`` is split on
  ``\\n``. Empty segments (``\\r\\r``, a leading newline) are dropped.
* Values are returned as they stand in the message (still escaped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BOM = b"\xef\xbb\xbf"
_SEG_ID = re.compile(r"[A-Z][A-Z0-9]{2}\Z")


class NotHL7(ValueError):
    """The payload is not an ER7 HL7 v2 message (no MSH at its start)."""


class BrokenHeader(ValueError):
    """MSH is present but its delimiters or fields cannot be read."""

    def __init__(self, reason: str, field_sep: str = "|") -> None:
        super().__init__(reason)
        self.field_sep = field_sep


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"  # '' when the sender declared none (MSH-2 = '^~&')
    subcomponent: str = "&"
    truncation: str = ""  # v2.7 fifth character
    msh2: str = "^~\\&"  # MSH-2 exactly as received


DEFAULT_DELIMITERS = Delimiters()


def _delimiters(field_sep: str, msh2: str) -> Delimiters:
    if not msh2:
        raise BrokenHeader("MSH-2 (encoding characters) is empty", field_sep)
    if field_sep.isalnum() or field_sep in "\r\n" or len(set(msh2 + field_sep)) != len(msh2) + 1:
        raise BrokenHeader("MSH-1/MSH-2 delimiters are not distinct", field_sep)
    if len(msh2) == 3 and msh2[2] == "&":
        # '^~&': the escape character was lost (an HTML rendering of '^~\&',
        # seen in HL7's own v2+ examples). Keep '&' as the subcomponent
        # separator it clearly is, and treat the message as having no escape.
        return Delimiters(field_sep, msh2[0], msh2[1], "", "&", "", msh2)
    parts = list(msh2[:5]) + [""] * (5 - min(len(msh2), 5))
    if len(msh2) > 5:
        raise BrokenHeader("MSH-2 has more than 5 encoding characters", field_sep)
    return Delimiters(field_sep, parts[0], parts[1], parts[2], parts[3], parts[4], msh2)


def split_segments(text: str) -> list[str]:
    """Split message text into segments per the module's separator rule."""
    text = text.lstrip("\r\n")
    if "\r" in text:
        parts = text.replace("\r\n", "\r").split("\r")
    else:
        parts = text.split("\n")
    return [p for p in parts if p.strip()]


@dataclass(frozen=True, slots=True)
class Header:
    """The fields of MSH, as received (still escaped).

    ``fields[n]`` is MSH-n (index 0 holds "MSH"). The values the ACK path uses
    on every message are computed once, by :func:`read_header`.
    """

    delimiters: Delimiters
    fields: tuple[str, ...]
    message_type: str = ""
    trigger_event: str = ""
    structure: str = ""
    control_id: str = ""  # kept as sent, spaces too: MSA-2 must echo it exactly
    processing_id: str = ""
    version: str = ""
    accept_ack_type: str = ""
    application_ack_type: str = ""
    charset: str = ""

    def field(self, n: int) -> str:
        f = self.fields
        return f[n] if n < len(f) else ""

    def component(self, n: int, c: int) -> str:
        value = self.field(n)
        if not value:
            return ""
        sep = self.delimiters.component
        parts = value.split(sep) if sep else [value]
        return parts[c - 1] if c <= len(parts) else ""

    @property
    def sending_application(self) -> str:
        return self.field(3)

    @property
    def sending_facility(self) -> str:
        return self.field(4)

    @property
    def receiving_application(self) -> str:
        return self.field(5)

    @property
    def receiving_facility(self) -> str:
        return self.field(6)

    @property
    def type_and_event(self) -> str:
        return f"{self.message_type}^{self.trigger_event}"

    @property
    def enhanced_mode(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)


def strip_leading(raw: bytes) -> bytes:
    """Drop a UTF-8 BOM and leading whitespace (blank lines before MSH)."""
    if raw.startswith(BOM):
        raw = raw[3:]
    return raw.lstrip(b"\r\n\t ")


def read_header(raw: bytes) -> Header:
    """Read MSH from a message's raw bytes. See the module invariants."""
    data = strip_leading(raw)
    if not data.startswith(b"MSH"):
        raise NotHL7(_describe(data))
    if len(data) < 8:
        raise BrokenHeader("MSH segment is truncated")
    end = len(data)
    for sep in (b"\r", b"\n"):
        i = data.find(sep)
        if 0 <= i < end:
            end = i
    # latin-1 maps bytes 1:1 to code points, so delimiter positions are exact
    # whatever the charset; values are re-decoded by the caller if needed.
    line = data[:end].decode("latin-1")
    if len(line) < 8:
        raise BrokenHeader("MSH segment is truncated")
    field_sep = line[3]
    rest = line[4:]
    cut = rest.find(field_sep)
    msh2 = rest if cut < 0 else rest[:cut]
    delims = _delimiters(field_sep, msh2)
    # fields[1] = MSH-1 (the separator itself), fields[2] = MSH-2, ...
    fields = ("MSH", field_sep, *rest.split(field_sep))
    n = len(fields)

    def get(i: int) -> str:
        return fields[i] if i < n else ""

    def split(value: str, sep: str) -> list[str]:
        # A short MSH-2 ('^') leaves some delimiters undeclared ('').
        return value.split(sep) if sep else [value]

    comp = delims.component
    msg_type = split(get(9), comp)
    return Header(
        delims, fields,
        message_type=msg_type[0].strip(),
        trigger_event=msg_type[1].strip() if len(msg_type) > 1 else "",
        structure=msg_type[2].strip() if len(msg_type) > 2 else "",
        control_id=get(10),
        processing_id=split(get(11), comp)[0].strip(),
        version=split(get(12), comp)[0].strip(),
        accept_ack_type=get(15).strip().upper(),
        application_ack_type=get(16).strip().upper(),
        charset=split(get(18), delims.repetition)[0].strip(),
    )


def _describe(data: bytes) -> str:
    head = data[:16]
    if head.startswith(b"\x16\x03"):
        return "a TLS handshake on a plain MLLP port"
    if head.startswith((b"<", b"\xef\xbb\xbf<")):
        return "XML (only ER7 is accepted on MLLP)"
    if re.match(rb"(GET|POST|PUT|HEAD|DELETE|OPTIONS|CONNECT) ", head):
        return "an HTTP request"
    if head.startswith((b"FHS", b"BHS")):
        return "an HL7 batch (FHS/BHS); send one message per frame"
    if not head:
        return "an empty frame"
    if not head.isascii() or any(b < 0x20 and b not in (9, 10, 13) for b in head):
        return "binary data"
    return "text that does not start with MSH"


def looks_like_segment_id(name: str) -> bool:
    return bool(_SEG_ID.match(name))
