"""The ``webhook`` notifier: one notice, one JSON POST (urllib3).

Blocking: the engine calls :meth:`WebhookNotifier.send` from a worker thread.
Settings (the ``[notify.notifiers.<name>]`` table with ``plugin = "webhook"``)
and their defaults are in :data:`DEFAULTS`.

The body is a JSON object (:func:`payload`)::

    {"version": 1, "key": "REF123/booking-overdue", "referral_id": "REF123",
     "rule": "booking-overdue", "audience": "coordinator", "owner": "alice", "to": "",
     "subject": "...", "body": "...", "text": "<subject>\\n\\n<body>", "data": {...}}

``text`` is what chat tools' incoming webhooks (Slack, Mattermost, Rocket.Chat)
display; ``to`` is the owner's handle on the far side (``[notify.owners]``), if any.

Invariants
----------
* The same notice is the same bytes: keys sorted, no timestamps. A resend
  carries the same ``Idempotency-Key`` header (the notice's key, also the JSON's
  ``key``) and, with a secret, the same signature, so the receiver can drop it.
* With ``secret_env``, ``X-Hl7referral-Signature: sha256=<hex>`` is the
  HMAC-SHA256 of the exact body under the secret (GitHub's scheme). The secret
  (and the ``auth_env`` header value) is read from the environment at send time,
  never logged nor put in an exception's text.
* One call is at most one POST: no retries, no redirects (a POST must not move).
  2xx is delivered; 408, 425, 429 and 5xx are ``retry``; other 4xx and 3xx are
  ``rejected``; no connection, a timeout or a connection lost before the answer
  are ``retry`` (the far end de-duplicates a resend by its key).
* Logs and errors carry the key, referral id and HTTP status, never the URL's
  query, the body or a header value.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from typing import Any, Mapping
from urllib.parse import urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError, SSLError, TimeoutError as U3Timeout

from .base import REJECTED, RETRY, Notice, NotifierSettingsError, NotifyError, Result

log = logging.getLogger(__name__)

# Every setting and its default; None = required.
DEFAULTS: dict[str, Any] = {
    "url": None,                                  # where to POST ("https://hooks.example.org/referrals")
    "secret_env": "",                             # NAME of the env var with the HMAC secret ("" = unsigned)
    "signature_header": "X-Hl7referral-Signature",
    "auth_env": "",                               # NAME of the env var with the auth header's value ("" = none)
    "auth_header": "Authorization",
    "idempotency_header": "Idempotency-Key",
    "headers": {},                                # constant extra headers
    "ca_file": "",                                # PEM roots for the server's certificate; "" = the platform's
    "timeout": 10.0,                              # seconds, for the connect and for the answer
}
VERSION = 1

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def payload(notice: Notice) -> bytes:
    """The JSON body for *notice*: deterministic (the same notice, the same bytes)."""
    doc = {
        "version": VERSION,
        "key": notice.key,
        "referral_id": notice.referral_id,
        "rule": notice.rule,
        "audience": notice.audience,
        "owner": notice.owner,
        "to": notice.to,
        "subject": notice.subject,
        "body": notice.body,
        "text": f"{notice.subject}\n\n{notice.body}".rstrip("\n"),
        "data": dict(notice.data),
    }
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def signature(secret: str | bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of *body*."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _header_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise NotifierSettingsError(key, f"{value!r} is not an HTTP header name")
    return value


def _env_name(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise NotifierSettingsError(key, "expected a string")
    if value and not _ENV_NAME.match(value):
        raise NotifierSettingsError(key, "expected the NAME of an environment variable (the secret itself "
                                         "never goes in a file)")
    return value


class WebhookNotifier:
    name = "webhook"
    needs_address = False

    def __init__(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise NotifierSettingsError(unknown[0], f"unknown setting (known: {', '.join(sorted(DEFAULTS))})")
        s = {**DEFAULTS, **settings}
        url = s["url"]
        if url is None:
            raise NotifierSettingsError("url", "required")
        if not isinstance(url, str) or _CONTROL.search(url) or " " in url:
            raise NotifierSettingsError("url", "expected a URL")
        try:
            parts = urlsplit(url)
            parts.port
        except ValueError as e:
            raise NotifierSettingsError("url", f"not a URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise NotifierSettingsError("url", "expected an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise NotifierSettingsError("url", "no credentials in the URL: use auth_env")
        self.url = url
        # For logs: scheme, host, port and path; a query may hold a token.
        self.where = f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"
        self.secret_env = _env_name("secret_env", s["secret_env"])
        self.auth_env = _env_name("auth_env", s["auth_env"])
        self.signature_header = _header_name("signature_header", s["signature_header"])
        self.auth_header = _header_name("auth_header", s["auth_header"])
        self.idempotency_header = _header_name("idempotency_header", s["idempotency_header"])
        headers = s["headers"]
        if not isinstance(headers, Mapping):
            raise NotifierSettingsError("headers", "expected a table of header = \"value\"")
        for k, v in headers.items():
            _header_name(f"headers.{k}", k)
            if not isinstance(v, str) or _CONTROL.search(v):
                raise NotifierSettingsError(f"headers.{k}", "expected a one-line string")
        self.headers = dict(headers)
        if not isinstance(s["ca_file"], str):
            raise NotifierSettingsError("ca_file", "expected a string")
        self.ca_file = s["ca_file"]
        timeout = s["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise NotifierSettingsError("timeout", "expected a number of seconds above 0")
        self.timeout = float(timeout)

    def check_address(self, address: str) -> str | None:
        """Any one-line handle will do (a chat channel, a user id); "" is fine."""
        if not isinstance(address, str) or _CONTROL.search(address):
            return "must be one line of text"
        return None

    # ---------------------------------------------------------------- sending

    def request_headers(self, notice: Notice, body: bytes) -> dict[str, str]:
        """The POST's headers for *body* (reads the secrets from the environment)."""
        headers = {**self.headers, "Content-Type": "application/json; charset=utf-8",
                   "User-Agent": "hl7referral-notify/1", self.idempotency_header: notice.key}
        if self.secret_env:
            headers[self.signature_header] = signature(self._secret(self.secret_env, "secret_env"), body)
        if self.auth_env:
            headers[self.auth_header] = self._secret(self.auth_env, "auth_env")
        return headers

    def send(self, notice: Notice) -> Result:
        what = f"key {notice.key} (referral {notice.referral_id}): POST {self.where}"
        body = payload(notice)
        headers = self.request_headers(notice, body)
        pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
                                   **({"ca_certs": self.ca_file} if self.ca_file else {}))
        try:
            resp = pool.request("POST", self.url, body=body, headers=headers, redirect=False, retries=False)
        except MaxRetryError as e:  # not raised with retries=False; unwrapped in case a version does
            raise self._transport_error(what, e.reason or e) from None
        except (HTTPError, OSError) as e:
            raise self._transport_error(what, e) from None
        finally:
            pool.clear()
        code = resp.status
        if 200 <= code < 300:
            log.info("notice %s (referral %s) posted: HTTP %d", notice.key, notice.referral_id, code)
            return Result(self.name, notice.key, notice.key, f"HTTP {code}")
        if code in (408, 425, 429) or code >= 500:
            outcome = RETRY        # the server did not (or could not) take it now
        else:
            outcome = REJECTED     # 4xx, and 3xx: redirects are not followed; fix the URL
        text = f"{what}: HTTP {code}"
        if 300 <= code < 400:
            text += " (redirect not followed: check the URL)"
        retry_after = resp.headers.get("Retry-After", "")
        if retry_after and outcome == RETRY and re.fullmatch(r"[0-9A-Za-z ,:]{1,40}", retry_after):
            text += f", Retry-After {retry_after}"
        raise NotifyError(text, outcome, f"http-{code}")

    def _transport_error(self, what: str, err: BaseException) -> NotifyError:
        # urllib3's exception text is host, port and a reason, never a header; we still say less.
        if isinstance(err, NewConnectionError):
            return NotifyError(f"{what}: cannot connect", RETRY, "connect")
        if isinstance(err, U3Timeout):
            return NotifyError(f"{what}: no answer within {self.timeout:g}s", RETRY, "timeout")
        if isinstance(err, SSLError):
            return NotifyError(f"{what}: TLS failed ({type(err).__name__})", RETRY, "tls")
        return NotifyError(f"{what}: connection lost before the answer ({type(err).__name__})", RETRY, "connection")

    @staticmethod
    def _secret(env: str, setting: str) -> str:
        value = os.environ.get(env, "")
        if not value:
            # Nothing is sent without it: retry, once the operator has set it.
            raise NotifyError(f"environment variable {env} (named by {setting}) is not set", RETRY, "config")
        return value
