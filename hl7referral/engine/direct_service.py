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
* One send per outbox row at a time; a row is sent again only after the previous
  attempt's result is recorded.
* Without a usable identity (certificate, key) the service stays up with Direct
  off: referrals go to their channel's next transport, and the reason is logged
  once at start.
"""

from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..config import EngineConfig
from ..loop.reread import read_documents
from ..loop.states import Kind
from ..loop.tracker import Tracker
from ..direct import packet
from ..store import Store
from ..store.outbox import Outbox
from . import smtp_client
from .direct import DirectAgent, DirectUnavailable, Enqueued, utc
from .ingest import iso_timestamp

TICK = 1.0  # seconds between outbox and timer checks


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

    def _loop_documents(self, documents, content: bytes, mail_id: int, now: float) -> None:
        """Direct thread: read a 360X answer (v2 messages, C-CDA documents) and apply it to its referral."""
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
        if out.note_id is not None and self.on_note is not None and \
                any(e.kind == Kind.CONSULT_NOTE for e in obs.events):
            self.reactor.callFromThread(self.on_note, out.referral_id, out.note_id)

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
        for mail in self.outbox.unprocessed_mail():
            self._receive(mail, now)
        self.agent.check_timeouts(now)
        if not self.config.direct.relay.host:
            return []
        return [r for r in self.outbox.due(now) if r["id"] not in self._sending]

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
            # After the 250: open and act on it (a failure here leaves it "received", retried next tick).
            self._thread(lambda: self._receive(self.outbox.get_mail(mail_id), self.clock.seconds())).addErrback(
                lambda f: self.log.failure("opening mail #{mid} failed", f, mid=mail_id))
            return mail_id
        d.addCallback(opened_later)
        return d

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
        self.log.info("inbound mail #{mid}: {kind} {status} {detail}", mid=mail["id"], kind=result.kind,
                      status=result.status, detail=result.detail)
