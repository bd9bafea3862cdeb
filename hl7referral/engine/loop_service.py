"""The loop tracker in the running engine: loop messages applied, referrals opened, timers run.

Everything the tracker writes goes through the committer (the store's one writer), so a loop
event never races a referral's commit; the timers run on the injected clock, so tests drive
them with ``twisted.internet.task.Clock``.

Invariants
----------
* Commit, then apply: a loop message (SIU, OSU, RRI, MDM) is ACKed once its bytes are on
  disk; it is applied afterwards and marked ``applied_at`` in the same transaction as its
  effects, so a crash in between re-applies it at the next start (and applying is
  idempotent), never loses it. Messages waiting while a batch is applied share the next
  transaction; if a batch fails, each of its messages is tried alone.
* What names no referral goes to the work queue whole, with the reason (tracker.py).
* A referral held for prior authorization is not handed to a transport; once approved
  (CLI, inbound message) the timer tick releases it.
* Logs carry referral ids, message ids and control ids, never patient data.
"""

from __future__ import annotations

import datetime as dt

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..config import EngineConfig
from ..loop import correlate
from ..loop.reread import observation_of
from ..loop.tracker import Tracker, iso, referral_facts
from ..store import Store
from . import answering

RECOVERY_BATCH = 500
BATCH = 256            # loop messages applied in one transaction at most


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


