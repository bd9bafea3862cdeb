"""Our EHR over outbound MLLP, from a durable outbox: the note back to the referring chart, and
(on the specialist's side) the referrals that arrived over Direct.

A consult note that arrives for a known referral becomes one outbox row (transport ``mllp``,
kind ``consult-note``, message id = the MDM's MSH-10). This service sends due rows through
an :class:`~hl7referral.engine.mllp_client.MLLPSender` and records each answer; the
outbox's own hook turns a DELIVERED consult note into the referral's NOTE_FILED event,
which closes the loop (state CLOSED), in the same transaction.

Without ``[loop.return] endpoint`` the note cannot be carried back: a "file the note" task
goes to the referral's owner, and marking it done files the note (CLOSED).

Invariants
----------
* Nothing is delivered without its own ACK: only an ``accept`` whose MSA-2 equals the row's
  control id marks the row DELIVERED (the sender's guarantee); AE/AR mark it FAILED with a
  coordinator alert (the EHR refused it: sending the same bytes again will not help);
  timeouts and dropped connections retry with backoff, then FAILED with an alert.
* The MDM for a note is built once (idempotency key ``referral/mllp/note-N``): every
  retry sends the same bytes with the same MSH-10, so a receiver's dedup recognises it.
* One send per row at a time; store writes go through the committer.
* Every ``mllp`` row goes to its own ``recipient`` endpoint, with that endpoint's settings:
  ``[loop.return]`` for consult notes, the inbound channel's ``[forward]`` for referrals that
  arrived over Direct (kind ``referral-in``). A referral the EHR refuses (AE/AR) or never
  ACKs is FAILED with a coordinator alert, like a note.
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..config import EngineConfig
from ..store.loop import Loop
from ..store.outbox import Outbox
from ..store.relay import RECIPIENT, Relay
from ..v2.ack_match import ACCEPT
from ..v2.answers import ei_from_key
from ..v2.mdm import MDM_TRIGGERS, ConsultNote, build_mdm_t02
from .ingest import hl7_timestamp, iso_timestamp
from .mllp_client import MLLPSender, SendFailed

TICK = 1.0


def note_key(referral_id: str, note_id: int) -> str:
    """The outbox idempotency key of a note's way back to the chart."""
    return f"{referral_id}/mllp/note-{note_id}"


def chart_document(note_id: int) -> str:
    """The note's number in the chart (its MDM's MSH-10 and, unless it revises one, its TXA-12)."""
    return f"HRN{note_id}"


def revision_in_chart(loop: Loop, outbox: Outbox, referral_id: str, note: dict) -> tuple[str, str, str]:
    """(MDM trigger, TXA-12, TXA-13) of *note* as the referring chart must see it.

    The chart knows the documents we sent it as ``HRN<note id>``. A revision from the specialist
    (T04 status change: the same TXA-12; T06/T08/T10: TXA-13 names the revised one) goes back as
    that revision of the document the chart holds; one whose document the chart never had from us
    (not kept here, or never sent back) goes as an original (T02), the only thing it can file.
    """
    own = chart_document(note["id"])
    revision = note.get("revision") or ""
    if revision not in MDM_TRIGGERS or revision == "T02":
        return "T02", own, ""
    held = None
    # T04 keeps its document's TXA-12; T06/T08/T10 name the revised one in TXA-13, though an edit
    # (T08) is often sent under the same TXA-12 without it: then that is the document revised.
    keys = [note["document_id"]] if revision == "T04" else [note["parent_document_id"], note["document_id"]]
    for key in filter(None, keys):
        held = _chart_id(loop, outbox, referral_id, loop.note_by_document(referral_id, key, before=note["id"]))
        if held is not None:
            break
    if held is None:
        return "T02", own, ""
    return (revision, held, "") if revision == "T04" else (revision, own, held)


def _chart_id(loop: Loop, outbox: Outbox, referral_id: str, note: dict | None, depth: int = 0) -> str | None:
    """The TXA-12 the chart holds for *note* (as :func:`revision_in_chart` sent it); None when we
    never sent it back."""
    row = outbox.by_key(note_key(referral_id, note["id"])) if note is not None else None
    if row is None or row["state"] == "FAILED":   # never sent back, or the chart refused it
        return None
    if note.get("revision") == "T04" and depth < 100:   # a status change is the document it changed
        earlier = loop.note_by_document(referral_id, note["document_id"], before=note["id"])
        held = _chart_id(loop, outbox, referral_id, earlier, depth + 1)
        if held is not None:
            return held
    return chart_document(note["id"])


def patient_fields(raw: bytes, codec: str) -> dict[str, str]:
    """PID-3 and PID-5 of the referral as the referring EHR sent them (ER7, unchanged): its own ids."""
    import hl7
    try:
        message = hl7.parse(raw.decode(codec, "replace").replace("\r\n", "\r").replace("\n", "\r"))
        pid = message.segment("PID")
    except (KeyError, IndexError, hl7.exceptions.ParseException, ValueError):
        return {}
    return {"ids": str(pid(3)) if len(pid) > 3 else "", "name": str(pid(5)) if len(pid) > 5 else ""}


