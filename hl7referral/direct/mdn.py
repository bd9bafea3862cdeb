"""Message Disposition Notifications (RFC 3798 / RFC 8098) as Direct uses them: build, parse, detect.

Sans-I/O: bytes and strings in, bytes and values out. Signing and encrypting an MDN (ETT DTS 450)
and putting From/To/Date/Message-ID on the outer message belong to the caller.

Invariants kept by :func:`build_mdn`:

* the entity is ``multipart/report; report-type=disposition-notification`` with exactly two parts:
  a neutral ``text/plain`` sentence (the original Message-ID and the disposition, no PHI, no
  subject) and a ``message/disposition-notification`` part;
* the notification carries Reporting-UA (DTS 457), Original-Recipient and Final-Recipient
  (``rfc822;`` addresses, DTS 460), Original-Message-ID equal to the original Message-ID (DTS 461)
  and ``Disposition: automatic-action/MDN-sent-automatically; <type>`` (DTS 462);
* ``X-DIRECT-FINAL-DESTINATION-DELIVERY:`` appears only on a *dispatched* MDN and only when the
  caller says it honours timely-and-reliable delivery (ETT test 40); ``Failure:`` only on *failed*;
* there is never a Disposition-Notification-To header (DTS 452): an MDN must not ask for an MDN;
* every line is ASCII (DTS 196), ends in CRLF and is at most 998 octets; caller text with CR or
  LF is refused, so no input can inject a header or a MIME boundary;
* the output is deterministic (the boundary is a digest of the inputs), so equal inputs give
  equal bytes.

Invariants kept by :func:`parse_mdn`:

* it returns ``None`` for anything that is not a disposition-notification report, an
  :class:`Mdn` for one it understands, and raises only :class:`MdnError` (one line) for a report
  it cannot use; any other exception from arbitrary bytes is a bug;
* it is liberal in what peers actually write: no spaces after ``;``, folded fields, lower-case
  field names, a Final-Recipient without the ``rfc822;`` address type (the Direct Java RI),
  an ``Original-Message-ID`` without angle brackets (restored), a part with no headers at all;
* it needs a Disposition and an original Message-ID (the field, else the report's In-Reply-To)
  because without them the MDN can neither be understood nor correlated; a missing
  Final-Recipient or Reporting-UA is tolerated (empty string), because refusing a clear
  "processed" over it would turn a delivered referral into a timeout and a spurious fax.
"""

from __future__ import annotations

import binascii
import email
import email.header
import email.message
import email.policy
import hashlib
import io
import quopri
import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.parser import BytesHeaderParser, BytesParser

from . import multipart

FINAL_DELIVERY_OPTION = "X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true"
FINAL_DELIVERY_FIELD = "X-DIRECT-FINAL-DESTINATION-DELIVERY"
AUTOMATIC_MODE = "automatic-action/MDN-sent-automatically"

# RFC 3798 disposition types; Direct uses processed, dispatched and failed. Others are parsed and
# passed through so the tracker can audit them.
DISPOSITIONS = ("processed", "dispatched", "failed", "displayed", "deleted", "denied")

_MAX_LINE = 998  # RFC 5322 §2.1.1, octets without CRLF
_MAX_DEPTH = 4  # how far parse_mdn looks inside multipart/signed or message/rfc822 wrappers
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")  # one level of RFC 5322 comment is all peers write
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_UNUSUAL = re.compile(r"[^\t\r\n\x20-\x7e]")  # not printable ASCII nor a line break: see _fields


class MdnError(ValueError):
    """A disposition-notification report that cannot be used, or bad arguments to build one."""


@dataclass(frozen=True)
class Mdn:
    original_message_id: str  # with angle brackets, as in the original Message-ID header
    disposition: str  # lower case: processed | dispatched | failed | displayed | deleted | ...
    mode: str  # e.g. "automatic-action/MDN-sent-automatically"
    final_recipient: str  # the address, without the "rfc822;" address type
    original_recipient: str
    reporting_ua: str
    failure: str = ""  # Failure: field, else Error: field, else "error" for an /error modifier
    final_destination_delivery: bool = False  # X-DIRECT-FINAL-DESTINATION-DELIVERY field present
    sender: str = ""  # From of the MDN message, when a whole message was parsed


