"""MSH-18 character sets (HL7 table 0211) mapped to Python codecs.

Invariant: every name maps to a codec whose encoding of the ASCII delimiters
and segment ids is the ASCII bytes themselves, so MSH can be read before the
charset is known. UTF-16/UCS-2 ("UNICODE UTF-16", "UNICODE UTF-32") break that
and are refused.
"""

from __future__ import annotations

# HL7 table 0211, the values that can travel over MLLP as 8-bit framed text.
_TABLE_0211 = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "latin-1",
    "ISO IR100": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    # "UNICODE" (v2.3-2.5) names no encoding form; senders on MLLP mean UTF-8,
    # since UCS-2 could not be framed with VT/FS. Documented in the README.
    "UNICODE": "utf-8",
}


class UnknownCharset(ValueError):
    pass


def codec_for(msh18: str, default: str = "ascii") -> str:
    """The Python codec for an MSH-18 value (first repetition), or ``default``."""
    name = msh18.strip().upper()
    if not name:
        return default
    try:
        return _TABLE_0211[name]
    except KeyError:
        raise UnknownCharset(msh18) from None


def hl7_name_for(codec: str) -> str:
    """The MSH-18 value to write for a codec ('' for ASCII)."""
    for hl7_name, c in _TABLE_0211.items():
        if c == codec:
            return "" if c == "ascii" else hl7_name
    return ""


class CharsetMismatch(ValueError):
    """Bytes do not decode as declared, or look like another charset."""


def decode(raw: bytes, codec: str) -> str:
    """Decode strictly. Raises :class:`CharsetMismatch` with a readable reason.

    A message declared 8859/x whose non-ASCII bytes form valid UTF-8 sequences
    is refused: latin-1 decodes any bytes, so without this check UTF-8 text
    would be stored as silent mojibake (camel #10880).
    """
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise CharsetMismatch(
            f"bytes are not valid {codec} at offset {exc.start}"
        ) from None
    if codec.startswith(("latin", "iso8859")) and not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return text
        raise CharsetMismatch(f"declared {codec} but the bytes are UTF-8")
    return text
