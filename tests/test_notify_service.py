"""The notification sender: queued rows out through a real SMTP server (aiosmtpd), retried, or failed to an alert."""

from __future__ import annotations

import email

import pytest

from hl7referral.config import load_engine
from hl7referral.engine.notify_service import MAX_ATTEMPTS, NotifyService
from hl7referral.store import Store
from hl7referral.store.loop import Loop
from smtp_servers import running_smtpd
from test_notify_email import Relay, notifier

NOW = 1_796_000_000.0


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "notify.db")
    Loop(s).open_referral("R1", at="2026-12-01T09:00:00Z", channel="ref-i12", owner="alice")
    yield s
    s.close()


def queue(loop: Loop, key="R1/booking-reminder-1") -> int:
    return loop.queue_notification(key=key, at="2026-12-06T09:00:00Z", referral_id="R1", rule="booking-reminder-1",
                                   audience="patient", notifier="email", owner="alice", recipient="pat@example.test",
                                   subject="Please book your appointment", body="Call us.", data={}, now=NOW)


def test_a_queued_notice_arrives_once_with_its_key(store):
    loop = Loop(store)
    queue(loop)
    assert queue(loop) is None                       # the same key twice: one row
    with running_smtpd(Relay()) as (relay, port):
        service = NotifyService(load_engine(), store, None, notifiers={"email": notifier(port)})
        assert service.send_due(NOW) == [(1, "sent")]
        assert service.send_due(NOW + 60) == []
    [(_, rcpt, data)] = relay.messages
    msg = email.message_from_bytes(data)
    assert rcpt == ["pat@example.test"] and msg["X-Hl7referral-Key"] == "R1/booking-reminder-1"
    assert [n["state"] for n in loop.notifications(referral_id="R1")] == ["sent"]


def test_a_relay_that_is_down_is_retried_then_the_owner_is_alerted(store):
    loop = Loop(store)
    queue(loop)
    with running_smtpd(Relay()) as (_, port):
        pass                                          # the port is closed again: connection refused
    service = NotifyService(load_engine(), store, None, notifiers={"email": notifier(port)})
    assert service.send_due(NOW) == [(1, "pending")]
    assert service.send_due(NOW + 1) == []            # backing off
    row = loop.notifications(referral_id="R1")[0]
    assert row["attempts"] == 1 and row["last_error"]
    now = NOW
    for _ in range(MAX_ATTEMPTS - 1):
        now += 7200
        service.send_due(now)
    assert loop.notifications(referral_id="R1")[0]["state"] == "failed"
    [alert] = loop.alerts("R1")
    assert alert["kind"] == "notify-failed" and alert["owner"] == "alice"


def test_a_refused_recipient_fails_at_once_with_an_alert(store):
    loop = Loop(store)
    queue(loop)
    relay = Relay()
    relay.rcpt_reply = "550 5.1.1 <ADDR>: no such user"
    with running_smtpd(relay) as (_, port):
        service = NotifyService(load_engine(), store, None, notifiers={"email": notifier(port)})
        assert service.send_due(NOW) == [(1, "failed")]
    assert [a["owner"] for a in loop.alerts("R1")] == ["alice"]
