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

Invariants
----------
* Values are unescaped (python-hl7's ``unescape`` with the message's own
  delimiters); the message itself is never changed.
* A missing segment, field, repetition or component yields no value, never an
  error: whether absence matters is the mapping's business.
* :func:`parse_path` raises :class:`PathError` naming the bad part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import hl7

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


class Reader:
    """Reads paths from one python-hl7 message.

    Segments are indexed by name once, and each field is split and unescaped
    once: a mapping reads the same few segments dozens of times.
    """

    def __init__(self, message: hl7.Message) -> None:
        self.message = message
        msh = message.segment("MSH")
        sep = str(msh[2])  # python-hl7 indexes MSH as HL7 counts: msh[1] = MSH-1
        self.field_sep = str(msh[1])
        self.component = sep[0] if len(sep) > 0 else "^"
        self.repetition = sep[1] if len(sep) > 1 else "~"
        self.escape = sep[2] if len(sep) > 2 and sep[2] not in "&" else ""
        self.subcomponent = sep[3] if len(sep) > 3 else "&"
        self._by_name: dict[str, list[hl7.Segment]] = {}
        for seg in message:
            self._by_name.setdefault(str(seg[0]), []).append(seg)
        self._fields: dict[tuple[int, int], list[Repetition]] = {}

    # -- segments --------------------------------------------------------------

    def segments(self, path: Path) -> list[hl7.Segment]:
        found = self._by_name.get(path.segment, [])
        if path.selector_value is not None:
            found = [s for s in found if self._first_component(s, path.selector_field) == path.selector_value]
        if path.occurrence is None:
            return found
        return found[path.occurrence - 1: path.occurrence]

    def _first_component(self, segment: hl7.Segment, n: int) -> str:
        raw = self.raw_field(segment, n)
        return raw.split(self.repetition)[0].split(self.component)[0].strip()

    # -- fields ------------------------------------------------------------------

    def raw_field(self, segment: hl7.Segment, n: int) -> str:
        if n >= len(segment):
            return ""
        return str(segment[n])

    def repetitions(self, segment: hl7.Segment, n: int) -> list[Repetition]:
        key = (id(segment), n)
        cached = self._fields.get(key)
        if cached is None:
            cached = self._fields[key] = self._split(segment, n)
        return cached

    def _split(self, segment: hl7.Segment, n: int) -> list[Repetition]:
        raw = self.raw_field(segment, n)
        if raw == "" or raw == '""':
            return []
        if n <= 2 and str(segment[0]) == "MSH":  # the delimiters themselves: never split
            return [[[raw]]]
        esc, unescape = self.escape, self.message.unescape
        reps = []
        for rep in raw.split(self.repetition):
            reps.append([[unescape(sub) if esc and esc in sub else sub for sub in comp.split(self.subcomponent)]
                         for comp in rep.split(self.component)])
        return reps

    # -- evaluation --------------------------------------------------------------

    def values(self, path: Path, segment: hl7.Segment | None = None) -> list:
        """Every value ``path`` names: strings when it names a component, else repetitions.

        With ``segment``, a path without a segment name is read from it.
        """
        if path.segment is None:
            if segment is None:
                raise PathError(f"{path.text!r} is relative: it needs a segment")
            segments = [segment]
        else:
            segments = self.segments(path)
        if path.field is None:
            return segments
        out: list = []
        for seg in segments:
            reps = self.repetitions(seg, path.field)
            if path.rep_component is not None:
                reps = [r for r in reps if _component(r, path.rep_component, 1) == path.rep_value]
            elif path.repetition is not None:
                reps = reps[path.repetition - 1: path.repetition]
            for rep in reps:
                if path.component is None:
                    if any(any(s for s in c) for c in rep):
                        out.append(rep)
                else:
                    value = _component(rep, path.component, path.subcomponent or 1)
                    if path.subcomponent is None and len(rep) >= path.component:
                        value = self.subcomponent.join(rep[path.component - 1]) if len(
                            rep[path.component - 1]) > 1 else value
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
