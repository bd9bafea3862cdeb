"""The http-fax gateway against a real HTTP fax API fake (tests/fax_api_server.py) over TCP.

What matters most: at most one fax per attempt (a timeout after the fax was
created is "unknown", and sending the same job again gives the same job id,
through the idempotency header or through find()), the right outcome for each
failure, the far end's words mapped to our states, and no secret in any
message.
"""

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fax_api_server import FaxApiServer

from hl7referral.fax.gateway import FaxGateway, FaxJob, GatewayError, GatewaySettingsError, Status, load_gateway
from hl7referral.fax.http_api import HttpFaxGateway

SECRET = "Bearer s3cret-Zq81vX"
CB_SECRET = "cb-s3cret-77Hk"
# A PDF-ish body with every byte value, CRLFs and a would-be boundary: it must arrive intact.
PDF = b"%PDF-1.4\n" + bytes(range(256)) + b"\r\n--\r\n\r\n--boundary\r\n%%EOF\n"


def make_job(key="REF-1/fax/1", number="+1 (555) 555-0190", referral_id="REF-1", callback_url=""):
    return FaxJob(key=key, number=number, pdf=PDF, referral_id=referral_id, callback_url=callback_url)


def no_secret(*texts):
    for text in texts:
        assert "s3cret" not in str(text)


@pytest.fixture
def api():
    with FaxApiServer(auth=SECRET, callback_token=CB_SECRET) as server:
        yield server


@pytest.fixture
def make(api, monkeypatch):
    """A gateway for the fake API; keyword arguments override its settings."""
    monkeypatch.setenv("TEST_FAX_AUTH", SECRET)
    monkeypatch.setenv("TEST_FAX_CB", CB_SECRET)

    def make(**over):
        settings = {"url": api.url, "auth_env": "TEST_FAX_AUTH", "status_url": api.status_url,
                    "find_url": api.find_url, "detail_field": "detail", "pages_field": "pages",
                    "callback_token_env": "TEST_FAX_CB", "timeout": 3.0, **over}
        return HttpFaxGateway(settings)

    return make


def fails(call, *args):
    with pytest.raises(GatewayError) as info:
        call(*args)
    no_secret(info.value, repr(info.value))
    return info.value


# --------------------------------------------------------------------------- submit


def test_submit_sends_the_pdf_number_reference_and_auth(api, make, caplog):
    caplog.set_level(logging.DEBUG)
    gw = make(extra_fields={"caller_id": "+15555550100", "priority": 1})
    assert isinstance(gw, FaxGateway) and gw.name == "http-fax" and gw.supports_callbacks
    sub = gw.submit(make_job(callback_url="https://engine.example/fax/callback"))
    assert len(api.faxes) == 1
    fax = api.faxes[0]
    assert sub.job_id == fax.job_id
    assert sub.status is not None and sub.status.status is Status.QUEUED
    assert fax.pdf == PDF
    assert (fax.filename, fax.content_type) == ("REF-1.pdf", "application/pdf")
    assert fax.number == "+15555550190"
    assert fax.reference == "REF-1/fax/1"
    assert fax.callback_url == "https://engine.example/fax/callback"
    assert fax.fields["caller_id"] == "+15555550100" and fax.fields["priority"] == "1"
    assert fax.headers["authorization"] == SECRET
    assert fax.headers["idempotency-key"] == "REF-1/fax/1"
    no_secret(caplog.text)


def test_digits_format_unsafe_filename_and_no_callback_field(api, make):
    gw = make(number_format="digits", callback_field="")
    assert not gw.supports_callbacks
    gw.submit(make_job(referral_id='R"1\r\n/x', callback_url="https://engine.example/cb"))
    fax = api.faxes[0]
    assert fax.number == "15555550190"
    assert fax.filename == "R_1___x.pdf"
    assert "callback_url" not in fax.fields


@pytest.mark.parametrize("number", ["5555550190", "+1 555 555 0190 x12", "+1-555-CALL-NOW", "+12", ""])
def test_a_bad_number_is_rejected_before_anything_is_sent(api, make, number):
    err = fails(make().submit, make_job(number=number))
    assert (err.outcome, err.code) == ("rejected", "bad-number")
    assert api.requests == []


def test_a_timeout_after_the_fax_was_created_is_unknown_and_a_resubmit_is_the_same_fax(api, make):
    gw = make(timeout=0.3)
    api.delay_next_post(3.0)
    err = fails(gw.submit, make_job())
    assert (err.outcome, err.code) == ("unknown", "timeout")
    assert len(api.faxes) == 1  # the far end did make it

    again = gw.submit(make_job())  # what the engine does with an "unknown": the same FaxJob
    assert again.job_id == api.faxes[0].job_id
    assert len(api.faxes) == 1
    posts = [r for r in api.requests if r.method == "POST"]
    assert [r.headers["idempotency-key"] for r in posts] == ["REF-1/fax/1"] * 2


