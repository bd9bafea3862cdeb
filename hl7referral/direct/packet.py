"""The referral packet as a Direct message: health content → signed → encrypted → RFC 5322 bytes.

Invariants
----------
* The health content is ``multipart/mixed``: a short text part (no patient data: the
  referral id only), the IHE XDM zip (C-CDA, and the v2 order for 360X), and, when
  asked, the bare C-CDA as ``application/xml`` for recipients without XDM.
* Sign, then encrypt (Applicability Statement); the outer headers are ASCII only
  (ETT DTS 196), and carry From, To, Date, Message-ID, MIME-Version and, when
  timely-and-reliable delivery is asked for, ``Disposition-Notification-Options``.
* "Wrapped" (§170.315(h)(1)): the signed content is a ``message/rfc822`` holding
  the whole inner message with its own headers, so they are protected too.
* Every line ends with CRLF; base64 lines are 76 characters.
* The Message-ID is derived from the outbox idempotency key, so a retried
  attempt and its MDNs always name the same message.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from typing import Sequence

from cryptography import x509

from . import smime
from .mdn import FINAL_DELIVERY_OPTION
from .xdm import CCDA_R21_FORMAT, V2_MIME_TYPE, Code, SubmissionSet, XdmDocument, build_xdm

CRLF = b"\r\n"
CCDA_FORMAT = Code(CCDA_R21_FORMAT, "1.3.6.1.4.1.19376.1.2.3", "C-CDA R2.1 Structured Body")
REFERRAL_NOTE_TYPE = Code("57133-1", "2.16.840.1.113883.6.1", "Referral note")
CONSULT_NOTE_TYPE = Code("11488-4", "2.16.840.1.113883.6.1", "Consult note")


@dataclass(frozen=True)
class PacketContent:
    referral_id: str
    cda: bytes
    created: str                 # HL7 DTM of the packet (the submission time)
    patient_id: str = ""         # CX: "extension^^^&root&ISO"
    order: bytes | None = None   # the v2 order as received (OMG^O19 for 360X)
    title: str = "Referral Note"
    source_oid: str = "2.16.840.1.113883.19"
    include_bare_cda: bool = True


def patient_cx(referral) -> str:
    """The XDS patient id (CX ``extension^^^&root&ISO``) of a mapped referral: its first identifier with a value."""
    for ident in getattr(getattr(referral, "patient", None), "ids", None) or []:
        if ident.extension:
            return f"{ident.extension}^^^&{ident.root}&ISO" if ident.root else ident.extension
    return ""


def message_id_for(key: str, domain: str) -> str:
    """A stable Message-ID for an outbox idempotency key."""
    return f"<{uuid.uuid5(uuid.NAMESPACE_URL, 'hl7referral:' + key)}@{domain}>"


def _uid(root: str, key: str) -> str:
    """An XDS uniqueId under *root*: a decimal arc from the hash of *key*."""
    return f"{root}.{int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big')}"


def _b64(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return CRLF.join(encoded[i:i + 76] for i in range(0, len(encoded), 76))


def _boundary(seed: str, label: str) -> str:
    return f"=_{label}_{hashlib.sha256((seed + label).encode()).hexdigest()[:24]}"


def build_xdm_for(content: PacketContent, sender: str, recipient: str) -> bytes:
    docs = [XdmDocument(filename="DOC0001.XML", content=content.cda, mime_type="text/xml", title=content.title,
                        unique_id=_uid(content.source_oid, content.referral_id + "/cda"),
                        creation_time=content.created, class_code=REFERRAL_NOTE_TYPE,
                        type_code=REFERRAL_NOTE_TYPE, format_code=CCDA_FORMAT)]
    if content.order is not None:
        docs.append(XdmDocument(filename="DOC0002.HL7", content=content.order,
                                mime_type=V2_MIME_TYPE, title="Referral order (HL7 v2)",
                                unique_id=_uid(content.source_oid, content.referral_id + "/order"),
                                creation_time=content.created))
    submission = SubmissionSet(unique_id=_uid(content.source_oid, content.referral_id + "/submission"),
                               source_id=content.source_oid, submission_time=content.created,
                               patient_id=content.patient_id, intended_recipients=[recipient],
                               author_institution="", author_person=sender, title=content.title)
    return build_xdm(submission, docs)


@dataclass(frozen=True)
class AnswerContent:
    """A 360X answer from the referral's recipient: a v2 message (OSU^O51, SIU^S12/S15/S26), a C-CDA
    (a Consultation Note) beside it, or both, about one referral."""

    referral_id: str
    created: str                 # HL7 DTM
    patient_id: str              # CX of the patient, as the initiator sent it
    message: bytes | None = None
    cda: bytes | None = None
    title: str = "Referral status"
    source_oid: str = "2.16.840.1.113883.19"
    key: str = ""                # what makes the XDS unique ids unique (the relay key)


def build_xdm_answer(content: AnswerContent, sender: str, recipient: str) -> bytes:
    seed = f"{content.referral_id}/{content.key}"
    docs = []
    if content.message is not None:
        docs.append(XdmDocument(filename=f"DOC{len(docs) + 1:04d}.HL7", content=content.message,
                                mime_type=V2_MIME_TYPE, title=content.title,
                                unique_id=_uid(content.source_oid, seed + "/message"), creation_time=content.created))
    if content.cda is not None:
        docs.append(XdmDocument(filename=f"DOC{len(docs) + 1:04d}.XML", content=content.cda, mime_type="text/xml",
                                title="Consultation Note", unique_id=_uid(content.source_oid, seed + "/cda"),
                                creation_time=content.created, class_code=CONSULT_NOTE_TYPE,
                                type_code=CONSULT_NOTE_TYPE, format_code=CCDA_FORMAT))
    submission = SubmissionSet(unique_id=_uid(content.source_oid, seed + "/submission"),
                               source_id=content.source_oid, submission_time=content.created,
                               patient_id=content.patient_id, intended_recipients=[recipient],
                               author_institution="", author_person=sender, title=content.title)
    return build_xdm(submission, docs)


def _mixed(seed: str, note: str, attachments: Sequence[tuple[str, str, bytes]]) -> bytes:
    """``multipart/mixed``: a short text part (ids only, never patient data), then the attachments
    (content type, file name, bytes), base64."""
    boundary = _boundary(seed, "mixed")
    parts = [b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
             + note.encode("ascii", "replace") + CRLF]
    for content_type, filename, data in attachments:
        parts.append(f'Content-Type: {content_type}; name="{filename}"\r\nContent-Transfer-Encoding: base64\r\n'
                     f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'.encode() + _b64(data) + CRLF)
    out = [f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'.encode()]
    for part in parts:
        out.append(f"--{boundary}\r\n".encode() + part)
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def health_content(content: PacketContent, sender: str, recipient: str, seed: str) -> bytes:
    """The ``multipart/mixed`` entity that gets signed."""
    note = (f"Referral {content.referral_id}: the referral packet is attached as an IHE XDM zip"
            + (" and as a C-CDA document." if content.include_bare_cda else "."))
    attachments = [("application/zip", "referral.zip", build_xdm_for(content, sender, recipient))]
    if content.include_bare_cda:
        attachments.append(("application/xml", "referral-note.xml", content.cda))
    return _mixed(seed, note, attachments)


def answer_content(content: AnswerContent, sender: str, recipient: str, seed: str) -> bytes:
    """An answer's entity: the XDM (360X), and the Consultation Note bare for recipients without XDM."""
    note = f"Referral {content.referral_id}: {content.title}, attached as an IHE XDM zip."
    attachments = [("application/zip", "answer.zip", build_xdm_answer(content, sender, recipient))]
    if content.cda is not None:
        attachments.append(("application/xml", "consultation-note.xml", content.cda))
    return _mixed(seed, note, attachments)


