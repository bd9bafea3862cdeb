"""Render a :class:`~hl7referral.cda.model.Referral` as a C-CDA R2.1 Referral Note.

The document is the Referral Note ``2.16.840.1.113883.10.20.22.1.14:2015-08-01``
on the US Realm Header ``2.16.840.1.113883.10.20.22.1.1:2015-08-01``, LOINC
57133-1. Reference: ``shared/reference/ccda.md`` §2–§4, §7, §10.

Invariants
----------
* For every :class:`Referral` (including an empty one) the result is valid
  against ``CDA_SDTC.xsd`` and passes the R2.1 Schematron ``errors`` phase
  (tests/test_referral_note.py). Element order follows the XSD sequences.
* R2.1 double-templateId rule: every section/entry template that existed in
  C-CDA R1.1 is declared with its versioned templateId *and* its bare R1.1
  root (``hasCompatibleR1.1TemplateId``, CONF:1198-32943).
* Nothing is invented. An unknown value gets a nullFlavor (``UNK``; ``NA`` for
  race/ethnicity of an animal); a required section without data is
  ``section/@nullFlavor="NI"`` with the text "No information" and no entries.
  The only defaults are generic codes the templates require and the model has
  no field for, each named where it is used: Referral Act code SNOMED 44383000
  when ``referral_type`` is empty, allergy type SNOMED 419199007 "Allergy to
  substance", problem type SNOMED 55607006 "Problem", indication type
  404684003 "Clinical finding".
* Entries point at their narrative with ``<reference value="#ID"/>``; every ID
  is unique in the document and sits on visible text. Tables stay tables.
* Whatever the model holds, the output stays schema-valid: timestamps the
  XSD cannot take become nullFlavor, codes/units/language tags with inner
  spaces are not codes (kept as original text), code systems given by name
  ("ICD10CM", v2 "LN") become their OID, unknown @use values are dropped.
* Deterministic: entry ids are UUIDv5 derived from the document id, so the
  same referral and document id always give the same bytes. Without a
  document id the builder makes a random UUID (a document must have an id).
* Identifiers (``II``): an OID or UUID ``root`` is used as given. An NPI
  (root ``2.16.840.1.113883.4.6`` or authority/root text "NPI") gets the NPI
  root. Any other identifier only has a namespace name (v2 assigning
  authority such as "HOSP_MRN"): its root is ``BuildOptions.local_root`` plus
  one arc derived from the name (first 4 bytes of its SHA-256 as an integer),
  and the name is kept in ``@assigningAuthorityName``. So two namespaces never
  share a root, the same namespace always maps to the same root, and no
  nullFlavor hides an identifier the sender did give. Sites set
  ``local_root`` to an arc of their own OID reserved for this purpose. Payer
  member, group and authorization numbers are namespaces of their own
  ("<payer> member ID", …), never the payer organisation's OID.
* Speed: fixed template parts (the document head, sections, entries, the
  narrative tables' header and empty rows) are parsed once and deep-copied
  (:class:`_Proto`, :class:`~.narrative.Columns`); only document values are
  set element by element. Where data decides the structure (a name's parts,
  an address's, a result's value kind, an allergy's reaction and severity,
  whether a narrative reference exists), there is one skeleton per shape, the
  shape's elements and constant attributes in place (``_shape`` and the
  ``*_proto`` functions; a copied element costs a fraction of a SubElement,
  and every ``set()`` or SubElement has lxml check the name). The skeletons
  hold constants only, never document data (tests/test_referral_note.py
  checks that building leaves them as they were); shapes come from finite
  sets, so their caches stay small.
* Veterinary referrals (``referral.veterinary`` or a patient species): the
  animal's name stays the patient name; species and breed are stated in
  ``patient/sdtc:desc``, in the Reason for Referral narrative ("Patient" table)
  and as coded ``ASSERTION`` observations (value = the species/breed code) in
  that section; the owner is a header ``participant typeCode="IND"``
  (``associatedEntity classCode="PRS"``) and is named in the narrative.
* Payers: one Coverage Activity holding one Policy Activity per payer; a prior
  authorization is an Authorization Activity (``2.16.840.1.113883.10.20.1.19``,
  id = the authorization number) under the Policy Activity (``REFR``), whose
  promised act carries the authorized service and period.
* Assessment (2.8) + Plan of Treatment (2.10) rather than the combined A&P
  section: PoT is itself a SHOULD of the Referral Note.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree

from . import narrative as nv
from .model import (
    OID,
    Address,
    Allergy,
    Code,
    Identifier,
    Medication,
    Name,
    Party,
    Patient,
    Payer,
    Problem,
    Referral,
    Result,
    Telecom,
)

V3_NS = "urn:hl7-org:v3"
SDTC_NS = "urn:hl7-org:sdtc"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
NSMAP = {None: V3_NS, "sdtc": SDTC_NS, "xsi": XSI_NS}
V3 = "{" + V3_NS + "}"
XSI_TYPE = "{" + XSI_NS + "}type"

US_REALM_HEADER = ("2.16.840.1.113883.10.20.22.1.1", "2015-08-01")
REFERRAL_NOTE = ("2.16.840.1.113883.10.20.22.1.14", "2015-08-01")
DOCUMENT_CODE = Code("57133-1", OID["LOINC"], "Referral note", "LOINC")
DEFAULT_REFERRAL_TYPE = Code("44383000", OID["SNOMED"], "Patient referral for consultation", "SNOMED CT")
ALLERGY_TO_SUBSTANCE = Code("419199007", OID["SNOMED"], "Allergy to substance (disorder)", "SNOMED CT")
PROBLEM_TYPE = Code("55607006", OID["SNOMED"], "Problem", "SNOMED CT")
PROBLEM_TYPE_LOINC = Code("75326-9", OID["LOINC"], "Problem", "LOINC")
CLINICAL_FINDING = Code("404684003", OID["SNOMED"], "Clinical finding (finding)", "SNOMED CT")

ACT_CODE = "2.16.840.1.113883.5.4"
ACT_CLASS = "2.16.840.1.113883.5.6"
ROLE_CLASS = "2.16.840.1.113883.5.110"
OBSERVATION_INTERPRETATION = "2.16.840.1.113883.5.83"
_GENDER = {"M": "Male", "F": "Female", "UN": "Undifferentiated"}
# TEL/AD @use values CDA_SDTC.xsd accepts; anything else a mapping passes is dropped.
_TEL_USES = {"H", "HP", "HV", "WP", "DIR", "PUB", "BAD", "TMP", "AS", "EC", "MC", "PG"}
_ADDR_USES = {"H", "HP", "HV", "WP", "DIR", "PUB", "BAD", "TMP"}

_OID_PATTERN = r"[0-2](\.(0|[1-9][0-9]*))*"
_UUID_PATTERN = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
_ROOT_RE = re.compile(f"(?:{_OID_PATTERN}|{_UUID_PATTERN})\\Z")  # one match instead of one per form
_TS_RE = re.compile(r"(\d{4,14})(\.\d+)?([+-]\d{4})?\Z")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")
_RANGE_RE = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*-\s*([+-]?\d+(?:\.\d+)?)\s*\Z")
_PHONE_RE = re.compile(r"\+?[\d ().\-]*\d[\d ().\-]*\Z")
_PHONE_SEPARATORS = re.compile(r"[ ().\-]")
_SYSTEM_NAMES = {oid: name for name, oid in OID.items()}
_KNOWN_SYSTEMS = frozenset(_SYSTEM_NAMES)  # OIDs of the named systems: the usual code.system, no regex needed
# HL7 v2 coding-system names (table 0396) a mapping may pass through instead of an OID.
_V2_SYSTEMS = {"LN": "LOINC", "SCT": "SNOMED", "I10": "ICD10CM", "I10C": "ICD10CM", "I9C": "ICD9CM", "I9CDX": "ICD9CM"}


@dataclass(frozen=True)
class BuildOptions:
    """Site settings for the document; the defaults suit tests and examples.

    ``local_root``: OID under which namespace-only identifiers get their root
    (see the module invariants). The default is HL7's example arc
    ``2.16.840.1.113883.19``; production sites set their own.
    """

    local_root: str = "2.16.840.1.113883.19"
    title: str = "Referral Note"
    language: str = "en-US"
    confidentiality: str = "N"


DEFAULT_OPTIONS = BuildOptions()


def build_referral_note(referral: Referral, options: BuildOptions | None = None) -> etree._ElementTree:
    """The C-CDA R2.1 Referral Note for *referral*, as an lxml tree."""
    return _Builder(referral, options or DEFAULT_OPTIONS).build()


def to_bytes(tree: etree._ElementTree | etree._Element) -> bytes:
    """UTF-8 bytes with an XML declaration, indented (validator line numbers refer to this form)."""
    return etree.tostring(tree, xml_declaration=True, encoding="UTF-8", pretty_print=True)


# --- small helpers -------------------------------------------------------------------------------


_SubElement = etree.SubElement


def _el(parent: etree._Element, tag: str, attrib: dict[str, str] | None = None) -> etree._Element:
    el = _SubElement(parent, V3 + tag)
    if attrib:
        # One set() per attribute costs less than SubElement's attrib argument (same order).
        for name, value in attrib.items():
            el.set(name, value)
    return el


def _set_attrs(el: etree._Element, attrib: dict[str, str]) -> None:
    """``el.attrib.update(attrib)`` without making the attrib proxy."""
    for name, value in attrib.items():
        el.set(name, value)


def _text_el(parent: etree._Element, tag: str, text: str) -> etree._Element:
    el = _el(parent, tag)
    el.text = nv.clean(text)
    return el


def _org_text(parent: etree._Element, tag: str, text: str) -> None:
    """``<tag><name>text</name></tag>`` (``desc`` for a scopingEntity) under *parent*; tag from ``_W_ORG_NAMES``."""
    _W_ORG_NAMES[tag].add(parent)["text"].text = nv.clean(text)


def _reference_text(id: str) -> etree._Element:
    """A free ``<text><reference value="#id"/></text>``, for the caller to place in an entry."""
    s = _TEXT_REFERENCE.new()
    s["ref"].set("value", "#" + id)
    return s[""]


def is_root(value: str) -> bool:
    """Whether *value* can be an ``II/@root`` (an OID or a UUID)."""
    return _ROOT_RE.match(value) is not None


def _is_npi(ident: Identifier) -> bool:
    return ident.root == OID["NPI"] or ident.root.strip().upper() == "NPI" or ident.authority.strip().upper() == "NPI"


def _arc(namespace: str) -> int:
    return int.from_bytes(hashlib.sha256(namespace.encode("utf-8")).digest()[:4], "big")


def ii_attrs(ident: Identifier, local_root: str) -> dict[str, str]:
    """The ``II`` attributes for *ident* (rules in the module docstring)."""
    root = ident.root.strip()
    authority = nv.clean(ident.authority.strip())
    if root and is_root(root):
        attrs = {"root": root}
    elif _is_npi(ident):
        attrs = {"root": OID["NPI"]}
        authority = authority or "NPI"
    else:
        namespace = nv.clean(root or authority)
        attrs = {"root": f"{local_root}.{_arc(namespace)}" if namespace else local_root}
        authority = authority or namespace
    if ident.extension:
        attrs["extension"] = nv.clean(ident.extension)
    if authority:
        attrs["assigningAuthorityName"] = authority
    return attrs


def ts_value(value: str) -> str:
    """*value* (HL7 TS) in the form ``CDA_SDTC.xsd`` accepts, or "" when it is not a timestamp.

    The schema allows fractional seconds only after 14 digits and a zone only
    after more than 8 digits, so those parts are dropped when they cannot stand.
    """
    if not value:
        return ""
    if 4 <= len(value) <= 14 and value.isascii() and value.isdecimal():
        return value  # plain digits (the usual date or date-time): what the match below would give
    m = _TS_RE.match(value.strip())
    if not m:
        return ""
    digits, fraction, zone = m.group(1), m.group(2) or "", m.group(3) or ""
    if len(digits) != 14:
        fraction = ""
    if len(digits) <= 8:
        zone = ""
    return digits + fraction + zone


def human_ts(value: str) -> str:
    """A timestamp for readers: ``2025-03-01 10:30 -0500``."""
    v = ts_value(value)
    if not v:
        return value
    digits = v[:14].split(".")[0]
    zone = v[-5:] if v[-5:-4] in "+-" and len(v) > 8 else ""
    date = "-".join(p for p in (digits[0:4], digits[4:6], digits[6:8]) if p)
    clock = ":".join(p for p in (digits[8:10], digits[10:12]) if p)
    return " ".join(p for p in (date, clock, zone) if p)


def _code_label(code: Code) -> str:
    """``I10 (ICD-10-CM)`` style label of a code, for narrative."""
    if not code.code:
        return ""
    system = code.system_name or _SYSTEM_NAMES.get(code.system, code.system)
    return f"{code.code} ({system})" if system else code.code


def token(value: str) -> str:
    """*value* as a CDA ``cs`` token (codes, units, language tags): no whitespace, or "" if it had inner spaces."""
    v = nv.clean(value.strip())
    return v if v.split() == [v] else ""  # str.split() splits at exactly what str.isspace() calls space


def system_oid(system: str) -> str:
    """A code system as an OID: as given when it is one, looked up when it is a name in ``OID``, else ""."""
    s = system.strip()
    if s in _KNOWN_SYSTEMS or is_root(s):
        return s
    name = s.upper().replace("-", "").replace(" ", "")
    return OID.get(_V2_SYSTEMS.get(name, name), "")


def _uuid5_bytes(namespace: bytes, name: str) -> bytes:
    """``uuid.uuid5(UUID(bytes=namespace), name).bytes``, without the UUID objects."""
    h = bytearray(hashlib.sha1(namespace + name.encode("utf-8")).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    return bytes(h)


# The RFC 4122 variant sets the top two bits of byte 8: its first hex digit becomes 8, 9, a or b.
_VARIANT_DIGIT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))``, without the UUID object (a document needs dozens)."""
    x = hashlib.sha1(namespace + name.encode("utf-8")).hexdigest()
    # _uuid5_bytes(...).hex() in its 8-4-4-4-12 form: version digit 5, then the variant digit.
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT_DIGIT[x[16]]}{x[17:20]}-{x[20:32]}"


