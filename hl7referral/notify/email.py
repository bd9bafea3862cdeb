"""The ``email`` notifier: one notice, one message, one SMTP session (stdlib ``smtplib``).

Blocking: the engine calls :meth:`EmailNotifier.send` from a worker thread.
Settings (the ``[notify.notifiers.<name>]`` table with ``plugin = "email"``)
and their defaults are in :data:`DEFAULTS`.

Invariants
----------
* The ``Message-ID`` is derived from the notice's key alone
  (:func:`message_id`), so a resend of the same notice (after a timeout, a
  crash, a dropped connection after DATA) is the same message to every mail
  system and person that sees both. The key is also in ``X-Hl7referral-Key``,
  the owner in ``X-Hl7referral-Owner``.
* Every message is marked automatic (``Auto-Submitted: auto-generated``,
  RFC 3834, and Exchange's ``X-Auto-Response-Suppress``), so out-of-office
  replies do not loop back into the referral mailbox.
* ``starttls = "require"``: no MAIL FROM before TLS is up, and the relay's
  certificate is verified for ``host`` against ``ca_file`` (or the platform's
  roots). ``"opportunistic"``: TLS, verified the same way, when offered.
  ``"none"``: plain SMTP (a relay on localhost). AUTH is only sent inside TLS
  unless ``auth_without_tls`` is set; the password is read from the environment
  variable named by ``password_env`` at send time and never stored or logged.
* Outcomes: a delivered message is one the relay answered 2xx to at the end of
  DATA. A 5xx reply (to anything: MAIL, RCPT, DATA, AUTH) is ``rejected``; a
  4xx reply is ``retry``; so is everything that is not a reply: no connection,
  a timeout, a dropped connection (even after DATA: the resend has the same
  Message-ID), TLS failures, STARTTLS required but not offered, a missing
  password. A notice without a usable address is ``rejected`` before connecting.
* Logs and errors name the key, referral id, relay and reply code, with the
  relay's reply text scrubbed of addresses; never the recipient, subject or body.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import hashlib
import logging
import os
import re
import smtplib
import ssl
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from .base import REJECTED, RETRY, Notice, NotifierSettingsError, NotifyError, Result, scrub

log = logging.getLogger(__name__)

STARTTLS_MODES = ("require", "opportunistic", "none")

# Every setting and its default; None = required.
DEFAULTS: dict[str, Any] = {
    "host": None,                 # the SMTP relay
    "port": 587,
    "starttls": "require",        # require | opportunistic | none
    "username": "",               # "" = no AUTH
    "password_env": "",           # NAME of the environment variable holding the password
    "auth_without_tls": False,    # allow AUTH over plain SMTP (a password in clear)
    "ca_file": "",                # PEM roots for the relay's certificate; "" = the platform's
    "helo": "",                   # the EHLO name; "" = this host's FQDN
    "from": None,                 # "referrals@clinic.test" or "Referrals <referrals@clinic.test>"
    "reply_to": "",               # where replies go ("" = From)
    "envelope_from": "",          # MAIL FROM (bounces); "" = From's address
    "message_id_domain": "",      # the right side of Message-IDs; "" = From's domain
    "timeout": 30.0,              # seconds: to connect, and for each reply
}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# An addr-spec as we send to: no display name, no comments, no spaces; one "@", a domain without brackets.
_ADDR = re.compile(r'^[^\s@<>()\[\],;:"\\]+@[^\s@<>()\[\],;:"\\]+$')
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$|^\[?[0-9A-Fa-f:.]+\]?$")


def message_id(key: str, domain: str) -> str:
    """The Message-ID of the notice with *key*: the same for every send of it, unique per key.

    A digest rather than the key itself: keys may hold characters a msg-id cannot,
    and the key is in ``X-Hl7referral-Key`` for people.
    """
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
    return f"<notice.{digest}@{domain}>"


def check_address(address: str) -> str | None:
    """Why *address* is not an email address we send to (None if it is)."""
    if not isinstance(address, str) or not address:
        return "is empty"
    if not _ADDR.match(address) or address.startswith(".") or ".." in address:
        return "is not an email address (user@domain, without a display name)"
    return None


_FROM = re.compile(r'^\s*(?:"?(?P<name>[^<>"]*?)"?\s*<(?P<addr>[^<>\s]+)>|(?P<bare>[^<>\s]+))\s*$')


def _parse_from(value: str) -> Address:
    """The ``from`` setting as an Address (``addr`` or ``Name <addr>``); NotifierSettingsError if not."""
    m = _FROM.match(value)
    addr = (m.group("addr") or m.group("bare")) if m else ""
    if not addr or check_address(addr):
        raise NotifierSettingsError("from", "expected an address, or a name and <address>")
    local, _, domain = addr.rpartition("@")
    return Address(display_name=(m.group("name") or "").strip(), username=local, domain=domain)


class EmailNotifier:
    name = "email"
    needs_address = True

    def __init__(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise NotifierSettingsError(unknown[0], f"unknown setting (known: {', '.join(sorted(DEFAULTS))})")
        s = {**DEFAULTS, **settings}
        for key, default in DEFAULTS.items():
            if s[key] is None:
                raise NotifierSettingsError(key, "required")
            if (default is None or isinstance(default, str)) and not isinstance(s[key], str):
                raise NotifierSettingsError(key, f"expected a string, got {type(s[key]).__name__}")
            if isinstance(s[key], str) and _CONTROL.search(s[key]):
                raise NotifierSettingsError(key, "control characters are not allowed")
        self.host = s["host"]
        if not _HOST.match(self.host):
            raise NotifierSettingsError("host", "expected a host name or IP address")
        port = s["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise NotifierSettingsError("port", "expected a port number (1-65535)")
        self.port = port
        if s["starttls"] not in STARTTLS_MODES:
            raise NotifierSettingsError("starttls", f"must be one of {', '.join(STARTTLS_MODES)}")
        self.starttls = s["starttls"]
        if not isinstance(s["auth_without_tls"], bool):
            raise NotifierSettingsError("auth_without_tls", "expected true or false")
        self.auth_without_tls = s["auth_without_tls"]
        self.username = s["username"]
        self.password_env = s["password_env"]
        if self.password_env and not _ENV_NAME.match(self.password_env):
            raise NotifierSettingsError("password_env", "expected the NAME of an environment variable "
                                                        "(the password itself never goes in a file)")
        if self.username and not self.password_env:
            raise NotifierSettingsError("password_env", "required with a username")
        if self.username and self.starttls == "none" and not self.auth_without_tls:
            raise NotifierSettingsError("starttls", "a username with starttls = \"none\" would send the password "
                                                    "in clear; use \"require\" (or set auth_without_tls)")
        self.ca_file = s["ca_file"]
        self.helo = s["helo"]
        self.sender = _parse_from(s["from"])
        self.reply_to = s["reply_to"]
        if self.reply_to and check_address(self.reply_to):
            raise NotifierSettingsError("reply_to", check_address(self.reply_to))
        self.envelope_from = s["envelope_from"] or self.sender.addr_spec
        if check_address(self.envelope_from):
            raise NotifierSettingsError("envelope_from", check_address(self.envelope_from))
        self.domain = s["message_id_domain"] or self.sender.domain
        if not re.fullmatch(r"[A-Za-z0-9.-]+", self.domain):
            raise NotifierSettingsError("message_id_domain", "expected a domain name")
        timeout = s["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise NotifierSettingsError("timeout", "expected a number of seconds above 0")
        self.timeout = float(timeout)

    def check_address(self, address: str) -> str | None:
        return check_address(address)

    # ---------------------------------------------------------------- the message

    def message(self, notice: Notice, *, now: dt.datetime | None = None) -> EmailMessage:
        """The message for *notice*, as sent (headers and a text/plain UTF-8 body)."""
        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = self.sender
        msg["To"] = notice.to
        if self.reply_to:
            msg["Reply-To"] = self.reply_to
        msg["Subject"] = notice.subject
        msg["Date"] = email.utils.format_datetime(now or dt.datetime.now(dt.timezone.utc))
        msg["Message-ID"] = message_id(notice.key, self.domain)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"
        msg["X-Hl7referral-Key"] = notice.key
        msg["X-Hl7referral-Owner"] = notice.owner
        msg["X-Hl7referral-Rule"] = notice.rule
        msg.set_content(notice.body, charset="utf-8")
        return msg

    # ---------------------------------------------------------------- sending

    def send(self, notice: Notice) -> Result:
        what = f"key {notice.key} (referral {notice.referral_id})"
        problem = check_address(notice.to)
        if problem:
            # Config or data, not the relay: no retry will find an address.
            raise NotifyError(f"{what}: the recipient address {problem}", REJECTED, "no-address")
        password = self._password() if self.username else ""
        msg = self.message(notice)
        mid = msg["Message-ID"]
        phase = "connect"
        smtp: _SMTP | None = None
        try:
            # The host given here is the one STARTTLS verifies the certificate for.
            smtp = _SMTP(self.host, self.port, timeout=self.timeout, local_hostname=self.helo or None)
            phase = "EHLO"
            smtp.ehlo_or_helo_if_needed()
            tls = False
            if self.starttls != "none":
                if smtp.has_extn("starttls"):
                    phase = "STARTTLS"
                    smtp.starttls(context=self._tls_context())
                    smtp.ehlo()
                    tls = True
                elif self.starttls == "require":
                    raise NotifyError(f"{what}: the relay does not offer STARTTLS and starttls = \"require\"",
                                      RETRY, "no-starttls")
            if self.username:
                if not tls and not self.auth_without_tls:
                    raise NotifyError(f"{what}: the relay offers no STARTTLS; AUTH is not sent without TLS",
                                      RETRY, "no-starttls")
                phase = "AUTH"
                smtp.login(self.username, password)
            phase = "MAIL"
            smtp.send_message(msg, from_addr=self.envelope_from, to_addrs=[notice.to])
            code, reply = smtp.data_reply
        except NotifyError:
            raise
        except smtplib.SMTPRecipientsRefused as e:
            code, reply = next(iter(e.recipients.values()), (0, b""))
            raise self._reply_error(what, "RCPT", code, reply) from None
        except smtplib.SMTPResponseException as e:  # greeting, EHLO, STARTTLS, AUTH, MAIL FROM, DATA
            step = phase
            if phase == "MAIL":
                step = "MAIL FROM" if isinstance(e, smtplib.SMTPSenderRefused) else "DATA"
            raise self._reply_error(what, step, e.smtp_code, e.smtp_error) from None
        except smtplib.SMTPNotSupportedError as e:
            # SMTPUTF8 needed for a non-ASCII address the relay cannot carry, or no AUTH offered.
            if phase == "MAIL":
                raise NotifyError(f"{what}: the relay cannot carry this message ({scrub(str(e))})",
                                  REJECTED, "not-supported") from None
            raise NotifyError(f"{what}: {phase}: {scrub(str(e))}", RETRY, "not-supported") from None
        except ssl.SSLCertVerificationError:
            raise NotifyError(f"{what}: the relay's TLS certificate was not accepted", RETRY, "tls") from None
        except ssl.SSLError as e:
            raise NotifyError(f"{what}: TLS failed ({type(e).__name__})", RETRY, "tls") from None
        except smtplib.SMTPServerDisconnected as e:
            # smtplib turns a read timeout into "disconnected"; say which it was.
            if isinstance(e.__context__, TimeoutError):
                raise NotifyError(f"{what}: no reply within {self.timeout:g}s ({phase})", RETRY, "timeout") \
                    from None
            during = "during MAIL, RCPT or DATA" if phase == "MAIL" else f"during {phase}"
            raise NotifyError(f"{what}: the relay closed the connection {during}", RETRY, "connection") from None
        except TimeoutError:
            raise NotifyError(f"{what}: no reply within {self.timeout:g}s ({phase})", RETRY, "timeout") from None
        except (OSError, smtplib.SMTPException) as e:  # refused, unreachable, no AUTH mechanism in common...
            kind = {"connect": "connect", "AUTH": "auth"}.get(phase, "connection")
            raise NotifyError(f"{what}: {phase}: {type(e).__name__}", RETRY, kind) from None
        finally:
            if smtp is not None:
                _close(smtp)
        detail = scrub(f"{code} {reply.decode('utf-8', 'replace')}")
        log.info("notice %s (referral %s) sent by email: %s", notice.key, notice.referral_id, detail)
        return Result(self.name, notice.key, mid, detail)

    def _reply_error(self, what: str, step: str, code: int, reply: bytes | str) -> NotifyError:
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        outcome = REJECTED if 500 <= code < 600 else RETRY
        return NotifyError(f"{what}: {step}: {code} {scrub(text)}", outcome, f"smtp-{code}")

    def _password(self) -> str:
        value = os.environ.get(self.password_env, "")
        if not value:
            # Nothing can be sent without it: retry, once the operator has set it.
            raise NotifyError(f"environment variable {self.password_env} (password_env) is not set", RETRY, "config")
        return value

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as e:
            raise NotifyError(f"ca_file {self.ca_file}: cannot be read ({type(e).__name__})", RETRY, "config") \
                from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


class _SMTP(smtplib.SMTP):
    """smtplib's client, keeping the relay's reply to the end of DATA (its queue id)."""

    data_reply: tuple[int, bytes] = (0, b"")

    def data(self, msg):
        code, reply = super().data(msg)
        self.data_reply = (code, reply)
        return code, reply


def _close(smtp: smtplib.SMTP) -> None:
    """QUIT if we can, close regardless: the outcome is decided by then."""
    try:
        if smtp.sock is not None:
            smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()
