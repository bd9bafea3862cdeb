"""Check a CDA document: XSD, the C-CDA R2.1 Schematron, and that the expected template was checked.

Tiers V0–V2 of ``shared/reference/ccda.md`` §13: well-formed and safe (kind
``xml``), valid against ``CDA_SDTC.xsd`` (``xsd``), no failed assert or
successful report in the Schematron ``errors`` phase (``schematron``), and the
document both declares the expected templateId+extension and had that
template's document-level rule fire (``template``).

Invariants
----------
* Untrusted input (bytes, files) goes through :func:`parse_untrusted`: no DTD
  loading, no entity expansion, no network, no huge trees; a document with a
  DOCTYPE is refused (CDA has none, and it is how entity attacks arrive).
* Schemas load once per :class:`Validator`; :meth:`Validator.validate` reads
  no schema file. The Schematron transform may only read files (its
  ``document('voc.xml')``): no writes, no network.
* Findings are ordered xml, xsd, schematron, template. Schematron runs even
  when the XSD fails (both are reported, XSD first: element-order errors
  cascade into misleading Schematron messages, ccda.md §11).
* ``ok`` needs the template check: Schematron rules are silent when the
  templateId/extension is wrong (ccda.md §10.3), so a document whose
  document-level rule did not fire is not ok even with zero failed asserts.
* Known false positives (:data:`KNOWN_FALSE_POSITIVES`) never fail a report;
  they are kept apart in ``Report.known``.
* The compiled Schematron XSLT is cached on disk, keyed by the SHA-256 of the
  ``.sch`` (plus phase, lxml version and :data:`SPEED_UP_VERSION`, since both
  the compiler and the rewrite are ours). A cache file that does not load is
  recompiled and replaced atomically. Whatever its origin, the XSLT's URL is
  set to the ``.sch`` path before compiling, so ``document('voc.xml')``
  resolves beside the ``.sch`` (ccda.md §9.2).
* :func:`speed_up` (on by default) changes how fast the Schematron runs, never
  what it reports: its SVRL output is byte-identical to the plain compilation
  (tests/test_validate.py compares them on failing and passing documents).
* Line numbers refer to the file as given, or for an in-memory tree to its
  :func:`~hl7referral.cda.referral_note.to_bytes` form (re-parsed only when a
  finding needs a line).
"""

from __future__ import annotations

import hashlib
import threading
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree, isoschematron

from .referral_note import REFERRAL_NOTE, to_bytes

XSD_RELPATH = Path("cda-schema/extensions/SDTC/infrastructure/cda/CDA_SDTC.xsd")
SCH_RELPATH = Path("ccda-r2.1/ccda-r2.1.sch")
SVRL = {"svrl": "http://purl.oclc.org/dsdl/svrl"}
CDA = {"cda": "urn:hl7-org:v3"}

# Schematron assert ids that fail on valid documents. Reported apart, never fatal.
KNOWN_FALSE_POSITIVES = {
    "a-1098-28042": "R2.1 Schematron bug (CDA-20068): tests xsi:type without @, fails on every "
    "Self-Care Activities observation (ccda.md §10.1)",
}

_XSLT_ACCESS = etree.XSLTAccessControl(
    read_file=True, write_file=False, create_dir=False, read_network=False, write_network=False
)


class UnsafeXML(ValueError):
    """The input declares a DOCTYPE (DTDs and entities are refused, not resolved)."""


def safe_parser(**options) -> etree.XMLParser:
    """A parser for untrusted XML (a fresh one: lxml parsers are not shared across threads).

    *options* add to the safe ones (e.g. ``remove_comments=True``), never replace them.
    """
    return etree.XMLParser(
        **options, resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False, huge_tree=False
    )


def parse_untrusted(data: bytes | Path) -> etree._ElementTree:
    """Parse *data* (bytes, or a file path) safely; :class:`UnsafeXML` when it has a DOCTYPE."""
    if isinstance(data, Path):
        data = data.read_bytes()
    tree = etree.parse(io.BytesIO(data), safe_parser())
    _refuse_doctype(tree)
    return tree


def _refuse_doctype(tree: etree._ElementTree) -> None:
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None or tree.docinfo.externalDTD is not None:
        raise UnsafeXML("DOCTYPE declarations are not accepted in CDA documents")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hl7referral``, else ``~/.cache/hl7referral``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hl7referral"


def document_rule_id(template: tuple[str, str], phase: str = "errors") -> str:
    """The id of the Schematron rule whose context is the document template (as the R2.1 .sch names it)."""
    root, extension = template
    if extension:
        return f"r-urn-hl7ii-{root}-{extension}-{phase}"
    return f"r-urn-oid-{root}-{phase}"


