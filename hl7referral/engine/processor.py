"""Builds the Referral Note for every accepted referral message, off the reactor.

Accepted messages of channels with a mapping go through the
:class:`~hl7referral.cda.pipeline.Pipeline` on one document thread, in
arrival order; the result (a ready document, or a parked one with its
reasons and an alert) is written by the store's writer thread.

Invariants
----------
* Nothing accepted is forgotten: at start, every accepted message without a
  document is processed again (a crash between ACK and document loses no
  referral); a message has at most one document (unique by message id).
* One message at a time: a backlog of its own feeds the document thread, so
  stopping waits only for the message in flight (the rest are recovered at
  the next start) and memory holds one batch of recovered messages at most.
* A parked document raises an alert (a row in ``alerts`` and an ALERT log
  line with the referral id and reasons, never patient data).
* With ``ack.mode = "after-mapping"`` the mapping runs before the ACK
  (:meth:`Processor.premap`), so a missing required field comes back as AE
  naming it.
"""

from __future__ import annotations

import json
from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..cda.mapping import MissingField
from ..cda.pipeline import Pipeline, Processed
from ..config import EngineConfig
from ..v2.parse import ParseError
from .ingest import hl7_timestamp, iso_timestamp


RECOVERY_BATCH = 500  # recovered messages read from the store at a time


