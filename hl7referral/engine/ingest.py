"""The inbound path of one listener: triage, build the ACK, commit, reply.

Invariants
----------
* Commit, then ACK: the reply Deferred fires with ACK bytes only after the
  committer has committed the frame (raw bytes and summary). If the commit
  fails the reply is AR/207 (``on_store_failure = "nak"``) or no ACK at all
  (``"silent"``), never a positive ACK.
* Every frame is committed, whatever it is (accepted, rejected, not HL7, the
  head of an oversized frame): nothing a sender sent is lost.
* A duplicate (same MSH-3/4/10, same bytes) gets the stored ACK byte for byte;
  the same key with other bytes gets AE/205 and the original stays as it was.
* Logs carry control ids, types and peers, never message content.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import time
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..store import ACCEPTED, NOT_HL7, REJECTED, Inbound, Outcome
from ..v2.ack import build_ack, fallback_ack, response_code
from ..v2.charset import codec_for, UnknownCharset
from ..v2.header import BrokenHeader, NotHL7, read_header
from ..v2.triage import Policy, Problem, Triage, triage
from .committer import GroupCommitter


@dataclass(frozen=True, slots=True)
class Reply:
    ack: bytes | None
    close: bool = False


class AckIds:
    """Control ids for our ACKs: a per-process random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = "A" + secrets.token_hex(3).upper()
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n}"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(second))


def hl7_timestamp(seconds: float) -> str:
    return _utc_second(int(seconds), "%Y%m%d%H%M%S+0000")


def iso_timestamp(seconds: float) -> str:
    ms = int((seconds % 1) * 1000)
    return f"{_utc_second(int(seconds), '%Y-%m-%dT%H:%M:%S')}.{ms:03d}Z"


