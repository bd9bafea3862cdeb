"""The Direct agent: what the engine does with packets out and mail in, without the reactor.

Every method is synchronous and runs on a worker thread (the Twisted service in
:mod:`hl7referral.engine.direct_service` moves bytes and time around it). Time
comes in as ``now`` (seconds from the engine's one clock); nothing here reads
the wall clock.

Invariants
----------
* No usable certificate for the recipient (trusted, bound, RSA ≥ 2048, key
  encipherment) → the Direct send is not attempted; the referral goes to the
  channel's next transport, and the reason is in the audit trail.
* Outbound state changes follow :func:`hl7referral.direct.tracking.step` only
  (QUEUED → SENT → MDN_PROCESSED → MDN_DISPATCHED, or FAILED / TIMED_OUT).
* Inbound mail is already committed when :meth:`DirectAgent.receive` runs; a
  message that fails decryption, signature or trust is kept with the reason and
  audited, and gets no processed MDN.
* An MDN moves only the outbox row whose Message-ID it names; an MDN for an
  unknown Message-ID, or a second copy, changes nothing but the audit trail.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parseaddr
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger

from ..config.direct import DirectConfig
from ..direct import mdn as mdnlib
from ..direct import packet, smime, tracking
from ..direct.discovery import CertificateFinder, DnsCertLookup, LocalCertStore
from ..direct.trust import Anchors, TrustError, TrustPolicy, check_sender, load_certificates, load_crls
from ..direct.xdm import XdmError, read_xdm
from ..store.outbox import Enqueued, Outbox
from .ingest import hl7_timestamp, iso_timestamp

State, Event = tracking.State, tracking.Event
REPORTING_UA = "hl7referral"
# The Subject of an answer's packet (no patient data), by the loop event it reports.
ANSWER_TITLES = {"ACCEPTED": "Referral accepted", "DECLINED": "Referral declined", "BOOKED": "Appointment booked",
                 "NO_SHOW": "Patient did not attend", "APPOINTMENT_CANCELLED": "Appointment cancelled",
                 "CANCEL_CONFIRMED": "Cancellation confirmed", "CANCEL_REFUSED": "Cancellation refused",
                 "CANCEL_REQUESTED": "Cancellation requested", "CONSULT_NOTE": "Consultation note",
                 "INTERIM_NOTE": "Interim consultation note"}


class DirectUnavailable(Exception):
    """The Direct transport cannot run (no certificate, unreadable key...): one line saying why."""


@dataclass(frozen=True)
class Skipped:
    reason: str


@dataclass(frozen=True)
class Received:
    """What became of one inbound mail."""

    kind: str            # "mdn" | "direct" | "rejected"
    status: str          # mail.status: mdn-matched|-unmatched|-duplicate|-late, delivered, stored, rejected
    detail: str = ""
    outbox_id: int | None = None


def utc(now: float) -> dt.datetime:
    """Seconds from the engine's clock as the aware datetime the trust checks take."""
    return dt.datetime.fromtimestamp(now, dt.timezone.utc)


