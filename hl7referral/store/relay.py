"""Both ends of a referral in one store: whose referral it is, and the 360X messages for the partner.

An engine is the *initiator* of the referrals its EHR sends and the *recipient* of those that
arrive over Direct (the specialist's practice runs the same engine). Both kinds live in
``referrals`` with the same states; ``side`` tells them apart and ``partner`` is the other
end's Direct address (where the recipient's answers go, where the initiator's cancel goes).

``relay`` holds what must travel to the partner: 360X v2 messages (OSU^O51, SIU^S12/S15/S26)
and documents (a Consultation Note), written in the same transaction as the event they report,
so an event applied is an answer owed, even across a crash. The Direct thread packs pending
rows into signed and encrypted packets (it holds the keys) and records the outbox row in the
same transaction as ``packed_at``.

Invariants
----------
* One relay row per key (the referral, the answer's kind and what it is about): applying the
  same event twice owes one answer, and a row once packed is never packed again.
* A relay row is packed or carries the error that keeps it from being packed (no certificate
  for the partner, no partner): it is never silently dropped; :meth:`Relay.failed` raises an
  alert for it.
* Every row added and every row packed writes an audit row in its transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .audit import append_row
from .sqlite import Store

INITIATOR = "initiator"
RECIPIENT = "recipient"


@dataclass(frozen=True)
class Side:
    side: str          # INITIATOR | RECIPIENT
    partner: str       # the other end's Direct address ('' when not known)


class Relay:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    # -- sides ------------------------------------------------------------------------

    def set_side(self, referral_id: str, side: str, partner: str, *, at: str) -> None:
        with self.store._lock, self.store._transaction():
            self.conn.execute("UPDATE referrals SET side = ?, partner = ? WHERE referral_id = ?",
                              (side, partner or None, referral_id))

    def keep_facts(self, referral_id: str, facts: dict) -> None:
        """Add to the referral's facts (``contact``) those of *facts* it lacks; none it has is changed.

        The Direct thread packs a referral's packets from these facts (``patient_cx`` is the XDM
        patientId): the initiator's side records them when it first owes the partner something."""
        with self.store._lock, self.store._transaction():
            row = self.conn.execute("SELECT contact FROM referrals WHERE referral_id = ?", (referral_id,)).fetchone()
            if row is None:
                return
            try:
                contact = json.loads(row[0] or "{}")
            except ValueError:
                contact = {}
            merged = {**facts, **contact}
            if merged != contact:
                self.conn.execute("UPDATE referrals SET contact = ? WHERE referral_id = ?",
                                  (json.dumps(merged, sort_keys=True), referral_id))

    def side_of(self, referral_id: str) -> Side | None:
        row = self.conn.execute("SELECT side, partner FROM referrals WHERE referral_id = ?",
                                (referral_id,)).fetchone()
        return Side(row[0] or INITIATOR, row[1] or "") if row else None

    # -- answers owed ---------------------------------------------------------------------

    def add(self, *, key: str, at: str, referral_id: str, kind: str, message_type: str, message: bytes | None,
            document: bytes | None, recipient: str, actor: str = "relay") -> int | None:
        """Owe the partner one message; None when that key was owed already."""
        with self.store._lock, self.store._transaction():
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO relay (key, created_at, referral_id, kind, message_type, message, document, "
                "recipient) VALUES (?,?,?,?,?,?,?,?)",
                (key, at, referral_id, kind, message_type, message, document, recipient))
            if not cur.rowcount:
                return None
            append_row(self.conn, at=at, actor=actor, referral_id=referral_id, event="answer-owed",
                       outcome=kind, detail=f"{message_type or 'document'} for {recipient}")
            return cur.lastrowid

    def pending(self, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self.store.db.query(
            "SELECT * FROM relay WHERE packed_at IS NULL AND error IS NULL ORDER BY id LIMIT ?", [int(limit)])]

    def packed(self, relay_id: int, *, outbox_id: int, at: str) -> None:
        with self.store._lock, self.store._transaction():
            self.conn.execute("UPDATE relay SET packed_at = ?, outbox_id = ?, error = NULL WHERE id = ?",
                              (at, outbox_id, relay_id))
            row = self.conn.execute("SELECT referral_id, kind FROM relay WHERE id = ?", (relay_id,)).fetchone()
            append_row(self.conn, at=at, actor="direct", referral_id=row[0], event="answer-packed", outcome=row[1],
                       detail=f"relay #{relay_id} -> outbox #{outbox_id}")

    def failed(self, relay_id: int, *, error: str, at: str, owner: str) -> None:
        """The answer cannot be packed: kept with the reason, and an alert for a person."""
        from .loop import Loop
        with self.store._lock, self.store._transaction():
            self.conn.execute("UPDATE relay SET error = ? WHERE id = ?", (error, relay_id))
            row = self.conn.execute("SELECT referral_id, kind, key FROM relay WHERE id = ?", (relay_id,)).fetchone()
            append_row(self.conn, at=at, actor="direct", referral_id=row[0], event="answer-not-sent", outcome=row[1],
                       detail=error)
            Loop(self.store).alert(key=f"relay/{row[2]}", kind="answer-not-sent", at=at, owner=owner,
                                   referral_id=row[0], text=f"{row[1]} answer cannot go to the partner: {error}")

    def retry(self, relay_id: int) -> None:
        """A person fixed the cause (a certificate arrived): try to pack it again."""
        with self.store._lock, self.store._transaction():
            self.conn.execute("UPDATE relay SET error = NULL WHERE id = ? AND packed_at IS NULL", (relay_id,))

    def list(self, referral_id: str | None = None, limit: int = 50) -> list[dict]:
        clause, args = ("WHERE referral_id = ?", [referral_id]) if referral_id else ("", [])
        return [dict(r) for r in self.store.db.query(
            f"SELECT id, key, created_at, referral_id, kind, message_type, recipient, outbox_id, packed_at, error, "
            f"length(message) AS message_size, length(document) AS document_size FROM relay {clause} "
            f"ORDER BY id LIMIT ?", [*args, int(limit)])]