def _code_phrase(code: Code) -> str:
    """``Chest pain [R07.9 (ICD-10-CM)]``: the text and, when coded, the code (each once)."""
    text, label = _code_text(code), _code_label(code)
    if not label or text == code.code:
        return label or text
    return f"{text} [{label}]"


def _code_text(code: Code) -> str:
    return code.display or code.original_text or code.code


def _telecom_value(value: str) -> str:
    """A TEL URL: ``tel:``/``mailto:`` added when the sender gave a bare number or address."""
    v = nv.clean(value.strip())
    if not v or ":" in v:
        return v
    if "@" in v:
        return "mailto:" + v
    if _PHONE_RE.match(v):
        return "tel:" + _PHONE_SEPARATORS.sub("", v)  # separators dropped: a tel URI has no spaces
    return v


def _party_telecoms(party: Party) -> list[Telecom]:
    """The party's telecoms plus its Direct address (as ``mailto:``) when not already listed."""
    tels = [t for t in party.telecom if t]
    if party.direct_address:
        direct = _telecom_value(party.direct_address)
        if direct and not direct.startswith("mailto:"):
            direct = "mailto:" + party.direct_address.strip()
        if all(_telecom_value(t.value) != direct for t in tels):
            tels.append(Telecom(direct, "WP"))
    return tels


def _name_text(name: Name) -> str:
    return name.text() if name else ""


def _party_label(party: Party) -> str:
    parts = [_name_text(party.name), party.organization]
    return ", ".join(p for p in parts if p)


# --- prototypes ----------------------------------------------------------------------------------


_PROTO_PARSER = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True, load_dtd=False)


class _Proto:
    """A fixed piece of a template, parsed once and deep-copied for each use.

    Copying a parsed skeleton happens in C and is about four times faster than
    building the same elements one ``SubElement`` at a time; it is what keeps
    build + XSD above 400 documents/s. The XML holds constants only (never
    document data). ``slot="name"`` marks an element the builder fills for this
    document; the marker is removed here and the element found again in each
    copy by its child-index path.
    """

    def __init__(self, xml: str) -> None:
        wrapper = etree.fromstring(f'<w xmlns="{V3_NS}" xmlns:xsi="{XSI_NS}">{xml}</w>', _PROTO_PARSER)
        self.root = wrapper[0]
        self.slots: list[tuple[str, tuple[int, ...]]] = []
        for el in self.root.iter(etree.Element):
            # A built document has no source lines (the validator numbers its to_bytes form):
            # the copies must not carry the line numbers of this XML.
            el.sourceline = 0
            name = el.attrib.pop("slot", None)
            if name:
                path: list[int] = []
                node = el
                while node is not self.root:
                    parent = node.getparent()
                    path.insert(0, parent.index(node))
                    node = parent
                self.slots.append((name, tuple(path)))
        # Other forms of the same skeleton, when it has them (see _section_proto).
        self.empty: _Proto | None = None
        self.with_text: _Proto | None = None
        # How to reach the slots in a copy: one step (node number, child index) per distinct path
        # prefix, so that slots sharing ancestors look each ancestor up once (every lookup makes
        # a Python proxy for the element).
        self._steps: list[tuple[int, int]] = []
        numbered: dict[tuple[int, ...], int] = {(): 0}
        for name, path in self.slots:
            for k in range(1, len(path) + 1):
                if path[:k] not in numbered:
                    numbered[path[:k]] = len(numbered)
                    self._steps.append((numbered[path[:k - 1]], path[k - 1]))
        self._names = [(name, numbered[path]) for name, path in self.slots]

    def new(self) -> dict[str, etree._Element]:
        """A copy of its own (the root of a new document); returns its slots by name ("" is the copy)."""
        # An lxml element's copy is already a deep copy (the whole subtree), without the memo
        # bookkeeping of copy.deepcopy; __copy__ directly also skips the copy module's dispatch.
        return self._slots(self.root.__copy__())

    def add(self, parent: etree._Element) -> dict[str, etree._Element]:
        """Append a copy to *parent*; returns its slots by name ("" is the copy itself)."""
        el = self.root.__copy__()
        parent.append(el)
        return self._slots(el)

    def _slots(self, el: etree._Element) -> dict[str, etree._Element]:
        nodes = [el]
        for src, i in self._steps:
            nodes.append(nodes[src][i])
        found = {"": el}
        for name, n in self._names:
            found[name] = nodes[n]
        return found


_SHAPES: dict[tuple, _Proto] = {}


def _shape(key: tuple, xml: Callable[[], str]) -> _Proto:
    """The skeleton for one shape of a data-dependent element (a name, an address, an entry).

    *key* names the shape from a finite set (bounded counts, codes from a fixed list); *xml()*
    writes its XML from constants and empty placeholders only. Made on first use, then copied.
    """
    proto = _SHAPES.get(key)
    if proto is None:
        proto = _SHAPES.setdefault(key, _Proto(xml()))  # two threads may both make it: the same skeleton
    return proto


def _tids(root: str, extension: str = "", r11: bool = True) -> str:
    """templateId XML: versioned, plus the bare R1.1 root where R2.1 requires it."""
    if not extension:
        return f'<templateId root="{root}"/>'
    twin = f'<templateId root="{root}"/>' if r11 else ""
    return f'{twin}<templateId root="{root}" extension="{extension}"/>'


