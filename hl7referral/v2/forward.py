"""Hand a referral that arrived over Direct to our own EHR: REF^I12 or OMG^O19 with the C-CDA (sans-I/O).

The specialist's engine receives a referral as an XDM package (a 360X OMG^O19 order and a
C-CDA Referral Note) or as a bare C-CDA, and forwards it to the local EHR over MLLP as
the channel says (``[forward]``: ``message`` REF^I12 | OMG^O19, ``cda`` embed | reference).
Bytes in (the C-CDA, the order if one came), the message bytes out (no MLLP frame;
:func:`hl7referral.v2.framer.encode_frame` adds it).

Layouts (HL7 v2.5.1; what hl7apy's structures accept)
------------------------------------------------------
OMG^O19, an order came in the package: **the order as received**, every segment kept byte
for byte (re-encoded as UTF-8, segments ended by ``\\r``), except MSH: MSH-3..6 are ours
(``sending`` / ``receiving``), MSH-7 = ``now_hl7``, MSH-10 = ``control_id``, MSH-15/16
emptied, MSH-18 rewritten for the UTF-8 output (below). One OBX is added to the first
order group, after its OBR and that OBR's NTE/CTD/DG1/OBX segments (OMG_O19
``ORDER: ORC [{TIMING}] OBR [{NTE}] [CTD] [{DG1}] [{OBSERVATION: OBX [{NTE}]}] ...``),
numbered after the OBX already there.

OMG^O19 built from the Referral Note (no order, or an order of another type)::

    MSH  MSH-9 OMG^O19^OMG_O19
    PID  PID-3 ids (CX ~), PID-5 name, PID-7 birth, PID-8 sex (M, F; UN -> U),
         PID-35/36 species/breed (veterinary)
    ORC  ORC-1 NW, ORC-2 referral id (EI), ORC-9 referral time, ORC-12 referring provider (XCN)
    TQ1  TQ1-9 priority (table 0485), only when the document has one
    OBR  OBR-1 1, OBR-2 referral id, OBR-4 requested service (else 57133-1^^LN),
         OBR-16 referring provider, OBR-31 reason for referral
    OBX  the C-CDA (below)

REF^I12 (REF_I12 = ``MSH [RF1] {PROVIDER_CONTACT: PRD} PID ... [{OBSERVATION: OBR [{NTE}]
[{RESULTS_NOTES: OBX [{NTE}]}]}] ...``: an OBX exists only under an OBR, so one is written)::

    MSH  MSH-9 REF^I12^REF_I12
    RF1  RF1-1 P^Pending, RF1-2 priority (table 0280), RF1-6 referral id (EI),
         RF1-7 effective date (the Referral Act's time, else the document's),
         RF1-10 reason (text only: table 0336 codes say why a referral is made, not the clinical reason)
    PRD  PRD-1 RP, PRD-2 name, PRD-7 id (``npi^NPI``); then PRD RT for the recipient when named
    PID  as above
    OBR  OBR-1 1, OBR-2 referral id, OBR-4 requested service, OBR-31 reason
    OBX  the C-CDA

The C-CDA: ``cda_mode="embed"``: OBX-2 ED, OBX-5 ``^Application^XML^Base64^<data>``
(:func:`hl7referral.v2.mdm.ed_value`, whose docstring explains the choice);
``cda_mode="reference"``: OBX-2 RP, OBX-5 ``<pointer>^^Application^XML`` (RP: pointer ^
application id ^ type of data ^ subtype, the same type words as the ED), the pointer being
the caller's ``reference`` (a URL or path), escaped. OBX-3 is the document's own code
(``57133-1^Referral note^LN``), OBX-11 ``F``.

Correlating key
---------------
The referral id must come back unchanged in the EHR's answers (ORG^O20, OSU, SIU, RRI,
MDM): it travels in **ORC-2 = OBR-2** (placer order number) of an OMG and in **RF1-6**
(originating referral identifier) of a REF (and OBR-2), as the EI the package gave it. Its
source, strongest first: the order's ORC-2, OBR-2 or RF1-6 (the 360X referral id), else
the Referral Note's Referral Act id (:mod:`hl7referral.cda.referral_reader`, written as an
EI that :func:`hl7referral.loop.correlate.read_v2` reads back to the stored ``ext@root``).

Acknowledgement: original mode
------------------------------
MSH-15 and MSH-16 are empty (original mode): the EHR answers with one acknowledgement,
AA/AE/AR, as a plain ACK or as its application acknowledgement (ORG^O20, RRI^I12); the
MLLP sender (:mod:`hl7referral.v2.ack_match`) takes any of them by MSA-2. A 360X order
arrives with NE/NE (no ACK ever, Direct MDNs stand in for it): forwarded unchanged, the
EHR would never answer and the sender would resend until it gave up. AL/NE (enhanced
mode, commit ACK only) would work with EHRs that support enhanced mode; original mode is
what every v2 receiver supports, and what :mod:`hl7referral.v2.mdm` sends the referring EHR.

Invariants
----------
* The output is UTF-8; MSH-18 is ``UNICODE UTF-8`` when the message holds non-ASCII
  text, else empty (ASCII). A kept order's MSH-18 is replaced accordingly (its text was
  decoded with the charset it declared).
* Free text (reason, service and document words, names, the pointer) is escaped with
  :func:`hl7referral.v2.mdm.escape`; header values (``sending``, ``receiving``,
  ``version``) are ER7 already and checked, not escaped, as in ``mdm.py``. Every segment
  ends with ``\\r``; no value can break a segment or an MLLP frame.
* ``cda`` is always read: not a CDA raises
  :class:`~hl7referral.cda.referral_reader.ReferralNoteError`; what cannot be forwarded as
  asked (no referral id, an order that cannot be kept) raises :class:`ForwardError`;
  argument errors raise ``ValueError``. All are ``ValueError``.
* The OBX ED holds the C-CDA's exact bytes; hl7apy's STRICT parse rejects any OBX-5
  component over 199 characters (it does not resolve ``varies``; see ``mdm.py``), so a
  real embedded document validates with hl7apy's structure check (``Message.validate()``)
  after a tolerant parse, where lengths are warnings (tests/test_forward.py).
* The one wire module that reads a document: the C-CDA is read by
  :func:`hl7referral.cda.referral_reader.read_referral_note` (safe parser, no entities,
  no network); what it gives back is plain text and ER7 ids, nothing of lxml leaks here.
* A kept order must use the standard delimiters ``|^~\\&`` (a v2.7 truncation character
  may follow): its segments are copied as they are, so the added OBX must share them.
"""

