"""A fax gateway for HTTP fax APIs of the common shape (Sinch/Phaxio, Documo, SRFax-like).

POST the PDF as multipart/form-data with the number, get a job id back in the
JSON answer, then learn the outcome by polling a status URL or from a status
callback the API POSTs to the engine. The base URL, the auth header, the field
names and the API's status words all come from the channel's ``[fax]`` table
(see :data:`DEFAULTS`), so one plugin covers most providers.

Invariants
----------
* The same :class:`FaxJob` submitted twice carries the same idempotency key
  (``idempotency_header``) and the same reference (``reference_field``): both
  are ``job.key``. An API that honours the header turns a re-sent POST into the
  earlier job; one that does not can still be asked with :meth:`find` (the
  reference), so a POST retried after a timeout never has to be a second fax.
* No retries inside the client (urllib3 ``retries=False``, no redirects): one
  call is at most one POST. The engine's outbox owns retries and backoff, and
  only it knows whether an earlier attempt may have created a job.
* Outcomes follow what may have happened at the far end: ``retry`` only when
  the request cannot have created a job (no connection, 408/429/5xx that say
  "not processed"), ``unknown`` whenever the POST may have been acted on (a
  read timeout, a connection dropped after sending, 504, 409, a 2xx without a
  job id), ``rejected`` for the API's final refusals (other 4xx, a bad number).
* Secrets (the auth header's value, secret form fields, the callback token) are
  read from the environment at call time, by the variable *names* in the
  settings; they are never logged nor put in an exception's text.
* Messages and logs carry job ids, keys, referral ids, HTTP codes and the API's
  short error text (which may echo the fax number, not patient data); never
  the PDF, never a response body beyond that short text.
* No state between calls but the settings: each call uses its own connection
  pool, closed afterwards, so a stale pooled connection cannot turn a POST that
  never left into an ``unknown``.
"""

from __future__ import annotations

import email.parser
import email.policy
import hmac
import json
import logging
import os
import re
import ssl
import string
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from .gateway import Callback, FaxJob, GatewayError, GatewaySettingsError, GatewayStatus, Status, Submitted

log = logging.getLogger(__name__)

# Every setting and its default; None = required.
DEFAULTS: dict[str, Any] = {
    "url": None,                          # the POST endpoint, e.g. "https://fax.example.com/v1/faxes"
    "auth_header": "Authorization",
    "auth_env": "",                       # NAME of the env var holding the header's value ("" = no auth)
    "number_field": "to",
    "file_field": "file",
    "reference_field": "client_reference",  # our key, sent and looked for in answers/callbacks ("" = none)
    "callback_field": "callback_url",     # "" = send no callback URL (the engine polls)
    "extra_fields": {},                   # constant form fields, e.g. {caller_id = "+15555550100"}
    "secret_fields": {},                  # form field -> NAME of the env var with its value (SRFax's access_pwd)
    "idempotency_header": "Idempotency-Key",  # "" = send none
    "id_field": "id",                     # dotted path to the job id in answers and callbacks
    "status_url": "",                     # template with {id}; "" = cannot poll
    "status_field": "status",             # dotted path to the status word
    "detail_field": "",                   # dotted path to the reason ("" = the status word itself)
    "pages_field": "",                    # dotted path to the page count ("" = not reported)
    "find_url": "",                       # template with {key}; "" = cannot look a job up
    "find_list_field": "",                # dotted path to the job list in find's answer ("" = the answer)
    "statuses": {},                       # per state, the API's words (replaces that state's default words)
    "callback_token_env": "",             # NAME of the env var with the callbacks' shared secret ("" = none)
    "callback_token_header": "X-Fax-Token",
    "timeout": 30.0,                      # seconds, for the connect and for each read
    "number_format": "e164",              # "e164" (+15555550190) or "digits" (15555550190)
}

DEFAULT_STATUSES: dict[str, tuple[str, ...]] = {
    "queued": ("queued", "pending", "accepted", "pendingbatch"),
    "sending": ("in_progress", "inprogress", "sending"),
    "delivered": ("success", "delivered", "sent"),
    "failed": ("failure", "failed", "error", "cancelled", "canceled"),
}

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NUMBER_CHARS = re.compile(r"^\+?[0-9 ()./-]+$")
_MAX_BODY = 1 << 20  # answers are small JSON; a larger one is not an answer we understand