def _section_proto(
    root: str, extension: str, code: str, display: str, title: str, no_information: bool = False
) -> _Proto:
    """A section's skeleton; *no_information*: its "No information" form (what ``section(…, False)`` makes).

    The plain form also carries its two other forms, for :meth:`_Builder.section` and
    :meth:`_Builder.section_text`: ``empty`` ("No information") and ``with_text`` (an empty
    ``text`` to write the narrative in, slot ``text``).
    """

    def proto(null: str, text: str) -> _Proto:
        return _Proto(
            f'<component><section slot="section"{null}>{_tids(root, extension)}'
            f'<code code="{code}" codeSystem="{OID["LOINC"]}" codeSystemName="LOINC" displayName="{display}"/>'
            f"<title>{title}</title>{text}</section></component>"
        )

    empty = proto(' nullFlavor="NI"', f"<text>{nv.NO_INFORMATION}</text>")
    if no_information:
        return empty
    plain = proto("", "")
    plain.empty = empty
    plain.with_text = proto("", '<text slot="text"/>')
    return plain


_S_REASON = _section_proto(
    "1.3.6.1.4.1.19376.1.5.3.1.3.1", "2014-06-09", "42349-1", "Reason for referral Narrative", "Reason for Referral"
)
_S_PROBLEMS = _section_proto(
    "2.16.840.1.113883.10.20.22.2.5.1", "2015-08-01", "11450-4", "Problem list - Reported", "Problems"
)
_S_ALLERGIES = _section_proto(
    "2.16.840.1.113883.10.20.22.2.6.1",
    "2015-08-01",
    "48765-2",
    "Allergies and adverse reactions Document",
    "Allergies and Intolerances",
)
_S_MEDICATIONS = _section_proto(
    "2.16.840.1.113883.10.20.22.2.1.1", "2014-06-09", "10160-0", "History of Medication use Narrative", "Medications"
)
_S_RESULTS = _section_proto(
    "2.16.840.1.113883.10.20.22.2.3.1",
    "2015-08-01",
    "30954-2",
    "Relevant diagnostic tests/laboratory data Narrative",
    "Results",
)
# The model carries no assessment text: the Assessment section always has "No information".
_S_NO_ASSESSMENT = _section_proto(
    "2.16.840.1.113883.10.20.22.2.8", "", "51848-0", "Evaluation note", "Assessment", no_information=True
)
_S_PLAN = _section_proto(
    "2.16.840.1.113883.10.20.22.2.10", "2014-06-09", "18776-5", "Plan of care note", "Plan of Treatment"
)
_S_PAYERS = _section_proto(
    "2.16.840.1.113883.10.20.22.2.18", "2015-08-01", "48768-6", "Payment sources Document", "Payers"
)


def document_proto(template_ids: str, code: Code) -> _Proto:
    """A C-CDA document up to versionNumber on the US Realm Header: the header constants (options and
    document values are filled in); *template_ids* the document template's (``_tids``), *code* its LOINC."""
    return _Proto(
        f"""<ClinicalDocument {" ".join(f'xmlns{":" + p if p else ""}="{ns}"' for p, ns in NSMAP.items())}>
      <realmCode code="US"/>
      <typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>
      {_tids(*US_REALM_HEADER)}{template_ids}
      <id slot="id"/>
      <code code="{code.code}" codeSystem="{code.system}" codeSystemName="{code.system_name}"
            displayName="{code.display}"/>
      <title slot="title"/><effectiveTime slot="time"/>
      <confidentialityCode slot="confidentiality"/><languageCode slot="language"/>
      <setId slot="set_id"/><versionNumber value="1"/>
    </ClinicalDocument>"""
    )


# The Referral Note is new in R2.0: no R1.1 twin of its templateId.
_DOCUMENT = document_proto(_tids(*REFERRAL_NOTE, r11=False), DOCUMENT_CODE)
# Header and body wrappers: the fixed elements around what the helpers append.
_W_RECORD_TARGET = _Proto('<recordTarget><patientRole slot="role"/></recordTarget>')
_W_AUTHOR = _Proto('<author><time slot="time"/><assignedAuthor slot="assigned"/></author>')
_W_CUSTODIAN = _Proto(
    '<custodian><assignedCustodian><representedCustodianOrganization slot="org"/></assignedCustodian></custodian>'
)
_W_INFORMATION_RECIPIENT = _Proto('<informationRecipient><intendedRecipient slot="recipient"/></informationRecipient>')
_W_CALLBACK = _Proto(
    '<participant typeCode="CALLBCK"><associatedEntity classCode="ASSIGNED" slot="entity"/></participant>'
)
_W_OWNER = _Proto('<participant typeCode="IND"><associatedEntity classCode="PRS" slot="entity"/></participant>')
_W_BODY = _Proto('<component><structuredBody slot="body"/></component>')
# An organisation named in text: represented/scoping/received organisation's name, scoping entity's desc.
_W_ORG_NAMES = {
    tag: _Proto(f'<{tag}><{inner} slot="text"/></{tag}>')
    for tag, inner in (("representedOrganization", "name"), ("scopingOrganization", "name"),
                       ("receivedOrganization", "name"), ("scopingEntity", "desc"))
}

# The narrative tables' columns (their thead and empty row are built once).
_T_REASON = nv.Columns("Item", "Details")
_T_PATIENT = nv.Columns("Patient", "Species", "Breed", "Owner", "Owner contact")
_T_PROBLEMS = nv.Columns("Problem", "Code", "Onset", "Status")
_T_ALLERGIES = nv.Columns("Allergen", "Reaction", "Severity", "Onset")
_T_MEDICATIONS = nv.Columns("Medication", "Code", "Instructions", "Start")
_T_RESULTS = nv.Columns("Test", "Value", "Reference range", "Interpretation", "Date")
_T_PAYERS = nv.Columns("Payer", "Plan", "Member ID", "Group number", "Authorization", "Authorized period", "Visits")

_ASSERTION = f'<code code="ASSERTION" codeSystem="{ACT_CODE}" displayName="Assertion"/>'
_CONCERN = f'<code code="CONC" codeSystem="{ACT_CLASS}" displayName="Concern"/>'

_TEXT_REFERENCE = _Proto('<text><reference slot="ref"/></text>')  # see _reference_text
_REASON_TEXT = '<text><reference value="#rfr-reason"/></text>'  # the Reason for Referral table's cell


def _referral_act_proto(has_reason: bool) -> _Proto:
    """Referral Act 4.140 (in its entry); with *has_reason*, its text points at the reason in the table.

    The priority and the participations are added per document.
    """
    return _Proto(
        f"""<entry><act classCode="PCPR" moodCode="INT" slot="act">
      <templateId root="2.16.840.1.113883.10.20.22.4.140"/>
      <id slot="id"/><code slot="code"/>{_REASON_TEXT if has_reason else ""}<statusCode code="active"/>
      <effectiveTime slot="time"/>
    </act></entry>"""
    )


_E_REFERRAL_ACT = _referral_act_proto(False)
_E_REFERRAL_ACT_REASON = _referral_act_proto(True)
# Author Participation 4.119, pointing at the header author by id (CONF:1098-32628).
_E_REFERRAL_AUTHOR = _Proto(
    """<author><templateId root="2.16.840.1.113883.10.20.22.4.119"/>
      <time slot="time"/><assignedAuthor slot="assigned"/>
    </author>"""
)
# The REFT participant: the provider the patient is referred to.
_E_REFERRED_TO = _Proto('<participant typeCode="REFT"><participantRole classCode="PROV" slot="role"/></participant>')


def _requested_service_proto(priority: bool) -> _Proto:
    """The requested service, referred to in the Reason for Referral table (its priority, when known)."""
    return _Proto(
        f"""<entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="RQO">
      {_ASSERTION}<text><reference value="#rfr-service"/></text><statusCode code="completed"/>
      {'<priorityCode slot="priority"/>' if priority else ""}
      <value xsi:type="CD" slot="value"><originalText><reference value="#rfr-service"/></originalText></value>
    </observation></entryRelationship>"""
    )


_E_REQUESTED_SERVICE = _requested_service_proto(False)
_E_REQUESTED_SERVICE_PRIORITY = _requested_service_proto(True)


def _indication_proto(has_reason: bool) -> _Proto:
    """Indication (V2) 4.19: the coded reason for the referral; with *has_reason*, pointing at the table."""
    value = ('<value xsi:type="CD" slot="value"><originalText><reference value="#rfr-reason"/></originalText></value>'
             if has_reason else '<value xsi:type="CD" slot="value"/>')
    return _Proto(
        f"""<entryRelationship typeCode="RSON"><observation classCode="OBS" moodCode="EVN">
      {_tids("2.16.840.1.113883.10.20.22.4.19", "2014-06-09")}
      <id slot="id"/>
      <code code="{CLINICAL_FINDING.code}" codeSystem="{CLINICAL_FINDING.system}"
            codeSystemName="{CLINICAL_FINDING.system_name}"
            displayName="{CLINICAL_FINDING.display}"/>
      {_REASON_TEXT if has_reason else ""}<statusCode code="completed"/>{value}
    </observation></entryRelationship>"""
    )


_E_INDICATION = _indication_proto(False)
_E_INDICATION_REASON = _indication_proto(True)

# Coded values an entry always points at its narrative from hold ``originalText/reference`` already
# (``<slot>_ref``; :meth:`_Builder.cd_attrs` fills the attributes): two SubElements less per value.
_ORIGINAL_TEXT_REF = '<originalText><reference slot="{}_ref"/></originalText>'