from __future__ import annotations

import re

from ..cda.functions import SYSTEMS
from ..cda.model import OID, Code
from ..cda.referral_reader import DEFAULT_LOCAL_ROOT, Clinician, ReferralSummary, label, read_referral_note, xpn
from . import charset
from .header import BrokenHeader, NotHL7, read_header, split_segments, strip_leading
from .mdm import (
    _TIMESTAMP,
    COMPONENT,
    ED_TYPES,
    ENCODING_CHARACTERS,
    ESCAPE,
    FIELD,
    REPETITION,
    SEGMENT,
    SUBCOMPONENT,
    _er7,
    ed_value,
    escape,
)

MESSAGES = ("REF^I12", "OMG^O19")
CDA_MODES = ("embed", "reference")
CDA_MEDIA_TYPE = "text/xml"
REFERRAL_NOTE_CODE = f"57133-1{COMPONENT}Referral note{COMPONENT}LN"   # OBX-3 when the document has no code
REFERRAL_NOTE_SERVICE = f"57133-1{COMPONENT}{COMPONENT}LN"              # OBR-4 as 360X writes it
UTF8 = "UNICODE UTF-8"

# CDA administrativeGender -> HL7 table 0001. UN (undifferentiated) is what the inbound
# mappings make of every other v2 value (U, O, A, N): U (unknown) is the least wrong way back.
_SEX = {"M": "M", "F": "F", "UN": "U"}
# ActPriority -> table 0280 (RF1-2) and table 0485 (TQ1-9); other codes travel as text only.
_RF1_PRIORITY = {"S": "S^STAT", "A": "A^ASAP", "R": "R^Routine"}
_TQ1_PRIORITY = {"S": "S^Stat", "A": "A^ASAP", "R": "R^Routine", "P": "P^Preop", "T": "T^Timing critical",
                 "CR": "C^Callback", "PRN": "PRN^As needed"}
