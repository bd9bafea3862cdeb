"""The fax PDF, read back the way a person or a fax server reads it: poppler's pdftotext and pdfinfo.

Inputs are real: the sample REF^I12 mapped by the project's own pipeline, a
Referral Note built by the builder with non-Latin names, and hand-written CDAs
for the narrative features (tables, lists, nested sections, hostile XML). The
tools run as subprocesses; without poppler-utils the tests skip, except in CI
(env CI set), where they fail.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from hl7referral.cda.model import OID, Address, Code, Identifier, Name, Party, Patient, Problem, Referral, Telecom
from hl7referral.cda.pipeline import Pipeline
from hl7referral.cda.referral_note import build_referral_note, to_bytes
from hl7referral.config import load_engine
from hl7referral.fax import render
from hl7referral.fax.render import Cover, Fonts, RenderError, callback_number, find_fonts, render_pdf
from hl7referral.send import read_messages

ROOT = Path(__file__).resolve().parents[1]
WHEN = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
COVER = Cover(to_name="Example Cardiology Associates", to_fax="+1-555-555-0190", from_name="Sample Clinic",
              from_fax="+1-555-555-0101", referral_id="SAMPLEREF0001", sent_at="2026-11-22 10:00")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} (Debian package poppler-utils) is required on CI")
        pytest.skip(f"{name} not installed (Debian package poppler-utils)")
    return path


def pdftotext(pdf: bytes, tmp_path: Path, *args: str) -> str:
    path = tmp_path / "fax.pdf"
    path.write_bytes(pdf)
    done = subprocess.run([_tool("pdftotext"), *args, str(path), "-"], capture_output=True, check=True, timeout=60)
    return done.stdout.decode("utf-8")


def pdfinfo_pages(pdf: bytes, tmp_path: Path) -> int:
    path = tmp_path / "info.pdf"
    path.write_bytes(pdf)
    done = subprocess.run([_tool("pdfinfo"), str(path)], capture_output=True, check=True, timeout=60, text=True)
    return int(re.search(r"^Pages:\s+(\d+)$", done.stdout, re.M).group(1))


def cover_page_count(text: str) -> int:
    return int(re.search(r"Pages\s+(\d+) including this cover", text).group(1))


def pages(text: str) -> list[str]:
    """pdftotext's pages (it ends each with a form feed)."""
    return text.split("\f")[:-1]


# --- inputs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_cda() -> bytes:
    """samples/ref-i12.hl7 through the pipeline exactly as `hl7referral map` runs it (minus validation)."""
    cfg = load_engine()
    channel = next(c for c in cfg.channels if c.name == "ref-i12")
    raw = read_messages(ROOT / "samples" / "ref-i12.hl7")[0]
    result = Pipeline(cfg.mappings, cfg.directory, None).run(
        raw, channel, document_uuid="2ec95490-5ab2-4d33-8e39-863f80dfc62c", now="20261122064151+0000")
    assert result.document is not None, result.reasons
    assert result.referral_id.startswith("SAMPLEREF0001")
    return result.document


def non_latin_referral() -> Referral:
    """As tests/test_referral_note.py's non-Latin referral: Zoë Ørsted, referred to 王 小明."""
    return Referral(
        referral_id=Identifier("2.16.840.1.113883.19.5.1", "REF-0001", "Good Health Clinic"),
        document_id=Identifier("1c2d8a3e-4b5f-4c6d-8e7f-901234567890"),
        created="20250301103000-0500",
        reason=Code("R07.9", OID["ICD10CM"], "Chest pain, unspecified", "ICD-10-CM"),
        reason_text="胸痛 — Brustschmerz — Боль в груди — Πόνος στο στήθος",
        patient=Patient(ids=[Identifier("", "MRN12345", "GHC_MRN")],
                        names=[Name("Ørsted", ["Zoë"]), Name("李", ["美玲"]), Name("Ёлкина", ["Зоя"])],
                        gender=Code("F"), birth_time="19750501",
                        addr=[Address(["2222 Home Street"], "Beaverton", "OR", "97867", "US", "H")],
                        telecom=[Telecom("tel:+1-555-555-2003", "HP")]),
        referring=Party(ids=[Identifier("", "1234567893", "NPI")], name=Name("Primary", ["Patricia"], suffix="MD"),
                        organization="Good Health Clinic", telecom=[Telecom("tel:+1-555-555-1004", "WP")]),
        recipient=Party(ids=[Identifier(OID["NPI"], "1987654321")], name=Name("王", ["小明"]),
                        organization="Cardiology Associates", telecom=[Telecom("tel:+1-555-555-7000", "WP")]),
        custodian=Party(ids=[Identifier("2.16.840.1.113883.19.5")], organization="Good Health Clinic"),
        problems=[Problem(Code("I10", OID["ICD10CM"], "Essential hypertension", "ICD-10-CM"), "2015", "active")],
    )


