"""The human-readable part of a C-CDA section: ``section/text`` (the CDA narrative block).

Entries carry the machine-readable copy of what the narrative says and point
back at it with ``<reference value="#ID"/>``; this module builds the narrative
side and hands out the IDs.

Invariants
----------
* Elements are in the ``urn:hl7-org:v3`` namespace and follow
  ``NarrativeBlock.xsd`` (``table`` = ``thead``? ``tbody``+, rows of ``th``/``td``;
  ``list`` = ``item``+), so a section text is always XSD-valid.
* Tables stay tables: tabular data is never flattened into paragraphs.
* Text goes in as text: lxml escapes markup characters; characters XML 1.0
  cannot carry at all (C0 controls except TAB/LF/CR, lone surrogates,
  U+FFFE/U+FFFF) are dropped by :func:`clean` instead of failing the build.
* An ``ID`` is only placed on a cell or item that has text, so every
  ``reference`` an entry makes resolves to something a reader can see.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from lxml import etree

V3 = "{urn:hl7-org:v3}"
NO_INFORMATION = "No information"

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def clean(value: str) -> str:
    """*value* without the characters XML 1.0 cannot represent (lxml would raise on them)."""
    if not value:
        return ""
    if value.isprintable():  # the common case, and no control character can be in it
        return value
    return _NOT_XML.sub("", value)


class Cell(NamedTuple):
    """A table cell or list item: its text and, when an entry refers to it, its ID."""

    text: str
    id: str = ""


def text_block(section: etree._Element) -> etree._Element:
    return etree.SubElement(section, V3 + "text")


def no_information(section: etree._Element) -> etree._Element:
    """The text of a section that has nothing to say: exactly "No information"."""
    text = text_block(section)
    text.text = NO_INFORMATION
    return text


def paragraph(parent: etree._Element, text: str, id: str = "") -> etree._Element:
    p = etree.SubElement(parent, V3 + "paragraph")
    value = clean(text)
    if id and value:
        p.set("ID", id)
    p.text = value
    return p


def _cell(row: etree._Element, tag: str, cell: Cell | str) -> None:
    _fill_cell(etree.SubElement(row, tag), cell)


def _fill_cell(el: etree._Element, cell: Cell | str) -> None:
    if isinstance(cell, Cell):
        text, id = cell
        value = text if text and text.isprintable() else clean(text)  # clean(), its common case inlined
        if id and value:
            el.set("ID", id)
    else:
        value = cell if cell and cell.isprintable() else clean(cell)
    if value:
        el.text = value


class Columns:
    """A table's column headers, with its ``thead`` and an empty row built once to be copied.

    Copying a skeleton is done in C and costs a third of making the same
    elements one ``SubElement`` at a time; tables are most of a document's
    elements. Only the headers (the builder's constants, never document data)
    are in the skeletons. Whole tables are kept too: *n* full-width rows whose
    cells carry given ``ID`` attributes (the builder's references, by row
    number: constants too), made on first use, at most :data:`MAX_SKELETONS`
    per Columns: one copy instead of one per row, and no ``ID`` to set.
    """

    def __init__(self, *headers: str) -> None:
        self.headers = headers
        self._table = etree.Element(V3 + "table")
        head = etree.SubElement(etree.SubElement(self._table, V3 + "thead"), V3 + "tr")
        for h in headers:
            _cell(head, V3 + "th", h)
        self._row = etree.Element(V3 + "tr")
        for _ in headers:
            etree.SubElement(self._row, V3 + "td")
        self._tables: dict[tuple[int, tuple[str, ...]], etree._Element] = {}

    def new_table(self, parent: etree._Element) -> etree._Element:
        """A copy of ``<table><thead>…</thead></table>`` appended to *parent*."""
        t = self._table.__copy__()  # lxml copies an element with its whole subtree
        parent.append(t)
        return t

    def new_row(self, body: etree._Element, width: int) -> etree._Element:
        """A ``tr`` of *width* empty cells appended to *body*."""
        if width == len(self.headers):
            tr = self._row.__copy__()
            body.append(tr)
        else:  # a row wider or narrower than the header: its own cells
            tr = etree.SubElement(body, V3 + "tr")
            for _ in range(width):
                etree.SubElement(tr, V3 + "td")
        return tr

    def new_full_table(self, parent: etree._Element, rows: int, ids: tuple[str, ...] = ()) -> etree._Element | None:
        """A copy of the table with ``tbody`` and *rows* full-width rows of empty cells, appended to *parent*.

        *ids*: each cell's ``ID`` in document order ("" for none; all none when empty). None (and
        nothing appended) when *rows* is not in 1..:data:`MAX_SKELETON_ROWS`, or when this
        skeleton is not kept yet and :data:`MAX_SKELETONS` are.
        """
        if not 0 < rows <= MAX_SKELETON_ROWS:
            return None
        key = (rows, ids)
        skeleton = self._tables.get(key)
        if skeleton is None:
            if len(self._tables) >= MAX_SKELETONS:
                return None
            # Made from the constant parts only; a race between threads makes two equal skeletons.
            skeleton = self._table.__copy__()
            body = etree.SubElement(skeleton, V3 + "tbody")
            for _ in range(rows):
                body.append(self._row.__copy__())
            for td, id in zip(skeleton.iter(_TD), ids):
                if id:
                    td.set("ID", id)
            skeleton = self._tables.setdefault(key, skeleton)
        t = skeleton.__copy__()
        parent.append(t)
        return t


# Tables up to this many rows are copied whole (:meth:`Columns.new_full_table`); longer ones row by row.
MAX_SKELETON_ROWS = 64
# Whole-table skeletons kept per Columns (one per row count and set of cell IDs that occurred).
MAX_SKELETONS = 256


def table(
    parent: etree._Element, headers: Columns | Sequence[str], rows: Iterable[Sequence[Cell | str]]
) -> etree._Element:
    """``<table><thead><tr><th>…</th></tr></thead><tbody><tr><td>…</td></tr>…</tbody></table>``.

    The caller passes at least one row: an empty ``tbody`` is not schema-valid
    (a section with no rows is a "No information" section instead). Callers
    that make the same table for every document pass :class:`Columns` made once.
    """
    rows = rows if isinstance(rows, list) else list(rows)
    if isinstance(headers, Columns):
        columns = headers
        width = len(columns.headers)
        if all(len(row) == width for row in rows):
            # _fill_cell's text and ID for every cell, in document order; the IDs come in the skeleton.
            texts, ids = [], []
            for row in rows:
                for c in row:
                    if isinstance(c, Cell):
                        text, id = c
                        value = text if text and text.isprintable() else clean(text)
                        ids.append(id if id and value else "")
                    else:
                        value = c if c and c.isprintable() else clean(c)
                        ids.append("")
                    texts.append(value)
            t = columns.new_full_table(parent, len(rows), tuple(ids))
            if t is not None:
                for td, value in zip(t.iter(_TD), texts):
                    if value:
                        td.text = value
                return t
    else:
        columns = Columns(*headers)
    t = columns.new_table(parent)
    body = etree.SubElement(t, V3 + "tbody")
    for row in rows:
        for td, c in zip(columns.new_row(body, len(row)), row):
            _fill_cell(td, c)
    return t


_TD = V3 + "td"


def item_list(parent: etree._Element, items: Iterable[Cell | str]) -> etree._Element:
    lst = etree.SubElement(parent, V3 + "list")
    for item in items:
        _cell(lst, V3 + "item", item)
    return lst


def reference(parent: etree._Element, id: str) -> etree._Element:
    """``<reference value="#id"/>`` under *parent* (an entry's ``text`` or ``originalText``)."""
    ref = etree.SubElement(parent, V3 + "reference")
    ref.set("value", "#" + id)  # faster than SubElement's keyword attributes, which lxml sorts first
    return ref