class DirectAgent:
    log = Logger()

    def __init__(self, config: DirectConfig, outbox: Outbox | None, *, local_root: str = "2.16.840.1.113883.19",
                 finder: CertificateFinder | None = None) -> None:
        self.config = config
        self.outbox = outbox
        self.local_root = local_root
        self.finder = finder
        self.certificate: x509.Certificate | None = None
        self.key = None
        self.chain: list[x509.Certificate] = []
        self.anchors: Anchors | None = None
        self.policy: TrustPolicy | None = None
        # Channels whose transports list fax after direct (None: every channel, as in unit tests).
        self.fax_after_direct: set[str] | None = None
        # (documents, content, mail id, now, sender=) -> None: a referral for us, or an answer for the loop
        # tracker (DirectService sets it); called inside the transaction that marks the mail processed, it
        # may return a callable to run once that transaction is committed.
        self.on_documents = None
        self.after_commit: list | None = None   # set while a group of mails shares one transaction

    # -- set-up -------------------------------------------------------------------------

    def load(self) -> None:
        c = self.config
        if not c.address:
            raise DirectUnavailable("direct.address is not set")
        for what, p in (("direct.certificate", c.certificate), ("direct.key", c.key)):
            if p is None or not p.is_file():
                raise DirectUnavailable(f"{what} {p or '(not set)'} not found")
        try:
            self.certificate = load_certificates(c.certificate)[0]
            self.key = serialization.load_pem_private_key(c.key.read_bytes(), password=None)
            self.chain = [cert for p in c.chain for cert in load_certificates(p)]
            self.anchors = Anchors.load({d: list(files) for d, files in c.anchors.items()})
            self.policy = TrustPolicy(revocation=c.revocation, crls=load_crls([p for p in c.crls if p.is_file()]))
        except (OSError, ValueError, TrustError) as exc:
            raise DirectUnavailable(f"cannot load the Direct identity or trust: {exc}") from None
        if self.finder is None:
            sources: list = []
            if c.certificates_dir and c.certificates_dir.is_dir():
                sources.append(LocalCertStore(c.certificates_dir))
            if c.dns:
                host, _, port = c.dns.rpartition(":") if ":" in c.dns else (c.dns, "", "53")
                sources.append(DnsCertLookup(host, int(port or 53)))
            self.finder = CertificateFinder(sources, self.anchors, self.policy)

    # -- outbound -------------------------------------------------------------------------

    def enqueue_referral(self, *, referral_id: str, document_id: int | None, channel: str, cda: bytes,
                         order: bytes | None, patient_id: str, recipient: str, now: float,
                         created: str = "") -> Enqueued | Skipped:
        """Build the packet for *recipient* and put it in the outbox (or say why Direct cannot carry it)."""
        if not recipient:
            return Skipped("no Direct address for the destination")
        found = self.finder.find(recipient, utc(now))
        if not found.usable:
            why = "; ".join(f"{subject}: {d.code}" for subject, d in found.rejected) or "none found"
            return Skipped(f"no usable certificate for {recipient} ({why})")
        attempt = self.outbox.attempts_for(referral_id, "direct") + 1
        key = f"{referral_id}/direct/{attempt}"
        message_id = packet.message_id_for(key, self.config.domain)
        content = packet.PacketContent(referral_id=referral_id, cda=cda, created=created or hl7_timestamp(now),
                                       patient_id=patient_id, order=order, source_oid=self.local_root,
                                       include_bare_cda=self.config.include_bare_cda)
        try:
            eml = packet.referral_message(content, sender=self.config.address, recipient=recipient,
                                          message_id=message_id, date=now, signer=self.certificate, key=self.key,
                                          chain=self.chain, recipient_certs=found.usable[:1],
                                          cipher=self.config.cipher, key_transport=self.config.key_transport,
                                          final_delivery=self.config.request_final_delivery)
        except (XdmError, smime.SmimeError, ValueError) as exc:
            # e.g. no patient id for the XDM metadata: the next transport takes it, with the reason audited.
            return Skipped(f"the Direct packet cannot be built: {exc}")
        return self.outbox.enqueue(key=key, referral_id=referral_id, document_id=document_id, channel=channel,
                                   transport="direct", kind="referral", sender=self.config.address,
                                   recipient=recipient, message_id=message_id, payload=eml, at=iso_timestamp(now),
                                   now=now, final_delivery=self.config.request_final_delivery)

    def enqueue_answer(self, row: dict, *, patient_id: str, now: float) -> Enqueued | Skipped:
        """A relay row (store/relay.py: a 360X answer owed to the initiator) as a Direct packet in the outbox.

        The packet's key is the relay key, so packing the same row again finds the packet already
        there; a consult note is kind ``consult-note`` (its processed MDN files the note: NOTE_FILED)."""
        recipient = row["recipient"]
        found = self.finder.find(recipient, utc(now))
        if not found.usable:
            why = "; ".join(f"{subject}: {d.code}" for subject, d in found.rejected) or "none found"
            return Skipped(f"no usable certificate for {recipient} ({why})")
        key = f"relay/{row['key']}"
        message_id = packet.message_id_for(key, self.config.domain)
        content = packet.AnswerContent(referral_id=row["referral_id"], created=hl7_timestamp(now),
                                       patient_id=patient_id, message=row["message"], cda=row["document"],
                                       title=ANSWER_TITLES.get(row["kind"], row["kind"]), source_oid=self.local_root,
                                       key=row["key"])
        try:
            eml = packet.answer_message(content, sender=self.config.address, recipient=recipient,
                                        message_id=message_id, date=now, signer=self.certificate, key=self.key,
                                        chain=self.chain, recipient_certs=found.usable[:1], cipher=self.config.cipher,
                                        key_transport=self.config.key_transport, final_delivery=False)
        except (XdmError, smime.SmimeError, ValueError) as exc:
            return Skipped(f"the Direct packet cannot be built: {exc}")
        # Only the consult note (the outcome) files anything at the initiator: its processed MDN is
        # NOTE_FILED here. Answers ask for no dispatched MDN (the initiator's engine is their final
        # destination: it sends processed only).
        return self.outbox.enqueue(key=key, referral_id=row["referral_id"], document_id=None, channel="",
                                   transport="direct", kind="consult-note" if row["kind"] == "CONSULT_NOTE"
                                   else "answer", sender=self.config.address, recipient=recipient,
                                   message_id=message_id, payload=eml, at=iso_timestamp(now), now=now,
                                   final_delivery=False, detail=f"{row['kind']} for {recipient}")

    def _move(self, row: dict, event: tracking.Event, now: float, detail: str, mail_id: int | None = None,
              **fields) -> tracking.Transition:
        t = tracking.step(State(row["state"]), event, final_delivery_requested=bool(row["final_delivery"]))
        fields = dict(fields)
        if t.state.value != row["state"]:
            fields["state"] = t.state.value
        if t.state == State.MDN_PROCESSED and row["state"] != State.MDN_PROCESSED.value:
            fields.setdefault("processed_at", now)
        if t.state == State.MDN_DISPATCHED:
            fields.setdefault("dispatched_at", now)
        sent_at = fields.get("sent_at", row.get("sent_at"))
        processed_at = fields.get("processed_at", row.get("processed_at"))
        # An MDN we send is never itself acknowledged: only packets wait for one (no false TIMED_OUT).
        if sent_at is not None and not row["kind"].startswith("mdn"):
            fields["deadline"] = tracking.deadline(
                t.state, sent_at, processed_at, processed_timeout=self.config.processed_timeout,
                dispatched_timeout=self.config.dispatched_timeout,
                final_delivery_requested=bool(row["final_delivery"]))
        self.outbox.update(row["id"], event=event.value.lower(), at=iso_timestamp(now), detail=detail,
                           mail_id=mail_id, row=row, **fields)
        self._effects(row, t, now, detail)
        return t

    def on_send_result(self, row: dict, result, now: float) -> tracking.Transition:
        """Record what the relay said about one attempt (a SendResult from the SMTP client)."""
        attempts = (row["attempts"] or 0) + 1
        detail = f"{result.code} {result.reason}".strip()
        if result.outcome == "delivered":
            return self._move(row, Event.SEND_OK, now, detail, attempts=attempts, sent_at=now, last_code=result.code,
                              last_error=None)
        if result.outcome == "retry" and attempts < self.config.max_attempts:
            delay = min(self.config.first_delay * 2 ** (attempts - 1), self.config.max_delay)
            return self._move(row, Event.SEND_RETRY, now, f"{detail}; retry in {delay:.0f} s", attempts=attempts,
                              next_attempt_at=now + delay, last_code=result.code, last_error=result.reason)
        if result.outcome == "retry":
            detail += f"; gave up after {attempts} attempts"
        return self._move(row, Event.SEND_FAILED, now, detail, attempts=attempts, last_code=result.code,
                          last_error=result.reason)

    def check_timeouts(self, now: float) -> list[int]:
        """TIMEOUT every row whose MDN deadline passed; returns their ids."""
        moved = []
        for row in self.outbox.expired(now):
            what = "processed" if row["state"] == State.SENT.value else "dispatched"
            self._move(row, Event.TIMEOUT, now, f"no {what} MDN by the deadline")
            moved.append(row["id"])
        return moved

    def _effects(self, row: dict, t: tracking.Transition, now: float, detail: str) -> None:
        at = iso_timestamp(now)
        ref = row.get("referral_id") or ""
        if "notify-sender-failure" in t.effects:
            # The failure notice to our own user (ETT 27/28): a coordinator alert naming the referral.
            self.log.warn("ALERT referral {ref}: Direct {kind} to {to} {state}: {why}", ref=ref, kind=row["kind"],
                          to=row["recipient"], state=t.state.value, why=detail)
            self.outbox.alert(kind=f"direct-{t.state.value.lower()}", referral_id=ref, channel=row.get("channel"),
                              text=f"Direct {row['kind']} to {row['recipient']} {t.state.value}: {detail}", at=at)
        if "fallback" in t.effects and row["kind"] == "referral":
            self.fallback(row, now, f"Direct {t.state.value}: {detail}")

    def fallback(self, row: dict, now: float, why: str) -> None:
        """Queue the referral for the next transport (fax), if its channel lists one after Direct."""
        channel = row.get("channel") or ""
        if self.fax_after_direct is not None and channel not in self.fax_after_direct:
            self.outbox.audit(event="no-fallback", at=iso_timestamp(now), referral_id=row.get("referral_id"),
                              detail=f"{why}; channel {channel} lists no transport after direct")
            return
        fax = ""
        if row.get("document_id"):
            doc = self.outbox.store.get_document(row["document_id"])
            fax = json.loads(doc["destination"] or "{}").get("fax", "") if doc else ""
        self.enqueue_fax(referral_id=row.get("referral_id") or "", document_id=row.get("document_id"),
                         channel=row.get("channel") or "", number=fax, now=now, detail=f"fallback: {why}")

    def enqueue_fax(self, *, referral_id: str, document_id: int | None, channel: str, number: str, now: float,
                    detail: str) -> Enqueued:
        """A fax attempt for the referral in the outbox (the next attempt number, its own idempotency key)."""
        key = f"{referral_id}/fax/{self.outbox.attempts_for(referral_id, 'fax') + 1}"
        return self.outbox.enqueue(key=key, referral_id=referral_id, document_id=document_id, channel=channel,
                                   transport="fax", kind="referral", sender="", recipient=number, message_id="",
                                   payload=b"", at=iso_timestamp(now), now=now, detail=detail)

    # -- inbound --------------------------------------------------------------------------

    def receive(self, mail: dict, now: float, send_mdn: Callable[..., None] | None = None) -> Received:
        """Open, check and act on one stored inbound mail row."""
        return self.open(mail, now, send_mdn)()

    def open(self, mail: dict, now: float, send_mdn: Callable[..., None] | None = None) -> Callable[[], Received]:
        """Decrypt, verify and read one stored inbound mail row (no store writes: the costly part, kept
        out of any transaction); returns what acts on it (the store writes), to call in one."""
        at = iso_timestamp(now)
        mail_id, raw = mail["id"], mail["raw"]
        outer = BytesHeaderParser(policy=compat32).parsebytes(raw)
        from_address = parseaddr(outer.get("From", ""))[1].lower()
        try:
            opened = smime.decrypt(raw, self.certificate, self.key)
            verified = smime.verify(opened.entity)
        except smime.SmimeError as exc:
            code, why = exc.code, str(exc)   # (exc is unbound once the except block ends)
            return lambda: self._reject(mail_id, at, from_address, code, why)
        decision = check_sender(verified.signer, verified.certificates, from_address, self.anchors, self.policy,
                                utc(now))
        if not decision.ok:
            return lambda: self._reject(mail_id, at, from_address, decision.code, decision.reason)
        trust = f"{decision.code} ({decision.binding}-bound)"
        try:
            report = mdnlib.read_if_mdn(verified.content)   # one MIME parse, not two
        except mdnlib.MdnError as exc:
            why = str(exc)

            def malformed() -> Received:
                # A broken MDN is audited, never taken for health content.
                self.outbox.update_mail(mail_id, event="mdn-malformed", at=at, status="mdn-malformed", kind="mdn",
                                        from_address=from_address, trust=trust, detail=why, processed_at=at)
                return Received("mdn", "mdn-malformed", why)
            return malformed
        if report is not None:
            return lambda: self._on_mdn(mail_id, report, from_address, trust, now)
        return lambda: self._on_content(mail_id, outer, verified.content, from_address, trust, now, send_mdn)

    def _reject(self, mail_id: int, at: str, from_address: str, code: str, reason: str) -> Received:
        self.log.warn("inbound mail #{mid} from {sender} refused: {code}: {why}", mid=mail_id, sender=from_address,
                      code=code, why=reason)
        self.outbox.update_mail(mail_id, event="mail-rejected", at=at, detail=f"{code}: {reason}", status="rejected",
                                kind="rejected", from_address=from_address, trust=code, processed_at=at)
        return Received("rejected", "rejected", f"{code}: {reason}")

    def _on_mdn(self, mail_id: int, report, from_address: str, trust: str, now: float) -> Received:
        at = iso_timestamp(now)
        row = self.outbox.by_message_id(report.original_message_id)
        common = dict(kind="mdn", from_address=from_address, trust=trust, processed_at=at,
                      original_message_id=report.original_message_id)
        if row is None:
            self.outbox.update_mail(mail_id, event="mdn-unmatched", at=at, status="mdn-unmatched",
                                    detail=f"{report.disposition} MDN for unknown {report.original_message_id}",
                                    **common)
            return Received("mdn", "mdn-unmatched", report.original_message_id)
        if row["recipient"].lower() != from_address and row["recipient"].rpartition("@")[2].lower() != \
                from_address.rpartition("@")[2]:
            # Only the recipient's organisation may report on the message we sent it.
            self.outbox.update_mail(mail_id, event="mdn-wrong-sender", at=at, status="mdn-unmatched",
                                    detail=f"MDN for {report.original_message_id} from {from_address}", **common)
            return Received("mdn", "mdn-unmatched", "from a different organisation")
        event = tracking.event_for_mdn(report)
        detail = f"{report.disposition} MDN" + (f": {report.failure}" if report.failure else "")
        # The packet's state (and the referral's receipt) and the mail's status: one transaction.
        with self.outbox.store.atomic():
            t = self._move(row, event, now, detail, mail_id=mail_id)
            audit_only = {"audit-duplicate": "mdn-duplicate", "ignore": "mdn-duplicate", "audit-late": "mdn-late",
                          "audit-other": "mdn-other"}
            status = next((audit_only[e] for e in t.effects if e in audit_only), "mdn-matched")
            self.outbox.update_mail(mail_id, event=status, at=at, status=status, outbox_id=row["id"],
                                    detail=detail, **common)
        return Received("mdn", status, detail, row["id"])

    def _on_content(self, mail_id: int, outer, content: bytes, from_address: str, trust: str, now: float,
                    send_mdn) -> Received:
        at = iso_timestamp(now)
        message_id = outer.get("Message-ID", "").strip()
        documents = _attachments(content)
        delivered = False
        if self.config.deliver_dir is not None and documents:
            target = self.config.deliver_dir / f"mail-{mail_id}"
            target.mkdir(parents=True, exist_ok=True)
            for name, data in documents:
                write_atomic(target / name, data)
            delivered = True
        status = "delivered" if delivered else "stored"
        names = ", ".join(n for n, _ in documents) or "no documents"
        # The mail is processed in the transaction that records what it carries (a referral sent
        # to us, an answer applied, a parked item): a crash leaves it "received", opened again.
        after = None
        with self.outbox.store.atomic():
            self.outbox.update_mail(mail_id, event=f"direct-{status}", at=at, status=status, kind="direct",
                                    from_address=from_address, trust=trust, processed_at=at, detail=names)
            if documents and self.on_documents is not None:
                # A referral for us is recorded; 360X answers (OSU, MDM, a Consultation Note) move
                # their referral; unknown ones are parked.
                after = self.on_documents(documents, content, mail_id, now, sender=from_address)
        if after is not None:
            # What must wait for the commit (another thread reads what was written): now, or after the
            # group of mails this one is opened with (DirectService._open_received).
            if self.after_commit is not None:
                self.after_commit.append(after)
            else:
                after()
        if message_id and from_address:
            self.queue_mdn(outer, "processed", now, mail_id)
            if delivered and mdnlib.wants_final_delivery(outer):
                self.queue_mdn(outer, "dispatched", now, mail_id)
        return Received("direct", status, names)

    def queue_mdn(self, original, disposition: str, now: float, mail_id: int, failure: str = "") -> Enqueued | Skipped:
        """A signed and encrypted MDN back to the sender of *original* (headers of the inbound message)."""
        to = parseaddr(original.get("From", ""))[1]
        original_id = original.get("Message-ID", "").strip()
        key = f"mdn/{original_id}/{disposition}"
        found = self.finder.find(to, utc(now))
        if not found.usable:
            self.outbox.update_mail(mail_id, event="mdn-not-sent", at=iso_timestamp(now),
                                    detail=f"no usable certificate for {to}")
            return Skipped(f"no usable certificate for {to}")
        final = disposition == "dispatched" and mdnlib.wants_final_delivery(original)
        extra, entity = mdnlib.build_mdn(original_message_id=original_id, original_from=to,
                                         original_to=parseaddr(original.get("To", ""))[1] or self.config.address,
                                         reporting_ua=REPORTING_UA, disposition=disposition, failure=failure,
                                         final_destination_delivery=final)
        message_id = packet.message_id_for(key, self.config.domain)
        outer = packet.headers(sender=self.config.address, recipient=to, message_id=message_id, date=now,
                               subject=extra.pop("Subject", f"{disposition.capitalize()}: message delivery"),
                               final_delivery=False, extra=list(extra.items()))
        eml = packet.seal(entity, outer_headers=outer, signer=self.certificate, key=self.key, chain=self.chain,
                          recipient_certs=found.usable[:1], cipher=self.config.cipher,
                          key_transport=self.config.key_transport)
        return self.outbox.enqueue(key=key, referral_id="", document_id=None, channel="", transport="direct",
                                   kind=f"mdn-{disposition}", sender=self.config.address, recipient=to,
                                   message_id=message_id, payload=eml, at=iso_timestamp(now), now=now)


def _attachments(content: bytes) -> list[tuple[str, bytes]]:
    """The documents a Direct message carries: XDM contents when there is a zip, else its attachments."""
    from email import message_from_bytes
    msg = message_from_bytes(content, policy=compat32)
    if msg.get_content_type() == "message/rfc822" and msg.is_multipart():
        msg = msg.get_payload(0)
    found: list[tuple[str, bytes]] = []
    for i, part in enumerate(msg.walk() if msg.is_multipart() else [msg]):
        if part.is_multipart() or part.get_content_maintype() == "text" and not part.get_filename():
            continue
        data = part.get_payload(decode=True) or b""
        name = os.path.basename(part.get_filename() or f"part{i}")
        if part.get_content_type() in ("application/zip", "application/x-zip-compressed") or name.lower().endswith(
                ".zip"):
            try:
                package = read_xdm(data)
            except XdmError:
                found.append((name, data))
                continue
            found += [(os.path.basename(d.filename), d.content) for d in package.documents]
        else:
            found.append((name, data))
    return found


def write_atomic(path: Path, data: bytes) -> None:
    """*data* at *path*, whole or not at all (a reader never sees half a document), and on disk."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
