"""The fax agent: outbox rows of transport "fax" through their gateways, and their fate back.

Blocking, on one thread that owns its :class:`~hl7referral.store.outbox.Outbox` (the
engine's fax thread): it renders, submits, polls and applies callbacks; the Twisted
service around it only moves time and HTTP requests to it.

Invariants
----------
* One attempt (one idempotency key, ``referral/fax/N``) is at most one fax: its PDF is
  rendered once and stored in the row before the first submit, every retry submits those
  bytes with the same key, and the row is marked ``find_first`` (committed) before each
  submit and cleared only when the job id is recorded; so after an unknown outcome, or a
  crash between the gateway's answer and our commit, the next try asks the gateway for a
  job with that key (``find``) before it submits again.
* A job id belongs to one attempt while it waits. A gateway that answers with a job id
  another waiting attempt holds changes neither: the new attempt FAILS with an alert that
  says so (two referrals must not share one fax's fate). Job ids are per route (plugin and
  channel, ``hylafax@default``): two providers may both number from 1.
* States move only by :func:`hl7referral.fax.tracking.step`; every change is written with
  its ``transport_events`` row, and a status that would move a send backwards is recorded
  as ``status-stale`` and changes nothing (callbacks arrive twice and out of order).
* A callback is stored as received before the gateway gets its 200, and applied from the
  store; one that names a job not yet recorded (it overtook the submit answer) waits and
  is applied when the job appears, or is closed as unmatched after ``final_timeout``.
* Every FAILED raises exactly one coordinator alert (the state machine's ``alert`` effect).
* Logs carry outbox ids, referral ids, job ids and gateway words; never a name or the PDF.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.logger import Logger

from ..config.channels import ChannelConfig
from ..config.fax import FaxConfig
from ..fax import render
from ..fax.gateway import Callback, FaxGateway, FaxJob, GatewayError, GatewayStatus, Status, load_gateway
from ..fax.tracking import FINAL, WAITING, Event, State, Transition, status_event, step
from ..store.outbox import Outbox
from .ingest import iso_timestamp

WAITING_STATES = tuple(s.value for s in WAITING)


@dataclass(frozen=True)
class Route:
    name: str            # the gateway plugin's name ("hylafax")
    gateway: FaxGateway
    ident: str           # plugin@route ("hylafax@default", "http-fax@ref-i12"): whose job ids these are


class FaxAgent:
    log = Logger()

    def __init__(self, config: FaxConfig, outbox: Outbox, channels: Mapping[str, ChannelConfig], *,
                 gateways: Mapping[str, FaxGateway] | None = None) -> None:
        """*gateways* by channel name ("" = the default); built from the configuration when None."""
        self.config = config
        self.outbox = outbox
        self.channels = dict(channels)
        self.routes: dict[str, Route] = {}
        if gateways is None:
            gateways = {}
            if config.gateway:
                gateways[""] = _build(config.gateway)
            for ch in self.channels.values():
                if ch.fax:
                    gateways[ch.name] = _build(ch.fax)
        for channel, gw in gateways.items():
            self.routes[channel] = Route(gw.name, gw, f"{gw.name}@{channel or 'default'}")
        self._fonts: render.Fonts | None = None

    def route(self, channel: str | None) -> Route | None:
        return self.routes.get(channel or "") or self.routes.get("")

    # -- the tick ------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Everything due now: callbacks to apply, deadlines, status polls, submits."""
        self.apply_callbacks(now)
        self.check_timeouts(now)
        self.poll(now)
        self.send_due(now)

    def send_due(self, now: float) -> list[int]:
        rows = self.outbox.due(now, transports=("fax",))
        for row in rows:
            try:
                self.send(row, now)
            except Exception:  # noqa: BLE001 - one row's bug must not hold up the others; it stays due
                self.log.failure("fax attempt #{id} could not be sent", id=row["id"])
        return [r["id"] for r in rows]

    # -- submitting ------------------------------------------------------------------------

    def send(self, row: dict, now: float) -> Transition | None:
        route = self.route(row.get("channel"))
        if route is None:
            return self._move(row, Event.SUBMIT_REJECTED, now, f"no fax gateway for channel {row.get('channel')!r}")
        if not row["recipient"]:
            return self._move(row, Event.SUBMIT_REJECTED, now, "no fax number for the destination")
        pdf = row["payload"]
        if not pdf:
            try:
                pdf = self.render(row, now)
            except render.RenderError as exc:
                return self._move(row, Event.SUBMIT_REJECTED, now, f"the fax cannot be rendered: {exc}")
            self.outbox.update(row["id"], event="rendered", at=iso_timestamp(now), detail=f"PDF {len(pdf)} bytes",
                               payload=pdf)
        attempts = (row["attempts"] or 0) + 1
        try:
            job_id = route.gateway.find(row["idempotency_key"]) if row.get("find_first") else None
            if job_id:
                return self._submitted(row, route, job_id, None, now, attempts, "found the job of an earlier try")
            # From here the gateway may hold a job we have not recorded (a crash before the
            # answer is stored): say so first, so the next try, after a restart too, looks first.
            self.outbox.update(row["id"], event="submitting", at=iso_timestamp(now),
                               detail=f"attempt {attempts} to {route.ident}", find_first=1, gateway=route.ident)
            submitted = route.gateway.submit(FaxJob(key=row["idempotency_key"], number=row["recipient"], pdf=pdf,
                                                    referral_id=row["referral_id"] or "",
                                                    callback_url=self._callback_url(route, row.get("channel"))))
        except GatewayError as exc:
            return self._failed_submit(row, exc, now, attempts)
        return self._submitted(row, route, submitted.job_id, submitted.status, now, attempts, "")

    def _callback_url(self, route: Route, channel: str | None) -> str:
        if not (route.gateway.supports_callbacks and self.config.callback_url):
            return ""
        return f"{self.config.callback_url}/{channel or 'default'}"

    def _submitted(self, row: dict, route: Route, job_id: str, status: GatewayStatus | None, now: float,
                   attempts: int, how: str) -> Transition:
        other = self.outbox.by_job(route.ident, job_id)
        if other is not None and other["id"] != row["id"] and State(other["state"]) not in FINAL:
            return self._move(row, Event.SUBMIT_REJECTED, now,
                              f"{route.name} answered with job {job_id}, which is outbox #{other['id']}'s "
                              f"(referral {other['referral_id']}); this attempt is not tracked as sent",
                              attempts=attempts)
        detail = f"{route.name} job {job_id}" + (f" ({how})" if how else "")
        t = self._move(row, Event.SUBMITTED, now, detail, attempts=attempts, gateway=route.ident, job_id=job_id,
                       find_first=0, sent_at=now, deadline=now + self.config.final_timeout, last_error=None,
                       next_attempt_at=now + self.config.poll_interval)
        if status is not None and status.status != Status.QUEUED:
            self.apply_status(self.outbox.get(row["id"]), status, now, "submit answer")
        return t

    def _failed_submit(self, row: dict, exc: GatewayError, now: float, attempts: int) -> Transition:
        detail = f"{exc.outcome}: {exc}"
        if exc.outcome == "rejected":
            return self._move(row, Event.SUBMIT_REJECTED, now, detail, attempts=attempts, last_error=str(exc))
        if attempts >= self.config.max_attempts:
            # An unknown outcome is still unknown: keep find_first so an operator's retry looks first.
            return self._move(row, Event.GIVE_UP, now, f"{detail}; gave up after {attempts} attempts",
                              attempts=attempts, last_error=str(exc))
        delay = min(self.config.first_delay * 2 ** (attempts - 1), self.config.max_delay)
        event = Event.SUBMIT_UNKNOWN if exc.outcome == "unknown" else Event.SUBMIT_RETRY
        return self._move(row, event, now, f"{detail}; retry in {delay:.0f} s", attempts=attempts,
                          next_attempt_at=now + delay, last_error=str(exc),
                          # Cleared only with a job id: a "retry" from find() (or after an
                          # earlier unknown) must not let the next try submit without looking.
                          find_first=int(exc.outcome == "unknown" or bool(row.get("find_first"))))

    # -- rendering -------------------------------------------------------------------------

    def render(self, row: dict, now: float) -> bytes:
        doc = self.outbox.store.get_document(row["document_id"]) if row.get("document_id") else None
        if doc is None or not doc["xml"]:
            raise render.RenderError("no Referral Note stored for this referral")
        if self._fonts is None:
            self._fonts = find_fonts(self.config)
        return fax_pdf(self.config, doc["xml"], to_name=json.loads(doc["destination"] or "{}").get("name", ""),
                       to_fax=row["recipient"], referral_id=row["referral_id"] or "", now=now, fonts=self._fonts)

    # -- the gateway's answers -----------------------------------------------------------

    def poll(self, now: float) -> None:
        for row in self.outbox.polls_due(now, WAITING_STATES):
            route = self.route(row.get("channel"))
            if route is None or not getattr(route.gateway, "supports_status", True):
                self.outbox.update(row["id"], event="poll-skipped", at=iso_timestamp(now),
                                   detail="the gateway has no status query; waiting for callbacks",
                                   next_attempt_at=row["deadline"] or now + self.config.final_timeout)
                continue
            try:
                status = route.gateway.status(row["job_id"])
            except GatewayError as exc:
                self.outbox.update(row["id"], event="poll-failed", at=iso_timestamp(now),
                                   detail=f"{exc.outcome}: {exc}", next_attempt_at=now + self.config.poll_interval)
                continue
            self.apply_status(row, status, now, "poll")

    def apply_status(self, row: dict, status: GatewayStatus, now: float, source: str,
                     job: tuple[str, str] | None = None) -> Transition:
        """Move *row* by a status from a poll or a callback (stale ones are recorded and ignored)."""
        detail = f"{source}: {status.status.value}" + (f" ({status.detail})" if status.detail else "")
        fields: dict = {}
        if job is not None and not row.get("job_id"):
            fields.update(gateway=job[0], job_id=job[1], sent_at=now, deadline=now + self.config.final_timeout,
                          find_first=0)
        t = step(State(row["state"]), status_event(status.status))
        if t.state in WAITING:
            fields["next_attempt_at"] = now + self.config.poll_interval
        if "audit-same" in t.effects and source == "poll" and not job:
            # A poll that only confirms the state: no audit row every poll_interval for a day.
            self.outbox.reschedule(row["id"], fields["next_attempt_at"])
            return t
        return self._move(row, status_event(status.status), now, detail, transition=t, **fields)

    def check_timeouts(self, now: float) -> list[int]:
        rows = self.outbox.expired(now, ("fax",), states=WAITING_STATES)
        for row in rows:
            self._move(row, Event.TIMEOUT, now, f"no final status from {row['gateway']} job {row['job_id']} in "
                                                f"{self.config.final_timeout:.0f} s")
        return [r["id"] for r in rows]

    # -- callbacks -------------------------------------------------------------------------

    def parse_callback(self, channel: str, body: bytes, headers: dict[str, str]) -> tuple[str, Callback]:
        """(the route's ident, callback); GatewayError when the channel has no gateway or the body is refused."""
        if channel != "default" and self.channels and channel not in self.channels:
            raise GatewayError(f"no channel {channel!r}", "rejected")
        route = self.route("" if channel == "default" else channel)
        if route is None:
            raise GatewayError(f"no fax gateway for channel {channel!r}", "rejected")
        return route.ident, route.gateway.parse_callback(body, headers)

    def store_callback(self, channel: str, body: bytes, headers: dict[str, str], now: float) -> tuple[int, str]:
        """Keep a callback as received (refused ones too, marked so); returns (id, "" or why it was refused)."""
        at = iso_timestamp(now)
        try:
            gateway, cb = self.parse_callback(channel, body, headers)
        except GatewayError as exc:
            cid = self.outbox.save_callback(channel=channel, gateway="", body=body, at=at)
            self.outbox.update_callback(cid, applied_at=at, result=f"refused: {exc}")
            return cid, str(exc)
        cid = self.outbox.save_callback(channel=channel, gateway=gateway, body=body, at=at)
        self.outbox.update_callback(cid, job_id=cb.job_id, key=cb.key, status=cb.status.status.value,
                                    detail=cb.status.detail)
        return cid, ""

    def apply_callbacks(self, now: float) -> None:
        at = iso_timestamp(now)
        # received_at is an iso_timestamp (fixed width, UTC): older ones sort before this.
        given_up_before = iso_timestamp(now - self.config.final_timeout)
        for cb in self.outbox.pending_callbacks():
            row = self.outbox.by_job(cb["gateway"], cb["job_id"]) if cb["job_id"] else None
            if row is None and cb["key"]:
                row = self.outbox.by_key(cb["key"])
                if row is not None and row["job_id"] and row["job_id"] != cb["job_id"]:
                    row = None  # our key with another job id: not this attempt's fax
            if row is None:
                if cb["received_at"] < given_up_before:
                    self.outbox.update_callback(cb["id"], applied_at=at, result="no such job")
                continue  # it may have overtaken the submit answer: try again next tick
            status = GatewayStatus(Status(cb["status"]), cb["detail"] or "")
            t = self.apply_status(row, status, now, f"callback #{cb['id']}", job=(cb["gateway"], cb["job_id"]))
            self.outbox.update_callback(cb["id"], applied_at=at, outbox_id=row["id"],
                                        result="applied" if t.changed else "stale")

    # -- state changes ---------------------------------------------------------------------

    def _move(self, row: dict, event: Event, now: float, detail: str, *, transition: Transition | None = None,
              **fields) -> Transition:
        t = transition or step(State(row["state"]), event)
        if t.state.value != row["state"]:
            fields["state"] = t.state.value
        name = event.value.lower().replace("_", "-")
        if "audit-stale" in t.effects:
            name = "status-stale"
        elif "audit-same" in t.effects:
            name = "status-unchanged"
        if "ignore" in t.effects:
            name = "ignored-" + name
            fields = {}
        self.outbox.update(row["id"], event=name, at=iso_timestamp(now), detail=detail, **fields)
        if "alert" in t.effects:
            ref = row.get("referral_id") or ""
            self.log.warn("ALERT referral {ref}: fax to {to} FAILED: {why}", ref=ref, to=row["recipient"], why=detail)
            self.outbox.alert(kind="fax-failed", referral_id=ref, channel=row.get("channel"), at=iso_timestamp(now),
                              text=f"fax to {row['recipient']} failed: {detail}")
        return t


def find_fonts(config: FaxConfig) -> render.Fonts:
    return render.find_fonts([str(p) for p in config.font_dirs])


def fax_pdf(config: FaxConfig, cda: bytes, *, to_name: str, to_fax: str, referral_id: str, now: float,
            fonts: render.Fonts) -> bytes:
    """One referral's fax as the gateway gets it: the cover sheet from ``[fax]``, then the note (RenderError)."""
    cover = render.Cover(to_name=to_name, to_fax=to_fax, from_name=config.from_name, from_fax=config.from_fax,
                         callback=config.callback, referral_id=referral_id,
                         sent_at=iso_timestamp(now)[:16].replace("T", " "),
                         **({"notice": config.notice} if config.notice else {}))
    return render.render_pdf(cda, cover, fonts=fonts)


def _build(table: dict) -> FaxGateway:
    return load_gateway(table["gateway"], {k: v for k, v in table.items() if k != "gateway"})
