"""The inbound SMTP listener on 127.0.0.1 with real clients: swaks, smtplib and raw sockets.

Twisted's reactor runs on a thread (see the ``reactor`` fixture); accept() runs
in it, and the tests look at what it was given.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl as stdlib_ssl
import subprocess
import threading
from pathlib import Path

import pytest
from twisted.internet import defer

from reactor_thread import call, running_reactor
from hl7referral.engine.endpoints import tls_options
from hl7referral.engine.smtp_server import InboundSMTPFactory, listen

DOMAIN = "direct.receiver.test"
FROM, TO = "a@x.test", f"b@{DOMAIN}"
SWAKS = shutil.which("swaks")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed (apt-get install swaks)")

# LF line endings on disk; a dot-led line, a lone dot and a header-less first body line.
FIXTURE = (b"From: a@x.test\nTo: b@direct.receiver.test\nMessage-ID: <in-1@x.test>\nSubject: referral\n\n"
           b"body line one\n.starts with a dot\n..two dots\n.\nlast line\n")
EXPECTED = FIXTURE.replace(b"\n", b"\r\n")


@pytest.fixture(scope="module")
def reactor():
    return running_reactor()


class Acceptor:
    """accept() for the factory: records each call; answers as the test says."""

    def __init__(self):
        self.calls: list[tuple[str, list[str], bytes]] = []
        self.mode = "ok"  # "ok" | "fail" | "raise" | "hold"
        self.held: list[defer.Deferred] = []
        self.called = threading.Event()

    def __call__(self, mail_from, rcpt_tos, data):
        self.calls.append((mail_from, rcpt_tos, data))
        self.called.set()
        if self.mode == "fail":
            return defer.fail(OSError("disk full"))
        if self.mode == "raise":
            raise RuntimeError("store closed")
        if self.mode == "hold":
            d = defer.Deferred()
            self.held.append(d)
            return d
        return defer.succeed(None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory, make_certs) -> Path:
    out = tmp_path_factory.mktemp("smtp-pki")
    make_certs.build(out)
    return out


def start(reactor, acceptor, **kw):
    factory = InboundSMTPFactory(acceptor, domains=kw.pop("domains", [DOMAIN]), clock=reactor, **kw)
    port = call(reactor, listen, reactor, "tcp:0:interface=127.0.0.1", factory)
    return factory, port


@pytest.fixture
def server(reactor):
    acceptor = Acceptor()
    holder = {}

    def make(**kw):
        factory, port = start(reactor, acceptor, **kw)
        holder["port"] = port
        return acceptor, port.getHost().port, factory

    yield make
    if "port" in holder:
        for d in acceptor.held:  # nothing left hanging in the reactor
            if not d.called:
                reactor.callFromThread(d.callback, None)
        call(reactor, holder["port"].stopListening)


def fixture_file(tmp_path) -> Path:
    # swaks sends the file with its line endings made CRLF, dot-stuffed, then its own
    # CRLF "." CRLF: without a final newline in the file the CRLF before "." is the last
    # line's, and what arrives is EXPECTED exactly.
    path = tmp_path / "msg.eml"
    path.write_bytes(FIXTURE.rstrip(b"\n"))
    return path


def swaks(port, data_file, to=TO, *extra):
    return subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(port), "--from", FROM, "--to", to,
                           "--data", str(data_file), "--timeout", "20", *extra],
                          capture_output=True, text=True, timeout=60)


# -- swaks ---------------------------------------------------------------------------


@needs_swaks
def test_swaks_message_arrives_byte_for_byte(server, tmp_path):
    acceptor, port, factory = server()
    fixture = fixture_file(tmp_path)
    run = swaks(port, fixture)
    assert run.returncode == 0, run.stdout + run.stderr
    assert acceptor.calls == [(FROM, [TO], EXPECTED)]
    assert "250 2.0.0 Message accepted" in run.stdout
    assert factory.counts["accepted"] == 1


@needs_swaks
def test_swaks_to_an_unknown_domain_gets_550_and_nothing_is_accepted(server, tmp_path):
    acceptor, port, _ = server()
    fixture = fixture_file(tmp_path)
    run = swaks(port, fixture, "b@elsewhere.test")
    assert run.returncode != 0
    assert "550 5.1.1" in run.stdout
    assert acceptor.calls == []


@needs_swaks
def test_swaks_gets_451_when_accept_fails(server, tmp_path):
    acceptor, port, factory = server()
    acceptor.mode = "fail"
    fixture = fixture_file(tmp_path)
    run = swaks(port, fixture)
    assert run.returncode != 0
    assert "451 4.3.0" in run.stdout
    assert len(acceptor.calls) == 1 and factory.counts["deferred"] == 1


# -- smtplib -------------------------------------------------------------------------


def test_smtplib_message_arrives_byte_for_byte_once_for_all_recipients(server):
    acceptor, port, _ = server()
    second = f"c@{DOMAIN.upper()}"  # domains match case-insensitively
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        refused = client.sendmail(FROM, [TO, second], EXPECTED)
    assert refused == {}
    assert acceptor.calls == [(FROM, [TO, second], EXPECTED)]


def test_exact_bytes_without_headers_and_with_bare_lf_inside_a_line(server):
    # Twisted itself would insert a blank line before a first line without a colon.
    acceptor, port, _ = server()
    data = b"no colon on the first line\r\nbare\nLF stays\r\n\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.sendmail(FROM, [TO], data)
    assert acceptor.calls == [(FROM, [TO], data)]


def test_unknown_domain_and_subdomain_get_550(server):
    acceptor, port, factory = server()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        for rcpt in ("b@elsewhere.test", f"b@sub.{DOMAIN}", f"b@{DOMAIN}.evil.test"):
            with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                client.sendmail(FROM, [rcpt], EXPECTED)
            code, text = info.value.recipients[rcpt]
            assert code == 550 and text.startswith(b"5.1.1")
    assert acceptor.calls == [] and factory.counts["rcpt_refused"] == 3


def test_accept_raising_gets_451(server):
    acceptor, port, _ = server()
    acceptor.mode = "raise"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail(FROM, [TO], EXPECTED)
    assert info.value.smtp_code == 451


def test_oversized_message_gets_552_and_is_not_accepted(server):
    acceptor, port, factory = server(max_size=1000)
    big = b"Subject: big\r\n\r\n" + b"y" * 78 + b"\r\n" + (b"z" * 78 + b"\r\n") * 20
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        # Announced with SIZE= (smtplib does when SIZE is advertised): refused at MAIL.
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail(FROM, [TO], big)
        assert info.value.smtp_code == 552
        # Not announced: counted while it arrives, refused at the end of DATA.
        client.rset()
        assert client.mail(FROM)[0] == 250 and client.rcpt(TO)[0] == 250
        code, text = client.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")
        # Exactly at the limit is fine.
        exact = b"x" * (1000 - 2) + b"\r\n"
        assert client.sendmail(FROM, [TO], exact) == {}
    assert acceptor.calls == [(FROM, [TO], exact)]
    assert factory.counts["oversized"] == 2


def test_sequencing_is_twisteds_503(server):
    acceptor, port, _ = server()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo()
        assert client.docmd("RCPT", f"TO:<{TO}>")[0] == 503
        assert client.docmd("DATA")[0] == 503
        assert client.mail(FROM)[0] == 250
        assert client.docmd("DATA")[0] == 503
    assert acceptor.calls == []


# -- raw sockets: timing and STARTTLS ----------------------------------------------------


def reply(f) -> bytes:
    """One complete (possibly multi-line) reply."""
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("closed")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


def test_250_only_after_accepts_deferred_fires(server, reactor):
    acceptor, port, _ = server()
    acceptor.mode = "hold"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")
        assert reply(f).startswith(b"220")
        for command, code in ((b"EHLO test", b"250"), (b"MAIL FROM:<a@x.test>", b"250"),
                              (b"RCPT TO:<b@direct.receiver.test>", b"250"), (b"DATA", b"354")):
            s.sendall(command + b"\r\n")
            assert reply(f).startswith(code)
        s.sendall(b"Subject: slow\r\n\r\nbody\r\n.\r\n")
        assert acceptor.called.wait(10)
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):  # committed? not yet: no reply
            f.readline()
        assert acceptor.calls == [(FROM, [TO], b"Subject: slow\r\n\r\nbody\r\n")]
        reactor.callFromThread(acceptor.held[0].callback, None)
        s.settimeout(10)
        f = s.makefile("rb")
        assert reply(f).startswith(b"250 2.0.0")


def test_end_of_data_is_only_crlf_dot_crlf(server):
    # "\n.\n" and "\r\n.\n" do not end the message (no SMTP smuggling): they are part of it.
    acceptor, port, _ = server()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")
        reply(f)
        for command in (b"HELO test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@direct.receiver.test>", b"DATA"):
            s.sendall(command + b"\r\n")
            reply(f)
        s.sendall(b"Subject: one\r\n\r\nx\n.\nMAIL FROM:<evil@x.test>\r\ny\r\n.\nz\r\n.\r\n")
        assert reply(f).startswith(b"250")
    # (".\nz" is a line that starts with a dot: un-stuffed like any other)
    assert acceptor.calls == [(FROM, [TO], b"Subject: one\r\n\r\nx\n.\nMAIL FROM:<evil@x.test>\r\ny\r\n\nz\r\n")]


def test_starttls_discards_commands_pipelined_in_clear(server, pki):
    tls = tls_options({"privateKey": "server.key", "certKey": "server.pem"}, pki)
    acceptor, port, _ = server(tls=tls)
    context = stdlib_ssl.create_default_context(cafile=str(pki / "ca.pem"))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        f = raw.makefile("rb")
        reply(f)
        raw.sendall(b"EHLO test\r\n")
        assert b"STARTTLS" in reply(f)
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")  # one packet
        assert reply(f).startswith(b"220")
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            tf = s.makefile("rb")
            s.sendall(b"EHLO test\r\n")
            ehlo = reply(tf)
            assert ehlo.startswith(b"250-") and b"STARTTLS" not in ehlo and b"SIZE" in ehlo
            s.sendall(b"RCPT TO:<b@direct.receiver.test>\r\n")
            assert reply(tf).startswith(b"503")  # the injected MAIL FROM never counted
            s.sendall(b"MAIL FROM:<a@x.test>\r\n")
            assert reply(tf).startswith(b"250")


def test_a_line_over_the_limit_closes_the_connection(server):
    acceptor, port, _ = server()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")
        reply(f)
        s.sendall(b"HELO " + b"h" * 20000 + b"\r\n")
        assert reply(f).startswith(b"500 5.5.2")
        assert f.readline() == b""  # closed