def _problem_proto(resolved: bool) -> _Proto:
    """Problem Concern Act (V3) 4.3 holding one Problem Observation (V3) 4.4, active or resolved.

    A resolved problem's concern is completed, with an unknown end; its observation has an end
    (unknown) too: ``effectiveTime/high`` with nullFlavor UNK in both.
    """
    high = '<high nullFlavor="UNK"/>' if resolved else ""
    return _Proto(
        f"""<entry typeCode="DRIV"><act classCode="ACT" moodCode="EVN">
      {_tids("2.16.840.1.113883.10.20.22.4.3", "2015-08-01")}
      <id slot="concern_id"/>{_CONCERN}<statusCode code="{"completed" if resolved else "active"}"/>
      <effectiveTime><low nullFlavor="UNK"/>{high}</effectiveTime>
      <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
        {_tids("2.16.840.1.113883.10.20.22.4.4", "2015-08-01")}
        <id slot="id"/>
        <code code="55607006" codeSystem="{OID["SNOMED"]}" codeSystemName="SNOMED CT" displayName="Problem">
          <translation code="75326-9" codeSystem="{OID["LOINC"]}" codeSystemName="LOINC" displayName="Problem"/>
        </code>
        <text><reference slot="ref"/></text>
        <statusCode code="completed"/>
        <effectiveTime><low slot="low"/>{high}</effectiveTime>
        <value xsi:type="CD" slot="value">{_ORIGINAL_TEXT_REF.format("value")}</value>
      </observation></entryRelationship>
    </act></entry>"""
    )


_E_PROBLEM = _problem_proto(resolved=False)
_E_PROBLEM_RESOLVED = _problem_proto(resolved=True)


def _severity_xml(n: str = "") -> str:
    """Severity Observation (V2) 4.8, under the reaction (or the allergy when no reaction is known)."""
    return f"""<entryRelationship typeCode="SUBJ" inversionInd="true"><observation classCode="OBS" moodCode="EVN">
      {_tids("2.16.840.1.113883.10.20.22.4.8", "2014-06-09")}
      <code code="SEV" codeSystem="{ACT_CODE}" displayName="Severity Observation"/>
      <text><reference slot="{n}ref"/></text>
      <statusCode code="completed"/>
      <value xsi:type="CD" slot="{n}value">{_ORIGINAL_TEXT_REF.format(n + "value")}</value>
    </observation></entryRelationship>"""


def _reaction_xml(n: str = "", severity: str = "") -> str:
    """Reaction Observation (V2) 4.9, under the allergy observation (MFST); *severity*: its severity's XML."""
    return f"""<entryRelationship typeCode="MFST" inversionInd="true"><observation classCode="OBS" moodCode="EVN">
      {_tids("2.16.840.1.113883.10.20.22.4.9", "2014-06-09")}
      <id slot="{n}id"/>{_ASSERTION}
      <text><reference slot="{n}ref"/></text>
      <statusCode code="completed"/>
      <value xsi:type="CD" slot="{n}value">{_ORIGINAL_TEXT_REF.format(n + "value")}</value>{severity}
    </observation></entryRelationship>"""


def _allergy_proto(reaction: bool = False, severity: bool = False) -> _Proto:
    """Allergy Concern Act (V3) 4.30 holding one Allergy - Intolerance Observation (V2) 4.7.

    The allergy type is the generic "Allergy to substance" (the model has no allergy type). With
    *reaction* / *severity*, the observation holds them too (slots ``reaction_…``, ``severity_…``):
    the severity under the reaction when both are known.
    """
    sev = _severity_xml("severity_") if severity else ""
    inner = _reaction_xml("reaction_", sev) if reaction else sev
    return _Proto(
        f"""<entry typeCode="DRIV"><act classCode="ACT" moodCode="EVN">
      {_tids("2.16.840.1.113883.10.20.22.4.30", "2015-08-01")}
      <id slot="concern_id"/>{_CONCERN}<statusCode code="active"/>
      <effectiveTime><low nullFlavor="UNK"/></effectiveTime>
      <entryRelationship typeCode="SUBJ"><observation classCode="OBS" moodCode="EVN">
        {_tids("2.16.840.1.113883.10.20.22.4.7", "2014-06-09")}
        <id slot="id"/>{_ASSERTION}
        <text><reference slot="ref"/></text>
        <statusCode code="completed"/>
        <effectiveTime><low slot="low"/></effectiveTime>
        <value xsi:type="CD" code="419199007" codeSystem="{OID["SNOMED"]}" codeSystemName="SNOMED CT"
               displayName="Allergy to substance (disorder)"/>
        <participant typeCode="CSM"><participantRole classCode="MANU"><playingEntity classCode="MMAT">
          <code slot="allergen">{_ORIGINAL_TEXT_REF.format("allergen")}</code>
        </playingEntity></participantRole></participant>{inner}
      </observation></entryRelationship>
    </act></entry>"""
    )


# The allergy with what is known of its reaction and severity: (reaction, severity) -> skeleton.
_E_ALLERGY_FORMS = {(r, v): _allergy_proto(r, v) for r in (False, True) for v in (False, True)}

# Medication Activity (V2) 4.16 with Medication Information (V2) 4.23. A medication list sent with a
# referral lists what the patient takes now: statusCode active. Dose is not in the model: nullFlavor.
_E_MEDICATION = _Proto(
    f"""<entry typeCode="DRIV"><substanceAdministration classCode="SBADM" moodCode="EVN">
      {_tids("2.16.840.1.113883.10.20.22.4.16", "2014-06-09")}
      <id slot="id"/>
      <text><reference slot="ref"/></text>
      <statusCode code="active"/>
      <effectiveTime xsi:type="IVL_TS"><low slot="start"/></effectiveTime>
      <doseQuantity nullFlavor="UNK"/>
      <consumable><manufacturedProduct classCode="MANU">
        {_tids("2.16.840.1.113883.10.20.22.4.23", "2014-06-09")}
        <manufacturedMaterial><code slot="drug">{_ORIGINAL_TEXT_REF.format("drug")}</code></manufacturedMaterial>
      </manufacturedProduct></consumable>
    </substanceAdministration></entry>"""
)

# Result Organizer (V3) 4.1 (CLUSTER: the model has no panel code); its Result Observations below.
_E_RESULT_ORGANIZER = _Proto(
    f"""<entry typeCode="DRIV"><organizer classCode="CLUSTER" moodCode="EVN" slot="organizer">
      {_tids("2.16.840.1.113883.10.20.22.4.1", "2015-08-01")}
      <id slot="id"/><code slot="code"/><statusCode code="completed" slot="status"/>
    </organizer></entry>"""
)

# The Result Observation in each shape its data can give it (value kind, interpretation, reference
# range kind), with the value, interpretationCode and referenceRange elements in place: one copy
# instead of up to eight SubElements. Constants and empty placeholders only; made on first use.
_RESULT_VALUES = {
    "PQ": '<value xsi:type="PQ" value="" slot="value"/>',
    "PQ unit": '<value xsi:type="PQ" value="" unit="" slot="value"/>',
    "CD": '<value xsi:type="CD" slot="value"><originalText><reference slot="value_ref"/></originalText></value>',
    "ST": '<value xsi:type="ST" slot="value"/>',
    "UNK": '<value xsi:type="ST" nullFlavor="UNK"/>',
}
_RESULT_RANGES = {
    "": "",
    "ST": '<value xsi:type="ST" slot="range_value"/>',
    "IVL": '<value xsi:type="IVL_PQ"><low value="" slot="low"/><high value="" slot="high"/></value>',
    "IVL unit": ('<value xsi:type="IVL_PQ"><low value="" unit="" slot="low"/>'
                 '<high value="" unit="" slot="high"/></value>'),
}


def _result_shape(value: str, interpretation: bool, range_kind: str) -> _Proto:
    """The Result Observation skeleton for one shape (keys of ``_RESULT_VALUES`` / ``_RESULT_RANGES``)."""

    def xml() -> str:
        interp = f'<interpretationCode code="" codeSystem="{OBSERVATION_INTERPRETATION}" slot="interp"/>'
        rng = (f'<referenceRange><observationRange><text slot="range_text"/>{_RESULT_RANGES[range_kind]}'
               "</observationRange></referenceRange>") if range_kind else ""
        return f"""<component><observation classCode="OBS" moodCode="EVN">
          {_tids("2.16.840.1.113883.10.20.22.4.2", "2015-08-01")}
          <id slot="id"/><code slot="code"><originalText><reference slot="code_ref"/></originalText></code>
          <text><reference slot="ref"/></text>
          <statusCode code="completed"/>
          <effectiveTime slot="time"/>
          {_RESULT_VALUES[value]}{interp if interpretation else ""}{rng}
        </observation></component>"""

    return _shape(("result", value, interpretation, range_kind), xml)


# Coverage Activity (V3) 4.60; Policy Activity (V3) 4.61 with payer performer 4.87 and covered party
# 4.89. Coverage type (Health Insurance Type, SOPT translation) and the covered party's relationship
# to the subscriber are not in the model: nullFlavors.
_E_COVERAGE = _Proto(
    f"""<entry typeCode="DRIV"><act classCode="ACT" moodCode="EVN" slot="act">
      {_tids("2.16.840.1.113883.10.20.22.4.60", "2015-08-01")}
      <id slot="id"/>
      <code code="48768-6" codeSystem="{OID["LOINC"]}" codeSystemName="LOINC" displayName="Payment sources"/>
      <statusCode code="completed"/>
    </act></entry>"""
)


