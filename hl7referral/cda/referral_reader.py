"""Read a C-CDA Referral Note back into the few facts a local EHR needs (sans-I/O).

The specialist's engine receives a referral over Direct (an XDM package with a 360X
OMG^O19 and a C-CDA, or a bare C-CDA) and hands it to its own EHR
(:mod:`hl7referral.v2.forward`). This module reads the document: bytes in, a
:class:`ReferralSummary` out. It reads our own Referral Note
(:mod:`~hl7referral.cda.referral_note`) and any other C-CDA header (HL7's
``Referral_Note.xml`` sample, a CCD sent as a "simple referral"): what a document does
not say is empty, never guessed.

Where each fact comes from
--------------------------
============================  =====================================================================
``referral_id`` / ``_ei``     the first Referral Act (``4.140``) ``id``: the closed-loop key
                              (``ccda.md`` §6; our builder writes the v2 referral id there)
``document_id``               ``ClinicalDocument/id``
``patient``                   ``recordTarget/patientRole``: ids, the first name, birthTime,
                              administrativeGenderCode, telecom; veterinary: species and breed from
                              the coded ``ASSERTION`` entries our builder writes (``#pt-species`` /
                              ``#pt-breed``), else from ``sdtc:desc`` ("Species: ...; Breed: ..."),
                              the owner from ``participant[@typeCode=IND]`` with role ``OWN``
``referring``                 the header ``author/assignedAuthor`` (ids, assignedPerson/name,
                              representedOrganization/name, telecom)
``recipient``                 ``informationRecipient/intendedRecipient``, else the Referral Act's
                              ``participant[@typeCode=REFT]``
``reason``                    the Referral Act's text (its ``reference`` resolved in the narrative),
                              else its Indication (RSON) value, else the Reason for Referral
                              section's narrative when that is free text (a table is structured
                              data, not the reason; a ``nullFlavor`` section says nothing)
``service``                   the Referral Act's ``SUBJ`` observation value (requested service)
``priority``                  the Referral Act's ``priorityCode``, else the service's
============================  =====================================================================

Identifiers as HL7 v2 text
--------------------------
An ``II`` becomes the v2 form :func:`hl7referral.loop.correlate.ei_key` reads back to the
same stored key as :func:`~hl7referral.loop.correlate.ii_key` (the form the engine stores
referrals under: ``ext@root``, or the bare extension for the engine's own stand-in roots):

* an OID root: EI ``ext^^root^ISO``, CX ``ext^^^&root&ISO``;
* a root equal to or under ``local_root`` (the builder's stand-in for a v2 namespace-only
  id, :func:`~hl7referral.cda.referral_note.ii_attrs`): the namespace is back in place,
  EI ``ext^NAMESPACE``, CX ``ext^^^NAMESPACE`` (``assigningAuthorityName``), or the bare
  extension when there is none;
* a root without an extension (a UUID document or act id): the root is the identifier,
  EI ``root``, CX ``root``;
* a UUID root with an extension: EI ``ext^^root^UUID``, CX ``ext^^^&root&UUID``. Known gap:
  ``ei_key`` reads only OID roots, so this EI comes back as the bare extension while
  ``ii_key`` of the document says ``ext@uuid``.

Invariants
----------
* XML is parsed with :func:`~hl7referral.cda.validate.parse_untrusted`: no DTD, no entity
  expansion, no network; a DOCTYPE is refused.
* Not a CDA (not bytes, empty, not well-formed, a DOCTYPE, another root element) raises
  :class:`ReferralNoteError` (a ``ValueError``) with the reason; a ClinicalDocument never
  raises: what is missing or malformed inside it reads as empty values.
* v2 fields here (``*_ei``, ``patient.ids``, :meth:`ReferralSummary.patient_name`) are ER7
  with the standard delimiters, their text escaped by :func:`hl7referral.v2.mdm.escape`;
  every other value is plain text (whitespace collapsed), for the caller to escape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lxml import etree

from ..loop.correlate import DEFAULT_LOCAL_ROOT, ii_key
from ..v2.mdm import escape
from .model import OID, Code, Identifier, Name
from .validate import parse_untrusted

V3 = "{urn:hl7-org:v3}"
SDTC = "{urn:hl7-org:sdtc}"
NS = {"v3": "urn:hl7-org:v3"}
REFERRAL_ACT_TEMPLATE = "2.16.840.1.113883.10.20.22.4.140"
REASON_FOR_REFERRAL_TEMPLATE = "1.3.6.1.4.1.19376.1.5.3.1.3.1"
REASON_FOR_REFERRAL_LOINC = "42349-1"
OWNER_ROLE = "OWN"   # HL7 table 0063, what the builder writes for an animal's owner

_OID = re.compile(r"[0-2](\.\d+)+\Z")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\Z")
_SPECIES_DESC = re.compile(r"(?:^|;)\s*Species:\s*([^;]+)")
_BREED_DESC = re.compile(r"(?:^|;)\s*Breed:\s*([^;]+)")


class ReferralNoteError(ValueError):
    """The bytes are not a CDA document: not XML, a DOCTYPE, or another root element."""


@dataclass(frozen=True)
class Clinician:
    """A provider named in the document (the referring author, the recipient)."""

    ids: tuple[Identifier, ...] = ()
    name: Name = field(default_factory=Name)
    organization: str = ""
    telecom: tuple[str, ...] = ()   # TEL URLs as written: tel:..., mailto:..., fax:...

    @property
    def npi(self) -> str:
        """The NPI, when one of the ids has the NPI root."""
        return next((i.extension for i in self.ids if i.root == OID["NPI"] and i.extension), "")

    @property
    def first_id(self) -> Identifier | None:
        """The NPI identifier if there is one, else the first id."""
        return next((i for i in self.ids if i.root == OID["NPI"] and i.extension), self.ids[0] if self.ids else None)

    @property
    def label(self) -> str:
        return self.organization or self.name.text()


@dataclass(frozen=True)
class PatientSummary:
    ids: str = ""                     # PID-3 ER7: CX repetitions joined by '~'
    name: Name = field(default_factory=Name)
    birth_time: str = ""              # birthTime/@value, an HL7 TS
    sex: str = ""                     # administrativeGenderCode/@code (M, F, UN), '' when null
    telecom: tuple[str, ...] = ()
    species: Code = field(default_factory=Code)
    breed: Code = field(default_factory=Code)
    owner: Clinician | None = None    # an animal's owner (name, telecom)


@dataclass(frozen=True)
class ReferralSummary:
    """What a C-CDA Referral Note says about the referral (see the module docstring)."""

    referral_id: str = ""             # stored form: ext@root, ext (local root), or root
    referral_ei: str = ""             # the same as an HL7 v2 EI
    document_id: str = ""             # ClinicalDocument/id as a key: ext@root or root
    document_code: Code = field(default_factory=Code)   # e.g. 57133-1 Referral note (LOINC)
    title: str = ""
    effective_time: str = ""          # ClinicalDocument/effectiveTime/@value
    referral_time: str = ""           # the Referral Act's effectiveTime/@value
    patient: PatientSummary = field(default_factory=PatientSummary)
    referring: Clinician = field(default_factory=Clinician)
    recipient: Clinician = field(default_factory=Clinician)
    reason: str = ""                  # reason for referral, text
    reason_code: Code = field(default_factory=Code)     # the Indication's coded value
    service: Code = field(default_factory=Code)         # requested service
    priority: Code = field(default_factory=Code)        # ActPriority (A, R, S, EM, UR, ...)
    veterinary: bool = False

    @property
    def patient_ids(self) -> str:
        """PID-3 as ER7."""
        return self.patient.ids

    @property
    def patient_cx(self) -> str:
        """The first patient id, one CX."""
        return self.patient.ids.split("~", 1)[0]

    @property
    def patient_name(self) -> str:
        """PID-5 as ER7 (XPN)."""
        return xpn(self.patient.name)

    def facts(self) -> dict:
        """The notification facts of :func:`hl7referral.loop.tracker.referral_facts` that a
        document can give (contact, specialist, purpose, referring provider); '' for the rest."""
        contact = self.patient.owner.telecom if self.veterinary and self.patient.owner else ()
        telecom = contact or self.patient.telecom
        return {
            "email": _scheme(telecom, "mailto:"), "phone": _scheme(telecom, "tel:"), "veterinary": self.veterinary,
            "specialist": self.recipient.label, "specialist_phone": _scheme(self.recipient.telecom, "tel:"),
            "specialist_email": _scheme(self.recipient.telecom, "mailto:"), "scheduling_link": "",
            "how_to_book": "", "purpose": self.reason_code.display or self.reason or label(self.service),
            "referring_provider": next((i.extension for i in self.referring.ids if i.extension), ""),
            "payer": "", "authorization": "",
        }


def label(code: Code) -> str:
    """A code's words: its displayName, else its original text."""
    return code.display or code.original_text