class Ingest:
    log = Logger()

    def __init__(self, name: str, policy: Policy, committer: GroupCommitter, clock,
                 on_store_failure: str = "nak", ack_ids: AckIds | None = None, trace: bool = True,
                 processor=None, after_mapping: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.policy = policy
        self.committer = committer
        self.clock = clock
        self.on_store_failure = on_store_failure
        self.ids = ack_ids or AckIds()
        # Building a filtered-out log event still costs microseconds per message.
        self.trace = trace
        self.processor = processor  # builds documents; None when no channel has a mapping
        self.after_mapping = after_mapping  # channels whose ACK waits for the mapping check
        self.counts = dict(accepted=0, rejected=0, duplicate=0, conflict=0, not_hl7=0, store_failed=0)

    # -- frames ------------------------------------------------------------

    def receive(self, payload: bytes, peer: str) -> "Deferred[Reply]":
        now = self.clock.seconds()
        t = triage(payload, self.policy)
        if t.not_hl7 is not None:
            self.counts["not_hl7"] += 1
            self.log.warn("not HL7 from {peer} ({size} bytes): {reason}; no ACK, closing",
                          peer=peer, size=len(payload), reason=t.not_hl7)
            record = Inbound(raw=payload, received_at=iso_timestamp(now), status=NOT_HL7,
                             listener=self.name, peer=peer, error=t.not_hl7)
            d = self.committer.submit(record)
            d.addErrback(lambda _: None)
            return d.addCallback(lambda _: Reply(None, close=True))
        if t.accepted and self.processor is not None and t.channel in self.after_mapping:
            # ACK after mapping: a referral missing a required field is refused
            # now (AE naming the field), not parked after an AA.
            d = self.processor.premap(t.channel, payload, t.codec)
            d.addCallbacks(self._mapped, self._premap_failed, callbackArgs=(t, payload, now, peer),
                           errbackArgs=(t, payload, now, peer))
            return d
        return self._commit(t, payload, now, peer)

    def _mapped(self, missing, t: Triage, payload: bytes, now: float, peer: str) -> "Deferred[Reply]":
        if missing:
            problems = tuple(Problem(101, m.segment or "MSH", m.field, m.text) for m in missing)
            t = dataclasses.replace(t, code="AE", errors=problems)
        return self._commit(t, payload, now, peer)

    def _premap_failed(self, failure, t: Triage, payload: bytes, now: float, peer: str) -> "Deferred[Reply]":
        # The mapping itself broke (a plugin function, say): the message is fine as
        # far as the sender can know, so store and acknowledge it; the document
        # step parks it with the error and an alert.
        self.log.failure("mapping check for {cid} failed; storing it for the document step", failure,
                         cid=t.header.control_id)
        return self._commit(t, payload, now, peer)

    def _commit(self, t: Triage, payload: bytes, now: float, peer: str) -> "Deferred[Reply]":
        code = response_code(t.header, t.code)
        ack = self._ack(t, code, t.errors, now)
        record = self._record(t, payload, now, peer, ack, code)
        d = self.committer.submit(record)
        d.addCallbacks(self._stored, self._store_failed, callbackArgs=(t, payload), errbackArgs=(t, now))
        return d

    def oversized(self, prefix: bytes, limit: int, peer: str) -> "Deferred[Reply]":
        """A frame passed ``max_frame_bytes``: AE/104 if MSH is readable, then close."""
        now = self.clock.seconds()
        problem = Problem(104, "MSH", 0, f"message exceeds the {limit}-byte limit of this listener")
        try:
            header = read_header(prefix)
            codec = codec_for(header.charset, self.policy.default_charset)
        except (NotHL7, BrokenHeader, UnknownCharset):
            header, codec = None, "ascii"
        self.log.warn("frame over {limit} bytes from {peer} (control id {cid}); closing",
                      limit=limit, peer=peer, cid=header.control_id if header else "?")
        t = Triage("AE", header, (problem,), codec=codec)
        code = response_code(header, "AE") if header else None
        ack = self._ack(t, code, t.errors, now) if header else None
        record = self._record(t, prefix, now, peer, ack, code)
        record.error = f"frame over {limit} bytes; only its first {len(prefix)} bytes are kept"
        d = self.committer.submit(record)
        d.addCallbacks(lambda o: Reply(o.ack, close=True), lambda _: Reply(None, close=True))
        return d

    # -- helpers -----------------------------------------------------------

    def _ack(self, t: Triage, code: str | None, errors, now: float) -> bytes | None:
        if code is None:
            return None
        if t.header is None:
            return fallback_ack(self.ids.next(), hl7_timestamp(now), code, errors)
        return build_ack(t.header, code, errors, control_id=self.ids.next(),
                         timestamp=hl7_timestamp(now), codec=t.codec)

    def _record(self, t: Triage, payload: bytes, now: float, peer: str,
                ack: bytes | None, code: str | None) -> Inbound:
        h = t.header
        record = Inbound(
            raw=payload, received_at=iso_timestamp(now),
            status=ACCEPTED if t.accepted else REJECTED,
            listener=self.name, peer=peer, channel=t.channel,
            sending_application=h.sending_application if h else "",
            sending_facility=h.sending_facility if h else "",
            message_type=h.type_and_event if h else "",
            control_id=h.control_id if h else "",
            referral_id=t.referral_id, charset=t.codec,
            # ASCII text is the raw bytes again: the store derives it on read.
            text=None if payload.isascii() else t.text,
            ack=ack, ack_code=code,
            error="; ".join(f"{p.code} {p.location}: {p.text}" for p in t.errors),
        )
        if h is not None and t.accepted:
            record.conflict_ack = lambda original_id: self._conflict_ack(t, original_id, now)
        return record

    def _conflict_ack(self, t: Triage, original_id: int, now: float) -> tuple[bytes | None, str | None]:
        code = response_code(t.header, "AE")
        problem = Problem(205, "MSH", 10, f"control id {t.header.control_id} was already used for a "
                                          f"different message (stored as #{original_id})")
        return self._ack(t, code, (problem,), now), code

    def _stored(self, outcome: Outcome, t: Triage, payload: bytes = b"") -> Reply:
        h = t.header
        if outcome.kind == "duplicate":
            self.counts["duplicate"] += 1
            self.log.info("duplicate {type} {cid} from {app}: replaying stored ACK of #{id}",
                          type=h.type_and_event, cid=h.control_id, app=h.sending_application, id=outcome.message_id)
        elif outcome.kind == "conflict":
            self.counts["conflict"] += 1
            self.log.warn("ALERT conflict: {type} {cid} reuses a control id with different content "
                          "(kept as #{id}, AE/205)", type=h.type_and_event, cid=h.control_id, id=outcome.message_id)
        elif t.accepted:
            self.counts["accepted"] += 1
            if self.processor is not None:
                self.processor.submit(outcome.message_id, t.channel, payload, t.codec)
            if self.trace:
                self.log.debug("stored #{id} {type} {cid} -> {channel}", id=outcome.message_id,
                               type=h.type_and_event, cid=h.control_id, channel=t.channel)
        else:
            self.counts["rejected"] += 1
            first = t.errors[0]
            self.log.warn("rejected #{id} {type} {cid}: {code} {loc} {text}", id=outcome.message_id,
                          type=h.type_and_event if h else "?", cid=h.control_id if h else "?",
                          code=first.code, loc=first.location, text=first.text)
        return Reply(outcome.ack)

    def _store_failed(self, failure, t: Triage, now: float) -> Reply:
        self.counts["store_failed"] += 1
        self.log.error("store failed for {type} {cid}: {error}", type=t.header.type_and_event if t.header else "?",
                       cid=t.header.control_id if t.header else "?", error=failure.getErrorMessage())
        if self.on_store_failure == "silent":
            return Reply(None, close=True)
        problem = Problem(207, "MSH", 0, "message not stored (store unavailable); send it again later")
        code = response_code(t.header, "AR")
        return Reply(self._ack(t, code, (problem,), now))


def policy_for(listener, channels) -> Policy:
    routes: dict[str, list] = {}
    for ch in channels:
        for kind in ch.accept:
            routes.setdefault(kind, []).append((tuple(ch.sending_facilities), ch.name))
    # Facility-specific routes before catch-alls.
    ordered = {k: tuple(sorted(v, key=lambda fc: not fc[0])) for k, v in routes.items()}
    return Policy(ordered, frozenset(listener.versions), frozenset(listener.processing_ids),
                  listener.default_charset)
