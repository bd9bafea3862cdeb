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