# Code system OID -> HL7 table 0396 name, and the 0396 names written as they are.
_V2_SYSTEM = {OID["LOINC"]: "LN", OID["SNOMED"]: "SCT", OID["ICD10CM"]: "I10C", OID["ICD9CM"]: "I9C",
              OID["RXNORM"]: "RXNORM", OID["NDC"]: "NDC", OID["CVX"]: "CVX", OID["UCUM"]: "UCUM"}
_TABLE_0396 = frozenset({"LN", "SCT", "SNM", "I10", "I10C", "I9", "I9C", "I9CM", "RXNORM", "NDC", "CVX", "UCUM"})
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,20}\Z")
_FRAME_BREAKERS = re.compile(r"[\x0b\x1c]")   # MLLP start / end of block
_SINGLE_LINE_TEXT = re.compile(r"[\x00-\x1f\x7f]")


class ForwardError(ValueError):
    """The referral cannot be forwarded as asked: no referral id, or an order that cannot be kept."""


def build_forward(
    *,
    cda: bytes,
    order: bytes | None,
    message: str,
    cda_mode: str,
    reference: str = "",
    control_id: str,
    now_hl7: str,
    sending: tuple[str, str],
    receiving: tuple[str, str],
    version: str = "2.5.1",
    local_root: str = DEFAULT_LOCAL_ROOT,
) -> bytes:
    """The message that hands this referral to our EHR, as bytes (see the module docstring).

    ``order``: the v2 order of the package, or None. ``message``: "REF^I12" | "OMG^O19";
    ``cda_mode``: "embed" (OBX ED, the document in base64) | "reference" (OBX RP, with
    ``reference`` as the pointer; ignored when embedding). ``control_id`` -> MSH-10 (the
    EHR's MSA-2 echoes it), ``now_hl7`` -> MSH-7, ``sending`` / ``receiving`` ->
    (MSH-3, MSH-4) / (MSH-5, MSH-6) as HD ER7 text, ``version`` -> MSH-12 of a built
    message (a kept order keeps its own). ``local_root``: the engine's ``cda.local_root``
    (how the Referral Note's ids are read).
    """
    if message not in MESSAGES:
        raise ValueError(f"message must be one of {', '.join(MESSAGES)}, not {message!r}")
    if cda_mode not in CDA_MODES:
        raise ValueError(f"cda_mode must be one of {', '.join(CDA_MODES)}, not {cda_mode!r}")
    if cda_mode == "reference" and (not reference or _SINGLE_LINE_TEXT.search(reference)):
        raise ValueError("reference mode needs a reference: one line of text (a URL or path)")
    if not control_id or _SINGLE_LINE_TEXT.search(control_id) or any(
            c in control_id for c in FIELD + ENCODING_CHARACTERS):
        raise ValueError("control_id must be non-empty and hold no delimiter or control character")
    if not _TIMESTAMP.match(now_hl7 or ""):
        raise ValueError("now_hl7 is not an HL7 timestamp")
    header = _Header(*(_er7(v, f"sending[{i}]") for i, v in enumerate(sending)),
                     *(_er7(v, f"receiving[{i}]") for i, v in enumerate(receiving)),
                     now_hl7, control_id, _er7(version, "version"))

    summary = read_referral_note(cda, local_root=local_root)
    obx = _obx(summary, cda, cda_mode, reference)
    kept = _Order.read(order) if order is not None else None
    if kept is not None and message == "OMG^O19" and kept.kind == "OMG^O19":
        return _encode(kept.forward(header, obx))
    referral = (kept.referral_ei if kept is not None else "") or summary.referral_ei
    if not referral:
        raise ForwardError("no referral id: the order has no ORC-2/OBR-2/RF1-6 and the document no Referral Act id; "
                           "the EHR's answers could not be correlated")
    build = _ref_i12 if message == "REF^I12" else _omg_o19
    return _encode(build(header, summary, referral, obx))


