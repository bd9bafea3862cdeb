"""The validator on HL7's own R2.1 example, on hostile XML, and its compiled-Schematron cache."""

from __future__ import annotations

import hashlib

import pytest
from lxml import etree

from hl7referral.cda.model import Identifier, Referral
from hl7referral.cda.referral_note import build_referral_note, to_bytes
from hl7referral.cda.validate import (
    KNOWN_FALSE_POSITIVES,
    UnsafeXML,
    Validator,
    default_cache_dir,
    parse_untrusted,
    safe_parser,
)

CCD_R21 = ("2.16.840.1.113883.10.20.22.1.2", "2015-08-01")
_VALIDATORS: dict = {}


@pytest.fixture
def sch_dir(standards):
    if not (standards / "ccda-r2.1" / "ccda-r2.1.sch").is_file():
        pytest.skip(f"C-CDA standards not found under {standards}")
    return standards


@pytest.fixture
def validator(sch_dir, tmp_path_factory) -> Validator:
    if sch_dir not in _VALIDATORS:
        _VALIDATORS[sch_dir] = Validator(sch_dir, cache_dir=tmp_path_factory.getbasetemp() / "xslt-cache")
    return _VALIDATORS[sch_dir]


# --- HL7's official R2.1 CCD ------------------------------------------------------------------------


def test_official_r21_ccd_has_only_the_known_false_positive(validator, sch_dir):
    path = sch_dir / "examples" / "CDA-ccda-2.1" / "C-CDA_R2-1_CCD.xml"
    report = validator.validate(path, expect=CCD_R21)
    assert report.of_kind("xsd") == []
    assert report.ok, "\n".join(report.lines())
    assert report.known and {f.rule for f in report.known} == {"a-1098-28042"}
    assert set(KNOWN_FALSE_POSITIVES) == {"a-1098-28042"}
    assert all(f.line and f.location for f in report.known)  # lines of the file itself
    assert "r-urn-hl7ii-2.16.840.1.113883.10.20.22.1.2-2015-08-01-errors" in report.fired_rules
    assert len(report.fired_rules) > 50  # distinct rule ids (ccda.md counts 266 fired-rule elements)

    # The same document is not a Referral Note: only the template check says so.
    as_referral = validator.validate(path, schematron=False)
    assert {f.kind for f in as_referral.findings} == {"template"}
    assert as_referral.lines()[0].startswith(f"{path}:")


# --- hostile and broken input -----------------------------------------------------------------------


def _xxe(secret_file) -> bytes:
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE ClinicalDocument [<!ENTITY secret SYSTEM "file://{secret_file}">]>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&secret;</title></ClinicalDocument>'
    ).encode()


