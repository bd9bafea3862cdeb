"""What an inbound message says about a referral, and which referral it is about (sans-I/O).

Bytes in, an :class:`Observation` out: the loop events the message carries
(:class:`~hl7referral.loop.states.Event`), the correlation keys naming its referral, the note
it brings, and, when something could not be read, the reasons. No clock, no store, no I/O:
the store looks the keys up, applies the events, or parks the message in its work queue.

Readers
-------
* :func:`read_v2`: ACK, OSU^O51 (and ORR^O02 / ORG^O20 / ORM / OMG status orders), RRI^I12,
  REF^I14, SIU^S12-S17/S26, MDM^T02/T04/T06/T08/T10; dispatched on MSH-9.
* :func:`read_consult_cda`: a C-CDA (Consultation Note, or any with ``inFulfillmentOf/order/id``).
* :func:`read_package`: an XDM package, its v2 status message(s) and C-CDA document(s) together.
* :func:`mdn_event` / :func:`read_mdn`: a Direct MDN, already matched by Message-ID in ``direct/``.

Contract with the store
-----------------------
* ``problems`` non-empty: a person must look (the work queue), with the reasons as written.
  Events are still listed when the meaning is clear and only the correlation or the document
  is doubtful (no referral id, two referral ids, a DOCTYPE), so whoever resolves the item can
  apply them; they are withheld when the meaning itself is unclear (an OSU code pair the
  partner table does not know, an ACK AE/AR, an MDM without content).
* ``problems`` empty: look the keys up, in order; one referral -> apply ``events`` (possibly
  none: an RRI "pending" says nothing new) and keep ``note``; none or several -> work queue.
* ``warnings`` are assumptions made while reading (a time without offset taken as UTC): kept
  with the events in the audit, never a reason to park.

Correlation keys (``Observation.keys``, strongest first; values are exact strings)
-----------------------------------------------------------------------------------
============================  ===============================================================
``("referral", id)``          the referral id in its stored form (:func:`ei_key`): ``ext@oid``
                              when the EI / II has an OID root, else the bare extension. From
                              ORC-2/OBR-2, SCH-26, RF1-6, TXA-14, ``inFulfillmentOf/order/id``.
``("control", msh10)``        MSA-2: the MSH-10 of the message of ours being answered.
``("message-id", "<id>")``    the Direct Message-ID of ours an MDN answers (angle brackets kept).
``("document", id)``          TXA-12 / TXA-13 / ``relatedDocument/parentDocument/id``: a note.
``("appointment", id)``       SCH-2, the filler appointment id (then SCH-1 if SCH-2 is empty).
``("placer-appointment", id)``  SCH-1.
``("filler", id)``            ORC-3 / OBR-3 / TXA-15 / SCH-27 / RF1-11: the specialist's order id.
``("placer", ext)``           the bare extension of every referral key: weaker (it may collide
                              across assigning authorities).
============================  ===============================================================

:func:`referral_keys` gives the forms under which a stored referral id is indexed so that the
first and last of these match exactly. ``appointment``, ``placer-appointment``, ``filler`` and
``document`` are *learned*: once an observation is correlated, the store may index its keys of
those kinds to the referral (namespaced ``kind:value`` in a kind-less index), so a later SIU^S15
carrying only SCH-2 finds it.

Decisions (see v2-messages.md §2-§7, ccda.md §6)
-----------------------------------------------
* OSU^O51: ORC-1/ORC-5 through an :class:`OsuTable` (:data:`DEFAULT_OSU`, per-partner
  overrides). ``SC/SC`` (SNF "Confirmation Notification", in process-scheduled) is ACCEPTED,
  not BOOKED: without an appointment id and start a booking would invent an appointment no
  later SIU could cancel or complete.
* SIU: S12/S13/S14 -> BOOKED, S15/S16/S17 -> APPOINTMENT_CANCELLED, S26 -> NO_SHOW; but on
  S12-S14 the filler status (SCH-25, else AIS-10/AIG-14/AIL-12/AIP-12) wins when it says the
  visit happened (Complete, Completed, Checked Out, Discharged, Departed, Started, Arrived,
  Checked In: real schedulers send an S14 with the new status at check-in and check-out, not a
  dedicated trigger), was cancelled (Cancelled, Deleted, Dc) or missed (Noshow, No Show).
  Start: TQ1-7, SCH-11.4, AIS-4, AIG-8, AIL-6, AIP-6, the first present.
* MDM: TXA-17 AU/LA -> CONSULT_NOTE; IP/PA/DI/DO/IN (or empty) -> INTERIM_NOTE. The note is an
  embedded C-CDA if any OBX ED holds one (its inFulfillmentOf keys are added), else the first
  ED document, else the TX/FT/ST lines. No content at all is a problem (a "closed" loop without
  the note would hide the leak).
* C-CDA: Consultation Note (template ``2.16.840.1.113883.10.20.22.1.4`` or LOINC 11488-4) ->
  CONSULT_NOTE; another document type -> INTERIM_NOTE (recorded, does not close the loop) unless
  the caller passes ``kind=`` (e.g. from the OSU ORC-5 of the same XDM package). A root under
  ``local_root`` is the engine's own stand-in for a namespace-only id, so the key is the bare
  extension, as the engine stored it. A DOCTYPE is refused (no keys, no events), never resolved.
* Times: ``at`` is the message's own time (ORC-9 / EVN-2 / MSH-7, effectiveTime), in UTC as
  ``YYYY-MM-DDTHH:MM:SSZ``; a time without offset is read in ``zone`` (default UTC) and noted.

Invariants
----------
* No function here raises on any input bytes (hypothesis-fuzzed); configuration errors
  (:meth:`OsuTable.from_config`) raise :class:`ValueError` naming the entry.
* The same bytes give the same observation (events de-duplicate in the store by their key).
* XML is parsed with :func:`~hl7referral.cda.validate.safe_parser`: no DTD, no entity
  expansion, no network.
* Keys never repeat within an observation, and each key kind keeps the order above.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from lxml import etree

from ..cda.functions import ei
from ..cda.model import Identifier
from ..cda.pipeline import referral_key
from ..cda.validate import safe_parser
from ..v2 import charset
from ..v2.header import BOM, BrokenHeader, Header, NotHL7, read_header, strip_leading
from ..v2.paths import Reader, Repetition, parse_path
from .states import Event, Kind, utc_text

DEFAULT_LOCAL_ROOT = "2.16.840.1.113883.19"   # config.engine's default cda.local_root

REFERRAL, CONTROL, MESSAGE_ID, DOCUMENT = "referral", "control", "message-id", "document"
APPOINTMENT, PLACER_APPOINTMENT, FILLER, PLACER = "appointment", "placer-appointment", "filler", "placer"
KEY_ORDER = (REFERRAL, CONTROL, MESSAGE_ID, DOCUMENT, APPOINTMENT, PLACER_APPOINTMENT, FILLER, PLACER)
LEARNED = frozenset({DOCUMENT, APPOINTMENT, PLACER_APPOINTMENT, FILLER})
_RANK = {k: i for i, k in enumerate(KEY_ORDER)}

_OID = re.compile(r"[0-2](\.\d+)+\Z")   # as cda.functions reads EI roots
_V3 = "{urn:hl7-org:v3}"
CONSULTATION_NOTE_TEMPLATE = "2.16.840.1.113883.10.20.22.1.4"
CONSULTATION_NOTE_LOINC = "11488-4"


@dataclass(frozen=True)
class Note:
    """A consult or interim note's content, as received."""

    format: str          # "cda" | "text" | "pdf" | "xml" | "html" | "rtf" | "image" | "binary"
    media_type: str      # e.g. "text/xml", "application/pdf", "text/plain"
    content: bytes
    title: str = ""
    unique_id: str = ""  # TXA-12 / ClinicalDocument id, as a key string (ext@root or root)
    parent_id: str = ""  # TXA-13: the document this one revises, as a key string
    revision: str = ""   # the MDM trigger of a revision (T04 status, T06 addendum, T08 edit, T10 replace)


