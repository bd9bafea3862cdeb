"""Twisted's global reactor on a daemon thread, for tests that drive real Twisted clients and servers.

The global one, not a private instance: Twisted's TLS layer and pull producers
schedule on it (twisted.protocols.tls's write aggregation, task.cooperate) whatever
reactor the connection uses. A reactor cannot be restarted, so it is started once,
by the first test module that asks, and never stopped.
"""

from __future__ import annotations

import queue
import threading

from twisted.internet import defer
from twisted.python.failure import Failure

REACTOR_THREAD = "twisted-reactor-for-tests"


def running_reactor():
    from twisted.internet import reactor as r
    if not any(t.name == REACTOR_THREAD for t in threading.enumerate()):
        threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True,
                         name=REACTOR_THREAD).start()
    return r


def call(r, fn, *args, timeout=30, **kw):
    """Run fn in the reactor thread; wait for its (Deferred) result."""
    out: queue.Queue = queue.Queue()
    r.callFromThread(lambda: defer.maybeDeferred(fn, *args, **kw).addBoth(out.put))
    result = out.get(timeout=timeout)
    if isinstance(result, Failure):
        result.raiseException()
    return result
