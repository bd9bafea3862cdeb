"""Send one message to the HISP's SMTP relay (Twisted's ESMTP client).

:func:`send` hands one message to one relay and reports what happened as a
:class:`SendResult`; whether and when to try again is the caller's (the
outbox's) decision, so Twisted's own reconnect-and-retry is switched off.

Invariants
----------
* :func:`send` never errbacks: refusals, timeouts, dropped connections, TLS
  and configuration problems all become a :class:`SendResult`.
* ``delivered`` means the relay answered 2xx to the end of DATA, and nothing
  else does. A connection lost or timed out at any point before that reply is
  ``retry``: the relay may or may not have kept a copy, so the caller sends the
  same bytes again (same Message-ID) and the receiver's duplicate detection
  copes; losing a message is worse than a duplicate.
* 4xx replies are ``retry``, 5xx replies are ``failed``. Problems that are not
  a server reply (STARTTLS or AUTH required but not offered, a TLS handshake or
  certificate failure, an unreadable ``ca_file``) are ``retry`` with code 0,
  as Postfix defers them: the message stays in the outbox while an operator
  fixes the relay or the configuration, and the outbox's own limit ends it.
* With ``starttls="require"`` nothing, not even EHLO's answer, leads to MAIL
  FROM before TLS is up, and the relay's certificate is verified against
  ``ca_file`` (or the platform's roots) for ``host``. ``"opportunistic"`` uses
  TLS, verified the same way, when the relay offers it and plain SMTP when it
  does not. TLS 1.2 is the minimum (Twisted's default).
* AUTH (PLAIN, LOGIN) is only ever sent over TLS, unless the relay is
  configured with ``auth_without_tls=True``.
* The message is sent byte for byte: line endings are normalised to CRLF (a
  message normally has them already), dot-stuffing is done here for every line
  (Twisted's per-chunk stuffing misses a dot at the very start and at chunk
  boundaries), and a final CRLF is added if missing, since SMTP cannot carry a
  message that does not end in one.
* Logs carry control data only (Message-ID, relay, outcome, code), never
  message content, addresses or credentials. The protocol keeps no transcript
  (``debug = False``): Twisted would put it, AUTH lines included, into its
  exception text.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from OpenSSL import SSL, crypto
from twisted.internet import defer, error, ssl
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.mail import smtp

from .endpoints import EndpointError, _read_certs

DELIVERED, RETRY, FAILED = "delivered", "retry", "failed"
STARTTLS_MODES = ("require", "opportunistic", "none")

log = Logger()


@dataclass(frozen=True)
class Relay:
    host: str
    port: int = 25
    starttls: str = "require"  # "require" | "opportunistic" | "none"
    username: str = ""
    password: str = field(default="", repr=False)
    # PEM roots for the relay's TLS certificate; "" = the platform's (SMTP transport TLS, not Direct trust)
    ca_file: str = ""
    helo: str = "localhost"
    timeout: float = 60.0  # seconds: to connect, and for each reply of the relay
    auth_without_tls: bool = False  # allow AUTH on a connection without TLS (a password in clear)

    def __post_init__(self) -> None:
        if self.starttls not in STARTTLS_MODES:
            raise ValueError(f"starttls must be one of {', '.join(STARTTLS_MODES)}, not {self.starttls!r}")
        if self.username and self.starttls == "none" and not self.auth_without_tls:
            raise ValueError("username with starttls='none' would send the password in clear; "
                             "use starttls='require' (or set auth_without_tls)")
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")


@dataclass(frozen=True)
class SendResult:
    outcome: str  # DELIVERED | RETRY | FAILED
    code: int  # the relay's reply code; 0 when the outcome is not a reply (connection, TLS, configuration)
    reason: str  # one readable line
    refused: tuple[tuple[str, int, str], ...] = ()  # (recipient, code, reply) for each recipient the relay refused


def wire_data(data: bytes) -> bytes:
    """``data`` as DATA carries it, without the final ``.``: CRLF lines, dot-stuffed, ending in CRLF."""
    body = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = body.replace(b"\r\n.", b"\r\n..")
    return b"." + body if body.startswith(b".") else body


_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.I | re.M)


def header_message_id(data: bytes) -> str:
    """The Message-ID header of ``data`` (for logs), or ""; only the header block is looked at."""
    end = re.search(rb"\r?\n\r?\n", data)
    m = _MESSAGE_ID.search(data[: end.start() if end else len(data)])
    return m.group(1).decode("ascii", "replace").strip() if m else ""


class _AuthWithoutTLS(smtp.ESMTPClientError):
    """The relay offered no TLS, and AUTH is not sent in clear."""


class _Sender(smtp.ESMTPSender):
    debug = False  # no transcript: it would hold the AUTH exchange (see the module docstring)
    phase = "connecting"

    def _registerAuthenticators(self) -> None:
        # PLAIN and LOGIN only, and only inside TLS; CRAM-MD5 adds nothing there.
        self.registerAuthenticator(smtp.PLAINAuthenticator(self.username))
        self.registerAuthenticator(smtp.LOGINAuthenticator(self.username))

    def connectionMade(self) -> None:
        self.phase = "before the greeting"
        super().connectionMade()

    def sendLine(self, line: bytes) -> None:
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        if verb in (b"EHLO", b"HELO", b"STARTTLS", b"AUTH", b"RSET", b"QUIT"):
            self.phase = "after " + verb.decode()
        elif verb in (b"MAIL", b"RCPT"):
            self.phase = "after " + verb.decode() + (" FROM" if verb == b"MAIL" else " TO")
        elif verb == b"DATA":
            self.phase = "after the DATA command"
        super().sendLine(line)

    def authenticate(self, code, resp, items):
        if self.secret and not self._tlsMode and not self.factory.relay.auth_without_tls:
            self.sendError(_AuthWithoutTLS(0, b"relay offers no STARTTLS; AUTH is not sent without TLS"))
            return
        super().authenticate(code, resp, items)

    def smtpState_data(self, code, resp):
        self.phase = "while sending the message"
        super().smtpState_data(code, resp)

    def transformChunk(self, chunk: bytes) -> bytes:
        # The data is already wire_data(); only keep the idle timer quiet while it flows.
        self.resetTimeout()
        return chunk

    def finishedFileTransfer(self, lastsent):
        self.phase = "after DATA, before the final reply"
        super().finishedFileTransfer(lastsent)

    def sentMail(self, code, resp, numOk, addresses, log):
        self.factory.final = (code, resp)
        super().sentMail(code, resp, numOk, addresses, log)

    def timeoutConnection(self) -> None:
        self.factory.timed_out = self.phase
        super().timeoutConnection()

    def sendError(self, exc) -> None:
        if self.factory.sendFinished:
            # The result is out (e.g. the relay went quiet after our QUIT): just go.
            self.transport.abortConnection()
            return
        super().sendError(exc)


class _SenderFactory(smtp.ESMTPSenderFactory):
    protocol = _Sender
    noisy = False

    def __init__(self, reactor, relay: Relay, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.reactor = reactor
        self.relay = relay
        self.domain = relay.helo.encode("ascii")
        self.last: _Sender | None = None
        self.final: tuple[int, bytes] | None = None
        self.timed_out = ""

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.callLater = self.reactor.callLater  # TimeoutMixin would use the global reactor
        self.last = p
        return p


def tls_options(relay: Relay):
    """Client TLS options for the relay: verify ``host`` against ``ca_file`` or the platform's roots."""
    trust = None
    if relay.ca_file:
        certs = _read_certs(Path(relay.ca_file).expanduser())
        trust = ssl.trustRootFromCertificates([ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certs])
    return ssl.optionsForClientTLS(relay.host, trustRoot=trust)


