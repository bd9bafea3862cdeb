"""Decide, from a frame's bytes alone, what kind of answer it deserves.

``triage(payload, policy)`` is a pure function: bytes and a policy in, a
:class:`Triage` out. It reads MSH with :mod:`header` and checks the few fields
a referral cannot do without, table-driven (:data:`REQUIRED`), in the order of
reliability-tests.md section 5: problems with MSH-9/11/12 are rejections (AR,
"not about content"), content problems are errors (AE).

Invariants
----------
* Never raises, whatever the bytes (fuzzed in ``tests/test_triage.py``).
* ``not_hl7`` is set exactly when no MSH could be read; then no ACK is possible.
* ``errors`` is empty exactly when ``code == "AA"``.
* The decoded ``text`` is set whenever the bytes decode in the declared
  charset; the raw bytes are the caller's to keep in every case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import charset
from .header import BrokenHeader, Header, NotHL7, read_header

DEFAULT_VERSIONS = frozenset(
    "2.1 2.2 2.3 2.3.1 2.4 2.5 2.5.1 2.6 2.7 2.7.1 2.8 2.8.1 2.8.2 2.9".split()
)
DEFAULT_PROCESSING_IDS = frozenset({"P", "D"})
MAX_CONTROL_ID = 199  # MSH-10 length in v2.7+; longer cannot be echoed safely


@dataclass(frozen=True, slots=True)
class Problem:
    """One ERR segment: HL7 table 0357 code, location, readable text."""

    code: int
    segment: str
    field: int
    text: str
    sequence: int = 1
    severity: str = "E"

    @property
    def location(self) -> str:
        return f"{self.segment}-{self.field}" if self.field else self.segment


@dataclass(frozen=True, slots=True)
class Policy:
    """What a listener accepts.

    ``routes`` maps 'TYPE^EVENT' to ``(facilities, channel)`` pairs; an empty
    ``facilities`` tuple takes any sending facility (MSH-4). A facility matches
    MSH-4 as a whole or any one of its components (namespace id or OID).
    """

    routes: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = field(default_factory=dict)
    versions: frozenset[str] = DEFAULT_VERSIONS
    processing_ids: frozenset[str] = DEFAULT_PROCESSING_IDS
    default_charset: str = "ascii"

    @classmethod
    def simple(cls, routes: dict[str, str], **kw) -> "Policy":
        return cls({k: (((), v),) for k, v in routes.items()}, **kw)

    def route(self, kind: str, msh4: str, component_sep: str = "^") -> str | None:
        for facilities, channel in self.routes.get(kind, ()):
            if not facilities:
                return channel
            if msh4 in facilities or any(p in facilities for p in msh4.split(component_sep) if p):
                return channel
        return None


@dataclass(frozen=True, slots=True)
class Triage:
    code: str  # AA, AE or AR (original-mode terms; ack.py maps to CA/CE/CR)
    header: Header | None = None
    errors: tuple[Problem, ...] = ()
    not_hl7: str | None = None
    channel: str | None = None
    codec: str = "ascii"
    text: str | None = None
    referral_id: str = ""

    @property
    def accepted(self) -> bool:
        return self.code == "AA"


# Required content per message type: (segment, field or 0 for the segment
# itself, what it is). A tuple of alternatives means "one of these".
_REF_ID_ORDER = (("ORC", 2, "placer order number (the referral id)"),
                 ("OBR", 2, "placer order number (the referral id)"))
REQUIRED: dict[str, tuple] = {
    "REF^I12": (
        ("PID", 0, "PID segment"),
        ("PID", 3, "patient identifier list"),
        ("RF1", 0, "RF1 segment (referral information)"),
        ("RF1", 6, "originating referral identifier"),
    ),
    "ORM^O01": (
        ("PID", 0, "PID segment"),
        ("PID", 3, "patient identifier list"),
        ("ORC", 0, "ORC segment (common order)"),
        _REF_ID_ORDER,
    ),
    "OMG^O19": (
        ("PID", 0, "PID segment"),
        ("PID", 3, "patient identifier list"),
        ("ORC", 0, "ORC segment (common order)"),
        _REF_ID_ORDER,
    ),
}
# Where the referral id lives, per message type (first non-empty wins).
REFERRAL_ID: dict[str, tuple[tuple[str, int], ...]] = {
    "REF^I12": (("RF1", 6),),
    "ORM^O01": (("ORC", 2), ("OBR", 2)),
    "OMG^O19": (("ORC", 2), ("OBR", 2)),
}
# Timestamps checked for their data type (TS/DTM): (segment, field).
_TIMESTAMPS = (("MSH", 7), ("PID", 7))
_TS = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.\d{1,4})?)?)?)?)?)?([+-]\d{4})?\Z"
)


def triage(payload: bytes, policy: Policy) -> Triage:
    try:
        return _triage(payload, policy)
    except Exception as exc:  # noqa: BLE001 - the invariant is "never raises"
        reason = f"internal error reading the message: {type(exc).__name__}"
        return Triage("AR", errors=(Problem(207, "MSH", 0, reason),))


def _triage(payload: bytes, policy: Policy) -> Triage:
    try:
        header = read_header(payload)
    except NotHL7 as exc:
        return Triage("AR", not_hl7=str(exc))
    except BrokenHeader as exc:
        return Triage("AR", errors=(Problem(102, "MSH", 2, f"unreadable encoding characters: {exc}"),))

    def reject(code: int, fld: int, reason: str, ack: str = "AR", **kw) -> Triage:
        return Triage(ack, header, (Problem(code, "MSH", fld, reason),), **kw)

    kind = header.type_and_event
    mtype = header.message_type
    channel = policy.route(kind, header.sending_facility, header.delimiters.component)
    if channel is None:
        if not mtype:
            return reject(101, 9, "MSH-9 (message type) is empty")
        if kind in policy.routes:
            return reject(200, 4, f"no channel takes {kind} from sending facility {header.sending_facility!r}")
        if any(k.split("^")[0] == mtype for k in policy.routes):
            accepted = ", ".join(sorted(k for k in policy.routes if k.startswith(mtype + "^")))
            return reject(201, 9, f"unsupported trigger event {kind} on this listener (accepts {accepted})")
        return reject(200, 9, f"unsupported message type {mtype} on this listener")
    if header.version not in policy.versions:
        return reject(203, 12, f"unsupported version {header.version or '(empty)'}")
    if header.processing_id not in policy.processing_ids:
        wanted = "/".join(sorted(policy.processing_ids))
        return reject(202, 11, f"processing id {header.processing_id or '(empty)'} not accepted here ({wanted})")
    try:
        codec = charset.codec_for(header.charset, policy.default_charset)
    except charset.UnknownCharset:
        return reject(103, 18, f"unknown character set {header.charset!r}", "AE", channel=channel)
    try:
        text = charset.decode(payload, codec)
    except charset.CharsetMismatch as exc:
        return reject(102, 18, f"character set error: {exc}", "AE", channel=channel, codec=codec)
    if text.startswith("\ufeff"):
        text = text[1:]
    control_id = header.control_id
    if not control_id.strip():
        return reject(101, 10, "MSH-10 (message control id) is empty", "AE", channel=channel, codec=codec, text=text)
    if len(control_id) > MAX_CONTROL_ID:
        return reject(104, 10, f"MSH-10 is {len(control_id)} characters (max {MAX_CONTROL_ID})",
                      "AE", channel=channel, codec=codec, text=text)

    # Look up only the segments the rules name (first occurrence of each);
    # splitting a 64 KB message into every segment costs more than the rest.
    seg_sep = "\r" if "\r" in text else "\n"
    body = text.replace("\r\n", "\r") if seg_sep == "\r" and "\r\n" in text else text
    found: dict[str, list[str] | None] = {"MSH": list(header.fields)}

    def fields_of(seg: str) -> list[str] | None:
        if seg not in found:
            found[seg] = _segment(body, seg, header.delimiters.field, seg_sep)
        return found[seg]

    errors: list[Problem] = []
    for rule in REQUIRED.get(kind, ()):
        alternatives = rule if isinstance(rule[0], tuple) else (rule,)
        if not any(_present(fields_of(seg), fld) for seg, fld, _ in alternatives):
            seg, fld, what = alternatives[0]
            names = " or ".join(f"{s}-{f}" if f else s for s, f, _ in alternatives)
            errors.append(Problem(101, seg, fld, f"required {what} missing ({names})"))
            if fld == 0:
                break  # the segment's fields would only repeat the same problem
    for seg, fld in _TIMESTAMPS:
        value = _value(fields_of(seg), fld).split(header.delimiters.component)[0]
        if value and not _valid_ts(value):
            errors.append(Problem(102, seg, fld, f"{seg}-{fld} is not a valid timestamp"))
    referral_id = ""
    for seg, fld in REFERRAL_ID.get(kind, ()):
        referral_id = _value(fields_of(seg), fld).split(header.delimiters.repetition)[0]
        if referral_id:
            break
    if errors:
        return Triage("AE", header, tuple(errors), channel=channel, codec=codec, text=text,
                      referral_id=referral_id)
    return Triage("AA", header, channel=channel, codec=codec, text=text, referral_id=referral_id)


def _segment(body: str, name: str, field_sep: str, seg_sep: str) -> list[str] | None:
    """Fields of the first ``name`` segment (not MSH) in ``body``, or None."""
    i = body.find(seg_sep + name + field_sep)
    if i < 0:
        bare = seg_sep + name
        j = body.find(bare + seg_sep)
        return [name] if j >= 0 or body.endswith(bare) else None
    start = i + len(seg_sep)
    end = body.find(seg_sep, start)
    return body[start:end if end >= 0 else len(body)].split(field_sep)


def _value(fields: list[str] | None, fld: int) -> str:
    if fields is None or fld >= len(fields):
        return ""
    return fields[fld]


def _present(fields: list[str] | None, fld: int) -> bool:
    if fld == 0:
        return fields is not None
    value = _value(fields, fld).strip()
    return bool(value) and value != '""'


def _valid_ts(value: str) -> bool:
    m = _TS.match(value)
    if not m:
        return False
    _, month, day, hour, minute, second, _offset = m.groups()
    return ((month is None or 1 <= int(month) <= 12)
            and (day is None or 1 <= int(day) <= 31)
            and (hour is None or int(hour) <= 23)
            and (minute is None or int(minute) <= 59)
            and (second is None or int(second) <= 59))