@dataclass(frozen=True)
class Observation:
    message_type: str                  # "SIU^S12", "OSU^O51", "RRI^I12", "MDM^T02", "ACK", "C-CDA consult note", "MDN"
    keys: tuple[tuple[str, str], ...]  # correlation keys, strongest first (module docstring)
    events: tuple[Event, ...]
    note: Note | None = None
    problems: tuple[str, ...] = ()     # why a person must look: the work queue's reason
    warnings: tuple[str, ...] = ()     # assumptions made while reading (audit only)

    @property
    def needs_review(self) -> bool:
        return bool(self.problems)

    def values(self, kind: str) -> list[str]:
        return [v for k, v in self.keys if k == kind]

    @property
    def referral_ids(self) -> list[str]:
        return self.values(REFERRAL)


# -- referral ids ---------------------------------------------------------------------------

def ei_key(value: Repetition | str, component: str = "^", subcomponent: str = "&") -> str:
    """An EI (``889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO``) in the stored form
    (``889342@1.3.6.1.4.1.21367.2016.10.1.21.15``): the pipeline's own
    :func:`~hl7referral.cda.pipeline.referral_key` of the mapping's ``ei``, so they always agree.
    '' when there is no entity id."""
    if isinstance(value, str):
        value = [c.split(subcomponent) for c in value.split(component)] if value else []
    ident = ei(value) if value else None
    return referral_key(ident) if ident else ""


def ii_key(root: str, extension: str, local_root: str = DEFAULT_LOCAL_ROOT) -> str:
    """A CDA ``II`` as a key: ``ext@root`` for an OID root, the bare extension when the root is
    the engine's ``local_root`` (or under it: its stand-in for a namespace-only id), the root
    alone when there is no extension."""
    root, extension = (root or "").strip(), (extension or "").strip()
    if not extension:
        return root
    if not root or root == local_root or root.startswith(local_root + "."):
        return extension
    return referral_key(Identifier(root=root, extension=extension))


def referral_keys(referral_id: str) -> tuple[str, ...]:
    """The strings under which a stored referral id (``Processed.referral_id``) is indexed.

    Precedence is the order (use the index as the strength, 0 strongest):

    0. the id itself, ``ext@oid`` or ``ext``: what ``("referral", ...)`` keys carry;
    1. the bare extension (only when the id has an OID root): what ``("placer", ...)`` keys
       carry, found when a partner drops the assigning authority. Weaker: two initiators'
       order-number spaces may share an extension; a bare key naming two referrals is
       ambiguous, never a guess.

    Inbound ids are normalised to the stored form before they become keys (:func:`ei_key`,
    :func:`ii_key`), so there is no need to index EI (``ext^^oid^ISO``) or ``root|ext``
    spellings: correlation is string equality.
    """
    rid = (referral_id or "").strip()
    if not rid:
        return ()
    ext, at, root = rid.rpartition("@")
    if at and ext and _OID.match(root):
        return (rid, ext)
    return (rid,)


def _bare(key: str) -> str:
    keys = referral_keys(key)
    return keys[-1] if keys else ""


# -- times ----------------------------------------------------------------------------------

_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d{1,4})?([+-]\d{4})?\Z")


def _zone(name: str):
    try:
        return ZoneInfo(name) if name and name.upper() != "UTC" else dt.timezone.utc
    except Exception:   # an unknown or malformed zone name is configuration: read as UTC
        return dt.timezone.utc


def hl7_time(value: str, zone: str = "UTC", where: str = "") -> tuple[str, str]:
    """An HL7 TS/DTM as ``YYYY-MM-DDTHH:MM:SSZ`` and a note on any assumption (``("", reason)``
    when it is not a time). A value without offset is taken in *zone*; missing parts are zero."""
    v = (value or "").strip()
    label = f"{where} {v!r}" if where else repr(v)
    m = _TS.match(v)
    if not m:
        return "", f"{label} is not an HL7 time stamp" if v else ""
    year, month, day, hour, minute, second, offset = m.groups()
    try:
        local = dt.datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                            int(second or 0))
        if offset:
            hh, mm = int(offset[1:3]), int(offset[3:])
            if hh > 23 or mm > 59:
                return "", f"{label}: UTC offset out of range"
            sign = -1 if offset[0] == "-" else 1
            aware = local.replace(tzinfo=dt.timezone(sign * dt.timedelta(hours=hh, minutes=mm)))
        else:
            aware = local.replace(tzinfo=_zone(zone))
        utc = aware.astimezone(dt.timezone.utc)
    except (ValueError, OverflowError):
        return "", f"{label} is not a valid date/time"
    notes = []
    if not offset:
        notes.append(f"no UTC offset: taken as {zone or 'UTC'}")
    if not hour:
        notes.append("date only")
    return utc_text(utc), f"{label}: {', '.join(notes)}" if notes else ""


def iso_time(value: str | dt.datetime) -> tuple[str, str]:
    """An ISO-8601 time (or datetime) as ``YYYY-MM-DDTHH:MM:SSZ``; naive times are UTC (noted)."""
    try:
        if isinstance(value, dt.datetime):
            t = value
        else:
            t = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        note = "" if t.tzinfo else f"{value!s} has no UTC offset: taken as UTC"
        t = t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
        return utc_text(t), note
    except (ValueError, TypeError, OverflowError):
        return "", f"{value!r} is not an ISO-8601 time"


# -- OSU decoding table -----------------------------------------------------------------------

Rule = tuple[str, str, "Kind | None"]

# v2-messages.md §3. Most specific first is not required: decode() ranks exact pairs, then
# ORC-1 alone, then ORC-5 alone, then */*.
DEFAULT_RULES: tuple[Rule, ...] = (
    ("OK", "IP", Kind.ACCEPTED),              # Royal-Jay 360X: accepted
    ("OK", "*", Kind.ACCEPTED),               # table 0119 OK: order accepted & OK
    ("SC", "SC", Kind.ACCEPTED),              # SNF Confirmation Notification (no appointment id: not BOOKED)
    ("SC", "IP", Kind.ACCEPTED),              # status changed: in process
    ("UA", "CA", Kind.DECLINED),              # Royal-Jay 360X: declined
    ("UA", "*", Kind.DECLINED),               # unable to accept
    ("CA", "*", Kind.CANCEL_REQUESTED),       # the initiator's cancel request (360X sample)
    ("CR", "*", Kind.CANCEL_CONFIRMED),       # canceled as requested
    ("OC", "*", Kind.CANCEL_CONFIRMED),       # order canceled
    ("SC", "CA", Kind.CANCEL_CONFIRMED),      # status changed: canceled
    ("DC", "*", Kind.CANCEL_CONFIRMED),       # SNF Cancel/Discontinue Notification: no answer expected
    ("SC", "DC", Kind.CANCEL_CONFIRMED),      # status changed: discontinued
    ("UC", "*", Kind.CANCEL_REFUSED),         # unable to cancel
    ("*", "A", Kind.INTERIM_NOTE),            # some results available: interim consultation
    ("*", "CM", Kind.CONSULT_NOTE),           # completed: the referral outcome
)


