"""The referral packet as the PDF a specialist's front desk works from.

``render_pdf(cda, cover)`` gives page 1, a fax cover sheet (to, from, the
referring provider's callback number, referral id, total pages, a
confidentiality notice), then the C-CDA's header facts (patient, birth date,
sex, ids, address, phone, referring provider, recipient, custodian, date) and
every section with its narrative, nested sections included.

Invariants
----------
* The CDA is untrusted input. It is parsed without entity resolution, DTD
  loading, network access or huge-tree mode, so an external entity is never
  read. Anything that is not well-formed XML with an HL7 v3
  ``ClinicalDocument`` root raises :class:`RenderError`, and so does a page
  fpdf2 cannot lay out. Error messages name the cause (a line number, a font
  path, a Debian package, an exception type), never document content.
* Nothing in a narrative is silently dropped: every section is printed with
  its title (nested sections as sub-headings); ``paragraph``, ``content``
  (``styleCode="Bold"`` bold), ``br``, ``list``/``item``, ``table``,
  ``caption``, ``linkHtml`` and ``footnote`` print their text; elements this
  module does not know print their text; ``renderMultiMedia`` prints a
  visible placeholder. Tables stay tables (fpdf2 tables; the header rows are
  repeated at the top of each page the table continues on).
* Every character is drawn from a real font, so ``pdftotext`` gets the text
  back: DejaVu Sans for Latin, Greek and Cyrillic, the fallback fonts (Droid
  Sans Fallback, Noto CJK) for what DejaVu lacks, e.g. Han ideographs. A
  character no font has prints as U+FFFD (fpdf2 would otherwise log the
  missing characters, and they may be part of a name).
* The cover's page count is the real total (fpdf2 puts it in at output), and
  every page after the cover has the footer "Referral <id> — page X of N".
  No patient data goes into the footer or the PDF metadata.
* Deterministic: the same CDA, cover, fonts and ``created`` give the same
  bytes, in this process or another. The PDF creation date is ``created``
  (else 2000-01-01 UTC); nothing reads the clock or a random source, and no
  render leaves state that changes a later one's bytes (the one cache holds
  each font's code points, a fact of the file).
* Fonts go through fpdf2's public API only: ``FPDF.add_font`` for DejaVu
  Sans regular and bold, ``FPDF.set_fallback_fonts`` for the fallback font.
  A fallback (Droid Sans Fallback is 4 MB, 49k glyphs) is registered only
  when the text (cover, header facts, narrative) has characters the fonts
  before it lack: an ASCII referral never opens the CJK font. Which code
  points a font maps is read once per process (fontTools' ``getBestCmap``)
  and cached by path. fpdf2 itself reads and subsets every registered font
  at every render: the larger part of a render's time, which a fax (a
  minute to transmit) can afford.
* Not done: no text shaping (Arabic is not joined, Hebrew and Arabic are
  drawn in logical order), no italics (the fonts are regular and bold), and
  scripts neither DejaVu nor the fallbacks cover (Thai, Hangul with Droid
  Sans Fallback) print as U+FFFD.
* Thread-safe: each render has its own ``FPDF`` and font objects; the only
  shared state is the code-point cache (``functools.lru_cache``; two renders
  racing on a cold cache both read the file, with the same result).
"""

from __future__ import annotations

import functools
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from lxml import etree

from ..cda.referral_note import human_ts
from ..cda.validate import safe_parser

__all__ = ["DEFAULT_NOTICE", "Cover", "Fonts", "RenderError", "callback_number", "find_fonts", "render_pdf"]

V3_NS = "urn:hl7-org:v3"
V3 = "{" + V3_NS + "}"

DEFAULT_NOTICE = (
    "CONFIDENTIALITY NOTICE: This facsimile contains protected health information that is privileged "
    "and confidential under federal and state law, including HIPAA (45 CFR Parts 160 and 164). It is "
    "intended only for the recipient named above, for the treatment of the patient. If you are not the "
    "intended recipient, any review, disclosure, copying, distribution or use of this information is "
    "strictly prohibited. If you received this fax in error, please call the sender at the callback "
    "number above and destroy all pages. Redisclosure is prohibited except as permitted by law."
)

DEBIAN_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/droid",
                    "/usr/share/fonts/opentype/noto", "/usr/share/fonts/truetype/noto")
_REGULAR, _BOLD = "DejaVuSans.ttf", "DejaVuSans-Bold.ttf"
_FALLBACK_FILES = ("DroidSansFallbackFull.ttf", "DroidSansFallback.ttf", "NotoSansCJK-Regular.ttc",
                   "NotoSansCJKsc-Regular.otf")

EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


class RenderError(Exception):
    """The packet cannot be rendered: the CDA cannot be read, or no usable font. No PHI in the message."""


@dataclass(frozen=True)
class Cover:
    to_name: str          # the specialist practice
    to_fax: str
    from_name: str        # the referring practice
    from_fax: str = ""
    callback: str = ""    # the referring provider's callback number; "" -> callback_number(cda)
    referral_id: str = ""
    sent_at: str = ""     # date/time printed on the cover ("" -> ``created``, if given)
    notice: str = DEFAULT_NOTICE


@dataclass(frozen=True)
class Fonts:
    regular: str
    bold: str
    fallbacks: tuple[str, ...] = ()


# --- fonts ---------------------------------------------------------------------------------------