def _text(resp) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    return " ".join(str(resp).split())


def _by_code(code: int) -> str:
    return FAILED if 500 <= code < 600 else RETRY


def _refusals(addresses) -> tuple[tuple[str, int, str], ...]:
    out = []
    for addr, code, resp in addresses or ():
        if not 200 <= code < 300:
            out.append((addr.decode("ascii", "replace") if isinstance(addr, bytes) else str(addr), code, _text(resp)))
    return tuple(out)


def _lost(factory: _SenderFactory, cause: BaseException | None) -> SendResult:
    proto = factory.last
    if proto is None:  # never connected
        if isinstance(cause, error.ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(cause, error.TimeoutError):
            why = f"no connection within {factory.relay.timeout:g}s"
        else:
            why = f"cannot connect: {_text(str(cause))}"
        return SendResult(RETRY, 0, f"{why} ({factory.relay.host}:{factory.relay.port})")
    if isinstance(cause, SSL.Error):
        return SendResult(RETRY, 0, f"TLS handshake with the relay failed: {_text(str(cause))}")
    return SendResult(RETRY, 0, f"connection lost {proto.phase}")


def _classify(failure, factory: _SenderFactory) -> SendResult:
    exc = failure.value
    relay = factory.relay
    if isinstance(exc, smtp.SMTPDeliveryError):
        refused = _refusals(exc.addresses)
        if exc.addresses and len(refused) == len(exc.addresses) and _text(exc.resp) == "No recipients accepted":
            # No RCPT was accepted: the refusals decide (any 4xx among them is worth another try).
            outcome = RETRY if any(400 <= c < 500 for _, c, _ in refused) else FAILED
            first = refused[0]
            return SendResult(outcome, first[1], f"no recipient accepted: {first[1]} {first[2]}".rstrip(), refused)
        return SendResult(_by_code(exc.code), exc.code, f"{exc.code} {_text(exc.resp)}".rstrip(), refused)
    if isinstance(exc, smtp.SMTPTimeoutError):
        return SendResult(RETRY, 0, f"no reply from the relay within {relay.timeout:g}s {factory.timed_out}")
    if isinstance(exc, smtp.TLSRequiredError):
        return SendResult(RETRY, 0, "relay does not offer STARTTLS and starttls='require'")
    if isinstance(exc, smtp.TLSError):
        return SendResult(_by_code(exc.code), exc.code, f"relay refused STARTTLS ({exc.code})")
    if isinstance(exc, smtp.EHLORequiredError):
        return SendResult(RETRY, 0, "relay refused EHLO, which TLS or AUTH needs")
    if isinstance(exc, smtp.AUTHRequiredError):
        return SendResult(RETRY, 0, "relay offers no AUTH mechanism we use (PLAIN, LOGIN)")
    if isinstance(exc, _AuthWithoutTLS):
        return SendResult(RETRY, 0, _text(exc.resp))
    if isinstance(exc, smtp.SMTPConnectError) and exc.code < 0:
        return _lost(factory, exc.__cause__)
    if isinstance(exc, smtp.SMTPClientError) and exc.code > 0:
        # A refused greeting (SMTPConnectError), AUTH declined, or another reply-coded error.
        what = "AUTH declined: " if isinstance(exc, (smtp.AUTHDeclinedError, smtp.AuthenticationError)) else ""
        return SendResult(_by_code(exc.code), exc.code, f"{what}{exc.code} {_text(exc.resp)}".rstrip())
    if isinstance(exc, smtp.SMTPClientError):
        return SendResult(RETRY, 0, f"SMTP protocol error {factory.last.phase if factory.last else ''}: "
                                    f"{_text(exc.resp)}")
    log.failure("unexpected error sending to {host}:{port}", failure, host=relay.host, port=relay.port)
    return SendResult(RETRY, 0, f"unexpected error: {type(exc).__name__}")


def send(reactor, relay: Relay, sender: str, recipients: Sequence[str], data: bytes,
         message_id: str = "") -> Deferred:
    """Send ``data`` from ``sender`` to ``recipients`` through ``relay``; a Deferred firing a SendResult."""
    message_id = message_id or header_message_id(data)
    try:
        if not recipients:
            raise ValueError("no recipients")
        for address in (sender, *recipients):
            address.encode("ascii")  # no SMTPUTF8
        context = tls_options(relay) if relay.starttls != "none" else None
    except UnicodeEncodeError:
        return _done(relay, message_id, SendResult(FAILED, 0, "an address is not ASCII (SMTPUTF8 is not supported)"))
    except EndpointError as exc:  # (a ValueError too)
        return _done(relay, message_id, SendResult(RETRY, 0, f"ca_file: {exc}"))
    except ValueError as exc:
        return _done(relay, message_id, SendResult(FAILED, 0, str(exc)))

    result: Deferred = Deferred()
    factory = _SenderFactory(
        reactor, relay, relay.username.encode("utf-8"), relay.password.encode("utf-8"), sender,
        list(recipients), io.BytesIO(wire_data(data)), result,
        retries=0,  # the outbox owns retrying
        timeout=relay.timeout, contextFactory=context,
        heloFallback=relay.starttls != "require" and not relay.username,
        requireAuthentication=bool(relay.username),
        requireTransportSecurity=relay.starttls == "require")

    def delivered(outcome):
        code, resp = factory.final or (250, b"")
        return SendResult(DELIVERED, code, f"{code} {_text(resp)}".rstrip(), _refusals(outcome[1]))

    def bug(failure):  # the promise is "never errbacks", even if the classification above is wrong
        log.failure("classifying an SMTP result failed", failure)
        return SendResult(RETRY, 0, f"internal error: {type(failure.value).__name__}")

    result.addCallbacks(delivered, _classify, errbackArgs=(factory,))
    result.addErrback(bug)
    result.addCallback(lambda r: _done(relay, message_id, r, fire=False))
    reactor.connectTCP(relay.host, relay.port, factory, timeout=relay.timeout)
    return result


def _done(relay: Relay, message_id: str, result: SendResult, fire: bool = True):
    log.info("SMTP {message_id} via {host}:{port}: {outcome} {code}", message_id=message_id or "(no Message-ID)",
             host=relay.host, port=relay.port, outcome=result.outcome, code=result.code)
    return defer.succeed(result) if fire else result