def test_external_entity_is_refused_and_never_read(validator, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    data = _xxe(secret)

    with pytest.raises(UnsafeXML):
        parse_untrusted(data)

    report = validator.validate(data)
    assert not report.ok
    assert [f.kind for f in report.findings] == ["xml"]
    assert "TOP-SECRET-VALUE" not in "\n".join(report.lines())

    # Even below the DOCTYPE refusal, the parser itself does not expand the entity.
    root = etree.fromstring(data, safe_parser())
    assert "TOP-SECRET-VALUE" not in etree.tostring(root, encoding="unicode")


def test_doctype_on_a_tree_is_refused_too(validator, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    tree = etree.ElementTree(etree.fromstring(_xxe(secret), safe_parser()))
    report = validator.validate(tree)
    assert [f.rule for f in report.findings] == ["doctype"]


def test_not_well_formed_is_an_xml_finding_with_line(validator):
    report = validator.validate(b"<?xml version='1.0'?>\n<ClinicalDocument>\n<title>x</titel>\n</ClinicalDocument>")
    assert not report.ok
    (finding,) = report.findings
    assert finding.kind == "xml" and finding.line == 3


def test_file_report_lines_name_file_line_and_rule(validator, tmp_path):
    tree = build_referral_note(Referral())
    doc = tree.getroot()
    doc.find("{urn:hl7-org:v3}code").addprevious(doc.find("{urn:hl7-org:v3}title"))
    path = tmp_path / "broken.xml"
    path.write_bytes(to_bytes(tree))
    report = validator.validate(path)
    first = report.lines()[0]
    assert first.startswith(f"{path}:9: SCHEMAV_ELEMENT_CONTENT: ")
    assert report.findings[0].kind == "xsd"


# --- the compiled-Schematron cache ------------------------------------------------------------------


def test_cache_is_written_reused_and_rebuilt_when_corrupt(sch_dir, tmp_path):
    cache = tmp_path / "cache"
    first = Validator(sch_dir, cache_dir=cache)
    assert first.schematron_source == "compiled"
    path = first.cache_path
    assert path is not None and path.is_file() and path.parent == cache
    digest = hashlib.sha256((sch_dir / "ccda-r2.1" / "ccda-r2.1.sch").read_bytes()).hexdigest()
    assert digest in path.name
    mtime = path.stat().st_mtime_ns

    second = Validator(sch_dir, cache_dir=cache)
    assert second.schematron_source == "cache"
    assert second.cache_path == path and path.stat().st_mtime_ns == mtime
    # The cached XSLT still reads voc.xml beside the .sch: the Referral Act moodCode assert
    # (a-1098-30885, a document('voc.xml') lookup) passes for INT and fails for EVN.
    tree = build_referral_note(Referral(referral_id=Identifier("2.16.840.1.113883.19.5.1", "R-1")))
    report = second.validate(tree)
    assert report.ok, "\n".join(report.lines())
    assert "r-urn-oid-2.16.840.1.113883.10.20.22.4.140-errors" in report.fired_rules
    (act,) = tree.xpath("//cda:act[@classCode='PCPR']", namespaces={"cda": "urn:hl7-org:v3"})
    act.set("moodCode", "EVN")
    assert [f.rule for f in second.validate(tree).findings] == ["a-1098-30885"]

    path.write_bytes(b"<xsl:stylesheet garbage")
    third = Validator(sch_dir, cache_dir=cache)
    assert third.schematron_source == "compiled"
    etree.XSLT(etree.parse(str(path)))  # rewritten: a loadable stylesheet again
    assert Validator(sch_dir, cache_dir=cache).schematron_source == "cache"


def test_schematron_loads_lazily_without_preload(sch_dir, tmp_path):
    v = Validator(sch_dir, cache_dir=tmp_path, preload=False)
    assert v.schematron_source is None
    assert v.validate(build_referral_note(Referral()), schematron=False).ok
    assert v.schematron_source is None


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "hl7referral"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "hl7referral"


def test_speed_up_reports_exactly_what_the_plain_schematron_reports(sch_dir, tmp_path, validator):
    """Byte-identical SVRL, on passing and failing documents, with and without the rewrite."""
    plain = Validator(sch_dir, cache_dir=tmp_path, optimize=False).load_schematron()
    fast = validator.load_schematron()
    assert validator.optimize and validator.cache_path.name.endswith(".fast1.xsl")

    adult = build_referral_note(Referral(referral_id=Identifier("2.16.840.1.113883.19.5.1", "R-1")))
    broken = build_referral_note(Referral(referral_id=Identifier("2.16.840.1.113883.19.5.1", "R-1")))
    body = broken.getroot().find("{urn:hl7-org:v3}component/{urn:hl7-org:v3}structuredBody")
    body.remove(body[0])  # no Reason for Referral: a-1198-30924
    hl7_referral = etree.parse(str(sch_dir / "examples" / "C-CDA-Examples" / "Referral_Note.xml"))  # 43 failures
    for tree in (adult, broken, hl7_referral):
        assert etree.tostring(fast(tree)) == etree.tostring(plain(tree))


@pytest.mark.parametrize(
    "context, roots",
    [
        ("cda:act[cda:templateId[@root='1.2' and @extension='2015-08-01']]/cda:code", {"1.2"}),
        ("cda:a[cda:templateId[@root='1.2']]/cda:b/cda:c[cda:templateId[@root='3.4']]", {"1.2", "3.4"}),
        ("cda:act[not(cda:templateId[@root='1.2'])]", set()),
        ("cda:act[count(cda:x[cda:templateId[@root='1.2']])=0]", set()),
        ("cda:act[cda:templateId[@root='1.2'] or cda:code]", set()),
        ("//cda:templateId[contains(' 1.2:x ', concat(' ', @root, ':', @extension, ' '))]", set()),
    ],
)
def test_speed_up_only_trusts_step_predicates(context, roots):
    from hl7referral.cda.validate import _required_roots

    assert _required_roots(context) == roots


def test_speed_up_splits_unions_outside_predicates_and_strings():
    from hl7referral.cda.validate import _branches

    assert _branches("a[x|y] | b[contains('|', .)]|c") == ["a[x|y]", "b[contains('|', .)]", "c"]
