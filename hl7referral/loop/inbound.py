"""A referral arriving over Direct, as the recipient's engine reads it (sans-I/O).

The specialist's practice runs the same engine. A Direct message is a *referral* (not an
answer about one of ours) when its documents hold a new order (OMG^O19 / ORM^O01 with ORC-1
``NW``, or a REF^I12) or, without any v2 message, a C-CDA Referral Note (LOINC 57133-1,
template ``2.16.840.1.113883.10.20.22.1.14``). Anything else (OSU, SIU, MDM, a Consultation
Note) is an answer and goes to the tracker as before.

Invariants
----------
* The referral id is the initiator's, unchanged, in the stored form (``ext@root``): the
  360X placer order number (ORC-2, else OBR-2; RF1-6 for REF^I12) when an order came, else
  the Referral Note's Referral Act id. Answers carry it back as the same EI, so both ends
  key the referral the same way.
* Reading never raises on content: what cannot be read is listed in ``problems`` (the
  engine then parks the mail in the work queue whole, with the reason).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import hl7

from . import correlate

REFERRAL_NOTE_LOINC = "57133-1"
REFERRAL_NOTE_TEMPLATE = "2.16.840.1.113883.10.20.22.1.14"
NEW_ORDER_TYPES = ("OMG^O19", "ORM^O01")


@dataclass(frozen=True)
class InboundReferral:
    referral_id: str                  # stored form, ext@root (the initiator's id)
    referral_ei: str                  # as it travels in v2: ext^^root^ISO
    order: bytes | None = None        # the v2 order as received (360X OMG^O19)
    cda: bytes | None = None          # the C-CDA as received (Referral Note)
    patient_cx: str = ""              # the first patient id, CX ext^^^&root&ISO (XDM metadata of answers)
    patient_ids: str = ""             # PID-3 as ER7 (answers' PID)
    patient_name: str = ""            # PID-5 as ER7
    veterinary: bool = False
    facts: dict = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def _message_type(raw: bytes) -> str:
    first = raw.lstrip()[:300].split(b"\r", 1)[0].split(b"\n", 1)[0]
    fields = first.split(first[3:4]) if len(first) > 3 else []
    if len(fields) <= 8:
        return ""
    parts = fields[8].decode("ascii", "replace").split(first[4:5].decode("ascii", "replace") or "^")
    return "^".join(parts[:2])


def _is_new_order(raw: bytes) -> bool:
    kind = _message_type(raw)
    if kind == "REF^I12":
        return True
    if kind not in NEW_ORDER_TYPES:
        return False
    try:
        msg = _parse(raw)
        return str(msg.segment("ORC")(1)).strip() in ("NW", "")
    except (KeyError, IndexError, ValueError, hl7.exceptions.ParseException):
        return True   # an order we cannot read is still an order: reading it says what is wrong


def _parse(raw: bytes):
    return hl7.parse(raw.decode("utf-8", "replace").replace("\r\n", "\r").replace("\n", "\r"))


# The document's own type: the header's first <code> (CDA order: realmCode, typeId, templateId, id,
# code). A LOINC 57133-1 further down (a Consultation Note citing the Referral Note, or coding the
# order it fulfils) says what the document answers, not what it is.
_FIRST_CODE = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?code\b([^>]*)>")
_CODE_ATTR = re.compile(rb"""\bcode\s*=\s*["']([^"']*)["']""")


def _is_referral_note(xml: bytes) -> bool:
    head = xml[:20000]
    if REFERRAL_NOTE_TEMPLATE.encode() + b'"' in head:
        return True
    first = _FIRST_CODE.search(head)
    code = _CODE_ATTR.search(first.group(1)) if first else None
    return code is not None and code.group(1).strip() == REFERRAL_NOTE_LOINC.encode()


def is_referral(documents) -> bool:
    """Does this Direct message's (name, bytes) list carry a new referral (not an answer)?"""
    messages = [d for _, d in documents if d.lstrip()[:4] == b"MSH|"]
    if messages:
        return any(_is_new_order(m) for m in messages)
    return any(_is_referral_note(d) for _, d in documents if b"ClinicalDocument" in d[:4096])