def _split_partner(partner: str) -> tuple[str, str]:
    app, sep, fac = (partner or "").partition("^")
    if not sep:
        return "*", (app or "*")
    return app or "*", fac or "*"


def _matches(pattern: str, value: str, component: str) -> bool:
    """A partner pattern against MSH-3 or MSH-4: '*', the whole field, or any one component."""
    if pattern in ("*", ""):
        return True
    value = value.strip()
    return value == pattern or any(p.strip() == pattern for p in value.split(component) if p.strip())


@dataclass(frozen=True)
class OsuTable:
    """ORC-1 / ORC-5 pairs -> :class:`Kind` (``None``: read, no state change), for one partner.

    ``application`` / ``facility`` match MSH-3 / MSH-4 as a whole or any one component (the
    namespace id or the OID), ``"*"`` anything. With ``inherit`` the default rules apply to
    pairs the partner's own rules do not name; the partner's rules always come first.
    """

    rules: tuple[Rule, ...] = DEFAULT_RULES
    application: str = "*"
    facility: str = "*"
    inherit: bool = True

    @property
    def partner(self) -> str:
        return "default" if (self.application, self.facility) == ("*", "*") else f"{self.application}^{self.facility}"

    @classmethod
    def from_config(cls, data: dict) -> "OsuTable":
        """One ``[[loop.osu]]`` entry::

            partner = "SPECIALIST_APP^FAC"        # MSH-3 ^ MSH-4 (or application = / facility =)
            inherit = true                        # fall back to the default table
            decode = [{ orc1 = "OK", orc5 = "IP", event = "ACCEPTED" },
                      { orc1 = "SC", orc5 = "HD", event = "NONE" }]     # NONE: no state change

        ``orc1`` / ``orc5`` default to ``"*"``; ``event`` is a :class:`Kind` name.
        """
        if not isinstance(data, dict):
            raise ValueError(f"loop.osu: expected a table, got {type(data).__name__}")
        unknown = set(data) - {"partner", "application", "facility", "inherit", "decode"}
        if unknown:
            raise ValueError(f"loop.osu: unknown keys {', '.join(sorted(unknown))}")
        app, fac = _split_partner(str(data.get("partner", "")))
        app = str(data.get("application", app)).strip() or "*"
        fac = str(data.get("facility", fac)).strip() or "*"
        where = f"loop.osu (partner {app}^{fac})"
        decode = data.get("decode", [])
        if not isinstance(decode, list):
            raise ValueError(f"{where}: decode must be a list of {{orc1, orc5, event}} tables")
        rules = []
        names = ", ".join(k.name for k in Kind)
        for i, item in enumerate(decode, 1):
            if not isinstance(item, dict) or set(item) - {"orc1", "orc5", "event"} or "event" not in item:
                raise ValueError(f"{where}: decode entry {i} must be {{orc1 = .., orc5 = .., event = ..}}")
            event = str(item["event"]).strip().upper()
            if event in ("NONE", "IGNORE", ""):
                kind = None
            elif event in Kind.__members__:
                kind = Kind[event]
            else:
                raise ValueError(f"{where}: decode entry {i}: unknown event {item['event']!r} (one of {names}, NONE)")
            rules.append((str(item.get("orc1", "*")).strip().upper() or "*",
                          str(item.get("orc5", "*")).strip().upper() or "*", kind))
        inherit = data.get("inherit", True)
        if not isinstance(inherit, bool):
            raise ValueError(f"{where}: inherit must be true or false")
        return cls(tuple(rules), app, fac, inherit)

    def decode(self, orc1: str, orc5: str) -> tuple[bool, Kind | None]:
        """(found, kind) for a pair; ``(False, None)`` when no rule names it."""
        orc1, orc5 = orc1.strip().upper(), orc5.strip().upper()
        tables = [self.rules] + ([DEFAULT_RULES] if self.inherit and self.rules is not DEFAULT_RULES else [])
        for rules in tables:
            for want1, want5 in ((orc1, orc5), (orc1, "*"), ("*", orc5), ("*", "*")):
                for r1, r5, kind in rules:
                    if r1 == want1 and r5 == want5:
                        return True, kind
        return False, None

    def specificity(self, msh3: str, msh4: str, component: str = "^") -> int:
        """-1 if this table is not for the sender, else how specific the match is (higher wins)."""
        if not (_matches(self.application, msh3, component) and _matches(self.facility, msh4, component)):
            return -1
        return (2 if self.facility != "*" else 0) + (1 if self.application != "*" else 0)


DEFAULT_OSU = OsuTable()


def load_tables(entries: Iterable[dict]) -> tuple[OsuTable, ...]:
    """The ``[[loop.osu]]`` entries as partner tables (:meth:`OsuTable.from_config`); ValueError
    names the entry (``loop.osu[2]: ...``)."""
    tables = []
    for i, entry in enumerate(entries or (), 1):
        try:
            tables.append(OsuTable.from_config(entry))
        except ValueError as exc:
            raise ValueError(f"loop.osu[{i}]: {exc}") from None
    return tuple(tables)


def table_for(sending_application: str, sending_facility: str, tables: Iterable[OsuTable],
              component: str = "^") -> OsuTable:
    """The partner table for a sender (MSH-3, MSH-4): the most specific match (application and
    facility, then facility, then application), the first one on a tie; else :data:`DEFAULT_OSU`."""
    best, score = DEFAULT_OSU, -1
    for table in tables:
        s = table.specificity(sending_application, sending_facility, component)
        if s > score:
            best, score = table, s
    return best


# -- the v2 reader ----------------------------------------------------------------------------

class _Out:
    """Collects an observation while a reader walks the message."""

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type
        self.keys: list[tuple[str, str]] = []
        self.events: list[Event] = []
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.note: Note | None = None
        self.withhold = False   # the meaning is unclear: list no event

    def key(self, kind: str, value: str) -> None:
        value = (value or "").strip()
        if value and (kind, value) not in self.keys:
            self.keys.append((kind, value))

    def referral(self, key: str) -> None:
        if key:
            self.key(REFERRAL, key)

    def referral_ids(self) -> list[str]:
        return [v for k, v in self.keys if k == REFERRAL]

    def event(self, event: Event) -> None:
        if event not in self.events:
            self.events.append(event)

    def build(self) -> Observation:
        bare = {_bare(v) for k, v in self.keys if k == REFERRAL}
        if len(bare) > 1:
            self.problems.append(f"{self.message_type}: names more than one referral: "
                                 + ", ".join(v for k, v in self.keys if k == REFERRAL))
        keys = [(k, v) for k, v in self.keys]
        for k, v in self.keys:
            if k == REFERRAL and _bare(v) != v and (PLACER, _bare(v)) not in keys:
                keys.append((PLACER, _bare(v)))
        keys.sort(key=lambda kv: _RANK.get(kv[0], len(_RANK)))
        return Observation(self.message_type, tuple(keys), () if self.withhold else tuple(self.events), self.note,
                           tuple(dict.fromkeys(self.problems)), tuple(dict.fromkeys(w for w in self.warnings if w)))