class Processor:
    log = Logger()

    def __init__(self, config: EngineConfig, committer, reactor) -> None:
        self.config = config
        self.committer = committer
        self.reactor = reactor
        self.channels = {c.name: c for c in config.channels if c.mapping}
        self.pipeline = Pipeline(config.mappings, config.directory, validator=None, local_root=config.local_root)
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="hl7referral-documents")
        self._validator_ready = False
        self._backlog: deque[tuple[int, str, bytes | None, str]] = deque()
        self._queued: set[int] = set()  # message ids in the backlog or in flight: never built twice
        self._busy = False
        self._stopping = False
        self.counts = dict(ready=0, parked=0)
        self.on_ready = None  # called with the saved document (the transports: Direct, fax)
        self.loop = None      # the loop tracker (LoopService): opens each referral, holds those awaiting auth,
        #                       and takes the messages of tracker channels

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Deferred:
        self.pool.start()
        d = self.committer.run(lambda store: store.unprocessed(sorted(self.channels), RECOVERY_BATCH))
        d.addCallback(self._recover)
        return d

    def stop(self) -> None:
        self._stopping = True
        self._backlog.clear()  # unbuilt documents are rebuilt from the store at the next start
        self.pool.stop()

    def _recover(self, rows: list[dict]) -> None:
        if rows:
            self.log.info("processing {n} accepted message(s) that have no document yet", n=len(rows))
        for row in rows:
            self.submit(row["id"], row["channel"], row["raw"], row["charset"] or "ascii")
        if len(rows) >= RECOVERY_BATCH:
            self._backlog.append((-1, "", None, ""))  # marker: fetch the next batch when this one is done
            self._pump()

    # -- work ----------------------------------------------------------------------

    def _in_thread(self, fn, *args) -> Deferred:
        return deferToThreadPool(self.reactor, self.pool, fn, *args)

    def _ensure_validator(self) -> None:
        # Loading the schema and the compiled Schematron takes a while: do it on
        # the document thread, once, so listeners open at once. If it cannot be
        # loaded, every document is parked with that reason.
        if self._validator_ready or self.config.standards_dir is None:
            return
        from ..cda.validate import Validator
        try:
            self.pipeline.validator = Validator(self.config.standards_dir, cache_dir=self.config.schematron_cache)
        except Exception as exc:  # noqa: BLE001 - any failure here must park, not lose, referrals
            self.pipeline.validator_error = f"validator unavailable: {type(exc).__name__}: {exc}"
            self.log.error("{why}", why=self.pipeline.validator_error)
        self._validator_ready = True

    def _run(self, raw: bytes, channel_name: str, codec: str) -> Processed:
        self._ensure_validator()
        return self.pipeline.run(raw, self.channels[channel_name], now=hl7_timestamp(self.reactor.seconds()),
                                 codec=codec)

    def submit(self, message_id: int, channel_name: str, raw: bytes, codec: str = "ascii") -> None:
        if self.loop is not None and channel_name in self.loop.channels:
            self.loop.submit(message_id, channel_name, raw, codec)
            return
        if channel_name in self.channels and not self._stopping and message_id not in self._queued:
            self._queued.add(message_id)
            self._backlog.append((message_id, channel_name, raw, codec))
            self._pump()

    def _pump(self) -> None:
        if self._busy or not self._backlog or self._stopping:
            return
        message_id, channel_name, raw, codec = self._backlog.popleft()
        self._busy = True
        if raw is None:  # the recovery marker
            d = self.committer.run(lambda store: store.unprocessed(sorted(self.channels), RECOVERY_BATCH))
            d.addCallback(self._recover)
        else:
            d = self._in_thread(self._run, raw, channel_name, codec)
            d.addErrback(self._crashed, message_id, channel_name)
            d.addCallback(self._save, message_id, channel_name, raw)
            d.addErrback(self._failed, message_id, channel_name)
        d.addBoth(self._done, message_id)

    def _done(self, _, message_id: int) -> None:
        self._queued.discard(message_id)
        self._busy = False
        self._pump()

    def _crashed(self, failure, message_id: int, channel: str) -> Processed:
        # A mapping function or the builder raised: the referral was ACKed, so it
        # must not vanish. Park it with the error (no patient data in it).
        self.log.failure("building the document for message #{mid} ({ch}) failed", failure,
                         mid=message_id, ch=channel)
        return Processed("parked", reasons=[f"internal error building the document: "
                                            f"{failure.type.__name__}"])

    def _save(self, p: Processed, message_id: int, channel: str, raw: bytes = b"") -> Deferred:
        dest = p.destination
        destination = json.dumps({"name": dest.name, "direct": dest.direct, "fax": dest.fax} if dest else {})
        now = iso_timestamp(self.reactor.seconds())
        self.counts[p.status] += 1
        if p.status == "ready":
            self.log.info("referral {ref} (message #{mid}): Referral Note ready for {dest}",
                          ref=p.referral_id, mid=message_id, dest=dest.name if dest else "?")
        else:
            self.log.warn("ALERT referral {ref} (message #{mid}, channel {ch}) parked: {why}",
                          ref=p.referral_id or "?", mid=message_id, ch=channel, why="; ".join(p.reasons))
        loop = self.loop

        def save(store):
            # The referral first: if the engine stops between the two, the message is built again
            # (it has no document) and opening the referral a second time changes nothing.
            held = False
            if loop is not None and p.referral_id:
                held = loop.open_referral(store, referral_id=p.referral_id, channel=channel, message_id=message_id,
                                          referral=p.referral, destination=dest)
            return store.save_document(
                message_id=message_id, channel=channel, referral_id=p.referral_id, status=p.status,
                xml=p.document, destination=destination, reasons=p.reasons, created_at=now), held

        d = self.committer.run(save)

        def ready(result):
            document_id, held = result
            if held:
                self.log.info("referral {ref}: held for prior authorization (AUTH_PENDING)", ref=p.referral_id)
            elif p.status == "ready" and self.on_ready is not None:
                return self.on_ready(document_id=document_id, channel=channel, referral_id=p.referral_id,
                                     cda=p.document, raw=raw, destination=dest, referral=p.referral)
        return d.addCallback(ready)

    def release(self, referral_id: str) -> Deferred:
        """A referral held for authorization was approved: hand its ready document to the transports."""
        def remap(row):
            if row is None:
                self.log.warn("referral {ref}: approved, but no ready document to send", ref=referral_id)
                return None
            return self._in_thread(self._remap, row).addCallback(send, row)

        def send(mapped, row):
            referral, dest = mapped
            if self.on_ready is not None:
                return self.on_ready(document_id=row["id"], channel=row["channel"], referral_id=referral_id,
                                     cda=row["xml"], raw=row["raw"], destination=dest, referral=referral)
        return self.committer.run(lambda store: store.ready_document_for(referral_id)).addCallback(remap)

    def _remap(self, row: dict):
        # The stored document is what goes; the model only gives the transports the patient id and
        # the destination (the same mapping and directory as when it was built).
        from ..destination import resolve
        channel = self.channels[row["channel"]]
        referral = self.pipeline.mappings[channel.mapping].map_bytes(row["raw"], row["charset"] or "ascii").referral
        return referral, resolve(channel, self.config.directory, referral)

    def _failed(self, failure, message_id: int, channel: str) -> None:
        # Only the store can fail here; the message stays without a document and
        # is built again at the next start.
        self.log.failure("saving the document for message #{mid} ({ch}) failed", failure,
                         mid=message_id, ch=channel)

    def premap(self, channel_name: str, raw: bytes, codec: str) -> Deferred:
        """For ACK-after-mapping: the required fields the message lacks (empty if none)."""
        def check() -> list[MissingField]:
            mapping = self.config.mappings[self.channels[channel_name].mapping]
            try:
                return mapping.map_bytes(raw, codec).errors
            except ParseError as exc:
                return [MissingField("message", f"not parseable: {exc}", "MSH", 0)]
        return self._in_thread(check)