class LoopService(Service):
    log = Logger()

    def __init__(self, config: EngineConfig, committer, store: Store, reactor, *, clock=None, render=None) -> None:
        self.config = config
        self.committer = committer
        self.reactor = reactor
        self.clock = clock or reactor
        self.channels = frozenset(c.name for c in config.channels if c.tracker)
        self.tracker = Tracker(store, config.loop, render=render, reader=self.reread)   # only on the writer thread
        self.timers = LoopingCall(self.tick)
        self.timers.clock = self.clock
        self.on_release = None     # (referral_id) -> None: hand a referral released from its hold to a transport
        self.on_note = None        # (referral_id, note_id) -> None: a consult note to take back to the chart
        self.counts = dict(applied=0, parked=0, acted=0)
        self._queued: set[int] = set()
        self._pending: list = []     # (message id, raw, codec, Deferred, alone) waiting for the next batch
        self._busy = False

    def reread(self, item: dict):
        return observation_of(item["origin"] or "", item["raw"] or b"", osu_tables=self.config.loop.osu,
                              zone=self.config.loop.calendar.zone, local_root=self.config.local_root)

    def now(self) -> dt.datetime:
        return utc(self.clock.seconds())

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._recover()
        self.timers.start(self.config.loop.timer_interval, now=True)

    def stopService(self):
        if self.timers.running:
            self.timers.stop()
        return super().stopService()

    def _recover(self) -> Deferred:
        if not self.channels:
            return succeed(None)
        d = self.committer.run(lambda store: self.tracker.loop.unapplied(sorted(self.channels), RECOVERY_BATCH))

        def resubmit(rows):
            if rows:
                self.log.info("applying {n} loop message(s) received but not yet applied", n=len(rows))
            for row in rows:
                self.submit(row["id"], row["channel"], row["raw"], row["charset"] or "ascii")
            if len(rows) >= RECOVERY_BATCH:
                self._recover()
        return d.addCallback(resubmit)

    # -- loop messages -------------------------------------------------------------------

    def submit(self, message_id: int, channel: str, raw: bytes, codec: str = "ascii") -> Deferred | None:
        """An accepted message of a tracker channel, committed: apply it (on the writer thread).

        Messages that arrive while a batch is being applied share the next one: one transaction
        (one fsync) for all of them, as the committer does for inbound messages.
        """
        if channel not in self.channels or message_id in self._queued:
            return None
        self._queued.add(message_id)
        d = Deferred()
        self._pending.append((message_id, raw, codec, d, False))
        self._pump()
        return d

    def _pump(self) -> None:
        if self._busy or not self._pending:
            return
        alone = self._pending[0][4]
        size = 1 if alone else BATCH
        batch, self._pending = self._pending[:size], self._pending[size:]
        self._busy = True
        job = self.committer.run(lambda store: self._apply_batch(store, batch))
        job.addCallbacks(self._batch_done, self._batch_failed, callbackArgs=(batch,), errbackArgs=(batch,))
        job.addBoth(self._next)

    def _next(self, _) -> None:
        self._busy = False
        self._pump()

    def _apply_batch(self, store: Store, batch) -> list:
        with store.atomic():
            return [self._apply(message_id, raw, codec) for message_id, raw, codec, _, _ in batch]

    def _batch_done(self, results, batch) -> None:
        for (message_id, _, _, d, _), result in zip(batch, results):
            self._applied(result, message_id)
            d.callback(result)

    def _batch_failed(self, failure, batch) -> None:
        if len(batch) > 1:
            # One message must not hold up the others: apply each on its own.
            self._pending[:0] = [(m, r, c, d, True) for m, r, c, d, _ in batch]
            return
        message_id, _, _, d, _ = batch[0]
        self._failed(failure, message_id)
        d.callback(None)

    def _apply(self, message_id: int, raw: bytes, codec: str):
        origin = f"message #{message_id}"
        obs = observation_of(origin, raw, codec=codec, osu_tables=self.config.loop.osu,
                             zone=self.config.loop.calendar.zone, local_root=self.config.local_root)
        now = self.now()
        at = iso(now)
        loop = self.tracker.loop
        with loop.store.atomic():
            out = self.tracker.observe(obs, now=now, origin=origin, raw=raw)
            if out.referral_id is not None and out.added:
                # A referral sent to us: our EHR's answer is owed to the initiator (or our cancel to the
                # recipient), in this transaction (engine/answering.py).
                answering.owe_from_ehr(loop.store, self.config, referral_id=out.referral_id, obs=obs, raw=raw,
                                       codec=codec, now_hl7=now.strftime("%Y%m%d%H%M%S+0000"), at=at,
                                       origin=origin)
            loop.mark_applied(message_id, at)
        return obs, out

    def _applied(self, result, message_id: int) -> None:
        self._queued.discard(message_id)
        obs, out = result
        if out.referral_id is None:
            self.counts["parked"] += 1
            self.log.warn("ALERT {type} (message #{mid}) parked in the work queue #{item}: {why}",
                          type=obs.message_type, mid=message_id, item=out.workqueue_id, why=out.reason)
            return
        self.counts["applied"] += 1
        self.log.info("referral {ref}: {type} (message #{mid}) {before} -> {after}", ref=out.referral_id,
                      type=obs.message_type, mid=message_id, before=out.before.value if out.before else "?",
                      after=out.after.value if out.after else "?")
        if out.note_id is not None and self.on_note is not None and any(
                e.kind.value == "CONSULT_NOTE" for e in obs.events):
            self.on_note(out.referral_id, out.note_id)

    def _failed(self, failure, message_id: int) -> None:
        # The store failed: the message stays unapplied and is applied at the next start.
        self._queued.discard(message_id)
        self.log.failure("applying loop message #{mid} failed", failure, mid=message_id)

    # -- referrals in ----------------------------------------------------------------------

    def open_referral(self, store: Store, *, referral_id: str, channel: str, message_id: int, referral,
                      destination) -> bool:
        """Writer thread, in the document's job: record the referral; True when its send is held."""
        facts = referral_facts(referral, destination) if referral is not None else {}
        specialty = getattr(destination, "specialty", "") or facts.get("specialty", "")
        keys = [(k, i + 1) for i, k in enumerate(correlate.referral_keys(referral_id)) if k != referral_id]
        if referral is not None and referral.referral_id and "@" not in referral_id:
            # A namespace-only id travels in the Referral Note under our local root (an arc for the
            # namespace): a recipient whose root differs answers with that root, so index it too.
            from ..cda.referral_note import ii_attrs
            ii = ii_attrs(referral.referral_id, self.config.local_root)
            keys.append((f"{ii.get('extension', '')}@{ii['root']}", 1))
        state = self.tracker.open(referral_id, now=self.now(), channel=channel, facts=facts, message_id=message_id,
                                  specialty=specialty, destination=getattr(destination, "name", "") or "", keys=keys)
        return state.value == "AUTH_PENDING"

    # -- timers ------------------------------------------------------------------------------

    def tick(self) -> Deferred:
        now = self.now()
        d = self.committer.run(lambda store: (self.tracker.run_timers(now), self.tracker.loop.released()))
        d.addCallback(self._ticked)
        d.addErrback(lambda f: self.log.failure("loop timers", f))
        return d

    def _ticked(self, result) -> None:
        acted, released = result
        self.counts["acted"] += len(acted)
        for a in acted:
            self.log.info("referral {ref}: SLA {rule} -> {how} (owner {owner})", ref=a.referral_id, rule=a.rule,
                          how=a.how, owner=a.owner)
        for referral_id in released:
            self.log.info("referral {ref}: authorization approved, releasing the send", ref=referral_id)
            if self.on_release is not None:
                self.on_release(referral_id)
