"""The webhook notifier against a real HTTP server on 127.0.0.1 (http.server on a thread)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
from pathlib import Path
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hl7referral.notify import Notice, NotifierSettingsError, NotifyError, load_notifier
from hl7referral.notify.webhook import WebhookNotifier, payload, signature

SECRET = "whsec-test-Ωmega"


@dataclass
class Received:
    path: str
    headers: dict[str, str]     # lower-cased names
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


class HookServer:
    """Receives POSTs; answers 200, or what :meth:`answer` scripted for the next requests."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.received: list[Received] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.delay = 0.0
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = server.script.pop(0) if server.script else (200, {})
                if server.delay:
                    server._stop.wait(server.delay)
                raw = b'{"ok": true}' if status < 300 else b'{"error": "scripted"}'
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the client gave up: the case being scripted

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None   # a refused TLS handshake is the test
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}/hooks/referrals"

    def answer(self, status: int, count: int = 1, headers: dict[str, str] | None = None) -> None:
        self.script.extend([(status, headers or {})] * count)

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hooks():
    server = HookServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory, make_certs) -> Path:
    out = tmp_path_factory.mktemp("webhook-pki")
    make_certs.build(out)
    return out


@pytest.fixture
def hooks_tls(pki):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    server = HookServer(context)
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def notice(**kw) -> Notice:
    base = dict(key="REF123/no-show-alert/2024-05-07", referral_id="REF123", rule="no-show-alert",
                audience="coordinator", owner="role:referral-coordinators", to="#referrals",
                subject="[REF123] Missed appointment", body="The appointment was missed.\nOwner: alice\n",
                data={"referral_id": "REF123", "specialist": "Dr. Müller", "appointment": "Tue 7 May 10:30"})
    return Notice(**{**base, **kw})


def fails(n: WebhookNotifier, item: Notice) -> NotifyError:
    with pytest.raises(NotifyError) as info:
        n.send(item)
    return info.value


# -- delivered ---------------------------------------------------------------------------


def test_the_notice_arrives_as_json_with_its_key_in_a_header_and_a_field(hooks):
    n = WebhookNotifier({"url": hooks.url, "headers": {"X-Site": "riverside"}})
    result = n.send(notice())
    assert (result.notifier, result.key, result.reference, result.detail) == \
        ("webhook", "REF123/no-show-alert/2024-05-07", "REF123/no-show-alert/2024-05-07", "HTTP 200")
    [got] = hooks.received
    assert got.path == "/hooks/referrals"
    assert got.headers["content-type"] == "application/json; charset=utf-8"
    assert got.headers["idempotency-key"] == "REF123/no-show-alert/2024-05-07"
    assert got.headers["x-site"] == "riverside"
    assert "x-hl7referral-signature" not in got.headers      # no secret configured: unsigned
    assert got.json() == {
        "version": 1, "key": "REF123/no-show-alert/2024-05-07", "referral_id": "REF123", "rule": "no-show-alert",
        "audience": "coordinator", "owner": "role:referral-coordinators", "to": "#referrals",
        "subject": "[REF123] Missed appointment", "body": "The appointment was missed.\nOwner: alice\n",
        "text": "[REF123] Missed appointment\n\nThe appointment was missed.\nOwner: alice",
        "data": {"referral_id": "REF123", "specialist": "Dr. Müller", "appointment": "Tue 7 May 10:30"},
    }


def test_the_signature_is_an_hmac_sha256_of_the_exact_body(hooks, monkeypatch):
    monkeypatch.setenv("HL7REFERRAL_WEBHOOK_SECRET", SECRET)
    n = WebhookNotifier({"url": hooks.url, "secret_env": "HL7REFERRAL_WEBHOOK_SECRET"})
    n.send(notice())
    [got] = hooks.received
    expected = "sha256=" + hmac.new(SECRET.encode("utf-8"), got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["x-hl7referral-signature"], expected)
    assert got.headers["x-hl7referral-signature"] == signature(SECRET, got.body)
    assert SECRET not in repr(vars(n))
    # A forged body does not verify.
    forged = got.body.replace(b"Missed", b"Kept")
    assert signature(SECRET, forged) != got.headers["x-hl7referral-signature"]


def test_a_resend_is_byte_identical_with_the_same_key_and_signature(hooks, monkeypatch):
    monkeypatch.setenv("HL7REFERRAL_WEBHOOK_SECRET", SECRET)
    n = WebhookNotifier({"url": hooks.url, "secret_env": "HL7REFERRAL_WEBHOOK_SECRET"})
    n.send(notice())
    n.send(notice())
    a, b = hooks.received
    assert a.body == b.body == payload(notice())
    for h in ("idempotency-key", "x-hl7referral-signature"):
        assert a.headers[h] == b.headers[h]


