"""smtp_client.send against real SMTP servers on 127.0.0.1 (aiosmtpd, and our own listener).

Twisted's reactor runs on a thread (see the ``reactor`` fixture); the test
thread hands it calls and waits for their results. aiosmtpd runs its asyncio
loop on another thread, on an ephemeral port.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult

from reactor_thread import call, running_reactor
from smtp_servers import running_smtpd
from hl7referral.engine.endpoints import tls_options as server_tls_options
from hl7referral.engine.smtp_client import Relay, SendResult, send, wire_data
from hl7referral.engine.smtp_server import InboundSMTPFactory, listen

FROM, TO = "referrals@direct.sender.test", "cardiology@direct.receiver.test"
MESSAGE = (b"From: referrals@direct.sender.test\r\nTo: cardiology@direct.receiver.test\r\n"
           b"Message-ID: <ref-1@direct.sender.test>\r\nSubject: referral\r\n\r\n"
           b"first body line\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n")


# -- a Twisted reactor on a thread ----------------------------------------------------


@pytest.fixture(scope="module")
def reactor():
    return running_reactor()


def deliver(r, relay, data=MESSAGE, recipients=(TO,), timeout=30) -> SendResult:
    result = call(r, send, r, relay, FROM, list(recipients), data, timeout=timeout)
    assert isinstance(result, SendResult)
    return result


# -- aiosmtpd ------------------------------------------------------------------------


class Handler:
    def __init__(self):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply = "250 2.0.0 Ok: queued as 12345"
        self.drop_after_data = 0
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        if self.drop_after_data:
            # Stored, but the reply never leaves: the sender cannot know.
            self.drop_after_data -= 1
            server.transport.close()
            return "250 never sent"
        return self.data_reply

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((mechanism, auth_data.login, auth_data.password))
        ok = (auth_data.login, auth_data.password) == (b"clinic", b"s3cret pass")
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535


@pytest.fixture
def smtpd():
    with running_smtpd(Handler()) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory, make_certs) -> Path:
    out = tmp_path_factory.mktemp("smtp-pki")
    make_certs.build(out)
    return out


@pytest.fixture
def smtpd_tls(pki):
    with running_smtpd(Handler(), pki=pki) as server:
        yield server


def plain(port, **kw) -> Relay:
    return Relay("127.0.0.1", port, starttls="none", timeout=10, **kw)


# -- the data as sent ------------------------------------------------------------------


def test_wire_data_normalises_line_endings_and_stuffs_every_leading_dot():
    assert wire_data(b".a\r\nb\n.c\r\n") == b"..a\r\nb\r\n..c\r\n"
    assert wire_data(b"no final newline") == b"no final newline\r\n"
    assert wire_data(b"") == b""


# -- outcomes ------------------------------------------------------------------------


def test_delivered_with_the_exact_bytes_and_envelope(reactor, smtpd):
    handler, port = smtpd
    # A dot-led line right at Twisted's 16 KiB FileSender chunk boundary is stuffed too
    # (Twisted's own per-chunk stuffing would miss it).
    prefix = MESSAGE
    while 16384 - len(wire_data(prefix)) >= 160:
        prefix += b"x" * 78 + b"\r\n"
    prefix += b"y" * (16384 - len(wire_data(prefix)) - 2) + b"\r\n"
    assert len(wire_data(prefix)) == 16384
    big = prefix + b"...at the boundary\r\n" + b".\r\n" * 300
    for data in (MESSAGE, big):
        result = deliver(reactor, plain(port), data)
        assert (result.outcome, result.code, result.reason) == ("delivered", 250, "250 2.0.0 Ok: queued as 12345")
        assert handler.messages[-1] == (FROM, [TO], data)
    assert len(handler.messages) == 2


def test_one_refused_recipient_of_two_is_reported_and_the_rest_delivered(reactor, smtpd):
    handler, port = smtpd
    other = "nobody@direct.receiver.test"
    handler.rcpt_replies[other] = "550 5.1.1 no such user"
    result = deliver(reactor, plain(port), recipients=(other, TO))
    assert result.outcome == "delivered"
    assert result.refused == ((other, 550, "5.1.1 no such user"),)
    assert handler.messages == [(FROM, [TO], MESSAGE)]


def test_4xx_on_rcpt_is_retry_with_code_and_reason(reactor, smtpd):
    handler, port = smtpd
    handler.rcpt_replies[TO] = "451 4.3.0 try again later"
    result = deliver(reactor, plain(port))
    assert (result.outcome, result.code) == ("retry", 451)
    assert result.reason == "no recipient accepted: 451 4.3.0 try again later"
    assert result.refused == ((TO, 451, "4.3.0 try again later"),)
    assert handler.messages == []


def test_4xx_after_data_is_retry_with_code_and_reason(reactor, smtpd):
    handler, port = smtpd
    handler.data_reply = "451 4.3.0 try again later"
    result = deliver(reactor, plain(port))
    assert (result.outcome, result.code, result.reason) == ("retry", 451, "451 4.3.0 try again later")


def test_5xx_after_data_is_failed_with_reason(reactor, smtpd):
    handler, port = smtpd
    handler.data_reply = "554 5.7.1 message rejected"
    result = deliver(reactor, plain(port))
    assert (result.outcome, result.code, result.reason) == ("failed", 554, "554 5.7.1 message rejected")


def test_5xx_on_rcpt_is_failed(reactor, smtpd):
    handler, port = smtpd
    handler.rcpt_replies[TO] = "550 5.1.1 no such user"
    result = deliver(reactor, plain(port))
    assert (result.outcome, result.code) == ("failed", 550)
    assert "5.1.1 no such user" in result.reason


def test_connection_refused_is_retry(reactor):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = deliver(reactor, plain(port))
    assert (result.outcome, result.code) == ("retry", 0)
    assert result.reason.startswith("connection refused")


def test_no_greeting_within_the_timeout_is_retry(reactor):
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog), never speaks
        relay = Relay("127.0.0.1", listener.getsockname()[1], starttls="none", timeout=0.5)
        result = deliver(reactor, relay, timeout=10)
    assert (result.outcome, result.code) == ("retry", 0)
    assert result.reason == "no reply from the relay within 0.5s before the greeting"


def test_connection_dropped_after_data_is_retry_and_the_resend_delivers_one_more_copy(reactor, smtpd):
    handler, port = smtpd
    handler.drop_after_data = 1
    first = deliver(reactor, plain(port))
    assert (first.outcome, first.code) == ("retry", 0)
    assert first.reason == "connection lost after DATA, before the final reply"
    assert len(handler.messages) == 1  # the relay kept it; we could not know
    second = deliver(reactor, plain(port))  # the outbox resends the same bytes
    assert second.outcome == "delivered"
    assert len(handler.messages) == 2
    assert handler.messages[0] == handler.messages[1] == (FROM, [TO], MESSAGE)
    assert MESSAGE.count(b"Message-ID: <ref-1@direct.sender.test>") == 1


def test_starttls_required_and_auth_plain_delivers(reactor, smtpd_tls, pki):
    handler, port = smtpd_tls
    relay = Relay("127.0.0.1", port, starttls="require", username="clinic", password="s3cret pass",
                  ca_file=str(pki / "ca.pem"), timeout=10)
    result = deliver(reactor, relay)
    assert result.outcome == "delivered", result
    # aiosmtpd refuses MAIL before STARTTLS (require_starttls) and before AUTH (auth_required).
    assert handler.logins == [("PLAIN", b"clinic", b"s3cret pass")]
    assert handler.messages == [(FROM, [TO], MESSAGE)]
    assert "clinic" in repr(relay) and "s3cret" not in repr(relay)


def test_wrong_password_is_failed_with_the_servers_code(reactor, smtpd_tls, pki):
    handler, port = smtpd_tls
    relay = Relay("127.0.0.1", port, username="clinic", password="wrong", ca_file=str(pki / "ca.pem"), timeout=10)
    result = deliver(reactor, relay)
    assert (result.outcome, result.code) == ("failed", 535), result
    assert result.reason.startswith("AUTH declined: 535")
    assert handler.messages == []


def test_relay_certificate_from_another_ca_is_retry_and_nothing_is_sent(reactor, smtpd_tls, pki):
    handler, port = smtpd_tls
    relay = Relay("127.0.0.1", port, username="clinic", password="s3cret pass",
                  ca_file=str(pki / "rogue-ca.pem"), timeout=10)
    result = deliver(reactor, relay)
    assert (result.outcome, result.code) == ("retry", 0)
    assert result.reason.startswith("TLS handshake with the relay failed")
    assert handler.logins == [] and handler.messages == []


def test_starttls_required_but_not_offered_is_retry_with_a_clear_reason(reactor, smtpd, pki):
    # A relay that lost STARTTLS is a fault to fix, not a reason to drop the message:
    # retry (as Postfix defers), and the outbox's own limit ends it.
    handler, port = smtpd
    relay = Relay("127.0.0.1", port, starttls="require", ca_file=str(pki / "ca.pem"), timeout=10)
    result = deliver(reactor, relay)
    assert (result.outcome, result.code) == ("retry", 0)
    assert result.reason == "relay does not offer STARTTLS and starttls='require'"
    assert handler.messages == []


def test_opportunistic_without_starttls_never_sends_auth_in_clear(reactor, smtpd, pki):
    handler, port = smtpd
    relay = Relay("127.0.0.1", port, starttls="opportunistic", username="clinic", password="s3cret pass",
                  ca_file=str(pki / "ca.pem"), timeout=10)
    result = deliver(reactor, relay)
    assert (result.outcome, result.code) == ("retry", 0)
    assert "AUTH is not sent without TLS" in result.reason
    assert handler.logins == [] and handler.messages == []


def test_opportunistic_without_auth_falls_back_to_plain(reactor, smtpd, pki):
    handler, port = smtpd
    result = deliver(reactor, Relay("127.0.0.1", port, starttls="opportunistic", timeout=10))
    assert result.outcome == "delivered"
    assert handler.messages == [(FROM, [TO], MESSAGE)]


def test_bad_relay_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match="in clear"):
        Relay("relay.test", starttls="none", username="u", password="p")
    with pytest.raises(ValueError, match="starttls"):
        Relay("relay.test", starttls="maybe")
    Relay("relay.test", starttls="none", username="u", password="p", auth_without_tls=True)


def test_missing_ca_file_and_bad_addresses_become_results(reactor, tmp_path):
    result = deliver(reactor, Relay("127.0.0.1", 1, ca_file=str(tmp_path / "missing.pem")))
    assert (result.outcome, result.code) == ("retry", 0) and "missing.pem" in result.reason
    result = deliver(reactor, plain(1), recipients=("kardiolögie@direct.receiver.test",))
    assert result.outcome == "failed" and "ASCII" in result.reason
    result = deliver(reactor, plain(1), recipients=())
    assert result.outcome == "failed"


# -- against our own listener ------------------------------------------------------------


def test_starttls_to_our_own_listener_delivers_the_exact_bytes(reactor, pki):
    got = []

    def accept(mail_from, rcpt_tos, data):
        got.append((mail_from, rcpt_tos, data))

    tls = server_tls_options({"privateKey": "server.key", "certKey": "server.pem"}, pki)
    factory = InboundSMTPFactory(accept, domains=["direct.receiver.test"], tls=tls, clock=reactor)
    port = call(reactor, listen, reactor, "tcp:0:interface=127.0.0.1", factory)
    try:
        relay = Relay("127.0.0.1", port.getHost().port, ca_file=str(pki / "ca.pem"), timeout=10)
        result = deliver(reactor, relay)
    finally:
        call(reactor, port.stopListening)
    assert (result.outcome, result.code) == ("delivered", 250), result
    assert got == [(FROM, [TO], MESSAGE)]