# -- building -----------------------------------------------------------------------------------


def build_mdn(
    *,
    original_message_id: str,
    original_from: str,
    original_to: str,
    reporting_ua: str,
    disposition: str,
    failure: str = "",
    final_destination_delivery: bool = False,
    human_text: str = "",
) -> tuple[dict[str, str], bytes]:
    """Return (outer headers, MIME entity) for an automatic MDN about one received message.

    ``original_to`` is the recipient the MDN reports on (Original- and Final-Recipient);
    ``original_from`` is the address the MDN goes to: it is checked here (the caller puts it in
    To) but not written into the report, which RFC 3798 does not ask for. The headers are
    Subject, In-Reply-To and References; the caller adds From, To, Date, Message-ID and
    MIME-Version, then signs and encrypts the entity. ``human_text`` replaces the default
    sentence of part 1 and must itself be free of PHI.
    """
    disposition = disposition.strip().lower()
    if not _TOKEN.match(disposition):
        raise MdnError(f"disposition must be a token such as 'processed', not {disposition!r}")
    original_message_id = _normalize_message_id(_line("original_message_id", original_message_id))
    if original_message_id == "<>":
        raise MdnError("original_message_id is empty")
    for name, value in (("original_from", original_from), ("original_to", original_to)):
        if "@" not in _line(name, value) or any(c in value for c in " ,;<>"):
            raise MdnError(f"{name} must be one bare address, not {value!r}")
    reporting_ua = _line("reporting_ua", reporting_ua)
    if not reporting_ua:
        raise MdnError("reporting_ua is empty (ETT DTS 457 expects Reporting-UA)")
    failure = _line("failure", failure)
    if failure and disposition != "failed":
        raise MdnError(f"failure text only belongs on a failed MDN, not on {disposition!r}")

    fields = [
        f"Reporting-UA: {reporting_ua}",
        f"Original-Recipient: rfc822; {original_to.strip()}",
        f"Final-Recipient: rfc822; {original_to.strip()}",
        f"Original-Message-ID: {original_message_id}",
        f"Disposition: {AUTOMATIC_MODE}; {disposition}",
    ]
    if failure:
        fields.append(f"Failure: {failure}")
    # ETT test 40: only a receiver that honours timely-and-reliable delivery may write the field,
    # and only on the dispatched MDN (the Java RI / ETT MDNGenerator do the same).
    if final_destination_delivery and disposition == "dispatched":
        fields.append(f"{FINAL_DELIVERY_FIELD}: ")

    text = human_text or f"Your message {original_message_id} was {disposition}."
    text_headers, text_body = _text_part(text)

    digest = hashlib.sha256("\0".join(fields + [text]).encode("utf-8")).hexdigest()[:32]
    # The boundary holds a digest of every line it separates, so no part can contain it (that
    # would need a preimage); fields are checked single lines that start with a field name.
    boundary = f"=_mdn_{digest}"
    lines = [
        "Content-Type: multipart/report; report-type=disposition-notification;",
        f' boundary="{boundary}"',
        "",
        f"--{boundary}",
        *text_headers,
        "",
        *text_body,
        f"--{boundary}",
        "Content-Type: message/disposition-notification",
        "Content-Transfer-Encoding: 7bit",
        "",
        *fields,
        "",
        f"--{boundary}--",
        "",
    ]
    for line in lines:
        if len(line.encode("ascii")) > _MAX_LINE:
            raise MdnError(f"a line of the MDN is longer than {_MAX_LINE} octets: {line[:40]!r}...")
    headers = {
        "Subject": f"{disposition.capitalize()}: Direct message {original_message_id}",
        "In-Reply-To": original_message_id,
        "References": original_message_id,
    }
    return headers, "\r\n".join(lines).encode("ascii")


