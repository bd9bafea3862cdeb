"""A fake HTTP fax API on 127.0.0.1, speaking the shape ``HttpFaxGateway`` defaults to.

    POST /v1/faxes                       multipart: to, file, client_reference, callback_url, ...
                                         -> 201 {"id", "status": "queued", "client_reference"}
    GET  /v1/faxes/{id}                  -> 200 {"id", "status", "detail", "client_reference", "pages"}
    GET  /v1/faxes?client_reference=KEY  -> 200 [ {job}, ... ]  (the jobs with that reference)

It checks the auth header (401 otherwise), honours ``Idempotency-Key`` (the same
key answers with the earlier job and creates nothing), and records every fax it
accepted in :attr:`FaxApiServer.faxes`: ``len(server.faxes)`` is the number of
faxes "sent", what tests assert as "at most one fax per attempt".

Scripting, per test (each applies to the next request(s) only, then is used up):

* :meth:`delay_next_post` - create the fax, then wait before answering (a client timeout after creation)
* :meth:`drop_next_post` - create the fax, then close the connection without answering
* :meth:`force` - answer the next N requests with a given status/body, doing nothing else
* :meth:`reuse_job_id` - give the next new fax a job id an earlier fax already has
* :attr:`forget_idempotency` - True: ignore ``Idempotency-Key`` (every POST is a new fax)
* :meth:`set_status` - a job's status word (and detail) as GET reports it
* :meth:`send_callbacks` - POST JSON (or form) status callbacks to a URL, in the order given

Usage::

    with FaxApiServer(auth="Bearer t") as api:
        gateway = HttpFaxGateway({"url": api.url, "status_url": api.status_url, ...})
"""

from __future__ import annotations

import json
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fax:
    """One fax the API accepted (what the far fax machine would get)."""

    job_id: str
    number: str
    pdf: bytes
    filename: str
    content_type: str
    reference: str
    callback_url: str
    fields: dict[str, str]            # every text field, as sent
    headers: dict[str, str]           # the POST's headers (lower-cased names)
    status: str = "queued"
    detail: str = ""
    pages: int | None = None

    def answer(self) -> dict:
        return {"id": self.job_id, "status": self.status, "detail": self.detail,
                "client_reference": self.reference, "to": self.number, "pages": self.pages}