def _scheme(telecom: tuple[str, ...], scheme: str) -> str:
    return next((t[len(scheme):] for t in telecom if t.startswith(scheme)), "")


# -- identifiers as v2 text ---------------------------------------------------------------------

def _under(root: str, local_root: str) -> bool:
    return root == local_root or root.startswith(local_root + ".")


def _v2_id(ident: Identifier, local_root: str, namespace_sep: str, rooted: str) -> str:
    """An II as an HL7 v2 id: EI and CX differ only in where the namespace or the root goes."""
    root, ext = ident.root.strip(), ident.extension.strip()
    if not ext:
        return escape(root)
    if not root or _under(root, local_root):
        namespace = ident.authority.strip()
        return escape(ext) + (f"{namespace_sep}{escape(namespace)}" if namespace else "")
    kind = "ISO" if _OID.match(root) else "UUID" if _UUID.match(root) else ""
    return rooted.format(ext=escape(ext), root=escape(root), kind=kind) if kind else \
        f"{escape(ext)}{namespace_sep}{escape(root)}"


def ei(ident: Identifier, local_root: str = DEFAULT_LOCAL_ROOT) -> str:
    """An II as an HL7 v2 EI (rules in the module docstring); '' for no id."""
    return _v2_id(ident, local_root, "^", "{ext}^^{root}^{kind}")