def _line(name: str, value: str) -> str:
    """Check a caller value that goes into one header line: a str, no CR/LF/NUL, ASCII."""
    if not isinstance(value, str):
        raise MdnError(f"{name} must be a str, not {type(value).__name__}")
    if any(c in value for c in "\r\n\0"):
        raise MdnError(f"{name} contains a line break or NUL")
    if not value.isascii():
        raise MdnError(f"{name} is not ASCII (ETT DTS 196: all headers ASCII)")
    return value.strip()


def _text_part(text: str) -> tuple[list[str], list[str]]:
    """Headers and CRLF-free body lines of the human-readable part."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii() and all(len(x) <= _MAX_LINE for x in text.split("\n")):
        headers = ["Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit"]
        body = text.split("\n")
    else:
        encoded = quopri.encodestring(text.encode("utf-8")).decode("ascii")
        headers = ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable"]
        body = encoded.split("\n")
    return headers, body


# -- parsing -----------------------------------------------------------------------------------


def is_mdn(entity: bytes) -> bool:
    """Whether the bytes are a disposition-notification report (well formed or not). Never raises.

    A malformed MDN is still an MDN: it goes to the tracker's audit, not to the referral pipeline.
    """
    try:
        return _find_report(_parse_message(entity), 0) is not None
    except MdnError:
        return False


def parse_mdn(entity_or_message: bytes) -> Mdn | None:
    """Parse an MDN entity or a whole (already decrypted and verified) MDN message.

    Looks at the top level and, for a wrapper, inside the first part of ``multipart/signed`` or a
    ``message/rfc822`` payload. Returns ``None`` if no disposition-notification report is there.
    """
    top = _parse_message(entity_or_message)
    report = _find_report(top, 0)
    if report is None:
        return None
    return _read_report(top, report)


def read_if_mdn(entity: bytes) -> Mdn | None:
    """:func:`is_mdn` and :func:`parse_mdn` in one parse: None when the bytes are not an MDN,
    :class:`MdnError` when they are one but malformed (to be audited, never taken for content)."""
    try:
        top = _parse_message(entity)
        report = _find_report(top, 0)
    except MdnError:
        return None
    return None if report is None else _read_report(top, report)


def _read_report(top: email.message.Message, report: email.message.Message) -> Mdn:
    if report.get_content_type() == "message/disposition-notification":
        notification = report
    else:
        parts = report.get_payload()
        notification = None
        if isinstance(parts, list):
            notification = next(
                (p for p in parts if p.get_content_type() == "message/disposition-notification"), None
            )
        if notification is None:
            raise MdnError("disposition-notification report without a message/disposition-notification part")
    fields = _fields(notification)

    raw_disposition = fields.get("disposition", "")
    if not raw_disposition:
        raise MdnError("MDN has no Disposition field")
    mode, disposition, modifiers = _parse_disposition(raw_disposition)

    original_id = fields.get("original-message-id", "") or _header(report, "In-Reply-To") or (
        _header(top, "In-Reply-To") if top is not report else ""
    )
    original_id = _normalize_message_id(_uncomment(original_id))
    if original_id == "<>":
        raise MdnError("MDN has no Original-Message-ID (nor In-Reply-To) to correlate it with")

    # Only the "error" modifier means failure; RFC 2298's "warning" still reports a processed message.
    failure = fields.get("failure", "") or fields.get("error", "") or ("error" if "error" in modifiers else "")
    return Mdn(
        original_message_id=original_id,
        disposition=disposition,
        mode=mode,
        final_recipient=_address(fields.get("final-recipient", "")),
        original_recipient=_address(fields.get("original-recipient", "")),
        reporting_ua=fields.get("reporting-ua", ""),
        failure=failure,
        final_destination_delivery=FINAL_DELIVERY_FIELD.lower() in fields,
        sender=_header(top, "From"),
    )


def wants_final_delivery(headers: Mapping[str, str] | email.message.Message) -> bool:
    """Whether an inbound message asked for timely and reliable delivery (a dispatched MDN).

    True when a Disposition-Notification-Options header has the parameter
    ``X-DIRECT-FINAL-DESTINATION-DELIVERY=<importance>,true`` (RFC 3798 §2.2:
    ``parameter = attribute "=" importance "," value *("," value)``; attribute, importance and
    value compared without case; spaces and comments ignored; several headers and
    ``;``-separated parameters all looked at). A parameter without an importance, or with any
    first value other than ``true``, is not a request: the grammar requires the importance, and
    answering an unasked-for request would put the X-DIRECT field on an MDN (ETT test 40).
    """
    values: list[str] = []
    if isinstance(headers, email.message.Message):
        values = [str(v) for v in headers.get_all("Disposition-Notification-Options", [])]
    else:
        values = [str(v) for k, v in headers.items() if str(k).lower() == "disposition-notification-options"]
    for value in values:
        for parameter in _uncomment(_unfold(value)).split(";"):
            attribute, eq, rest = parameter.partition("=")
            if not eq or attribute.strip().lower() != FINAL_DELIVERY_FIELD.lower():
                continue
            items = [_unquote(x.strip()).lower() for x in rest.split(",")]
            if len(items) >= 2 and items[0] in ("required", "optional") and items[1] == "true":
                return True
    return False


def _parse_message(data: bytes) -> email.message.Message:
    """The stdlib's tree of *data*; a top-level ``multipart/report`` (every MDN) is split at its
    delimiters first and each part parsed on its own (the same tree, without the per-boundary
    regular expression CPython < 3.13 compiles: :mod:`.multipart`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MdnError(f"expected bytes, not {type(data).__name__}")
    data = bytes(data)
    head = multipart.head(data)
    # A lone CR ends a line for the stdlib, not for multipart: such bytes take the stdlib's way.
    if head.content_type()[0] == "multipart/report" and b"\r" not in data.replace(b"\r\n", b""):
        top = _stdlib_parse(data[:head.body], BytesHeaderParser)
        boundary = top.get_boundary()   # the stdlib's reading of the parameter, as its parser uses
        # The split tree is the stdlib's own when the stdlib reads the same header block: no
        # defect (it would end the headers at a line that is not a field) and nothing after it;
        # and when the boundary fits on one line (the stdlib matches delimiters line by line).
        if boundary and not top.defects and not top.get_payload() and top.get_content_type() == "multipart/report" \
                and "\r" not in boundary and "\n" not in boundary:
            try:
                pieces = multipart.parts(data, head.body, boundary.encode("ascii", "surrogateescape"))
            except UnicodeEncodeError:   # an RFC 2231 boundary beyond ASCII
                pieces = None
            if pieces is not None:
                top.set_payload([_stdlib_parse(piece) for piece in pieces])
                return top
    return _stdlib_parse(data)


def _stdlib_parse(data: bytes, parser=BytesParser) -> email.message.Message:
    try:
        # compat32 never builds header objects lazily, so reading a header later cannot raise;
        # the parser itself records defects instead of raising, but this is the trust boundary
        # for bytes from the network, so any surprise from the stdlib becomes an MdnError.
        return parser(policy=email.policy.compat32).parsebytes(data)
    except Exception as exc:  # noqa: BLE001 - see above
        raise MdnError(f"unparseable MIME: {type(exc).__name__}: {exc}") from None


def _find_report(msg: email.message.Message, depth: int) -> email.message.Message | None:
    ctype = msg.get_content_type()
    if ctype == "multipart/report":
        report_type = _uncomment(str(msg.get_param("report-type", "") or "")).strip().lower()
        return msg if report_type == "disposition-notification" else None
    if ctype == "message/disposition-notification":
        return msg
    if depth >= _MAX_DEPTH:
        return None
    payload = msg.get_payload()
    if ctype == "multipart/signed" and isinstance(payload, list) and payload:
        return _find_report(payload[0], depth + 1)
    if ctype == "message/rfc822" and isinstance(payload, list) and payload:
        return _find_report(payload[0], depth + 1)
    return None


def _fields(part: email.message.Message) -> dict[str, str]:
    """The notification fields, lower-case name → unfolded value (first occurrence wins).

    compat32 parses a message/* part as an embedded message whose "headers" are our fields;
    reading them as parsed, then every ``name: value`` line of its body, also recovers fields a
    peer put after a stray blank line, and a base64 part (not allowed for message/*, but seen).
    """
    if part.get_content_type() == "message/disposition-notification" and part.is_multipart():
        payload = part.get_payload()
        inner = payload[0] if payload else email.message.Message()
    else:
        inner = part
    raw = _plain_lines(inner) if inner is not part else None
    if raw is None:
        buf = io.BytesIO()
        try:
            BytesGenerator(buf, mangle_from_=False, maxheaderlen=0).flatten(inner)
        except Exception as exc:  # noqa: BLE001 - stdlib generator on hostile input; see _parse_message
            raise MdnError(f"unreadable disposition-notification part: {type(exc).__name__}") from None
        raw = buf.getvalue()
        if inner is part:  # a top-level message/disposition-notification: fields are its body
            raw = raw.partition(b"\n\n")[2] if b"\n\n" in raw else raw
    if str(part.get("Content-Transfer-Encoding", "")).strip().lower() == "base64":
        try:
            raw = binascii.a2b_base64(b"".join(raw.split()))
        except binascii.Error:
            raise MdnError("disposition-notification part is not valid base64") from None
    text = _unfold(raw.decode("utf-8", errors="replace"))
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if colon and name and " " not in name:
            fields.setdefault(name, " ".join(value.split()))
    return fields


def _plain_lines(inner: email.message.Message) -> bytes | None:
    """The embedded message's lines as the generator would write them, when it is plain.

    Plain: printable ASCII header pairs and text body, the usual shape. They are then the pairs as
    the parser stored them (folds kept, unfolded by the caller) and the body, line breaks made LF:
    the generator's very output, without its cost (re-folding every header cost more than the
    whole MIME parse). None otherwise (8-bit octets, which get_payload() would have replaced;
    control characters, some of which the generator takes for line breaks; a nested entity):
    the caller flattens those back as received.
    """
    body = inner.get_payload()
    pairs = list(inner.raw_items())
    if not (body is None or isinstance(body, str)) or _UNUSUAL.search(body or "") \
            or any(not isinstance(v, str) or _UNUSUAL.search(name + v) for name, v in pairs):
        return None
    text = "".join(f"{name}: {value}\n" for name, value in pairs) + "\n" + (body or "")
    return text.replace("\r\n", "\n").replace("\r", "\n").encode("ascii")


def _parse_disposition(value: str) -> tuple[str, str, tuple[str, ...]]:
    """``mode; type[/modifier,...]`` (RFC 3798 §3.2.6) → (mode, type, modifiers); spaces optional."""
    mode, semi, rest = _uncomment(value).partition(";")
    mode = "".join(mode.split())
    if not semi or "/" not in mode:
        raise MdnError(f"Disposition is not 'action-mode/sending-mode; type': {value[:80]!r}")
    dtype, _, modifiers = "".join(rest.split()).partition("/")
    dtype = dtype.lower()
    if not _TOKEN.match(dtype):
        raise MdnError(f"Disposition has no disposition type: {value[:80]!r}")
    return mode, dtype, tuple(m.lower() for m in modifiers.split(",") if m)


def _header(msg: email.message.Message, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    if isinstance(value, email.header.Header):  # compat32 returns Header for undecodable bytes
        value = str(value)
    return " ".join(_unfold(str(value)).split())


def _address(value: str) -> str:
    """``rfc822; bob@example.org`` → ``bob@example.org``; an address without a type is kept."""
    _, semi, address = value.rpartition(";")
    return (address if semi else value).strip()


def _normalize_message_id(value: str) -> str:
    value = value.strip()
    if not value.startswith("<"):
        value = "<" + value
    if not value.endswith(">"):
        value = value + ">"
    return value


def _unfold(value: str) -> str:
    return _FOLD.sub("", value)


def _uncomment(value: str) -> str:
    return _COMMENT.sub(" ", value)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value
