from twisted.internet.defer import fail, succeed

from hl7referral.engine.committer import GroupCommitter
from hl7referral.store import ACCEPTED, Inbound, Store, StoreError
from manual_thread import ManualThread


def rec(cid):
    return Inbound(raw=cid.encode(), received_at="t", status=ACCEPTED, sending_application="A",
                   sending_facility="F", control_id=cid, ack=b"ack-" + cid.encode())


def test_messages_arriving_during_a_commit_share_the_next_one(tmp_path):
    store = Store.open(tmp_path / "s.db")
    thread = ManualThread()
    gc = GroupCommitter(store, thread)
    results = []
    gc.submit(rec("1")).addCallback(results.append)
    for i in range(2, 6):
        gc.submit(rec(str(i))).addCallback(results.append)
    assert len(thread.calls) == 1 and gc.depth == 4  # 2..5 wait for the first commit
    thread.finish()
    assert [r.kind for r in results] == ["stored"]
    assert len(thread.calls) == 1 and len(thread.calls[0][1][0]) == 4  # one batch of four
    thread.finish()
    assert [r.ack for r in results] == [b"ack-1", b"ack-2", b"ack-3", b"ack-4", b"ack-5"]
    assert gc.batches == 2 and gc.committed == 5


def test_no_outcome_before_commit(tmp_path):
    store = Store.open(tmp_path / "s.db")
    thread = ManualThread()
    gc = GroupCommitter(store, thread)
    results = []
    gc.submit(rec("1")).addCallback(results.append)
    assert results == [] and store.count() == 0
    thread.finish()
    assert results and store.count() == 1


def test_failed_commit_errbacks_every_record_in_the_batch(tmp_path):
    store = Store.open(tmp_path / "s.db")
    gc = GroupCommitter(store, lambda fn, *a: fail(StoreError("disk full")))
    errors = []
    for i in range(3):
        gc.submit(rec(str(i))).addErrback(lambda f: errors.append(f.value))
    assert len(errors) == 3 and all(isinstance(e, StoreError) for e in errors)
    # and the committer keeps working afterwards
    gc._run = lambda fn, *a: succeed(fn(*a))
    out = []
    gc.submit(rec("ok")).addCallback(out.append)
    assert out[0].kind == "stored"


def test_idle_fires_after_the_last_commit(tmp_path):
    store = Store.open(tmp_path / "s.db")
    thread = ManualThread()
    gc = GroupCommitter(store, thread)
    fired = []
    gc.idle().addCallback(fired.append)
    assert fired == [None]  # nothing in flight
    gc.submit(rec("1"))
    gc.submit(rec("2"))
    gc.idle().addCallback(fired.append)
    thread.finish()
    assert len(fired) == 1  # "2" still waits for its batch
    thread.finish()
    assert len(fired) == 2 and store.count() == 2