_SEGMENT_PATHS: dict = {}


class _Message:
    """One v2 message's fields, read with the project's path reader (tolerant, never raising)."""

    def __init__(self, header: Header, reader: Reader) -> None:
        self.header = header
        self.reader = reader
        self.component = reader.component
        self.subcomponent = reader.subcomponent
        self.repetition = reader.repetition
        self._segments: dict[str, list] = {}   # a reader asks for the same few segments many times

    def all(self, name: str) -> list:
        found = self._segments.get(name)
        if found is None:
            path = _SEGMENT_PATHS.get(name)
            if path is None:
                path = _SEGMENT_PATHS[name] = parse_path(f"{name}(*)")
            found = self._segments[name] = self.reader.segments(path)
        return found

    def first(self, name: str):
        found = self.all(name)
        return found[0] if found else None

    def reps(self, segment, n: int) -> list[Repetition]:
        if segment is None:
            return []
        return self.reader.repetitions(segment, n)

    def rep(self, segment, n: int) -> Repetition:
        reps = self.reps(segment, n)
        return reps[0] if reps else []

    def get(self, segment, n: int, comp: int = 1, sub: int = 1) -> str:
        rep = self.rep(segment, n)
        if comp > len(rep) or sub > len(rep[comp - 1]):
            return ""
        return rep[comp - 1][sub - 1].strip()

    def text(self, rep: Repetition) -> str:
        return self.component.join(self.subcomponent.join(subs) for subs in rep)

    def ei(self, segment, n: int) -> str:
        return ei_key(self.rep(segment, n))

    def eis(self, segment, n: int) -> list[str]:
        return [k for k in (ei_key(r) for r in self.reps(segment, n)) if k]


def _decode_text(raw: bytes, header: Header, codec: str, out: _Out) -> str | None:
    try:
        name = charset.codec_for(header.charset, codec)
    except charset.UnknownCharset:
        out.warnings.append(f"MSH-18 {header.charset!r} is not a known character set: read as {codec}")
        name = codec
    data = strip_leading(raw.removeprefix(BOM))
    try:
        return charset.decode(data, name)
    except charset.CharsetMismatch as exc:
        out.warnings.append(f"{exc}: unreadable characters replaced")
    except LookupError:
        out.warnings.append(f"codec {name!r} unknown: read as latin-1")
        name = "latin-1"
    try:
        return data.decode(name, errors="replace")
    except LookupError:
        return data.decode("latin-1")


def read_v2(raw: bytes, codec: str = "ascii", osu_table: OsuTable | Sequence[OsuTable] = DEFAULT_OSU, *,
            tables: Sequence[OsuTable] | None = None, zone: str = "UTC", received: str = "",
            local_root: str = DEFAULT_LOCAL_ROOT) -> Observation:
    """Read one HL7 v2 message (see the module docstring). Never raises.

    *codec* is used when MSH-18 is empty; *osu_table* is one table or the partner tables
    (picked by :func:`table_for` on MSH-3/MSH-4), *tables* the same as a keyword (the
    :func:`load_tables` of ``[[loop.osu]]``); *zone* reads times without offset;
    *received* (ISO-8601 UTC) stands in for a missing or unreadable message time;
    *local_root* is the engine's ``cda.local_root`` (for an embedded C-CDA).
    """
    try:
        return _read_v2(raw, codec, osu_table if tables is None else tables, zone, received, local_root)
    except Exception as exc:  # a bug, not the sender's fault: still never lose the message
        return Observation("unknown", (), (), problems=(f"internal error while reading: {type(exc).__name__}",))


def _read_v2(raw, codec, osu_table, zone, received, local_root) -> Observation:
    if not isinstance(raw, (bytes, bytearray)):
        return Observation("unknown", (), (), problems=("not bytes",))
    raw = bytes(raw)
    try:
        header = read_header(raw)
    except NotHL7 as exc:
        return Observation("unknown", (), (), problems=(f"not an HL7 v2 message: {exc}",))
    except BrokenHeader as exc:
        return Observation("unknown", (), (), problems=(f"MSH unreadable: {exc}",))
    mtype, trigger = header.message_type.upper(), header.trigger_event.upper()
    label = f"{mtype}^{trigger}" if trigger else (mtype or "unknown")
    out = _Out(label)
    text = _decode_text(raw, header, codec, out)
    try:
        m = _Message(header, Reader._from_text_read(text, header))
    except (NotHL7, BrokenHeader) as exc:   # delimiters that do not survive the declared charset
        out.problems.append(f"{label}: MSH unreadable in its character set: {exc}")
        return out.build()
    control = header.control_id.strip()
    source = f"{label} MSH-10={control}" if control else f"{label} MSH-7={header.field(7).strip()}"
    if not control:
        out.warnings.append(f"{label}: MSH-10 is empty")
    table = osu_table if isinstance(osu_table, OsuTable) else table_for(
        header.sending_application, header.sending_facility, osu_table or (), header.delimiters.component)
    ctx = _Ctx(m, out, source, zone, received, local_root)
    reader = _READERS.get(mtype)
    if reader is None:
        out.problems.append(f"MSH-9 {label}: not a message the referral loop reads (ACK, OSU, ORR, ORG, RRI, REF^I14, "
                            "SIU, MDM)")
        return out.build()
    reader(ctx, trigger, table)
    _authorization(ctx, mtype)
    if not out.keys:
        out.problems.append(f"{label}: no referral id, order number or control id to correlate it with")
    return out.build()


@dataclass
class _Ctx:
    m: _Message
    out: _Out
    source: str
    zone: str
    received: str
    local_root: str

    def time(self, value: str, where: str) -> str:
        iso, note = hl7_time(value, self.zone, where)
        if note:
            self.out.warnings.append(note)
        return iso

    def at(self, *candidates: tuple[object, int, int, str]) -> str:
        """The event time: the first readable of (segment, field, component, label), then MSH-7, then received."""
        for seg, n, comp, where in candidates:
            value = self.m.get(seg, n, comp) if seg is not None else ""
            if value:
                iso = self.time(value, where)
                if iso:
                    return iso
        msh7 = self.m.header.component(7, 1).strip()
        if msh7:
            iso = self.time(msh7, "MSH-7")
            if iso:
                return iso
        if self.received:
            iso, _ = iso_time(self.received)
            if iso:
                self.out.warnings.append(f"{self.out.message_type}: no message time: the receipt time is used")
                return iso
        self.out.problems.append(f"{self.out.message_type}: MSH-7 empty or unreadable: no event time")
        return ""

    def control_key(self) -> None:
        msa = self.m.first("MSA")
        if msa is not None:
            self.out.key(CONTROL, self.m.get(msa, 2))

    def order_keys(self, orc=None) -> None:
        """ORC-2 / OBR-2 (referral), ORC-3 / OBR-3 (filler) of one ORC, or of every ORC and OBR."""
        m = self.m
        orcs = [orc] if orc is not None else m.all("ORC")
        for seg in orcs + (m.all("OBR") if orc is None else []):
            self.out.referral(m.ei(seg, 2))
            self.out.key(FILLER, m.ei(seg, 3))