@dataclass(frozen=True)
class Finding:
    kind: str  # "xml" | "xsd" | "schematron" | "template"
    rule: str  # Schematron assert/report @id, libxml2 error type, or the template check's name
    text: str
    line: int | None = None
    location: str = ""  # XPath of the node concerned, when known


@dataclass
class Report:
    source: str
    findings: list[Finding] = field(default_factory=list)
    known: list[Finding] = field(default_factory=list)  # known false positives, not failures
    fired_rules: frozenset[str] = frozenset()
    schematron_ran: bool = False

    @property
    def ok(self) -> bool:
        return not self.findings

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def lines(self) -> list[str]:
        """``file:line: rule: text`` per finding (``?`` for an unknown line)."""
        return [f"{self.source}:{f.line if f.line else '?'}: {f.rule}: {f.text}" for f in self.findings]


class Validator:
    """XSD + Schematron for C-CDA R2.1, loaded once from *standards_dir* (``shared/standards``).

    ``cache_dir``: where the compiled Schematron is kept (default
    :func:`default_cache_dir`). ``phase``: the Schematron phase (``errors``).
    ``preload``: load the Schematron now rather than on first use.
    ``optimize``: apply :func:`speed_up` (same findings, 5–15x faster).

    ``schematron_source`` says where the Schematron transform came from:
    ``"cache"`` (the compiled XSLT on disk), ``"compiled"`` (compiled from the
    .sch now, and cached) or ``None`` (not loaded yet: ``preload=False``).

    One Validator per thread: lxml keeps the last error log on the schema object.
    """

    def __init__(
        self,
        standards_dir: Path,
        *,
        cache_dir: Path | None = None,
        phase: str = "errors",
        preload: bool = True,
        optimize: bool = True,
    ) -> None:
        self.standards_dir = Path(standards_dir)
        self.xsd_path = (self.standards_dir / XSD_RELPATH).resolve()
        self.sch_path = (self.standards_dir / SCH_RELPATH).resolve()
        self.phase = phase
        self.optimize = optimize
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path: Path | None = None
        self.schematron_source: str | None = None
        # The XSD imports its parts by relative path: parse it from its own location.
        self.schema = etree.XMLSchema(etree.parse(str(self.xsd_path), safe_parser()))
        self._transform: etree.XSLT | None = None
        # The template check runs for every document: compiled once (per Validator, like the schemas).
        self._declares = etree.XPath("cda:templateId[@root=$r and @extension=$e]", namespaces=CDA)
        self._declares_unversioned = etree.XPath("cda:templateId[@root=$r][not(@extension)]", namespaces=CDA)
        if preload:
            self.load_schematron()

    # Schematron loading

    def load_schematron(self) -> etree.XSLT:
        if self._transform is None:
            # Compiled on a short-lived thread of its own: compiled on the thread that then
            # builds and validates documents, it made that thread's later work 10-13% slower
            # (bench/cda.py, A/B in separate processes, CPU time; lxml keeps its name
            # dictionary per thread). An XSLT object may be used from any thread.
            out: list = []
            worker = threading.Thread(target=lambda: out.append(self._loaded()), name="schematron-compile")
            worker.start()
            worker.join()
            if isinstance(out[0], BaseException):
                raise out[0]
            self._transform = out[0]
        return self._transform

    def _loaded(self):
        try:
            return self._load_schematron()
        except BaseException as exc:  # noqa: BLE001 - handed back to the calling thread, raised there
            return exc

    def _xslt(self, xslt_doc: etree._ElementTree) -> etree.XSLT:
        xslt_doc.docinfo.URL = self.sch_path.as_uri()  # document('voc.xml') resolves beside the .sch
        return etree.XSLT(xslt_doc, access_control=_XSLT_ACCESS)

    def _load_schematron(self) -> etree.XSLT:
        data = self.sch_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        variant = f"{self.phase}.{digest}.lxml-{etree.__version__}" + (f".{SPEED_UP_VERSION}" if self.optimize else "")
        self.cache_path = self.cache_dir / f"{self.sch_path.stem}.{variant}.xsl"
        if self.cache_path.is_file():
            try:
                transform = self._xslt(etree.parse(str(self.cache_path), safe_parser()))
            except (OSError, etree.XMLSyntaxError, etree.XSLTParseError):
                pass  # corrupted or foreign: recompile below and overwrite
            else:
                self.schematron_source = "cache"
                return transform
        # validate_schema=False: the HL7 .sch is not valid against ISO Schematron's RNG (ccda.md §9.1).
        sch = isoschematron.Schematron(
            etree.fromstring(data, safe_parser()), phase=self.phase, validate_schema=False, store_xslt=True
        )
        xslt_doc = sch.validator_xslt
        if self.optimize:
            speed_up(xslt_doc)
        transform = self._xslt(xslt_doc)
        self._write_cache(etree.tostring(xslt_doc))
        self.schematron_source = "compiled"
        return transform

    def _write_cache(self, data: bytes) -> None:
        assert self.cache_path is not None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".xsl", dir=self.cache_dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.cache_path)  # readers never see a half-written file
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass  # the cache is an optimisation: an unwritable cache dir only costs the next start-up

    # validation

    def validate(
        self,
        doc: etree._ElementTree | etree._Element | bytes | Path,
        expect: tuple[str, str] | None = REFERRAL_NOTE,
        schematron: bool = True,
        source: str | None = None,
    ) -> Report:
        """Validate *doc*; *expect* is the (root, extension) of the document template it must be."""
        if isinstance(doc, (bytes, bytearray, Path)):
            report = Report(source or (str(doc) if isinstance(doc, Path) else "<document>"))
            try:
                tree = parse_untrusted(doc if isinstance(doc, Path) else bytes(doc))
            except UnsafeXML as e:
                report.findings.append(Finding("xml", "doctype", str(e)))
                return report
            except etree.XMLSyntaxError as e:
                report.findings.append(Finding("xml", "not-well-formed", e.msg or str(e), e.lineno or None))
                return report
        else:
            tree = doc if isinstance(doc, etree._ElementTree) else doc.getroottree()
            report = Report(source or "<document>")
            try:
                _refuse_doctype(tree)
            except UnsafeXML as e:
                report.findings.append(Finding("xml", "doctype", str(e)))
                return report
        lines = _Lines(tree)

        if not self.schema.validate(tree):
            errors = self.schema.error_log
            if not lines.native:
                # Built in memory: no source lines; the same check on the serialised form has them.
                self.schema.validate(lines.tree)
                errors = self.schema.error_log
            report.findings.extend(
                Finding("xsd", e.type_name, e.message, e.line or None, e.path or "") for e in errors
            )

        if schematron:
            svrl = self.load_schematron()(tree)
            report.schematron_ran = True
            for node in svrl.xpath("//svrl:failed-assert | //svrl:successful-report", namespaces=SVRL):
                location = node.get("location", "")
                finding = Finding(
                    "schematron",
                    node.get("id") or "no-id",
                    " ".join((node.findtext("svrl:text", "", SVRL) or "").split()),
                    lines.of_xpath(location),
                    location,
                )
                (report.known if finding.rule in KNOWN_FALSE_POSITIVES else report.findings).append(finding)
            report.fired_rules = frozenset(svrl.xpath("//svrl:fired-rule/@id", namespaces=SVRL))

        if expect is not None:
            report.findings.extend(self._template_findings(tree, expect, report, lines))
        return report

    def _template_findings(
        self, tree: etree._ElementTree, expect: tuple[str, str], report: Report, lines: _Lines
    ) -> list[Finding]:
        root, extension = expect
        found: list[Finding] = []
        doc = tree.getroot()
        declares = self._declares if extension else self._declares_unversioned
        if not declares(doc, r=root, e=extension):
            declared = ", ".join(
                t.get("root", "") + (":" + t.get("extension") if t.get("extension") else "")
                for t in doc.findall("{urn:hl7-org:v3}templateId")
            )
            found.append(
                Finding(
                    "template",
                    "template-declared",
                    f"document does not declare templateId {root}:{extension} (declares: {declared or 'none'})",
                    lines.of_xpath("/*"),
                    "/*",
                )
            )
        if report.schematron_ran:
            rule = document_rule_id(expect, self.phase)
            if rule not in report.fired_rules:
                found.append(
                    Finding(
                        "template",
                        "template-rule-fired",
                        f"Schematron rule {rule} did not fire: the document-level {root}:{extension} "
                        "constraints were not checked",
                        lines.of_xpath("/*"),
                        "/*",
                    )
                )
        return found