@pytest.fixture(scope="module")
def non_latin_cda() -> bytes:
    return to_bytes(build_referral_note(non_latin_referral()))


def cda(body: str, header: str = "") -> bytes:
    """A small CDA: a patient, an author with a phone, and *body* as the structuredBody's components."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<ClinicalDocument xmlns="urn:hl7-org:v3">
  <title>Test Note</title>
  <effectiveTime value="20260101120000+0000"/>
  <recordTarget><patientRole><id extension="P1" assigningAuthorityName="TEST_MRN"/>
    <patient><name><given>Ada</given><family>Lovelace</family></name>
      <administrativeGenderCode code="F"/><birthTime value="18151210"/></patient></patientRole></recordTarget>
  {header or '<author><assignedAuthor><telecom value="tel:+1-555-555-0100" use="WP"/></assignedAuthor></author>'}
  <component><structuredBody>{body}</structuredBody></component>
</ClinicalDocument>""".encode()


def section(title: str, text: str, inner: str = "") -> str:
    return f"<component><section><title>{title}</title><text>{text}</text>{inner}</section></component>"


TABLE = """<table><caption>Problem list</caption>
  <thead><tr><th>Code</th><th>Description</th><th>Status</th></tr></thead>
  <tbody><tr><td>I10</td><td>Essential hypertension</td><td>active</td></tr>
         <tr><td>E11.9</td><td>Type 2 diabetes mellitus</td><td>resolved</td></tr></tbody></table>"""


# --- the must-show: the PDF opens and pdftotext finds patient, referral id, callback ---------------


def test_ascii_sample_from_the_pipeline(sample_cda, tmp_path):
    pdf = render_pdf(sample_cda, COVER, created=WHEN)
    text = pdftotext(pdf, tmp_path)
    patient = render._parse(sample_cda).xpath("//v3:patient/v3:name//text()", namespaces={"v3": render.V3_NS})
    assert " ".join(t.strip() for t in patient if t.strip()) == "Alex J Sample"
    assert "Alex J Sample" in text  # the patient: given, given, family, as the CDA has them
    assert "SAMPLEREF0001" in text
    assert callback_number(sample_cda) == "5555550100"
    assert re.search(r"Callback\s+5555550100", pdftotext(pdf, tmp_path, "-layout"))
    assert cover_page_count(text) == pdfinfo_pages(pdf, tmp_path) >= 2
    for fact in ("1980-01-01", "Female", "SMRN0001 (SAMPLE CLINIC)", "1 Sample St, Springfield, ST 00000",
                 "Dr Robin Referrer", "Dr Sam Specialist, Example Cardiology Associates", "SAMPLE CLINIC",
                 "Example Cardiology Associates", "+1-555-555-0190", "Sample Clinic", "CONFIDENTIALITY NOTICE"):
        assert fact in text, fact
    for title in ("Reason for Referral", "Problems", "Allergies and Intolerances", "Medications", "Results",
                  "Assessment", "Plan of Treatment", "Payers"):
        assert title in text, title


def test_non_latin_sample(non_latin_cda, tmp_path):
    cover = Cover(to_name="王 小明 — Cardiology Associates", to_fax="+1-555-555-7000", from_name="Good Health Clinic",
                  referral_id="REF-0001")
    pdf = render_pdf(non_latin_cda, cover, created=WHEN)
    text = pdftotext(pdf, tmp_path)
    # The patient's names in Latin with diacritics, Han and Cyrillic; the recipient's in Han.
    for word in ("王", "小明", "Ørsted", "Zoë", "Zoë Ørsted", "李", "美玲", "Зоя Ёлкина", "胸痛", "Боль в груди",
                 "Πόνος στο στήθος", "REF-0001"):
        assert word in text, word
    assert callback_number(non_latin_cda) == "+1-555-555-1004"
    assert re.search(r"Callback\s+\+1-555-555-1004", pdftotext(pdf, tmp_path, "-layout"))
    assert cover_page_count(text) == pdfinfo_pages(pdf, tmp_path)
    assert "\ufffd" not in text  # every character came from a font that has it