# -- header and encoding ------------------------------------------------------------------------

class _Header:
    def __init__(self, send_app, send_fac, recv_app, recv_fac, now, control_id, version) -> None:
        self.parties = [send_app, send_fac, recv_app, recv_fac]
        self.now, self.control_id, self.version = now, control_id, version

    def msh(self, structure: str) -> list[str]:
        """MSH as a list indexed by field number (index 1 is MSH-1, the field separator)."""
        return ["MSH", FIELD, ENCODING_CHARACTERS, *self.parties, self.now, "", structure, self.control_id, "P",
                self.version]


def _encode(segments: list[list[str]]) -> bytes:
    """ER7 text of the segments (MSH first, indexed by field number), MSH-18 set for UTF-8 when
    needed, as UTF-8 bytes."""
    msh = list(segments[0])
    body = SEGMENT.join(FIELD.join(fields) for fields in segments[1:])
    msh += [""] * (19 - len(msh))
    msh[18] = "" if (body.isascii() and FIELD.join(msh).isascii()) else UTF8
    while len(msh) > 13 and msh[-1] == "":   # no trailing empty fields past MSH-12
        msh.pop()
    return (FIELD.join(msh[:1] + msh[2:]) + SEGMENT + body + SEGMENT).encode("utf-8")


# -- values ---------------------------------------------------------------------------------------

def coding_system(code: Code) -> str:
    """The HL7 v2 coding system (table 0396) for a CDA code: the codeSystemName when it is a
    0396 name of the same system or a local name (``L``), else the name of its OID, else ''."""
    name = code.system_name.strip()
    same = SYSTEMS.get(name.upper()) == code.system if name else True
    if code.system in _V2_SYSTEM and same:
        return name if name.upper() in _TABLE_0396 else _V2_SYSTEM[code.system]
    if name and _TOKEN.match(name):
        return name
    return _V2_SYSTEM.get(code.system, "")


def ce(code: Code, text: str = "") -> str:
    """A CDA code as a v2 CE/CWE ``code^text^system`` (``^text`` when only text is known)."""
    words = label(code) or text
    if not code.code:
        return f"{COMPONENT}{escape(words)}" if words else ""
    system = coding_system(code)
    return COMPONENT.join([escape(code.code), escape(words), escape(system)]).rstrip(COMPONENT)


def _hd_for(root: str, authority: str, local_root: str) -> str:
    """Assigning authority (HD) of a provider id: the OID, or the namespace of a stand-in root."""
    if root and root != local_root and not root.startswith(local_root + "."):
        return f"{SUBCOMPONENT}{escape(root)}{SUBCOMPONENT}ISO"
    return escape(authority)


def xcn(p: Clinician, local_root: str = DEFAULT_LOCAL_ROOT) -> str:
    """A provider as an XCN (ORC-12, OBR-16): id ^ family ^ given ^ middle ^ suffix ^ prefix
    ^^^ assigning authority ^^^^ id type (NPI)."""
    ident = p.first_id
    name = p.name
    given = [g for g in name.given if g]
    parts = [""] * 13
    if ident is not None:
        parts[0] = escape(ident.extension or ident.root)
        if ident.extension:
            parts[8] = _hd_for(ident.root, ident.authority, local_root)
        if ident.root == OID["NPI"]:
            parts[12] = "NPI"
    parts[1:6] = [escape(name.family), escape(given[0] if given else ""), escape(" ".join(given[1:])),
                  escape(name.suffix), escape(name.prefix)]
    return COMPONENT.join(parts).rstrip(COMPONENT)


