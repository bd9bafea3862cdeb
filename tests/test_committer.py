"""The group committer with its real writer thread and the real store."""

import queue
import threading

from hl7referral.engine.committer import GroupCommitter
from hl7referral.store import ACCEPTED, Inbound, StoreError


def rec(cid):
    return Inbound(raw=cid.encode(), received_at="t", status=ACCEPTED, sending_application="A",
                   sending_facility="F", control_id=cid, ack=b"ack-" + cid.encode())


class Pump:
    """Stands in for reactor.callFromThread: the test runs the calls in its own thread."""

    def __init__(self):
        self.calls = queue.Queue()

    def __call__(self, fn, *args):
        self.calls.put((fn, args))

    def run(self, n=1, timeout=10):
        for _ in range(n):
            fn, args = self.calls.get(timeout=timeout)
            fn(*args)


class GatedStore:
    """The real store; its first commit waits until the test opens the gate."""

    def __init__(self, store):
        self.store = store
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batch_sizes = []

    def commit_batch(self, records):
        self.entered.set()
        self.gate.wait(10)
        self.batch_sizes.append(len(records))
        return self.store.commit_batch(records)


def test_messages_arriving_during_a_commit_share_the_next_one(store):
    gated, pump = GatedStore(store), Pump()
    gc = GroupCommitter(gated, pump)
    gc.start()
    results = []
    gc.submit(rec("1")).addCallback(results.append)
    assert gated.entered.wait(10)  # the writer holds "1" inside its commit
    for i in range(2, 6):
        gc.submit(rec(str(i))).addCallback(results.append)
    assert results == [] and store.count() == 0  # nothing acknowledged before its commit
    gated.gate.set()
    pump.run(2)
    gc.stop()
    assert gated.batch_sizes == [1, 4]  # 2..5 shared one commit
    assert [r.ack for r in results] == [b"ack-1", b"ack-2", b"ack-3", b"ack-4", b"ack-5"]
    assert (gc.batches, gc.committed, gc.depth) == (2, 5, 0)


def test_failed_commit_errbacks_every_record_in_the_batch_and_the_writer_goes_on(store):
    class Failing:
        calls = 0

        def commit_batch(self, records):
            Failing.calls += 1
            if Failing.calls == 1:
                raise StoreError("database is locked")
            return store.commit_batch(records)

    pump = Pump()
    gc = GroupCommitter(Failing(), pump)
    errors, out = [], []
    for i in range(3):
        gc.submit(rec(str(i))).addErrback(lambda f: errors.append(f.value))
    gc.start()
    pump.run(1)
    assert len(errors) == 3 and all(isinstance(e, StoreError) for e in errors)
    assert store.count() == 0
    gc.submit(rec("ok")).addCallback(out.append)
    pump.run(1)
    gc.stop()
    assert out[0].kind == "stored" and store.count() == 1


def test_idle_fires_after_the_last_delivery(store):
    gated, pump = GatedStore(store), Pump()
    gc = GroupCommitter(gated, pump)
    fired = []
    gc.idle().addCallback(fired.append)
    assert fired == [None]  # nothing outstanding
    gc.start()
    gc.submit(rec("1"))
    gc.submit(rec("2"))
    gc.idle().addCallback(fired.append)
    gated.gate.set()
    while len(fired) < 2:
        pump.run(1)
    gc.stop()
    assert store.count() == 2 and gc.depth == 0


def test_stop_commits_what_is_queued_first(store):
    pump = Pump()
    gc = GroupCommitter(store, pump)
    for i in range(10):
        gc.submit(rec(str(i)))
    gc.start()
    gc.stop()
    assert store.count() == 10


def test_jobs_run_on_the_writer_thread_in_order(store):
    pump = Pump()
    gc = GroupCommitter(store, pump)
    seen = []
    gc.submit(rec("1"))
    gc.run(lambda s: (seen.append((threading.current_thread().name, s.count())), "done")[1]).addCallback(seen.append)
    gc.submit(rec("2"))
    gc.start()
    while len(seen) < 2 or gc.depth:
        pump.run(1)
    gc.stop()
    assert seen == [("hl7referral-writer", 1), "done"]  # the job saw "1" committed and not "2"
    assert store.count() == 2