def test_auth_header_from_the_environment_and_custom_header_names(hooks, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", "Bearer t0ken")
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    n = WebhookNotifier({"url": hooks.url, "auth_env": "HOOK_TOKEN", "secret_env": "HOOK_SECRET",
                         "signature_header": "X-Signature-256", "idempotency_header": "X-Request-Key"})
    n.send(notice())
    [got] = hooks.received
    assert got.headers["authorization"] == "Bearer t0ken"
    assert got.headers["x-request-key"] == "REF123/no-show-alert/2024-05-07"
    assert got.headers["x-signature-256"] == signature(SECRET, got.body)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_any_2xx_is_delivered(hooks, status):
    hooks.answer(status)
    assert WebhookNotifier({"url": hooks.url}).send(notice()).detail == f"HTTP {status}"


def test_https_with_the_configured_ca_delivers_and_another_ca_is_retry(hooks_tls, pki):
    WebhookNotifier({"url": hooks_tls.url, "ca_file": str(pki / "ca.pem")}).send(notice())
    assert len(hooks_tls.received) == 1
    err = fails(WebhookNotifier({"url": hooks_tls.url, "ca_file": str(pki / "rogue-ca.pem"), "timeout": 5}),
                notice())
    assert (err.outcome, err.code) == ("retry", "tls")
    assert len(hooks_tls.received) == 1


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status, outcome", [
    (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry"),
    (408, "retry"), (425, "retry"), (429, "retry"),
    (400, "rejected"), (401, "rejected"), (403, "rejected"), (404, "rejected"), (410, "rejected"),
    (422, "rejected"), (301, "rejected"), (307, "rejected"),
])
def test_http_status_maps_to_retry_or_rejected(hooks, status, outcome):
    hooks.answer(status, headers={"Location": "http://elsewhere.test/"} if status < 400 else {})
    err = fails(WebhookNotifier({"url": hooks.url}), notice())
    assert (err.outcome, err.code) == (outcome, f"http-{status}")
    assert len(hooks.received) == 1        # one call, one POST: no hidden retries, no redirects followed


def test_retry_after_is_reported(hooks):
    hooks.answer(429, headers={"Retry-After": "120"})
    err = fails(WebhookNotifier({"url": hooks.url}), notice())
    assert err.outcome == "retry" and "Retry-After 120" in str(err)


def test_connection_refused_is_retry():
    err = fails(WebhookNotifier({"url": f"http://127.0.0.1:{free_port()}/hook"}), notice())
    assert (err.outcome, err.code) == ("retry", "connect")


def test_no_answer_in_time_is_retry(hooks):
    hooks.delay = 2.0
    err = fails(WebhookNotifier({"url": hooks.url, "timeout": 0.3}), notice())
    assert (err.outcome, err.code) == ("retry", "timeout")
    assert len(hooks.received) == 1   # it may have arrived: the resend carries the same key


def test_a_secret_not_in_the_environment_is_retry_and_nothing_is_sent(hooks, monkeypatch):
    monkeypatch.delenv("HL7REFERRAL_WEBHOOK_SECRET", raising=False)
    err = fails(WebhookNotifier({"url": hooks.url, "secret_env": "HL7REFERRAL_WEBHOOK_SECRET"}), notice())
    assert (err.outcome, err.code) == ("retry", "config")
    assert "HL7REFERRAL_WEBHOOK_SECRET" in str(err)
    assert hooks.received == []


def test_logs_and_errors_carry_no_phi_nor_the_urls_query(hooks, caplog):
    caplog.set_level(logging.DEBUG)
    url = hooks.url + "?token=sekrit"
    n = WebhookNotifier({"url": url})
    n.send(notice())
    hooks.answer(400)
    err = fails(n, notice())
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hl7referral"))
    assert "REF123/no-show-alert/2024-05-07" in ours
    for secret in ("sekrit", "Müller", "#referrals", "Missed appointment", "Owner: alice"):
        assert secret not in ours + str(err)
    assert hooks.received[0].path == "/hooks/referrals?token=sekrit"


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, key", [
    ({}, "url"),
    ({"url": "ftp://hooks.test/x"}, "url"),
    ({"url": "https://"}, "url"),
    ({"url": "https://user:pw@hooks.test/x"}, "url"),
    ({"url": "https://hooks.test/x", "secret_env": "not a name"}, "secret_env"),
    ({"url": "https://hooks.test/x", "auth_env": "a-b"}, "auth_env"),
    ({"url": "https://hooks.test/x", "signature_header": "Bad Header"}, "signature_header"),
    ({"url": "https://hooks.test/x", "headers": {"X-A": "one\ntwo"}}, "headers.X-A"),
    ({"url": "https://hooks.test/x", "timeout": -1}, "timeout"),
    ({"url": "https://hooks.test/x", "secret": "inline"}, "secret"),
])
def test_bad_settings_name_their_key(settings, key):
    with pytest.raises(NotifierSettingsError) as info:
        WebhookNotifier(settings)
    assert info.value.key == key


def test_the_plugin_is_found_by_its_entry_point():
    n = load_notifier("webhook", {"url": "https://hooks.example.org/referrals"})
    assert isinstance(n, WebhookNotifier)
    assert (n.timeout, n.needs_address) == (10.0, False)
    assert n.check_address("") is None and n.check_address("#referrals") is None
    assert n.check_address("a\nb")