# -- ACK ---------------------------------------------------------------------------------------

_ACK_MEANING = {"AA": "application accept", "CA": "commit accept", "AE": "application error",
                "AR": "application reject", "CE": "commit error", "CR": "commit reject"}


def _error_text(c: _Ctx) -> str:
    m = c.m
    parts = []
    msa = m.first("MSA")
    if m.get(msa, 3):
        parts.append(m.text(m.rep(msa, 3)).strip())
    for err in m.all("ERR"):
        code = m.rep(err, 3)
        detail = " ".join(x for x in (m.text(code[:2]).strip(m.component) if code else "", m.get(err, 8)) if x)
        if not detail:
            detail = m.text(m.rep(err, 1)).strip(m.component + m.subcomponent)
        if detail:
            parts.append(f"ERR {detail}")
    return "; ".join(parts)


def _ack(c: _Ctx, trigger: str, table: OsuTable) -> None:
    m, out = c.m, c.out
    out.message_type = "ACK"
    msa = m.first("MSA")
    if msa is None:
        out.problems.append("ACK: no MSA segment")
        return
    code, ctrl = m.get(msa, 1).upper(), m.get(msa, 2)
    out.key(CONTROL, ctrl)
    if not ctrl:
        out.problems.append("ACK: MSA-2 is empty: which message of ours it answers is unknown")
    if code in ("AA", "CA"):
        out.event(Event(Kind.DELIVERED, c.at(), source=f"{c.source} MSA-1={code} MSA-2={ctrl}"))
    elif code in _ACK_MEANING:
        detail = _error_text(c)
        out.problems.append(f"ACK: MSA-1={code} ({_ACK_MEANING[code]}) for our message {ctrl or '(MSA-2 empty)'}"
                            + (f": {detail}" if detail else ""))
    else:
        out.problems.append(f"ACK: MSA-1={code or '(empty)'} is not an acknowledgment code (table 0008)")


# -- OSU^O51 and other order status messages ---------------------------------------------------------

def _orders(c: _Ctx, trigger: str, table: OsuTable) -> None:
    m, out = c.m, c.out
    orcs = m.all("ORC")
    c.control_key()
    c.order_keys()
    msa = m.first("MSA")
    if msa is not None:   # ORR^O02 / ORG^O20: the application ack of our order
        code = m.get(msa, 1).upper()
        if code in ("AA", "CA"):
            out.event(Event(Kind.DELIVERED, c.at(), source=f"{c.source} MSA-1={code}"))
        elif code:
            out.problems.append(f"{out.message_type}: MSA-1={code} ({_ACK_MEANING.get(code, 'unknown code')})"
                                + (f": {_error_text(c)}" if _error_text(c) else ""))
    if not orcs:
        out.problems.append(f"{out.message_type}: no ORC segment: no order status")
        return
    for i, orc in enumerate(orcs, 1):
        orc1, orc5 = m.get(orc, 1).upper(), m.get(orc, 5).upper()
        where = f"ORC({i})" if len(orcs) > 1 else "ORC"
        if not m.ei(orc, 2) and not m.get(orc, 2):
            out.warnings.append(f"{out.message_type}: {where}-2 (placer order number = referral id) is empty")
        if orc1 == "NW" and out.message_type.split("^")[0] in ("ORM", "OMG"):
            out.problems.append(f"{out.message_type}: {where}-1=NW is a new referral (the referral pipeline), "
                                "not news about one")
            out.withhold = True
            continue
        found, kind = table.decode(orc1, orc5)
        pair = f"ORC-1={orc1 or '(empty)'} ORC-5={orc5 or '(empty)'}"
        if not found:
            out.problems.append(f"{out.message_type}: {where} {pair} is not in the OSU decoding table "
                                f"({table.partner})")
            out.withhold = True
        elif kind is None:
            out.warnings.append(f"{out.message_type}: {where} {pair}: no state change ({table.partner} table)")
        else:
            at = c.at((orc, 9, 1, f"{where}-9"))
            # Why (a decline, a cancel): ORC-16's text, else its code, kept with the event for the
            # coordinator who reads the timeline.
            why = (m.get(orc, 16, 2) or m.get(orc, 16, 1)).strip() if kind in _REASONED else ""
            out.event(Event(kind, at, source=f"{c.source} {orc1 or '-'}/{orc5 or '-'}"
                            + (f": {why[:200]}" if why else "")))


_REASONED = (Kind.DECLINED, Kind.CANCEL_REQUESTED, Kind.CANCEL_CONFIRMED, Kind.CANCEL_REFUSED)


# -- RRI^I12 / REF^I14 -------------------------------------------------------------------------

_RF1_STATUS = {"A": Kind.ACCEPTED, "R": Kind.DECLINED}


def _rri(c: _Ctx, trigger: str, table: OsuTable) -> None:
    m, out = c.m, c.out
    rf1 = m.first("RF1")
    c.control_key()
    if rf1 is not None:
        out.referral(m.ei(rf1, 6))
        for k in m.eis(rf1, 11):
            out.key(FILLER, k)
    msa = m.first("MSA")
    code = m.get(msa, 1).upper()
    if code in ("AA", "CA"):
        out.event(Event(Kind.DELIVERED, c.at(), source=f"{c.source} MSA-1={code}"))
    elif code:
        out.problems.append(f"{out.message_type}: MSA-1={code} ({_ACK_MEANING.get(code, 'unknown code')}) "
                            f"for our message {m.get(msa, 2) or '(MSA-2 empty)'}"
                            + (f": {_error_text(c)}" if _error_text(c) else ""))
        out.withhold = True
    if rf1 is None:
        out.problems.append(f"{out.message_type}: no RF1 segment: no referral status")
        return
    if not m.get(rf1, 6):
        out.warnings.append(f"{out.message_type}: RF1-6 (originating referral id) is empty")
    status = m.get(rf1, 1).upper()
    if status in _RF1_STATUS:
        out.event(Event(_RF1_STATUS[status], c.at(), source=f"{c.source} RF1-1={status}"))
    elif status == "P":
        out.warnings.append(f"{out.message_type}: RF1-1=P (pending): no decision yet")
    elif status == "E":
        out.problems.append(f"{out.message_type}: RF1-1=E: the recipient reports the referral expired")
    else:
        out.problems.append(f"{out.message_type}: RF1-1={status or '(empty)'}: not a referral status "
                            "(table 0283: A, R, P, E)")


def _ref(c: _Ctx, trigger: str, table: OsuTable) -> None:
    m, out = c.m, c.out
    rf1 = m.first("RF1")
    out.referral(m.ei(rf1, 6))
    if trigger != "I14":
        out.problems.append(f"{out.message_type}: only REF^I14 (cancel) is news about a referral; "
                            "REF^I12/I13 go to the referral pipeline")
        out.withhold = True
        return
    out.event(Event(Kind.CANCEL_REQUESTED, c.at(), source=c.source))
    if rf1 is None or not m.get(rf1, 6):
        out.warnings.append(f"{out.message_type}: RF1-6 (originating referral id) is empty")


