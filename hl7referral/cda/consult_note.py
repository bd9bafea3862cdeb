"""The specialist's answer as a C-CDA R2.1 Consultation Note, built from note text (issue 7, point 3).

The document is the Consultation Note ``2.16.840.1.113883.10.20.22.1.4:2015-08-01`` on the US
Realm Header ``2.16.840.1.113883.10.20.22.1.1:2015-08-01`` (each with its bare R1.1 twin),
LOINC 11488-4 "Consult note". It closes the loop: ``inFulfillmentOf/order/id`` is the referral
id, which the referring engine's :func:`hl7referral.loop.correlate.read_consult_cda` turns back
into the referral key. Reference: ``shared/reference/ccda.md`` §2, §5, §6.

Two entry points, both sans-I/O:

* :func:`build_consultation_note` (:class:`ConsultInput` → lxml tree; :func:`to_bytes` for bytes);
* :func:`consult_input_from_mdm` (an MDM^T02 with a text note → :class:`ConsultInput`; ``None``
  when the MDM carries a document instead, which the caller forwards as it is).

Where the text goes
-------------------
A specialist's EHR sends the note as free text whose parts (history, findings, assessment,
plan) are not separable without guessing. The **whole note text goes, one ``<paragraph>`` per
line, into the narrative of the Assessment and Plan section** (2.9:2014-06-09, LOINC
51847-2): the combined section is the one meant for text that mixes assessment and plan. A
blank line is an empty ``<paragraph/>`` (so the lines read back exactly); blank lines before
the first and after the last line of text are dropped. The other sections the template
requires say "No information" (``section/@nullFlavor="NI"``, no entries): History of Present
Illness, Problems and Allergies. Nothing is copied from the text into them.

Sections (R2.1 errors phase, rule ``r-urn-hl7ii-2.16.840.1.113883.10.20.22.1.4-2015-08-01-errors``)
------------------------------------------------------------------------------------------------
SHALL: History of Present Illness (a-1198-28906), Allergies and Intolerances 2.6.1 (28910),
Problems 2.5.1 (28928), Reason for Referral or Reason for Visit (9504), Assessment and Plan or
Assessment + Plan of Treatment (9501, 28939). Built: Reason for Referral (a table naming the
referral id, the referring provider and, when known, the reason; for an animal also its
species, breed and owner), History of Present Illness, Assessment and Plan, Problems,
Allergies. The SHOULD sections (Physical Exam, Medications, Results: a-1198-28908, 28925,
28932 in the warnings phase) are left out rather than sent as "No information": the note has
no data for them, and an empty section would only silence the warning.

Invariants
----------
* For every :class:`ConsultInput` (an empty one too) the result is valid against
  ``CDA_SDTC.xsd`` and passes the R2.1 Schematron ``errors`` phase with the document-level
  rule fired (tests/test_consult_note.py). Element order follows the XSD sequences.
* The header parts (patient, author, custodian, information recipient, call-back contact,
  identifiers, timestamps, nullFlavors) are rendered by the Referral Note's builder, so both
  documents follow the same rules (``referral_note.py`` invariants: nothing invented, unknown →
  ``UNK``, ``NA`` for an animal's race/ethnicity, namespace-only identifiers under
  ``BuildOptions.local_root``).
* Exactly one ``inFulfillmentOf/order/id``: the referral id (a second id would make the
  reader report "names more than one referral"). A root under ``local_root`` reads back as
  the bare extension, an OID root as ``ext@root`` (:func:`~hl7referral.loop.correlate.ii_key`).
* Every header ``participant`` is the call-back contact (``CALLBCK``: the author, when anything
  about them is known). The R2.1 Schematron checks *every* participant of a Consultation Note
  against the CALLBCK rules (a-1198-31657-branch-31656), so an animal's owner is not a
  ``participant typeCode="IND"`` as in the Referral Note: it is the patient's ``guardian`` and
  is named in the Reason for Referral narrative.
* Veterinary patients (``veterinary`` or a patient species): as in the Referral Note, species
  and breed in ``patient/sdtc:desc``, in the narrative's "Patient" table and as ``ASSERTION``
  observations in the Reason for Referral section.
* ``componentOf/encompassingEncounter`` (1..1) has ``encounter_id`` (``UNK`` when unknown) and
  ``encounter_time`` (``UNK`` when unknown, never the document time); its ``responsibleParty``
  is the author when anything about them is known.
* Deterministic: the same input with a ``document_id`` gives the same bytes (entry ids are
  UUIDv5 of the document id). Without a document id the builder makes a random UUID, as the
  Referral Note does; :func:`consult_input_from_mdm` always sets one.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field

from lxml import etree

from ..v2.mdm import text_lines
from ..v2.parse import ParseError, parse_message
from . import functions as fn
from . import narrative as nv
from .model import OID, Code, Identifier, Party, Patient, Referral
# Besides its public names, the Referral Note builder's header and section machinery (private
# there): one set of header rules for both documents. A public header module would end the coupling.
from .referral_note import (
    DEFAULT_OPTIONS,
    BuildOptions,
    document_proto,
    to_bytes,
    uuid5,
    _S_ALLERGIES,
    _S_PROBLEMS,
    _S_REASON,
    _T_REASON,
    _Builder,
    _el,
    _party_label,
    _party_telecoms,
    _Proto,
    _section_proto,
    _telecom_value,
    _text_el,
    _tids,
)

__all__ = [
    "CONSULTATION_NOTE",
    "DOCUMENT_CODE",
    "ConsultInput",
    "MdmError",
    "build_consultation_note",
    "consult_input_from_mdm",
    "to_bytes",
]

CONSULTATION_NOTE = ("2.16.840.1.113883.10.20.22.1.4", "2015-08-01")
DOCUMENT_CODE = Code("11488-4", OID["LOINC"], "Consult note", "LOINC")
DEFAULT_TITLE = "Consultation Note"
HISTORY_OF_PRESENT_ILLNESS = "1.3.6.1.4.1.19376.1.5.3.1.3.4"
ASSESSMENT_AND_PLAN = ("2.16.840.1.113883.10.20.22.2.9", "2014-06-09")


@dataclass
class ConsultInput:
    """What a Consultation Note says. Empty means unknown (rendered as a nullFlavor).

    ``referral_id``: the referral this note answers (``inFulfillmentOf/order/id``), as the
    referring side gave it (an OID root and the extension; or a namespace-only id, rooted under
    ``BuildOptions.local_root``). ``text``: the note, plain text, lines separated by CR LF, CR
    or LF. ``author``: the specialist who wrote it. ``custodian``: the organisation keeping it.
    ``recipient``: the referring provider (``informationRecipient``), when known.
    ``effective_time``: when the note was written (document ``effectiveTime`` and author time),
    HL7 DTM. ``encounter_time``: when the consult took place (``encompassingEncounter``), HL7 DTM.
    ``document_id``: this document's id (also its ``setId``); set it for deterministic bytes.
    ``encounter_id``: the visit's id, when known. ``reason``: the reason for referral as text,
    when known. ``veterinary``: the patient is an animal (also implied by ``patient.species``).
    ``final``: the source said the note is complete (MDM TXA-17 AU or LA). The document itself
    does not change with it; callers that must not close a loop with a preliminary note check it
    (:func:`~hl7referral.loop.correlate.read_consult_cda` reads any Consultation Note as the outcome).
    """

    referral_id: Identifier = field(default_factory=Identifier)
    text: str = ""
    patient: Patient = field(default_factory=Patient)
    author: Party = field(default_factory=Party)
    custodian: Party = field(default_factory=Party)
    recipient: Party | None = None
    title: str = DEFAULT_TITLE
    effective_time: str = ""
    encounter_time: str = ""
    document_id: Identifier = field(default_factory=Identifier)
    encounter_id: Identifier = field(default_factory=Identifier)
    reason: str = ""
    veterinary: bool = False
    final: bool = True


def build_consultation_note(consult: ConsultInput, options: BuildOptions | None = None) -> etree._ElementTree:
    """The C-CDA R2.1 Consultation Note for *consult*, as an lxml tree (:func:`to_bytes` for bytes).

    ``options``: ``local_root``, ``language`` and ``confidentiality`` apply; the title is
    ``consult.title`` (``options.title`` is the Referral Note's).
    """
    return _ConsultBuilder(consult, options or DEFAULT_OPTIONS).build()


# --- document skeletons (constants only) ---------------------------------------------------------

_DOCUMENT = document_proto(_tids(*CONSULTATION_NOTE), DOCUMENT_CODE)
_IN_FULFILLMENT_OF = _Proto(
    '<inFulfillmentOf typeCode="FLFS"><order classCode="ACT" moodCode="RQO"><id slot="id"/></order></inFulfillmentOf>'
)
_COMPONENT_OF = _Proto(
    """<componentOf><encompassingEncounter slot="encounter">
      <id slot="id"/><effectiveTime slot="time"/>
    </encompassingEncounter></componentOf>"""
)
_S_HPI = _section_proto(
    HISTORY_OF_PRESENT_ILLNESS,
    "",
    "10164-2",
    "History of Present illness Narrative",
    "History of Present Illness",
    no_information=True,
)
_S_ASSESSMENT_AND_PLAN = _section_proto(
    *ASSESSMENT_AND_PLAN, "51847-2", "Evaluation + Plan note", "Assessment and Plan"
)


def _knows(party: Party | None) -> bool:
    """Whether anything that identifies or reaches *party* is known."""
    return party is not None and bool(
        any(party.ids) or party.name or party.organization or any(party.telecom) or party.direct_address
    )


def _note_lines(text: str) -> list[str]:
    """The note's lines (:func:`~hl7referral.v2.mdm.text_lines`), without blank lines before and after the text."""
    lines = text_lines(text or "")
    while lines and not lines[-1].strip():
        lines.pop()
    start = 0
    while start < len(lines) and not lines[start].strip():
        start += 1
    return lines[start:]


class _ConsultBuilder(_Builder):
    """The Referral Note builder's header parts, with the Consultation Note's document and body."""

    def __init__(self, consult: ConsultInput, options: BuildOptions) -> None:
        self.c = consult
        # The header helpers read the patient, the document id and the author time (``created``)
        # from a Referral: one holding this note's values.
        super().__init__(
            Referral(
                referral_id=consult.referral_id,
                document_id=consult.document_id,
                created=consult.effective_time,
                patient=consult.patient,
                referring=consult.author,
                recipient=consult.recipient if consult.recipient is not None else Party(),
                custodian=consult.custodian,
                veterinary=consult.veterinary,
            ),
            options,
        )

    def build(self) -> etree._ElementTree:
        c = self.c
        head = _DOCUMENT.new()
        doc = head[""]
        head["id"].attrib.update(self.doc_id)
        head["title"].text = nv.clean((c.title or "").strip()) or DEFAULT_TITLE
        self.fill_ts(head["time"], c.effective_time, min_len=8)
        head["confidentiality"].attrib.update({"code": self.o.confidentiality, "codeSystem": OID["CONFIDENTIALITY"]})
        head["language"].set("code", self.o.language)
        head["set_id"].attrib.update(self.doc_id)
        self.record_target(doc, c.patient)  # an animal's owner becomes its guardian here
        self.author(doc, c.author)
        self.custodian(doc, c.custodian)
        if c.recipient is not None:
            self.information_recipient(doc, c.recipient)
        self.callback(doc, c.author)  # the specialist answers questions about the note
        self.fill_ii(_IN_FULFILLMENT_OF.add(doc)["id"], c.referral_id)
        self.encounter(doc)
        body = _el(_el(doc, "component"), "structuredBody")
        self.reason_section(body)
        _S_HPI.add(body)
        self.assessment_and_plan(body)
        self.section(body, _S_PROBLEMS, False)
        self.section(body, _S_ALLERGIES, False)
        return etree.ElementTree(doc)

    def encounter(self, doc: etree._Element) -> None:
        s = _COMPONENT_OF.add(doc)
        self.fill_ii(s["id"], self.c.encounter_id)
        self.fill_ts(s["time"], self.c.encounter_time, min_len=8)
        author = self.c.author
        if _knows(author):
            # The consultant is responsible for the consult (and satisfies the SITE/MDHT rule that
            # the header name a performer, responsibleParty or encounterParticipant).
            ae = _el(_el(s["encounter"], "responsibleParty"), "assignedEntity")
            self.ids(ae, author.ids)
            if any(author.addr):
                self.addr(ae, author.addr)
            self.telecom(ae, _party_telecoms(author), required=False)
            self.name(_el(ae, "assignedPerson"), author.name)
            if author.organization:
                _text_el(_el(ae, "representedOrganization"), "name", author.organization)

    def reason_section(self, body: etree._Element) -> None:
        c = self.c
        p = c.patient
        rows: list[list[nv.Cell | str]] = []
        if c.reason.strip():
            rows.append(["Reason for referral", c.reason.strip()])
        ident = c.referral_id
        if ident:
            label = ident.extension or ident.root
            rows.append(["Referral ID", label + (f" ({ident.authority})" if ident.authority else "")])
        if c.recipient is not None and _party_label(c.recipient):
            contact = ", ".join(_telecom_value(t.value) for t in _party_telecoms(c.recipient))
            rows.append(["Referring provider", _party_label(c.recipient) + (f" ({contact})" if contact else "")])
        vet_rows = self.vet and bool(p.species or p.breed or p.owner is not None)
        sec = self.section(body, _S_REASON, bool(rows) or vet_rows)
        if not (rows or vet_rows):
            return
        text = nv.text_block(sec)
        if rows:
            nv.table(text, _T_REASON, rows)
        if vet_rows:
            self.patient_table(text, p)
            for key, code in (("species", p.species), ("breed", p.breed)):
                if code:
                    self.assertion(_el(sec, "entry"), key, code)

    def assessment_and_plan(self, body: etree._Element) -> None:
        lines = _note_lines(self.c.text)
        sec = self.section(body, _S_ASSESSMENT_AND_PLAN, bool(lines))
        if lines:
            text = nv.text_block(sec)
            for line in lines:
                nv.paragraph(text, line)


# --- from an MDM^T02 ----------------------------------------------------------------------------


class MdmError(ValueError):
    """An MDM^T02 that cannot become a Consultation Note; ``segment`` and ``field`` say where.

    ``field`` is ``None`` when the whole segment is missing or unreadable.
    """

    def __init__(self, segment: str, field: int | None, problem: str) -> None:
        self.segment = segment
        self.field = field
        self.problem = problem
        super().__init__(f"{segment}-{field}: {problem}" if field is not None else f"{segment}: {problem}")


# OBX-2 value types whose OBX-5 is note text (as hl7referral.loop.correlate reads them).
_TEXT_TYPES = {"TX", "FT", "ST", "TEXT", "CF"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FINAL = {"AU", "LA"}  # HL7 table 0271: authenticated, legally authenticated
_OID_RE = re.compile(r"[0-2](\.\d+)+\Z")

Rep = list[list[str]]  # one repetition: components of subcomponents, unescaped


class _Msg:
    """python-hl7's parse of one message, read as unescaped repetitions (the shape cda.functions takes)."""

    def __init__(self, message) -> None:
        self.m = message

    def segments(self, name: str) -> list:
        try:
            return list(self.m.segments(name))
        except KeyError:  # python-hl7: "No XYZ segments"
            return []

    def first(self, name: str):
        found = self.segments(name)
        return found[0] if found else None

    def reps(self, segment, n: int, keep_empty: bool = False) -> list[Rep]:
        """Field *n*'s repetitions; empty ones only with *keep_empty* (a blank line of a note)."""
        if segment is None or len(segment) <= n:
            return []
        value = segment[n]
        if all(isinstance(x, str) for x in value):  # a plain field: one value, no components
            reps = [[[self.unescape(x) for x in value]]]
        else:
            reps = [self._rep(r) for r in value]
        return reps if keep_empty else [r for r in reps if any(s for c in r for s in c)]

    def _rep(self, rep) -> Rep:
        if isinstance(rep, str):
            return [[self.unescape(rep)]]
        return [[self.unescape(comp)] if isinstance(comp, str) else [self.unescape(s) for s in comp] for comp in rep]

    def unescape(self, value) -> str:
        text = str(value)
        return self.m.unescape(text) if self.m.esc and self.m.esc in text else text

    def rep(self, segment, n: int) -> Rep:
        """The field's first repetition, even when empty (a later one never stands in for it)."""
        reps = self.reps(segment, n, keep_empty=True)
        return reps[0] if reps and any(s for c in reps[0] for s in c) else []

    def get(self, segment, n: int, comp: int = 1) -> str:
        rep = self.rep(segment, n)
        return rep[comp - 1][0].strip() if comp <= len(rep) and rep[comp - 1] else ""

    def text(self, rep: Rep) -> str:
        """A repetition as the text it was (components rejoined: a TX line is one value)."""
        component, subcomponent = self.m.separators[3], self.m.separators[4]
        return component.join(subcomponent.join(subs) for subs in rep)


def consult_input_from_mdm(raw: bytes, *, default_charset: str = "ascii") -> ConsultInput | None:
    """The :class:`ConsultInput` an MDM^T02 text note gives; ``None`` when it carries a document.

    Read with python-hl7 (:func:`hl7referral.v2.parse.parse_message`: MSH-18 charset, a
    *default_charset* when MSH-18 is empty) and the mapping functions of :mod:`.functions`:

    ============================  =====================================================================
    ``referral_id``               TXA-14, first repetition (placer order number = the referral id;
                                  ``hl7referral.v2.mdm``). Required.
    ``text``, ``title``           OBX with OBX-2 TX, FT or ST (also TEXT, CF, as ``loop.correlate``
                                  reads notes), ordered by OBX-1: each OBX-5 repetition a line, an
                                  empty OBX-5 a blank line (FT ``\\.br\\`` breaks lines); title
                                  OBX-3.2, else TXA-2.2.
    ``patient``                   PID-3 ids, PID-5 names, PID-7 birth, PID-8 sex, PID-11 address,
                                  PID-13/14 phones; an animal: PID-35 species, PID-36 breed, owner =
                                  NK1 with NK1-3 ``OWN`` (as ``mappings/*.toml`` read them).
    ``author``                    TXA-9 (originator), else TXA-5 (primary activity provider).
    ``recipient``                 PV1-8 (referring doctor), when present.
    ``custodian``                 MSH-4 (the sending facility: the specialist's organisation).
    ``effective_time``            TXA-6 (origination), else EVN-2, else MSH-7.
    ``encounter_time``            TXA-4 (activity: when the consult took place).
    ``document_id``               TXA-12; else a UUIDv5 of MSH-3, MSH-4 and MSH-10 (a resent
                                  message gives the same id).
    ``encounter_id``              PV1-19.
    ``final``                     TXA-17 AU or LA.
    ============================  =====================================================================

    Returns ``None`` when an OBX with OBX-2 ``ED`` holds data (a C-CDA, a PDF): that document
    is the note; the caller forwards it as it is. Raises :class:`MdmError` naming segment and
    field for what cannot become a note: unreadable MSH, not MDM^T02 (MSH-9; T04-T10 revise a
    document and need its parent), no PID, no TXA, TXA-14 empty, no note text. Race, ethnicity
    and language are not read (site tables; the document says ``UNK``): callers with the
    referral's patient replace it (``dataclasses.replace(result, patient=...)``), as they may
    the custodian or the recipient.
    """
    try:
        m = _Msg(parse_message(bytes(raw), default_charset))
    except ParseError as exc:
        raise MdmError("MSH", None, f"message not readable: {exc}") from None
    msh = m.first("MSH")
    kind = (m.get(msh, 9, 1).upper(), m.get(msh, 9, 2).upper())
    if kind != ("MDM", "T02"):
        raise MdmError("MSH", 9, f"{'^'.join(k for k in kind if k) or 'empty'}: not an MDM^T02")
    pid = m.first("PID")
    if pid is None:
        raise MdmError("PID", None, "no PID segment: the note names no patient")
    txa = m.first("TXA")
    if txa is None:
        raise MdmError("TXA", None, "no TXA segment: no referral id, author or document id")
    referral_id = fn.ei(m.rep(txa, 14))
    if referral_id is None:
        raise MdmError("TXA", 14, "placer order number (the referral id) is empty")

    text_obx, has_document = [], False
    for position, obx in enumerate(m.segments("OBX")):
        vtype = m.get(obx, 2).upper()
        if vtype == "ED" and m.reps(obx, 5):
            has_document = True
        elif vtype in _TEXT_TYPES:
            set_id = m.get(obx, 1)
            text_obx.append(((int(set_id) if set_id.isdigit() else float("inf"), position), obx))
    if has_document:
        return None
    if not text_obx:
        raise MdmError("OBX", 5, "no note text (no OBX with OBX-2 TX, FT or ST) and no document (ED)")
    text_obx.sort(key=lambda item: item[0])
    # Every repetition is a line, an empty OBX-5 a blank one; FT's \.br\ (unescaped to CR) breaks one.
    lines = [line for _, obx in text_obx for rep in m.reps(obx, 5, keep_empty=True) or [[[""]]]
             for line in _LINE_BREAK.split(m.text(rep))]
    if not any(line.strip() for line in lines):
        raise MdmError("OBX", 5, "the note text is empty")

    title = next((t for t in (m.get(obx, 3, 2) for _, obx in text_obx) if t), "") or m.get(txa, 2, 2)
    author_rep = m.rep(txa, 9) or m.rep(txa, 5)
    pv1 = m.first("PV1")
    recipient = _party(m.rep(pv1, 8))
    document_id = fn.ei(m.rep(txa, 12)) or Identifier(root=_message_uuid(m, msh, raw))
    return ConsultInput(
        referral_id=referral_id,
        text="\n".join(lines),
        patient=_patient(m, pid),
        author=_party(author_rep) or Party(),
        custodian=_facility(m.rep(msh, 4)),
        recipient=recipient,
        title=title or DEFAULT_TITLE,
        effective_time=_first_ts(m.rep(txa, 6), m.rep(m.first("EVN"), 2), m.rep(msh, 7)),
        encounter_time=_first_ts(m.rep(txa, 4)),
        document_id=document_id,
        encounter_id=fn.cx(m.rep(pv1, 19)) or Identifier(),
        veterinary=bool(m.reps(pid, 35)),
        final=m.get(txa, 17).upper() in _FINAL,
    )


def _first_ts(*reps: Rep) -> str:
    for rep in reps:
        value = fn.ts(rep) if rep else None
        if value:
            return value
    return ""


def _party(rep: Rep) -> Party | None:
    """An XCN (TXA-5, TXA-9, PV1-8) as a clinician: id (NPI when typed so) and name."""
    if not rep:
        return None
    ident, name = fn.xcn_id(rep), fn.xcn_name(rep)
    if ident is None and name is None:
        return None
    return Party(ids=[ident] if ident else [], name=name or Party().name)


def _facility(rep: Rep) -> Party:
    """MSH-4 (HD: namespace ^ universal id ^ type) as the custodian organisation."""
    namespace = rep[0][0].strip() if rep and rep[0] else ""
    uid = rep[1][0].strip() if len(rep) > 1 and rep[1] else ""
    kind = rep[2][0].strip().upper() if len(rep) > 2 and rep[2] else ""
    ids = [Identifier(root=uid)] if _OID_RE.match(uid) and kind in ("ISO", "") else []
    return Party(ids=ids, organization=namespace)


def _patient(m: _Msg, pid) -> Patient:
    p = Patient(
        ids=[i for i in (fn.cx(r) for r in m.reps(pid, 3)) if i],
        names=[n for n in (fn.xpn(r) for r in m.reps(pid, 5)) if n],
        gender=Code(m.get(pid, 8).upper()) if m.get(pid, 8) else Code(),
        birth_time=_first_ts(m.rep(pid, 7)),
        addr=[a for a in (fn.xad(r) for r in m.reps(pid, 11)) if a],
        telecom=[t for t in (fn.xtn(r) for r in m.reps(pid, 13) + m.reps(pid, 14)) if t],
        species=fn.cwe(m.rep(pid, 35)) or Code(),
        breed=fn.cwe(m.rep(pid, 36)) or Code(),
    )
    owner = next((nk1 for nk1 in m.segments("NK1") if m.get(nk1, 3).upper() == "OWN"), None)
    if owner is not None:
        p.owner = Party(
            name=fn.xpn(m.rep(owner, 2)) or Party().name,
            addr=[a for a in (fn.xad(r) for r in m.reps(owner, 4)) if a],
            telecom=[t for t in (fn.xtn(r) for r in m.reps(owner, 5) + m.reps(owner, 6)) if t],
            relationship=fn.cwe(m.rep(owner, 3)) or Code(),
        )
    return p


def _message_uuid(m: _Msg, msh, raw: bytes) -> str:
    """A stable document id for an MDM without TXA-12: from MSH-3, MSH-4 and MSH-10 (else the bytes)."""
    control = m.get(msh, 10)
    if control:
        name = "|".join(m.text(m.rep(msh, n)) for n in (3, 4, 10))
    else:
        name = hashlib.sha256(bytes(raw)).hexdigest()
    return uuid5(uuid.NAMESPACE_URL.bytes, "urn:hl7referral:mdm-t02:" + name)
