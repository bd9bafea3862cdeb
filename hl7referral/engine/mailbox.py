"""A POP3 poller for HISPs that keep a mailbox instead of relaying mail to our SMTP listener.

Each poll logs in, fetches every message, hands its bytes to ``deliver`` (the same
callback the SMTP listener uses: it commits the mail to the store), and deletes a
message on the server only after ``deliver``'s Deferred has fired. A crash or a
failed commit leaves the message on the server, to be fetched again next time;
nothing is lost, at worst a message is stored twice (its Message-ID shows it).

Invariants
----------
* DELE follows a successful commit, never precedes it; QUIT (which makes POP3
  deletions final) is only sent after the whole batch was handled.
* Credentials go over TLS (``tls = "starttls"`` or ``"implicit"``) unless
  ``tls = "none"`` was chosen explicitly (loopback tests, a local relay).
* A poll never errbacks: failures are logged with the host and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from twisted.internet import defer, ssl
from twisted.internet.protocol import ClientCreator
from twisted.logger import Logger
from twisted.mail.pop3 import AdvancedPOP3Client


@dataclass(frozen=True)
class MailboxConfig:
    host: str
    port: int = 995
    username: str = ""
    password: str = field(default="", repr=False)
    tls: str = "implicit"          # implicit (POP3S, 995) | starttls (STLS) | none
    ca_file: str = ""              # PEM roots for the server's certificate; "" = the platform's
    interval: float = 60.0         # seconds between polls
    timeout: float = 60.0


class _Client(AdvancedPOP3Client):
    timeout = 60


class POP3Poller:
    log = Logger()

    def __init__(self, reactor, config: MailboxConfig, deliver: Callable[[str, list[str], bytes], defer.Deferred],
                 recipient: str) -> None:
        self.reactor = reactor
        self.config = config
        self.deliver = deliver
        self.recipient = recipient
        self._polling = False

    def _tls(self):
        if self.config.ca_file:
            with open(self.config.ca_file, "rb") as f:
                roots = ssl.Certificate.loadPEM(f.read())
            return ssl.optionsForClientTLS(self.config.host, trustRoot=roots)
        return ssl.optionsForClientTLS(self.config.host)

    @defer.inlineCallbacks
    def poll(self):
        """Fetch, commit and delete every waiting message; returns how many were committed."""
        if self._polling:
            return 0
        self._polling = True
        c = self.config
        stored = 0
        client = None
        try:
            creator = ClientCreator(self.reactor, _Client)
            if c.tls == "implicit":
                client = yield creator.connectSSL(c.host, c.port, self._tls(), timeout=c.timeout)
            else:
                client = yield creator.connectTCP(c.host, c.port, timeout=c.timeout)
            client.timeout = c.timeout
            if c.tls == "starttls":
                yield client.startTLS(self._tls())
            # USER/PASS, over TLS unless tls = "none" was chosen. Not APOP: it is MD5 (which the Direct
            # profile refuses everywhere) and Twisted's server-side APOP check fails on bytes vs str.
            yield client.user(c.username.encode())
            yield client.password(c.password.encode())
            sizes = yield client.listSize()
            for index, size in enumerate(sizes):
                if size is None:  # deleted in this session
                    continue
                lines = yield client.retrieve(index)
                data = b"\r\n".join(lines) + b"\r\n"
                yield defer.maybeDeferred(self.deliver, "", [self.recipient], data)
                yield client.delete(index)
                stored += 1
            yield client.quit()
            if stored:
                self.log.info("mailbox {host}: {n} message(s) fetched", host=c.host, n=stored)
        except Exception as exc:  # noqa: BLE001 - a poll must not stop the loop; the mail stays on the server
            self.log.warn("mailbox {host}:{port}: poll failed after {n} message(s): {why}", host=c.host,
                          port=c.port, n=stored, why=f"{type(exc).__name__}: {exc}")
            if client is not None and client.transport is not None:
                client.transport.abortConnection()  # no QUIT: what was not committed is not deleted
        finally:
            self._polling = False
        return stored
