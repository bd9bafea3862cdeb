"""MLLP server protocol and factory (Twisted).

The protocol only moves bytes: the framer (:mod:`hl7referral.v2.framer`) cuts
frames, :class:`~hl7referral.engine.ingest.Ingest` decides and commits, and
the protocol writes replies back.

Invariants
----------
* ACKs leave a connection in the order its messages arrived, however the
  commits interleave (a FIFO of reply slots; the head is written first).
* Reads pause while ``max_in_flight`` messages of this connection await their
  commit, so a fast pipelining sender cannot grow memory without bound.
* Memory per connection is bounded by ``max_frame_bytes`` (the framer closes
  past it) and time by three deadlines: the first complete frame within
  ``first_frame_timeout`` of connecting, every frame within ``frame_timeout``
  of its first byte (slowloris), and no more than ``idle_timeout`` of silence.
* Connections are capped in total and per peer address (refused at accept).
* Non-HL7 traffic (a TLS hello or HTTP request on a plain port, junk past
  ``max_junk_bytes``) is logged, counted and closed; it never gets an ACK.
"""

from __future__ import annotations

import hashlib
from collections import deque

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ..v2.framer import Frame, FrameAbandoned, FrameTooLarge, Junk, MissingCR, MLLPFramer, encode_frame
from .ingest import Ingest, Reply


