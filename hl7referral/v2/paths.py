"""Field paths over a parsed message: ``PID-5.1``, ``PRD[RT]-2``, ``PID-3(*)``, ``DG1(*)``.

Grammar (1-based numbers, as HL7 counts)::

    path       = SEG [selector] [occurrence] ["-" FIELD [repetition] ["." COMP ["." SUB]]]
    selector   = "[" [FIELD "="] VALUE "]"      segment whose FIELD (default 1), first component, is VALUE
    occurrence = "(" N | "*" ")"               which matching segment (default the first)
    repetition = "(" N | "*" ")"               which repetition (default the first)
               | "[" COMP "=" VALUE "]"        the repetitions whose component COMP is VALUE

``PRD[RT]-2`` is the referred-to provider's name, ``NK1[3=OWN]-2`` the owner's,
``PID-3[5=MR].1`` the medical record number, ``OBX(*)-5`` every observation value.
A path without a segment (``-3.1`` or ``3.1``) is relative to a segment given by
the caller (used for repeating groups: one DG1 at a time).

The reader works on the message text: segments are split by the separator rule
of :func:`hl7referral.v2.header.split_segments` and fields by the sender's own
delimiters (a full python-hl7 parse would cost more than the whole mapping);
escape sequences are python-hl7's ``unescape``.

Invariants
----------
* Values are unescaped with the message's own delimiters; the message itself
  is never changed.
* A missing segment, field, repetition or component yields no value, never an
  error: whether absence matters is the mapping's business.
* :func:`parse_path` raises :class:`PathError` naming the bad part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import logging

import hl7
import hl7.containers
import hl7.util

from .header import BOM, Delimiters, Header, read_header, split_segments

# python-hl7 logs a field's content when it meets an escape it does not know;
# the engine's logs carry ids, never message content.
for _module in (hl7.util, hl7.containers):
    logging.getLogger(_module.__file__).disabled = True

_PATH = re.compile(
    r"""^(?P<seg>[A-Z][A-Z0-9]{2})?
    (?:\[(?:(?P<selfield>\d+)=)?(?P<selvalue>[^\]]*)\])?
    (?:\((?P<occ>\d+|\*)\))?
    (?:-?(?P<field>\d+)
       (?:\((?P<rep>\d+|\*)\)|\[(?P<repcomp>\d+)=(?P<repvalue>[^\]]*)\])?
       (?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?
    )?$""",
    re.X,
)


class PathError(ValueError):
    pass


@dataclass(frozen=True)
class Path:
    text: str
    segment: str | None
    selector_field: int
    selector_value: str | None
    occurrence: int | None  # None = all; 1-based otherwise
    field: int | None
    repetition: int | None  # None = all
    rep_component: int | None
    rep_value: str | None
    component: int | None
    subcomponent: int | None

    @property
    def many(self) -> bool:
        """True when the path can yield several values."""
        return self.occurrence is None or (self.field is not None and self.repetition is None)


def parse_path(text: str) -> Path:
    m = _PATH.match(text.strip())
    if not m or (m["seg"] is None and m["field"] is None):
        raise PathError(f"not a field path: {text!r} (e.g. PID-5.1, PRD[RT]-2, PID-3(*))")
    if m["seg"] is None and (m["selvalue"] is not None or m["occ"]):
        raise PathError(f"{text!r}: a selector or occurrence needs a segment name")
    occ = m["occ"]
    rep = m["rep"]
    for name, value in (("field", m["field"]), ("component", m["comp"]), ("subcomponent", m["sub"]),
                        ("occurrence", occ if occ != "*" else None), ("repetition", rep if rep != "*" else None)):
        if value is not None and int(value) < 1:
            raise PathError(f"{text!r}: {name} numbers start at 1")
    return Path(
        text=text,
        segment=m["seg"],
        selector_field=int(m["selfield"] or 1),
        selector_value=m["selvalue"],
        occurrence=None if occ == "*" else int(occ or 1),
        field=int(m["field"]) if m["field"] else None,
        repetition=None if rep == "*" or m["repcomp"] else int(rep or 1),
        rep_component=int(m["repcomp"]) if m["repcomp"] else None,
        rep_value=m["repvalue"],
        component=int(m["comp"]) if m["comp"] else None,
        subcomponent=int(m["sub"]) if m["sub"] else None,
    )


# A repetition: its components, each a list of subcomponents (unescaped strings).
Repetition = list[list[str]]


Segment = list[str]  # fields as text; index n is field n (MSH too: index 1 is MSH-1)


class Reader:
    """Reads paths from one message's text.

    Segments are indexed by name once, each field is split and unescaped
    once, and the segments a selector picks (``PRD[RP]``) are picked once: a
    mapping reads the same few segments dozens of times.
    """

    def __init__(self, text: str) -> None:
        if text.startswith("\ufeff"):
            text = text[1:]
        self._setup(text, read_header(text.encode("latin-1", errors="replace")[:4096]).delimiters)

    def _setup(self, text: str, d: Delimiters) -> None:
        self.field_sep = d.field
        self.component, self.repetition, self.subcomponent = d.component, d.repetition, d.subcomponent
        self.escape = d.escape
        self._delimiters = d
        self._unescaper_message: hl7.Message | None = None  # made when a field first needs unescaping
        self.segments_list: list[Segment] = []
        self._by_name: dict[str, list[Segment]] = {}
        for line in split_segments(text):
            fields = line.split(d.field)
            if fields[0] == "MSH":
                fields.insert(1, d.field)
            self.segments_list.append(fields)
            self._by_name.setdefault(fields[0], []).append(fields)
        self._fields: dict[tuple[int, int], list[Repetition]] = {}
        # Segments a selector picks (PRD[RP]: read five times per mapping), by (name, field, value).
        self._selected: dict[tuple[str | None, int, str], list[Segment]] = {}

    @property
    def _unescaper(self) -> hl7.Message:
        """python-hl7's unescape, with this message's delimiters."""
        if self._unescaper_message is None:
            d = self._delimiters
            self._unescaper_message = hl7.Message("\r", [], esc=d.escape or "\x1a",
                                                  separators="\r" + d.field + d.repetition + d.component
                                                  + d.subcomponent)
        return self._unescaper_message

    @classmethod
    def from_bytes(cls, raw: bytes, codec: str) -> "Reader":
        return cls(raw.removeprefix(BOM).decode(codec))

    @classmethod
    def _from_bytes_read(cls, raw: bytes, codec: str, header: Header) -> "Reader":
        """``from_bytes(raw, codec)`` for a caller that has read the header of *raw* already.

        The same reader: ``__init__`` reads the delimiters again from the decoded text, which
        gives these whenever the text begins with the MSH-1 and MSH-2 read (every ASCII-compatible
        codec writes them unchanged); otherwise this reads them as ``from_bytes`` does.
        """
        return cls._from_text_read(raw.removeprefix(BOM).decode(codec), header)

    @classmethod
    def _from_text_read(cls, text: str, header: Header) -> "Reader":
        """``Reader(text)`` for text decoded from bytes whose header was read already: the same
        reader, its delimiters taken from that read when the text begins with them."""
        d = header.delimiters
        if text.startswith("\ufeff"):
            text = text[1:]
        if not text.startswith("MSH" + d.field + d.msh2):
            # Not the header read (a codec that does not keep ASCII as ASCII: UTF-16, EBCDIC):
            # read the text's own, as Reader() does, which refuses what is not HL7.
            return cls(text)
        reader = cls.__new__(cls)
        reader._setup(text, d)
        return reader

    # -- segments --------------------------------------------------------------

    def segments(self, path: Path) -> list[Segment]:
        found = self._by_name.get(path.segment, [])
        if path.selector_value is not None:
            key = (path.segment, path.selector_field, path.selector_value)
            selected = self._selected.get(key)
            if selected is None:
                selected = self._selected[key] = [
                    s for s in found if self._first_component(s, path.selector_field) == path.selector_value]
            found = list(selected)  # the caller's own list, as before the cache
        if path.occurrence is None:
            return found
        return found[path.occurrence - 1: path.occurrence]

    def _first_component(self, segment: Segment, n: int) -> str:
        raw = self.raw_field(segment, n)
        return raw.split(self.repetition)[0].split(self.component)[0].strip()

    # -- fields ------------------------------------------------------------------

    def raw_field(self, segment: Segment, n: int) -> str:
        return segment[n] if n < len(segment) else ""

    def repetitions(self, segment: Segment, n: int) -> list[Repetition]:
        key = (id(segment), n)
        cached = self._fields.get(key)
        if cached is None:
            cached = self._fields[key] = self._split(segment, n)
        return cached

    def _split(self, segment: Segment, n: int) -> list[Repetition]:
        raw = segment[n] if n < len(segment) else ""  # raw_field(segment, n)
        if raw == "" or raw == '""':
            return []
        if n <= 2 and segment[0] == "MSH":  # the delimiters themselves: never split
            return [[[raw]]]
        esc, sub = self.escape, self.subcomponent
        if esc and esc in raw:
            unescape = self._unescaper.unescape
            return [[[unescape(s) if esc in s else s for s in comp.split(sub)] for comp in rep.split(self.component)]
                    for rep in raw.split(self.repetition)]
        # Nothing to unescape (most fields): split only; without a subcomponent separator in the
        # field, each component is its own single subcomponent.
        comp_sep = self.component
        if self.repetition not in raw:  # one repetition, the usual case: one comprehension less
            if comp_sep not in raw:
                return [[raw.split(sub)]] if sub in raw else [[[raw]]]
            comps = raw.split(comp_sep)
            return [[c.split(sub) for c in comps]] if sub in raw else [[[c] for c in comps]]
        if sub in raw:
            return [[comp.split(sub) for comp in rep.split(comp_sep)] for rep in raw.split(self.repetition)]
        return [[[comp] for comp in rep.split(comp_sep)] for rep in raw.split(self.repetition)]

    # -- evaluation --------------------------------------------------------------

    def values(self, path: Path, segment: Segment | None = None) -> list:
        """Every value ``path`` names: strings when it names a component, else repetitions.

        With ``segment``, a path without a segment name is read from it.
        """
        name = path.segment
        if name is None:
            if segment is None:
                raise PathError(f"{path.text!r} is relative: it needs a segment")
            segments = [segment]
        elif path.selector_value is None:  # self.segments(path) without a selector, inlined
            segments = self._by_name.get(name, [])
            occurrence = path.occurrence
            if occurrence is not None:
                segments = segments[occurrence - 1: occurrence]
        else:
            segments = self.segments(path)
        n = path.field
        if n is None:
            return segments
        out: list = []
        comp = path.component
        fields = self._fields
        for seg in segments:
            key = (id(seg), n)  # repetitions(seg, n), inlined: this runs for every rule of a mapping
            reps = fields.get(key)
            if reps is None:
                reps = fields[key] = self._split(seg, n)
            if not reps:
                continue
            if path.rep_component is not None:
                reps = [r for r in reps if _component(r, path.rep_component, 1) == path.rep_value]
            elif path.repetition is not None:
                reps = reps[path.repetition - 1: path.repetition]
            if comp is None:
                for rep in reps:
                    if any(map(any, rep)):  # some subcomponent is not empty
                        out.append(rep)
                continue
            sub = path.subcomponent
            for rep in reps:
                if comp > len(rep):
                    continue
                subs = rep[comp - 1]
                if sub is None:
                    # The whole component: its subcomponents joined as sent, or the only one stripped.
                    value = self.subcomponent.join(subs) if len(subs) > 1 else subs[0].strip() if subs else ""
                else:
                    value = subs[sub - 1].strip() if sub <= len(subs) else ""
                if value:
                    out.append(value)
        return out

    def first(self, text: str) -> str:
        """The first value of a component path as a string ('' if none): a convenience for tests and CLI."""
        values = self.values(parse_path(text))
        if not values:
            return ""
        v = values[0]
        return v if isinstance(v, str) else self.component.join(self.subcomponent.join(c) for c in v)


def _component(rep: Repetition, comp: int, sub: int) -> str:
    if comp > len(rep):
        return ""
    subs = rep[comp - 1]
    return subs[sub - 1].strip() if sub <= len(subs) else ""