def test_decomposed_characters_come_out_composed(tmp_path):
    doc = cda(section("Note", "Zoe\u0308 O\u0338rsted"))  # e + combining diaeresis, O + combining long solidus
    text = pdftotext(render_pdf(doc, COVER), tmp_path)
    assert "Zoë" in text


def test_characters_no_font_has_print_as_replacement_and_are_not_logged(tmp_path, caplog):
    hieroglyph = "\U00013000"
    fonts = find_fonts()
    assert all(0x13000 not in render._cmap(p) for p in (fonts.regular, *fonts.fallbacks))
    doc = cda(section("Note", f"Name {hieroglyph} Lovelace"))
    with caplog.at_level(logging.DEBUG):
        text = pdftotext(render_pdf(doc, COVER), tmp_path)
    assert "Name \ufffd Lovelace" in text
    assert not [r for r in caplog.records if hieroglyph in r.getMessage() or "Lovelace" in r.getMessage()]


# --- the narrative --------------------------------------------------------------------------------


def test_a_table_stays_a_table(tmp_path):
    pdf = render_pdf(cda(section("Problems", TABLE)), COVER)
    lines = pdftotext(pdf, tmp_path, "-layout").splitlines()
    header = [i for i, line in enumerate(lines) if re.search(r"Code\s+Description\s+Status", line)]
    row1 = [i for i, line in enumerate(lines) if re.search(r"I10\s+Essential hypertension\s+active", line)]
    row2 = [i for i, line in enumerate(lines) if re.search(r"E11\.9\s+Type 2 diabetes mellitus\s+resolved", line)]
    assert header and row1 and row2, "\n".join(lines)
    assert header[0] < row1[0] < row2[0]
    assert "Problem list" in "\n".join(lines)  # the caption


def test_a_long_table_repeats_its_header_on_every_page(tmp_path):
    rows = "".join(f"<tr><td>C{i:03}</td><td>Finding number {i}</td><td>active</td></tr>" for i in range(150))
    head = "<thead><tr><th>Code</th><th>Description</th><th>Status</th></tr></thead>"
    table = f"<table>{head}<tbody>{rows}</tbody></table>"
    pdf = render_pdf(cda(section("Findings", table)), COVER)
    text = pdftotext(pdf, tmp_path, "-layout")
    table_pages = [p for p in pages(text) if "Finding number" in p]
    assert len(table_pages) >= 3
    for page in table_pages:
        assert re.search(r"Code\s+Description\s+Status", page)
    assert all(f"C{i:03}" in text for i in range(150))


def test_a_cell_taller_than_a_page_continues_in_the_next_row(tmp_path):
    long = "<br/>".join(f"line {i} of a very long note" for i in range(200))
    table = f"<table><thead><tr><th>Item</th><th>Note</th></tr></thead><tbody><tr><td>Hx</td><td>{long}</td></tr>" \
            "<tr><td>After</td><td>the end</td></tr></tbody></table>"
    text = pdftotext(render_pdf(cda(section("History", table)), COVER), tmp_path)
    assert all(f"line {i} of a very long note" in text for i in range(200))
    assert "the end" in text
    # Few characters, but in a column so narrow that they are taller than a page.
    narrow = "".join(f"<td>c{i}</td>" for i in range(18)) + "<td>" + "Ж " * 250 + "</td>"  # 500 characters
    text = pdftotext(render_pdf(cda(section("Narrow", f"<table><tbody><tr>{narrow}</tr></tbody></table>")), COVER),
                     tmp_path)
    assert text.count("Ж") == 250


def test_spans_and_ragged_rows_render(tmp_path):
    table = """<table><thead><tr><th colspan="2">Name</th><th>Status</th></tr></thead><tbody>
      <tr><td rowspan="2">Group A</td><td>first</td><td>ok</td></tr>
      <tr><td>second</td><td>ok</td></tr>
      <tr><td>short row</td></tr></tbody></table>"""
    text = pdftotext(render_pdf(cda(section("Spans", table)), COVER), tmp_path, "-layout")
    for word in ("Group A", "first", "second", "short row"):
        assert word in text
    assert re.search(r"Group A\s+first\s+ok", text)


