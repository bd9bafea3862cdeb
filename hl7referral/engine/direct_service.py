"""Direct as a Twisted service: the outbox worker, MDN timers, the SMTP listener.

It moves bytes and time around :class:`~hl7referral.engine.direct.DirectAgent`:
the agent's work (packets, store writes, decrypting) runs on one thread of its
own, SMTP runs on the reactor, and the timers run on the injected clock (a
``twisted.internet.task.Clock`` in tests).

Invariants
----------
* Inbound mail is committed to the store before the SMTP listener answers 250;
  opening it happens afterwards, so a crash in between loses nothing (mail still
  ``received`` is opened at the next tick).
* Mail received meanwhile is opened together: decrypted and verified outside any
  transaction, then up to ``MAIL_BATCH`` act in one (one fsync for a burst of MDNs);
  a group that fails is redone one mail at a time, so a bad mail is marked ``error``
  and the others are processed.
* One send per outbox row at a time; a row is sent again only after the previous
  attempt's result is recorded.
* Without a usable identity (certificate, key) the service stays up with Direct
  off: referrals go to their channel's next transport, and the reason is logged
  once at start.
"""

from __future__ import annotations

import json
import os
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..config import EngineConfig
from ..loop import inbound as inbound_reader
from ..loop.reread import read_documents
from ..loop.states import Kind
from ..loop.tracker import Tracker
from ..direct import packet
from ..direct.mdn import wants_final_delivery
from ..store import Store
from ..store.outbox import Outbox
from ..store.relay import INITIATOR, Relay
from . import smtp_client
from .direct import DirectAgent, DirectUnavailable, Enqueued, Skipped, utc
from . import answering
from .inbound import InboundReferrals
from .ingest import hl7_timestamp, iso_timestamp

TICK = 1.0  # seconds between outbox and timer checks
MAIL_BATCH = 64   # received mails acting in one transaction at most (bounds how long it holds the write lock)