def test_a_connection_dropped_after_the_post_is_unknown(api, make):
    gw = make()
    api.drop_next_post()
    err = fails(gw.submit, make_job())
    assert (err.outcome, err.code) == ("unknown", "connection")
    assert gw.submit(make_job()).job_id == api.faxes[0].job_id
    assert len(api.faxes) == 1


def test_without_idempotency_at_the_far_end_find_names_the_earlier_job(api, make):
    gw = make(timeout=0.3)
    api.forget_idempotency = True
    api.delay_next_post(3.0)
    assert fails(gw.submit, make_job()).outcome == "unknown"
    assert gw.find("REF-1/fax/1") == api.faxes[0].job_id  # so the engine need not send again
    assert gw.find("REF-1/fax/2") is None
    # Why the engine must ask: this far end turns a blind resubmit into a second fax.
    gw.submit(make_job())
    assert len(api.faxes) == 2


def test_find_only_trusts_jobs_that_echo_the_key(api, make):
    gw = make()
    api.force(200, body=[{"id": "fax-9", "client_reference": "someone-else"}, {"id": "fax-8"}])
    assert gw.find("REF-1/fax/1") is None  # an API ignoring the filter lists every fax
    api.force(200, body={"data": [{"id": 12, "client_reference": "REF-1/fax/1"}]})
    assert make(find_list_field="data").find("REF-1/fax/1") == "12"
    api.force(200, body={"fax-5": {"id": "fax-5", "client_reference": "REF-1/fax/1"}})
    assert gw.find("REF-1/fax/1") == "fax-5"  # an object of jobs keyed by id
    api.force(200, body={"id": "fax-6", "client_reference": "REF-1/fax/1"})
    assert gw.find("REF-1/fax/1") == "fax-6"  # one job
    assert make(find_url="").find("REF-1/fax/1") is None


def test_find_raises_when_it_cannot_tell(api, make):
    gw = make()
    api.force(503)
    assert fails(gw.find, "REF-1/fax/1").outcome == "retry"
    api.force(200, body="not json")
    assert fails(gw.find, "REF-1/fax/1").outcome == "retry"
    api.force(404)  # the key is in the query: a 404 is a wrong endpoint, not "no such job"
    assert fails(gw.find, "REF-1/fax/1").outcome == "rejected"
    path_gw = make(find_url=api.base_url + "/v1/by-reference/{key}")
    assert path_gw.find("REF-1/fax/1") is None  # the key in the path: 404 is "none"


def test_a_duplicate_job_id_from_the_far_end_is_reported_as_given(api, make):
    gw = make()
    first = gw.submit(make_job(key="REF-1/fax/1"))
    api.reuse_job_id()
    second = gw.submit(make_job(key="REF-2/fax/1", referral_id="REF-2"))
    assert first.job_id == second.job_id and len(api.faxes) == 2
    # Callbacks still carry each attempt's own key, which tells the two apart.
    keys = [gw.parse_callback(*api.callback_request(first.job_id, "success", key)).key
            for key in ("REF-1/fax/1", "REF-2/fax/1")]
    assert keys == ["REF-1/fax/1", "REF-2/fax/1"]


