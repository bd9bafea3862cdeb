"""The POP3 poller against a real POP3 server (Twisted's) on 127.0.0.1.

Messages are deleted on the server only after ``deliver`` committed them; a
failing commit leaves them there for the next poll.
"""

from __future__ import annotations

import io

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from twisted.mail import pop3
from zope.interface import implementer

from reactor_thread import call, running_reactor
from hl7referral.engine.mailbox import MailboxConfig, POP3Poller

MESSAGES = [b"From: a@direct.receiver.test\r\nMessage-ID: <m1@x>\r\n\r\nfirst\r\n.leading dot\r\n",
            b"From: b@direct.receiver.test\r\nMessage-ID: <m2@x>\r\n\r\nsecond\r\n"]


@implementer(pop3.IMailbox)
class Mailbox:
    def __init__(self, messages):
        # Stored with LF, as a maildir keeps them; the server sends CRLF lines.
        self.messages = [m.replace(b"\r\n", b"\n") for m in messages]
        self.deleted: set[int] = set()
        self.synced = 0

    def listMessages(self, index=None):
        sizes = [0 if i in self.deleted else len(m) for i, m in enumerate(self.messages)]
        return sizes if index is None else sizes[index]

    def getMessage(self, index):
        return io.BytesIO(self.messages[index])

    def getUidl(self, index):
        return str(index).encode()

    def deleteMessage(self, index):
        self.deleted.add(index)

    def undeleteMessages(self):
        self.deleted.clear()

    def sync(self):  # QUIT: deletions become final
        self.synced += 1
        self.messages = [m for i, m in enumerate(self.messages) if i not in self.deleted]
        self.deleted.clear()


@implementer(IRealm)
class Realm:
    def __init__(self, box):
        self.box = box

    def requestAvatar(self, avatar_id, mind, *interfaces):
        # RFC 1939: deletions of a session that ended without QUIT never happened.
        self.box.undeleteMessages()
        return pop3.IMailbox, self.box, lambda: None


@pytest.fixture(scope="module")
def reactor():
    return running_reactor()


@pytest.fixture
def server(reactor):
    box = Mailbox(MESSAGES)
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(b"clinic", b"secret")  # POP3 credentials arrive as bytes
    portal = Portal(Realm(box), [checker])

    class Factory(protocol.ServerFactory):
        def buildProtocol(self, addr):
            p = pop3.POP3()
            p.portal = portal  # the POP3 protocol, not its factory, holds the portal
            p.factory = self
            return p
    factory = Factory()
    port = call(reactor, lambda: reactor.listenTCP(0, factory, interface="127.0.0.1"))
    yield box, port.getHost().port
    call(reactor, port.stopListening)


def poller(reactor, port, deliver, password="secret"):
    config = MailboxConfig(host="127.0.0.1", port=port, username="clinic", password=password, tls="none",
                           timeout=5.0)
    return POP3Poller(reactor, config, deliver, "referrals@direct.sender.test")


def test_fetches_commits_then_deletes(reactor, server):
    box, port = server
    got = []

    def deliver(mail_from, rcpts, data):
        assert box.synced == 0  # nothing deleted before the commit of every message
        got.append((rcpts, data))
        return defer.succeed(len(got))

    assert call(reactor, poller(reactor, port, deliver).poll) == 2
    assert [d for _, d in got] == MESSAGES  # exact bytes, the leading dot unstuffed
    assert got[0][0] == ["referrals@direct.sender.test"]
    assert box.messages == [] and box.synced == 1
    assert call(reactor, poller(reactor, port, deliver).poll) == 0


def test_failed_commit_leaves_the_mail_on_the_server(reactor, server):
    box, port = server
    calls = []

    def deliver(mail_from, rcpts, data):
        calls.append(data)
        if len(calls) == 2:
            return defer.fail(RuntimeError("store is read-only"))
        return defer.succeed(None)

    assert call(reactor, poller(reactor, port, deliver).poll) == 1
    assert len(box.messages) == 2 and box.synced == 0  # no QUIT: not even the first is deleted
    assert call(reactor, poller(reactor, port, lambda *a: defer.succeed(None)).poll) == 2
    assert box.messages == []


def test_wrong_password_is_logged_not_raised(reactor, server):
    box, port = server
    assert call(reactor, poller(reactor, port, lambda *a: defer.succeed(None), password="nope").poll) == 0
    assert len(box.messages) == 2


def test_engine_polls_the_mailbox_and_keeps_what_it_fetched(reactor, server, tmp_path, direct_pki):
    """A running engine fetches both messages, stores them, and only then they leave the server."""
    import os
    import sqlite3
    import time

    from engine_process import EngineProcess
    from test_direct_engine import direct_settings, free_port

    box, port = server
    settings = direct_settings(direct_pki, free_port(), free_port())
    settings += ["--set", 'direct.mailbox.host="127.0.0.1"', "--set", f"direct.mailbox.port={port}",
                 "--set", 'direct.mailbox.username="clinic"', "--set", 'direct.mailbox.password_env="BOX_PW"',
                 "--set", 'direct.mailbox.tls="none"', "--set", "direct.mailbox.interval=0.5"]
    os.environ["BOX_PW"] = "secret"
    engine = EngineProcess.start(tmp_path, *settings)
    try:
        deadline = time.monotonic() + 30
        while box.messages and time.monotonic() < deadline:
            time.sleep(0.1)
        assert box.messages == []

        def mail():
            conn = sqlite3.connect(f"file:{engine.store}?mode=ro", uri=True)
            try:
                return conn.execute("SELECT raw, status, trust FROM mail ORDER BY id").fetchall()
            finally:
                conn.close()
        while any(r[1] == "received" for r in mail()) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = mail()
        assert [r[0] for r in rows] == MESSAGES
        assert [(r[1], r[2]) for r in rows] == [("rejected", "not-encrypted")] * 2  # plain mail is refused, kept
    finally:
        engine.stop()
        del os.environ["BOX_PW"]