class DirectService(Service):
    log = Logger()

    def __init__(self, config: EngineConfig, store: Store, reactor, *, clock=None, send=None,
                 interval: float = TICK) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        self.outbox = Outbox(store)
        self.agent = DirectAgent(config.direct, self.outbox, local_root=config.local_root)
        self.agent.fax_after_direct = {c.name for c in config.channels if "direct" in c.transports
                                       and "fax" in c.transports[c.transports.index("direct") + 1:]}
        self.channels = {c.name: c for c in config.channels}
        self.tracker = Tracker(store, config.loop)   # on the Direct thread, with its connection
        self.agent.on_documents = self._loop_documents
        self.inbound = InboundReferrals(config, store)   # referrals sent to us (we are the specialist)
        self.relay = Relay(store)
        self._validator = None   # built on the Direct thread when the first document must leave
        self.on_note = None   # (referral id, note id), called on the reactor: the note's way back
        self.send = send or smtp_client.send
        self.enabled = False
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="hl7referral-direct")
        self.loop = LoopingCall(self.tick)
        self.loop.clock = self.clock
        self.interval = interval
        self.port = None
        self.ready: Deferred = Deferred()
        self._ticking = False
        self._sending: set[int] = set()
        self.on_forward = None   # called (reactor thread) after a referral for our EHR was queued
        self.on_fax = None  # called (reactor thread) after a referral was queued for fax: the fax worker's tick

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        try:
            self.agent.load()
            self.enabled = True
            relay = self.config.direct.relay
            self.log.info("Direct: sending as {addr}; relay {relay}", addr=self.config.direct.address,
                          relay=f"{relay.host}:{relay.port}" if relay.host else "none (packets wait in the outbox)")
        except DirectUnavailable as exc:
            self.log.warn("Direct transport off: {why}", why=str(exc))
        self.pool.start()
        self.loop.start(self.interval, now=True)
        box = self.config.direct.mailbox
        if self.enabled and box.get("host"):
            from .mailbox import MailboxConfig, POP3Poller
            password = os.environ.get(box.get("password_env", ""), "") if box.get("password_env") else ""
            poller = POP3Poller(self.reactor, MailboxConfig(
                host=box["host"], port=int(box.get("port", 995)), username=box.get("username", ""),
                password=password, tls=box.get("tls", "implicit"), ca_file=box.get("ca_file", ""),
                interval=float(box.get("interval", 60.0))), self._accept, self.config.direct.address)
            self.mailbox_loop = LoopingCall(poller.poll)
            self.mailbox_loop.clock = self.clock
            self.mailbox_loop.start(float(box.get("interval", 60.0)), now=True)
            self.log.info("Direct: polling POP3 mailbox {host}:{port}", host=box["host"], port=box.get("port"))
        endpoint = self.config.direct.inbound_endpoint
        if self.enabled and endpoint:
            from .smtp_server import InboundSMTPFactory, listen
            factory = InboundSMTPFactory(self._accept, domains=self.config.direct.inbound_domains,
                                         max_size=self.config.direct.inbound_max_size)
            d = listen(self.reactor, endpoint, factory)
            d.addCallback(self._listening)
            d.addErrback(self.ready.errback)
        else:
            self.ready.callback(None)

    def _listening(self, port) -> None:
        self.port = port
        addr = port.getHost()
        self.log.info("Direct: SMTP listener on {host}:{port} for {domains}", host=addr.host, port=addr.port,
                      domains=", ".join(self.config.direct.inbound_domains))
        self.ready.callback(port)

    @inlineCallbacks
    def stopService(self):
        yield super().stopService()
        for loop in (self.loop, getattr(self, "mailbox_loop", None)):
            if loop is not None and loop.running:
                loop.stop()
        if self.port is not None:
            yield self.port.stopListening()
        self.pool.stop()

    def _thread(self, fn, *args, **kw) -> Deferred:
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kw)

    # -- the loop ----------------------------------------------------------------------

    def _loop_documents(self, documents, content: bytes, mail_id: int, now: float, sender: str = ""):
        """Direct thread: a referral sent to us, or a 360X answer (v2 messages, C-CDA documents) applied
        to its referral. Runs inside the transaction that marks the mail processed."""
        if inbound_reader.is_referral(documents):
            ref = inbound_reader.read_inbound(documents, local_root=self.config.local_root)
            self.inbound.receive(ref, sender=sender, mail_id=mail_id, raw=content, now=now)
            return (lambda: self.reactor.callFromThread(self.on_forward)) if self.on_forward else None
        obs = read_documents(documents, osu_tables=self.config.loop.osu, zone=self.config.loop.calendar.zone,
                             local_root=self.config.local_root)
        if obs is None:
            return
        out = self.tracker.observe(obs, now=utc(now), origin=f"mail #{mail_id}", raw=content)
        if out.referral_id is None:
            self.log.warn("ALERT Direct mail #{mid} ({type}) parked in the work queue #{item}: {why}", mid=mail_id,
                          type=obs.message_type, item=out.workqueue_id, why=out.reason)
            return
        self.log.info("referral {ref}: {type} by Direct (mail #{mid}) {before} -> {after}", ref=out.referral_id,
                      type=obs.message_type, mid=mail_id, before=out.before.value, after=out.after.value)
        # A referral sent to us: what the initiator says that our EHR must hear (a cancel request).
        message = next((d for _, d in documents if d.lstrip()[:4] == b"MSH|"), None)
        if answering.forward_from_partner(self.tracker.loop.store, self.config, referral_id=out.referral_id,
                                          obs=obs, now_hl7=hl7_timestamp(now), at=iso_timestamp(now), now=now,
                                          raw=message):
            return (lambda: self.reactor.callFromThread(self.on_forward)) if self.on_forward else None
        if out.note_id is not None and self.on_note is not None and \
                any(e.kind == Kind.CONSULT_NOTE for e in obs.events):
            return lambda: self.reactor.callFromThread(self.on_note, out.referral_id, out.note_id)

    # -- outbound --------------------------------------------------------------------

    def dispatch(self, *, document_id: int, channel: str, referral_id: str, cda: bytes, raw: bytes,
                 destination, referral) -> Deferred:
        """A ready Referral Note: hand it to the channel's transports, in order (runs on the Direct thread)."""
        d = self._thread(self._dispatch, document_id, channel, referral_id, cda, raw, destination, referral)

        def queued(transport):
            if transport == "fax" and self.on_fax is not None:
                self.on_fax()
            return transport
        return d.addCallback(queued)

    def _dispatch(self, document_id, channel_name, referral_id, cda, raw, destination, referral) -> str:
        now = self.clock.seconds()
        at = iso_timestamp(now)
        channel = self.channels.get(channel_name)
        transports = channel.transports if channel else ()
        reasons = []
        for transport in transports:
            if transport == "direct":
                if not self.enabled:
                    reasons.append("Direct is off")
                    self.outbox.audit(event="direct-skipped", at=at, detail="Direct is off (see the log at start)",
                                      referral_id=referral_id)
                    continue
                order = raw if channel and channel.sends_order else None
                result = self.agent.enqueue_referral(
                    referral_id=referral_id, document_id=document_id, channel=channel_name, cda=cda, order=order,
                    patient_id=packet.patient_cx(referral), recipient=getattr(destination, "direct", ""), now=now)
                if isinstance(result, Enqueued):
                    # Where a cancel from our EHR goes (the partner of a referral we initiated).
                    self.relay.set_side(referral_id, INITIATOR, getattr(destination, "direct", ""), at=at)
                    return "direct"
                reasons.append(result.reason)
                self.outbox.audit(event="direct-skipped", at=at, detail=result.reason, referral_id=referral_id)
            elif transport == "fax":
                number = getattr(destination, "fax", "")
                if not number:
                    reasons.append("no fax number for the destination")
                    continue
                self.agent.enqueue_fax(referral_id=referral_id, document_id=document_id, channel=channel_name,
                                       number=number, now=now,
                                       detail="; ".join(reasons) or "fax is the channel's first transport")
                return "fax"
        why = "; ".join(reasons) or f"channel {channel_name} has no transports"
        self.log.warn("ALERT referral {ref}: no transport can carry it: {why}", ref=referral_id, why=why)
        self.outbox.alert(kind="no-transport", referral_id=referral_id, channel=channel_name, at=at,
                          text=f"no transport can carry the referral: {why}")
        return ""

    def tick(self) -> Deferred | None:
        """Open received mail, fire due MDN timeouts, send due outbox rows."""
        if self._ticking or not self.enabled:
            return None
        self._ticking = True
        now = self.clock.seconds()
        d = self._thread(self._housekeeping, now)
        d.addCallback(self._send_due)
        d.addErrback(lambda f: self.log.failure("Direct tick failed", f))
        d.addBoth(self._ticked)
        return d

    def _ticked(self, result):
        self._ticking = False
        return result

    def _housekeeping(self, now: float) -> list[dict]:
        self._open_received(now)
        self.agent.check_timeouts(now)
        self._pack_answers(now)
        if not self.config.direct.relay.host:
            return []
        return [r for r in self.outbox.due(now) if r["id"] not in self._sending]

    def _check_document(self, document: bytes) -> str:
        """A Consultation Note is checked like the Referral Note (CDA schema, R2.1 Schematron) before it
        leaves; '' when it passes, else why not. Another C-CDA (the EHR's own) gets the schema."""
        if self._validator is None:
            if self.config.standards_dir is None:
                return "no standards directory configured: the Consultation Note cannot be validated"
            from ..cda.validate import Validator
            self._validator = Validator(self.config.standards_dir, cache_dir=self.config.schematron_cache)
        from ..cda.consult_note import CONSULTATION_NOTE
        consult = CONSULTATION_NOTE[0].encode() in document[:20000]
        report = self._validator.validate(document, expect=CONSULTATION_NOTE if consult else None,
                                          schematron=consult, source="consultation note")
        return "" if report.ok else "; ".join(report.lines()[:5])

    def _dispatched(self, row: dict, contact: dict, now: float) -> None:
        """The referral is in our EHR: the dispatched MDN its sender asked for (final delivery)."""
        at = iso_timestamp(now)
        mail = self.outbox.get_mail(contact["mail_id"]) if contact.get("mail_id") else None
        with self.outbox.store.atomic():
            outbox_id = 0
            if mail is not None:
                outer = BytesHeaderParser(policy=compat32).parsebytes(mail["raw"])
                if wants_final_delivery(outer):
                    result = self.agent.queue_mdn(outer, "dispatched", now, mail["id"])
                    outbox_id = result.id if isinstance(result, Enqueued) else 0
            self.relay.packed(row["id"], outbox_id=outbox_id, at=at)

    def _pack_answers(self, now: float) -> None:
        """360X answers owed to initiators (store/relay.py) into signed, encrypted packets."""
        for row in self.relay.pending():
            referral = self.tracker.loop.get(row["referral_id"]) or {}
            contact = json.loads(referral.get("contact") or "{}")
            at = iso_timestamp(now)
            if row["kind"] == "DISPATCHED":
                self._dispatched(row, contact, now)
                continue
            invalid = self._check_document(row["document"]) if row["document"] else ""
            if invalid:
                self.relay.failed(row["id"], error=f"not valid: {invalid}", at=at,
                                  owner=self.config.loop.owner_of(referral))
                self.log.warn("ALERT referral {ref}: {kind} answer not sent: its document is not valid",
                              ref=row["referral_id"], kind=row["kind"])
                continue
            with self.outbox.store.atomic():
                result = self.agent.enqueue_answer(row, patient_id=contact.get("patient_cx", ""), now=now)
                if isinstance(result, Skipped):
                    self.relay.failed(row["id"], error=result.reason, at=at,
                                      owner=self.config.loop.owner_of(referral))
                    self.log.warn("ALERT referral {ref}: {kind} answer not sent: {why}", ref=row["referral_id"],
                                  kind=row["kind"], why=result.reason)
                    continue
                self.relay.packed(row["id"], outbox_id=result.id, at=at)
            self.log.info("referral {ref}: {kind} answer packed for {to} (outbox #{oid})", ref=row["referral_id"],
                          kind=row["kind"], to=row["recipient"], oid=result.id)

    def _send_due(self, rows: list[dict]) -> Deferred:
        relay_cfg = self.config.direct.relay
        relay = smtp_client.Relay(host=relay_cfg.host, port=relay_cfg.port, starttls=relay_cfg.starttls,
                                  username=relay_cfg.username,
                                  password=os.environ.get(relay_cfg.password_env, "") if relay_cfg.password_env
                                  else "", ca_file=str(relay_cfg.ca_file or ""), helo=relay_cfg.helo,
                                  timeout=relay_cfg.timeout)
        sends = []
        for row in rows:
            self._sending.add(row["id"])
            d = self.send(self.reactor, relay, row["sender"], [row["recipient"]], row["payload"], row["message_id"])
            d.addCallback(lambda result, row=row: self._thread(
                self.agent.on_send_result, row, result, self.clock.seconds()))
            d.addErrback(lambda f, row=row: self.log.failure("sending outbox #{id} failed", f, id=row["id"]))
            d.addBoth(lambda _, row=row: self._sending.discard(row["id"]))
            sends.append(d)
        return DeferredList(sends) if sends else succeed(None)

    # -- inbound ---------------------------------------------------------------------

    def _accept(self, mail_from: str, rcpt_to: list[str], data: bytes) -> Deferred:
        """The SMTP listener's callback: commit the mail; the 250 waits for this Deferred."""
        now = self.clock.seconds()
        message_id = smtp_client.header_message_id(data)
        d = self._thread(self.outbox.save_mail, mail_from=mail_from, rcpt_to=list(rcpt_to), raw=data,
                         message_id=message_id, at=iso_timestamp(now))

        def opened_later(mail_id):
            # After the 250: open what has arrived (this mail, and any committed while it waited: they
            # share a transaction). A failure here leaves it "received", opened again at the next tick.
            self._thread(lambda: self._open_received(self.clock.seconds())).addErrback(
                lambda f: self.log.failure("opening mail #{mid} failed", f, mid=mail_id))
            return mail_id
        d.addCallback(opened_later)
        return d

    def _open_received(self, now: float) -> None:
        """Open the mail still ``received``: each is decrypted and verified outside any transaction,
        then up to MAIL_BATCH act in one (one fsync: under load, MDNs and answers are applied in
        groups, as LoopService groups MLLP loop messages, and the write lock is held only for the
        writes). If a group fails, each of its mails is opened alone, so a bad mail is marked and
        the others go on. What must wait for the commit (another thread told of a note or a
        forward) runs after it."""
        while True:
            mails = self.outbox.unprocessed_mail(limit=MAIL_BATCH)
            if not mails:
                return
            acts = []
            for mail in mails:
                try:
                    acts.append((mail, self.agent.open(mail, now)))
                except Exception:  # noqa: BLE001 - opened alone below, where the failure is marked
                    self._receive(mail, now)
            later: list = []
            try:
                self.agent.after_commit = later
                with self.outbox.store.atomic():
                    results = [(mail, act()) for mail, act in acts]
            except Exception:  # noqa: BLE001 - retried one by one below, where each failure is marked
                later, results = [], []
                self.agent.after_commit = None
                for mail, _ in acts:
                    self._receive(self.outbox.get_mail(mail["id"]), now)
            finally:
                self.agent.after_commit = None
            for mail, result in results:
                self._logged(mail, result)
            for fn in later:
                fn()
            if len(mails) < MAIL_BATCH:
                return

    def _logged(self, mail: dict, result) -> None:
        self.log.info("inbound mail #{mid}: {kind} {status} {detail}", mid=mail["id"], kind=result.kind,
                      status=result.status, detail=result.detail)

    def _receive(self, mail: dict, now: float) -> None:
        if mail is None or mail["status"] != "received":
            return
        try:
            result = self.agent.receive(mail, now)
        except Exception as exc:  # noqa: BLE001 - a hostile mail must not stop the others; it is kept and marked
            self.outbox.update_mail(mail["id"], event="mail-error", at=iso_timestamp(now), status="error",
                                    detail=f"{type(exc).__name__}: {exc}"[:300])
            self.log.failure("inbound mail #{mid} could not be processed", mid=mail["id"])
            return
        self._logged(mail, result)