class ReturnService(MultiService):
    log = Logger()

    def __init__(self, config: EngineConfig, committer, reactor, *, clock=None, interval: float = TICK) -> None:
        super().__init__()
        self.config = config
        self.leg = config.loop.return_leg
        self.committer = committer
        self.reactor = reactor
        self.clock = clock or reactor
        self.sender = None
        self.senders: dict[str, MLLPSender] = {}
        # endpoint -> (ack timeout, max attempts, first delay, max delay)
        self.settings = {c.forward.endpoint: (c.forward.ack_timeout, c.forward.max_attempts, self.leg.first_delay,
                                              self.leg.max_delay) for c in config.channels if c.inbound}
        if self.leg.endpoint:
            self.settings[self.leg.endpoint] = (self.leg.ack_timeout, self.leg.max_attempts, self.leg.first_delay,
                                                self.leg.max_delay)
        for endpoint, (ack_timeout, *_) in self.settings.items():
            sender = MLLPSender(endpoint, reactor, ack_timeout=ack_timeout,
                                name="return" if endpoint == self.leg.endpoint else "ehr")
            sender.setServiceParent(self)
            self.senders[endpoint] = sender
        self.sender = self.senders.get(self.leg.endpoint) if self.leg.endpoint else None
        self.timer = LoopingCall(self.tick)
        self.timer.clock = self.clock
        self.interval = interval
        self._sending: set[int] = set()
        self.counts = dict(delivered=0, retry=0, failed=0)

    def startService(self) -> None:
        super().startService()
        if self.senders:
            self.timer.start(self.interval, now=True)

    def stopService(self):
        if self.timer.running:
            self.timer.stop()
        return super().stopService()

    # -- a note in -------------------------------------------------------------------------

    def on_note(self, referral_id: str, note_id: int):
        """A consult note for *referral_id* was kept: queue its way back (or a task to file it)."""
        now = self.clock.seconds()
        d = self.committer.run(lambda store: self._enqueue(store, referral_id, note_id, now))
        d.addCallback(lambda how: self.log.info("referral {ref}: consult note #{nid} {how}", ref=referral_id,
                                                nid=note_id, how=how))
        d.addErrback(lambda f: self.log.failure("queueing note #{nid} for its way back", f, nid=note_id))
        if self.sender is not None:
            d.addCallback(lambda _: self.tick())
        return d

    def on_forward(self) -> None:
        """A referral for our EHR was queued (Direct thread): send it now rather than at the next tick."""
        if self.senders:
            self.tick()

    def _enqueue(self, store, referral_id: str, note_id: int, now: float) -> str:
        loop = Loop(store)
        at = iso_timestamp(now)
        row = loop.get(referral_id) or {}
        if row.get("side") == RECIPIENT:
            # Our own specialist's note about a referral sent to us: it goes to the initiator over
            # Direct (engine/answering.py), not into a referring chart here.
            return "sent to the initiator by Direct"
        if self.sender is None:
            loop.add_task(key=f"{referral_id}/file-note/{note_id}", at=at, referral_id=referral_id, kind="file-note",
                          owner=self.config.loop.owner_of(row),
                          text=f"File consult note #{note_id} in the referring chart (no return interface is "
                               f"configured); marking this done closes the referral")
            return "needs filing by hand (task)"
        note = loop.note(note_id)
        original = store.get_message(row["message_id"]) if row.get("message_id") else None
        pid = patient_fields(original["raw"], original.get("charset") or "ascii") if original else {}
        fmt_text = note["format"] == "text"
        control_id = chart_document(note_id)
        trigger, unique, parent = revision_in_chart(loop, Outbox(store), referral_id, note)
        mdm = build_mdm_t02(
            ConsultNote(referral_id=ei_from_key(referral_id), unique_document_id=unique, parent_document_id=parent,
                        title=note["title"] or "Consult note",
                        text=note["content"].decode("utf-8", "replace") if fmt_text else None,
                        document=None if fmt_text else note["content"],
                        media_type=None if fmt_text else (note["media_type"] or "application/octet-stream"),
                        patient_ids=pid.get("ids", ""), patient_name=pid.get("name", "")),
            control_id=control_id, now_hl7=hl7_timestamp(now),
            sending=(self.leg.sending_application, self.leg.sending_facility),
            receiving=(self.leg.receiving_application, self.leg.receiving_facility), version=self.leg.version,
            trigger=trigger)
        what = f"consult note #{note_id}" + (f", {trigger} of {parent or unique}" if trigger != "T02" else "")
        Outbox(store).enqueue(key=note_key(referral_id, note_id), referral_id=referral_id, document_id=None,
                              channel=row.get("channel") or "", transport="mllp", kind="consult-note",
                              sender=self.leg.sending_application, recipient=self.leg.endpoint,
                              message_id=control_id, payload=mdm, at=at, now=now, detail=what)
        return f"queued as MDM^{trigger} {control_id}"

    # -- sending ------------------------------------------------------------------------------

    def tick(self):
        now = self.clock.seconds()
        d = self.committer.run(lambda store: Outbox(store).due(now, transports=("mllp",), in_order=("consult-note",)))
        d.addCallback(self._send_all)
        d.addErrback(lambda f: self.log.failure("return leg", f))
        return d

    def _send_all(self, rows: list[dict]) -> None:
        for row in rows:
            if row["id"] in self._sending:
                continue
            sender = self.senders.get(row["recipient"])
            if sender is None:
                continue   # an endpoint no longer configured: the row waits (listed by `direct outbox`)
            self._sending.add(row["id"])
            d = sender.send(row["message_id"], row["payload"])
            d.addCallbacks(self._answered, self._failed, callbackArgs=(row,), errbackArgs=(row,))
            d.addErrback(lambda f: self.log.failure("recording the answer to {cid}", f, cid=row["message_id"]))
            d.addBoth(lambda _, rid=row["id"]: self._sending.discard(rid))

    def _answered(self, ack, row: dict):
        now = self.clock.seconds()
        at = iso_timestamp(now)
        ref, cid = row["referral_id"], row["message_id"]
        if ack.kind == ACCEPT and row["kind"] != "consult-note":
            self.counts["delivered"] += 1
            self.log.info("referral {ref}: {kind} {cid} taken by our EHR ({code})", ref=ref, kind=row["kind"],
                          cid=cid, code=ack.code)

            def taken(store):
                with store.atomic():
                    Outbox(store).update(row["id"], event="ack", at=at, detail=f"MSA-1 {ack.code}", state="DELIVERED",
                                         attempts=row["attempts"] + 1, last_code=None, last_error="")
                    side = Relay(store).side_of(ref) if row["kind"] == "referral-in" else None
                    if side is not None and side.partner:
                        # Our EHR has it: the initiator's dispatched MDN (final delivery) is owed now.
                        Relay(store).add(key=f"{ref}/DISPATCHED", at=at, referral_id=ref, kind="DISPATCHED",
                                         message_type="", message=None, document=None, recipient=side.partner,
                                         actor="ehr")
            return self.committer.run(taken)
        if ack.kind == ACCEPT:
            self.counts["delivered"] += 1
            self.log.info("referral {ref}: consult note {cid} filed in the referring chart ({code})", ref=ref,
                          cid=cid, code=ack.code)

            def delivered(store):
                with store.atomic():
                    Outbox(store).update(row["id"], event="ack", at=at, detail=f"MSA-1 {ack.code}", state="DELIVERED",
                                         attempts=row["attempts"] + 1, last_code=None, last_error="")
                    note_id = int(row["idempotency_key"].rsplit("note-", 1)[1])
                    Loop(store).note_returned(note_id, at)
            return self.committer.run(delivered)
        self.counts["failed"] += 1
        who = "the referring EHR" if row["kind"] == "consult-note" else "our EHR"
        why = f"{who} answered {ack.code}: {ack.error or 'refused'}"
        self.log.warn("ALERT referral {ref}: {kind} {cid} refused ({code})", ref=ref, kind=row["kind"], cid=cid,
                      code=ack.code)
        return self.committer.run(lambda store: self._fail(store, row, at, why))

    def _failed(self, failure, row: dict):
        failure.trap(SendFailed)
        now = self.clock.seconds()
        at = iso_timestamp(now)
        attempts = row["attempts"] + 1
        why = str(failure.value.reason if hasattr(failure.value, "reason") else failure.value)
        _, max_attempts, first_delay, max_delay = self.settings[row["recipient"]]
        if attempts >= max_attempts:
            self.counts["failed"] += 1
            self.log.warn("ALERT referral {ref}: {kind} {cid} not delivered after {n} attempts",
                          ref=row["referral_id"], kind=row["kind"], cid=row["message_id"], n=attempts)
            return self.committer.run(lambda store: self._fail(store, row, at, f"{why} ({attempts} attempts)"))
        delay = min(max_delay, first_delay * 2 ** (attempts - 1))
        self.counts["retry"] += 1
        return self.committer.run(lambda store: Outbox(store).update(
            row["id"], event="send-failed", at=at, detail=why, state="RETRY_WAIT", attempts=attempts,
            next_attempt_at=now + delay, last_error=why))

    def _fail(self, store, row: dict, at: str, why: str) -> None:
        with store.atomic():
            Outbox(store).update(row["id"], event="failed", at=at, detail=why, state="FAILED",
                                 attempts=row["attempts"] + 1, last_error=why)
            loop = Loop(store)
            owner = self.config.loop.owner_of(loop.get(row["referral_id"]) or {})
            kind = "note-return-failed" if row["kind"] == "consult-note" else f"{row['kind']}-failed"
            loop.alert(key=f"{row['idempotency_key']}/failed", kind=kind, text=why, at=at, owner=owner,
                       referral_id=row["referral_id"], channel=row["channel"])
