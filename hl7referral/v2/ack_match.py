"""Match one inbound frame against the message in flight: is it *our* ACK, and what does it say?

Sans-I/O: the control id we sent (MSH-10) and one complete frame payload in, an
:class:`AckResult` out. The outbound sender (:mod:`hl7referral.engine.mllp_client`)
decides delivery from it alone.

Kinds
-----
``accept``    MSA-1 AA, or CA (see below), and MSA-2 = our control id: delivered.
``error``     AE or CE, MSA-2 = ours: the receiver answered "application error"; resending
              unchanged is unlikely to help (HL7: the sender should fix the content).
``reject``    AR or CR, MSA-2 = ours: rejected (bad MSH-9/11/12, or a transient receiver
              problem; the caller's policy decides whether to resend later).
``commit``    CA, MSA-2 = ours, while the caller waits for the application ACK
              (``need_application_ack=True``): an intermediate step, keep waiting.
``mismatch``  an acknowledgement whose MSA-2 is not our control id (a late or duplicate
              ACK of an earlier message, Mirth #1441/#2070): never a delivery.
``not-ack``   anything else: not HL7, no MSA segment, an unknown MSA-1 code.

Enhanced mode: CA is the receiver's *commit accept*: it has put the message in safe
storage and the sender need not resend (``v2-messages.md`` §8.1). For closing the loop
that is delivery, so by default CA counts as ``accept``. A caller that must wait for the
application ACK (AA/AE/AR, e.g. when MSH-16 asked for one) passes
``need_application_ack=True`` and gets ``commit`` for CA. CE and CR are final either
way: the receiver did not commit, so no application ACK will follow.

Invariants
----------
* :func:`classify` never raises, whatever the bytes (fuzzed with hypothesis in
  ``tests/test_ack_match.py``); anything it cannot read is ``not-ack``.
* Delivery needs both the code and the id: ``accept`` is returned only for an MSA whose
  MSA-2 equals the expected control id (surrounding spaces ignored; an empty expected
  id matches nothing). The message type is not checked: application ACKs such as
  ORG^O20 or RRI^I12 carry their MSA like ACK does.
* The first MSA segment decides; delimiters are the frame's own MSH-1/MSH-2.
* ``error`` is content-free (codes, control ids, reasons): it may be logged. ``text``
  is the receiver's own words (MSA-3, else ERR-8, else ERR-3.2, unescaped) and may
  quote message content: store it, do not log it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import hl7
import hl7.containers
import hl7.util

from .charset import UnknownCharset, codec_for
from .header import BrokenHeader, NotHL7, read_header, split_segments

# python-hl7 logs a field's content when it meets an escape it does not know;
# the engine's logs carry ids, never message content (as in paths.py).
for _module in (hl7.util, hl7.containers):
    logging.getLogger(_module.__file__).disabled = True

ACCEPT, ERROR, REJECT, COMMIT, MISMATCH, NOT_ACK = "accept", "error", "reject", "commit", "mismatch", "not-ack"
FINAL = frozenset({ACCEPT, ERROR, REJECT})

_KIND = {"AA": ACCEPT, "CA": ACCEPT, "AE": ERROR, "CE": ERROR, "AR": REJECT, "CR": REJECT}
_SHOWN = 40  # characters of a foreign control id or code kept in ``error``


@dataclass(frozen=True, slots=True)
class AckResult:
    kind: str  # one of accept, error, reject, commit, mismatch, not-ack
    code: str = ""  # MSA-1 as received, stripped and upper-cased
    control_id: str = ""  # MSA-2 as received
    text: str = ""  # the receiver's text (may quote content: do not log)
    error: str = ""  # why this is not a delivery, content-free; "" for accept

    @property
    def delivered(self) -> bool:
        return self.kind == ACCEPT

    @property
    def final(self) -> bool:
        """True when this frame answers the message: accept, error or reject."""
        return self.kind in FINAL


def classify(control_id: str, payload: bytes, *, need_application_ack: bool = False) -> AckResult:
    """Classify one frame payload received while ``control_id`` is in flight. Never raises."""
    try:
        return _classify(control_id, payload, need_application_ack)
    except Exception as exc:  # noqa: BLE001 - invariant: never raises
        return AckResult(NOT_ACK, error=f"unreadable acknowledgement ({type(exc).__name__})")


def _classify(control_id: str, payload: bytes, need_application_ack: bool) -> AckResult:
    try:
        header = read_header(bytes(payload))
    except (NotHL7, BrokenHeader) as exc:
        return AckResult(NOT_ACK, error=f"not an HL7 acknowledgement: {exc}")
    try:
        codec = codec_for(header.charset, "utf-8")
    except UnknownCharset:
        codec = "utf-8"
    text = bytes(payload).decode(codec, errors="replace").lstrip("\ufeff")
    d = header.delimiters
    msa = err = None
    for segment in split_segments(text):
        fields = segment.split(d.field)
        if fields[0] == "MSA" and msa is None:
            msa = fields
        elif fields[0] == "ERR" and err is None:
            err = fields
    if msa is None:
        return AckResult(NOT_ACK, error="no MSA segment")

    def get(fields, n: int) -> str:
        return fields[n] if fields is not None and n < len(fields) else ""

    code = get(msa, 1).strip().upper()
    acked = get(msa, 2)
    receiver_text = _unescape(header, get(msa, 3) or get(err, 8) or _component(get(err, 3), d.component, 2))
    expected = (control_id or "").strip()
    if not expected or acked.strip() != expected:
        return AckResult(MISMATCH, code, acked, receiver_text,
                         f"MSA-2 is {acked[:_SHOWN]!r}, not {expected[:_SHOWN]!r}")
    kind = _KIND.get(code)
    if kind is None:
        return AckResult(NOT_ACK, code, acked, receiver_text, f"unknown MSA-1 code {code[:_SHOWN]!r}")
    if code == "CA" and need_application_ack:
        return AckResult(COMMIT, code, acked, receiver_text, "commit accept (CA); the application ACK is awaited")
    if kind == ACCEPT:
        return AckResult(ACCEPT, code, acked, receiver_text)
    hl7_error = _component(get(err, 3), d.component, 1).strip()
    what = "application error" if kind == ERROR else "rejected"
    detail = f" (HL7 error {hl7_error[:_SHOWN]})" if hl7_error else ""
    return AckResult(kind, code, acked, receiver_text, f"{code}: {what}{detail}")


def _component(value: str, sep: str, n: int) -> str:
    parts = value.split(sep) if sep else [value]
    return parts[n - 1] if n <= len(parts) else ""


def _unescape(header, value: str) -> str:
    d = header.delimiters
    if not value or not d.escape or d.escape not in value or not (d.repetition and d.subcomponent):
        return value
    try:
        container = hl7.containers.Message(
            separator="\r", esc=d.escape,
            separators="\r" + d.field + d.repetition + d.component + d.subcomponent,
        )
        return hl7.util.unescape(container, value)
    except Exception:  # noqa: BLE001 - python-hl7 raises on some malformed escapes; keep the raw text
        return value
