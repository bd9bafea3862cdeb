"""The full ER7 parse, with python-hl7, run after the ACK (never on its path).

python-hl7's ``parse`` splits segments on ``\\r`` only and takes the
delimiters from MSH-1/2; this module normalises what real feeds send first:
a UTF-8 BOM, ``\\n`` or ``\\r\\n`` separators (by the same rule as
:func:`hl7referral.v2.header.split_segments`), and MSH-2 without its escape
character (``^~&``), which python-hl7 would otherwise mis-split (#64).

Invariant: :func:`parse_message` raises only :class:`ParseError`, with a
readable reason; the stored raw bytes are never changed by it.
"""

from __future__ import annotations

import hl7

from . import charset
from .header import BOM, BrokenHeader, NotHL7, read_header, split_segments


class ParseError(ValueError):
    pass


def normalise(text: str) -> str:
    """Message text with ``\\r`` between segments and no BOM."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return "\r".join(split_segments(text))


def parse_message(raw: bytes, default_charset: str = "ascii") -> hl7.Message:
    try:
        header = read_header(raw)
        codec = charset.codec_for(header.charset, default_charset)
        text = normalise(raw.removeprefix(BOM).decode(codec, errors="strict"))
    except (NotHL7, BrokenHeader, charset.UnknownCharset, UnicodeDecodeError) as exc:
        raise ParseError(str(exc)) from None
    d = header.delimiters
    if not d.escape:
        # python-hl7 reads MSH-2[2] as the escape character; give it one the
        # message cannot contain so '&' stays the subcomponent separator.
        text = text.replace(f"MSH{d.field}{d.msh2}", f"MSH{d.field}{d.component}{d.repetition}\x1a{d.subcomponent}", 1)
    try:
        return hl7.parse(text)
    except Exception as exc:  # python-hl7 raises several types (Appendix A2)
        raise ParseError(f"{type(exc).__name__}: {exc}") from None
