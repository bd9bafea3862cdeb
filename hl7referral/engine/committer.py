"""Group commit: everything that arrives while one commit runs shares the next.

One writer thread owns the SQLite connection. While it commits (and fsyncs)
one batch, new records queue up; when it finishes, the whole queue becomes the
next batch. Durability then costs one fsync per batch, not per message, with
no timer and no added latency for a lone message.

Invariants
----------
* A record's Deferred fires with its :class:`Outcome` only after the
  transaction holding it has committed; it errbacks (``StoreError``) if the
  transaction failed, and then nothing in that batch was stored.
* Batches commit in submission order, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ..store import Inbound, Outcome, Store, StoreError

RunInThread = Callable[..., Deferred]


class GroupCommitter:
    log = Logger()

    def __init__(self, store: Store, run_in_thread: RunInThread, max_batch: int = 1024) -> None:
        self._store = store
        self._run = run_in_thread
        self._max_batch = max_batch
        self._pending: list[tuple[Inbound, Deferred]] = []
        self._busy = False
        self._idle_waiters: list[Deferred] = []
        self.batches = 0
        self.committed = 0

    @property
    def depth(self) -> int:
        """Records waiting for a commit (not counting the batch in flight)."""
        return len(self._pending)

    def idle(self) -> "Deferred[None]":
        """Fires once every record submitted so far has been committed (or failed)."""
        if not self._busy and not self._pending:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle_waiters.append(d)
        return d

    def submit(self, record: Inbound) -> "Deferred[Outcome]":
        d: Deferred = Deferred()
        self._pending.append((record, d))
        if not self._busy:
            self._flush()
        return d

    def _flush(self) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self._busy = True
        result = self._run(self._store.commit_batch, [r for r, _ in batch])
        result.addCallbacks(self._committed, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))
        result.addBoth(self._next)

    def _committed(self, outcomes: list[Outcome], batch: list[tuple[Inbound, Deferred]]) -> None:
        self.batches += 1
        self.committed += len(batch)
        for (_, d), outcome in zip(batch, outcomes):
            d.callback(outcome)

    def _failed(self, failure: Any, batch: list[tuple[Inbound, Deferred]]) -> None:
        exc = failure.value if isinstance(failure.value, StoreError) else StoreError(str(failure.value))
        self.log.error("store commit failed for {count} message(s): {error}", count=len(batch), error=str(exc))
        for _, d in batch:
            d.errback(exc)

    def _next(self, _: Any) -> None:
        self._busy = False
        if self._pending:
            self._flush()
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)