def headers(*, sender: str, recipient: str, message_id: str, date: float, subject: str,
            final_delivery: bool, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [("From", sender), ("To", recipient), ("Date", formatdate(date, usegmt=True)),
             ("Message-ID", message_id), ("Subject", subject), ("MIME-Version", "1.0")]
    if final_delivery:
        lines.append(("Disposition-Notification-Options", FINAL_DELIVERY_OPTION))
    lines += list(extra)
    text = "".join(f"{k}: {v}\r\n" for k, v in lines)
    return text.encode("ascii")  # ETT DTS 196: headers are ASCII; a non-ASCII value is a bug upstream


def seal(entity: bytes, *, outer_headers: bytes, signer: x509.Certificate, key, chain: Sequence[x509.Certificate],
         recipient_certs: Sequence[x509.Certificate], cipher: str, key_transport: str, wrapped: bool = False) -> bytes:
    """Sign *entity*, encrypt it to *recipient_certs*, put *outer_headers* on top: the message's bytes."""
    if wrapped:
        entity = b"Content-Type: message/rfc822\r\n\r\n" + outer_headers + entity
    signed = smime.sign(entity, signer, key, chain)
    return outer_headers + smime.encrypt(signed, recipient_certs, cipher=cipher, key_transport=key_transport)


def answer_message(content: AnswerContent, *, sender: str, recipient: str, message_id: str, date: float,
                   signer: x509.Certificate, key, chain: Sequence[x509.Certificate],
                   recipient_certs: Sequence[x509.Certificate], cipher: str = "aes256",
                   key_transport: str = "rsa-pkcs1v15", final_delivery: bool = False) -> bytes:
    """The whole Direct message carrying one 360X answer."""
    outer = headers(sender=sender, recipient=recipient, message_id=message_id, date=date,
                    subject=f"Referral {content.referral_id}: {content.title}", final_delivery=final_delivery)
    entity = answer_content(content, sender, recipient, message_id)
    return seal(entity, outer_headers=outer, signer=signer, key=key, chain=chain, recipient_certs=recipient_certs,
                cipher=cipher, key_transport=key_transport)


def referral_message(content: PacketContent, *, sender: str, recipient: str, message_id: str, date: float,
                     signer: x509.Certificate, key, chain: Sequence[x509.Certificate],
                     recipient_certs: Sequence[x509.Certificate], cipher: str = "aes256",
                     key_transport: str = "rsa-pkcs1v15", final_delivery: bool = True,
                     wrapped: bool = False) -> bytes:
    """The whole Direct message carrying one referral packet."""
    outer = headers(sender=sender, recipient=recipient, message_id=message_id, date=date,
                    subject=f"Referral {content.referral_id}", final_delivery=final_delivery)
    entity = health_content(content, sender, recipient, message_id)
    return seal(entity, outer_headers=outer, signer=signer, key=key, chain=chain, recipient_certs=recipient_certs,
                cipher=cipher, key_transport=key_transport, wrapped=wrapped)
