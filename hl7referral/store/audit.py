"""The audit trail: append-only, one row per event, hash-chained.

Each row's ``hash`` is SHA-256 over the previous row's hash and this row's fields in a
canonical form (JSON, sorted keys, UTF-8), so changing any field of any row, deleting a
row, or inserting one out of turn breaks the chain from there on; :meth:`AuditLog.verify`
walks it and names the first row that does not fit.

Invariants
----------
* Rows are only appended (:meth:`AuditLog.append`), inside a ``BEGIN IMMEDIATE``
  transaction that reads the last hash: two writers on two connections cannot both
  chain onto the same row.
* The first row chains onto :data:`GENESIS`; ids are consecutive from 1, so a deleted
  last row is found too when the caller knows the count it expects (``expect_rows``),
  and a deleted row elsewhere breaks the chain.
* Times are UTC ISO-8601 strings; rows hold ids (referral, message, outbox), never a
  patient's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .sqlite import Store, where_equal

GENESIS = "0" * 64
_FIELDS = ("id", "at", "actor", "referral_id", "event", "source", "outcome", "detail")
# The canonical form, made once: json.dumps() with these options builds a new encoder per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _digest(prev: str, row: dict) -> str:
    body = _CANONICAL.encode({k: row.get(k) for k in _FIELDS})
    return hashlib.sha256(prev.encode("ascii") + b"\n" + body.encode("utf-8")).hexdigest()


def append_row(conn, *, at: str, actor: str, event: str, outcome: str, referral_id: str | None = None,
               source: str = "", detail: str = "") -> int:
    """Append one row on *conn*, inside a write transaction the caller holds (so it commits with its cause)."""
    last = conn.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    row = {"id": (last[0] + 1) if last else 1, "at": at, "actor": actor, "referral_id": referral_id,
           "event": event, "source": source, "outcome": outcome, "detail": detail}
    prev = last[1] if last else GENESIS
    conn.execute(
        "INSERT INTO audit_log (id, at, actor, referral_id, event, source, outcome, detail, prev_hash, hash) "
        "VALUES (?,?,?,?,?,?,?,?,?,?)", (*[row[k] for k in _FIELDS], prev, _digest(prev, row)))
    return row["id"]


@dataclass(frozen=True)
class Verdict:
    ok: bool
    rows: int
    problem: str = ""      # the first row that does not fit, and how
    row_id: int | None = None


class AuditLog:
    """The audit rows of one :class:`Store` (its connection: one thread, see the store's invariants)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    def append(self, *, at: str, actor: str, event: str, outcome: str, referral_id: str | None = None,
               source: str = "", detail: str = "") -> int:
        s = self.store
        with s._lock, s._transaction():
            return append_row(self.conn, at=at, actor=actor, event=event, outcome=outcome, referral_id=referral_id,
                              source=source, detail=detail)

    def rows(self, *, referral_id: str | None = None, limit: int = 1000) -> list[dict]:
        clause, args = where_equal(referral_id=referral_id)
        return [dict(r) for r in self.store.db.query(
            f"SELECT * FROM audit_log {clause} ORDER BY id LIMIT ?", [*args, int(limit)])]

    def head(self) -> tuple[int, str]:
        """(rows, the last hash): written down elsewhere, it also catches rows cut off the end."""
        last = self.conn.execute("SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
        return (last[0], last[1]) if last else (0, GENESIS)

    def verify(self, expect_rows: int | None = None) -> Verdict:
        prev, expected_id, n = GENESIS, 1, 0
        for row in self.store.db.query("SELECT * FROM audit_log ORDER BY id"):
            n += 1
            if row["id"] != expected_id:
                return Verdict(False, n, f"row {expected_id} is missing (next is {row['id']})", expected_id)
            if row["prev_hash"] != prev:
                return Verdict(False, n, f"row {row['id']} does not follow row {row['id'] - 1} (inserted or "
                                         f"the chain was rewritten)", row["id"])
            if _digest(prev, row) != row["hash"]:
                return Verdict(False, n, f"row {row['id']} was changed after it was written", row["id"])
            prev, expected_id = row["hash"], expected_id + 1
        if expect_rows is not None and n < expect_rows:
            return Verdict(False, n, f"{expect_rows - n} row(s) missing at the end (expected {expect_rows})")
        return Verdict(True, n)