# --- making the compiled Schematron faster without changing what it reports ------------------------

XSL_NS = "http://www.w3.org/1999/XSL/Transform"
SVRL_NS = SVRL["svrl"]
SPEED_UP_VERSION = "fast1"  # part of the cache key: a new rewrite must not load an old cache
_TEMPLATE_KEY = "hl7referral-templateId"
# A step predicate requiring a templateId child, exactly as Trifolia writes rule contexts.
_REQUIRES_TEMPLATE = re.compile(r"\[cda:templateId\[@root='([0-9.]+)'(?: and @extension='[^'\[\]]*')?\]\]")


def _depths(expr: str) -> list[int]:
    """Bracket/parenthesis depth at each character of *expr*, outside string literals."""
    depth, quote, out = 0, "", []
    for ch in expr:
        out.append(depth)
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
    return out


def _branches(match: str) -> list[str]:
    """The alternatives of a match pattern (split at top-level ``|``)."""
    depths = _depths(match)
    cuts = [i for i, ch in enumerate(match) if ch == "|" and depths[i] == 0]
    return [match[a + 1 : b].strip() for a, b in zip([-1, *cuts], [*cuts, len(match)])]


def _required_roots(branch: str) -> set[str]:
    """templateId roots a node matching *branch* needs on its path ({} when it needs none for sure).

    Only predicates that sit directly on a location step of the branch count
    (depth 0): inside ``not()``, ``count()``, ``or`` … they require nothing.
    """
    depths = _depths(branch)
    return {m.group(1) for m in _REQUIRES_TEMPLATE.finditer(branch) if depths[m.start()] == 0}


