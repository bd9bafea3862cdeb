"""Outbound MLLP: send one message at a time and decide delivery from its own ACK (Twisted).

Three layers, as in ``twisted.mail``: :class:`MLLPClientProtocol` moves bytes for one
connection, :class:`MLLPClientFactory` holds its settings and counters, and
:class:`MLLPSender` (a Service) owns the queue and the connection's lifecycle through
``ClientService`` + ``backoffPolicy()`` over an endpoint string (``tcp:host:port``,
``tls:host:port:...``: TLS costs no code). Framing is :mod:`hl7referral.v2.framer`,
matching is :func:`hl7referral.v2.ack_match.classify`, time is the injected reactor.

Invariants
----------
* **Durability is the caller's job.** The queue is in memory. A caller keeps an outbox
  row per message and calls :meth:`MLLPSender.send` again after a failure; a resend
  after a failure with ``written=True`` may reach the receiver twice, which HL7
  receivers handle by MSH-10 (this engine's own ingest is idempotent on it).
* **Every Deferred returned by send() fires exactly once**: with an
  :class:`~hl7referral.v2.ack_match.AckResult` of kind accept, error or reject (the
  receiver's answer to *this* message), or with :class:`SendFailed` (timeout,
  connection refused or lost, stopping). A guard per message makes a second outcome
  impossible, whatever the order of timer, ACK and disconnect.
* **One message in flight per connection** (classic MLLP is request/response); the
  others wait in order. The next is written only after the previous one is settled.
* **No false delivery.** Only a frame whose MSA-2 equals the in-flight control id
  settles a send. A mismatched ACK (another control id: a late or duplicate ACK of an
  earlier message) or a frame that is not an ACK is logged (control ids only, never
  content) and ignored; waiting goes on until ``ack_timeout``. So a second ACK for
  message 1 arriving while message 2 is in flight cannot be taken for message 2's.
* **A timeout drops the connection.** When ``ack_timeout`` passes after the write, the
  send fails with ``SendFailed("no ACK in N s")`` and the connection is aborted: an
  ACK arriving late has no connection to arrive on. The next send reconnects through
  ClientService (after its backoff delay).
* **A transport failure fails the queue behind it.** When the connection cannot be
  made, is lost while waiting, or times out, the send in flight fails and so does every
  send queued behind it (those with ``written=False``: they never left). The caller
  retries from its outbox in its own order, so no message overtakes one that failed
  before it. An AE/AR is an answer, not a transport failure: the queue goes on.
* ``stopService`` stops reconnecting and fails every pending send, in flight or queued,
  with ``SendFailed("stopping")``.
* Memory per connection is bounded by ``max_frame_bytes`` (a larger inbound frame
  aborts the connection).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..v2.ack_match import COMMIT, FINAL, MISMATCH, AckResult, classify
from ..v2.framer import Frame, FrameAbandoned, FrameTooLarge, Junk, MissingCR, MLLPFramer, encode_frame
from ..v2.header import BrokenHeader, NotHL7, read_header

DEFAULT_ACK_TIMEOUT = 30.0
DEFAULT_MAX_ACK_BYTES = 1024 * 1024  # ACKs are small; an application ACK with text fits many times over


class SendFailed(Exception):
    """The message was not acknowledged; the caller may resend it.

    ``written`` says whether the frame was written to a connection: if so, the
    receiver may have it already and a resend may arrive twice.
    """

    def __init__(self, reason: str, *, control_id: str = "", written: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.control_id = control_id
        self.written = written

    def __repr__(self) -> str:
        return f"SendFailed({self.reason!r}, control_id={self.control_id!r}, written={self.written})"


class MLLPClientProtocol(Protocol):
    """One outbound connection: at most one message in flight, its ACK matched by MSA-2."""

    log = Logger()

    def __init__(self, factory: "MLLPClientFactory") -> None:
        self.factory = factory
        self.framer = MLLPFramer(factory.max_frame_bytes)
        self.closing = False  # set when this connection is being dropped; never reused after
        self._inflight: tuple[str, Deferred] | None = None
        self._timer = None
        self._lost_waiters: list[Deferred] = []
        self._lost = False

    @property
    def busy(self) -> bool:
        return self._inflight is not None

    def send(self, control_id: str, payload: bytes) -> Deferred:
        """Write one message; the Deferred fires with its final AckResult or fails with SendFailed."""
        if self._inflight is not None:
            return fail(SendFailed("a message is already in flight on this connection", control_id=control_id))
        if self.closing or self._lost or self.transport is None:
            return fail(SendFailed("connection is closing", control_id=control_id))
        d: Deferred = Deferred()
        self._inflight = (control_id, d)
        self.transport.write(encode_frame(payload))
        timeout = self.factory.ack_timeout
        self._timer = self.factory.clock.callLater(timeout, self._timed_out, timeout)
        self.log.debug("{name}: sent {control_id}", name=self.factory.name, control_id=control_id)
        return d

    def whenLost(self) -> Deferred:
        """A Deferred that fires (with None) once this connection is gone."""
        if self._lost:
            return succeed(None)
        d: Deferred = Deferred()
        self._lost_waiters.append(d)
        return d

    # -- bytes in ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        for event in self.framer.feed(data):
            if isinstance(event, Frame):
                self._on_frame(event.payload)
            elif isinstance(event, FrameTooLarge):
                self.factory.counts["oversized"] += 1
                self.log.warn("{name}: inbound frame larger than {limit} bytes; dropping the connection",
                              name=self.factory.name, limit=event.limit)
                self._drop(f"inbound frame larger than {event.limit} bytes")
                return
            elif isinstance(event, Junk):
                self.log.debug("{name}: {n} bytes outside any frame", name=self.factory.name, n=event.length)
            elif isinstance(event, FrameAbandoned):
                self.log.info("{name}: partial frame of {n} bytes dropped (<VT> inside a frame)",
                              name=self.factory.name, n=event.length)
            elif isinstance(event, MissingCR):
                self.log.debug("{name}: frame ended <FS> without <CR>", name=self.factory.name)
            if self.closing:
                return

    def _on_frame(self, payload: bytes) -> None:
        name = self.factory.name
        if self._inflight is None:
            # A duplicate or late ACK (the one in flight was settled or timed out).
            other = classify("", payload)
            self.factory.counts["unexpected"] += 1
            self.log.info("{name}: frame (MSA-2 {acked!r}) with nothing in flight; ignored",
                          name=name, acked=other.control_id[:40])
            return
        control_id, d = self._inflight
        result = classify(control_id, payload, need_application_ack=self.factory.need_application_ack)
        if result.kind in FINAL:
            self._settle()
            self.factory.counts[result.kind] += 1
            self.log.info("{name}: {control_id} acknowledged {code}", name=name, control_id=control_id,
                          code=result.code)
            d.callback(result)
        elif result.kind == MISMATCH:
            self.factory.counts["mismatch"] += 1
            self.log.warn("{name}: ACK for {acked!r} while {control_id} is in flight; ignored",
                          name=name, acked=result.control_id[:40], control_id=control_id)
        elif result.kind == COMMIT:
            self.factory.counts["commit"] += 1
            self.log.info("{name}: {control_id} committed (CA); awaiting the application ACK",
                          name=name, control_id=control_id)
        else:
            self.factory.counts["not_ack"] += 1
            self.log.warn("{name}: frame while {control_id} is in flight is no ACK ({why}); ignored",
                          name=name, control_id=control_id, why=result.error)

    # -- failures ------------------------------------------------------------

    def _settle(self) -> tuple[str, Deferred] | None:
        inflight, self._inflight = self._inflight, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return inflight

    def _fail(self, reason: str) -> None:
        inflight = self._settle()
        if inflight is not None:
            control_id, d = inflight
            d.errback(SendFailed(reason, control_id=control_id, written=True))

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self.factory.counts["timeouts"] += 1
        if self._inflight is not None:
            self.log.warn("{name}: no ACK for {control_id} in {t:g} s; dropping the connection",
                          name=self.factory.name, control_id=self._inflight[0], t=timeout)
        self._drop(f"no ACK in {timeout:g} s")

    def _drop(self, reason: str) -> None:
        # Fail first, then abort: the reason the caller sees is the real one, not
        # "connection lost", and nothing arriving afterwards is read (closing).
        self.closing = True
        self._fail(reason)
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.closing = True
        self._lost = True
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._fail(f"connection lost while waiting for the ACK: {why}")
        waiters, self._lost_waiters = self._lost_waiters, []
        for w in waiters:
            w.callback(None)


class MLLPClientFactory(Factory):
    """Settings and counters shared by the connections of one sender."""

    protocol = MLLPClientProtocol

    def __init__(self, clock, *, ack_timeout: float = DEFAULT_ACK_TIMEOUT,
                 max_frame_bytes: int = DEFAULT_MAX_ACK_BYTES, need_application_ack: bool = False,
                 name: str = "") -> None:
        if ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.max_frame_bytes = max_frame_bytes
        self.need_application_ack = need_application_ack
        self.name = name or "mllp-out"
        self.counts = dict(accept=0, error=0, reject=0, commit=0, mismatch=0, not_ack=0, unexpected=0,
                           timeouts=0, oversized=0)

    def buildProtocol(self, addr) -> MLLPClientProtocol:
        return self.protocol(self)


@dataclass(eq=False)
class _Outgoing:
    control_id: str
    payload: bytes
    deferred: Deferred = field(default_factory=Deferred)
    written: bool = False
    settled: bool = False


class MLLPSender(Service):
    """Send HL7 messages to one destination over MLLP, one at a time, in order.

    ``endpoint`` is a Twisted client endpoint string (``tcp:host=10.0.0.5:port=2575``,
    ``tls:host=ehr.example:port=2576:trustRoots=...``) or an already built client
    endpoint; ``reactor`` provides both the connections and the clock. See the module
    invariants for what :meth:`send` promises.

    Time limits: connecting is bounded by the endpoint (``timeout=`` in the string, 30 s
    by default) plus ClientService's backoff delay after a failure (``retry_policy``,
    default ``backoffPolicy()``: 1 s growing to 60 s); the answer by ``ack_timeout``,
    counted from the write. ``need_application_ack=True`` makes a commit accept (CA)
    an intermediate step (see :mod:`hl7referral.v2.ack_match`).
    """

    log = Logger()

    def __init__(self, endpoint, reactor, *, ack_timeout: float = DEFAULT_ACK_TIMEOUT,
                 max_frame_bytes: int = DEFAULT_MAX_ACK_BYTES, need_application_ack: bool = False,
                 name: str = "", retry_policy=None) -> None:
        self.name = name or (endpoint if isinstance(endpoint, str) else "mllp-out")
        self.reactor = reactor
        self.factory = MLLPClientFactory(reactor, ack_timeout=ack_timeout, max_frame_bytes=max_frame_bytes,
                                         need_application_ack=need_application_ack, name=self.name)
        if isinstance(endpoint, str):
            endpoint = endpoints.clientFromString(reactor, endpoint)
        self.client = ClientService(endpoint, self.factory, retryPolicy=retry_policy or backoffPolicy(),
                                    clock=reactor)
        self._queue: deque[_Outgoing] = deque()
        self._current: _Outgoing | None = None

    # -- public --------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages not yet settled: the one in flight (or connecting) and the queue."""
        return len(self._queue) + (self._current is not None)

    def send(self, control_id: str, payload: bytes) -> Deferred:
        """Queue one message. Fires with an AckResult (accept, error, reject) or fails with SendFailed.

        ``control_id`` must be the payload's MSH-10 (the ACK's MSA-2 is matched
        against it); a payload that cannot be framed raises ``ValueError`` at once:
        that is a caller's bug, which no resend could cure.
        """
        _check(control_id, payload)
        if not self.running:
            return fail(SendFailed("sender is not running", control_id=control_id))
        item = _Outgoing(control_id, bytes(payload))
        self._queue.append(item)
        self._pump()
        return item.deferred

    def startService(self) -> None:
        super().startService()
        self.client.startService()

    def stopService(self) -> Deferred:
        super().stopService()
        pending = ([self._current] if self._current is not None else []) + list(self._queue)
        self._current = None
        self._queue.clear()
        for item in pending:
            self._settle(item, Failure(SendFailed("stopping", control_id=item.control_id, written=item.written)))
        return self.client.stopService()

    # -- the queue -------------------------------------------------------------

    def _pump(self) -> None:
        if self._current is not None or not self._queue or not self.running:
            return
        self._current = item = self._queue.popleft()
        self._connect(item)

    def _connect(self, item: _Outgoing) -> None:
        d = self.client.whenConnected(failAfterFailures=1)
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(item,), errbackArgs=(item,))

    def _connected(self, proto: MLLPClientProtocol, item: _Outgoing) -> None:
        if item is not self._current:
            return  # settled meanwhile (stopService)
        if proto.closing:
            # ClientService still reports a connection we are dropping, until its
            # connectionLost has run; ask again once it has (next reactor turn).
            proto.whenLost().addCallback(lambda _: self.reactor.callLater(0, self._reconnect, item))
            return
        item.written = True
        proto.send(item.control_id, item.payload).addBoth(self._answered, item)

    def _reconnect(self, item: _Outgoing) -> None:
        if item is self._current and self.running:
            self._connect(item)

    def _connect_failed(self, failure: Failure, item: _Outgoing) -> None:
        if item is not self._current:
            return None  # settled meanwhile (stopService cancels the wait)
        why = failure.getErrorMessage() or failure.type.__name__
        self.log.warn("{name}: cannot connect for {control_id}: {why}", name=self.name,
                      control_id=item.control_id, why=why)
        self._transport_failed(item, f"cannot connect: {why}")
        return None

    def _answered(self, result, item: _Outgoing) -> None:
        if item is not self._current:
            return None  # settled meanwhile (stopService); swallow the late outcome
        if isinstance(result, Failure):
            if result.check(SendFailed):
                # The protocol knows whether the frame left (a refused send did not).
                item.written = result.value.written
                reason = result.value.reason
            else:
                reason = result.getErrorMessage()
            self._transport_failed(item, reason)
            return None
        self._current = None
        self._settle(item, result)
        self._pump()
        return None

    def _transport_failed(self, item: _Outgoing, reason: str) -> None:
        # The destination is unhealthy: fail the queue behind it too (module invariants).
        behind = list(self._queue)
        self._queue.clear()
        self._current = None
        self._settle(item, Failure(SendFailed(reason, control_id=item.control_id, written=item.written)))
        for other in behind:
            self._settle(other, Failure(SendFailed(f"not sent: {reason} (for {item.control_id})",
                                                   control_id=other.control_id, written=False)))
        self._pump()  # sends queued by the callbacks above start afresh

    def _settle(self, item: _Outgoing, result) -> None:
        if item.settled:
            return
        item.settled = True
        if isinstance(result, Failure):
            item.deferred.errback(result)
        else:
            item.deferred.callback(result)


def _check(control_id: str, payload: bytes) -> None:
    if not isinstance(payload, bytes | bytearray):
        raise ValueError("payload must be bytes")
    if b"\x0b" in payload or b"\x1c" in payload:
        raise ValueError("payload holds an MLLP framing byte (VT or FS)")
    try:
        msh10 = read_header(bytes(payload)).control_id
    except (NotHL7, BrokenHeader) as exc:
        raise ValueError(f"payload is not an HL7 message: {exc}") from None
    if not control_id or msh10 != control_id:
        raise ValueError("control_id must be the payload's MSH-10")


__all__ = ["AckResult", "MLLPClientFactory", "MLLPClientProtocol", "MLLPSender", "SendFailed"]