def _policy_proto(named: bool) -> _Proto:
    """Policy Activity 4.61: the first payer id in place (slot ``payer_id``; more go before ``payer_code``).

    *named*: the payer has a name, in the narrative (the act's text) and as the payer's organisation.
    """
    return _Proto(
        f"""<entryRelationship typeCode="COMP"><sequenceNumber slot="sequence"/>
      <act classCode="ACT" moodCode="EVN" slot="act">
        {_tids("2.16.840.1.113883.10.20.22.4.61", "2015-08-01")}
        <id slot="id"/>
        <code nullFlavor="UNK"><translation nullFlavor="NI"/></code>
        {'<text><reference slot="name_ref"/></text>' if named else ""}
        <statusCode code="completed"/>
        <performer typeCode="PRF"><templateId root="2.16.840.1.113883.10.20.22.4.87"/>
          <assignedEntity><id slot="payer_id"/>
            <code code="PAYOR" codeSystem="{ROLE_CLASS}" displayName="payor" slot="payer_code"/>
            {'<representedOrganization><name slot="payer_name"/></representedOrganization>' if named else ""}
          </assignedEntity>
        </performer>
        <participant typeCode="COV"><templateId root="2.16.840.1.113883.10.20.22.4.89"/>
          <participantRole classCode="PAT"><id slot="member"/><code nullFlavor="UNK"/></participantRole>
        </participant>
      </act>
    </entryRelationship>"""
    )


_E_POLICY = _policy_proto(False)
_E_POLICY_NAMED = _policy_proto(True)


def _plan_proto(named: bool) -> _Proto:
    """The plan the policy belongs to (the "Health Plan Name" form of the Policy Activity's REFR)."""
    text = '<text><reference slot="ref"/></text>' if named else ""
    return _Proto(
        f"""<entryRelationship typeCode="REFR"><act classCode="ACT" moodCode="DEF">
      <id slot="id"/><code nullFlavor="UNK"/>{text}<statusCode code="active"/>
    </act></entryRelationship>"""
    )


_E_PLAN = _plan_proto(False)
_E_PLAN_NAMED = _plan_proto(True)


def _authorization_xml(number: bool = False, visits: bool = False, low: bool = False, high: bool = False) -> str:
    """Authorization Activity 2.16.840.1.113883.10.20.1.19 (id = authorization number) and what it promises.

    Each flag: that part is known (the number in the narrative, the visits as text, the period's ends).
    """
    ends = ('<low slot="low"/>' if low else "") + ('<high slot="high"/>' if high else "")
    period = f"<effectiveTime>{ends}</effectiveTime>" if ends else ""
    text = '<text><reference slot="ref"/></text>' if number else ""
    visits_text = '<text slot="visits"/>' if visits else ""
    return f"""<entryRelationship typeCode="REFR"><act classCode="ACT" moodCode="EVN">
      <templateId root="2.16.840.1.113883.10.20.1.19"/>
      <id slot="id"/><code nullFlavor="NA"/>{text}
      <entryRelationship typeCode="SUBJ"><act classCode="ACT" moodCode="PRMS">
        <code slot="service"/>{visits_text}{period}
      </act></entryRelationship>
    </act></entryRelationship>"""


# Names with at most this many given names (addresses have at most 4 lines) are copied from skeletons.
_MAX_SHAPE_PARTS = 4
_GIVEN_SLOTS = tuple(f"given{i}" for i in range(_MAX_SHAPE_PARTS))
_LINE_SLOTS = tuple(f"line{i}" for i in range(4))
_UNK = ' nullFlavor="UNK"'


def _name_xml(tag: str, prefix: bool, givens: int, family: bool, suffix: bool) -> str:
    """A name skeleton (see :meth:`_Builder.name`): the parts that have text get a slot."""
    parts = ['<prefix slot="prefix"/>' if prefix else ""]
    parts += [f'<given slot="{_GIVEN_SLOTS[i]}"/>' for i in range(givens)] or [f"<given{_UNK}/>"]
    parts.append('<family slot="family"/>' if family else f"<family{_UNK}/>")
    parts.append('<suffix slot="suffix"/>' if suffix else "")
    return f'<{tag} slot="name">{"".join(parts)}</{tag}>'


# Elements that hold a name or an organisation's name/desc in the header and the Referral Act:
# (tag, attributes) as _el takes them, and the same as XML for skeletons.
_WRAPPERS: dict[str, tuple[str, dict[str, str] | None]] = {
    "assignedPerson": ("assignedPerson", None),
    "informationRecipient": ("informationRecipient", None),
    "associatedPerson": ("associatedPerson", None),
    "guardianPerson": ("guardianPerson", None),
    "playingEntity": ("playingEntity", {"classCode": "PSN"}),
}


def _wrap(wrapper: str, xml: str) -> str:
    """*xml* inside the ``_WRAPPERS`` element *wrapper* ("" for none)."""
    if not wrapper:
        return xml
    tag, attrib = _WRAPPERS[wrapper]
    attrs = "".join(f' {k}="{v}"' for k, v in (attrib or {}).items())
    return f"<{tag}{attrs}>{xml}</{tag}>"


def _addr_xml(use: str, lines: int, city: bool, state: str, postal: str, country: bool) -> str:
    """An address skeleton (see :meth:`_Builder.addr`)."""
    parts = [f'<streetAddressLine slot="{_LINE_SLOTS[i]}"/>' for i in range(lines)] or [
        f"<streetAddressLine{_UNK}/>"]
    parts.append('<city slot="city"/>' if city else f"<city{_UNK}/>")
    parts.append({"v": '<state slot="state"/>', "unk": f"<state{_UNK}/>", "": ""}[state])
    parts.append({"v": '<postalCode slot="postal"/>', "unk": f"<postalCode{_UNK}/>", "": ""}[postal])
    parts.append('<country slot="country"/>' if country else "")
    use_attr = f' use="{use}"' if use else ""
    return f"<addr{use_attr}>{''.join(parts)}</addr>"


# --- the builder ---------------------------------------------------------------------------------


