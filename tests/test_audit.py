"""The hash-chained audit trail: append-only, and verify finds a changed, a deleted or an inserted row."""

from __future__ import annotations

import sqlite3

import pytest

from hl7referral.store import Store
from hl7referral.store.audit import GENESIS, AuditLog


@pytest.fixture
def log(tmp_path):
    store = Store.open(tmp_path / "engine.db")
    audit = AuditLog(store)
    for i in range(5):
        audit.append(at=f"2026-11-22T08:00:0{i}Z", actor="engine", referral_id="REF-1", event=f"event-{i}",
                     source=f"message #{i}", outcome="ok", detail="Zoë, 王")   # non-ASCII details hash too
    yield audit, tmp_path / "engine.db"
    store.close()


def tamper(path, sql: str, args=()) -> None:
    """What someone with the file and sqlite3 could do: drop the guard triggers, then edit."""
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    conn.execute(sql, args)
    conn.commit()
    conn.close()


def test_an_intact_chain_verifies(log):
    audit, _ = log
    assert audit.verify().ok and audit.verify().rows == 5
    rows, head = audit.head()
    assert rows == 5 and head == audit.rows()[-1]["hash"] and audit.rows()[0]["prev_hash"] == GENESIS


def test_the_triggers_refuse_update_and_delete(log):
    audit, path = log
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit_log SET outcome = 'changed' WHERE id = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_log WHERE id = 2")
    conn.close()


def test_a_changed_row_is_found(log):
    audit, path = log
    tamper(path, "UPDATE audit_log SET outcome = 'failed' WHERE id = 3")
    verdict = audit.verify()
    assert not verdict.ok and verdict.row_id == 3 and "changed" in verdict.problem


def test_a_deleted_row_is_found(log):
    audit, path = log
    tamper(path, "DELETE FROM audit_log WHERE id = 2")
    verdict = audit.verify()
    assert not verdict.ok and verdict.row_id == 2 and "missing" in verdict.problem


def test_a_deleted_last_row_is_found_against_the_recorded_head(log):
    audit, path = log
    rows, _ = audit.head()
    tamper(path, "DELETE FROM audit_log WHERE id = 5")
    assert audit.verify().ok                       # the chain alone cannot tell ...
    assert not audit.verify(expect_rows=rows).ok   # ... the count written down elsewhere can


def test_a_rewritten_row_with_its_own_hash_recomputed_still_breaks_the_next_link(log):
    audit, path = log
    from hl7referral.store.audit import _digest
    row = dict(audit.rows()[1], outcome="forged")
    tamper(path, "UPDATE audit_log SET outcome = ?, hash = ? WHERE id = 2", ("forged", _digest(row["prev_hash"], row)))
    verdict = audit.verify()
    assert not verdict.ok and verdict.row_id == 3


def test_the_cli_says_intact_or_names_the_broken_row(log):
    from test_cli_direct import CLI, no_traceback
    import subprocess
    audit, path = log
    done = subprocess.run([str(CLI), "audit", "verify", "--store", str(path)], capture_output=True, text=True)
    no_traceback(done)
    assert done.returncode == 0 and "intact: 5 rows" in done.stdout
    listed = subprocess.run([str(CLI), "audit", "list", "--store", str(path), "--referral", "REF-1"],
                            capture_output=True, text=True)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 5
    tamper(path, "DELETE FROM audit_log WHERE id = 4")
    done = subprocess.run([str(CLI), "audit", "verify", "--store", str(path)], capture_output=True, text=True)
    no_traceback(done)
    assert done.returncode == 1 and "BROKEN: row 4 is missing" in done.stdout