def cx(ident: Identifier, local_root: str = DEFAULT_LOCAL_ROOT) -> str:
    """An II as an HL7 v2 CX (``ext^^^&root&ISO``; rules in the module docstring); '' for no id."""
    return _v2_id(ident, local_root, "^^^", "{ext}^^^&{root}&{kind}")


def xpn(name: Name) -> str:
    """A name as an HL7 v2 XPN: family ^ given ^ further given names ^ suffix ^ prefix."""
    given = [g for g in name.given if g]
    parts = [name.family, given[0] if given else "", " ".join(given[1:]), name.suffix, name.prefix]
    return "^".join(escape(p) for p in parts).rstrip("^")


# -- reading --------------------------------------------------------------------------------------

def read_referral_note(data: bytes, *, local_root: str = DEFAULT_LOCAL_ROOT) -> ReferralSummary:
    """Read a C-CDA (a Referral Note, or any ClinicalDocument) into a :class:`ReferralSummary`.

    *local_root* is the engine's ``cda.local_root``: roots under it are the builder's
    stand-ins for v2 namespaces (see the module docstring). Raises
    :class:`ReferralNoteError` when *data* is not a CDA document, nothing else.
    """
    root = _parse(data)
    return _Reader(root, local_root).summary()


def _parse(data) -> etree._Element:
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ReferralNoteError(f"expected the document's bytes, got {type(data).__name__}")
    if not data.strip():
        raise ReferralNoteError("empty document")
    try:
        tree = parse_untrusted(data)
    except etree.XMLSyntaxError as exc:
        line = getattr(exc, "lineno", None)
        raise ReferralNoteError("not well-formed XML" + (f" (line {line})" if line else "")) from None
    except ValueError as exc:   # UnsafeXML: a DOCTYPE
        raise ReferralNoteError(str(exc)) from None
    root = tree.getroot()
    if root.tag != f"{V3}ClinicalDocument":
        raise ReferralNoteError(f"not a CDA document (root element {root.tag!r})")
    return root


def _text(el: etree._Element | None) -> str:
    """The element's text content, whitespace collapsed (comments and PIs are not text)."""
    return " ".join("".join(el.itertext()).split()) if el is not None else ""