def speed_up(xslt_doc: etree._ElementTree) -> int:
    """Rewrite an lxml-compiled (ISO skeleton, XSLT 1) C-CDA Schematron so it runs several times faster.

    The skeleton makes one pass over the whole document per pattern (218 in the
    R2.1 errors phase), whether or not the document holds the templates the
    pattern checks. Two rewrites, both leaving the SVRL output unchanged:

    * a pattern whose every rule context requires some templateId (the
      ``[cda:templateId[@root='…']]`` step predicates Trifolia generates) runs
      only when the document contains one of those templateIds (an ``xsl:key``
      lookup); otherwise none of its rules could fire;
    * the skeleton's ``<apply-templates/>`` inside each ``svrl:active-pattern``
      is dropped: in the default mode only ``/`` and ``text()`` (which outputs
      nothing) have templates, so that traversal produces nothing.

    Returns the number of patterns guarded. Anything unexpected leaves the
    affected part as it was.
    """
    sheet = xslt_doc.getroot()
    xsl = "{" + XSL_NS + "}"
    matches: dict[str, list[str]] = {}
    default_mode_matches = set()
    for t in sheet.iterchildren(xsl + "template"):
        mode, match = t.get("mode"), t.get("match")
        if match is None:
            continue
        if mode is None:
            default_mode_matches.add(match)
        elif match not in ("text()", "@*|node()"):
            matches.setdefault(mode, []).append(match)
    roots_by_mode: dict[str, set[str]] = {}
    for mode, mode_matches in matches.items():
        roots: set[str] = set()
        for branch in (b for m in mode_matches for b in _branches(m)):
            required = _required_roots(branch)
            if not required:
                break  # this rule may fire without any templateId: always run the pattern
            roots |= required
        else:
            roots_by_mode[mode] = roots
    main = next((t for t in sheet.iterchildren(xsl + "template") if t.get("match") == "/" and not t.get("mode")), None)
    if main is None:
        return 0
    guarded = 0
    for apply in list(main.iter(xsl + "apply-templates")):
        mode = apply.get("mode")
        parent = apply.getparent()
        if mode is None and apply.get("select") is None and parent.tag == "{" + SVRL_NS + "}active-pattern":
            if default_mode_matches <= {"/", "text()"}:
                parent.remove(apply)
        elif mode in roots_by_mode and apply.get("select") == "/":
            test = " or ".join(f"key('{_TEMPLATE_KEY}', '{root}')" for root in sorted(roots_by_mode[mode]))
            guard = etree.Element(xsl + "if", test=test)
            apply.addprevious(guard)
            guard.append(apply)
            guarded += 1
    if guarded:
        key = etree.SubElement(sheet, xsl + "key", nsmap={"cda": "urn:hl7-org:v3"})
        key.attrib.update({"name": _TEMPLATE_KEY, "match": "cda:templateId", "use": "@root"})
    return guarded


class _Lines:
    """Source lines for findings: the tree's own, or those of its serialised form (made on demand)."""

    def __init__(self, tree: etree._ElementTree) -> None:
        self._tree = tree
        self.native = tree.getroot().sourceline is not None
        self._reparsed: etree._ElementTree | None = None

    @property
    def tree(self) -> etree._ElementTree:
        if self.native:
            return self._tree
        if self._reparsed is None:
            self._reparsed = etree.parse(io.BytesIO(to_bytes(self._tree)), safe_parser())
        return self._reparsed

    def of_xpath(self, location: str) -> int | None:
        if not location:
            return None
        try:
            nodes = self.tree.xpath(location)
        except etree.XPathError:
            return None
        if isinstance(nodes, list) and nodes and isinstance(nodes[0], etree._Element):
            return nodes[0].sourceline
        return None
