"""Stands in for the store's writer thread: runs each call when the test says so."""

from twisted.internet.defer import Deferred

from hl7referral.store import StoreError


class ManualThread:
    def __init__(self):
        self.calls = []

    def __call__(self, fn, *args):
        d = Deferred()
        self.calls.append((fn, args, d))
        return d

    def finish(self):
        """Run the oldest pending call and fire its Deferred."""
        fn, args, d = self.calls.pop(0)
        try:
            d.callback(fn(*args))
        except StoreError as exc:
            d.errback(exc)

    def finish_all(self):
        while self.calls:
            self.finish()