@pytest.mark.parametrize("code, outcome", [
    (400, "rejected"), (401, "rejected"), (403, "rejected"), (404, "rejected"), (422, "rejected"),
    (301, "rejected"),
    (408, "retry"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"),
    (504, "unknown"), (409, "unknown"),
])
def test_http_errors_on_submit(api, make, code, outcome):
    api.force(code, body={"message": f"refused with {code}"}, headers={"Retry-After": "7"})
    err = fails(make().submit, make_job())
    assert err.outcome == outcome and err.code == f"http-{code}"
    assert f"HTTP {code} (refused with {code})" in str(err)
    assert "Retry-After 7" in str(err)
    assert api.faxes == []


def test_a_rejection_carries_the_apis_short_reason_and_never_the_pdf(api, make):
    api.force(422, body={"error": {"message": "'to' is not a valid fax number: +15555550190"}})
    err = fails(make().submit, make_job())
    assert "not a valid fax number" in str(err)
    assert "%PDF" not in str(err)


def test_connection_refused_is_retry(make):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = fails(make(url=f"http://127.0.0.1:{port}/v1/faxes").submit, make_job())
    assert (err.outcome, err.code) == ("retry", "connect")


@pytest.mark.parametrize("body", [{"status": "queued"}, "accepted", {"id": ""}, {"id": True}])
def test_a_2xx_without_a_job_id_is_unknown(api, make, body):
    api.force(202, body=body)
    err = fails(make().submit, make_job())
    assert (err.outcome, err.code) == ("unknown", "no-id")


def test_a_job_id_at_a_dotted_path_and_an_unknown_first_status(api, make):
    api.force(201, body={"data": {"id": 77, "status": "warming-up"}})
    sub = make(id_field="data.id", status_field="data.status").submit(make_job())
    assert sub.job_id == "77" and sub.status is None


# --------------------------------------------------------------------------- status


def test_status_maps_the_apis_words(api, make):
    gw = make()
    job_id = gw.submit(make_job()).job_id
    assert gw.status(job_id).status is Status.QUEUED
    api.set_status(job_id, "in_progress")
    assert gw.status(job_id).status is Status.SENDING
    api.set_status(job_id, "SUCCESS", pages=3)
    assert gw.status(job_id) == gw.status(job_id).__class__(Status.DELIVERED, "SUCCESS", 3)
    api.set_status(job_id, "failure", detail="Busy signal")
    st = gw.status(job_id)
    assert (st.status, st.detail) == (Status.FAILED, "Busy signal")
    api.set_status(job_id, "teleported")
    err = fails(gw.status, job_id)
    assert err.outcome == "retry" and "teleported" in str(err)


def test_status_words_are_configurable(api, make):
    gw = make(statuses={"delivered": ["completed"], "failed": ["no_answer", "failure"]})
    job_id = gw.submit(make_job()).job_id
    api.set_status(job_id, "completed")
    assert gw.status(job_id).status is Status.DELIVERED
    api.set_status(job_id, "success")  # the delivered words were replaced, not added to
    assert fails(gw.status, job_id).outcome == "retry"


def test_status_errors(api, make):
    gw = make()
    assert fails(gw.status, "fax-404").outcome == "rejected"
    api.force(503)
    assert fails(gw.status, "fax-1").outcome == "retry"
    api.force(200, body="<html>")
    assert fails(gw.status, "fax-1").outcome == "retry"
    no_poll = make(status_url="")
    assert not no_poll.supports_status and gw.supports_status
    assert fails(no_poll.status, "fax-1").outcome == "retry"


# --------------------------------------------------------------------------- callbacks


def test_callbacks_json_form_and_multipart(api, make):
    gw = make()
    job_id = gw.submit(make_job()).job_id
    cb = gw.parse_callback(*api.callback_request(job_id, "success"))
    assert (cb.job_id, cb.status.status, cb.key) == (job_id, Status.DELIVERED, "REF-1/fax/1")
    body, headers = api.callback_request(job_id, "failure", form=True, detail="No answer")
    cb = gw.parse_callback(body, {k.lower(): v for k, v in headers.items()})
    assert (cb.status.status, cb.status.detail, cb.key) == (Status.FAILED, "No answer", "REF-1/fax/1")

    # Phaxio's shape: multipart/form-data, the fax as JSON in one field.
    phaxio = make(id_field="fax.id", status_field="fax.status", reference_field="fax.tags.ref",
                  detail_field="", callback_token_env="")
    fax = json.dumps({"id": 1234, "status": "success", "tags": {"ref": "REF-1/fax/1"}})
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"success\"\r\n\r\ntrue\r\n"
            b"--xyz\r\nContent-Disposition: form-data; name=\"fax\"\r\n\r\n" + fax.encode() + b"\r\n--xyz--\r\n")
    cb = phaxio.parse_callback(body, {"Content-Type": "multipart/form-data; boundary=xyz"})
    assert (cb.job_id, cb.status.status, cb.key) == ("1234", Status.DELIVERED, "REF-1/fax/1")


def test_callback_token(api, make, monkeypatch):
    gw = make()
    body, headers = api.callback_request("fax-1", "success")
    assert gw.parse_callback(body, {"x-fax-token": CB_SECRET, "content-type": "application/json"}).job_id == "fax-1"
    for bad in ({}, {"X-Fax-Token": "cb-s3cret-77HK"}, {"X-Fax-Token": ""}):
        err = fails(gw.parse_callback, body, {"Content-Type": "application/json", **bad})
        assert (err.outcome, err.code) == ("rejected", "token")
    monkeypatch.delenv("TEST_FAX_CB")
    err = fails(gw.parse_callback, body, headers)
    assert err.outcome == "rejected" and "TEST_FAX_CB" in str(err)


@pytest.mark.parametrize("body, ctype", [
    (b"not json", "application/json"), (b"[1, 2]", "application/json"), (b"\xff\xfe\x00", ""),
    (b'{"status": "success"}', "application/json"), (b'{"id": "fax-1"}', "application/json"),
    (b'{"id": {"x": 1}, "status": "success"}', "application/json"),
    (b"", "application/x-www-form-urlencoded"), (b"id=fax-1&status=", "application/x-www-form-urlencoded"),
    (b"id=fax-1&status=%ff", "application/x-www-form-urlencoded"),
    (b"garbage", "multipart/form-data; boundary=xyz"),
])
def test_a_malformed_callback_is_rejected(make, body, ctype):
    err = fails(make().parse_callback, body, {"Content-Type": ctype, "X-Fax-Token": CB_SECRET})
    assert (err.outcome, err.code) == ("rejected", "bad-callback")