# -- SIU --------------------------------------------------------------------------------------

_STATUS_NOISE = re.compile(r"[\s_\-]")


def _norm(status: str) -> str:
    return _STATUS_NOISE.sub("", status).lower()


_VISIT_DONE = {"complete", "completed", "checkedout", "checkout", "discharged", "departed", "started", "arrived",
               "checkedin", "inprogress", "seen", "fulfilled"}
_CANCELLED = {"cancelled", "canceled", "deleted", "dc", "discontinued"}
_NO_SHOW = {"noshow", "ns", "didnotattend", "dna"}
_SIU_TRIGGERS = {"S12": Kind.BOOKED, "S13": Kind.BOOKED, "S14": Kind.BOOKED, "S15": Kind.APPOINTMENT_CANCELLED,
                 "S16": Kind.APPOINTMENT_CANCELLED, "S17": Kind.APPOINTMENT_CANCELLED, "S26": Kind.NO_SHOW}
# (segment, start field, filler status field)
_RESOURCES = (("AIS", 4, 10), ("AIG", 8, 14), ("AIL", 6, 12), ("AIP", 6, 12))


def _keyed_by(c: _Ctx, segment: str, referral_field: int):
    """The segment that names the referral (SCH-26, TXA-14), its keys recorded; None (the message
    withheld, the problem said) when the message has none."""
    seg = c.m.first(segment)
    if seg is None:
        c.out.problems.append(f"{c.out.message_type}: no {segment} segment")
        c.out.withhold = True
        return None
    c.out.referral(c.m.ei(seg, referral_field))
    c.order_keys()
    c.control_key()
    return seg


def _siu(c: _Ctx, trigger: str, table: OsuTable) -> None:
    m, out = c.m, c.out
    sch = _keyed_by(c, "SCH", 26)
    if sch is None:
        return
    appointment = m.ei(sch, 2)
    placer_appointment = m.ei(sch, 1)
    out.key(APPOINTMENT, appointment or placer_appointment)
    out.key(PLACER_APPOINTMENT, placer_appointment)
    out.key(FILLER, m.ei(sch, 27))
    if not out.referral_ids():
        out.warnings.append(f"{out.message_type}: SCH-26 (placer order number) empty and no ORC-2: "
                            "no referral id, only appointment ids")
    if not (appointment or placer_appointment):
        out.warnings.append(f"{out.message_type}: SCH-2 and SCH-1 empty: no appointment id")
    kind = _SIU_TRIGGERS.get(trigger)
    if kind is None:
        out.warnings.append(f"{out.message_type}: a resource or block change, not news about the appointment")
        return
    starts = ""
    candidates = [(m.first("TQ1"), 7, 1, 1, "TQ1-7"), (sch, 11, 4, 1, "SCH-11.4")]
    candidates += [(m.first(name), n, 1, 1, f"{name}-{n}") for name, n, _ in _RESOURCES]
    for seg, n, comp, sub, where in candidates:
        value = m.get(seg, n, comp, sub)
        if value:
            starts = c.time(value, where)
            if starts:
                break
    status = m.get(sch, 25) or m.get(sch, 25, 2)
    where = "SCH-25"
    if not status:
        for name, _, n in _RESOURCES:
            status = m.get(m.first(name), n)
            if status:
                where = f"{name}-{n}"
                break
    norm = _norm(status)
    if kind == Kind.BOOKED and norm:
        if norm in _VISIT_DONE:
            kind = Kind.VISIT_DONE
        elif norm in _CANCELLED:
            kind = Kind.APPOINTMENT_CANCELLED
        elif norm in _NO_SHOW:
            kind = Kind.NO_SHOW
    detail = f" {where}={status}" if status else ""
    out.event(Event(kind, c.at((m.first("EVN"), 2, 1, "EVN-2")), appointment=appointment or placer_appointment,
                    starts=starts, source=f"{c.source}{detail}"))


# -- MDM ---------------------------------------------------------------------------------------

_FINAL = {"AU", "LA"}
_PRELIMINARY = {"IP", "PA", "DI", "DO", "IN", ""}
_WITH_CONTENT = {"T02", "T04", "T06", "T08", "T10"}
_TEXT_TYPES = {"TX", "FT", "ST", "TEXT", "CF"}
_MEDIA_TOP = {"AP": "application", "APPLICATION": "application", "TEXT": "text", "TX": "text", "FT": "text",
              "IM": "image", "IMAGE": "image", "SI": "image", "NS": "image", "SD": "application",
              "AU": "audio", "AUDIO": "audio", "VIDEO": "video", "MULTIPART": "multipart"}


def _media(type_: str, subtype: str, content: bytes) -> tuple[str, str]:
    """(format, media type) of an ED document: what the content is, else what the sender declared."""
    top = _MEDIA_TOP.get(type_.strip().upper(), type_.strip().lower())
    sub = subtype.strip().lower()
    head = content.lstrip(b"\xef\xbb\xbf \t\r\n")[:1024]
    declared = f"{top}/{sub}" if top and sub else ""
    if head.startswith(b"%PDF-"):
        return "pdf", "application/pdf"
    # A CDA, or what claims to be one (a broken or DOCTYPE-bearing one is refused by the CDA reader).
    if head.startswith(b"<") and (b"ClinicalDocument" in content[:8192]
                                  or _root_tag(content) == f"{_V3}ClinicalDocument"):
        return "cda", declared if declared.endswith("xml") else "text/xml"
    if head.startswith(b"{\\rtf"):
        return "rtf", "application/rtf"
    if sub in ("pdf", "xml", "html", "rtf"):
        return sub, declared
    if top == "image" or sub in ("jpeg", "jpg", "png", "tiff", "gif"):
        return "image", declared or "application/octet-stream"
    if top == "text" or sub == "plain":
        return "text", declared or "text/plain"
    return sub or "binary", declared or "application/octet-stream"


def _root_tag(content: bytes) -> str:
    try:
        return etree.fromstring(content, safe_parser()).tag
    except (etree.XMLSyntaxError, ValueError):
        return ""


def _ed_content(m: _Message, rep: Repetition, where: str, out: _Out) -> bytes | None:
    def comp(n):
        return rep[n - 1][0].strip() if n <= len(rep) and rep[n - 1] else ""
    data = m.subcomponent.join(rep[4]) if len(rep) >= 5 else ""
    encoding = comp(4).upper()
    if not data.strip():
        return None
    try:
        if encoding in ("BASE64", "B64"):
            return base64.b64decode(re.sub(r"\s+", "", data), validate=False)
        if encoding == "HEX":
            return bytes.fromhex(data.strip())
        return data.replace("\r", "\n").encode("utf-8")
    except (binascii.Error, ValueError):
        out.problems.append(f"{out.message_type}: {where} (ED) data is not valid {encoding.lower() or 'text'}")
        return None