def pi(p: Clinician) -> str:
    """A provider's id as a PI (PRD-7): ``npi^NPI``, else ``id^^root``."""
    ident = p.first_id
    if ident is None:
        return ""
    if ident.root == OID["NPI"] and ident.extension:
        return f"{escape(ident.extension)}{COMPONENT}NPI"
    if not ident.extension:
        return escape(ident.root)
    return escape(ident.extension) + (f"{COMPONENT}{COMPONENT}{escape(ident.root)}" if ident.root else "")


def _ts(value: str) -> str:
    return value if _TIMESTAMP.match(value or "") else ""


def _priority(code: Code, table: dict[str, str]) -> str:
    if not code:
        return ""
    return table.get(code.code.upper(), "") or (f"{COMPONENT}{escape(label(code))}" if label(code) else "")


def _reason(s: ReferralSummary) -> str:
    """OBR-31: the coded Indication with the reason's words, else the words alone."""
    if s.reason_code.code:
        return ce(s.reason_code, s.reason)
    words = s.reason or label(s.reason_code)
    return f"{COMPONENT}{escape(words)}" if words else ""


def _obx(s: ReferralSummary, cda: bytes, cda_mode: str, reference: str) -> list[str]:
    """The OBX fields carrying the document (OBX-1 is set where it is placed)."""
    code = ce(s.document_code) if s.document_code.code else REFERRAL_NOTE_CODE
    if cda_mode == "embed":
        value_type, value = "ED", ed_value(bytes(cda), CDA_MEDIA_TYPE)
    else:
        kind, subtype = ED_TYPES[CDA_MEDIA_TYPE]
        value_type, value = "RP", COMPONENT.join([escape(reference), "", kind, subtype])
    return ["OBX", "1", value_type, code, "", value, "", "", "", "", "", "F"]


def _pid(s: ReferralSummary) -> list[str]:
    p = s.patient
    pid = ["PID", "1", "", p.ids, "", s.patient_name, "", _ts(p.birth_time), _SEX.get(p.sex, "")]
    if p.species or p.breed:
        pid += [""] * (37 - len(pid))
        pid[35], pid[36] = ce(p.species), ce(p.breed)
    return pid


def _service(s: ReferralSummary) -> str:
    return ce(s.service) or REFERRAL_NOTE_SERVICE


# -- the two messages built from the Referral Note ------------------------------------------------

def _omg_o19(h: _Header, s: ReferralSummary, referral: str, obx: list[str]) -> list[list[str]]:
    provider = xcn(s.referring)
    orc = _trim(["ORC", "NW", referral, "", "", "", "", "", "", _ts(s.referral_time or s.effective_time), "", "",
                 provider])
    obr = ["OBR", "1", referral, "", _service(s)] + [""] * 11 + [provider] + [""] * 14 + [_reason(s)]
    segments = [h.msh(f"OMG{COMPONENT}O19{COMPONENT}OMG_O19"), _trim(_pid(s)), orc]
    priority = _priority(s.priority, _TQ1_PRIORITY)
    if priority:
        segments.append(["TQ1", "1", "", "", "", "", "", "", "", priority])
    return segments + [_trim(obr), obx]


def _ref_i12(h: _Header, s: ReferralSummary, referral: str, obx: list[str]) -> list[list[str]]:
    reason = s.reason or label(s.reason_code)
    rf1 = ["RF1", f"P{COMPONENT}Pending", _priority(s.priority, _RF1_PRIORITY), "", "", "", referral,
           _ts(s.referral_time or s.effective_time), "", "", f"{COMPONENT}{escape(reason)}" if reason else ""]
    segments = [h.msh(f"REF{COMPONENT}I12{COMPONENT}REF_I12"), _trim(rf1),
                _trim(["PRD", "RP", xpn(s.referring.name), "", "", "", "", pi(s.referring)])]
    if s.recipient.ids or s.recipient.name:
        segments.append(_trim(["PRD", "RT", xpn(s.recipient.name), "", "", "", "", pi(s.recipient)]))
    obr = ["OBR", "1", referral, "", _service(s)] + [""] * 26 + [_reason(s)]
    return segments + [_trim(_pid(s)), _trim(obr), obx]


