"""The email notifier against a real SMTP server (aiosmtpd on 127.0.0.1, an ephemeral port).

aiosmtpd runs its asyncio loop on its own thread; the notifier is blocking
(smtplib), as the engine calls it from a worker thread, so tests call it directly.
"""

from __future__ import annotations

import email
import email.policy
import logging
import socket
from pathlib import Path

import pytest
from aiosmtpd.smtp import AuthResult

from smtp_servers import running_smtpd
from hl7referral.notify import Notice, NotifierSettingsError, NotifyError, load_notifier
from hl7referral.notify.email import EmailNotifier, check_address, message_id

FROM = "referrals@clinic.test"
PATIENT = "pat.jones@example.test"


class Relay:
    """The SMTP server's handler: keeps what it accepts, answers as scripted."""

    def __init__(self):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.mail_reply = ""
        self.rcpt_reply = ""
        self.data_replies: list[str] = []
        self.drop_after_data = 0
        self.logins: list[tuple[str, bytes, bytes]] = []
        self.tls: list[bool] = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply.replace("ADDR", address)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.tls.append(session.ssl is not None)
        if self.drop_after_data:
            self.drop_after_data -= 1
            server.transport.close()   # stored; the reply never leaves
            return "250 never sent"
        return "250 2.0.0 Ok: queued as 4B1C"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((mechanism, auth_data.login, auth_data.password))
        ok = (auth_data.login, auth_data.password) == (b"clinic", b"s3cret pass")
        return AuthResult(success=ok, handled=False)

    def parsed(self, i: int = -1) -> email.message.EmailMessage:
        return email.message_from_bytes(self.messages[i][2], policy=email.policy.default)

    def body(self, i: int = -1) -> str:
        """The decoded text, line ends as Python writes them (SMTP carries CRLF)."""
        return self.parsed(i).get_content().replace("\r\n", "\n")


@pytest.fixture
def smtpd():
    with running_smtpd(Relay()) as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory, make_certs) -> Path:
    out = tmp_path_factory.mktemp("notify-pki")
    make_certs.build(out)
    return out


@pytest.fixture
def smtpd_tls(pki):
    with running_smtpd(Relay(), pki=pki) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notifier(port: int, **settings) -> EmailNotifier:
    base = {"host": "127.0.0.1", "port": port, "starttls": "none", "from": f"Riverside Referrals <{FROM}>",
            "timeout": 5.0}
    return EmailNotifier({**base, **settings})


def alert(**kw) -> Notice:
    base = dict(key="REF123/booking-overdue", referral_id="REF123", rule="booking-overdue", audience="coordinator",
                owner="alice", to="alice@clinic.test",
                subject="[REF123] Not booked: no appointment after the reminders",
                body="The specialist has the referral, but no appointment has been booked.\nOwner: alice\n",
                data={"referral_id": "REF123"})
    return Notice(**{**base, **kw})


def patient_message(**kw) -> Notice:
    base = dict(key="REF123/booking-reminder-1", referral_id="REF123", rule="booking-reminder-1", audience="patient",
                owner="role:referral-coordinators", to=PATIENT,
                subject="Reminder: please book the appointment with Dr. Müller",
                body="Hello,\n\nWe referred Bella to Dr. Müller — Kardiologie.\n.a line with a leading dot\n")
    return Notice(**{**base, **kw})


def fails(n: EmailNotifier, notice: Notice) -> NotifyError:
    with pytest.raises(NotifyError) as info:
        n.send(notice)
    return info.value


# -- delivered ---------------------------------------------------------------------------


