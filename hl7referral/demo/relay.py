"""A local SMTP relay on 127.0.0.1 standing in for the HISPs between two engines (aiosmtpd).

Mail for a routed domain is accepted (store-and-forward, in memory), then delivered by
SMTP to the inbound listener of the engine that owns that domain. Each message is
recorded (:class:`Relayed`) for assertions and for the demo's printout.

Invariants
----------
* Only recipients in a routed domain are accepted (550 otherwise): the relay never
  takes mail it has nowhere to deliver.
* The bytes delivered are the bytes received (aiosmtpd's ``original_content``: after
  SMTP dot-unstuffing, before any decoding); their SHA-256 is recorded.
* Nothing is dropped silently: every accepted message has a record whose ``result``
  ends as ``delivered`` or ``failed`` (logged at ERROR), or, when the relay is stopped
  before it could deliver, ``abandoned`` (logged at ERROR too).
* A temporary failure (refused connection, 4xx, a timeout) is retried after each delay
  of ``retry_delays``; a 5xx is final. A partly refused delivery is not retried, so a
  recipient that took the message never gets it twice.
* A held sender domain (:meth:`Relay.hold`) gets 451 after DATA: the sender keeps the
  message and sends it again; the relay has accepted nothing, so a hold neither loses
  nor duplicates mail. The refusal is recorded as ``deferred``.
* A refused recipient domain (:meth:`Relay.refuse`) gets the given 5xx at RCPT, as a HISP
  answers for a destination it will not serve: a permanent refusal, so the sender gives
  the message up (and may take another transport). Each refused recipient is recorded as
  ``refused``, without content (the relay never received any); :meth:`Relay.accept` ends it.
* Delivery runs on worker threads, never on the SMTP server's event loop: a slow or
  dead engine does not hold up the relay's other connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import smtplib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Mapping

from aiosmtpd.controller import Controller

from .config import LOOPBACK

log = logging.getLogger("hl7referral.demo.relay")

# Eighteen attempts over about thirty seconds: long enough to ride out an engine's restart (a test
# kills one with mail on its way) on a loaded machine, short enough for a test to see a failure.
RETRY_DELAYS = (0.25, 0.5, 1.0) + (2.0,) * 14


@dataclass(frozen=True)
class Route:
    """Where mail for one domain goes: an engine's inbound SMTP listener."""

    name: str          # the engine's name, for records and printouts
    host: str
    port: int


@dataclass(frozen=True)
class Relayed:
    """One message (one destination) the relay was handed, and what became of it; or, with result
    ``refused``, one recipient refused at RCPT (no content: size 0, no hash, no headers)."""

    number: int
    mail_from: str
    rcpt_to: tuple[str, ...]
    destination: str       # the route's name; "" for a deferred message
    size: int
    sha256: str
    message_id: str
    in_reply_to: str       # an MDN names the packet it answers here
    subject: str
    result: str            # queued | delivered | failed | abandoned | deferred | refused
    detail: str            # the downstream's reply or the error
    attempts: int
    received_at: float     # time.time()
    finished_at: float | None

    def line(self) -> str:
        """One line for a printout (no content, headers only)."""
        return (f"#{self.number} {self.mail_from} -> {','.join(self.rcpt_to)} via {self.destination or '-'}: "
                f"{self.size} bytes {self.message_id} {self.result} ({self.attempts} attempt(s)) {self.detail}")


class _Permanent(Exception):
    """A final refusal: no retry."""


class _EphemeralController(Controller):
    """aiosmtpd's Controller on port 0: learn the bound port before it connects to itself."""

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _Handler:
    def __init__(self, relay: "Relay") -> None:
        self.relay = relay

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.relay.route_for(address) is None:
            return f"550 5.1.2 no route to {address.rpartition('@')[2]} through this relay"
        refusal = self.relay._refusal(envelope.mail_from, address)
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        return self.relay._accept(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)