def find_fonts(extra_dirs: Sequence[str] = ()) -> Fonts:
    """DejaVu Sans (+ Bold) from *extra_dirs* or Debian's path; fallbacks for CJK when installed."""
    dirs = [*extra_dirs, *DEBIAN_FONT_DIRS]
    regular, bold = _first_file(dirs, (_REGULAR,)), _first_file(dirs, (_BOLD,))
    if not regular or not bold:
        raise RenderError("no DejaVu Sans font found (install the Debian package fonts-dejavu-core)")
    # One CJK font is enough: each covers the Han ideographs, and every extra one only costs lookups.
    cjk = _first_file(dirs, _FALLBACK_FILES)
    return Fonts(regular, bold, (cjk,) if cjk else ())


def _first_file(dirs: Iterable[str], names: Sequence[str]) -> str:
    for name in names:
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return ""


# Fonts go through fpdf2's public API only (add_font, set_fallback_fonts). Cutting them into small
# pieces and copying fpdf2's font objects saved ~0.1 s per warm render (~0.4 s with Han text), but
# depended on fpdf2's private internals: not worth it for a fax that takes a minute to transmit.
MAIN = "main"  # the family all text is set in: DejaVu Sans regular and bold
REPLACEMENT = "\ufffd"


@functools.lru_cache(maxsize=None)  # keyed by path: the configured fonts, a handful per process
def _cmap(path: str) -> frozenset[int]:
    """The code points the font file at *path* maps (the first face of a collection).

    Read once per process and kept as a set: deciding whether a document needs a fallback font must
    not open that font's file at every render (Droid Sans Fallback is 4 MB). A font file is assumed
    not to change while the process runs.
    """
    from fontTools import ttLib

    try:
        # lazy=True: only the tables asked for (cmap) are parsed, not 49k glyphs.
        with ttLib.TTFont(path, lazy=True, fontNumber=0) as font:
            cmap = frozenset(font.getBestCmap() or ())
    except OSError as exc:
        raise RenderError(f"font {path}: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # fontTools raises many types for a file that is not a font
        raise RenderError(f"font {path} cannot be read ({type(exc).__name__})") from None
    if not cmap:
        raise RenderError(f"font {path} has no Unicode character map")
    return cmap


def _add_font(pdf, family: str, style: str, path: str) -> None:
    try:
        pdf.add_font(family, style, path)
    except Exception as exc:  # e.g. a file name fpdf2 refuses (it wants .ttf, .otf, .ttc...)
        raise RenderError(f"font {path} cannot be used ({type(exc).__name__})") from None


def _install_fonts(pdf, fonts: Fonts, chars: set[str]) -> dict[int, str]:
    """Register DejaVu Sans (regular, bold) as MAIN, and a fallback font only when *chars* need it.

    Returns the characters no registered font has, mapped to their replacement (for ``str.translate``).
    """
    regular, bold = _cmap(fonts.regular), _cmap(fonts.bold)  # first: a bad file is a RenderError here
    _add_font(pdf, MAIN, "", fonts.regular)
    _add_font(pdf, MAIN, "B", fonts.bold)
    text = {ord(c) for c in chars if ord(c) >= 0x20}  # controls never reach a page
    lacking = text - regular
    families = []
    if (text & regular) - bold:
        families.append(MAIN)  # bold text falls back to the regular glyph rather than to none
    # A fallback file is opened (its cmap, then by fpdf2) only when the text has characters the fonts
    # before it lack: an ASCII referral never opens the CJK font.
    for i, path in enumerate(fonts.fallbacks):
        if not lacking:
            break
        covered = lacking & _cmap(path)
        if covered:
            family = f"fallback{i}"
            _add_font(pdf, family, "", path)
            families.append(family)
            lacking -= covered
    if families:
        # exact_match=False: a fallback without a bold face (CJK) still draws bold text.
        pdf.set_fallback_fonts(families, exact_match=False)
    # What no font has is replaced before fpdf2 sees it (fpdf2 would log it, and it may be a name).
    replacement = REPLACEMENT if 0xFFFD in regular else "?"
    return {cp: replacement for cp in lacking}


# --- the CDA -------------------------------------------------------------------------------------


_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")


def _parse(cda: bytes) -> etree._Element:
    # The project's safe parser: an external entity is never read, nothing is fetched.
    parser = safe_parser(remove_comments=True, remove_pis=True)
    if isinstance(cda, str):  # text already decoded: its declaration no longer tells the encoding
        cda = _DECLARATION.sub("", cda, count=1).encode("utf-8")
    if not cda or not cda.strip():
        raise RenderError("the CDA is empty")
    try:
        root = etree.fromstring(cda, parser)
    except etree.XMLSyntaxError as exc:
        raise RenderError(f"the CDA is not well-formed XML (line {exc.lineno})") from None
    except ValueError:
        raise RenderError("the CDA is not XML bytes") from None
    if root.tag != V3 + "ClinicalDocument":
        raise RenderError("the XML is not a CDA document (root is not an HL7 v3 ClinicalDocument)")
    return root


def _x(el: etree._Element, path: str) -> list:
    return el.xpath(path, namespaces={"v3": V3_NS})


def _phone(value: str) -> str:
    v = value.strip()
    if v.lower().startswith("tel:"):
        return v[4:].strip()
    return v if v and re.fullmatch(r"\+?[\d ().\-/]*\d[\d ().\-/]*", v) else ""


def _phones(telecoms: list) -> str:
    return next((p for p in (_phone(t.get("value", "")) for t in telecoms if t.get("nullFlavor") is None) if p), "")


_CALLBACK_PATHS = (
    # The Referral Note's own callback contact (participant CALLBCK) says whom to call back,
    # when the document has one; then the author, who is the referring provider.
    "v3:participant[@typeCode='CALLBCK']/v3:associatedEntity/v3:telecom",
    "v3:author/v3:assignedAuthor/v3:telecom",
    "v3:legalAuthenticator/v3:assignedEntity/v3:telecom",
    "v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization/v3:telecom",
)


def callback_number(cda: bytes) -> str:
    """The number to call back: the callback contact's ``tel:`` (participant CALLBCK), else the author's,
    else the legal authenticator's, else the custodian's."""
    return _callback(_parse(cda))


def _callback(root: etree._Element) -> str:
    for path in _CALLBACK_PATHS:
        number = _phones(_x(root, path))
        if number:
            return number
    return ""


def _referral_act_id(root: etree._Element) -> str:
    ids = _x(root, ".//v3:act[v3:templateId/@root='2.16.840.1.113883.10.20.22.4.140']/v3:id/@extension")
    return str(ids[0]) if ids else ""


_SPACE = re.compile(r"\s+")
# Characters that must not reach a page: C0/C1 controls (no glyph), and fpdf2's page-count alias.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
NB = "{nb}"


def _clean(text: str) -> str:
    """NFC (a decomposed "Zoë" becomes one glyph and extracts as typed), no controls, no page alias."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text.replace("\t", " "))
    return text.replace(NB, "{\u2060nb}") if NB in text else text


def _words(el: etree._Element | None) -> str:
    return _SPACE.sub(" ", "".join(el.itertext())).strip() if el is not None else ""


_USE = {"H": "home", "HP": "home", "HV": "vacation home", "WP": "work", "MC": "mobile", "PG": "pager",
        "EC": "emergency", "TMP": "temporary"}
_GENDER = {"M": "Male", "F": "Female", "UN": "Undifferentiated"}


def _name(el: etree._Element) -> str:
    """A PN/EN as written: its parts in the document's order (family first stays family first)."""
    return _SPACE.sub(" ", " ".join(t.strip() for t in el.itertext() if t.strip()))


def _names(els: list) -> str:
    return "; ".join(n for n in (_name(e) for e in els if e.get("nullFlavor") is None) if n)


def _ids(els: list) -> str:
    out = []
    for e in els:
        ext, authority, root = e.get("extension", ""), e.get("assigningAuthorityName", ""), e.get("root", "")
        if e.get("nullFlavor") is not None or not (ext or root):
            continue
        out.append(f"{ext} ({authority or root})" if ext else root)
    return "; ".join(out)


def _addresses(els: list) -> str:
    out = []
    for a in els:
        if a.get("nullFlavor") is not None:
            continue
        lines = [_words(x) for x in _x(a, "v3:streetAddressLine")]
        city, state, postal, country = (_words(_first(a, "v3:" + part))
                                        for part in ("city", "state", "postalCode", "country"))
        parts = [*lines, city, " ".join(p for p in (state, postal) if p), country]
        text = ", ".join(p for p in parts if p) or _words(a)
        if text:
            out.append(text)
    return "; ".join(out)


def _first(el: etree._Element, path: str) -> etree._Element | None:
    found = _x(el, path)
    return found[0] if found else None


def _telecoms(els: list) -> str:
    out = []
    for t in els:
        value = t.get("value", "").strip()
        if t.get("nullFlavor") is not None or not value:
            continue
        scheme, _, rest = value.partition(":")
        text = {"tel": rest, "fax": f"fax {rest}", "mailto": rest}.get(scheme.lower(), value) if rest else value
        uses = [_USE[u] for u in t.get("use", "").split() if u in _USE]
        out.append(f"{text} ({', '.join(uses)})" if uses else text)
    return "; ".join(out)


def _party(el: etree._Element, person: str, org: str) -> str:
    """Who, for the facts table: the person's name, the organisation, then phones."""
    names = _names(_x(el, person + "/v3:name")) if person else ""
    orgs = "; ".join(_words(o) for o in _x(el, org + "/v3:name")) if org else ""
    who = ", ".join(p for p in (names, orgs) if p)
    phones = _telecoms(_x(el, "v3:telecom"))
    return " — ".join(p for p in (who, phones) if p)


def _date(el: etree._Element | None) -> str:
    if el is None:
        return ""
    if el.get("nullFlavor") is not None:
        return "unknown"
    return human_ts(el.get("value", ""))


def _header_facts(root: etree._Element) -> list[tuple[str, str]]:
    """The header as (label, value) rows; a row only for what the document has."""
    facts: list[tuple[str, str]] = []

    def add(label: str, value: str) -> None:
        if value:
            facts.append((label, value))

    for role in _x(root, "v3:recordTarget/v3:patientRole"):
        patient = _first(role, "v3:patient")
        if patient is not None:
            add("Patient", _names(_x(patient, "v3:name")))
            add("Date of birth", _date(_first(patient, "v3:birthTime")))
            sex = _first(patient, "v3:administrativeGenderCode")
            if sex is not None:
                add("Sex", sex.get("displayName") or _GENDER.get(sex.get("code", ""), sex.get("code", "")) or "unknown")
        add("Patient ID", _ids(_x(role, "v3:id")))
        add("Address", _addresses(_x(role, "v3:addr")))
        add("Phone", _telecoms(_x(role, "v3:telecom")))
    for i, author in enumerate(_x(root, "v3:author/v3:assignedAuthor")):
        who = _party(author, "v3:assignedPerson", "v3:representedOrganization")
        add("Referring provider" if i == 0 else "Author", who or _words(_first(author, "v3:assignedAuthoringDevice")))
    for recipient in _x(root, "v3:informationRecipient/v3:intendedRecipient"):
        add("Recipient", _party(recipient, "v3:informationRecipient", "v3:receivedOrganization"))
    for contact in _x(root, "v3:participant[@typeCode='CALLBCK']/v3:associatedEntity"):
        add("Callback contact", _party(contact, "v3:associatedPerson", "v3:scopingOrganization"))
    for org in _x(root, "v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization"):
        names = "; ".join(_words(n) for n in _x(org, "v3:name"))
        add("Custodian", " — ".join(p for p in (names, _telecoms(_x(org, "v3:telecom"))) if p))
    add("Document date", _date(_first(root, "v3:effectiveTime")))
    return facts


# --- the narrative as blocks ---------------------------------------------------------------------


@dataclass
class Run:
    text: str
    bold: bool = False


@dataclass
class Para:
    runs: list[Run]
    indent: int = 0
    bullet: str = ""


@dataclass
class TableCell:
    text: str
    bold: bool = False
    colspan: int = 1
    rowspan: int = 1


@dataclass
class TableBlock:
    caption: str
    head: list[list[TableCell]]
    body: list[list[TableCell]]
    indent: int = 0


@dataclass
class Heading:
    text: str
    level: int


Block = Para | TableBlock | Heading

MULTIMEDIA = "[image or attachment not included in this fax]"
_LAYOUT_TEXT = "FAX Referral — page of 0123456789"  # what the layout itself prints, beside the strings
_BLOCK_TAGS = {"paragraph", "list", "table"}
_MAX_INDENT = 6


def _local(el) -> str:
    """The v3 local name of an element, "" for anything else (comments, entities, foreign elements)."""
    tag = el.tag
    return tag[len(V3):] if isinstance(tag, str) and tag.startswith(V3) else ""


def _is_bold(el: etree._Element, bold: bool) -> bool:
    styles = {s.lower() for s in el.get("styleCode", "").split()}
    return bold or "bold" in styles


class _Narrative:
    """Turns a CDA narrative block (section/text) into blocks: flowing runs and tables."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.runs: list[Run] = []

    def read(self, el: etree._Element, indent: int = 0) -> list[Block]:
        self.inline(el, False, indent)
        self.flush(indent)
        return self.blocks

    # inline content: text and the elements that flow within a line
    def text(self, text: str | None, bold: bool) -> None:
        if text:
            self.runs.append(Run(_SPACE.sub(" ", text), bold))

    def inline(self, el: etree._Element, bold: bool, indent: int) -> None:
        self.text(el.text, bold)
        for child in el:
            self.element(child, bold, indent)
            self.text(child.tail, bold)

    def element(self, el: etree._Element, bold: bool, indent: int) -> None:
        if not isinstance(el.tag, str):
            return  # an unresolved entity reference: never expanded, nothing to print
        name = _local(el)
        if name in _BLOCK_TAGS:
            self.flush(indent)
            {"paragraph": self.paragraph, "list": self.items, "table": self.table}[name](el, indent)
        elif name == "br":
            self.runs.append(Run("\n", bold))
        elif name == "renderMultiMedia":
            self.runs.append(Run(" ".join(p for p in (MULTIMEDIA, _words(_first(el, "v3:caption"))) if p), bold))
        elif name == "footnoteRef":
            self.runs.append(Run(f"[{el.get('IDREF', '')}]", bold))
        elif name == "footnote":
            self.runs.append(Run(" [", bold))
            self.inline(el, bold, indent)
            self.runs.append(Run("]", bold))
        elif name == "content" and el.get("revised") == "delete":
            self.runs.append(Run("[deleted: ", bold))
            self.inline(el, bold, indent)
            self.runs.append(Run("]", bold))
        elif name == "linkHtml":
            self.inline(el, bold, indent)
            href = el.get("href", "")
            if href and not href.startswith("#") and href != _words(el):
                self.runs.append(Run(f" <{href}>", bold))
        elif name == "caption":
            self.inline(el, True, indent)
            self.runs.append(Run("\n", True))
        else:  # content, sub, sup and any element this renderer does not know: its text
            self.inline(el, _is_bold(el, bold), indent)

    def flush(self, indent: int) -> None:
        runs = _tidy(self.runs)
        self.runs = []
        if runs:
            self.blocks.append(Para(runs, min(indent, _MAX_INDENT)))

    # blocks
    def paragraph(self, el: etree._Element, indent: int) -> None:
        self.inline(el, False, indent)
        self.flush(indent)

    def items(self, el: etree._Element, indent: int) -> None:
        caption = _first(el, "v3:caption")
        if caption is not None:
            self.runs.append(Run(_words(caption), True))
            self.flush(indent)
        ordered = el.get("listType") == "ordered"
        for n, item in enumerate(_x(el, "v3:item"), 1):
            sub = _Narrative().read(item, indent + 1)
            bullet = f"{n}." if ordered else "•"
            if sub and isinstance(sub[0], Para) and not sub[0].bullet:
                sub[0].bullet, sub[0].indent = bullet, min(indent, _MAX_INDENT)
            else:
                sub.insert(0, Para([], min(indent, _MAX_INDENT), bullet))
            self.blocks += sub

    def table(self, el: etree._Element, indent: int) -> None:
        head = _x(el, "v3:thead/v3:tr")
        body = _x(el, "v3:tbody/v3:tr | v3:tr") + _x(el, "v3:tfoot/v3:tr")  # the footer goes last
        if not head and body and len(body[0]) and all(_local(c) == "th" for c in body[0] if _local(c)):
            head = [body.pop(0)]  # without a thead, a first row of th cells only is the header row
        caption = _words(_first(el, "v3:caption"))
        self.blocks.append(TableBlock(caption, [_row(tr) for tr in head], [_row(tr) for tr in body],
                                      min(indent, _MAX_INDENT)))


def _tidy(runs: list[Run]) -> list[Run]:
    """Runs as HTML shows them: one space where several meet (also across elements), none at the
    start or end of a line, runs of the same weight merged."""
    out: list[Run] = []
    for r in runs:
        text = re.sub(r" *\n *", "\n", r.text)
        if (out[-1].text if out else "\n").endswith((" ", "\n")):
            text = text.lstrip(" ")
        if not text:
            continue
        if out and out[-1].bold == r.bold:
            out[-1] = Run(out[-1].text + text, r.bold)
        else:
            out.append(Run(text, r.bold))
    while out and not out[-1].text.strip():
        out.pop()
    if out:
        out[0] = Run(out[0].text.lstrip("\n"), out[0].bold)
        out[-1] = Run(out[-1].text.rstrip(), out[-1].bold)
    return [r for r in out if r.text]


def _row(tr: etree._Element) -> list[TableCell]:
    cells = []
    for c in tr:
        name = _local(c)
        if name not in ("th", "td"):
            continue
        blocks = _Narrative().read(c)
        text = _plain(blocks)
        bold = name == "th" or bool(blocks) and all(r.bold for b in blocks if isinstance(b, Para) for r in b.runs)
        cells.append(TableCell(text, bold, _span(c.get("colspan")), _span(c.get("rowspan"))))
    return cells


def _span(value: str | None) -> int:
    try:
        return max(1, min(int(value or 1), 64))
    except ValueError:
        return 1


def _plain(blocks: list[Block]) -> str:
    """Blocks as the text of one table cell: paragraphs as lines, list items with their bullets."""
    lines = []
    for b in blocks:
        if isinstance(b, Para):
            lines.append("  " * b.indent + (b.bullet + " " if b.bullet else "") + "".join(r.text for r in b.runs))
        elif isinstance(b, TableBlock):
            lines += [b.caption] if b.caption else []
            lines += [" | ".join(c.text for c in row) for row in b.head + b.body]
    return "\n".join(lines).strip()


# --- the document as blocks ----------------------------------------------------------------------


@dataclass
class _Document:
    title: str
    facts: list[tuple[str, str]]
    blocks: list[Block]


def _read_document(root: etree._Element) -> _Document:
    title = _words(_first(root, "v3:title")) or _code_name(_first(root, "v3:code")) or "Clinical document"
    blocks: list[Block] = []
    body = _first(root, "v3:component/v3:structuredBody")
    if body is not None:
        for section in _x(body, "v3:component/v3:section"):
            blocks += _section(section, 1)
    else:
        blocks += _non_xml_body(_first(root, "v3:component/v3:nonXMLBody"))
    return _Document(title, _header_facts(root), blocks)


def _code_name(code: etree._Element | None) -> str:
    return (code.get("displayName") or "").strip() if code is not None else ""


def _section(section: etree._Element, level: int) -> list[Block]:
    title = _words(_first(section, "v3:title")) or _code_name(_first(section, "v3:code")) or "Untitled section"
    blocks: list[Block] = [Heading(title, level)]
    text = _first(section, "v3:text")
    narrative = _Narrative().read(text) if text is not None else []
    blocks += narrative or [Para([Run("(no narrative text)")])]
    for sub in _x(section, "v3:component/v3:section"):
        blocks += _section(sub, level + 1)
    return blocks


def _non_xml_body(body: etree._Element | None) -> list[Block]:
    if body is None:
        return [Para([Run("(the document has no body)")])]
    text = _first(body, "v3:text")
    media = text.get("mediaType", "text/plain") if text is not None else ""
    if text is not None and media == "text/plain" and text.get("representation", "TXT") == "TXT":
        lines = "".join(text.itertext()).strip()
        if lines:
            return [Heading("Document", 1), Para([Run(lines)])]
    return [Heading("Document", 1), Para([Run(f"[the document body ({media or 'unknown type'}) is not included "
                                              "in this fax]")])]


def _strings(doc: _Document, cover_rows: list[tuple[str, str]], notice: str) -> Iterator[str]:
    """Every string the layout will print (to pick the fonts before laying out)."""
    yield doc.title
    yield notice
    for label, value in [*doc.facts, *cover_rows]:
        yield label
        yield value
    for b in doc.blocks:
        if isinstance(b, Heading):
            yield b.text
        elif isinstance(b, Para):
            yield b.bullet
            yield from (r.text for r in b.runs)
        else:
            yield b.caption
            yield from (c.text for row in b.head + b.body for c in row)


def _clean_document(doc: _Document) -> None:
    doc.title = _clean(doc.title)
    doc.facts = [(_clean(a), _clean(b)) for a, b in doc.facts]
    for b in doc.blocks:
        if isinstance(b, Heading):
            b.text = _clean(b.text)
        elif isinstance(b, Para):
            b.runs = [Run(_clean(r.text), r.bold) for r in b.runs]
        else:
            b.caption = _clean(b.caption)
            for row in b.head + b.body:
                for c in row:
                    c.text = _clean(c.text)


# --- layout --------------------------------------------------------------------------------------

MARGIN = 15.0          # mm; fax machines lose a few mm at every edge
BODY_PT, TABLE_PT, SMALL_TABLE_PT = 10.0, 9.0, 7.0
PT = 0.3528            # mm per point
INDENT = 6.0           # mm per list level
MAX_TABLE_COLUMNS = 24
MAX_CELL_LINES = 40    # taller cells continue in the next row (fpdf2 cannot split one row across pages)
CELL_PADDING = 2.5     # mm: the table's 1 mm padding on each side, and some air


@functools.cache
def _page_class():
    # fpdf2 and fontTools are imported on first use (here, in _cmap, in draw_table), not with the
    # module: importing them takes ~0.4 s, which every CLI command importing the engine would pay.
    from fpdf import FPDF

    class FaxPDF(FPDF):
        """Letter pages; the footer "Referral <id> — page X of N" on every page but the cover."""

        footer_label = "Referral"

        def footer(self) -> None:
            if self.page_no() == 1:
                return
            self.set_y(-12)
            self.set_font(MAIN, "", 9)
            self.cell(0, 5, f"{self.footer_label} — page {self.page_no()} of {NB}", align="C")

    return FaxPDF


class _Layout:
    """Draws the cover, the header facts and the blocks on *pdf*; *missing* maps what no font has."""

    def __init__(self, pdf, missing: dict[int, str]) -> None:
        self.pdf = pdf
        self.missing = missing

    def t(self, text: str) -> str:
        return text.translate(self.missing) if self.missing else text

    def font(self, bold: bool = False, size: float = BODY_PT) -> None:
        self.pdf.set_font(MAIN, "B" if bold else "", size)

    # the cover sheet
    def cover(self, rows: list[tuple[str, str]], notice: str) -> None:
        pdf = self.pdf
        pdf.add_page()
        self.font(True, 44)
        pdf.cell(0, 18, "FAX", new_x="LMARGIN", new_y="NEXT")
        self.font(True, 22)
        pdf.cell(0, 11, "Referral", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(6)
        self.facts(rows, size=13)
        pdf.ln(8)
        self.font(False, 9)
        pdf.multi_cell(0, 4.4, self.t(notice), border=1, padding=2, align="L", new_x="LMARGIN", new_y="NEXT")

    # the header facts
    def header(self, doc: _Document) -> None:
        pdf = self.pdf
        pdf.add_page()
        self.font(True, 16)
        pdf.multi_cell(0, 8, self.t(doc.title), align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)
        if doc.facts:
            self.facts(doc.facts, size=BODY_PT)
        pdf.ln(4)

    def facts(self, rows: list[tuple[str, str]], size: float) -> None:
        """Label/value rows between horizontal rules. Drawn directly, not as an fpdf2 table: a table
        lays every cell out twice (measure, then draw), and these rows are a third of a render."""
        pdf = self.pdf
        h, pad = size * PT * 1.35, 1.2
        label_width = pdf.epw / 4
        y = pdf.get_y()
        pdf.line(MARGIN, y, pdf.w - MARGIN, y)
        for label, value in rows:
            if pdf.will_page_break(h + 2 * pad):
                pdf.add_page()
            y = pdf.get_y()
            self.font(True, size)
            pdf.set_xy(MARGIN, y + pad)
            pdf.cell(label_width, h, self.t(label))
            self.font(False, size)
            pdf.multi_cell(0, h, self.t(value), align="L", new_x="LMARGIN", new_y="NEXT")
            y = pdf.get_y() + pad
            pdf.line(MARGIN, y, pdf.w - MARGIN, y)
            pdf.set_y(y)

    # sections
    def blocks(self, blocks: list[Block]) -> None:
        for b in blocks:
            if isinstance(b, Heading):
                self.heading(b)
            elif isinstance(b, Para):
                self.para(b)
            else:
                self.table(b)

    def heading(self, h: Heading) -> None:
        pdf = self.pdf
        size = 13.0 if h.level == 1 else 11.0
        if pdf.will_page_break(size * PT * 1.4 + 14):  # a heading is never the last line of a page
            pdf.add_page()
        pdf.set_left_margin(MARGIN)
        pdf.set_x(MARGIN)
        pdf.ln(2 if h.level > 1 else 3)
        self.font(True, size)
        prefix = "" if h.level == 1 else "  " * (h.level - 2)
        pdf.multi_cell(0, size * PT * 1.4, self.t(prefix + h.text), align="L", new_x="LMARGIN", new_y="NEXT")
        if h.level == 1:
            y = pdf.get_y()
            pdf.line(MARGIN, y, pdf.w - MARGIN, y)
        pdf.ln(1.5)

    def para(self, p: Para) -> None:
        pdf = self.pdf
        h = BODY_PT * PT * 1.4
        x = MARGIN + p.indent * INDENT
        pdf.set_left_margin(x)
        pdf.set_x(x)
        if p.bullet:
            self.font()
            pdf.write(h, p.bullet + " ")
            # Wrapped lines hang under the text, not the bullet; the text follows the bullet after
            # a plain space (a wider jump and pdftotext reads the bullet as a line of its own).
            pdf.set_left_margin(pdf.get_x())
        for r in p.runs:
            self.font(r.bold)
            pdf.write(h, self.t(r.text))
        pdf.ln(h + 1)
        pdf.set_left_margin(MARGIN)

    def table(self, t: TableBlock) -> None:
        pdf = self.pdf
        if t.caption:
            self.para(Para([Run(t.caption, True)], t.indent))
        rows = _pad(t.head + t.body)
        columns = _columns(rows)
        if not columns:
            return
        head, body = rows[: len(t.head)], rows[len(t.head):]
        if columns > MAX_TABLE_COLUMNS:
            self.table_as_text(t, head, body)
            return
        size = TABLE_PT if (pdf.epw / columns) >= 16 else SMALL_TABLE_PT
        widths = self.column_widths(rows, columns, size)
        # A header row is repeated on each page; a huge one (or a tall one) is drawn once, as a row.
        repeat = head and sum(len(c.text) for r in head for c in r) < 300 and len(head) <= 3
        if repeat:
            body = self.split_tall_rows(body, widths, size)
        else:
            head, body = [], self.split_tall_rows(head + body, widths, size)
        self.draw_table(head + body, widths, size, len(head))

    def column_widths(self, rows: list[list[TableCell]], columns: int, size: float) -> list[float]:
        """Widths in mm from the longest word and the longest line of each column's cells (measured in
        their fonts; a cell spanning columns does not count)."""
        pdf = self.pdf
        least, want = [0.0] * columns, [0.0] * columns
        for line in _grid(rows):
            for col, slot in enumerate(line):
                if slot is None or slot[0].colspan != 1 or slot[2] != col or not slot[0].text.strip():
                    continue
                cell = slot[0]
                self.font(cell.bold, size)
                word = max(cell.text.split(), key=len)
                longest = max(cell.text.split("\n"), key=len)
                least[col] = max(least[col], min(pdf.get_string_width(self.t(word)) + CELL_PADDING, pdf.epw / 2))
                want[col] = max(want[col], min(pdf.get_string_width(self.t(longest)) + CELL_PADDING, pdf.epw / 2))
        # Four ems, or the column's fair share of the page if less (MAX_TABLE_COLUMNS keeps that wide
        # enough for a glyph and the padding).
        return _share_width(least, want, pdf.epw, min(pdf.epw / columns, 4 * size * PT))

    def draw_table(self, rows: list[list[TableCell]], widths: list[float], size: float, n_head: int) -> None:
        from fpdf.enums import TableHeadingsDisplay
        from fpdf.fonts import FontFace

        pdf = self.pdf
        pdf.set_left_margin(MARGIN)
        pdf.set_x(MARGIN)
        self.font(False, size)
        bold = FontFace(emphasis="BOLD")
        plain = FontFace(emphasis="")
        with pdf.table(col_widths=tuple(widths), first_row_as_headings=bool(n_head),
                       num_heading_rows=max(n_head, 1), headings_style=bold,
                       repeat_headings=TableHeadingsDisplay.ON_TOP_OF_EVERY_PAGE, text_align="LEFT",
                       v_align="TOP", line_height=size * PT * 1.3, padding=1, borders_layout="ALL") as table:
            for cells in rows:
                row = table.row()
                for c in cells:
                    row.cell(self.t(c.text), style=bold if c.bold else plain, colspan=c.colspan, rowspan=c.rowspan)
        pdf.ln(3)

    def table_as_text(self, t: TableBlock, head: list[list[TableCell]], body: list[list[TableCell]]) -> None:
        """A table too wide for a page: each row as "header: value" lines (still every cell, in order)."""
        labels = [c.text for c in head[-1]] if head else []
        for cells in body:
            runs = []
            for i, c in enumerate(cells):
                label = labels[i] if i < len(labels) else ""
                runs += [Run(f"{label}: ", True), Run(c.text + "\n")] if label else [Run(c.text + "\n")]
            self.para(Para(_tidy(runs), t.indent, "•"))

    def split_tall_rows(self, rows: list[list[TableCell]], widths: list[float], size: float) -> list[list[TableCell]]:
        """Rows whose cells would not fit on a page, continued in further rows (rowspans undone first)."""
        epw = self.pdf.epw
        total = sum(widths)
        if not _may_be_tall(rows, [epw * w / total - 2 for w in widths], size * PT):
            return rows  # most tables stop here, without laying a cell out
        rows = _flatten_rowspans(rows)
        out = []
        for cells in rows:
            col = 0
            pieces = []
            for c in cells:
                w = epw * sum(widths[col:col + c.colspan]) / total - 2
                col += c.colspan
                self.font(c.bold, size)
                lines = self.pdf.multi_cell(w, 1, self.t(c.text), dry_run=True, output="LINES") if c.text else [""]
                pieces.append([lines[i:i + MAX_CELL_LINES] for i in range(0, len(lines), MAX_CELL_LINES)])
            for k in range(max(len(p) for p in pieces) if pieces else 0):
                out.append([TableCell("\n".join(p[k]) if k < len(p) else "", c.bold, c.colspan)
                            for p, c in zip(pieces, cells)])
        return out


def _may_be_tall(rows: list[list[TableCell]], widths: list[float], em: float) -> bool:
    """Whether a cell may wrap to more than MAX_CELL_LINES lines, counting an em per character (as
    wide as a Han ideograph: more than any Latin letter, so a "no" is certain)."""
    for r, line in enumerate(_grid(rows)):
        for col, slot in enumerate(line):
            if slot is None or slot[1] != r or slot[2] != col:
                continue
            cell = slot[0]
            width = max(sum(widths[col:col + cell.colspan]), em)
            if sum(max(1, math.ceil(len(part) * em / width)) for part in cell.text.split("\n")) > MAX_CELL_LINES:
                return True
    return False


def _grid(rows: list[list[TableCell]]) -> list[list[tuple[TableCell, int, int] | None]]:
    """The HTML table grid: for each row, per column, (cell, origin row, origin column) or None."""
    grid: list[list] = [[] for _ in rows]
    for r, cells in enumerate(rows):
        col = 0
        for c in cells:
            while col < len(grid[r]) and grid[r][col] is not None:
                col += 1
            for rr in range(r, min(r + c.rowspan, len(rows))):
                line = grid[rr]
                while len(line) < col + c.colspan:
                    line.append(None)
                for cc in range(col, col + c.colspan):
                    line[cc] = (c, r, col)
            col += c.colspan
    return grid


def _columns(rows: list[list[TableCell]]) -> int:
    return max((len(line) for line in _grid(rows)), default=0)


def _pad(rows: list[list[TableCell]]) -> list[list[TableCell]]:
    """Rows padded with empty cells to the same number of columns (fpdf2 draws short rows short)."""
    grid = _grid(rows)
    columns = max((len(line) for line in grid), default=0)
    return [cells + [TableCell("") for _ in range(columns - sum(x is not None for x in grid[r]))]
            for r, cells in enumerate(rows)]


def _flatten_rowspans(rows: list[list[TableCell]]) -> list[list[TableCell]]:
    """The same table with every rowspan replaced by empty cells below it (rows can then be split)."""
    grid = _grid(rows)
    out = []
    for r, line in enumerate(grid):
        cells = []
        col = 0
        while col < len(line):
            slot = line[col]
            if slot is None:
                cells.append(TableCell(""))
                col += 1
                continue
            cell, origin_row, _ = slot
            if origin_row == r:
                cells.append(TableCell(cell.text, cell.bold, cell.colspan))
            else:
                cells.append(TableCell("", False, cell.colspan))
            col += cell.colspan
        out.append(cells)
    return out


def _share_width(least: list[float], want: list[float], width: float, floor: float) -> list[float]:
    """Column widths summing to *width*: each at least its longest word when the page allows, the
    rest shared by how much more text each column has (a code column stays narrow, a note wide).
    No column is narrower than *floor* (a glyph must fit, or fpdf2 cannot lay the cell out)."""
    least = [max(m, floor) for m in least]
    want = [max(w, m) for w, m in zip(want, least)]
    if sum(least) >= width:  # words too long to stay whole: above the floor, columns shrink alike
        extra = [m - floor for m in least]
        spare = width - floor * len(least)
        return [floor + spare * x / sum(extra) for x in extra] if sum(extra) else [width / len(least)] * len(least)
    if sum(want) <= width:
        return [w * width / sum(want) for w in want]
    spare, more = width - sum(least), [w - m for w, m in zip(want, least)]
    return [m + spare * x / sum(more) for m, x in zip(least, more)]


# --- the entry point -----------------------------------------------------------------------------


def render_pdf(cda: bytes, cover: Cover, *, fonts: Fonts | None = None, created: datetime | None = None) -> bytes:
    """The fax packet for *cda*: cover sheet, header facts, every section (see the module invariants)."""
    root = _parse(cda)
    doc = _read_document(root)
    _clean_document(doc)
    referral_id = _clean(cover.referral_id or _referral_act_id(root))
    when = created.replace(tzinfo=created.tzinfo or timezone.utc) if created else None
    sent = cover.sent_at or (when.strftime("%Y-%m-%d %H:%M %Z").strip() if when else "")
    rows = _cover_rows(cover, cover.callback or _callback(root), referral_id, sent)
    notice = _clean(cover.notice)
    pdf = _new_pdf(f"Referral {referral_id}" if referral_id else "Referral", when or EPOCH)
    chars = set("".join(_strings(doc, rows, notice))) | set(pdf.footer_label) | set(_LAYOUT_TEXT)
    layout = _Layout(pdf, _install_fonts(pdf, fonts or find_fonts(), chars))
    try:
        layout.cover(rows, notice)
        layout.header(doc)
        layout.blocks(doc.blocks)
        return bytes(pdf.output())
    except Exception as exc:
        if not _raised_in(exc, ("fpdf", "fontTools")):
            raise  # a bug here: keep its traceback
        # A layout fpdf2 cannot do (fpdf2 raises FPDFException, ValueError...). Its message may
        # quote the text being laid out, so only the type is passed on.
        raise RenderError(f"the document cannot be laid out ({type(exc).__name__})") from None


def _raised_in(exc: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether *exc* was raised by code in one of *packages* (its innermost frame)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith(packages)


def _new_pdf(footer_label: str, created: datetime):
    pdf = _page_class()(unit="mm", format="Letter")  # US Letter: the paper US fax machines print on
    pdf.footer_label = footer_label
    pdf.set_margins(MARGIN, MARGIN, MARGIN)
    pdf.set_auto_page_break(True, margin=18)
    pdf.alias_nb_pages(NB)
    pdf.set_creation_date(created)
    pdf.set_title(footer_label)  # metadata: the referral id only, never the patient
    pdf.set_creator("hl7referral")
    pdf.set_lang("en-US")
    return pdf


def _cover_rows(cover: Cover, callback: str, referral_id: str, sent: str) -> list[tuple[str, str]]:
    dash = "—"
    rows = [("To", cover.to_name or dash), ("To fax", cover.to_fax or dash), ("From", cover.from_name or dash)]
    if cover.from_fax:
        rows.append(("From fax", cover.from_fax))
    rows += [("Callback", callback or dash), ("Referral id", referral_id or dash)]
    if sent:
        rows.append(("Date", sent))
    rows.append(("Pages", f"{NB} including this cover"))
    # The page alias in the "Pages" row is the one place {nb} may stay; everything else is cleaned.
    return [(label, value if label == "Pages" else _clean(value)) for label, value in rows]