def test_an_alert_arrives_with_its_key_owner_and_a_message_id_from_the_key(smtpd):
    relay, port = smtpd
    result = notifier(port).send(alert())
    assert (result.notifier, result.key) == ("email", "REF123/booking-overdue")
    assert result.detail == "250 2.0.0 Ok: queued as 4B1C"
    mail_from, rcpts, _ = relay.messages[-1]
    assert (mail_from, rcpts) == (FROM, ["alice@clinic.test"])
    msg = relay.parsed()
    assert msg["To"] == "alice@clinic.test"
    assert msg["From"] == f"Riverside Referrals <{FROM}>"
    assert msg["Subject"] == "[REF123] Not booked: no appointment after the reminders"
    assert msg["Message-ID"] == message_id("REF123/booking-overdue", "clinic.test") == result.reference
    assert msg["X-Hl7referral-Key"] == "REF123/booking-overdue"
    assert msg["X-Hl7referral-Owner"] == "alice"
    assert msg["X-Hl7referral-Rule"] == "booking-overdue"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["Date"]
    assert msg.get_content_type() == "text/plain"
    assert relay.body() == "The specialist has the referral, but no appointment has been booked.\nOwner: alice\n"
    assert relay.tls == [False]


def test_a_resend_is_recognisably_the_same_message(smtpd):
    relay, port = smtpd
    n = notifier(port)
    n.send(alert())
    n.send(alert())
    n.send(alert(key="REF124/booking-overdue", referral_id="REF124"))
    ids = [relay.parsed(i)["Message-ID"] for i in range(3)]
    assert ids[0] == ids[1] != ids[2]
    assert ids[0].startswith("<notice.") and ids[0].endswith("@clinic.test>")
    assert message_id("REF123/booking-overdue", "x.test") == message_id("REF123/booking-overdue", "x.test")


def test_non_ascii_subject_and_body_and_a_leading_dot_arrive_intact(smtpd):
    relay, port = smtpd
    notifier(port, message_id_domain="mail.clinic.test", reply_to="frontdesk@clinic.test").send(patient_message())
    msg = relay.parsed()
    assert msg["Subject"] == "Reminder: please book the appointment with Dr. Müller"
    assert relay.body() == "Hello,\n\nWe referred Bella to Dr. Müller — Kardiologie.\n.a line with a leading dot\n"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Message-ID"].endswith("@mail.clinic.test>")
    assert msg["Reply-To"] == "frontdesk@clinic.test"
    assert msg["X-Hl7referral-Owner"] == "role:referral-coordinators"
    assert relay.messages[-1][1] == [PATIENT]


def test_envelope_from_is_configurable(smtpd):
    relay, port = smtpd
    notifier(port, envelope_from="bounces@clinic.test").send(alert())
    assert relay.messages[-1][0] == "bounces@clinic.test"
    assert relay.parsed()["From"] == f"Riverside Referrals <{FROM}>"


# -- refused, deferred, unreachable --------------------------------------------------------


@pytest.mark.parametrize("where, reply, outcome, code", [
    ("rcpt", "550 5.1.1 <ADDR>: Recipient address rejected", "rejected", "smtp-550"),
    ("rcpt", "450 4.2.0 <ADDR>: mailbox busy", "retry", "smtp-450"),
    ("mail", "553 5.7.1 sender not allowed", "rejected", "smtp-553"),
    ("mail", "421 4.3.2 shutting down", "retry", "smtp-421"),
    ("data", "554 5.6.0 message refused", "rejected", "smtp-554"),
    ("data", "451 4.3.0 try again later", "retry", "smtp-451"),
])
def test_5xx_is_rejected_and_4xx_is_retry(smtpd, where, reply, outcome, code):
    relay, port = smtpd
    if where == "rcpt":
        relay.rcpt_reply = reply
    elif where == "mail":
        relay.mail_reply = reply
    else:
        relay.data_replies = [reply]
    err = fails(notifier(port), patient_message())
    assert (err.outcome, err.code) == (outcome, code), str(err)
    assert relay.messages == []
    # The relay's text is kept for the operator, with the recipient's address masked out.
    assert PATIENT not in str(err) and "REF123/booking-reminder-1" in str(err)
    if where == "rcpt":
        assert "<address>" in str(err)


