"""An SMTP listener for mail from the HISP (Twisted's ESMTP server).

The protocol only moves bytes: ``accept(mail_from, rcpt_tos, data)`` decides
and commits, the protocol turns its outcome into the reply.

Invariants
----------
* ``accept`` is called once per message (not once per recipient, as Twisted
  would deliver it), at the end of DATA, with the envelope sender ("" for the
  null sender ``<>``), the accepted recipients in the order given, and the
  exact bytes received: CRLF line endings as sent, dot-stuffing removed,
  ending in the CRLF before the final ``.``. Nothing is added, no
  ``Received:`` header, and Twisted's blank line before a first line without
  a colon (meant to follow its own ``Received:``) is not inserted either.
* 250 is sent only after ``accept``'s Deferred fires (the caller has committed
  the raw message durably); if it fails or raises, 451 4.3.0 and the sender
  tries again later. A connection lost while ``accept`` runs gets no reply: if
  the commit succeeds the sender will resend, so the receiving side sees the
  same Message-ID twice; nothing is lost.
* A message over ``max_size`` bytes (counted as they arrive, after
  dot-unstuffing, CRLFs included) gets 552 5.3.4 at the end of DATA and
  ``accept`` is not called; its bytes are dropped as soon as the cap is passed,
  so memory per connection is bounded by ``max_size`` plus one line. ``SIZE``
  is advertised and a larger ``MAIL FROM ... SIZE=`` is refused at once.
  A line over ``MAX_LENGTH`` closes the connection after a 500 (Twisted's line
  parser has already lost the lines after it).
* Recipients must be in ``domains`` (case-insensitive, exact: no subdomains);
  others get 550 5.1.1. At most ``max_recipients`` per message (452 4.5.3).
  Command sequencing (503) is Twisted's.
* STARTTLS, when ``tls`` is given: commands pipelined in clear after STARTTLS
  are discarded, and the session state (HELO, sender, recipients) is reset
  once TLS starts (RFC 3207 4.2).
* Logs carry control data only (peer, size, recipient count, outcome).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from .endpoints import server_endpoint

Accept = Callable[[str, list[str], bytes], "Deferred | None"]

_SIZE_PARAM = re.compile(rb"(?:^|\s)SIZE=(\d+)", re.I)


@implementer(smtp.IMessage)
class _Message:
    """The one buffer of a transaction; Twisted sees it as the first recipient's IMessage."""

    def __init__(self, delivery: "_Delivery", mail_from: str, rcpt_tos: list[str]) -> None:
        self.delivery = delivery
        self.mail_from = mail_from
        self.rcpt_tos = rcpt_tos
        self.limit = delivery.factory.max_size
        self.buf: bytearray | None = bytearray()
        self.size = 0
        self.oversized = False

    def lineReceived(self, line: bytes) -> None:
        # Lines come without their CRLF (Twisted splits on it); put it back.
        self.size += len(line) + 2
        if self.oversized:
            return
        if self.size > self.limit:
            self.oversized = True
            self.buf = None  # do not keep what will be refused
            return
        self.buf += line
        self.buf += b"\r\n"

    def eomReceived(self) -> Deferred:
        data, self.buf = bytes(self.buf or b""), None
        return defer.maybeDeferred(self.delivery.factory.accept, self.mail_from, list(self.rcpt_tos), data)

    def connectionLost(self) -> None:
        self.buf = None


@implementer(smtp.IMessage)
class _Shadow:
    """The IMessage of every further recipient: the message is accepted once, through _Message."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Deferred:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


class _Transaction:
    def __init__(self, mail_from: str) -> None:
        self.mail_from = mail_from
        self.rcpt_tos: list[str] = []
        self.message: _Message | None = None


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """Per connection: checks the envelope and hands out the transaction's IMessage."""

    def __init__(self, factory: "InboundSMTPFactory") -> None:
        self.factory = factory
        self.txn: _Transaction | None = None

    def receivedHeader(self, helo, origin, recipients):
        return None  # exact bytes: no Received: header

    def validateFrom(self, helo, origin):
        # Every MAIL FROM starts a transaction (Twisted has already refused a second one with 503).
        self.txn = _Transaction(str(origin))
        return origin

    def validateTo(self, user):
        domain = user.dest.domain.decode("ascii", "replace").lower()
        if domain not in self.factory.domains:
            self.factory.counts["rcpt_refused"] += 1
            raise smtp.SMTPBadRcpt(user, 550, "5.1.1 Recipient address rejected: domain not served here")
        txn = self.txn
        address = str(user.dest)
        if address not in txn.rcpt_tos:
            if len(txn.rcpt_tos) >= self.factory.max_recipients:
                raise smtp.SMTPServerError(452, "4.5.3 Too many recipients")
            txn.rcpt_tos.append(address)
        return lambda: self._message(txn)

    def _message(self, txn: _Transaction):
        # Twisted asks for one IMessage per recipient at DATA; the first gets the buffer.
        if txn.message is None:
            txn.message = _Message(self, txn.mail_from, txn.rcpt_tos)
            return txn.message
        return _Shadow()