class _Builder:
    def __init__(self, referral: Referral, options: BuildOptions) -> None:
        self.r = referral
        self.o = options
        self.vet = bool(referral.veterinary or referral.patient.species)
        doc_id = referral.document_id
        if doc_id and (is_root(doc_id.root.strip()) or doc_id.extension):
            self.doc_id = ii_attrs(doc_id, options.local_root)
        else:
            self.doc_id = {"root": str(uuid.uuid4())}
        key = self.doc_id["root"] + "^" + self.doc_id.get("extension", "")
        self._ns = _uuid5_bytes(uuid.NAMESPACE_URL.bytes, "urn:hl7referral:document:" + key)

    # datatypes: fill_* write into an existing element, the others append one

    def uid(self, key: str) -> dict[str, str]:
        """A stable entry id: UUIDv5 of the document id and *key*."""
        return {"root": uuid5(self._ns, key)}

    def set_uid(self, el: etree._Element, key: str) -> None:
        """``el.attrib.update(self.uid(key))``, without the dict and the attrib proxy."""
        el.set("root", uuid5(self._ns, key))

    def fill_ii(self, el: etree._Element, ident: Identifier) -> etree._Element:
        if ident:
            _set_attrs(el, ii_attrs(ident, self.o.local_root))
        else:
            el.set("nullFlavor", "UNK")
        return el

    def ii(self, parent: etree._Element, ident: Identifier, tag: str = "id") -> etree._Element:
        return self.fill_ii(_el(parent, tag), ident)

    def ids(self, parent: etree._Element, idents: list[Identifier], required: bool = True) -> None:
        known = [i for i in idents if i]
        for ident in known:
            self.ii(parent, ident)
        if not known and required:
            _el(parent, "id", {"nullFlavor": "UNK"})

    def fill_ts(self, el: etree._Element, value: str, min_len: int = 0) -> etree._Element:
        v = ts_value(value)
        if v and (not min_len or len(_TS_RE.match(v).group(1)) >= min_len):
            el.set("value", v)
        else:
            el.set("nullFlavor", "UNK")
        return el

    def ts(self, parent: etree._Element, tag: str, value: str, min_len: int = 0) -> etree._Element:
        return self.fill_ts(_el(parent, tag), value, min_len)

    def fill_cd(
        self, el: etree._Element, code: Code, default_system: str = "", ref: str = "", null: str = "UNK"
    ) -> etree._Element:
        """A coded value (CD/CE): code and system when coded, else a nullFlavor with the original text."""
        text = self.cd_attrs(el, code, default_system, bool(ref), null)
        if ref:
            nv.reference(_el(el, "originalText"), ref)
        elif text:
            _text_el(el, "originalText", text)
        return el

    @staticmethod
    def cd_attrs(el: etree._Element, code: Code, default_system: str = "", ref: bool = False, null: str = "UNK") -> str:
        """The attributes :meth:`fill_cd` sets; returns the text its ``originalText`` would carry without *ref*.

        For skeletons that hold ``originalText/reference`` already (the reference's value is the caller's).
        """
        value = token(code.code) if code.code else ""
        if value:
            el.set("code", value)
            # A system given by name ("ICD10CM") becomes its OID; an unknown name stays a name only.
            system = system_oid(code.system) if code.system else default_system
            if system:
                el.set("codeSystem", system)
            name = code.system_name or ("" if system or not code.system else code.system)
            if name:
                el.set("codeSystemName", name if name.isprintable() else nv.clean(name))
            display = code.display
            if display:
                el.set("displayName", display if display.isprintable() else nv.clean(display))
            return code.original_text
        # Known only as text: "other" (not in a code system); nothing at all: the caller's flavor.
        # A "code" with spaces cannot be a code: it is kept as text.
        text = code.original_text or code.display or code.code
        el.set("nullFlavor", "OTH" if (text or ref) else null)
        return text

    def cd(
        self, parent: etree._Element, tag: str, code: Code, default_system: str = "", ref: str = "", xsi_type: str = ""
    ) -> etree._Element:
        return self.fill_cd(_el(parent, tag, {XSI_TYPE: xsi_type} if xsi_type else None), code, default_system, ref)

    def name(self, parent: etree._Element, name: Name, tag: str = "name") -> etree._Element:
        """A US Realm name: both ``given`` and ``family`` (nullFlavor for the missing one), or nullFlavor."""
        if not name:
            return _el(parent, tag, {"nullFlavor": "UNK"})
        return self._name_in(parent, name, tag, "")

    def _name_in(self, parent: etree._Element, name: Name, tag: str, wrapper: str) -> etree._Element:
        """:meth:`name`, inside a new ``wrapper`` element (``_WRAPPERS``) when one is given; returns the name."""
        if not name:
            return _shape(("name", tag, wrapper), lambda: _wrap(wrapper, f"<{tag}{_UNK} slot=\"name\"/>")).add(
                parent)["name"]
        givens = [g for g in name.given if g]
        if len(givens) > _MAX_SHAPE_PARTS:
            return self._name_elements(_el(parent, *_WRAPPERS[wrapper]) if wrapper else parent, name, tag, givens)
        prefix, family, suffix = name.prefix, name.family, name.suffix
        key = ("name", tag, wrapper, bool(prefix), len(givens), bool(family), bool(suffix))
        s = _shape(key, lambda: _wrap(wrapper, _name_xml(tag, bool(prefix), len(givens), bool(family), bool(suffix))))
        s = s.add(parent)
        if prefix:
            s["prefix"].text = nv.clean(prefix)
        for i, g in enumerate(givens):
            s[_GIVEN_SLOTS[i]].text = nv.clean(g)
        if family:
            s["family"].text = nv.clean(family)
        if suffix:
            s["suffix"].text = nv.clean(suffix)
        return s["name"]

    @staticmethod
    def _name_elements(parent: etree._Element, name: Name, tag: str, givens: list[str]) -> etree._Element:
        """:meth:`name` one element at a time (names with more given names than the skeletons hold)."""
        el = _el(parent, tag)
        if name.prefix:
            _text_el(el, "prefix", name.prefix)
        for g in givens:
            _text_el(el, "given", g)
        if not givens:
            _el(el, "given", {"nullFlavor": "UNK"})
        if name.family:
            _text_el(el, "family", name.family)
        else:
            _el(el, "family", {"nullFlavor": "UNK"})
        if name.suffix:
            _text_el(el, "suffix", name.suffix)
        return el

    def addr(self, parent: etree._Element, addrs: list[Address], exactly_one: bool = False) -> None:
        """US Realm addresses (street line, city, state and ZIP for US; nullFlavor parts when unknown)."""
        known = [a for a in addrs if a]
        if not known:
            _el(parent, "addr", {"nullFlavor": "UNK"})
            return
        for a in known[:1] if exactly_one else known:
            use = a.use if a.use in _ADDR_USES else ""
            lines = [line for line in a.lines if line][:4]
            us = a.country in ("", "US", "USA")
            # Each part: "v" has a value, "unk" is nullFlavor UNK, "" is left out.
            state = "v" if a.state else "unk" if us else ""
            postal = "v" if a.postal_code else "unk" if us else ""
            key = ("addr", use, len(lines), bool(a.city), state, postal, bool(a.country))
            s = _shape(key, lambda: _addr_xml(*key[1:])).add(parent)
            for i, line in enumerate(lines):
                s[_LINE_SLOTS[i]].text = nv.clean(line)
            if a.city:
                s["city"].text = nv.clean(a.city)
            if a.state:
                s["state"].text = nv.clean(a.state)
            if a.postal_code:
                s["postal"].text = nv.clean(a.postal_code)
            if a.country:
                s["country"].text = nv.clean(a.country)

    def telecom(
        self, parent: etree._Element, tels: list[Telecom], exactly_one: bool = False, required: bool = True
    ) -> None:
        known = [t for t in tels if _telecom_value(t.value)]
        if not known:
            if required:
                _el(parent, "telecom", {"nullFlavor": "UNK"})
            return
        for t in known[:1] if exactly_one else known:
            attrs = {"value": _telecom_value(t.value)}
            if t.use in _TEL_USES:
                attrs["use"] = t.use
            _el(parent, "telecom", attrs)

    # document

    def build(self) -> etree._ElementTree:
        r = self.r
        head = _DOCUMENT.new()
        doc = head[""]
        _set_attrs(head["id"], self.doc_id)
        head["title"].text = nv.clean(self.o.title)
        self.fill_ts(head["time"], r.created, min_len=8)
        confidentiality = head["confidentiality"]
        confidentiality.set("code", self.o.confidentiality)
        confidentiality.set("codeSystem", OID["CONFIDENTIALITY"])
        head["language"].set("code", self.o.language)
        _set_attrs(head["set_id"], self.doc_id)
        self.record_target(doc, r.patient)
        self.author(doc, r.referring)
        self.custodian(doc, r.custodian)
        self.information_recipient(doc, r.recipient)
        self.callback(doc, r.referring)
        if self.vet and r.patient.owner is not None:
            self.owner(doc, r.patient.owner)
        body = _W_BODY.add(doc)["body"]
        self.reason_section(body)
        self.problems_section(body, r.problems)
        self.allergies_section(body, r.allergies)
        self.medications_section(body, r.medications)
        self.results_section(body, r.results)
        _S_NO_ASSESSMENT.add(body)  # required next to Plan of Treatment
        self.plan_section(body, r.plan)
        self.payers_section(body, r.payers)
        return etree.ElementTree(doc)

    # header

    def record_target(self, doc: etree._Element, p: Patient) -> None:
        role = _W_RECORD_TARGET.add(doc)["role"]
        self.ids(role, p.ids)
        owner = p.owner if self.vet else None
        # An animal lives with its owner: the owner's address and phone reach it.
        self.addr(role, p.addr or (owner.addr if owner is not None else []))
        self.telecom(role, p.telecom or (_party_telecoms(owner) if owner is not None else []))
        pt = _el(role, "patient")
        for n in [n for n in p.names if n] or [Name()]:
            self.name(pt, n)
        if self.vet:
            desc = self.species_text(p)
            if desc:
                # sdtc:desc, the patient's description: the one Patient slot the SDTC schema offers for it.
                etree.SubElement(pt, "{" + SDTC_NS + "}desc").text = nv.clean(desc)
        gender = p.gender.code.upper() if p.gender.code else ""
        if gender in _GENDER:
            _el(
                pt,
                "administrativeGenderCode",
                {"code": gender, "codeSystem": OID["ADMIN_GENDER"], "displayName": _GENDER[gender]},
            )
        else:
            _el(pt, "administrativeGenderCode", {"nullFlavor": "UNK"})
        self.ts(pt, "birthTime", p.birth_time, min_len=4)
        if p.marital_status.code:
            self.cd(pt, "maritalStatusCode", p.marital_status, "2.16.840.1.113883.5.2")
        # Race and ethnicity do not apply to an animal: NA, not UNK.
        absent = "NA" if self.vet else "UNK"
        for tag, code in (("raceCode", p.race), ("ethnicGroupCode", p.ethnicity)):
            if code.code:
                self.cd(pt, tag, code, OID["RACE"])
            else:
                _el(pt, tag, {"nullFlavor": absent})
        if owner is not None and owner.name:
            # The owner answers for the animal: CDA's guardian (the contact for notifications).
            guardian = _el(pt, "guardian")
            if any(owner.addr):
                self.addr(guardian, owner.addr)
            self.telecom(guardian, _party_telecoms(owner), required=False)
            self._name_in(guardian, owner.name, "name", "guardianPerson")
        if token(p.language):
            lc = _el(pt, "languageCommunication")
            _el(lc, "languageCode", {"code": token(p.language)})
            _el(lc, "preferenceInd", {"value": "true"})

    @staticmethod
    def species_text(p: Patient) -> str:
        parts = []
        if p.species:
            parts.append("Species: " + _code_text(p.species))
        if p.breed:
            parts.append("Breed: " + _code_text(p.breed))
        return "; ".join(parts)

    def author(self, doc: etree._Element, ref: Party) -> None:
        s = _W_AUTHOR.add(doc)
        self.fill_ts(s["time"], self.r.created, min_len=8)
        aa = s["assigned"]
        self.ids(aa, ref.ids)
        if token(ref.specialty.code):
            # Only a real code: the author's code SHALL carry @code (CONF:1198-16788), no nullFlavor.
            self.cd(aa, "code", ref.specialty, OID["NUCC"])
        self.addr(aa, ref.addr)
        self.telecom(aa, _party_telecoms(ref))
        self._name_in(aa, ref.name, "name", "assignedPerson")
        if ref.organization:
            _org_text(aa, "representedOrganization", ref.organization)

    def custodian(self, doc: etree._Element, c: Party) -> None:
        org = _W_CUSTODIAN.add(doc)["org"]
        self.ids(org, c.ids)
        label = c.organization or _name_text(c.name)
        if label:
            _text_el(org, "name", label)
        else:
            _el(org, "name", {"nullFlavor": "UNK"})
        self.telecom(org, _party_telecoms(c), exactly_one=True)
        self.addr(org, c.addr, exactly_one=True)

    def information_recipient(self, doc: etree._Element, rec: Party) -> None:
        ir = _W_INFORMATION_RECIPIENT.add(doc)["recipient"]
        self.ids(ir, rec.ids, required=False)
        if any(rec.addr):
            self.addr(ir, rec.addr)
        self.telecom(ir, _party_telecoms(rec), required=False)
        self._name_in(ir, rec.name, "name", "informationRecipient")
        if rec.organization:
            _org_text(ir, "receivedOrganization", rec.organization)

    def callback(self, doc: etree._Element, ref: Party) -> None:
        """The referring provider as the call-back contact (only when something about them is known)."""
        if not (any(ref.ids) or ref.name or any(ref.telecom) or ref.direct_address):
            return
        ae = _W_CALLBACK.add(doc)["entity"]
        self.ids(ae, ref.ids)
        if ref.specialty.code:
            self.cd(ae, "code", ref.specialty, OID["NUCC"])
        if any(ref.addr):
            self.addr(ae, ref.addr)
        self.telecom(ae, _party_telecoms(ref))
        self._name_in(ae, ref.name, "name", "associatedPerson")
        if ref.organization:
            _org_text(ae, "scopingOrganization", ref.organization)

    def owner(self, doc: etree._Element, owner: Party) -> None:
        """An animal's owner: participant IND, classCode PRS (personal relationship, INDRoleclassCodes)."""
        ae = _W_OWNER.add(doc)["entity"]
        self.ids(ae, owner.ids, required=False)
        if owner.relationship.code:
            self.cd(ae, "code", owner.relationship, OID["HL70063"])
        if any(owner.addr):
            self.addr(ae, owner.addr)
        self.telecom(ae, _party_telecoms(owner), required=False)
        self._name_in(ae, owner.name, "name", "associatedPerson")
        if owner.organization:
            _org_text(ae, "scopingOrganization", owner.organization)

    # sections

    @staticmethod
    def section(body: etree._Element, proto: _Proto, has_data: bool) -> etree._Element:
        """A section from its skeleton; without data, the "No information" form (NI, no entries)."""
        if not has_data and proto.empty is not None:
            return proto.empty.add(body)["section"]  # the same, made once
        sec = proto.add(body)["section"]
        if not has_data:
            sec.set("nullFlavor", "NI")
            nv.no_information(sec)
        return sec

    @staticmethod
    def section_text(body: etree._Element, proto: _Proto) -> tuple[etree._Element, etree._Element]:
        """A section with data and its (empty) narrative block: ``section(body, proto, True)`` + ``nv.text_block``."""
        if proto.with_text is not None:
            s = proto.with_text.add(body)
            return s["section"], s["text"]
        sec = proto.add(body)["section"]
        return sec, nv.text_block(sec)

    def reason_section(self, body: etree._Element) -> None:
        r = self.r
        p = r.patient
        vet_rows = self.vet and bool(p.species or p.breed or p.owner is not None)
        has_referral = bool(r.reason or r.reason_text or r.requested_service or r.referral_id)
        if not (has_referral or vet_rows):
            self.section(body, _S_REASON, False)
            return
        sec, text = self.section_text(body, _S_REASON)
        rows: list[list[nv.Cell | str]] = []
        coded = _code_phrase(r.reason)
        if r.reason_text and r.reason_text.strip().lower() == _code_text(r.reason).strip().lower():
            reason = coded  # the same words twice: once, with the code
        else:
            reason = "; ".join(x for x in (r.reason_text, coded) if x)
        if reason:
            rows.append(["Reason for referral", nv.Cell(reason, "rfr-reason")])
        if r.requested_service:
            rows.append(["Requested service", nv.Cell(_code_phrase(r.requested_service), "rfr-service")])
        if r.priority:
            rows.append(["Priority", _code_text(r.priority)])
        if r.referral_id:
            ident = r.referral_id
            rows.append(["Referral ID", ident.extension + (f" ({ident.authority})" if ident.authority else "")])
        if _party_label(r.recipient):
            rows.append(["Referred to", _party_label(r.recipient)])
        if _party_label(r.referring):
            contact = ", ".join(_telecom_value(t.value) for t in _party_telecoms(r.referring))
            rows.append(["Referring provider", _party_label(r.referring) + (f" ({contact})" if contact else "")])
        if rows:
            nv.table(text, _T_REASON, rows)
        if vet_rows:
            self.patient_table(text, p)
        if has_referral:
            self.referral_act(sec, bool(reason), bool(r.requested_service))
        if vet_rows:
            for key, code in (("species", p.species), ("breed", p.breed)):
                if code:
                    self.assertion(_el(sec, "entry"), key, code)

    @staticmethod
    def patient_table(text: etree._Element, p: Patient) -> None:
        """The animal patient, its species/breed and its owner, stated for readers."""
        owner = p.owner
        contact = ", ".join(_telecom_value(t.value) for t in _party_telecoms(owner)) if owner else ""
        nv.table(
            text,
            _T_PATIENT,
            [
                [
                    "; ".join(n.text() for n in p.names if n),
                    nv.Cell(_code_text(p.species), "pt-species"),
                    nv.Cell(_code_text(p.breed), "pt-breed"),
                    _party_label(owner) if owner else "",
                    contact,
                ]
            ],
        )

    def assertion(self, entry: etree._Element, key: str, code: Code) -> None:
        """A coded statement about the patient (species, breed): ASSERTION with the code as value."""
        obs = _el(entry, "observation", {"classCode": "OBS", "moodCode": "EVN"})
        _el(obs, "id", self.uid("patient-" + key))
        _el(obs, "code", {"code": "ASSERTION", "codeSystem": ACT_CODE, "displayName": "Assertion"})
        nv.reference(_el(obs, "text"), "pt-" + key)
        _el(obs, "statusCode", {"code": "completed"})
        self.cd(obs, "value", code, OID["SNOMED"], ref="pt-" + key, xsi_type="CD")

    def referral_act(self, section: etree._Element, has_reason: bool, has_service: bool) -> None:
        """Referral Act 4.140: the closed-loop key (``id`` = ``referral.referral_id``)."""
        r = self.r
        s = (_E_REFERRAL_ACT_REASON if has_reason else _E_REFERRAL_ACT).add(section)
        act = s["act"]
        self.fill_ii(s["id"], r.referral_id)
        self.fill_cd(s["code"], r.referral_type if r.referral_type else DEFAULT_REFERRAL_TYPE, OID["SNOMED"])
        self.fill_ts(s["time"], r.created)
        if r.priority:
            self.cd(act, "priorityCode", r.priority, OID["ACT_PRIORITY"])
        if any(r.referring.ids):
            au = _E_REFERRAL_AUTHOR.add(act)
            self.fill_ts(au["time"], r.created)
            self.ids(au["assigned"], r.referring.ids)
        rec = r.recipient
        if any(rec.ids) or rec.name or rec.organization:
            role = _E_REFERRED_TO.add(act)["role"]
            self.ids(role, rec.ids)
            if any(rec.addr):
                self.addr(role, rec.addr)
            self.telecom(role, _party_telecoms(rec), required=False)
            self._name_in(role, rec.name, "name", "playingEntity")
            if rec.organization:
                _org_text(role, "scopingEntity", rec.organization)
        if has_service:
            service = (_E_REQUESTED_SERVICE_PRIORITY if r.priority else _E_REQUESTED_SERVICE).add(act)
            if r.priority:
                self.fill_cd(service["priority"], r.priority, OID["ACT_PRIORITY"])
            self.cd_attrs(service["value"], r.requested_service, "", True)  # its reference: #rfr-service
        if r.reason:
            ind = (_E_INDICATION_REASON if has_reason else _E_INDICATION).add(act)
            self.set_uid(ind["id"], "referral-indication")
            if has_reason:
                self.cd_attrs(ind["value"], r.reason, "", True)  # its reference: #rfr-reason
            else:
                self.fill_cd(ind["value"], r.reason)

    def interval(self, et: etree._Element, low: str, ended: bool = False, high: str = "") -> None:
        """Fill ``effectiveTime`` with ``low`` (nullFlavor when unknown) and, when *ended*, ``high``."""
        self.ts(et, "low", low)
        if ended or high:
            self.ts(et, "high", high)

    def problems_section(self, body: etree._Element, problems: list[Problem]) -> None:
        problems = [p for p in problems if p.code]
        if not problems:
            self.section(body, _S_PROBLEMS, False)
            return
        rows = [
            [nv.Cell(_code_text(p.code), f"prob-{i}"), _code_label(p.code), human_ts(p.onset), p.status]
            for i, p in enumerate(problems, 1)
        ]
        sec, text = self.section_text(body, _S_PROBLEMS)
        nv.table(text, _T_PROBLEMS, rows)
        for i, p in enumerate(problems, 1):
            ref = f"prob-{i}"
            resolved = p.status.lower() not in ("", "active")
            s = (_E_PROBLEM_RESOLVED if resolved else _E_PROBLEM).add(sec)
            self.set_uid(s["concern_id"], f"problem-{i}")
            self.set_uid(s["id"], f"problem-{i}-observation")
            s["ref"].set("value", "#" + ref)
            self.fill_ts(s["low"], p.onset)  # the interval's low; a resolved problem's high is in the skeleton
            self.cd_attrs(s["value"], p.code, "", True)
            s["value_ref"].set("value", "#" + ref)

    def allergies_section(self, body: etree._Element, allergies: list[Allergy]) -> None:
        allergies = [a for a in allergies if a.allergen]
        if not allergies:
            self.section(body, _S_ALLERGIES, False)
            return
        rows = [
            [
                nv.Cell(_code_text(a.allergen), f"alg-{i}"),
                nv.Cell(_code_text(a.reaction), f"alg-{i}-reaction"),
                nv.Cell(_code_text(a.severity), f"alg-{i}-severity"),
                human_ts(a.onset),
            ]
            for i, a in enumerate(allergies, 1)
        ]
        sec, text = self.section_text(body, _S_ALLERGIES)
        nv.table(text, _T_ALLERGIES, rows)
        for i, a in enumerate(allergies, 1):
            ref = f"alg-{i}"
            s = _E_ALLERGY_FORMS[bool(a.reaction), bool(a.severity)].add(sec)
            self.set_uid(s["concern_id"], f"allergy-{i}")
            self.set_uid(s["id"], f"allergy-{i}-observation")
            s["ref"].set("value", "#" + ref)
            self.fill_ts(s["low"], a.onset)
            self.cd_attrs(s["allergen"], a.allergen, "", True)
            s["allergen_ref"].set("value", "#" + ref)
            if a.reaction:
                self.set_uid(s["reaction_id"], f"allergy-{i}-reaction")
                s["reaction_ref"].set("value", f"#{ref}-reaction")
                self.cd_attrs(s["reaction_value"], a.reaction, OID["SNOMED"], True)
                s["reaction_value_ref"].set("value", f"#{ref}-reaction")
            if a.severity:
                s["severity_ref"].set("value", f"#{ref}-severity")
                self.cd_attrs(s["severity_value"], a.severity, OID["SNOMED"], True)
                s["severity_value_ref"].set("value", f"#{ref}-severity")

    def medications_section(self, body: etree._Element, medications: list[Medication]) -> None:
        meds = [m for m in medications if m.drug]
        if not meds:
            self.section(body, _S_MEDICATIONS, False)
            return
        rows = [
            [
                nv.Cell(_code_text(m.drug), f"med-{i}-name"),
                _code_label(m.drug),
                nv.Cell(m.instructions, f"med-{i}"),
                human_ts(m.start),
            ]
            for i, m in enumerate(meds, 1)
        ]
        sec, text = self.section_text(body, _S_MEDICATIONS)
        nv.table(text, _T_MEDICATIONS, rows)
        for i, m in enumerate(meds, 1):
            s = _E_MEDICATION.add(sec)
            self.set_uid(s["id"], f"medication-{i}")
            s["ref"].set("value", f"#med-{i}" if m.instructions else f"#med-{i}-name")
            self.fill_ts(s["start"], m.start)
            self.cd_attrs(s["drug"], m.drug, OID["RXNORM"], True)
            s["drug_ref"].set("value", f"#med-{i}-name")

    def results_section(self, body: etree._Element, results: list[Result]) -> None:
        results = [x for x in results if x.code]
        if not results:
            self.section(body, _S_RESULTS, False)
            return
        rows = [
            [
                nv.Cell(_code_text(x.code), f"res-{i}"),
                nv.Cell(_result_value_text(x), f"res-{i}-value"),
                x.reference_range,
                x.interpretation,
                human_ts(x.effective_time),
            ]
            for i, x in enumerate(results, 1)
        ]
        sec, text = self.section_text(body, _S_RESULTS)
        nv.table(text, _T_RESULTS, rows)
        # One organizer per result time. The model has no panel (OBR-4): a lone result's organizer
        # takes its code, several are an uncoded CLUSTER.
        by_time: dict[str, list[tuple[int, Result]]] = {}
        for i, x in enumerate(results, 1):
            by_time.setdefault(x.effective_time, []).append((i, x))
        for n, (when, group) in enumerate(by_time.items(), 1):
            s = _E_RESULT_ORGANIZER.add(sec)
            self.set_uid(s["id"], f"result-organizer-{n}")
            if len(group) == 1:
                self.fill_cd(s["code"], group[0][1].code, OID["LOINC"])
            else:
                self.fill_cd(s["code"], Code(original_text="Results" + (f" {human_ts(when)}" if when else "")))
            if ts_value(when):
                et = etree.Element(V3 + "effectiveTime")
                s["status"].addnext(et)
                self.interval(et, when, True, when)
            for i, x in group:
                self.result_observation(s["organizer"], i, x)

    def result_observation(self, organizer: etree._Element, i: int, x: Result) -> None:
        value = x.value.strip()
        unit = "".join(x.unit.split())  # UCUM has no spaces: "mg / dL" is "mg/dL"
        if x.value_type == "PQ" and _NUMBER_RE.match(value):
            kind = "PQ unit" if unit else "PQ"
        elif x.value_type == "CD" and x.coded_value:
            kind = "CD"
        else:
            # Text, or a "numeric" value that is not a number ("<5", "positive"): kept as sent, with its unit.
            kind = "ST" if value else "UNK"
        interpretation = token(x.interpretation)
        reference_range = x.reference_range
        range_kind = ""
        m = None
        if reference_range:
            m = _RANGE_RE.match(reference_range)
            range_kind = ("IVL unit" if unit else "IVL") if x.value_type == "PQ" and m else "ST"
        s = _result_shape(kind, bool(interpretation), range_kind).add(organizer)
        ref = f"res-{i}"
        self.set_uid(s["id"], f"result-{i}")
        self.cd_attrs(s["code"], x.code, OID["LOINC"], True)
        s["code_ref"].set("value", "#" + ref)
        s["ref"].set("value", "#" + ref)
        self.fill_ts(s["time"], x.effective_time)
        if kind == "PQ" or kind == "PQ unit":
            v = s["value"]
            v.set("value", value)
            if unit:
                v.set("unit", nv.clean(unit))
        elif kind == "CD":
            self.cd_attrs(s["value"], x.coded_value, OID["SNOMED"], True)
            s["value_ref"].set("value", f"#{ref}-value")
        elif kind == "ST":
            unit_text = x.unit.strip() if x.value_type == "PQ" else ""
            s["value"].text = nv.clean(f"{value} {unit_text}" if unit_text else value)
        if interpretation:
            s["interp"].set("code", interpretation)
        if range_kind:
            s["range_text"].text = nv.clean(reference_range)
            if range_kind == "ST":
                s["range_value"].text = nv.clean(reference_range)
            else:
                low, high = s["low"], s["high"]
                low.set("value", m.group(1))
                high.set("value", m.group(2))
                if unit:
                    unit = nv.clean(unit)
                    low.set("unit", unit)
                    high.set("unit", unit)

    def plan_section(self, body: etree._Element, plan: list[str]) -> None:
        items = [x for x in (nv.clean(p).strip() for p in plan) if x]
        if not items:
            self.section(body, _S_PLAN, False)
            return
        nv.item_list(self.section_text(body, _S_PLAN)[1], [nv.Cell(x, f"pln-{i}") for i, x in enumerate(items, 1)])

    def payers_section(self, body: etree._Element, payers: list[Payer]) -> None:
        payers = [p for p in payers if p.name or any(p.ids) or p.member_id or p.authorization is not None]
        if not payers:
            self.section(body, _S_PAYERS, False)
            return
        rows = []
        for i, p in enumerate(payers, 1):
            auth = p.authorization
            period = " – ".join(human_ts(v) for v in (auth.effective, auth.expiration) if v) if auth else ""
            rows.append(
                [
                    nv.Cell(p.name, f"pay-{i}"),
                    nv.Cell(p.plan, f"pay-{i}-plan"),
                    p.member_id,
                    p.group_number,
                    nv.Cell(auth.number if auth else "", f"pay-{i}-auth"),
                    period,
                    auth.authorized_visits if auth else "",
                ]
            )
        sec, text = self.section_text(body, _S_PAYERS)
        nv.table(text, _T_PAYERS, rows)
        cov = _E_COVERAGE.add(sec)
        self.set_uid(cov["id"], "coverage")
        for i, p in enumerate(payers, 1):
            self.policy(cov["act"], i, p)

    def policy(self, coverage: etree._Element, i: int, p: Payer) -> None:
        """Policy Activity 4.61: payer, covered party (member id), plan, authorization."""
        s = (_E_POLICY_NAMED if p.name else _E_POLICY).add(coverage)
        s["sequence"].set("value", str(i))
        # Member, group and authorization numbers each live in the payer's own namespace: one local
        # root per (payer, kind), never the payer organisation's OID (their values would collide).
        label = p.name or next((x.authority or x.root for x in p.ids if x), "") or f"payer {i}"
        if p.group_number:
            self.fill_ii(s["id"], Identifier("", p.group_number, f"{label} group number"))
        else:
            self.set_uid(s["id"], f"policy-{i}")
        if p.name:
            s["name_ref"].set("value", f"#pay-{i}")
        known_ids = [x for x in p.ids if x] or [Identifier()]
        self.fill_ii(s["payer_id"], known_ids[0])
        for ident in known_ids[1:]:
            s["payer_code"].addprevious(self.fill_ii(etree.Element(V3 + "id"), ident))
        if p.name:
            s["payer_name"].text = nv.clean(p.name)
        self.fill_ii(s["member"], Identifier("", p.member_id, f"{label} member ID") if p.member_id else Identifier())
        act = s["act"]
        if p.plan or p.authorization is None:
            plan = (_E_PLAN_NAMED if p.plan else _E_PLAN).add(act)
            self.set_uid(plan["id"], f"policy-{i}-plan")
            if p.plan:
                plan["ref"].set("value", f"#pay-{i}-plan")
        auth = p.authorization
        if auth is not None:
            low, high = bool(ts_value(auth.effective)), bool(ts_value(auth.expiration))
            key = ("authorization", bool(auth.number), bool(auth.authorized_visits), low, high)
            a = _shape(key, lambda: _authorization_xml(*key[1:])).add(act)
            number = Identifier("", auth.number, f"{auth.payer or label} authorization")
            self.fill_ii(a["id"], number if auth.number else Identifier())
            if auth.number:
                a["ref"].set("value", f"#pay-{i}-auth")
            # What is authorized: the requested service (else the referral itself), for the period.
            r = self.r
            self.fill_cd(a["service"], r.requested_service or r.referral_type or DEFAULT_REFERRAL_TYPE, OID["SNOMED"])
            if auth.authorized_visits:
                a["visits"].text = nv.clean(f"Authorized visits: {auth.authorized_visits}")
            if low:
                self.fill_ts(a["low"], auth.effective)
            if high:
                self.fill_ts(a["high"], auth.expiration)


def _result_value_text(x: Result) -> str:
    if x.value_type == "CD" and x.coded_value:
        return _code_text(x.coded_value)
    return " ".join(v for v in (x.value, x.unit) if v)
