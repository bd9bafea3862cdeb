"""Build MDM^T02 (original document notification and content): the consult note that closes the loop.

Sans-I/O: a :class:`ConsultNote` and header values in, the message bytes out
(no MLLP frame; :func:`hl7referral.v2.framer.encode_frame` adds it).

Layout (HL7 v2.5.1 MDM_T02 = ``MSH [{SFT}] EVN PID PV1 [{COMMON_ORDER}] TXA {OBX [{NTE}]}``)::

    MSH  MSH-9 MDM^T02^MDM_T02, MSH-10 control id, MSH-11 processing id, MSH-12 version,
         MSH-15/16 empty (original mode: one ACK, AA/AE/AR), MSH-18 "UNICODE UTF-8" only
         when the message holds non-ASCII text (else empty = ASCII)
    EVN  EVN-2 recorded time; EVN-1 empty (backward-compatible only in 2.5.1, withdrawn in
         2.7, where hl7apy rejects it)
    PID  PID-3 patient identifiers (all repetitions), PID-5 patient name
    PV1  PV1-2 patient class (O: an outpatient consult)
    TXA  TXA-2 document type (CN), TXA-3 TX for text / AP for a document, TXA-4 activity
         time, TXA-5 author, TXA-6 origination time, TXA-12 unique document number,
         TXA-14 placer order number = the referral id (then the placer order, if another),
         TXA-17 completion status (AU)
    OBX  OBX-3 = LOINC code ^ title ^ LN; OBX-11 F (P while the document is not
         authenticated)

Correlating key: the referral id travels in **TXA-14** (placer order number), the
field the referring EHR already keys its order on: 360X's referral id *is* the placer
order number (ORC-2/OBR-2, SCH-26; ``v2-messages.md`` §0 #4, §2). TXA-12 stays what HL7
defines it as, this document's own id; TXA-13 (parent document) is for T05+ addenda
and replacements. If the EHR's placer order differs from the referral id (a REF^I12 with
RF1-6 next to an order), it is the second repetition; the first is always the referral id.

Text notes: **one OBX, OBX-2 TX, per line**, OBX-4 ``1`` on every line (one observation
continued over several segments, ordered by OBX-1). Not FT with ``\\.br\\`` because: a
TX line is displayed as is by every receiver, while FT formatting commands are shown
literally by those that do not interpret them; a blank line stays a line; and FT puts
the whole note in one OBX-5, which HL7 2.5.1 caps at 65536 characters, while a long
consult note is only limited per line. Tabs are expanded to
spaces (8 columns): TX has no tab, and a hex escape would not be displayed as one.

Documents (a C-CDA, a PDF): one OBX, OBX-2 ED, OBX-5 = ``^<type>^<subtype>^Base64^<data>``
(ED: source application ^ type of data ^ data subtype ^ encoding ^ data), e.g.
``^Application^XML^Base64^...`` for a C-CDA and ``^Application^PDF^Base64^...``; the
base64 alphabet holds no delimiter, and it carries no line breaks. "Application" is the MIME
top-level type (v2.7+ table 0834 style, what receivers of C-CDA and PDF in ED expect);
2.5.1's table 0191 would say ``AP``, which is what TXA-3 carries.

Invariants
----------
* Every free-text value (note lines, title) is escaped with the message's delimiters by
  python-hl7's ``escape`` (``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\``). Two deliberate departures, both
  about characters rather than delimiters: non-ASCII characters are written as they are
  in UTF-8 (and MSH-18 says so) instead of python-hl7's ``\\Xhh\\`` code-point escape,
  which is right only for Latin-1 and unreadable above U+00FF; control characters (VT
  and FS included) become ``\\XHH\\`` through python-hl7's application map, zero-padded
  where python-hl7 would pad with a space. So no value can break a segment or an MLLP
  frame.
* ER7-typed inputs (ids, names, provider) are checked, not escaped, because they
  already are ER7: none may hold the field separator, a segment break or a control
  character, and only repeating fields (PID-3, TXA-5) may hold ``~``. A value that would
  break the structure raises ``ValueError`` naming the field, as does a malformed
  timestamp, control id or note.
* Every segment ends with ``\\r``, the last one too; there is no ``\\n`` in the output.
* The output passes hl7apy's STRICT validation of MDM_T02 (v2.3.1 to 2.8) when PID-3
  is given and no OBX-5 component is longer than 199 characters. That last condition
  is hl7apy's, not HL7's: hl7apy does not resolve OBX-5's ``varies`` type from OBX-2
  and checks every component as ST (199), so a longer line or any real base64
  document fails there while being valid HL7 (``tests/test_mdm.py`` shows both).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import hl7

SEGMENT = "\r"
FIELD, COMPONENT, REPETITION, ESCAPE, SUBCOMPONENT = "|", "^", "~", "\\", "&"
ENCODING_CHARACTERS = COMPONENT + REPETITION + ESCAPE + SUBCOMPONENT

CONSULT_NOTE_LOINC = "11488-4"  # LOINC "Consult note"

# MIME media type -> ED type of data ^ data subtype.
ED_TYPES = {
    "text/xml": ("Application", "XML"),  # a C-CDA: ^Application^XML^Base64^
    "application/xml": ("Application", "XML"),
    "application/pdf": ("Application", "PDF"),
    "application/rtf": ("Application", "RTF"),
    "text/rtf": ("Application", "RTF"),
    "text/html": ("Text", "HTML"),
}

# python-hl7 escapes with a container's delimiters; this one holds the message's.
_DELIMS = hl7.Message(separator=SEGMENT, esc=ESCAPE, separators=SEGMENT + FIELD + REPETITION + COMPONENT + SUBCOMPONENT)
# Control characters as zero-padded hex (python-hl7 would write "\X b\" for VT).
_CONTROLS = {chr(c): f"X{c:02X}" for c in (*range(0x20), 0x7F) if c != 0x0D}
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ER7_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f|]")
_TIMESTAMP = re.compile(r"\d{4}(\d{2}){0,5}(\.\d{1,4})?([+-]\d{4})?\Z")


# MDM triggers with the document's content: an original (T02) and its revisions (table 0003).
MDM_TRIGGERS = ("T02", "T04", "T06", "T08", "T10")
REVISES_PARENT = ("T06", "T08", "T10")   # addendum, edit, replacement: TXA-13 names the revised document


@dataclass(frozen=True, slots=True)
class ConsultNote:
    """A specialist's consult note going back to the referring EHR.

    ER7 fields hold HL7 text as it stands in a message (components with ``^``, already
    escaped): ``referral_id``, ``unique_document_id``, ``placer_order`` (EI),
    ``patient_ids`` (CX repetitions), ``patient_name`` (XPN), ``author`` (XCN). Free-text
    fields (``title``, ``text``) are plain text and escaped by the builder.

    Exactly one of ``text`` (plain text, one OBX TX per line) or ``document`` (bytes,
    with ``media_type``, one OBX ED in base64) is given.
    """

    referral_id: str  # EI, e.g. 889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO -> TXA-14
    unique_document_id: str  # EI -> TXA-12
    title: str = "Consult note"  # -> OBX-3.2
    text: str | None = None
    document: bytes | None = None
    media_type: str | None = None  # a key of ED_TYPES
    placer_order: str | None = None  # EI -> TXA-14 second repetition, when not the referral id
    patient_ids: str = ""  # CX~CX -> PID-3
    patient_name: str = ""  # XPN -> PID-5
    document_type: str = "CN"  # table 0270 -> TXA-2
    author: str = ""  # XCN -> TXA-5
    completion_status: str = "AU"  # table 0271 -> TXA-17
    activity_time: str = ""  # HL7 TS -> TXA-4 (when the consult took place)
    origination_time: str = ""  # HL7 TS -> TXA-6 (when the note was written)
    parent_document_id: str = ""  # EI -> TXA-13: the document a revision (T06, T08, T10) revises
    loinc: str = CONSULT_NOTE_LOINC  # -> OBX-3.1
    patient_class: str = "O"  # table 0004 -> PV1-2

    def __post_init__(self) -> None:
        if (self.text is None) == (self.document is None):
            raise ValueError("a consult note carries either text or a document, exactly one")
        if self.document is not None:
            if not isinstance(self.document, bytes | bytearray | memoryview):
                raise ValueError("document must be bytes")
            if not self.document:
                raise ValueError("document is empty")
            if (self.media_type or "").lower() not in ED_TYPES:
                raise ValueError(f"media_type {self.media_type!r} is not one of {', '.join(sorted(ED_TYPES))}")
        elif self.media_type is not None:
            raise ValueError("media_type goes with document, not with text")
        if self.text is not None and not self.text.strip():
            raise ValueError("note text is empty")


def escape(text: str) -> str:
    """Free text escaped for a field of this module's messages (see the invariants)."""
    out: list[str] = []
    pos = 0
    for m in _NON_ASCII.finditer(text):
        out.append(_escape_ascii(text[pos : m.start()]))
        out.append(m.group())
        pos = m.end()
    out.append(_escape_ascii(text[pos:]))
    return "".join(out)