class _Reader:
    def __init__(self, root: etree._Element, local_root: str) -> None:
        self.root = root
        self.local_root = local_root
        self._ids: dict[str, etree._Element] | None = None

    def find(self, el, path: str):
        return el.find(path.replace("v3:", V3)) if el is not None else None

    def findall(self, el, path: str) -> list:
        return el.findall(path.replace("v3:", V3)) if el is not None else []

    def narrative(self, ref: str) -> str:
        """The text of the narrative element a ``reference/@value="#id"`` points at."""
        if self._ids is None:
            self._ids = {}
            for el in self.root.iter():
                i = el.get("ID") if isinstance(el.tag, str) else None
                if i and i not in self._ids:
                    self._ids[i] = el
        return _text(self._ids.get(ref.strip().removeprefix("#"))) if ref else ""

    def own_text(self, el) -> str:
        """A ``text`` / ``originalText``: its reference resolved, else its own content."""
        if el is None:
            return ""
        ref = self.find(el, "v3:reference")
        if ref is not None and ref.get("value"):
            return self.narrative(ref.get("value", ""))
        return _text(el)

    def identifier(self, el) -> Identifier | None:
        if el is None or el.get("nullFlavor"):
            return None
        root, ext = el.get("root", "").strip(), el.get("extension", "").strip()
        if not (root or ext):
            return None
        return Identifier(root=root, extension=ext, authority=el.get("assigningAuthorityName", "").strip())

    def identifiers(self, parent) -> tuple[Identifier, ...]:
        out: list[Identifier] = []
        for el in self.findall(parent, "v3:id"):
            ident = self.identifier(el)
            if ident is not None and all((i.root, i.extension) != (ident.root, ident.extension) for i in out):
                out.append(ident)
        return tuple(out)

    def code(self, el) -> Code:
        """A CD: code, system, displayName, codeSystemName, and the text (originalText resolved)."""
        if el is None:
            return Code()
        code = el.get("code", "").strip()
        display = " ".join(el.get("displayName", "").split())
        text = self.own_text(self.find(el, "v3:originalText"))
        if code and text.split(" (", 1)[0].split(" [", 1)[0] == code:
            text = ""   # the builder's narrative label "CODE (system)": not a text of its own
        return Code(code=code, system=el.get("codeSystem", "").strip(), display=display,
                    system_name=el.get("codeSystemName", "").strip(), original_text=text)

    def name(self, el) -> Name:
        if el is None or el.get("nullFlavor"):
            return Name()
        given = [_text(g) for g in self.findall(el, "v3:given") if not g.get("nullFlavor") and _text(g)]
        family = next((_text(f) for f in self.findall(el, "v3:family") if _text(f)), "")
        prefix = " ".join(_text(p) for p in self.findall(el, "v3:prefix") if _text(p))
        suffix = " ".join(_text(s) for s in self.findall(el, "v3:suffix") if _text(s))
        if not (given or family or prefix or suffix):
            family = _text(el)   # an unstructured name: <name>Biscuit</name>
        return Name(family=family, given=given, prefix=prefix, suffix=suffix)

    def telecom(self, parent) -> tuple[str, ...]:
        return tuple(t.get("value", "").strip() for t in self.findall(parent, "v3:telecom")
                     if t.get("value", "").strip() and not t.get("nullFlavor"))

    def value(self, el, attr: str = "value") -> str:
        return el.get(attr, "").strip() if el is not None and not el.get("nullFlavor") else ""

    # the document's parts

    def summary(self) -> ReferralSummary:
        root = self.root
        act = self.referral_act()
        referral = self.identifier(self.find(act, "v3:id")) if act is not None else None
        doc_id = self.identifier(self.find(root, "v3:id"))
        patient, vet = self.patient()
        service_obs = self.service_observation(act)
        priority = self.code(self.find(act, "v3:priorityCode"))
        if not priority:
            priority = self.code(self.find(service_obs, "v3:priorityCode"))
        reason, reason_code = self.reason(act)
        return ReferralSummary(
            referral_id=ii_key(referral.root, referral.extension, self.local_root) if referral else "",
            referral_ei=ei(referral, self.local_root) if referral else "",
            document_id=ii_key(doc_id.root, doc_id.extension, "\0") if doc_id else "",
            document_code=self.code(self.find(root, "v3:code")),
            title=_text(self.find(root, "v3:title")),
            effective_time=self.value(self.find(root, "v3:effectiveTime")),
            referral_time=self.value(self.find(act, "v3:effectiveTime")) if act is not None else "",
            patient=patient,
            referring=self.author(),
            recipient=self.recipient(act),
            reason=reason,
            reason_code=reason_code,
            service=self.code(self.find(service_obs, "v3:value")),
            priority=priority,
            veterinary=vet,
        )

    def referral_act(self):
        found = self.root.xpath("//v3:act[v3:templateId/@root=$t]", namespaces=NS, t=REFERRAL_ACT_TEMPLATE)
        return found[0] if found else None

    def service_observation(self, act):
        for rel in self.findall(act, "v3:entryRelationship"):
            if rel.get("typeCode") == "SUBJ":
                obs = self.find(rel, "v3:observation")
                if obs is not None:
                    return obs
        return None

    def reason(self, act) -> tuple[str, Code]:
        coded = Code()
        for rel in self.findall(act, "v3:entryRelationship"):
            if rel.get("typeCode") == "RSON":
                coded = self.code(self.find(rel, "v3:observation/v3:value"))
                if coded:
                    break
        text = self.own_text(self.find(act, "v3:text")) if act is not None else ""
        if not text:
            text = label(coded)
        if not text:
            section = self.reason_section()
            narrative = self.find(section, "v3:text")
            # Free text is the reason; a table is structured data whose reason row, if there
            # is one, the act references (the builder's form, handled above).
            if (narrative is not None and not section.get("nullFlavor")
                    and not narrative.xpath(".//v3:table", namespaces=NS)):
                text = _text(narrative)
        return text, coded

    def reason_section(self):
        for section in self.root.iter(f"{V3}section"):
            templates = {t.get("root") for t in self.findall(section, "v3:templateId")}
            code = self.find(section, "v3:code")
            if REASON_FOR_REFERRAL_TEMPLATE in templates or (
                    code is not None and code.get("code") == REASON_FOR_REFERRAL_LOINC):
                return section
        return None

    def patient(self) -> tuple[PatientSummary, bool]:
        role = self.find(self.root, "v3:recordTarget/v3:patientRole")
        pt = self.find(role, "v3:patient")
        ids = [c for c in (cx(i, self.local_root) for i in self.identifiers(role)) if c]
        names = [n for n in (self.name(el) for el in self.findall(pt, "v3:name")) if n]
        gender = self.find(pt, "v3:administrativeGenderCode")
        species, breed = self.species_and_breed(pt)
        owner = self.owner(pt)
        race = self.find(pt, "v3:raceCode")
        # The builder marks an animal's race and ethnicity "NA" (not applicable).
        vet = bool(species or breed or owner is not None
                   or (race is not None and race.get("nullFlavor") == "NA"))
        return PatientSummary(
            ids="~".join(ids), name=names[0] if names else Name(),
            birth_time=self.value(self.find(pt, "v3:birthTime")),
            sex=self.value(gender, "code").upper(), telecom=self.telecom(role),
            species=species, breed=breed, owner=owner,
        ), vet

    def species_and_breed(self, pt) -> tuple[Code, Code]:
        found = {"species": Code(), "breed": Code()}
        for obs in self.root.iter(f"{V3}observation"):
            ref = self.find(obs, "v3:text/v3:reference")
            key = (ref.get("value", "") if ref is not None else "").removeprefix("#pt-")
            if key in found and not found[key]:
                found[key] = self.code(self.find(obs, "v3:value"))
        desc = _text(pt.find(f"{SDTC}desc")) if pt is not None else ""
        for key, pattern in (("species", _SPECIES_DESC), ("breed", _BREED_DESC)):
            m = pattern.search(desc)
            if not found[key] and m:
                found[key] = Code(display=m.group(1).strip(), original_text=m.group(1).strip())
        return found["species"], found["breed"]

    def owner(self, pt) -> Clinician | None:
        for part in self.findall(self.root, "v3:participant"):
            entity = self.find(part, "v3:associatedEntity")
            code = self.find(entity, "v3:code")
            if part.get("typeCode") == "IND" and code is not None and code.get("code") == OWNER_ROLE:
                return Clinician(self.identifiers(entity), self.name(self.find(entity, "v3:associatedPerson/v3:name")),
                                 _text(self.find(entity, "v3:scopingOrganization/v3:name")), self.telecom(entity))
        return None

    def author(self) -> Clinician:
        author = self.find(self.root, "v3:author/v3:assignedAuthor")
        return Clinician(self.identifiers(author), self.name(self.find(author, "v3:assignedPerson/v3:name")),
                         _text(self.find(author, "v3:representedOrganization/v3:name")), self.telecom(author))

    def recipient(self, act) -> Clinician:
        ir = self.find(self.root, "v3:informationRecipient/v3:intendedRecipient")
        found = Clinician(self.identifiers(ir), self.name(self.find(ir, "v3:informationRecipient/v3:name")),
                          _text(self.find(ir, "v3:receivedOrganization/v3:name")), self.telecom(ir))
        if found.ids or found.label:
            return found
        for part in self.findall(act, "v3:participant"):
            if part.get("typeCode") == "REFT":
                role = self.find(part, "v3:participantRole")
                return Clinician(self.identifiers(role), self.name(self.find(role, "v3:playingEntity/v3:name")),
                                 _text(self.find(role, "v3:scopingEntity/v3:desc")), self.telecom(role))
        return found
