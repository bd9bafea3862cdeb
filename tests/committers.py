"""Committers for protocol tests: the real store, with the timing in the test's hands.

``ManualCommitter`` has GroupCommitter's interface (``submit``); it commits
what was submitted with the real :class:`Store` when the test calls
``finish()`` (or at once with ``auto=True``), or fails it with ``fail=``.
"""

from twisted.internet.defer import Deferred

from hl7referral.store import StoreError


class ManualCommitter:
    def __init__(self, store, *, auto=False, fail=None):
        self.store = store
        self.auto = auto
        self.fail = fail
        self.pending = []

    def submit(self, record):
        d = Deferred()
        self.pending.append((record, d))
        if self.auto:
            self.finish()
        return d

    def finish(self):
        """Commit everything submitted so far as one batch."""
        batch, self.pending = self.pending, []
        if self.fail:
            for _, d in batch:
                d.errback(StoreError(self.fail))
            return
        for (_, d), outcome in zip(batch, self.store.commit_batch([r for r, _ in batch])):
            d.callback(outcome)


class InlineCommitter:
    """GroupCommitter's ``run`` done at once, on the caller's thread: for services driven by a task.Clock."""

    def __init__(self, store):
        self.store = store

    def run(self, fn):
        from twisted.internet.defer import fail, succeed
        try:
            return succeed(fn(self.store))
        except Exception:   # noqa: BLE001 - the caller's errback sees it, as with the real committer
            return fail()
