import sqlite3

import pytest

from hl7referral.store import ACCEPTED, REJECTED, Inbound, Store, StoreError


def rec(cid="C1", raw=b"MSH|x", status=ACCEPTED, ack=b"ACK-1", **kw):
    return Inbound(raw=raw, received_at="2026-01-01T00:00:00.000Z", status=status, sending_application="EHR",
                   sending_facility="CLINIC", message_type="REF^I12", control_id=cid, ack=ack, ack_code="AA", **kw)


def test_pragmas_are_durable(store):
    assert store.pragmas() == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}


def test_batch_is_stored_with_raw_bytes_intact(store):
    raw = b"MSH|^~\\&|\r\nPID|\xff\x00"
    out = store.commit_batch([rec("C1", raw), rec("C2")])
    assert [o.kind for o in out] == ["stored", "stored"]
    assert store.get_message(out[0].message_id)["raw"] == raw


def test_duplicate_returns_the_stored_ack_byte_for_byte_and_stores_nothing(store):
    first = store.commit_batch([rec("C1", ack=b"ORIGINAL-ACK")])[0]
    again = store.commit_batch([rec("C1", ack=b"NEW-ACK")])[0]
    assert again.kind == "duplicate" and again.ack == b"ORIGINAL-ACK" and again.message_id == first.message_id
    assert store.count(status=ACCEPTED) == 1
    assert store.get_message(first.message_id)["duplicates"] == 1


def test_duplicate_inside_one_batch(store):
    out = store.commit_batch([rec("C1"), rec("C1")])
    assert [o.kind for o in out] == ["stored", "duplicate"]


def test_same_id_other_content_is_a_conflict_and_the_original_is_untouched(store):
    first = store.commit_batch([rec("C1", raw=b"one")])[0]
    conflict = store.commit_batch([rec("C1", raw=b"two", conflict_ack=lambda oid: (f"NAK {oid}".encode(), "AE"))])[0]
    assert conflict.kind == "conflict" and conflict.ack == f"NAK {first.message_id}".encode()
    assert store.get_message(first.message_id)["raw"] == b"one"
    row = store.get_message(conflict.message_id)
    assert row["status"] == REJECTED and row["raw"] == b"two" and "different content" in row["error"]


def test_same_control_id_from_another_application_is_a_new_message(store):
    a = rec("C1")
    b = rec("C1")
    b.sending_application = "OTHER"
    assert [o.kind for o in store.commit_batch([a, b])] == ["stored", "stored"]


def test_rejected_messages_do_not_block_a_corrected_resend(store):
    store.commit_batch([rec("C1", raw=b"bad", status=REJECTED)])
    assert store.commit_batch([rec("C1", raw=b"good")])[0].kind == "stored"


def test_failed_transaction_stores_nothing(tmp_path):
    s = Store.open(tmp_path / "s.db", busy_timeout_ms=50)
    locker = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        s.commit_batch([rec("C1"), rec("C2")])
    locker.execute("ROLLBACK")
    assert s.count() == 0
    assert [o.kind for o in s.commit_batch([rec("C1"), rec("C2")])] == ["stored", "stored"]


def test_unwritable_path_is_one_readable_error(tmp_path):
    with pytest.raises(StoreError, match="store"):
        Store.open(tmp_path / "missing-file.db", readonly=True)


def test_list_and_filter(store):
    store.commit_batch([rec("C1"), rec("C2", raw=b"x", status=REJECTED)])
    assert [r["control_id"] for r in store.list_messages()] == ["C2", "C1"]
    assert [r["control_id"] for r in store.list_messages(status=REJECTED)] == ["C2"]
    assert [r["control_id"] for r in store.list_messages(control_id="C1")] == ["C1"]


def test_reopen_keeps_data_and_schema_version(tmp_path):
    s = Store.open(tmp_path / "s.db")
    s.commit_batch([rec("C1")])
    s.close()
    s = Store.open(tmp_path / "s.db")
    assert s.count() == 1 and s.conn.execute("PRAGMA user_version").fetchone()[0] >= 1


def test_text_of_an_ascii_message_is_derived_from_raw(store):
    (o,) = store.commit_batch([rec("C1", raw=b"MSH|^~\\&|A\rPID|1\r")])
    assert store.get_message(o.message_id)["text"] == "MSH|^~\\&|A\rPID|1\r"


def test_without_autocheckpoint_the_checkpointer_empties_the_wal(tmp_path):
    from hl7referral.store import Checkpointer
    s = Store.open(tmp_path / "s.db", autocheckpoint=False)
    for i in range(50):
        s.commit_batch([rec(f"C{i}", raw=bytes(8000))])
    busy, frames, done = Checkpointer(tmp_path / "s.db").run("PASSIVE")
    assert busy == 0 and frames > 0 and done == frames
    Checkpointer(tmp_path / "s.db").run("TRUNCATE")
    assert (tmp_path / "s.db-wal").stat().st_size == 0
    assert s.count() == 50


def test_a_second_thread_with_its_own_store_never_breaks_the_writers_commits(tmp_path):
    # The engine's transport thread reads and writes the outbox while the
    # writer commits messages. Sharing one connection broke about a third of
    # the commits ("cannot start a transaction within a transaction": the
    # reads' SAVEPOINTs landed inside the writer's BEGIN); a store per thread
    # must lose none.
    import threading
    import time

    from hl7referral.store.outbox import Outbox

    path = tmp_path / "engine.db"
    writer = Store.open(path, autocheckpoint=False)
    outbox = Outbox(Store.open(path, autocheckpoint=False))
    stop = threading.Event()
    errors: list[str] = []

    def transport() -> None:
        while not stop.is_set():
            try:
                outbox.due(time.time())
                outbox.unprocessed_mail()
                outbox.audit(event="tick", at="2026-01-01T00:00:00Z", detail="")
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(exc))

    thread = threading.Thread(target=transport)
    thread.start()
    failed = []
    try:
        for i in range(400):
            try:
                writer.commit_batch([rec(f"C{i}", raw=b"MSH|%d" % i)])
            except StoreError as exc:
                failed.append(str(exc))
    finally:
        stop.set()
        thread.join()
    assert failed == [] and errors == []
    assert writer.count(status=ACCEPTED) == 400