@dataclass
class _Forced:
    status: int
    body: bytes
    headers: dict[str, str]
    method: str | None
    left: int


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """[(params of Content-Disposition and content-type, content)]: enough for what HTTP clients send."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError("no boundary")
    delim = b"\r\n--" + m.group(1).encode("latin-1")
    chunks = (b"\r\n" + body).split(delim)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("not a complete multipart body")
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without headers")
        params: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                params.update((k, v) for k, v in re.findall(r'(\w+)="([^"]*)"', value))
            elif name.strip().lower() == "content-type":
                params["content-type"] = value.strip()
        parts.append((params, content))
    return parts


class FaxApiServer:
    def __init__(self, *, auth: str | None = "Bearer test-token", auth_header: str = "Authorization",
                 callback_token: str | None = None) -> None:
        self.auth = auth                      # the auth header's expected value; None = no check
        self.auth_header = auth_header.lower()
        self.callback_token = callback_token  # sent as X-Fax-Token by send_callbacks
        self.faxes: list[Fax] = []
        self.requests: list[Request] = []
        self.forget_idempotency = False
        self._by_key: dict[str, Fax] = {}
        self._forced: list[_Forced] = []
        self._delay = 0.0
        self._drop = False
        self._reuse: str | None = None
        self._next = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FaxApiServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes a handler sleeping in delay_next_post
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FaxApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The POST endpoint (the gateway's ``url``)."""
        return self.base_url + "/v1/faxes"

    @property
    def status_url(self) -> str:
        return self.base_url + "/v1/faxes/{id}"

    @property
    def find_url(self) -> str:
        return self.base_url + "/v1/faxes?client_reference={key}"

    # ---------------------------------------------------------------- scripting

    def delay_next_post(self, seconds: float) -> None:
        """The next POST creates its fax, then waits *seconds* before answering."""
        self._delay = seconds

    def drop_next_post(self) -> None:
        """The next POST creates its fax, then the connection is closed without an answer."""
        self._drop = True

    def force(self, status: int, count: int = 1, *, body: dict | list | str | None = None,
              headers: dict[str, str] | None = None, method: str | None = None) -> None:
        """Answer the next *count* requests (of *method*, or any) with *status* and *body*; nothing is created."""
        if body is None:
            body = {"error": f"forced {status}"}
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        hdrs = {"Content-Type": "text/plain" if isinstance(body, str) else "application/json", **(headers or {})}
        with self._lock:
            self._forced.append(_Forced(status, raw, hdrs, method, count))

    def reuse_job_id(self, job_id: str | None = None) -> None:
        """The next new fax gets *job_id* (default: the last fax's), though it is another fax."""
        self._reuse = job_id or self.faxes[-1].job_id

    def set_status(self, job_id: str, status: str, detail: str = "", pages: int | None = None) -> None:
        """What GET /v1/faxes/{job_id} answers from now on (for the latest fax with that id)."""
        fax = self.fax(job_id)
        fax.status, fax.detail, fax.pages = status, detail, pages

    def fax(self, job_id: str) -> Fax:
        """The latest fax with *job_id* (KeyError if none)."""
        for fax in reversed(self.faxes):
            if fax.job_id == job_id:
                return fax
        raise KeyError(job_id)

    def callback_request(self, job_id: str, status: str, key: str | None = None, *,
                         form: bool = False, detail: str = "") -> tuple[bytes, dict[str, str]]:
        """(body, headers) of the callback this API sends for *job_id* (reference: *key* or the fax's)."""
        if key is None:
            try:
                key = self.fax(job_id).reference
            except KeyError:
                key = ""
        fields = {"id": job_id, "status": status, "client_reference": key, "detail": detail}
        if form:
            body = urllib.parse.urlencode(fields).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
        else:
            body = json.dumps(fields).encode()
            headers = {"Content-Type": "application/json"}
        if self.callback_token is not None:
            headers["X-Fax-Token"] = self.callback_token
        return body, headers

    def send_callbacks(self, url: str, events: list[tuple], *, form: bool = False,
                       timeout: float = 5.0) -> list[int]:
        """POST one callback per event ``(job_id, status)`` or ``(job_id, status, key)`` to *url*, in order.

        Duplicates and out-of-order events are sent exactly as listed. Returns the
        HTTP status the listener answered to each (0 when it could not be reached).
        """
        codes = []
        for event in events:
            body, headers = self.callback_request(*event, form=form)
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    codes.append(resp.status)
            except urllib.error.HTTPError as e:
                codes.append(e.code)
            except OSError:
                codes.append(0)
        return codes

    # ---------------------------------------------------------------- the API (handler threads)

    def _take_forced(self, method: str) -> _Forced | None:
        with self._lock:
            for f in self._forced:
                if f.method in (None, method):
                    f.left -= 1
                    if f.left <= 0:
                        self._forced.remove(f)
                    return f
        return None

    def _create(self, fields: dict[str, str], file: tuple[dict[str, str], bytes] | None,
                headers: dict[str, str]) -> tuple[Fax, bool]:
        """(the fax for this POST, True if it is new)."""
        key = headers.get("idempotency-key", "")
        with self._lock:
            if key and not self.forget_idempotency and key in self._by_key:
                return self._by_key[key], False
            if self._reuse:
                job_id, self._reuse = self._reuse, None
            else:
                self._next += 1
                job_id = f"fax-{self._next:04d}"
            params, pdf = file
            fax = Fax(job_id, fields.get("to", ""), pdf, params.get("filename", ""), params.get("content-type", ""),
                      fields.get("client_reference", ""), fields.get("callback_url", ""), fields, headers)
            self.faxes.append(fax)
            if key and not self.forget_idempotency:
                self._by_key[key] = fax
            return fax, True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hung up (a scripted timeout) is not worth a traceback; a bug here is.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    api: FaxApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: pytest shows failures, not access logs
        pass

    def _send(self, status: int, body: dict | list | bytes, headers: dict[str, str] | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _common(self, method: str) -> bool:
        """Log, apply a forced answer and check auth; True if the request is answered already."""
        api = self.api
        headers = {k.lower(): v for k, v in self.headers.items()}
        api.requests.append(Request(method, self.path, headers))
        self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        forced = api._take_forced(method)
        if forced:
            self._send(forced.status, forced.body, forced.headers)
            return True
        if api.auth is not None and headers.get(api.auth_header) != api.auth:
            self._send(401, {"error": "unauthorized"})
            return True
        self._headers = headers
        return False

    def do_POST(self):
        api = self.api
        if self._common("POST"):
            return
        if urllib.parse.urlsplit(self.path).path != "/v1/faxes":
            return self._send(404, {"error": "not found"})
        try:
            parts = parse_multipart(self._body, self.headers.get("Content-Type", ""))
            fields = {p["name"]: c.decode("utf-8") for p, c in parts if "filename" not in p}
        except (ValueError, KeyError) as e:
            return self._send(400, {"error": f"bad multipart body: {type(e).__name__}"})
        files = [(p, c) for p, c in parts if "filename" in p and p.get("name") == "file"]
        if not fields.get("to") or not files:
            return self._send(422, {"error": "to and file are required"})
        fax, new = api._create(fields, files[0], self._headers)
        if new and api._drop:
            api._drop = False
            self.close_connection = True  # the fax exists; the client never hears of it
            return
        if new and api._delay:
            delay, api._delay = api._delay, 0.0
            api._stopping.wait(delay)
        try:
            self._send(201 if new else 200, fax.answer())
        except OSError:
            pass  # the client gave up waiting: exactly the case being scripted

    def do_GET(self):
        api = self.api
        if self._common("GET"):
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/v1/faxes":
            ref = urllib.parse.parse_qs(url.query).get("client_reference", [""])[0]
            return self._send(200, [f.answer() for f in api.faxes if ref and f.reference == ref])
        m = re.fullmatch(r"/v1/faxes/([^/]+)", url.path)
        if m:
            try:
                return self._send(200, api.fax(urllib.parse.unquote(m.group(1))).answer())
            except KeyError:
                pass
        self._send(404, {"error": "not found"})