def test_a_table_too_wide_for_the_page_is_printed_row_by_row(tmp_path):
    head = "".join(f"<th>H{i}</th>" for i in range(40))
    row = "".join(f"<td>v{i}</td>" for i in range(40))
    table = f"<table><thead><tr>{head}</tr></thead><tbody><tr>{row}</tr></tbody></table>"
    text = pdftotext(render_pdf(cda(section("Wide", table)), COVER), tmp_path)
    assert "H0: v0" in text and "H39: v39" in text


def test_words_wider_than_a_column_or_the_page_wrap(tmp_path):
    word = "Ж" * 400  # a letter nothing else on the pages has
    wide = "".join(f"<td>{'X' * 30}{i}</td>" for i in range(20))
    table = (f"<table><tbody><tr><td>{word}</td><td>short</td><td>x</td></tr></tbody></table>"
             f"<table><tbody><tr>{wide}</tr></tbody></table>")
    text = pdftotext(render_pdf(cda(section("Long", f"<paragraph>{word}</paragraph>{table}")), COVER), tmp_path)
    assert text.count("Ж") == 800
    assert "short" in text and "XX19" in text


def test_what_fpdf2_cannot_lay_out_is_a_render_error_without_text(monkeypatch):
    monkeypatch.setattr(render, "MAX_TABLE_COLUMNS", 10_000)  # 300 columns: narrower than a glyph
    row = "".join(f"<td>Lovelace{i}</td>" for i in range(300))
    with pytest.raises(RenderError, match=r"cannot be laid out \(FPDFException\)") as info:
        render_pdf(cda(section("S", f"<table><tbody><tr>{row}</tr></tbody></table>")), COVER)
    assert "Lovelace" not in str(info.value)


def test_narrative_elements(tmp_path):
    text_xml = """<paragraph>First <content styleCode="Bold">bold words</content> and plain<br/>second line</paragraph>
      <list listType="ordered"><caption>Steps</caption><item>Check pressure</item><item>Repeat in <content>two</content>
        weeks<list><item>nested item</item></list></item></list>
      <list><item>bullet one</item></list>
      <paragraph>See <linkHtml href="https://example.org/guide">the guide</linkHtml>
        <footnote ID="fn1">from the clinic</footnote>.</paragraph>
      <renderMultiMedia referencedObject="img1"><caption>ECG strip</caption></renderMultiMedia>
      <unknownThing>text of an unknown element</unknownThing>
      <content revised="delete">old dose</content>"""
    inner = section("Nested child", "child text", section("Grandchild", "grandchild text"))
    doc = cda(section("Plan", text_xml, inner) + section("Empty", ""))
    text = pdftotext(render_pdf(doc, COVER), tmp_path)
    flat = re.sub(r"\s+", " ", text)
    for expected in ("First bold words and plain", "second line", "Steps", "1. Check pressure",
                     "2. Repeat in two weeks", "• nested item", "• bullet one", "the guide <https://example.org/guide>",
                     "[from the clinic]", "[image or attachment not included in this fax] ECG strip",
                     "text of an unknown element", "[deleted: old dose]", "Nested child", "child text",
                     "Grandchild", "grandchild text", "Empty", "(no narrative text)"):
        assert expected in flat, expected
    layout = pdftotext(render_pdf(doc, COVER), tmp_path, "-layout").splitlines()
    assert any(line.strip() == "second line" for line in layout)  # br is a line break


def test_bold_content_is_set_in_the_bold_font(tmp_path):
    """pdftotext cannot see weight; pdftohtml -xml names each text's font."""
    pdf = render_pdf(cda(section("Plan", '<paragraph>plainword <content styleCode="Bold">BOLDWORD</content> '
                                         'tailword</paragraph>')), COVER)
    (tmp_path / "b.pdf").write_bytes(pdf)
    xml = subprocess.run([_tool("pdftohtml"), "-xml", "-i", "-stdout", str(tmp_path / "b.pdf")], capture_output=True,
                         check=True, timeout=60, text=True).stdout
    fonts = dict(re.findall(r'<fontspec id="(\d+)"[^>]*family="([^"]+)"', xml))
    used = {re.sub("<[^>]+>", "", text).strip(): fonts[font]
            for font, text in re.findall(r'<text [^>]*font="(\d+)"[^>]*>(.*?)</text>', xml)}
    assert used["BOLDWORD"].endswith("DejaVuSansBold")
    assert used["plainword"].endswith("DejaVuSansBook") and used["tailword"].endswith("DejaVuSansBook")