def _escape_ascii(text: str) -> str:
    return _DELIMS.escape(text, app_map=_CONTROLS) if text else text


def text_lines(text: str) -> list[str]:
    """The note's lines: split at CR LF, CR or LF; one final line break does not add a line."""
    lines = _LINE_BREAK.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def ed_value(document: bytes, media_type: str) -> str:
    """OBX-5 of an ED observation: ``^type^subtype^Base64^data``."""
    kind, subtype = ED_TYPES[media_type.lower()]
    data = base64.b64encode(bytes(document)).decode("ascii")
    return COMPONENT.join(["", kind, subtype, "Base64", data])


def _er7(value: str | None, field: str, *, repeats: bool = False) -> str:
    value = value or ""
    if _ER7_FORBIDDEN.search(value):
        raise ValueError(f"{field} holds a field separator or a control character")
    if not repeats and REPETITION in value:
        raise ValueError(f"{field} does not repeat; '~' is not allowed")
    return value


def _single_line(text: str) -> str:
    """A one-line value (a title): line breaks and tabs become spaces."""
    return _LINE_BREAK.sub(" ", text).replace("\t", " ")


def _timestamp(value: str, field: str) -> str:
    if value and not _TIMESTAMP.match(value):
        raise ValueError(f"{field} is not an HL7 timestamp (YYYYMMDD[HHMM[SS[.S]]][+ZZZZ])")
    return value