class Relay:
    """The relay: ``start()``, ``stop()``, ``port``, ``records()``, ``hold()``/``release()``,
    ``refuse()``/``accept()``.

    *routes* maps a recipient domain to the :class:`Route` of the engine that owns it.
    """

    def __init__(self, routes: Mapping[str, Route], *, host: str = LOOPBACK, port: int = 0,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS, timeout: float = 10.0) -> None:
        self.routes = {d.lower(): r for d, r in routes.items()}
        self.host = host
        self.retry_delays = retry_delays
        self.timeout = timeout
        self._controller = _EphemeralController(_Handler(self), hostname=host, port=port)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="relay-delivery")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._records: list[Relayed] = []
        self._held: set[str] = set()
        self._refused: dict[str, int] = {}     # recipient domain -> the 5xx code it gets at RCPT
        self._tasks: set[asyncio.Task] = set()
        self._running = False

    # -- control ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._controller.port

    def start(self) -> "Relay":
        self._controller.start()
        self._running = True
        log.info("relay on %s:%d for %s", self.host, self.port,
                 ", ".join(f"{d} -> {r.name} ({r.port})" for d, r in self.routes.items()))
        return self

    def stop(self, drain: float = 5.0) -> None:
        """Let deliveries under way finish (up to *drain* seconds), record the rest as abandoned, stop."""
        if not self._running:
            return
        self._running = False
        loop = self._controller.loop
        try:
            asyncio.run_coroutine_threadsafe(self._drain(drain), loop).result(drain + 5.0)
        except Exception:  # noqa: BLE001 - stopping must go on; what was not delivered is logged by _drain
            log.exception("relay: draining deliveries failed")
        self._controller.stop()
        self._pool.shutdown(wait=True)

    def hold(self, sender_domain: str) -> None:
        """Answer 451 to every message from *sender_domain* until :meth:`release`."""
        with self._lock:
            self._held.add(sender_domain.lower())

    def release(self, sender_domain: str) -> None:
        with self._lock:
            self._held.discard(sender_domain.lower())

    def refuse(self, domain: str, code: int = 550) -> None:
        """Refuse every recipient in *domain* at RCPT with *code* (a 5xx: final) until :meth:`accept`."""
        if not 500 <= code <= 599:
            raise ValueError(f"refuse: {code} is not a permanent (5xx) SMTP reply code; use hold() to defer")
        with self._lock:
            self._refused[domain.lower()] = code

    def accept(self, domain: str) -> None:
        """Take mail for *domain* again (after :meth:`refuse`)."""
        with self._lock:
            self._refused.pop(domain.lower(), None)

    def route_for(self, address: str) -> Route | None:
        return self.routes.get(address.rpartition("@")[2].lower())

    # -- what was relayed -------------------------------------------------------------------

    def records(self) -> list[Relayed]:
        with self._lock:
            return list(self._records)

    def wait_for(self, predicate, timeout: float = 30.0) -> list[Relayed]:
        """Block until ``predicate(records)`` is true; return the records (raise on timeout)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._records)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"relay: condition not met in {timeout} s; records:\n"
                                       + "\n".join(r.line() for r in self._records))
                self._changed.wait(left)
            return list(self._records)

    # -- accepting (the SMTP server's event loop) ----------------------------------------------

    def _accept(self, mail_from: str, rcpt_to: list[str], data: bytes) -> str:
        headers = BytesHeaderParser(policy=compat32).parsebytes(data)
        common = dict(mail_from=mail_from, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                      message_id=str(headers.get("Message-ID", "")).strip(),
                      in_reply_to=str(headers.get("In-Reply-To", "")).strip(),
                      subject=str(headers.get("Subject", "")).strip(), received_at=time.time())
        with self._lock:
            held = mail_from.rpartition("@")[2].lower() in self._held
        if held or not self._running:
            reply = "451 4.3.2 held at the relay, send it again later" if held else "421 4.3.2 relay stopping"
            self._add(rcpt_to=tuple(rcpt_to), destination="", result="deferred", detail=reply, attempts=0,
                      finished_at=time.time(), **common)
            return reply
        by_route: dict[Route, list[str]] = {}
        for rcpt in rcpt_to:
            by_route.setdefault(self.route_for(rcpt), []).append(rcpt)
        for route, rcpts in by_route.items():
            record = self._add(rcpt_to=tuple(rcpts), destination=route.name, result="queued", detail="",
                               attempts=0, finished_at=None, **common)
            task = asyncio.get_running_loop().create_task(self._deliver(record.number, route, data))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return "250 2.0.0 queued at the relay"

    def _refusal(self, mail_from: str, address: str) -> str:
        """The reply refusing *address* (recorded as ``refused``), or '' when its domain is not refused."""
        domain = address.rpartition("@")[2].lower()
        with self._lock:
            code = self._refused.get(domain)
        if code is None:
            return ""
        reply = f"{code} 5.7.1 mail for {domain} refused at the relay"
        now = time.time()
        self._add(mail_from=mail_from or "", rcpt_to=(address,), destination="", size=0, sha256="", message_id="",
                  in_reply_to="", subject="", result="refused", detail=reply, attempts=0, received_at=now,
                  finished_at=now)
        log.warning("relay: refused %s from %s: %s", address, mail_from, reply)
        return reply

    def _add(self, **fields) -> Relayed:
        with self._changed:
            record = Relayed(number=len(self._records) + 1, **fields)
            self._records.append(record)
            self._changed.notify_all()
            return record

    def _update(self, number: int, **fields) -> Relayed:
        with self._changed:
            record = dataclasses.replace(self._records[number - 1], **fields)
            self._records[number - 1] = record
            self._changed.notify_all()
            return record

    # -- delivering ---------------------------------------------------------------------------

    async def _deliver(self, number: int, route: Route, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        record = self._records[number - 1]
        delays = (0.0, *self.retry_delays)
        detail = ""
        try:
            for attempt, delay in enumerate(delays, start=1):
                if delay:
                    await asyncio.sleep(delay)
                try:
                    detail = await loop.run_in_executor(self._pool, self._send, route, record, data)
                except _Permanent as exc:
                    self._finish(number, "failed", str(exc), attempt)
                    return
                except (OSError, smtplib.SMTPException) as exc:
                    detail = _describe(exc)
                    self._update(number, attempts=attempt, detail=detail)
                    log.warning("relay: message %d to %s attempt %d: %s", number, route.name, attempt, detail)
                    continue
                self._finish(number, "delivered", detail, attempt)
                return
            self._finish(number, "failed", f"gave up after {len(delays)} attempts: {detail}", len(delays))
        except asyncio.CancelledError:
            self._finish(number, "abandoned", f"relay stopped before delivery ({detail or 'not tried'})",
                         self._records[number - 1].attempts)
            raise

    def _send(self, route: Route, record: Relayed, data: bytes) -> str:
        """One SMTP delivery (a worker thread); the final reply, or an exception."""
        with smtplib.SMTP(route.host, route.port, local_hostname="relay.harness.test", timeout=self.timeout) as s:
            try:
                refused = s.sendmail(record.mail_from, list(record.rcpt_to), data)
            except smtplib.SMTPRecipientsRefused as exc:
                codes = {r: c for r, (c, _) in exc.recipients.items()}
                if all(c < 500 for c in codes.values()):
                    raise
                raise _Permanent(f"recipients refused: {exc.recipients}") from None
            except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                if exc.smtp_code >= 500:
                    raise _Permanent(_describe(exc)) from None
                raise
        if refused:
            raise _Permanent(f"partly refused (delivered to the others, not retried): {refused}")
        return "250 accepted by " + route.name

    def _finish(self, number: int, result: str, detail: str, attempts: int) -> None:
        record = self._update(number, result=result, detail=detail, attempts=attempts, finished_at=time.time())
        if result == "delivered":
            log.info("relay: %s", record.line())
        else:
            log.error("relay: NOT DELIVERED %s", record.line())

    async def _drain(self, timeout: float) -> None:
        tasks = set(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        return f"{exc.smtp_code} {text}"
    return f"{type(exc).__name__}: {exc}"