def test_a_callback_with_an_unknown_word_is_retry(api, make):
    err = fails(make().parse_callback, *api.callback_request("fax-1", "teleported"))
    assert err.outcome == "retry" and "teleported" in str(err)


class _Listener:
    """A stand-in for the engine's callback listener: records what it is POSTed, in order."""

    def __init__(self):
        got = self.got = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append((body, dict(self.headers)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fax/callback"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_send_callbacks_delivers_duplicates_and_out_of_order_as_listed(api, make):
    gw = make()
    job_id = gw.submit(make_job()).job_id
    listener = _Listener()
    try:
        events = [(job_id, "success"), (job_id, "in_progress"), (job_id, "success"), (job_id, "queued")]
        assert api.send_callbacks(listener.url, events) == [204] * 4
    finally:
        listener.close()
    # The gateway reports each as the far end said it; the engine ignores the backward moves.
    got = [gw.parse_callback(body, headers) for body, headers in listener.got]
    assert [c.status.status for c in got] == [Status.DELIVERED, Status.SENDING, Status.DELIVERED, Status.QUEUED]
    assert {(c.job_id, c.key) for c in got} == {(job_id, "REF-1/fax/1")}


# --------------------------------------------------------------------------- settings and secrets


@pytest.mark.parametrize("over, key", [
    ({"bogus": 1}, "bogus"),
    ({"url": None}, "url"),
    ({"url": "ftp://fax.example.com/x"}, "url"),
    ({"url": "https://user:pw@fax.example.com/x"}, "url"),
    ({"url": 5}, "url"),
    ({"timeout": "30"}, "timeout"),
    ({"timeout": True}, "timeout"),
    ({"timeout": 0}, "timeout"),
    ({"number_format": "national"}, "number_format"),
    ({"status_url": "https://fax.example.com/v1/faxes"}, "status_url"),
    ({"find_url": "https://fax.example.com/v1/faxes?ref={id}"}, "find_url"),
    ({"auth_env": "Bearer abc123"}, "auth_env"),
    ({"auth_header": "Bad Header"}, "auth_header"),
    ({"idempotency_header": "Idem\r\nX: 1"}, "idempotency_header"),
    ({"extra_fields": {"caller_id": [1]}}, "extra_fields.caller_id"),
    ({"extra_fields": "caller_id=1"}, "extra_fields"),
    ({"extra_fields": {"to": "+1555"}}, "extra_fields"),
    ({"secret_fields": {"access_pwd": ""}}, "secret_fields.access_pwd"),
    ({"statuses": {"done": ["ok"]}}, "statuses.done"),
    ({"statuses": {"queued": ["success"]}}, "statuses.queued"),
    ({"statuses": {"sending": [3]}}, "statuses.sending"),
    ({"statuses": ["queued"]}, "statuses"),
    ({"id_field": ""}, "id_field"),
    ({"callback_field": "", "status_url": ""}, "status_url"),
])
def test_settings_errors_name_the_key(api, over, key):
    settings = {"url": api.url, "status_url": api.status_url, **over}
    if over.get("url", "") is None:
        del settings["url"]
    with pytest.raises(GatewaySettingsError) as info:
        HttpFaxGateway(settings)
    assert info.value.key == key
    assert "abc123" not in str(info.value)


def test_load_gateway_finds_the_plugin(api):
    gw = load_gateway("http-fax", {"url": api.url})
    assert isinstance(gw, HttpFaxGateway)


def test_secrets_are_read_from_the_environment_at_call_time(api, make, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    gw = make()
    monkeypatch.setenv("TEST_FAX_AUTH", "Bearer s3cret-wrong")
    err = fails(gw.submit, make_job())
    assert (err.outcome, err.code) == ("rejected", "http-401")
    monkeypatch.delenv("TEST_FAX_AUTH")
    err = fails(gw.submit, make_job())
    assert (err.outcome, err.code) == ("retry", "config") and "TEST_FAX_AUTH" in str(err)
    assert len(api.requests) == 1  # nothing sent without the secret
    monkeypatch.setenv("TEST_FAX_AUTH", SECRET)
    monkeypatch.setenv("TEST_FAX_PWD", "s3cret-pwd")
    gw = make(secret_fields={"access_pwd": "TEST_FAX_PWD"})
    gw.submit(make_job())
    assert api.faxes[0].fields["access_pwd"] == "s3cret-pwd"
    no_secret(caplog.text)