def test_header_facts_and_recipient(tmp_path):
    header = """<author><assignedAuthor><telecom value="tel:+1-555-555-0100" use="WP"/>
        <assignedPerson><name><prefix>Dr</prefix><given>Grace</given><family>Hopper</family></name></assignedPerson>
        <representedOrganization><name>Navy Clinic</name></representedOrganization></assignedAuthor></author>
      <custodian><assignedCustodian><representedCustodianOrganization><name>Custodian Org</name>
        </representedCustodianOrganization></assignedCustodian></custodian>
      <informationRecipient><intendedRecipient><informationRecipient><name><given>Alan</given><family>Turing</family>
        </name></informationRecipient><receivedOrganization><name>Bletchley Cardiology</name></receivedOrganization>
      </intendedRecipient></informationRecipient>"""
    text = pdftotext(render_pdf(cda(section("S", "x"), header), COVER), tmp_path, "-layout")
    assert re.search(r"Patient\s+Ada Lovelace", text)
    assert re.search(r"Date of birth\s+1815-12-10", text)
    assert re.search(r"Patient ID\s+P1 \(TEST_MRN\)", text)
    assert re.search(r"Referring provider\s+Dr Grace Hopper, Navy Clinic — \+1-555-555-0100 \(work\)", text)
    assert re.search(r"Recipient\s+Alan Turing, Bletchley Cardiology", text)
    assert re.search(r"Custodian\s+Custodian Org", text)
    assert re.search(r"Document date\s+2026-01-01 12:00 \+0000", text)
    assert "Test Note" in text


# --- pages and footer -----------------------------------------------------------------------------


def test_a_long_document_has_the_footer_on_every_page_but_the_cover(tmp_path):
    para = "<paragraph>" + "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 12 + "</paragraph>"
    body = "".join(section(f"Section {i}", para * 3) for i in range(40))
    pdf = render_pdf(cda(body), Cover("To", "1", "From", referral_id="LONG-1"))
    text = pdftotext(pdf, tmp_path)
    total = pdfinfo_pages(pdf, tmp_path)
    assert total >= 5 and cover_page_count(text) == total
    by_page = pages(text)
    assert len(by_page) == total
    assert "page 1 of" not in by_page[0]
    for n, page in enumerate(by_page[1:], 2):
        assert f"Referral LONG-1 — page {n} of {total}" in page
    assert all(f"Section {i}" in text for i in range(40))


def test_the_page_alias_in_document_text_is_not_replaced(tmp_path):
    text = pdftotext(render_pdf(cda(section("S", "literal {nb} stays")), COVER), tmp_path)
    assert re.search(r"literal \{\W?nb\} stays", text)


# --- hostile or broken input ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"   ", b"<ClinicalDocument xmlns='urn:hl7-org:v3'><title>x</title>",
                                  b"MSH|^~\\&|A|B|C|D|20260101||REF^I12|1|P|2.5.1\r",
                                  b"<html><body>not a CDA</body></html>", b"<ClinicalDocument/>",
                                  "<?xml version='1.0'?><x/>".encode("utf-16")])
def test_not_a_cda_is_a_render_error(data):
    with pytest.raises(RenderError) as info:
        render_pdf(data, COVER)
    assert "Lovelace" not in str(info.value)
    with pytest.raises(RenderError):
        callback_number(data)


def test_the_error_message_carries_no_document_text():
    with pytest.raises(RenderError) as info:
        render_pdf(b"<ClinicalDocument xmlns='urn:hl7-org:v3'><title>Secret Patientname</titel></ClinicalDocument>",
                   COVER)
    assert "Patientname" not in str(info.value) and "line 1" in str(info.value)


def _with_entity(doc: bytes, secret: Path) -> bytes:
    return doc.replace(b'<?xml version="1.0" encoding="UTF-8"?>',
                       b'<?xml version="1.0" encoding="UTF-8"?><!DOCTYPE ClinicalDocument '
                       b'[<!ENTITY xxe SYSTEM "file://' + str(secret).encode() + b'">]>')