def _short(text: str, limit: int = 160) -> str:
    """One line of at most *limit* characters (API error text goes into messages and logs)."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dig(obj: Any, path: str) -> Any:
    """The value at a dotted *path* ("data.id", "errors.0.message"), None if absent.

    A flat key that contains dots wins (form bodies have no nesting), and a
    string holding JSON is entered (Phaxio's form callbacks put the fax as JSON
    in one field, so "fax.id" works there too).
    """
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    cur = obj
    for part in path.split("."):
        if isinstance(cur, str) and cur.lstrip()[:1] in ("{", "["):
            try:
                cur = json.loads(cur)
            except ValueError:
                return None
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
        if cur is None:
            return None
    return cur


def _scalar(value: Any) -> str:
    """A job id or word as text ("" when it is not a non-empty string or integer; a bool is not an id)."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return ""


def normalise_number(number: str, number_format: str) -> str:
    """The number as the API wants it; GatewayError("rejected") if it is not a plain phone number.

    Extensions, letters and national numbers without "+" are refused rather than
    guessed at: a wrong guess faxes the referral to someone else.
    """
    raw = number.strip()
    if not _NUMBER_CHARS.match(raw):
        raise GatewayError("fax number has characters other than digits and separators", "rejected", "bad-number")
    digits = re.sub(r"\D", "", raw)
    if number_format == "e164":
        if not raw.startswith("+"):
            raise GatewayError("fax number has no leading + (number_format e164 needs the country code)",
                               "rejected", "bad-number")
        if not 8 <= len(digits) <= 15:  # E.164: at most 15 digits, country code included
            raise GatewayError(f"fax number has {len(digits)} digits, E.164 allows 8 to 15", "rejected",
                               "bad-number")
        return "+" + digits
    if not 7 <= len(digits) <= 15:
        raise GatewayError(f"fax number has {len(digits)} digits", "rejected", "bad-number")
    return digits


# --------------------------------------------------------------------------- settings


def _check_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise GatewaySettingsError(key, f"expected a string, got {type(value).__name__}")
    if _CONTROL.search(value):
        raise GatewaySettingsError(key, "control characters are not allowed")
    return value


def _check_nonempty(key: str, value: Any) -> str:
    if not _check_str(key, value):
        raise GatewaySettingsError(key, "must not be empty")
    return value


def _check_header(key: str, value: Any, *, optional: bool) -> str:
    value = _check_str(key, value)
    if value == "" and optional:
        return value
    if not _TOKEN.match(value):
        raise GatewaySettingsError(key, f"{value!r} is not an HTTP header name")
    return value


def _check_env(key: str, value: Any) -> str:
    value = _check_str(key, value)
    if value and not _ENV_NAME.match(value):
        raise GatewaySettingsError(key, "expected the NAME of an environment variable (the secret itself "
                                        "never goes in a channel file)")
    return value


