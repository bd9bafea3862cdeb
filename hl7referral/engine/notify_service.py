"""Notifications leave here: queued rows (store ``notifications``) sent by notifier plugins.

The tracker only queues (one row per SLA item and notifier, unique); this service sends them
on a thread of its own with its own store connection, so a slow SMTP relay or webhook holds
up neither MLLP nor the tracker. Time is the injected clock's.

Invariants
----------
* A notification is sent until it is delivered (``sent``) or refused for good (``failed``,
  with a coordinator alert for the owner); transient failures back off and retry with the
  same Notice (same key: same Message-ID, same Idempotency-Key), so a resend after a crash
  is recognisable downstream as the same message.
* One tick at a time; logs carry keys and referral ids, never addresses or bodies.
"""

from __future__ import annotations

import json

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..config import EngineConfig
from ..config.notify import merge as merge_notify
from ..notify.base import Notice, NotifyError
from ..store import Store
from ..store.loop import Loop
from .ingest import iso_timestamp

TICK = 5.0
MAX_ATTEMPTS = 8
FIRST_DELAY, MAX_DELAY = 60.0, 3600.0


def channel_settings(config: EngineConfig) -> dict:
    """Each channel's notify settings (its [notify] over the engine's), by channel name."""
    return {ch.name: merge_notify(config.notify, ch.notify) for ch in config.channels}


def make_render(config: EngineConfig):
    """The tracker's Render hook: the channel's notify settings over the engine's, addressed and rendered."""
    merged = channel_settings(config)

    def render(audience: str, rule: str, row: dict, values: dict, owner: str):
        contact = json.loads(row.get("contact") or "{}")
        to = {"patient": contact.get("email", ""), "specialist": contact.get("specialist_email", "")}.get(audience, "")
        settings = merged.get(row.get("channel") or "", config.notify)
        return settings.messages(audience, rule, values, owner=owner, to=to)
    return render


class NotifyService(Service):
    log = Logger()

    def __init__(self, config: EngineConfig, store: Store, reactor, *, clock=None, interval: float = TICK,
                 notifiers=None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = clock or reactor
        self.loop = Loop(store)
        self.notifiers = notifiers if notifiers is not None else self._build(config)
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="hl7referral-notify")
        self.timer = LoopingCall(self.tick)
        self.timer.clock = self.clock
        self.interval = interval
        self._ticking = False
        self.counts = dict(sent=0, retry=0, failed=0)

    @staticmethod
    def _build(config: EngineConfig) -> dict:
        built = dict(config.notify.build_notifiers())
        for settings in channel_settings(config).values():
            built.update(settings.build_notifiers())
        return built

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.timer.start(self.interval, now=True)

    def stopService(self):
        if self.timer.running:
            self.timer.stop()
        self.pool.stop()
        return super().stopService()

    def tick(self) -> Deferred | None:
        if self._ticking:
            return None
        self._ticking = True
        d = deferToThreadPool(self.reactor, self.pool, self.send_due, self.clock.seconds())
        d.addErrback(lambda f: self.log.failure("notifications", f))

        def done(result):
            self._ticking = False
            return result
        return d.addBoth(done)

    def send_due(self, now: float) -> list[tuple[int, str]]:
        """Send what is due (notifier thread); returns (id, new state) per row."""
        out = []
        for row in self.loop.notifications_due(now):
            out.append((row["id"], self._send(row, now)))
        return out

    def _send(self, row: dict, now: float) -> str:
        at = iso_timestamp(now)
        notifier = self.notifiers.get(row["notifier"])
        if notifier is None:
            return self._final(row, at, f"no notifier named {row['notifier']!r}")
        notice = Notice(key=row["key"], referral_id=row["referral_id"] or "", rule=row["rule"] or "",
                        audience=row["audience"], owner=row["owner"], to=row["recipient"] or "",
                        subject=row["subject"] or "", body=row["body"] or "", data=json.loads(row["data"] or "{}"))
        try:
            notifier.send(notice)
        except NotifyError as exc:
            attempts = row["attempts"] + 1
            if exc.outcome == "retry" and attempts < MAX_ATTEMPTS:
                delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (attempts - 1))
                self.loop.notification_result(row["id"], state="pending", at=at, error=str(exc),
                                              next_attempt_at=now + delay)
                self.counts["retry"] += 1
                self.log.warn("notification {key} ({notifier}): {why}; retry in {delay:.0f} s", key=row["key"],
                              notifier=row["notifier"], why=exc.code or exc.outcome, delay=delay)
                return "pending"
            return self._final(row, at, str(exc))
        self.loop.notification_result(row["id"], state="sent", at=at)
        self.counts["sent"] += 1
        self.log.info("notification {key} sent by {notifier} (owner {owner})", key=row["key"],
                      notifier=row["notifier"], owner=row["owner"])
        return "sent"

    def _final(self, row: dict, at: str, why: str) -> str:
        with self.loop.store.atomic():
            self.loop.notification_result(row["id"], state="failed", at=at, error=why)
            # Someone must still reach this person: the owner gets the alert.
            self.loop.alert(key=f"{row['key']}/{row['notifier']}/failed", kind="notify-failed",
                            referral_id=row["referral_id"], at=at, owner=row["owner"],
                            text=f"{row['rule']} to the {row['audience']} by {row['notifier']} failed: {why}")
        self.counts["failed"] += 1
        self.log.warn("ALERT notification {key} by {notifier} failed for good (owner {owner})", key=row["key"],
                      notifier=row["notifier"], owner=row["owner"])
        return "failed"