def _mdm(c: _Ctx, trigger: str, table: OsuTable) -> None:
    m, out = c.m, c.out
    txa = _keyed_by(c, "TXA", 14)
    if txa is None:
        return
    document_id = m.ei(txa, 12)
    out.key(DOCUMENT, document_id)
    for k in m.eis(txa, 13):
        out.key(DOCUMENT, k)
    for k in m.eis(txa, 15):
        out.key(FILLER, k)
    if not out.referral_ids():
        out.warnings.append(f"{out.message_type}: TXA-14 (placer order number) empty and no ORC-2/OBR-2")
    if trigger not in _WITH_CONTENT:
        out.problems.append(f"{out.message_type}: a notification without the document's content"
                            + (" (document cancelled)" if trigger == "T11" else ""))
        out.withhold = True
        return
    availability = m.get(txa, 19).upper()
    if availability == "CA":
        out.problems.append(f"{out.message_type}: TXA-19=CA: the sender cancelled this document")
        out.withhold = True
    status = m.get(txa, 17).upper()
    if status in _FINAL:
        kind = Kind.CONSULT_NOTE
    else:
        kind = Kind.INTERIM_NOTE
        if status not in _PRELIMINARY:
            out.warnings.append(f"{out.message_type}: TXA-17={status} (not in table 0271): read as preliminary")
        elif not status:
            out.warnings.append(f"{out.message_type}: TXA-17 (completion status) empty: read as preliminary")

    title = m.get(txa, 2, 2) or m.get(txa, 2)
    parent_id = next(iter(m.eis(txa, 13)), "")
    revision = "" if trigger == "T02" else trigger
    lines: list[str] = []
    documents: list[tuple[str, str, bytes, str]] = []   # format, media type, content, OBX-3 text
    for i, obx in enumerate(m.all("OBX"), 1):
        vtype = m.get(obx, 2).upper()
        where = f"OBX({i})-5"
        if vtype in _TEXT_TYPES:
            for rep in m.reps(obx, 5):
                lines.append(m.text(rep).replace("\r\n", "\n").replace("\r", "\n"))
        elif vtype == "ED":
            rep = m.rep(obx, 5)
            content = _ed_content(m, rep, where, out)
            if content is None:
                continue
            type_ = rep[1][0] if len(rep) > 1 and rep[1] else ""
            subtype = rep[2][0] if len(rep) > 2 and rep[2] else ""
            fmt, media = _media(type_, subtype, content)
            documents.append((fmt, media, content, m.get(obx, 3, 2)))
        elif vtype == "RP":
            out.warnings.append(f"{out.message_type}: {where} is a reference pointer (RP), not content: not fetched")

    note = None
    cda = next((d for d in documents if d[0] == "cda"), None)
    chosen = cda or (documents[0] if documents else None)
    if chosen is not None:
        fmt, media, content, obx_title = chosen
        note_title = title or obx_title
        if cda is not None:
            facts = _read_cda(content, c.local_root, c.zone)
            for k, v in facts.keys:
                out.key(k, v)
            out.problems += [f"{out.message_type}: embedded C-CDA: {p}" for p in facts.problems
                             if not p.startswith("no inFulfillmentOf")]
            out.warnings += [f"{out.message_type}: embedded C-CDA: {w}" for w in facts.warnings]
            if facts.refused:
                out.withhold = True
            note_title = facts.title or note_title
        note = Note(fmt, media, content, note_title, document_id, parent_id, revision)
    elif any(line.strip() for line in lines):
        note = Note("text", "text/plain", "\n".join(lines).encode("utf-8"), title, document_id, parent_id, revision)
    if note is None:
        out.problems.append(f"{out.message_type}: no document content (no OBX-5 text and no ED data)")
        out.withhold = True
        return
    out.note = note
    at = c.at((m.first("EVN"), 2, 1, "EVN-2"), (txa, 22, 15, "TXA-22.15"), (txa, 6, 1, "TXA-6"),
              (txa, 4, 1, "TXA-4"))
    out.event(Event(kind, at, source=f"{c.source} TXA-17={status or '-'}"))


def _authorization(c: _Ctx, mtype: str) -> None:
    """An AUT segment with an authorization identifier (AUT-6) in an answer is the payer's approval:
    it releases a referral held in AUTH_PENDING (issue 6 point 4)."""
    if mtype not in ("RRI", "REF", "OSU", "ORR", "ORG"):
        return
    for aut in c.m.all("AUT"):
        number = c.m.get(aut, 6)
        if number:
            c.out.event(Event(Kind.AUTH_APPROVED, c.at(), source=f"{c.source} AUT-6={number}"))
            return


_READERS = {"ACK": _ack, "OSU": _orders, "ORR": _orders, "ORG": _orders, "ORM": _orders, "OMG": _orders,
            "RRI": _rri, "REF": _ref, "SIU": _siu, "MDM": _mdm}


# -- C-CDA -------------------------------------------------------------------------------------

# CDA relatedDocument/@typeCode -> the MDM revision the referring chart is sent (RPLC replaces, APND adds).
_RELATED = {"RPLC": "T10", "APND": "T06"}


@dataclass
class _CdaFacts:
    keys: list[tuple[str, str]] = field(default_factory=list)
    consult: bool = False
    code: str = ""
    title: str = ""
    document_id: str = ""
    parent_id: str = ""   # relatedDocument/parentDocument/id of a replacement or an addendum
    revision: str = ""    # as the MDM trigger the chart understands: T10 (RPLC) or T06 (APND)
    effective: str = ""
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refused: bool = False


