"""Build ACK and NAK messages as bytes.

Invariants
----------
* :func:`build_ack` never raises: if anything goes wrong building the reply
  from the sender's header, it returns :func:`fallback_ack`, a minimal AR
  built from constants (reliability-tests §5, last row).
* The ACK's MSH mirrors the original: MSH-3/4 = original MSH-5/6 and MSH-5/6 =
  original MSH-3/4 (Mirth #276 got this wrong); the sender's own delimiters
  (MSH-1/2) and charset (MSH-18) are used; MSA-2 = MSH-10 exactly as received.
* Every segment, the last one included, ends with ``\\r`` (Mirth #504).
* ERR carries the table 0357 code, the location and a readable text (ERR-2,
  ERR-3, ERR-4, ERR-8 in v2.5+; ERR-1 for v2.1-2.4, which have no ERR-2..).
* The acknowledgement mode follows MSH-15/16 (:func:`response_code`).
"""

from __future__ import annotations

from collections.abc import Iterable

from .charset import hl7_name_for
from .header import DEFAULT_DELIMITERS, Delimiters, Header
from .triage import Problem

_0357_TEXT = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}
_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}
_OLD_ERR = {"2.1", "2.2", "2.3", "2.3.1", "2.4"}
_NO_STRUCTURE = {"2.1", "2.2", "2.3"}  # MSH-9.3 exists from v2.3.1


def response_code(header: Header | None, code: str) -> str | None:
    """The MSA-1 to send for an outcome, or None when no ACK is wanted.

    Original mode (MSH-15 and MSH-16 empty): AA/AE/AR. Enhanced mode: the
    accept (commit) ACK CA/CE/CR, sent per MSH-15: AL always, NE never, ER only
    for errors, SU only for success; an empty or unknown MSH-15 counts as AL.
    """
    if header is None or not header.enhanced_mode:
        return code
    mode = header.accept_ack_type
    if mode == "NE" or (mode == "ER" and code == "AA") or (mode == "SU" and code != "AA"):
        return None
    return _ENHANCED[code]


def escape(text: str, d: Delimiters) -> str:
    """Escape free text for a field, with the sender's delimiters."""
    if not d.escape:  # the sender declared no escape character: neutralise
        for ch in (d.field, d.component, d.repetition, d.subcomponent):
            text = text.replace(ch, " ")
        return text.replace("\r", " ").replace("\n", " ")
    e = d.escape
    out = text.replace(e, f"{e}E{e}")
    out = out.replace(d.field, f"{e}F{e}").replace(d.component, f"{e}S{e}")
    out = out.replace(d.repetition, f"{e}R{e}").replace(d.subcomponent, f"{e}T{e}")
    if d.truncation:
        out = out.replace(d.truncation, f"{e}P{e}")
    return out.replace("\r", " ").replace("\n", " ")


def build_ack(
    header: Header | None,
    code: str,
    errors: Iterable[Problem] = (),
    *,
    control_id: str,
    timestamp: str,
    codec: str = "ascii",
) -> bytes:
    """The ACK for ``header`` with MSA-1 ``code`` (already mapped by
    :func:`response_code`), one ERR per problem."""
    try:
        if header is None:
            return fallback_ack(control_id, timestamp, code, errors)
        return _build(header, code, tuple(errors), control_id, timestamp, codec)
    except Exception:  # noqa: BLE001 - invariant: never raises
        return fallback_ack(control_id, timestamp, "AR", errors)


def _build(h: Header, code: str, errors: tuple[Problem, ...], control_id: str,
           timestamp: str, codec: str) -> bytes:
    d = h.delimiters
    f, c = d.field, d.component
    version = h.version
    trigger = h.trigger_event
    if version in _NO_STRUCTURE:
        msg_type = f"ACK{c}{trigger}" if trigger else "ACK"
    else:
        msg_type = f"ACK{c}{trigger}{c}ACK"
    msh = [
        "MSH", d.msh2,
        h.receiving_application, h.receiving_facility,
        h.sending_application, h.sending_facility,
        timestamp, "", msg_type, control_id,
        h.field(11), h.field(12),
    ]
    msh18 = h.charset or hl7_name_for(codec)
    if msh18:
        msh += ["", "", "", "", "", msh18]
    segments = [f.join(msh)]
    msa = ["MSA", code, h.control_id]
    if errors:
        msa.append(escape(errors[0].text, d))
    segments.append(f.join(msa))
    for p in errors:
        segments.append(_err(p, d, version))
    text = "\r".join(segments) + "\r"
    return text.encode(codec, errors="replace")


def _err(p: Problem, d: Delimiters, version: str) -> str:
    f, c, s = d.field, d.component, d.subcomponent
    name = _0357_TEXT.get(p.code, "Error")
    field_no = str(p.field) if p.field else ""
    if version in _OLD_ERR:
        # ERR-1 (ELD): segment ^ sequence ^ field ^ code&text&table
        eld = c.join([p.segment, str(p.sequence), field_no,
                      s.join([str(p.code), escape(p.text, d), "HL70357"])])
        return f.join(["ERR", eld])
    location = c.join([p.segment, str(p.sequence), field_no])
    code = c.join([str(p.code), escape(name, d), "HL70357"])
    return f.join(["ERR", "", location, code, p.severity, "", "", "", escape(p.text, d)])


def fallback_ack(control_id: str, timestamp: str, code: str = "AR",
                 errors: Iterable[Problem] = ()) -> bytes:
    """A minimal ACK from constants, for when the sender's MSH is unusable.

    MSA-2 is empty because the original control id could not be read.
    """
    d = DEFAULT_DELIMITERS
    errs = tuple(errors) or (Problem(207, "MSH", 0, "message could not be read"),)
    if code not in ("AR", "AE", "CR", "CE"):
        code = "AR"
    msh = f"MSH|^~\\&|||||{_safe(timestamp)}||ACK|{_safe(control_id)}|P|2.5.1"
    lines = [msh, f"MSA|{code}||{escape(errs[0].text, d)}"]
    lines += [_err(p, d, "2.5.1") for p in errs]
    return ("\r".join(lines) + "\r").encode("ascii", errors="replace")


def _safe(value: str) -> str:
    return "".join(ch for ch in str(value) if ch.isalnum() or ch in "+-.")