def _field(seg, n: int) -> str:
    try:
        return str(seg(n)) if len(seg) > n else ""
    except (IndexError, KeyError):
        return ""


def _from_order(raw: bytes) -> tuple[str, str, str, str, list[str]]:
    """(referral EI, PID-3, PID-5, first CX) of a v2 order; problems when the id is missing."""
    problems: list[str] = []
    try:
        msg = _parse(raw)
    except (ValueError, hl7.exceptions.ParseException) as exc:
        return "", "", "", "", [f"order not parseable: {exc}"]
    ei = ""
    kind = _message_type(raw)
    try:
        if kind == "REF^I12":
            ei = _field(msg.segment("RF1"), 6) or _field(msg.segment("RF1"), 11)
        else:
            ei = _field(msg.segment("ORC"), 2)
            if not ei.strip("^"):
                ei = _field(msg.segment("OBR"), 2)
    except KeyError:
        pass
    if not ei.strip("^"):
        problems.append(f"{kind}: no referral id (ORC-2/OBR-2, RF1-6)")
    ids = name = ""
    try:
        pid = msg.segment("PID")
        ids, name = _field(pid, 3), _field(pid, 5)
    except KeyError:
        problems.append(f"{kind}: no PID segment")
    first = ids.split("~")[0]
    parts = first.split("^")
    cx = ""
    if parts and parts[0]:
        authority = parts[3] if len(parts) > 3 else ""
        root = authority.split("&")[1] if "&" in authority else ""
        cx = f"{parts[0]}^^^&{root}&ISO" if root else parts[0]
    return ei, ids, name, cx, problems


def read_inbound(documents, *, local_root: str = correlate.DEFAULT_LOCAL_ROOT) -> InboundReferral:
    """The referral a Direct message carries (call when :func:`is_referral` said so)."""
    from ..cda.referral_reader import ReferralNoteError, read_referral_note

    orders = [d for _, d in documents if d.lstrip()[:4] == b"MSH|" and _is_new_order(d)]
    cdas = [d for _, d in documents if b"ClinicalDocument" in d[:4096]]
    order = orders[0] if orders else None
    cda = next((d for d in cdas if _is_referral_note(d)), cdas[0] if cdas else None)
    problems: list[str] = []
    if len(orders) > 1:
        problems.append(f"{len(orders)} orders in one message: one referral per message (360X)")
    ei = ids = name = cx = ""
    if order is not None:
        ei, ids, name, cx, found = _from_order(order)
        problems += found
    facts: dict = {}
    veterinary = False
    if cda is not None:
        try:
            note = read_referral_note(cda, local_root=local_root)
        except ReferralNoteError as exc:
            problems.append(f"C-CDA: {exc}")
        else:
            if not ei.strip("^") and note.referral_ei:
                ei = note.referral_ei
                problems = [p for p in problems if "no referral id" not in p]
            ids = ids or note.patient_ids
            name = name or note.patient_name
            cx = cx or note.patient_cx
            veterinary = note.veterinary
            facts = note.facts()
    elif order is None:
        problems.append("neither an order nor a C-CDA")
    referral_id = correlate.ei_key(ei) if ei.strip("^") else ""
    if not referral_id and not any("referral id" in p for p in problems):
        problems.append("no referral id (ORC-2/OBR-2, RF1-6, or the Referral Note's Referral Act id)")
    facts.setdefault("veterinary", veterinary)
    return InboundReferral(referral_id=referral_id, referral_ei=ei, order=order, cda=cda, patient_cx=cx,
                           patient_ids=ids, patient_name=name, veterinary=veterinary, facts=facts,
                           problems=tuple(problems))