def _read_cda(xml: bytes, local_root: str, zone: str) -> _CdaFacts:
    f = _CdaFacts()
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    if not isinstance(xml, (bytes, bytearray)) or not bytes(xml).strip():
        f.problems.append("empty document")
        f.refused = True
        return f
    try:
        root = etree.fromstring(bytes(xml), safe_parser())
    except (etree.XMLSyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        f.problems.append("not well-formed XML" + (f" (line {line})" if line else ""))
        f.refused = True
        return f
    info = root.getroottree().docinfo
    if info.doctype or info.internalDTD is not None or info.externalDTD is not None:
        f.problems.append("declares a DOCTYPE: refused (DTDs and entities are never resolved in CDA)")
        f.refused = True
        return f
    if root.tag != f"{_V3}ClinicalDocument":
        f.problems.append(f"not a CDA document (root element {root.tag!r})")
        f.refused = True
        return f
    for ident in root.iterfind(f"{_V3}inFulfillmentOf/{_V3}order/{_V3}id"):
        key = ii_key(ident.get("root", ""), ident.get("extension", ""), local_root)
        if key and (REFERRAL, key) not in f.keys:
            f.keys.append((REFERRAL, key))
    for related in root.iterfind(f"{_V3}relatedDocument"):
        for ident in related.iterfind(f"{_V3}parentDocument/{_V3}id"):
            key = ii_key(ident.get("root", ""), ident.get("extension", ""), "\0")
            if key and (DOCUMENT, key) not in f.keys:
                f.keys.append((DOCUMENT, key))
            # A replacement or an addendum of an earlier document (a transform, XFRM, is the same
            # content in another form: not a revision the chart must see as one).
            revision = _RELATED.get(related.get("typeCode", "").upper(), "")
            if key and revision and not f.revision:
                f.parent_id, f.revision = key, revision
    if not any(k == REFERRAL for k, _ in f.keys):
        f.problems.append("no inFulfillmentOf/order/id: the document names no referral")
    templates = {t.get("root", "") for t in root.iterfind(f"{_V3}templateId")}
    code = root.find(f"{_V3}code")
    f.code = (code.get("code", "") if code is not None else "").strip()
    f.consult = CONSULTATION_NOTE_TEMPLATE in templates or f.code == CONSULTATION_NOTE_LOINC
    title = root.find(f"{_V3}title")
    f.title = " ".join("".join(t for t in title.itertext() if isinstance(t, str)).split()) if title is not None else ""
    doc_id = root.find(f"{_V3}id")
    if doc_id is not None:
        f.document_id = ii_key(doc_id.get("root", ""), doc_id.get("extension", ""), "\0")
    eff = root.find(f"{_V3}effectiveTime")
    value = eff.get("value", "") if eff is not None else ""
    if value:
        f.effective, note = hl7_time(value, zone, "effectiveTime")
        if note:
            (f.warnings if f.effective else f.problems).append(note)
    return f


def read_consult_cda(xml: bytes, *, kind: Kind | None = None, local_root: str = DEFAULT_LOCAL_ROOT,
                     zone: str = "UTC", received: str = "") -> Observation:
    """Read a C-CDA (over Direct, or from an XDM package): keys from every
    ``inFulfillmentOf/order/id``, a CONSULT_NOTE (Consultation Note) or INTERIM_NOTE (other
    types) event at its ``effectiveTime``, and the document as the note. *kind* overrides the
    event kind (the v2 status message of the same package knows interim from outcome).
    Never raises; a DOCTYPE, malformed XML or a non-CDA root give no keys and no event."""
    try:
        f = _read_cda(xml, local_root, zone)
    except Exception as exc:
        return Observation("C-CDA", (), (), problems=(f"internal error while reading: {type(exc).__name__}",))
    label = "C-CDA consult note"
    problems = [f"C-CDA: {p}" for p in f.problems]
    warnings = [f"C-CDA: {w}" for w in f.warnings]
    if f.refused:
        return Observation(label, (), (), problems=tuple(problems))
    at = f.effective
    if not at and received:
        at, _ = iso_time(received)
        warnings.append("C-CDA: no effectiveTime: the receipt time is used")
    if not at:
        problems.append("C-CDA: no effectiveTime: no event time")
    if kind is None:
        kind = Kind.CONSULT_NOTE if f.consult else Kind.INTERIM_NOTE
        if not f.consult:
            warnings.append(f"C-CDA: not a Consultation Note (code {f.code or 'none'}): recorded as an interim note")
    keys = list(f.keys)
    for k, v in f.keys:
        if k == REFERRAL and _bare(v) != v and (PLACER, _bare(v)) not in keys:
            keys.append((PLACER, _bare(v)))
    if len({_bare(v) for k, v in f.keys if k == REFERRAL}) > 1:
        problems.append("C-CDA: names more than one referral: " + ", ".join(v for k, v in f.keys if k == REFERRAL))
    keys.sort(key=lambda kv: _RANK.get(kv[0], len(_RANK)))
    source = f"C-CDA {'Consultation Note' if f.consult else 'document'} id={f.document_id or '-'}"
    note = Note("cda", "text/xml", bytes(xml) if not isinstance(xml, str) else xml.encode("utf-8"), f.title,
                f.document_id, f.parent_id, f.revision)
    return Observation(label, tuple(keys), (Event(kind, at, source=source),), note, tuple(problems), tuple(warnings))


def read_package(messages: Sequence[bytes], documents: Sequence[bytes], *, codec: str = "ascii",
                 osu_table: OsuTable | Sequence[OsuTable] = DEFAULT_OSU, zone: str = "UTC", received: str = "",
                 local_root: str = DEFAULT_LOCAL_ROOT) -> Observation:
    """One 360X XDM package (or Direct message): its v2 messages and C-CDA documents as one observation.

    The v2 status message knows interim from outcome (OSU ORC-5 A / CM, MDM TXA-17), the
    document does not: when the messages carry a note event, the documents are read with that
    kind and add no event of their own; otherwise each document brings its own. Keys, problems
    and warnings are the union (in order); the note is the first document's. Never raises.
    """
    parts = [read_v2(m, codec, osu_table, zone=zone, received=received, local_root=local_root)
             for m in messages]
    note_kinds = [e.kind for o in parts for e in o.events if e.kind in (Kind.INTERIM_NOTE, Kind.CONSULT_NOTE)]
    kind = (Kind.CONSULT_NOTE if Kind.CONSULT_NOTE in note_kinds else note_kinds[0]) if note_kinds else None
    docs = [read_consult_cda(d, kind=kind, local_root=local_root, zone=zone, received=received) for d in documents]
    out = _Out(" + ".join([o.message_type for o in parts] + [d.message_type for d in docs]) or "empty package")
    for o, own_events in [(o, True) for o in parts] + [(d, kind is None) for d in docs]:
        for k, v in o.keys:
            out.key(k, v)
        for e in o.events if own_events else ():
            out.event(e)
        out.problems += list(o.problems)
        out.warnings += list(o.warnings)
    out.note = next((o.note for o in docs + parts if o.note is not None), None)
    if not parts and not docs:
        out.problems.append("empty package: no v2 message and no document")
    return out.build()


# -- Direct MDN ----------------------------------------------------------------------------------

_MDN_DELIVERED = {"processed", "dispatched", "displayed"}


def message_id_key(message_id: str) -> str:
    """A Message-ID as the ``("message-id", ...)`` key: stripped, in angle brackets."""
    mid = (message_id or "").strip()
    if mid and not mid.startswith("<"):
        mid = f"<{mid}>"
    return mid


def mdn_event(original_message_id: str, disposition: str, at: str | dt.datetime, failure: str = "") -> Observation:
    """A Direct MDN (already parsed and correlated by Message-ID in ``direct/``) as an observation:
    processed / dispatched (/ displayed) -> DELIVERED; failed, denied, deleted, or any failure
    text -> no event, a problem. Never raises."""
    mid = message_id_key(str(original_message_id or ""))
    disp = str(disposition or "").strip().lower()
    keys = ((MESSAGE_ID, mid),) if mid else ()
    problems, warnings = [], []
    if not mid:
        problems.append("MDN: no Original-Message-ID")
    when, note = iso_time(at)
    if note:
        (warnings if when else problems).append(f"MDN: {note}")
    events: tuple[Event, ...] = ()
    if failure or disp not in _MDN_DELIVERED:
        problems.append(f"MDN: disposition {disp or '(empty)'} for {mid or 'our message'}"
                        + (f": {str(failure).strip()}" if failure else ""))
    else:
        events = (Event(Kind.DELIVERED, when, source=f"MDN {disp} {mid}"),)
    return Observation("MDN", keys, events, problems=tuple(problems), warnings=tuple(warnings))


def read_mdn(mdn, at: str | dt.datetime) -> Observation:
    """:func:`mdn_event` for a :class:`hl7referral.direct.mdn.Mdn`."""
    return mdn_event(getattr(mdn, "original_message_id", ""), getattr(mdn, "disposition", ""), at,
                     getattr(mdn, "failure", ""))
