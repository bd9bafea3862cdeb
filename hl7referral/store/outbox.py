"""The outbox (one row per send attempt of a packet), inbound mail, and the transport audit trail.

Invariants
----------
* A packet is enqueued at most once per idempotency key (``referral/transport/attempt``):
  :meth:`Outbox.enqueue` on a key already present returns the existing row and changes nothing.
* The payload and Message-ID are fixed at enqueue; every SMTP retry sends the same bytes.
* Every state change is written together with its ``transport_events`` row, in one
  transaction: the audit trail cannot miss a transition, nor record one that did not happen.
* Inbound mail is stored exactly as received (:meth:`Outbox.save_mail`) before the SMTP
  listener answers 250; what happens to it afterwards only updates that row.
* Times that drive timers (``next_attempt_at``, ``deadline``, ``sent_at``...) are seconds
  from the engine's injected clock; ``*_at`` strings are for people.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..loop.states import Kind
from .sqlite import Store, dicts, owner_of, where_equal

ACTIVE = ("QUEUED", "RETRY_WAIT")
# (transport, outbox kind, new state) -> the loop event it is (store/loop.py): a packet that left is
# SENT, a processed MDN or a delivered fax is receipt, an ACKed consult note is filed in the chart.
LOOP_EVENTS = {("direct", "referral", "SENT"): Kind.SENT, ("direct", "referral", "MDN_PROCESSED"): Kind.DELIVERED,
               ("direct", "referral", "MDN_DISPATCHED"): Kind.DELIVERED, ("fax", "referral", "SUBMITTED"): Kind.SENT,
               ("fax", "referral", "DELIVERED"): Kind.DELIVERED,
               ("mllp", "consult-note", "DELIVERED"): Kind.NOTE_FILED,
               # The specialist's side: the initiator's organisation took our consult note (its MDN).
               ("direct", "consult-note", "MDN_PROCESSED"): Kind.NOTE_FILED,
               ("direct", "consult-note", "MDN_DISPATCHED"): Kind.NOTE_FILED}
WAITING_FOR_MDN = ("SENT", "MDN_PROCESSED")

_OUTBOX_LIST = ("id, created_at, idempotency_key, referral_id, document_id, channel, transport, kind, sender, "
                "recipient, message_id, state, attempts, next_attempt_at, deadline, final_delivery, sent_at, "
                "processed_at, dispatched_at, last_code, last_error, updated_at, gateway, job_id, "
                "length(payload) AS size")


@dataclass(frozen=True)
class Enqueued:
    id: int
    created: bool  # False: the key was there already (nothing was added)
    state: str


class Outbox:
    """Outbox, mail and transport events of one :class:`Store`.

    It uses that store's connection, so it belongs to the thread that owns the
    store (see the store's invariants); the engine gives its transport thread a
    store of its own.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    # -- outbox ---------------------------------------------------------------------

    def enqueue(self, *, key: str, referral_id: str, document_id: int | None, channel: str, transport: str,
                kind: str, sender: str, recipient: str, message_id: str, payload: bytes, at: str, now: float,
                final_delivery: bool = False, detail: str = "") -> Enqueued:
        s = self.store
        with s._lock, s._transaction():
            row = self.conn.execute("SELECT id, state FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()
            if row:
                return Enqueued(row[0], False, row[1])
            cur = self.conn.execute(
                "INSERT INTO outbox (created_at, idempotency_key, referral_id, document_id, channel, transport, "
                "kind, sender, recipient, message_id, payload, state, attempts, next_attempt_at, final_delivery, "
                "updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,'QUEUED',0,?,?,?)",
                (at, key, referral_id, document_id, channel, transport, kind, sender, recipient, message_id,
                 payload, now, int(final_delivery), at))
            self._event(cur.lastrowid, None, referral_id, "queued", "QUEUED", detail or f"{kind} to {recipient}", at)
            return Enqueued(cur.lastrowid, True, "QUEUED")

    def due(self, now: float, limit: int = 50, transports: tuple[str, ...] = ("direct",),
            in_order: tuple[str, ...] = ()) -> list[dict]:
        """Rows to send now (oldest first). A row of a kind in *in_order* waits while an earlier row of
        the same referral and kind is still on its way (not DELIVERED, not FAILED): one referral's
        consult notes reach the chart in the order they came, a revision after what it revises."""
        marks = ",".join("?" * len(transports))
        behind = ""
        if in_order:
            behind = (f"AND NOT (o.kind IN ({','.join('?' * len(in_order))}) AND EXISTS (SELECT 1 FROM outbox e "
                      "WHERE e.referral_id = o.referral_id AND e.kind = o.kind AND e.transport = o.transport "
                      "AND e.id < o.id AND e.state NOT IN ('DELIVERED', 'FAILED'))) ")
        return [dict(r) for r in self.store.db.query(
            f"SELECT * FROM outbox o WHERE state IN ('QUEUED','RETRY_WAIT') AND next_attempt_at <= ? "
            f"AND transport IN ({marks}) {behind}ORDER BY next_attempt_at, id LIMIT ?",
            [now, *transports, *in_order, int(limit)])]

    def next_due(self, transports: tuple[str, ...] = ("direct",)) -> float | None:
        """When the earliest send or timeout falls due (None: nothing pending)."""
        marks = ",".join("?" * len(transports))
        row = self.conn.execute(
            f"SELECT min(t) FROM (SELECT min(next_attempt_at) AS t FROM outbox WHERE state IN ('QUEUED','RETRY_WAIT') "
            f"AND transport IN ({marks}) UNION ALL SELECT min(deadline) FROM outbox WHERE deadline IS NOT NULL "
            f"AND state IN ('SENT','MDN_PROCESSED') AND transport IN ({marks}))", [*transports, *transports]).fetchone()
        return row[0] if row else None

    def expired(self, now: float, transports: tuple[str, ...] = ("direct",),
                states: tuple[str, ...] = WAITING_FOR_MDN) -> list[dict]:
        """Rows in *states* whose deadline has passed (Direct: the MDN's; fax: the final status's)."""
        marks, smarks = ",".join("?" * len(transports)), ",".join("?" * len(states))
        return [dict(r) for r in self.store.db.query(
            f"SELECT * FROM outbox WHERE state IN ({smarks}) AND deadline IS NOT NULL AND deadline <= ? "
            f"AND transport IN ({marks}) ORDER BY deadline, id", [*states, now, *transports])]

    def polls_due(self, now: float, states: tuple[str, ...], transport: str = "fax", limit: int = 50) -> list[dict]:
        """Rows in *states* whose next check (``next_attempt_at``) has come: fax jobs to ask the gateway about."""
        smarks = ",".join("?" * len(states))
        return [dict(r) for r in self.store.db.query(
            f"SELECT * FROM outbox WHERE state IN ({smarks}) AND transport = ? AND next_attempt_at <= ? "
            f"ORDER BY next_attempt_at, id LIMIT ?", [*states, transport, now, int(limit)])]

    def reschedule(self, outbox_id: int, next_attempt_at: float) -> None:
        """Move a row's next check; no state change, so no audit event."""
        s = self.store
        with s._lock, s._transaction():
            self.conn.execute("UPDATE outbox SET next_attempt_at = ? WHERE id = ?", (next_attempt_at, outbox_id))

    def by_job(self, gateway: str, job_id: str) -> dict | None:
        """The attempt holding this gateway job: one still waiting first, else the newest."""
        rows = list(self.store.db.query(
            "SELECT * FROM outbox WHERE gateway = ? AND job_id = ? "
            "ORDER BY state IN ('DELIVERED', 'FAILED'), id DESC LIMIT 1", [gateway, job_id]))
        return rows[0] if rows else None

    def by_key(self, key: str) -> dict | None:
        rows = list(self.store.db.query("SELECT * FROM outbox WHERE idempotency_key = ?", [key]))
        return rows[0] if rows else None

    def update(self, outbox_id: int, *, event: str, at: str, detail: str = "", mail_id: int | None = None,
               row: dict | None = None, **fields: Any) -> None:
        """Change a row and write its audit event in one transaction (``state`` among *fields* is recorded).
        *row*: the caller's copy of it, for the columns that never change (referral, transport, kind)."""
        s = self.store
        with s._lock, s._transaction():
            self._update(outbox_id, event=event, at=at, detail=detail, mail_id=mail_id, row=row, **fields)

    def _update(self, outbox_id: int, *, event: str, at: str, detail: str, mail_id: int | None,
                row: dict | None = None, **fields: Any) -> None:
        fields["updated_at"] = at
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE outbox SET {sets} WHERE id = ?", [*fields.values(), outbox_id])
        if row is not None and "state" in fields:
            # referral, transport and kind are fixed at enqueue; the state is the one just written.
            referral = (row["referral_id"], fields["state"], row["transport"], row["kind"])
        else:
            referral = self.conn.execute("SELECT referral_id, state, transport, kind FROM outbox WHERE id = ?",
                                         (outbox_id,)).fetchone()
        self._event(outbox_id, mail_id, referral[0] if referral else None, event,
                    referral[1] if referral else None, detail, at)
        loop_kind = LOOP_EVENTS.get((referral[2], referral[3], fields.get("state"))) if referral else None
        if loop_kind is not None and referral[0]:
            # The referral's business state moves in the same transaction as its packet's.
            from .loop import Loop
            Loop(self.store).apply_if_known(referral[0], loop_kind, at=at[:19] + "Z",
                                            source=f"{referral[2]} outbox #{outbox_id} {fields['state']}",
                                            once=loop_kind in (Kind.DELIVERED, Kind.NOTE_FILED))

    def get(self, outbox_id: int) -> dict | None:
        rows = list(self.store.db.query("SELECT * FROM outbox WHERE id = ?", [int(outbox_id)]))
        return rows[0] if rows else None

    def by_message_id(self, message_id: str) -> dict | None:
        # Straight off the connection: sqlite-utils would wrap the read in a SAVEPOINT (two more
        # statements for every MDN received).
        rows = dicts(self.conn, "SELECT * FROM outbox WHERE message_id = ? ORDER BY id LIMIT 1", [message_id])
        return rows[0] if rows else None

    def list(self, *, limit: int = 50, state: str | None = None, referral_id: str | None = None,
             transport: str | None = None) -> list[dict]:
        clause, args = where_equal(transport=transport, state=state, referral_id=referral_id)
        return [dict(r) for r in self.store.db.query(
            f"SELECT {_OUTBOX_LIST} FROM outbox {clause} ORDER BY id DESC LIMIT ?", [*args, int(limit)])]

    def attempts_for(self, referral_id: str, transport: str) -> int:
        return self.conn.execute("SELECT count(*) FROM outbox WHERE referral_id = ? AND transport = ?",
                                 (referral_id, transport)).fetchone()[0]

    # -- fax status callbacks ---------------------------------------------------------

    def save_callback(self, *, channel: str, gateway: str, body: bytes, at: str) -> int:
        """Keep a status callback exactly as received (before the HTTP answer); applied later."""
        s = self.store
        with s._lock, s._transaction():
            return self.conn.execute(
                "INSERT INTO fax_callbacks (received_at, channel, gateway, body) VALUES (?,?,?,?)",
                (at, channel, gateway, body)).lastrowid

    def update_callback(self, callback_id: int, **fields: Any) -> None:
        s = self.store
        with s._lock, s._transaction():
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.conn.execute(f"UPDATE fax_callbacks SET {sets} WHERE id = ?", [*fields.values(), callback_id])

    def pending_callbacks(self, limit: int = 200) -> list[dict]:
        """Callbacks not yet applied (oldest first): new ones, and ones whose job was not known yet."""
        return [dict(r) for r in self.store.db.query(
            "SELECT * FROM fax_callbacks WHERE applied_at IS NULL ORDER BY id LIMIT ?", [int(limit)])]

    def list_callbacks(self, *, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self.store.db.query(
            "SELECT id, received_at, channel, gateway, job_id, key, status, detail, outbox_id, applied_at, result, "
            "length(body) AS size FROM fax_callbacks ORDER BY id DESC LIMIT ?", [int(limit)])]

    # -- inbound mail -----------------------------------------------------------------

    def save_mail(self, *, mail_from: str, rcpt_to: list[str], raw: bytes, message_id: str, at: str) -> int:
        s = self.store
        with s._lock, s._transaction():
            cur = self.conn.execute(
                "INSERT INTO mail (received_at, mail_from, rcpt_to, raw, raw_sha256, message_id, status) "
                "VALUES (?,?,?,?,?,?,'received')",
                (at, mail_from, ",".join(rcpt_to), raw, hashlib.sha256(raw).hexdigest(), message_id))
            self._event(None, cur.lastrowid, None, "mail-received", None, f"{len(raw)} bytes from {mail_from}", at)
            return cur.lastrowid

    def update_mail(self, mail_id: int, *, event: str, at: str, detail: str = "", **fields: Any) -> None:
        s = self.store
        with s._lock, s._transaction():
            if fields:
                sets = ", ".join(f"{k} = ?" for k in fields)
                self.conn.execute(f"UPDATE mail SET {sets} WHERE id = ?", [*fields.values(), mail_id])
            self._event(fields.get("outbox_id"), mail_id, None, event, fields.get("status"), detail, at)

    def unprocessed_mail(self, limit: int = 100) -> list[dict]:
        return [dict(r) for r in self.store.db.query(
            "SELECT * FROM mail WHERE status = 'received' ORDER BY id LIMIT ?", [int(limit)])]

    def list_mail(self, *, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self.store.db.query(
            "SELECT id, received_at, mail_from, rcpt_to, message_id, status, kind, from_address, trust, detail, "
            "original_message_id, outbox_id, length(raw) AS size FROM mail ORDER BY id DESC LIMIT ?", [int(limit)])]

    def get_mail(self, mail_id: int) -> dict | None:
        rows = list(self.store.db.query("SELECT * FROM mail WHERE id = ?", [int(mail_id)]))
        return rows[0] if rows else None

    # -- audit ---------------------------------------------------------------------------

    def events(self, *, outbox_id: int | None = None, mail_id: int | None = None, limit: int = 200) -> list[dict]:
        clause, args = where_equal(outbox_id=outbox_id, mail_id=mail_id)
        return [dict(r) for r in self.store.db.query(
            f"SELECT * FROM transport_events {clause} ORDER BY id LIMIT ?", [*args, int(limit)])]

    def audit(self, *, event: str, at: str, detail: str, referral_id: str | None = None) -> None:
        """An event that belongs to no outbox row or mail (e.g. a transport skipped for want of a certificate)."""
        s = self.store
        with s._lock, s._transaction():
            self._event(None, None, referral_id, event, None, detail, at)

    def alert(self, *, kind: str, text: str, at: str, referral_id: str | None = None, channel: str | None = None,
              owner: str | None = None) -> None:
        """An alert for the referral's owner (store/sqlite.py ``owner_of``) unless *owner* is given."""
        s = self.store
        with s._lock, s._transaction():
            self.conn.execute(
                "INSERT INTO alerts (created_at, kind, referral_id, channel, text, owner) VALUES (?,?,?,?,?,?)",
                (at, kind, referral_id, channel, text, owner or owner_of(self.conn, referral_id)))

    def _event(self, outbox_id, mail_id, referral_id, event, state, detail, at) -> None:
        self.conn.execute(
            "INSERT INTO transport_events (at, outbox_id, mail_id, referral_id, event, state, detail) "
            "VALUES (?,?,?,?,?,?,?)", (at, outbox_id, mail_id, referral_id, event, state, detail))