def test_connection_refused_is_retry():
    err = fails(notifier(free_port()), alert())
    assert (err.outcome, err.code) == ("retry", "connect")


def test_a_relay_that_never_greets_is_retry_after_the_timeout():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        err = fails(notifier(listener.getsockname()[1], timeout=0.5), alert())
    assert (err.outcome, err.code) == ("retry", "timeout")
    assert "0.5s" in str(err)


def test_connection_dropped_after_data_is_retry_and_the_resend_has_the_same_message_id(smtpd):
    relay, port = smtpd
    relay.drop_after_data = 1
    n = notifier(port)
    err = fails(n, alert())
    assert (err.outcome, err.code) == ("retry", "connection")
    assert len(relay.messages) == 1                       # the relay kept it; we could not know
    n.send(alert())
    assert len(relay.messages) == 2
    assert relay.parsed(0)["Message-ID"] == relay.parsed(1)["Message-ID"]


def test_a_notice_without_a_usable_address_is_rejected_before_connecting():
    n = notifier(free_port())  # nothing listens: a connection attempt would be "retry"
    for to in ("", "not an address", "Name <a@b.test>"):
        err = fails(n, alert(to=to))
        assert (err.outcome, err.code) == ("rejected", "no-address")


# -- TLS and AUTH --------------------------------------------------------------------------


def test_starttls_required_and_auth_delivers(smtpd_tls, pki, monkeypatch):
    relay, port = smtpd_tls
    monkeypatch.setenv("NOTIFY_SMTP_PASSWORD", "s3cret pass")
    n = notifier(port, starttls="require", ca_file=str(pki / "ca.pem"), username="clinic",
                 password_env="NOTIFY_SMTP_PASSWORD")
    n.send(alert())
    assert relay.logins and relay.logins[0][1:] == (b"clinic", b"s3cret pass")
    assert relay.tls == [True]
    assert relay.parsed()["X-Hl7referral-Key"] == "REF123/booking-overdue"
    assert "s3cret" not in repr(vars(n))


def test_wrong_password_is_rejected_and_never_shown(smtpd_tls, pki, monkeypatch):
    relay, port = smtpd_tls
    monkeypatch.setenv("NOTIFY_SMTP_PASSWORD", "wrong horse")
    n = notifier(port, starttls="require", ca_file=str(pki / "ca.pem"), username="clinic",
                 password_env="NOTIFY_SMTP_PASSWORD")
    err = fails(n, alert())
    assert (err.outcome, err.code) == ("rejected", "smtp-535")
    assert "wrong horse" not in str(err)
    assert relay.messages == []


def test_password_env_not_set_is_retry_and_nothing_is_sent(smtpd_tls, pki, monkeypatch):
    relay, port = smtpd_tls
    monkeypatch.delenv("NOTIFY_SMTP_PASSWORD", raising=False)
    n = notifier(port, starttls="require", ca_file=str(pki / "ca.pem"), username="clinic",
                 password_env="NOTIFY_SMTP_PASSWORD")
    err = fails(n, alert())
    assert (err.outcome, err.code) == ("retry", "config")
    assert "NOTIFY_SMTP_PASSWORD" in str(err)
    assert relay.logins == [] and relay.messages == []


def test_a_relay_certificate_from_another_ca_is_retry(smtpd_tls, pki, monkeypatch):
    relay, port = smtpd_tls
    monkeypatch.setenv("NOTIFY_SMTP_PASSWORD", "s3cret pass")
    n = notifier(port, starttls="require", ca_file=str(pki / "rogue-ca.pem"), username="clinic",
                 password_env="NOTIFY_SMTP_PASSWORD")
    err = fails(n, alert())
    assert (err.outcome, err.code) == ("retry", "tls")
    assert relay.logins == [] and relay.messages == []


