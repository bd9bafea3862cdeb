"""Group commit: everything that arrives while one commit runs shares the next.

One writer thread owns the SQLite connection. The reactor puts records on a
queue; the writer takes everything waiting there, commits it as one
transaction (one fsync), hands the outcomes back to the reactor thread, and
at once takes the next batch, while the reactor is still writing the ACKs of
the last one. Durability then costs one fsync per batch, not per message,
with no timer and no added latency for a lone message.

Invariants
----------
* A record's Deferred fires with its :class:`Outcome` only after the
  transaction holding it has committed; it errbacks (``StoreError``) if the
  transaction failed, and then nothing in that batch was stored.
* Batches commit in submission order, one at a time; Deferreds fire in the
  reactor thread (through ``call_from_thread``), in submission order.
* Other writes (:meth:`GroupCommitter.run`: a document, an alert) run on the
  same thread, in their place in that order, each as its own transaction:
  the store has one writer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ..store import Inbound, Outcome, Store, StoreError

_STOP = object()


class _Job:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Store], Any]) -> None:
        self.fn = fn


class GroupCommitter:
    log = Logger()

    def __init__(self, store: Store, call_from_thread: Callable[..., Any], max_batch: int = 1024) -> None:
        self._store = store
        self._call = call_from_thread
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._outstanding = 0
        self._idle_waiters: list[Deferred] = []
        self.batches = 0
        self.committed = 0

    # -- reactor side ------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="hl7referral-writer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the writer after what is queued (blocks until it has)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    @property
    def depth(self) -> int:
        """Records submitted and not yet delivered."""
        return self._outstanding

    def submit(self, record: Inbound) -> "Deferred[Outcome]":
        d: Deferred = Deferred()
        self._outstanding += 1
        self._queue.put((record, d))
        return d

    def run(self, fn: Callable[[Store], Any]) -> Deferred:
        """Run ``fn(store)`` on the writer thread; the Deferred fires with its result."""
        d: Deferred = Deferred()
        self._outstanding += 1
        self._queue.put((_Job(fn), d))
        return d

    def _deliver_job(self, d: Deferred, result: Any, error: Exception | None) -> None:
        self._outstanding -= 1
        if error is None:
            d.callback(result)
        else:
            d.errback(error)
        self._notify_idle()

    def _notify_idle(self) -> None:
        if not self._outstanding and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def idle(self) -> "Deferred[None]":
        """Fires once every record submitted so far has been delivered."""
        if not self._outstanding:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle_waiters.append(d)
        return d

    def _deliver(self, batch: list, outcomes: list[Outcome] | None, error: Exception | None) -> None:
        self._outstanding -= len(batch)
        if error is None:
            self.batches += 1
            self.committed += len(batch)
            for (_, d), outcome in zip(batch, outcomes):
                d.callback(outcome)
        else:
            exc = error if isinstance(error, StoreError) else StoreError(str(error))
            self.log.error("store commit failed for {count} message(s): {error}", count=len(batch), error=str(exc))
            for _, d in batch:
                d.errback(exc)
        self._notify_idle()

    # -- writer thread -----------------------------------------------------------

    def _writer(self) -> None:
        q = self._queue
        while True:
            first = q.get()
            if first is _STOP:
                return
            items = [first]
            stop = False
            while len(items) < self._max_batch:
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                items.append(item)
            # Consecutive records share one commit; a job runs alone, in its place.
            batch: list = []
            for item in items:
                if isinstance(item[0], _Job):
                    self._commit(batch)
                    batch = []
                    self._job(*item)
                else:
                    batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list) -> None:
        if not batch:
            return
        try:
            outcomes = self._store.commit_batch([r for r, _ in batch])
            self._call(self._deliver, batch, outcomes, None)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the senders as a NAK
            self._call(self._deliver, batch, None, exc)

    def _job(self, job: _Job, d: Deferred) -> None:
        try:
            result = job.fn(self._store)
            self._call(self._deliver_job, d, result, None)
        except Exception as exc:  # noqa: BLE001 - the caller's errback decides
            self._call(self._deliver_job, d, None, exc)
