"""The recipient's side: a referral that arrived over Direct, recorded and handed to our EHR.

Runs on the Direct thread (with that thread's store), inside the transaction that marks the
mail processed, so a mail is either still ``received`` (opened again at the next tick) or its
referral is recorded *and* its hand-over to the EHR is in the outbox: nothing in between.

Invariants
----------
* The referral is kept under the initiator's id with ``side = recipient`` and ``partner`` =
  the sender's Direct address (where answers go), in the same states as ours: it opens
  DELIVERED (it reached us), and our EHR's answers move it on.
* The hand-over is one outbox row (transport ``mllp``, kind ``referral-in``, key
  ``<referral>/ehr/referral``) sent by the MLLP sender with its own ACK check and retries;
  a referral sent to us twice is recorded and forwarded once (the second is audited).
* No channel for the sender, or a package we cannot read: the mail goes to the work queue
  whole, with the reason, and a coordinator alert; never dropped, never guessed. ``replay``
  reads the kept content again with the configuration of the day and resolves the item only
  when the referral is recorded; one that still cannot be taken stays as it was (no new item).
* Logs carry referral ids and mail ids, never patient data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from twisted.logger import Logger

from ..config import EngineConfig
from ..loop.correlate import referral_keys
from ..loop.inbound import InboundReferral
from ..loop.states import Event, Kind
from ..loop.tracker import iso
from ..store import Store
from ..store.loop import Loop
from ..store.outbox import Outbox
from ..store.relay import RECIPIENT, Relay
from .direct import write_atomic
from .ingest import hl7_timestamp


PARKED_TYPE = "referral (Direct)"   # the work queue's message type of a referral parked here


class InboundReferrals:
    log = Logger()

    def __init__(self, config: EngineConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.loop = Loop(store)
        self.channels = [c for c in config.channels if c.inbound]

    def channel_for(self, sender: str):
        return next((c for c in self.channels if c.takes_from(sender)), None)

    def receive(self, ref: InboundReferral, *, sender: str, mail_id: int, raw: bytes, now: float) -> str:
        """Record *ref* and queue its hand-over to our EHR; returns what happened, for the log."""
        at = iso(dt.datetime.fromtimestamp(now, dt.timezone.utc))
        origin = f"mail #{mail_id}"
        channel, message, why = self._checked(ref, sender, now)
        if why:
            item = self.loop.park(at=at, origin=origin, message_type=PARKED_TYPE,
                                  keys=(("referral", ref.referral_id),) if ref.referral_id else (), reason=why,
                                  raw=raw)
            self.loop.alert(key=f"inbound/{mail_id}", kind="inbound-referral-parked", at=at,
                            owner=self.config.loop.owner_for("", "", ""), referral_id=None,
                            text=f"a referral from {sender} (mail #{mail_id}) waits in the work queue "
                                 f"#{item}: {why}")
            self.log.warn("ALERT inbound referral in mail #{mid} parked in the work queue #{item}: {why}",
                          mid=mail_id, item=item, why=why)
            return f"parked #{item}"
        return self._record(ref, channel, message, sender=sender, mail_id=mail_id, at=at, now=now)

    def replay(self, item: dict, *, now: float, by: str) -> tuple[bool, str]:
        """A parked referral (``receive`` could not take it) read again from the content it kept, with
        today's configuration (a channel added for its sender, a documents directory made): recorded
        and queued, and the item resolved; else (False, why) and the item stays open as it was. The
        sender is the one its mail was opened from."""
        from ..loop.inbound import read_inbound
        from .direct import _attachments   # the Direct layer's own unpacking (XDM or attachments)

        mail_id = int(item["origin"].removeprefix("mail #"))
        sender = (Outbox(self.store).get_mail(mail_id) or {}).get("from_address") or ""
        ref = read_inbound(_attachments(item["raw"] or b""), local_root=self.config.local_root)
        channel, message, why = self._checked(ref, sender, now)
        if why:
            return False, why
        at = iso(dt.datetime.fromtimestamp(now, dt.timezone.utc))
        with self.store.atomic():
            what = self._record(ref, channel, message, sender=sender, mail_id=mail_id, at=at, now=now)
            self.loop.resolve(item["id"], at=at, by=by, resolution=f"replayed: {what}", referral_id=ref.referral_id)
        return True, what

    def _checked(self, ref: InboundReferral, sender: str, now: float):
        """(channel, the message for our EHR, '') when *ref* can be taken, else (.., .., why not)."""
        channel = self.channel_for(sender)
        problems = list(ref.problems)
        message = None
        if channel is None:
            problems.append(f"no channel takes referrals from {sender} (source.direct)")
        elif not problems and ref.referral_id and self.loop.get(ref.referral_id) is not None:
            return channel, None, ""   # recorded already: _record says so; its document is not touched
        elif not problems and ref.referral_id:
            try:
                message = self._forward_message(ref, channel.forward, now)
            except ValueError as exc:   # ReferralNoteError, ForwardError: what our EHR could not be given
                problems.append(f"cannot be handed to our EHR as {channel.forward.message}: {exc}")
            except OSError as exc:      # reference mode: the document could not be kept where the EHR reads it
                problems.append(f"cannot be handed to our EHR: the C-CDA cannot be kept in "
                                f"{channel.forward.documents_dir}: {exc.strerror or exc}")
        if problems or not ref.referral_id or message is None:
            return channel, None, "; ".join(problems) or "no referral id"
        return channel, message, ""

    def _record(self, ref: InboundReferral, channel, message: bytes | None, *, sender: str, mail_id: int, at: str,
                now: float) -> str:
        origin = f"mail #{mail_id}"
        fwd = channel.forward
        with self.store.atomic():
            created = self.loop.open_referral(
                ref.referral_id, at=at, channel=channel.name, destination=sender,
                veterinary=ref.veterinary, contact={**ref.facts, "patient_cx": ref.patient_cx,
                                                    "patient_ids": ref.patient_ids,
                                                    "patient_name": ref.patient_name,
                                                    "referral_ei": ref.referral_ei, "mail_id": mail_id},
                actor="direct", source=origin, owner=self.config.loop.owner_for(channel.name, "", ""),
                # Indexed as LoopService indexes a referral we sent (same strengths: a bare id shared
                # with one of ours is ambiguous, never a guess): our EHR's answer may drop the root.
                keys=[(k, i + 1) for i, k in enumerate(referral_keys(ref.referral_id)) if k != ref.referral_id])
            if not created:
                self.loop.alert(key=f"inbound/{mail_id}/again", kind="inbound-referral-again", at=at,
                                owner=self.config.loop.owner_for(channel.name, "", ""), referral_id=ref.referral_id,
                                text=f"referral {ref.referral_id} arrived again (mail #{mail_id}): recorded once")
                return "already recorded"
            Relay(self.store).set_side(ref.referral_id, RECIPIENT, sender, at=at)
            # It reached us: sent and delivered, from the recipient's view.
            self.loop.apply(ref.referral_id, [Event(Kind.SENT, at, source=origin),
                                              Event(Kind.DELIVERED, at, source=origin)],
                            at=at, actor="direct", origin=origin)
            Outbox(self.store).enqueue(
                key=f"{ref.referral_id}/ehr/referral", referral_id=ref.referral_id, document_id=None,
                channel=channel.name, transport="mllp", kind="referral-in", sender=fwd.sending_application,
                recipient=fwd.endpoint, message_id=self._control_id(ref), payload=message, at=at, now=now,
                detail=f"{fwd.message} to our EHR ({fwd.cda} C-CDA)")
        self.log.info("referral {ref} received by Direct (mail #{mid}): queued for our EHR as {type}",
                      ref=ref.referral_id, mid=mail_id, type=fwd.message)
        return f"referral {ref.referral_id} recorded, queued for the EHR"

    @staticmethod
    def _control_id(ref: InboundReferral) -> str:
        return "HRF" + hashlib.sha256(ref.referral_id.encode()).hexdigest()[:16].upper()

    def _forward_message(self, ref: InboundReferral, fwd, now: float) -> bytes:
        from ..v2.forward import build_forward

        reference = ""
        if fwd.cda == "reference" and ref.cda is not None:
            path = self._keep_document(ref, fwd)
            reference = fwd.reference_url.format(path=path.as_posix(), referral=ref.referral_id, file=path.name)
        return build_forward(cda=ref.cda or b"", order=ref.order, message=fwd.message, cda_mode=fwd.cda,
                             reference=reference, control_id=self._control_id(ref), now_hl7=hl7_timestamp(now),
                             sending=(fwd.sending_application, fwd.sending_facility),
                             receiving=(fwd.receiving_application, fwd.receiving_facility),
                             local_root=self.config.local_root)

    def _keep_document(self, ref: InboundReferral, fwd) -> Path:
        """The C-CDA where the EHR can fetch it (reference mode): written whole before it is named."""
        safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in ref.referral_id)
        target = Path(fwd.documents_dir).resolve() / safe / "referral-note.xml"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, ref.cda or b"")
        return target