def test_starttls_required_but_not_offered_is_retry_and_nothing_is_sent(smtpd, pki):
    relay, port = smtpd
    err = fails(notifier(port, starttls="require", ca_file=str(pki / "ca.pem")), alert())
    assert (err.outcome, err.code) == ("retry", "no-starttls")
    assert relay.messages == []


def test_opportunistic_sends_plain_when_not_offered_but_never_auth_in_clear(smtpd, monkeypatch):
    relay, port = smtpd
    notifier(port, starttls="opportunistic").send(alert())
    assert relay.tls == [False]
    monkeypatch.setenv("NOTIFY_SMTP_PASSWORD", "s3cret pass")
    err = fails(notifier(port, starttls="opportunistic", username="clinic", password_env="NOTIFY_SMTP_PASSWORD"),
                alert())
    assert (err.outcome, err.code) == ("retry", "no-starttls")
    assert len(relay.messages) == 1


def test_opportunistic_uses_tls_when_offered(smtpd_tls, pki, monkeypatch):
    relay, port = smtpd_tls
    monkeypatch.setenv("NOTIFY_SMTP_PASSWORD", "s3cret pass")
    notifier(port, starttls="opportunistic", ca_file=str(pki / "ca.pem"), username="clinic",
             password_env="NOTIFY_SMTP_PASSWORD").send(alert())
    assert relay.tls == [True]


# -- no PHI in logs --------------------------------------------------------------------------


def test_logs_name_the_key_and_referral_never_the_address_subject_or_body(smtpd, caplog):
    relay, port = smtpd
    caplog.set_level(logging.DEBUG)
    n = notifier(port)
    n.send(patient_message())
    relay.rcpt_reply = "550 5.1.1 <ADDR>: unknown user"
    err = fails(n, patient_message())
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hl7referral"))
    logged = ours + str(err) + repr(patient_message())
    assert "REF123/booking-reminder-1" in ours
    for secret in (PATIENT, "Bella", "Müller", "Reminder: please book"):
        assert secret not in logged


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, key", [
    ({"from": FROM}, "host"),
    ({"host": "127.0.0.1"}, "from"),
    ({"host": "127.0.0.1", "from": "not an address"}, "from"),
    ({"host": "127.0.0.1", "from": FROM, "starttls": "maybe"}, "starttls"),
    ({"host": "127.0.0.1", "from": FROM, "port": 0}, "port"),
    ({"host": "127.0.0.1", "from": FROM, "timeout": 0}, "timeout"),
    ({"host": "127.0.0.1", "from": FROM, "username": "u"}, "password_env"),
    ({"host": "127.0.0.1", "from": FROM, "username": "u", "password_env": "the password"}, "password_env"),
    ({"host": "127.0.0.1", "from": FROM, "username": "u", "password_env": "P", "starttls": "none"}, "starttls"),
    ({"host": "127.0.0.1", "from": FROM, "reply_to": "x"}, "reply_to"),
    ({"host": "smtp .example", "from": FROM}, "host"),
    ({"host": "127.0.0.1", "from": FROM, "hots": "x"}, "hots"),
])
def test_bad_settings_name_their_key(settings, key):
    with pytest.raises(NotifierSettingsError) as info:
        EmailNotifier(settings)
    assert info.value.key == key


def test_the_plugin_is_found_by_its_entry_point():
    n = load_notifier("email", {"host": "smtp.clinic.test", "from": FROM})
    assert isinstance(n, EmailNotifier)
    assert (n.port, n.starttls, n.timeout, n.needs_address) == (587, "require", 30.0, True)
    with pytest.raises(NotifierSettingsError) as info:
        load_notifier("pigeon", {})
    assert info.value.key == "plugin" and "email" in info.value.message


def test_check_address():
    assert check_address("alice@clinic.test") is None
    assert check_address("müller@klinik.test") is None
    for bad in ("", "alice", "a@b@c", "Alice <alice@clinic.test>", "a b@c.test", "a@c.test,b@c.test", ".a@c.test"):
        assert check_address(bad), bad