def build_mdm_t02(
    note: ConsultNote,
    *,
    control_id: str,
    now_hl7: str,
    sending: tuple[str, str],
    receiving: tuple[str, str],
    version: str = "2.5.1",
    processing_id: str = "P",
    trigger: str = "T02",
) -> bytes:
    """The MDM^T02 message carrying ``note``, as bytes (UTF-8; ASCII unless the text is not).

    ``control_id`` becomes MSH-10 (the ACK's MSA-2 must echo it); ``now_hl7`` is an HL7
    timestamp (:func:`hl7referral.engine.ingest.hl7_timestamp`) for MSH-7 and EVN-2;
    ``sending`` and ``receiving`` are (application, facility) as HD ER7 text. ``trigger``: T02
    (an original document), or a revision of one the chart has: T04 (its status changed: the
    same TXA-12), T06 (an addendum), T08 (an edit) or T10 (a replacement), the last three with
    the revised document in TXA-13 (``note.parent_document_id``); all with the MDM_T02 structure.
    """
    if trigger not in MDM_TRIGGERS:
        raise ValueError(f"trigger must be one of {', '.join(MDM_TRIGGERS)}")
    if trigger in REVISES_PARENT and not note.parent_document_id:
        raise ValueError(f"MDM^{trigger} needs the document it revises (parent_document_id)")
    if not control_id or _ER7_FORBIDDEN.search(control_id) or any(c in control_id for c in ENCODING_CHARACTERS):
        raise ValueError("control_id must be non-empty and hold no delimiter or control character")
    if not _TIMESTAMP.match(now_hl7 or ""):
        raise ValueError("now_hl7 is not an HL7 timestamp")
    if not note.referral_id or not note.unique_document_id:
        raise ValueError("referral_id and unique_document_id are required")
    send_app, send_fac = (_er7(v, f"sending[{i}]") for i, v in enumerate(sending))
    recv_app, recv_fac = (_er7(v, f"receiving[{i}]") for i, v in enumerate(receiving))
    structure = f"MDM{COMPONENT}{trigger}{COMPONENT}MDM_T02"

    referral = _er7(note.referral_id, "referral_id")
    placers = [referral]
    placer = _er7(note.placer_order, "placer_order")
    if placer and placer != referral:
        placers.append(placer)
    is_document = note.document is not None

    txa = [""] * 18
    txa[0] = "TXA"
    txa[1] = "1"
    txa[2] = _er7(note.document_type, "document_type")
    txa[3] = "AP" if is_document else "TX"
    txa[4] = _timestamp(note.activity_time, "activity_time")
    txa[5] = _er7(note.author, "author", repeats=True)
    txa[6] = _timestamp(note.origination_time, "origination_time")
    txa[12] = _er7(note.unique_document_id, "unique_document_id")
    txa[13] = _er7(note.parent_document_id, "parent_document_id")
    txa[14] = REPETITION.join(placers)
    txa[17] = _er7(note.completion_status, "completion_status")

    obx3 = COMPONENT.join([_er7(note.loinc, "loinc"), escape(_single_line(note.title)), "LN"])
    status = "F" if note.completion_status in ("AU", "LA") else "P"
    if is_document:
        observations = [("ED", "", ed_value(note.document, note.media_type))]
    else:
        observations = [("TX", "1", escape(line.expandtabs())) for line in text_lines(note.text)]

    segments = [
        [
            "MSH", ENCODING_CHARACTERS, send_app, send_fac, recv_app, recv_fac, now_hl7, "", structure, control_id,
            _er7(processing_id, "processing_id"), _er7(version, "version"),
        ],
        ["EVN", "", now_hl7],
        ["PID", "1", "", _er7(note.patient_ids, "patient_ids", repeats=True), "",
         _er7(note.patient_name, "patient_name")],
        ["PV1", "1", _er7(note.patient_class, "patient_class")],
        txa,
    ]
    for n, (value_type, sub_id, value) in enumerate(observations, 1):
        segments.append(["OBX", str(n), value_type, obx3, sub_id, value, "", "", "", "", "", status])
    text = SEGMENT.join(FIELD.join(fields) for fields in segments) + SEGMENT
    if not text.isascii():
        # MSH-18 is field 18: MSH holds 12 fields here, so 5 empty ones (13-17) come first.
        head, rest = text.split(SEGMENT, 1)
        text = head + FIELD * 6 + "UNICODE UTF-8" + SEGMENT + rest
    return text.encode("utf-8")