def _check_url(key: str, value: Any, placeholder: str | None) -> str:
    value = _check_str(key, value)
    if value == "" and placeholder is not None:
        return value
    if placeholder is not None:
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if names != {placeholder}:
            raise GatewaySettingsError(key, f"expected a URL template with {{{placeholder}}} and no other "
                                            f"{{...}} (got {sorted(names) or 'none'})")
        probe = value.replace("{" + placeholder + "}", "x")
    else:
        probe = value
    try:
        parts = urlsplit(probe)
        parts.port
    except ValueError as e:
        raise GatewaySettingsError(key, f"not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GatewaySettingsError(key, "expected an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise GatewaySettingsError(key, "credentials in the URL: put the header's value in the environment "
                                        "variable named by auth_env")
    return value


def _check_fields(key: str, value: Any, *, env: bool) -> dict[str, str]:
    if not isinstance(value, dict):
        raise GatewaySettingsError(key, f"expected a table, got {type(value).__name__}")
    out = {}
    for name, v in value.items():
        _check_nonempty(f"{key}.{name}", name)
        if env:
            out[name] = _check_env(f"{key}.{name}", v)
            if not out[name]:
                raise GatewaySettingsError(f"{key}.{name}", "must name an environment variable")
        elif isinstance(v, int) and not isinstance(v, bool):
            out[name] = str(v)  # a caller id written as a TOML integer
        else:
            out[name] = _check_str(f"{key}.{name}", v)
    return out


def _check_statuses(value: Any) -> dict[str, Status]:
    """The API's words (lower-cased) -> our Status; a state given replaces that state's default words."""
    if not isinstance(value, dict):
        raise GatewaySettingsError("statuses", f"expected a table, got {type(value).__name__}")
    words = dict(DEFAULT_STATUSES)
    for state, listed in value.items():
        if state not in DEFAULT_STATUSES:
            raise GatewaySettingsError(f"statuses.{state}", f"unknown state (known: {', '.join(DEFAULT_STATUSES)})")
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not all(isinstance(w, str) and w.strip() for w in listed):
            raise GatewaySettingsError(f"statuses.{state}", "expected a list of non-empty strings")
        words[state] = tuple(listed)
    mapping: dict[str, Status] = {}
    # The configured states last, so a clash is reported under the state the operator wrote.
    order = [st for st in words if st not in value] + [st for st in words if st in value]
    for state in order:
        listed = words[state]
        for word in listed:
            w = word.strip().lower()
            if w in mapping and mapping[w] is not Status(state):
                raise GatewaySettingsError(f"statuses.{state}",
                                           f"{word!r} is also a {mapping[w].value} word; a word maps to one state")
            mapping[w] = Status(state)
    return mapping


# --------------------------------------------------------------------------- the gateway


class HttpFaxGateway:
    """The ``http-fax`` gateway: see the module docstring for the shape and the invariants."""

    name = "http-fax"

    def __init__(self, settings: dict[str, Any]) -> None:
        for key in settings:
            if key not in DEFAULTS:
                raise GatewaySettingsError(key, f"unknown setting (known: {', '.join(DEFAULTS)})")
        s = {**DEFAULTS, **settings}
        if s["url"] is None:
            raise GatewaySettingsError("url", "required: the URL the fax is POSTed to")
        self.url = _check_url("url", s["url"], None)
        self.auth_header = _check_header("auth_header", s["auth_header"], optional=False)
        self.auth_env = _check_env("auth_env", s["auth_env"])
        self.number_field = _check_nonempty("number_field", s["number_field"])
        self.file_field = _check_nonempty("file_field", s["file_field"])
        self.reference_field = _check_str("reference_field", s["reference_field"])
        self.callback_field = _check_str("callback_field", s["callback_field"])
        self.extra_fields = _check_fields("extra_fields", s["extra_fields"], env=False)
        self.secret_fields = _check_fields("secret_fields", s["secret_fields"], env=True)
        self.idempotency_header = _check_header("idempotency_header", s["idempotency_header"], optional=True)
        self.id_field = _check_nonempty("id_field", s["id_field"])
        self.status_url = _check_url("status_url", s["status_url"], "id")
        self.status_field = _check_nonempty("status_field", s["status_field"])
        self.detail_field = _check_str("detail_field", s["detail_field"])
        self.pages_field = _check_str("pages_field", s["pages_field"])
        self.find_url = _check_url("find_url", s["find_url"], "key")
        self.find_list_field = _check_str("find_list_field", s["find_list_field"])
        self.statuses = _check_statuses(s["statuses"])
        self.callback_token_env = _check_env("callback_token_env", s["callback_token_env"])
        self.callback_token_header = _check_header("callback_token_header", s["callback_token_header"],
                                                   optional=False)
        timeout = s["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise GatewaySettingsError("timeout", f"expected seconds as a number, got {type(timeout).__name__}")
        if not 0 < timeout <= 600:
            raise GatewaySettingsError("timeout", "expected more than 0 and at most 600 seconds")
        self.timeout = float(timeout)
        self.number_format = _check_str("number_format", s["number_format"])
        if self.number_format not in ("e164", "digits"):
            raise GatewaySettingsError("number_format", "expected \"e164\" or \"digits\"")
        taken = [self.number_field, self.file_field, self.reference_field, self.callback_field,
                 *self.extra_fields, *self.secret_fields]
        taken = [f for f in taken if f]
        if len(taken) != len(set(taken)):
            dup = next(f for f in taken if taken.count(f) > 1)
            raise GatewaySettingsError("extra_fields", f"form field {dup!r} is set twice")
        if not self.callback_field and not self.status_url:
            # Neither a callback nor a status URL: a sent fax's outcome could never be learnt.
            raise GatewaySettingsError("status_url", "set status_url (polling) or callback_field (callbacks)")
        self.supports_callbacks = bool(self.callback_field)
        # Read by the engine (getattr, default True): without a status URL it waits for callbacks.
        self.supports_status = bool(self.status_url)

    # ---------------------------------------------------------------- calls

    def submit(self, job: FaxJob) -> Submitted:
        number = normalise_number(job.number, self.number_format)  # before anything is sent
        fields: list[tuple[str, Any]] = [(self.number_field, number)]
        if self.reference_field:
            fields.append((self.reference_field, job.key))
        if self.callback_field and job.callback_url:
            fields.append((self.callback_field, job.callback_url))
        fields.extend(self.extra_fields.items())
        fields.extend((name, self._secret(env, f"secret_fields.{name}")) for name, env in self.secret_fields.items())
        # The filename goes into a Content-Disposition header: keep it to safe characters.
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", job.referral_id)[:100] or "referral"
        fields.append((self.file_field, (f"{filename}.pdf", job.pdf, "application/pdf")))
        body, content_type = urllib3.encode_multipart_formdata(fields)
        headers = {"Content-Type": content_type, **self._auth()}
        if self.idempotency_header:
            headers[self.idempotency_header] = job.key
        what = f"key {job.key}: POST"

        resp = self._request("POST", self.url, what, body=body, headers=headers, sent_may_count=True)
        if not 200 <= resp.status < 300:
            self._raise_for(resp, what, post=True)
        data = self._json(resp)
        job_id = _scalar(_dig(data, self.id_field)) if data is not None else ""
        if not job_id:
            # A 2xx is "accepted" in every API we know: it may well have made a job we cannot name.
            raise GatewayError(f"{what}: HTTP {resp.status} without a job id at {self.id_field!r}",
                               "unknown", "no-id")
        first = None
        word = _scalar(_dig(data, self.status_field))
        if word and word.lower() in self.statuses:
            # An unknown word here is not worth failing a successful submit for: status() will say.
            first = self._status_from(data)
        log.info("fax for key %s submitted: job %s", job.key, job_id)
        return Submitted(job_id, first)

    def status(self, job_id: str) -> GatewayStatus:
        if not self.status_url:
            raise GatewayError("no status_url set: this channel learns outcomes from callbacks", "retry",
                               "no-status-url")
        what = f"job {job_id}: status"
        url = self.status_url.replace("{id}", quote(job_id, safe=""))
        resp = self._request("GET", url, what, headers=self._auth())
        if not 200 <= resp.status < 300:
            self._raise_for(resp, what, post=False)
        data = self._json(resp)
        if not isinstance(data, (dict, list)):
            raise GatewayError(f"{what}: HTTP {resp.status} answer is not JSON", "retry", "bad-answer")
        return self._status_from(data, what)

    def find(self, key: str) -> str | None:
        """The job id of the job whose reference is *key*; None only when the far end says there is none.

        When the gateway cannot tell (no answer, an error) it raises: None would let
        the engine send a second fax.
        """
        if not self.find_url or not self.reference_field:
            return None
        what = f"key {key}: find"
        url = self.find_url.replace("{key}", quote(key, safe=""))
        resp = self._request("GET", url, what, headers=self._auth())
        if resp.status == 404 and "{key}" in urlsplit(self.find_url).path:
            # A job addressed by its key in the path: 404 is "no such job". With the key in
            # the query, a 404 means the endpoint is wrong, which must not read as "none".
            return None
        if not 200 <= resp.status < 300:
            self._raise_for(resp, what, post=False)
        data = self._json(resp)
        if data is None:
            raise GatewayError(f"{what}: HTTP {resp.status} answer is not JSON", "retry", "bad-answer")
        if self.find_list_field:
            data = _dig(data, self.find_list_field)
        if isinstance(data, dict):
            # One job, or an object of jobs keyed by id.
            jobs = [data] if _dig(data, self.id_field) is not None else list(data.values())
        elif isinstance(data, list):
            jobs = data
        else:
            raise GatewayError(f"{what}: no job list in the answer", "retry", "bad-answer")
        # Only a job that echoes our key counts: an API that ignores the query would
        # list every fax, and taking the first would report someone else's fax as ours.
        found = [_scalar(_dig(j, self.id_field)) for j in jobs
                 if isinstance(j, dict) and _scalar(_dig(j, self.reference_field)) == key]
        found = [j for j in found if j]
        if len(found) > 1:
            log.warning("key %s has %d jobs at the gateway (%s): reporting the first", key, len(found),
                        ", ".join(found[:5]))
        return found[0] if found else None

    def parse_callback(self, body: bytes, headers: dict[str, str]) -> Callback:
        lower = {k.lower(): v for k, v in headers.items()}
        if self.callback_token_env:
            secret = os.environ.get(self.callback_token_env, "")
            if not secret:
                raise GatewayError(f"callback refused: environment variable {self.callback_token_env} is not set",
                                   "rejected", "config")
            given = lower.get(self.callback_token_header.lower(), "")
            # compare_digest: the time taken does not tell a forger how much of the token was right.
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), secret.encode("utf-8")):
                raise GatewayError(f"callback refused: missing or wrong {self.callback_token_header}",
                                   "rejected", "token")
        data = self._callback_fields(body, lower.get("content-type", ""))
        job_id = _scalar(_dig(data, self.id_field))
        if not job_id:
            raise GatewayError(f"callback without a job id at {self.id_field!r}", "rejected", "bad-callback")
        if not _scalar(_dig(data, self.status_field)):
            raise GatewayError(f"callback for job {job_id} without a status at {self.status_field!r}",
                               "rejected", "bad-callback")
        key = _scalar(_dig(data, self.reference_field)) if self.reference_field else ""
        return Callback(job_id, self._status_from(data, f"job {job_id}: callback"), key)

    # ---------------------------------------------------------------- helpers

    def _secret(self, env: str, setting: str) -> str:
        value = os.environ.get(env)
        if not value:
            # Nothing is sent without it, so "retry": the operator sets it and the send goes on.
            raise GatewayError(f"environment variable {env} (named by {setting}) is not set", "retry", "config")
        return value

    def _auth(self) -> dict[str, str]:
        if not self.auth_env:
            return {}
        return {self.auth_header: self._secret(self.auth_env, "auth_env")}

    def _request(self, method: str, url: str, what: str, *, body: bytes | None = None,
                 headers: dict[str, str], sent_may_count: bool = False) -> urllib3.BaseHTTPResponse:
        """One request, no retries, no redirects; errors become GatewayError by what may have happened.

        *sent_may_count*: the request creates something (the POST), so losing the
        answer is "unknown"; for reads it is only "retry".
        """
        lost = "unknown" if sent_may_count else "retry"
        pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout))
        try:
            return pool.request(method, url, body=body, headers=headers, redirect=False, retries=False,
                                preload_content=True)
        except MaxRetryError as e:  # not raised with retries=False; unwrapped in case a version does
            err: Exception = e.reason or e
        except HTTPError as e:
            err = e
        except OSError as e:  # outside urllib3's wrapping; treat like a dropped connection
            err = e
        finally:
            pool.clear()
        # The classes below are urllib3's own; their text is host, port and a reason, never a header.
        if isinstance(err, ConnectTimeoutError):  # includes NewConnectionError and DNS failures
            raise GatewayError(f"{what}: cannot connect ({type(err).__name__})", "retry", "connect") from None
        if isinstance(err, ReadTimeoutError):
            raise GatewayError(f"{what}: no answer within {self.timeout:g}s", lost, "timeout") from None
        if isinstance(err, SSLError) and _cert_error(err):
            raise GatewayError(f"{what}: TLS certificate not accepted", "retry", "tls") from None
        if isinstance(err, (ProtocolError, SSLError, OSError)):
            raise GatewayError(f"{what}: connection lost before the answer ({type(err).__name__})", lost,
                               "connection") from None
        raise GatewayError(f"{what}: {type(err).__name__}", lost, "http") from None

    def _raise_for(self, resp: urllib3.BaseHTTPResponse, what: str, *, post: bool) -> None:
        """GatewayError for a non-2xx answer."""
        code = resp.status
        reason = self._reason(resp)
        text = f"{what}: HTTP {code}" + (f" ({reason})" if reason else "")
        retry_after = resp.headers.get("Retry-After")
        if retry_after:
            text += f", Retry-After {_short(retry_after, 40)}"
        if code in (408, 425, 429) or (code >= 500 and code != 504):
            outcome = "retry"      # the server says it did not (or could not) process the request
        elif code in (409, 504):
            # 504: a proxy gave up waiting for the API, which may still have made the job.
            # 409: most APIs answer a key still being processed this way.
            outcome = "unknown" if post else "retry"
        elif 300 <= code < 400:
            outcome = "rejected"   # redirects are not followed: a POST must not move; fix the URL
            text += " (redirect not followed: check the URL)"
        else:
            outcome = "rejected"
        raise GatewayError(text, outcome, f"http-{code}")

    @staticmethod
    def _json(resp: urllib3.BaseHTTPResponse) -> Any:
        data = resp.data
        if not data or len(data) > _MAX_BODY:
            return None
        try:
            return json.loads(data)
        except ValueError:  # includes UnicodeDecodeError
            return None

    def _reason(self, resp: urllib3.BaseHTTPResponse) -> str:
        """The API's own short error text, if it gives one (PHI-free enough: it may echo the number)."""
        data = self._json(resp)
        if data is not None:
            for path in ("message", "error.message", "error", "detail", "title", "errors.0.message", "errors.0"):
                value = _dig(data, path)
                if isinstance(value, str) and value.strip():
                    return _short(value)
            return ""
        if resp.headers.get("Content-Type", "").startswith("text/plain") and len(resp.data) <= 4096:
            return _short(resp.data.decode("utf-8", "replace"))
        return ""  # HTML error pages and the like say nothing useful in one line

    def _status_from(self, data: Any, what: str = "status") -> GatewayStatus:
        raw = _scalar(_dig(data, self.status_field))
        state = self.statuses.get(raw.lower())
        if state is None:
            # Not guessed: an unknown word may be final or not. "retry" keeps the send
            # open (and named in the log) until the word is added to [fax].statuses.
            shown = _short(raw, 40) if raw else "nothing"
            raise GatewayError(f"{what}: status word {shown!r} is not in statuses", "retry", "unmapped-status")
        detail = _scalar(_dig(data, self.detail_field)) if self.detail_field else ""
        pages = None
        if self.pages_field:
            p = _dig(data, self.pages_field)
            if isinstance(p, int) and not isinstance(p, bool) and p >= 0:
                pages = p
            elif isinstance(p, str) and p.strip().isdigit():
                pages = int(p)
        return GatewayStatus(state, _short(detail or raw), pages)

    @staticmethod
    def _callback_fields(body: bytes, content_type: str) -> Any:
        """A callback body as a dict: JSON, form-urlencoded (SRFax) or multipart (Phaxio) fields."""
        ctype = content_type.split(";", 1)[0].strip().lower()
        try:
            if ctype == "application/x-www-form-urlencoded":
                pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True, errors="strict")
                return {k: v[0] for k, v in pairs.items()}
            if ctype == "multipart/form-data":
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
                if not msg.is_multipart():
                    raise ValueError("not multipart")
                fields = {}
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    if name and not part.get_filename():
                        fields[name] = part.get_content() if part.get_content_maintype() == "text" else ""
                return fields
            data = json.loads(body)
        except (ValueError, LookupError, TypeError) as e:
            raise GatewayError(f"callback body is not {ctype or 'JSON'} ({type(e).__name__})", "rejected",
                               "bad-callback") from None
        if not isinstance(data, dict):
            raise GatewayError("callback body is not a JSON object", "rejected", "bad-callback")
        return data


def _cert_error(err: Exception) -> bool:
    """True when a TLS error is the server's certificate being refused (at the handshake: nothing sent)."""
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError) or type(e).__name__ == "CertificateError":
            return True
        e = e.__cause__ or e.__context__ or next((a for a in getattr(e, "args", ()) if isinstance(a, BaseException)),
                                                 None)
    return False