def test_an_external_entity_is_never_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-FILE-CONTENT")
    doc = _with_entity(cda(section("S", "before &xxe; after")), secret)
    text = pdftotext(render_pdf(doc, COVER), tmp_path)
    assert "TOPSECRET" not in text
    assert "before" in text and "after" in text
    # In an attribute an external entity is not even well-formed XML: refused, not read.
    in_attribute = _with_entity(cda("", '<author><assignedAuthor><telecom value="tel:&xxe;"/></assignedAuthor>'
                                        '</author>'), secret)
    with pytest.raises(RenderError) as info:
        callback_number(in_attribute)
    assert "TOPSECRET" not in str(info.value)


def test_str_input_is_accepted(tmp_path):
    text = pdftotext(render_pdf(cda(section("S", "Zoë")).decode(), COVER), tmp_path)
    assert "Zoë" in text


# --- callback number ------------------------------------------------------------------------------


def test_callback_number_order_and_stripping():
    legal = ('<legalAuthenticator><assignedEntity><telecom value="tel:+1-555-555-0200"/></assignedEntity>'
             '</legalAuthenticator>')
    custodian = ('<custodian><assignedCustodian><representedCustodianOrganization><telecom value="tel:555-0300"/>'
                 '</representedCustodianOrganization></assignedCustodian></custodian>')
    author_fax_only = ('<author><assignedAuthor><telecom value="fax:+1-555-555-0999"/>'
                       '<telecom value="mailto:a@example.org"/></assignedAuthor></author>')
    assert callback_number(cda("")) == "+1-555-555-0100"
    assert callback_number(cda("", author_fax_only + legal + custodian)) == "+1-555-555-0200"
    assert callback_number(cda("", author_fax_only + custodian)) == "555-0300"
    assert callback_number(cda("", author_fax_only)) == ""
    assert callback_number(cda("", "<author><assignedAuthor/></author>")) == ""
    callback = ('<participant typeCode="CALLBCK"><associatedEntity classCode="ASSIGNED">'
                '<telecom value="tel:+1-555-555-0400"/></associatedEntity></participant>')
    author = '<author><assignedAuthor><telecom value="tel:+1-555-555-0100"/></assignedAuthor></author>'
    assert callback_number(cda("", author + legal + callback)) == "+1-555-555-0400"   # the callback contact first


def test_cover_callback_given_wins_and_empty_is_taken_from_the_cda(tmp_path):
    doc = cda(section("S", "x"))
    given = pdftotext(render_pdf(doc, Cover("To", "1", "From", callback="+1 800 555 0000")), tmp_path, "-layout")
    assert re.search(r"Callback\s+\+1 800 555 0000", given)
    taken = pdftotext(render_pdf(doc, Cover("To", "1", "From")), tmp_path, "-layout")
    assert re.search(r"Callback\s+\+1-555-555-0100", taken)


# --- determinism, fonts -----------------------------------------------------------------------


def test_same_input_same_bytes(non_latin_cda):
    cover = Cover("王 小明", "+1-555-555-7000", "Good Health Clinic", referral_id="REF-0001")
    first = render_pdf(non_latin_cda, cover, created=WHEN)
    assert render_pdf(non_latin_cda, cover, created=WHEN) == first
    assert render_pdf(non_latin_cda, cover, created=datetime(2027, 1, 1, tzinfo=timezone.utc)) != first
    assert render_pdf(non_latin_cda, cover) == render_pdf(non_latin_cda, cover)  # no created: a fixed date


def test_same_bytes_in_a_fresh_process(non_latin_cda, tmp_path):
    """What this process rendered before (other scripts, the font cache warm) does not change the bytes."""
    render_pdf(cda(section("Warm", "Ωμέγα Щ 漢字 かな")), COVER)
    source = tmp_path / "doc.xml"
    source.write_bytes(non_latin_cda)
    script = ("import sys, datetime; from hl7referral.fax.render import Cover, render_pdf; "
              "when = datetime.datetime(2026, 11, 22, 10, 0, tzinfo=datetime.timezone.utc); "
              "c = Cover('王 小明', '+1-555-555-7000', 'Good Health Clinic', referral_id='REF-0001'); "
              "sys.stdout.buffer.write(render_pdf(open(sys.argv[1], 'rb').read(), c, created=when))")
    fresh = subprocess.run([sys.executable, "-c", script, str(source)], capture_output=True, check=True,
                           timeout=120).stdout
    here = render_pdf(non_latin_cda, Cover("王 小明", "+1-555-555-7000", "Good Health Clinic", referral_id="REF-0001"),
                      created=WHEN)
    assert fresh == here