class _InboundSMTP(smtp.ESMTP):
    log = Logger()
    noisy = False  # Twisted's own log line names the addresses; ours below does not
    MAX_LENGTH = 16384  # RFC 5321 allows 1000; be lenient, but bounded

    def __init__(self, factory: "InboundSMTPFactory") -> None:
        super().__init__(contextFactory=factory.tls)
        self.factory = factory
        self.delivery = _Delivery(factory)
        self._message: _Message | None = None
        self._tls_now = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", str(peer))
        super().connectionMade()

    # -- STARTTLS ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._tls_now:
            # Whatever followed STARTTLS in clear is not to be trusted (CVE-2011-0411 style injection).
            self._tls_now = False
            self._buffer = b""

    def lineReceived(self, line: bytes):
        if self._tls_now:
            return None
        return super().lineReceived(line)

    def ext_STARTTLS(self, rest: bytes) -> None:
        was = self.startedTLS
        super().ext_STARTTLS(rest)
        if self.startedTLS and not was:
            self._tls_now = True
            self._helo = (None, self.peer.encode("ascii", "replace") if isinstance(self.peer, str) else self.peer)
            self._from = None
            self._to = []

    # -- envelope ------------------------------------------------------------

    def extensions(self) -> dict:
        ext = super().extensions()
        ext[b"SIZE"] = [b"%d" % self.factory.max_size]
        ext[b"8BITMIME"] = None  # bytes pass through untouched
        return ext

    def do_MAIL(self, rest: bytes) -> None:
        m = _SIZE_PARAM.search(rest.rpartition(b">")[2])
        if m and not self._from and int(m.group(1)) > self.factory.max_size:
            self.factory.counts["oversized"] += 1
            self.sendCode(552, b"5.3.4 Message size exceeds fixed maximum message size")
            return
        super().do_MAIL(rest)

    # -- DATA ----------------------------------------------------------------

    def do_DATA(self, rest: bytes) -> None:
        super().do_DATA(rest)
        txn = self.delivery.txn
        self._message = txn.message if self.mode == smtp.DATA and txn is not None else None

    def state_DATA(self, line: bytes):
        # Twisted's dataLineReceived would insert a blank line before a first line without a
        # colon; so we unstuff and buffer ourselves and give it only the end of data.
        if line == b".":
            message, self._message = self._message, None
            if message is not None and message.oversized:
                self.factory.counts["oversized"] += 1
                self.log.info("message from {peer} refused: over {limit} bytes", peer=self.peer,
                              limit=self.factory.max_size)
                message.connectionLost()
                self.datafailed = smtp.SMTPServerError(552, b"5.3.4 Message size exceeds fixed maximum message size")
            self._size = message.size if message is not None else 0
            return smtp.SMTP.dataLineReceived(self, line)
        if line[:1] == b".":
            line = line[1:]
        if self._message is not None:
            self._message.lineReceived(line)
        return None

    def _messageHandled(self, resultList) -> None:
        failures = [r for ok, r in resultList if not ok] if isinstance(resultList, list) else ["no message"]
        size = getattr(self, "_size", 0)
        if failures:
            self.factory.counts["deferred"] += 1
            why = failures[0]
            why = f"{type(why.value).__name__}: {why.getErrorMessage()}" if hasattr(why, "value") else str(why)
            self.log.warn("message from {peer} ({size} bytes) not accepted, 451 sent: {why}", peer=self.peer,
                          size=size, why=why)
            self.sendCode(451, b"4.3.0 Message not stored; try again later")
        else:
            self.factory.counts["accepted"] += 1
            self.log.info("message from {peer} ({size} bytes) accepted", peer=self.peer, size=size)
            self.sendCode(250, b"2.0.0 Message accepted")

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
        self.log.info("closing connection from {peer}: line over {n} bytes", peer=self.peer, n=self.MAX_LENGTH)
        self.sendCode(500, b"5.5.2 Line too long")
        self.transport.loseConnection()


class InboundSMTPFactory(smtp.SMTPFactory):
    """SMTP for mail from the HISP; see the module docstring for what ``accept`` gets and when."""

    noisy = False

    def __init__(self, accept: Accept, *, domains: Sequence[str], max_size: int = 25 * 2**20,
                 hostname: str = "localhost", tls=None, clock=None, timeout: float = 600.0,
                 max_recipients: int = 100) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        if isinstance(domains, str):
            domains = [domains]
        self.domains = frozenset(d.lower() for d in domains)
        if not self.domains:
            raise ValueError("domains must name at least one domain")
        self.accept = accept
        self.max_size = max_size
        self.hostname = hostname
        self.domain = hostname
        self.tls = tls
        self.clock = clock
        self.timeout = timeout
        self.max_recipients = max_recipients
        self.counts: Counter[str] = Counter()

    def buildProtocol(self, addr) -> _InboundSMTP:
        p = _InboundSMTP(self)
        p.host = self.hostname
        p.timeout = self.timeout
        p.callLater = self.clock.callLater  # TimeoutMixin would use the global reactor
        return p


def listen(reactor, endpoint: str, factory, base: Path = Path(".")) -> Deferred:
    """Listen on a Twisted endpoint string (``ssl:`` is ours, see endpoints.py); fires with the IListeningPort."""
    return defer.maybeDeferred(lambda: server_endpoint(reactor, endpoint, base).listen(factory))