def _trim(fields: list[str]) -> list[str]:
    while len(fields) > 2 and fields[-1] == "":
        fields.pop()
    return fields


# -- an order kept as received ---------------------------------------------------------------------

def _name(segment: str) -> str:
    return segment[:3] if len(segment) == 3 or segment[3:4] == FIELD else ""


class _Order:
    """A v2 order from the package, decoded and split into segments, as received."""

    def __init__(self, kind: str, segments: list[str]) -> None:
        self.kind = kind
        self.segments = segments

    @classmethod
    def read(cls, raw: bytes) -> "_Order":
        if not isinstance(raw, (bytes, bytearray)):
            raise ForwardError("order: expected the message's bytes")
        raw = bytes(raw)
        try:
            header = read_header(raw)
        except (NotHL7, BrokenHeader) as exc:
            raise ForwardError(f"order: {exc}") from None
        d = header.delimiters
        if (d.field, d.component, d.repetition, d.escape, d.subcomponent) != (
                FIELD, COMPONENT, REPETITION, ESCAPE, SUBCOMPONENT):
            raise ForwardError(f"order: delimiters {d.field}{d.msh2} are not {FIELD}{ENCODING_CHARACTERS}: "
                               "its segments cannot be kept next to ours")
        try:
            text = charset.decode(strip_leading(raw), charset.codec_for(header.charset, "utf-8"))
        except (charset.UnknownCharset, charset.CharsetMismatch, LookupError) as exc:
            raise ForwardError(f"order: MSH-18 {header.charset!r}: {exc}") from None
        segments = split_segments(text)
        if any(_FRAME_BREAKERS.search(s) for s in segments):
            raise ForwardError("order: holds an MLLP block character (VT or FS) that would break the frame")
        return cls(header.type_and_event.upper(), segments)

    def field(self, name: str, n: int) -> str:
        """Field n of the first segment called *name*, as ER7 text ('' when absent)."""
        for segment in self.segments:
            if _name(segment) == name:
                fields = segment.split(FIELD)
                return fields[n] if n < len(fields) else ""
        return ""

    @property
    def referral_ei(self) -> str:
        for name, n in (("ORC", 2), ("OBR", 2), ("RF1", 6)):
            value = self.field(name, n)
            if value.strip(COMPONENT + " "):
                return value
        return ""

    def forward(self, h: _Header, obx: list[str]) -> list[list[str]]:
        msh = self.segments[0].split(FIELD)
        # msh[i] is MSH-(i+1) from MSH-2 on (msh[1] = MSH-2): put MSH-1 back so that index = field number.
        fields = [msh[0], FIELD, *msh[1:]]
        fields += [""] * (19 - len(fields))
        fields[3:7] = h.parties
        fields[7], fields[10] = h.now, h.control_id
        fields[15] = fields[16] = ""   # original mode (module docstring)
        fields[18] = ""                # set by _encode for the UTF-8 output
        obr = next((i for i, s in enumerate(self.segments) if _name(s) == "OBR"), None)
        if obr is None:
            raise ForwardError("order: no OBR segment (OMG_O19 needs one per order): nowhere to put the document")
        end, count = obr + 1, 0
        while end < len(self.segments) and _name(self.segments[end]) in ("NTE", "CTD", "DG1", "OBX"):
            count += _name(self.segments[end]) == "OBX"
            end += 1
        placed = [*obx[:1], str(count + 1), *obx[2:]]
        rest = [s.split(FIELD) for s in self.segments[1:]]
        return [fields, *rest[:end - 1], placed, *rest[end - 1:]]