@implementer(interfaces.IHandshakeListener)
class MLLPServerProtocol(Protocol):
    log = Logger()

    def __init__(self, factory: "MLLPServerFactory", peer: str) -> None:
        self.factory = factory
        self.settings = factory.settings
        self.peer = peer
        self.framer = MLLPFramer(self.settings.max_frame_bytes)
        self._slots: deque[list] = deque()  # [reply or None, done]
        self._junk = 0
        self._frames = 0
        self._paused = False
        self._closing = False
        self._tls_done = False
        self._timers: dict[str, object] = {}
        self._last_read = 0.0

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:
        self._last_read = self.factory.clock.seconds()
        self._arm("first", self.settings.first_frame_timeout, "no complete message within {seconds}s of connecting")
        self._arm_idle(self.settings.idle_timeout)

    def handshakeCompleted(self) -> None:
        self._tls_done = True
        cert = self.transport.getPeerCertificate()
        if cert is not None:
            der = cert.to_cryptography().public_bytes(Encoding.DER)
            self.log.info("TLS peer {peer}: subject {subject}, sha256 {fp}", peer=self.peer,
                          subject=cert.to_cryptography().subject.rfc4514_string(),
                          fp=hashlib.sha256(der).hexdigest())

    def connectionLost(self, reason=None) -> None:
        for name in list(self._timers):
            self._disarm(name)
        self.factory.forget(self)
        if self.factory.tls and not self._tls_done:
            self.factory.counts["tls_failed"] += 1
            self.log.warn("TLS handshake with {peer} failed: {reason}", peer=self.peer,
                          reason=reason.getErrorMessage() if reason else "closed")

    # -- timers --------------------------------------------------------------

    def _arm(self, name: str, seconds: float, why: str) -> None:
        self._disarm(name)
        if seconds and seconds > 0:
            self._timers[name] = self.factory.clock.callLater(seconds, self._expired, name, why.format(seconds=seconds))

    def _disarm(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _arm_idle(self, seconds: float) -> None:
        # Armed once and moved only when it fires: re-creating a timer on every
        # read cost more than anything else the protocol does per message.
        if self.settings.idle_timeout:
            self._timers["idle"] = self.factory.clock.callLater(seconds, self._idle_check)

    def _idle_check(self) -> None:
        self._timers.pop("idle", None)
        quiet = self.factory.clock.seconds() - self._last_read
        limit = self.settings.idle_timeout
        if quiet >= limit:
            self._expired("idle", f"idle for {limit:g}s")
        else:
            self._arm_idle(limit - quiet)

    def _expired(self, name: str, why: str) -> None:
        self._timers.pop(name, None)
        self.factory.counts["timeouts"] += 1
        self.log.info("closing connection from {peer}: {why}", peer=self.peer, why=why)
        self._abort()

    # -- bytes in ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_read = self.factory.clock.seconds()
        for event in self.framer.feed(data):
            if isinstance(event, Frame):
                self._frames += 1
                self._disarm("first")
                self._dispatch(event.payload)
            elif isinstance(event, Junk):
                self._on_junk(event)
            elif isinstance(event, FrameAbandoned):
                self.factory.counts["abandoned"] += 1
                self.log.warn("partial frame of {n} bytes from {peer} dropped: <VT> inside an open frame",
                              n=event.length, peer=self.peer)
            elif isinstance(event, MissingCR):
                self.log.info("frame from {peer} ended <FS> without <CR>; accepted", peer=self.peer)
            elif isinstance(event, FrameTooLarge):
                self.factory.counts["oversized"] += 1
                # Stop reading first: the reply may close the connection at once.
                self.transport.pauseProducing()
                self._closing = True
                self._enqueue(self.factory.ingest.oversized(event.prefix, event.limit, self.peer))
                break
            if self._closing:
                break
        if self.framer.in_frame:
            if "frame" not in self._timers:
                self._arm("frame", self.settings.frame_timeout, "message incomplete {seconds}s after it began")
        else:
            self._disarm("frame")

    def _on_junk(self, event: Junk) -> None:
        self._junk += event.length
        self.factory.counts["junk_bytes"] += event.length
        sample = event.sample
        if self._frames == 0 and self._junk == event.length and (
                sample.startswith(b"\x16\x03") or sample[:4] in (b"GET ", b"POST", b"PUT ", b"HEAD")):
            what = "a TLS handshake" if sample.startswith(b"\x16") else "an HTTP request"
            self.log.warn("{what} from {peer} on a plain MLLP port; closing", what=what, peer=self.peer)
            self.factory.counts["not_hl7"] += 1
            self._abort()
            return
        self.log.debug("{n} bytes outside any frame from {peer}", n=event.length, peer=self.peer)
        if self._junk > self.settings.max_junk_bytes:
            self.log.warn("closing {peer}: {n} bytes outside frames (limit {limit})", peer=self.peer,
                          n=self._junk, limit=self.settings.max_junk_bytes)
            self._abort()

    def _dispatch(self, payload: bytes) -> None:
        self._enqueue(self.factory.ingest.receive(payload, self.peer))
        if len(self._slots) >= self.settings.max_in_flight and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    # -- replies out, in order -------------------------------------------------

    def _enqueue(self, d) -> None:
        slot: list = [None, False]
        self._slots.append(slot)
        d.addCallback(self._resolved, slot)
        d.addErrback(self._failed, slot)

    def _resolved(self, reply: Reply, slot: list) -> None:
        slot[0], slot[1] = reply, True
        self._flush()

    def _failed(self, failure, slot: list) -> None:
        self.log.failure("reply for a message from {peer} failed", failure, peer=self.peer)
        slot[0], slot[1] = Reply(None, close=True), True
        self._flush()

    def _flush(self) -> None:
        slots = self._slots
        while slots and slots[0][1]:
            reply: Reply = slots.popleft()[0]
            if self.transport is None or not self.connected:
                continue
            if reply.ack is not None:
                self.transport.write(encode_frame(reply.ack))
            if reply.close:
                self._closing = True
        if self._closing and not slots:
            if self.transport is not None:
                self.transport.loseConnection()
        elif self._paused and len(slots) < self.settings.max_in_flight // 2 + 1 and not self._closing:
            self._paused = False
            self.transport.resumeProducing()

    def _abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abortConnection()


class MLLPServerFactory(Factory):
    """One per listener: caps connections and shares the listener's Ingest."""

    log = Logger()

    def __init__(self, settings, ingest: Ingest, clock, tls: bool = False) -> None:
        self.settings = settings
        self.ingest = ingest
        self.clock = clock
        self.tls = tls
        self.connections: set[MLLPServerProtocol] = set()
        self.per_peer: dict[str, int] = {}
        self.counts = dict(refused=0, timeouts=0, junk_bytes=0, abandoned=0, oversized=0,
                           not_hl7=0, tls_failed=0)

    def buildProtocol(self, addr):
        host = getattr(addr, "host", str(addr))
        if len(self.connections) >= self.settings.max_connections:
            self.counts["refused"] += 1
            self.log.warn("refusing {peer}: {n} connections open (max_connections)", peer=host, n=len(self.connections))
            return None
        if self.per_peer.get(host, 0) >= self.settings.max_connections_per_peer:
            self.counts["refused"] += 1
            self.log.warn("refusing {peer}: per-peer limit {n} reached", peer=host,
                          n=self.settings.max_connections_per_peer)
            return None
        proto = MLLPServerProtocol(self, host)
        self.connections.add(proto)
        self.per_peer[host] = self.per_peer.get(host, 0) + 1
        return proto

    def forget(self, proto: MLLPServerProtocol) -> None:
        if proto in self.connections:
            self.connections.discard(proto)
            n = self.per_peer.get(proto.peer, 1) - 1
            if n:
                self.per_peer[proto.peer] = n
            else:
                self.per_peer.pop(proto.peer, None)