def test_concurrent_renders_agree(sample_cda, non_latin_cda):
    expected = {0: render_pdf(sample_cda, COVER, created=WHEN), 1: render_pdf(non_latin_cda, COVER, created=WHEN)}
    results: dict[int, list[bytes]] = {0: [], 1: []}

    def work(k: int) -> None:
        results[k % 2].append(render_pdf(sample_cda if k % 2 == 0 else non_latin_cda, COVER, created=WHEN))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(pdf == expected[k] for k in (0, 1) for pdf in results[k]) and len(results[0]) == 3


def test_an_ascii_referral_never_reads_the_cjk_font(sample_cda, non_latin_cda, monkeypatch):
    """Neither its code points (fontTools) nor the file itself (fpdf2's add_font)."""
    fonts = find_fonts()
    assert fonts.fallbacks, "no CJK fallback installed (Debian package fonts-droid-fallback)"
    real_open = open
    opened: list[str] = []

    def spy(file, *args, **kwargs):
        opened.append(os.path.realpath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_open(file, *args, **kwargs)

    render._cmap.cache_clear()  # so the CJK font's code points would have to be read again
    monkeypatch.setattr("builtins.open", spy)
    try:
        render_pdf(sample_cda, COVER, fonts=fonts)
        cjk = {os.path.realpath(p) for p in fonts.fallbacks}
        assert os.path.realpath(fonts.regular) in opened  # the spy sees font files being read
        assert not cjk & set(opened)
        render_pdf(non_latin_cda, COVER, fonts=fonts)
        assert cjk <= set(opened)
    finally:
        render._cmap.cache_clear()


def test_find_fonts_on_debian():
    fonts = find_fonts()
    assert fonts.regular.endswith("DejaVuSans.ttf") and fonts.bold.endswith("DejaVuSans-Bold.ttf")
    assert all(Path(p).is_file() for p in (fonts.regular, fonts.bold, *fonts.fallbacks))


def test_find_fonts_prefers_extra_dirs(tmp_path):
    shutil.copy(find_fonts().regular, tmp_path / "DejaVuSans.ttf")
    assert find_fonts([str(tmp_path)]).regular == str(tmp_path / "DejaVuSans.ttf")


def test_no_font_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(render, "DEBIAN_FONT_DIRS", ())
    with pytest.raises(RenderError, match="fonts-dejavu-core"):
        find_fonts([str(tmp_path)])


def test_unusable_font_files_are_render_errors(tmp_path):
    bad = tmp_path / "Bad.ttf"
    bad.write_bytes(b"not a font")
    good = find_fonts()
    for fonts in (Fonts(str(tmp_path / "missing.ttf"), good.bold), Fonts(str(bad), good.bold)):
        with pytest.raises(RenderError, match="font .*ttf"):
            render_pdf(cda(section("S", "x")), COVER, fonts=fonts)


def test_without_a_cjk_fallback_han_prints_as_replacement(tmp_path):
    base = find_fonts()
    text = pdftotext(render_pdf(cda(section("S", "王 Lovelace")), COVER, fonts=Fonts(base.regular, base.bold)),
                     tmp_path)
    assert "\ufffd Lovelace" in text


@pytest.mark.parametrize("name", ["C-CDA-Examples/Referral_Note.xml", "CDA-ccda-2.1/C-CDA_R2-1_CCD.xml",
                                  "C-CDA-Examples/CCD_1.XML", "CDA-core-2.0/sampleCCD.xml"])
def test_official_examples_render(standards, name, tmp_path):
    path = standards / "examples" / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    data = path.read_bytes()
    pdf = render_pdf(data, COVER)
    text = pdftotext(pdf, tmp_path)
    assert cover_page_count(text) == pdfinfo_pages(pdf, tmp_path)
    root = render._parse(data)
    for title in root.xpath("//v3:section/v3:title", namespaces={"v3": render.V3_NS}):
        words = " ".join("".join(title.itertext()).split())
        if words:
            assert words in re.sub(r"\s+", " ", text), words
