"""The referral loop in the store: referrals, their events, the work queue, notes, tasks, SLA ledger.

Invariants
----------
* A referral's ``state`` and stage times are always :func:`~hl7referral.loop.states.state`
  and :func:`~hl7referral.loop.states.stage_times` of *all* its stored events, recomputed in
  the transaction that adds an event; so arrival order and duplicates never matter, and a
  replayed message changes nothing.
* Every event added writes one audit row (store/audit.py) in the same transaction: the
  audit trail cannot miss a state change, nor record one that did not happen.
* Nothing inbound is dropped: what matches no referral (or matches more than one) goes to
  ``workqueue`` whole (raw bytes), with the reason; a note is kept in ``notes`` even when
  its referral is unknown (linked to the work-queue row).
* An SLA item is acted on once: :meth:`Loop.fire` inserts its key or reports it was there.
* Like every store helper, a :class:`Loop` uses its store's connection, so it belongs to
  the thread that owns that store.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..loop.states import Event, Kind, State, stage_times, state, observe_all
from .audit import append_row
from .sqlite import Store, dicts as _dicts, where_equal

OPEN_STATES = tuple(s.value for s in State if not s.final)
_STAGE_COLUMNS = {State.SENT: "sent_at", State.DELIVERED: "delivered_at", State.ACCEPTED: "accepted_at",
                  State.SCHEDULED: "scheduled_at", State.SEEN: "seen_at", State.CLOSED: "closed_at"}
# Duration columns: seconds from the stage before (the report's "time per stage").
DURATIONS = (("d_delivered", "sent_at", "delivered_at"), ("d_accepted", "delivered_at", "accepted_at"),
             ("d_scheduled", "accepted_at", "scheduled_at"), ("d_seen", "scheduled_at", "seen_at"),
             ("d_closed", "seen_at", "closed_at"))
_LIST = ("referral_id, created_at, updated_at, channel, specialty, destination, payer, veterinary, state, state_at, "
         "due_at, overdue_at, auth, auth_number")
# What Loop._apply recomputes from the events, read first (state and auth lead) so that only what changed is written.
_DERIVED = ("state", "auth", "state_at", "due_at", *_STAGE_COLUMNS.values(), "final_at",
            *(name for name, _, _ in DURATIONS))
_READ_DERIVED = f"SELECT {', '.join(_DERIVED)} FROM referrals WHERE referral_id = ?"
# The report maps the file while it reads (SQLite caps it at its own maximum, 2 GB unless built otherwise).
_MAP_BYTES = 1 << 31


def _seconds(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    t = [dt.datetime.fromisoformat(x.replace("Z", "+00:00")) for x in (a, b)]
    return max(0.0, (t[1] - t[0]).total_seconds())


@dataclass(frozen=True)
class Applied:
    referral_id: str
    added: int            # events new to the store (duplicates are not counted)
    before: State
    after: State


@dataclass(frozen=True)
class Match:
    referral_id: str | None
    reason: str = ""      # why there is no single match (for the work queue)


class Loop:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.conn = store.conn

    # -- referrals --------------------------------------------------------------------

    def open_referral(self, referral_id: str, *, at: str, channel: str = "", specialty: str = "",
                      destination: str = "", payer: str = "", veterinary: bool = False, contact: dict | None = None,
                      message_id: int | None = None, keys: Iterable[tuple[str, int]] = (), actor: str = "engine",
                      source: str = "", auth: str = "", owner: str = "") -> bool:
        """Record a referral (RECEIVED, or AUTH_PENDING when *auth* is "required"); False if it was there."""
        s = self.store
        with s._lock, s._transaction():
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO referrals (referral_id, created_at, updated_at, message_id, channel, specialty, "
                "destination, payer, veterinary, contact, state, state_at, auth, owner) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (referral_id, at, at, message_id, channel, specialty, destination, payer, int(veterinary),
                 json.dumps(contact or {}, sort_keys=True), State.RECEIVED.value, at, auth, owner or None))
            self.conn.executemany("INSERT OR IGNORE INTO referral_keys (key, referral_id, strength) VALUES (?,?,?)",
                                  [(key, referral_id, strength) for key, strength in [(referral_id, 0), *keys]])
            if cur.rowcount:
                append_row(self.conn, at=at, actor=actor, referral_id=referral_id, event="RECEIVED", source=source,
                           outcome=State.RECEIVED.value, detail=f"channel {channel}" if channel else "")
            return bool(cur.rowcount)

    def get(self, referral_id: str) -> dict | None:
        rows = _dicts(self.conn, "SELECT * FROM referrals WHERE referral_id = ?", [referral_id])
        return rows[0] if rows else None

    def referrals(self, *, state: str | None = None, overdue: bool = False, limit: int = 50,
                  offset: int = 0) -> list[dict]:
        clause, args = where_equal(state=state)
        if overdue:
            clause = (clause + " AND " if clause else "WHERE ") + "overdue_at IS NOT NULL"
            order = "overdue_at, referral_id"
        else:
            order = "created_at DESC, referral_id"
        return _dicts(self.conn, f"SELECT {_LIST} FROM referrals {clause} ORDER BY {order} LIMIT ? OFFSET ?",
                      [*args, int(limit), int(offset)])

    def events(self, referral_id: str) -> list[Event]:
        return [Event(Kind(r[0]), r[1], r[2] or "", r[3] or "", r[4] or "") for r in self.conn.execute(
            "SELECT kind, at, appointment, starts, source FROM loop_events WHERE referral_id = ? ORDER BY id",
            (referral_id,))]

    def event_rows(self, referral_id: str) -> list[dict]:
        return [dict(r) for r in self.store.db.query(
            "SELECT * FROM loop_events WHERE referral_id = ? ORDER BY at, id", [referral_id])]

    # -- correlation ----------------------------------------------------------------------

    def add_keys(self, referral_id: str, keys: Iterable[tuple[str, int]]) -> None:
        s = self.store
        with s._lock, s._transaction():
            self.conn.executemany("INSERT OR IGNORE INTO referral_keys (key, referral_id, strength) VALUES (?,?,?)",
                                  [(key, referral_id, strength) for key, strength in keys])

    def find(self, keys: Iterable[tuple[str, str]]) -> Match:
        """The one referral these correlation keys name, tried in order (strongest first).

        ``("message-id", id)`` and ``("control", id)`` are looked up in the outbox (what we
        sent); any other key in ``referral_keys``. A key naming two referrals is ambiguous:
        that is a reason for the work queue, never a guess.
        """
        tried = []
        for kind, value in keys:
            if not value:
                continue
            tried.append(f"{kind} {value}")
            if kind in ("message-id", "control"):
                ids = {r[0] for r in self.conn.execute(
                    "SELECT referral_id FROM outbox WHERE message_id = ? AND referral_id IS NOT NULL", (value,))}
            else:
                # Referral ids are indexed as themselves; other ids (appointment, document, filler)
                # as "kind:value", so an appointment "12345" never meets a referral "12345".
                key = value if kind in ("referral", "placer") else f"{kind}:{value}"
                rows = self.conn.execute("SELECT referral_id, strength FROM referral_keys WHERE key = ?",
                                         (key,)).fetchall()
                best = min((r[1] for r in rows), default=None)
                ids = {r[0] for r in rows if r[1] == best}
            if len(ids) == 1:
                return Match(ids.pop())
            if len(ids) > 1:
                return Match(None, f"{kind} {value} names {len(ids)} referrals: " + ", ".join(sorted(ids)[:5]))
        return Match(None, "no referral matches " + ("; ".join(tried) if tried else "(the message names none)"))

    # -- events ---------------------------------------------------------------------------

    def apply(self, referral_id: str, events: Iterable[Event], *, at: str, actor: str, origin: str = "") -> Applied:
        """Add *events* (duplicates ignored), recompute the referral, audit each new event; one transaction."""
        s = self.store
        with s._lock, s._transaction():
            return self._apply(referral_id, list(events), at=at, actor=actor, origin=origin)

    def _apply(self, referral_id: str, events: list[Event], *, at: str, actor: str, origin: str,
               missing_ok: bool = False, once: bool = False) -> Applied | None:
        c = self.conn
        row = c.execute(_READ_DERIVED, (referral_id,)).fetchone()
        if row is None:
            if missing_ok:
                return None
            raise KeyError(f"no referral {referral_id}")
        before, auth = State(row[0]), row[1]
        # The events so far, read before the new ones go in (they follow in id order): one read
        # serves the *once* check and the recomputation.
        every = self.events(referral_id)
        if once and any(p.kind == e.kind for p in every for e in events):
            return Applied(referral_id, 0, before, before)
        added = []
        for e in events:
            cur = c.execute(
                "INSERT OR IGNORE INTO loop_events (referral_id, kind, at, appointment, starts, source, received_at, "
                "origin) VALUES (?,?,?,?,?,?,?,?)",
                (referral_id, e.kind.value, e.at, e.appointment, e.starts, e.source, at, origin))
            if cur.rowcount:
                # As events() would read it back (NULL columns as ""): the recomputation below uses it.
                added.append(Event(e.kind, e.at, e.appointment or "", e.starts or "", e.source or ""))
        if not added:
            return Applied(referral_id, 0, before, before)
        every += added
        after = state(observe_all(every))
        stages = stage_times(every)
        fields = {col: stages.get(st) for st, col in _STAGE_COLUMNS.items()}
        fields["final_at"] = stages.get(after) if after.final and after != State.CLOSED else fields["closed_at"]
        for name, a, b in DURATIONS:
            fields[name] = _seconds(fields[a], fields[b])
        fields.update(state=after.value, state_at=at if after != before else row[2],
                      due_at=at)   # the timers look at it again at their next run (they know the policy)
        if auth == "required" and any(e.kind == Kind.AUTH_APPROVED for e in added):
            fields["auth"] = "approved"   # the engine's timer tick releases the held send
        # Only what changed is written (with updated_at): SQLite rewrites the entry of every index on a
        # column named in SET, changed or not, and referrals has ten; the row read above is this
        # transaction's, so the result is the same as writing every column.
        old = dict(zip(_DERIVED, row))
        changed = {k: v for k, v in fields.items() if old[k] != v}
        changed["updated_at"] = at
        sets = ", ".join(f"{k} = ?" for k in changed)
        c.execute(f"UPDATE referrals SET {sets} WHERE referral_id = ?", [*changed.values(), referral_id])
        for e in added:
            # Each audit row says what this event did; the last one ends at the recomputed state.
            outcome = after.value if e is added[-1] else before.value
            append_row(c, at=at, actor=actor, referral_id=referral_id, event=e.kind.value, source=e.source or origin,
                       outcome=outcome, detail=f"event time {e.at}" + (f"; {before.value} -> {after.value}"
                                                                       if e is added[-1] and after != before else ""))
        return Applied(referral_id, len(added), before, after)

    def apply_if_known(self, referral_id: str, kind: Kind, *, at: str, source: str, actor: str = "transport",
                       once: bool = False) -> None:
        """A transport's news about a referral this store knows (none: a test or a pre-loop packet).
        *once*: not when the referral has that kind of event already (a dispatched MDN after the
        processed one is the same receipt, not a second)."""
        s = self.store
        with s._lock, s._transaction():
            self._apply(referral_id, [Event(kind, at, source=source)], at=at, actor=actor, origin=source,
                        missing_ok=True, once=once)

    def set_schedule(self, referral_id: str, due_at: str | None, overdue_at: str | None) -> None:
        s = self.store
        with s._lock, s._transaction():
            self.conn.execute("UPDATE referrals SET due_at = ?, overdue_at = ? WHERE referral_id = ?",
                              (due_at, overdue_at, referral_id))

    def set_auth(self, referral_id: str, *, auth: str, number: str = "", at: str, actor: str, source: str = "") -> None:
        s = self.store
        with s._lock, s._transaction():
            self.conn.execute("UPDATE referrals SET auth = ?, auth_number = ?, updated_at = ? WHERE referral_id = ?",
                              (auth, number, at, referral_id))
            append_row(self.conn, at=at, actor=actor, referral_id=referral_id, event=f"AUTH_{auth.upper()}",
                       source=source, outcome=auth, detail=f"authorization {number}" if number else "")

    def released(self, limit: int = 100) -> list[str]:
        """Referrals whose authorization was approved since the last look: marked released, returned once."""
        s = self.store
        with s._lock, s._transaction():
            ids = [r[0] for r in self.conn.execute(
                "SELECT referral_id FROM referrals WHERE auth = 'approved' LIMIT ?", (int(limit),))]
            self.conn.executemany("UPDATE referrals SET auth = 'released' WHERE referral_id = ?", [(i,) for i in ids])
            return ids

    def due(self, now_iso: str, limit: int = 500) -> list[str]:
        """Referrals with an SLA item due by *now* (open or not: a closed one may owe a follow-up task)."""
        return [r[0] for r in self.conn.execute(
            "SELECT referral_id FROM referrals WHERE due_at IS NOT NULL AND due_at <= ? ORDER BY due_at LIMIT ?",
            (now_iso, int(limit)))]

    # -- SLA ledger -------------------------------------------------------------------------

    def done_keys(self, referral_id: str) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM sla_actions WHERE referral_id = ?", (referral_id,))}

    def fire(self, *, key: str, referral_id: str, rule: str, action: str, due_at: str, at: str, owner: str,
             outcome: str, actor: str = "timers") -> bool:
        """Record that an SLA item was acted on; False if it had been already (nothing is written)."""
        s = self.store
        with s._lock, s._transaction():
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO sla_actions (key, referral_id, rule, action, due_at, fired_at, owner, outcome) "
                "VALUES (?,?,?,?,?,?,?,?)", (key, referral_id, rule, action, due_at, at, owner, outcome))
            if cur.rowcount:
                append_row(self.conn, at=at, actor=actor, referral_id=referral_id, event=f"SLA {rule}", source=key,
                           outcome=outcome, detail=f"due {due_at}; owner {owner}")
            return bool(cur.rowcount)

    def sla_actions(self, referral_id: str) -> list[dict]:
        return _dicts(self.conn, "SELECT * FROM sla_actions WHERE referral_id = ? ORDER BY fired_at, key",
                      [referral_id])

    # -- work queue -------------------------------------------------------------------------

    def park(self, *, at: str, origin: str, message_type: str, keys: Iterable[tuple[str, str]], reason: str,
             raw: bytes | None) -> int:
        s = self.store
        with s._lock, s._transaction():
            return self._park(at=at, origin=origin, message_type=message_type, keys=keys, reason=reason, raw=raw)

    def _park(self, *, at, origin, message_type, keys, reason, raw) -> int:
        cur = self.conn.execute(
            "INSERT INTO workqueue (created_at, origin, message_type, keys, reason, raw, status) "
            "VALUES (?,?,?,?,?,?,'open')",
            (at, origin, message_type, json.dumps([list(k) for k in keys]), reason, raw))
        append_row(self.conn, at=at, actor="engine", event="WORKQUEUE", source=origin, outcome="parked",
                   detail=f"#{cur.lastrowid} {message_type}: {reason}")
        return cur.lastrowid

    def workqueue(self, *, status: str | None = "open", limit: int = 50) -> list[dict]:
        clause, args = where_equal(status=status)
        return _dicts(
            self.conn, f"SELECT id, created_at, origin, message_type, keys, reason, status, resolved_at, resolved_by, "
            f"referral_id, resolution, length(raw) AS size FROM workqueue {clause} ORDER BY id LIMIT ?",
            [*args, int(limit)])

    def waiting_for(self, ids: Iterable[str], limit: int = 100) -> list[dict]:
        """Open work-queue items whose keys name any of *ids* (exactly, as a JSON string value)."""
        out: dict[int, dict] = {}
        for value in ids:
            if not value:
                continue
            pattern = "%" + json.dumps(value).replace("%", "\\%").replace("_", "\\_") + "%"
            for r in self.store.db.query("SELECT * FROM workqueue WHERE status = 'open' AND keys LIKE ? ESCAPE '\\' "
                                         "ORDER BY id LIMIT ?", [pattern, int(limit)]):
                out[r["id"]] = dict(r)
        return [out[k] for k in sorted(out)]

    def work_item(self, item_id: int) -> dict | None:
        rows = list(self.store.db.query("SELECT * FROM workqueue WHERE id = ?", [int(item_id)]))
        return rows[0] if rows else None

    def resolve(self, item_id: int, *, at: str, by: str, resolution: str, referral_id: str | None = None) -> None:
        s = self.store
        with s._lock, s._transaction():
            self.conn.execute(
                "UPDATE workqueue SET status = 'resolved', resolved_at = ?, resolved_by = ?, resolution = ?, "
                "referral_id = coalesce(?, referral_id) WHERE id = ?", (at, by, resolution, referral_id, item_id))
            self.conn.execute("UPDATE notes SET referral_id = coalesce(referral_id, ?) WHERE workqueue_id = ?",
                              (referral_id, item_id))
            append_row(self.conn, at=at, actor=by, referral_id=referral_id, event="WORKQUEUE_RESOLVED",
                       source=f"workqueue #{item_id}", outcome="resolved", detail=resolution)

    # -- alerts ------------------------------------------------------------------------------

    def alert(self, *, key: str, kind: str, text: str, at: str, owner: str, referral_id: str | None = None,
              channel: str | None = None) -> bool:
        """A coordinator alert, once per key, with its owner (never a shared void)."""
        s = self.store
        with s._lock, s._transaction():
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO alerts (created_at, kind, referral_id, channel, text, owner, key) "
                "VALUES (?,?,?,?,?,?,?)", (at, kind, referral_id, channel, text, owner, key))
            return bool(cur.rowcount)

    def alerts(self, referral_id: str) -> list[dict]:
        return [dict(r) for r in self.store.db.query(
            "SELECT * FROM alerts WHERE referral_id = ? ORDER BY id", [referral_id])]

    # -- notes ------------------------------------------------------------------------------

    def save_note(self, *, referral_id: str | None, at: str, kind: str, format: str, media_type: str, title: str,
                  content: bytes, origin: str, workqueue_id: int | None = None, document_id: str = "",
                  parent_document_id: str = "", revision: str = "") -> int:
        s = self.store
        with s._lock, s._transaction():
            return self.conn.execute(
                "INSERT INTO notes (referral_id, received_at, kind, format, media_type, title, content, origin, "
                "workqueue_id, document_id, parent_document_id, revision) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (referral_id, at, kind, format, media_type, title, content, origin, workqueue_id,
                 document_id or None, parent_document_id or None, revision)).lastrowid

    def note_by_document(self, referral_id: str, document_id: str, *, before: int) -> dict | None:
        """The latest note of *referral_id* kept before note *before* with this document id (TXA-12)."""
        rows = _dicts(self.conn, "SELECT * FROM notes WHERE referral_id = ? AND document_id = ? AND id < ? "
                      "ORDER BY id DESC LIMIT 1", [referral_id, document_id, int(before)])
        return rows[0] if rows else None

    def notes(self, referral_id: str | None = None, *, limit: int = 50) -> list[dict]:
        clause, args = where_equal(referral_id=referral_id)
        return _dicts(
            self.conn, f"SELECT id, referral_id, received_at, kind, format, media_type, title, origin, workqueue_id, "
            f"returned_at, length(content) AS size FROM notes {clause} ORDER BY id LIMIT ?", [*args, int(limit)])

    def note(self, note_id: int) -> dict | None:
        rows = list(self.store.db.query("SELECT * FROM notes WHERE id = ?", [int(note_id)]))
        return rows[0] if rows else None

    def note_of_item(self, item_id: int) -> int | None:
        """The note kept with a work-queue item, if it carried one."""
        row = self.conn.execute("SELECT id FROM notes WHERE workqueue_id = ? ORDER BY id LIMIT 1",
                                (item_id,)).fetchone()
        return row[0] if row else None

    def note_returned(self, note_id: int, at: str) -> None:
        s = self.store
        with s._lock, s._transaction():
            self.conn.execute("UPDATE notes SET returned_at = ? WHERE id = ?", (at, note_id))

    # -- tasks ------------------------------------------------------------------------------

    def add_task(self, *, key: str, at: str, referral_id: str | None, kind: str, owner: str, text: str,
                 due_at: str | None = None) -> int | None:
        """A task for people, once per key (None: it existed)."""
        s = self.store
        with s._lock, s._transaction():
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO tasks (key, created_at, referral_id, kind, owner, text, due_at) "
                "VALUES (?,?,?,?,?,?,?)", (key, at, referral_id, kind, owner, text, due_at))
            if not cur.rowcount:
                return None
            append_row(self.conn, at=at, actor="engine", referral_id=referral_id, event="TASK", source=key,
                       outcome="open", detail=f"{kind} for {owner}")
            return cur.lastrowid

    def tasks(self, *, open_only: bool = True, owner: str | None = None, referral_id: str | None = None,
              limit: int = 50) -> list[dict]:
        clause, args = where_equal(owner=owner, referral_id=referral_id)
        if open_only:
            clause = (clause + " AND " if clause else "WHERE ") + "done_at IS NULL"
        return _dicts(self.conn, f"SELECT * FROM tasks {clause} ORDER BY id LIMIT ?", [*args, int(limit)])

    def task(self, task_id: int) -> dict | None:
        rows = list(self.store.db.query("SELECT * FROM tasks WHERE id = ?", [int(task_id)]))
        return rows[0] if rows else None

    def task_done(self, task_id: int, *, at: str, by: str, note: str = "") -> bool:
        s = self.store
        with s._lock, s._transaction():
            row = self.conn.execute("SELECT referral_id, kind, done_at FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None or row[2] is not None:
                return False
            self.conn.execute("UPDATE tasks SET done_at = ?, done_by = ?, note = ? WHERE id = ?",
                              (at, by, note, task_id))
            if row[1] == "file-note" and row[0]:
                # No return interface: a person filed the note in the chart; that closes the loop.
                self._apply(row[0], [Event(Kind.NOTE_FILED, at, source=f"task #{task_id} done by {by}")], at=at,
                            actor=by, origin=f"task #{task_id}")
            append_row(self.conn, at=at, actor=by, referral_id=row[0], event="TASK_DONE", source=f"task #{task_id}",
                       outcome="done", detail=row[1])
            return True

    # -- notifications ------------------------------------------------------------------------

    def queue_notification(self, *, key: str, at: str, referral_id: str, rule: str, audience: str, notifier: str,
                           owner: str, recipient: str, subject: str, body: str, data: dict, now: float,
                           state: str = "pending") -> int | None:
        """One message to a person per (key, notifier); None if it was queued before."""
        s = self.store
        with s._lock, s._transaction():
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO notifications (key, created_at, referral_id, rule, audience, notifier, owner, "
                "recipient, subject, body, data, state, attempts, next_attempt_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0,?)",
                (key, at, referral_id, rule, audience, notifier, owner, recipient, subject, body,
                 json.dumps(data, sort_keys=True), state, now))
            return cur.lastrowid if cur.rowcount else None

    def notifications_due(self, now: float, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self.store.db.query(
            "SELECT * FROM notifications WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at, id "
            "LIMIT ?", [now, int(limit)])]

    def next_notification(self) -> float | None:
        return self.conn.execute("SELECT min(next_attempt_at) FROM notifications WHERE state = 'pending'").fetchone()[0]

    def notification_result(self, notification_id: int, *, state: str, at: str, error: str = "",
                            next_attempt_at: float | None = None) -> None:
        s = self.store
        with s._lock, s._transaction():
            self.conn.execute(
                "UPDATE notifications SET state = ?, attempts = attempts + 1, last_error = ?, "
                "sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END, "
                "next_attempt_at = coalesce(?, next_attempt_at) WHERE id = ?",
                (state, error, state, at, next_attempt_at, notification_id))
            row = self.conn.execute("SELECT referral_id, key, notifier FROM notifications WHERE id = ?",
                                    (notification_id,)).fetchone()
            if state in ("sent", "failed") and row:
                append_row(self.conn, at=at, actor=f"notifier {row[2]}", referral_id=row[0], event="NOTIFY",
                           source=row[1], outcome=state, detail=error)

    def notifications(self, *, referral_id: str | None = None, state: str | None = None, limit: int = 50) -> list[dict]:
        clause, args = where_equal(referral_id=referral_id, state=state)
        return _dicts(
            self.conn, f"SELECT id, key, created_at, referral_id, rule, audience, notifier, owner, recipient, subject, "
            f"state, attempts, sent_at, last_error FROM notifications {clause} ORDER BY id LIMIT ?",
            [*args, int(limit)])

    # -- loop messages ---------------------------------------------------------------------------

    def unapplied(self, channels: list[str], limit: int = 500) -> list[dict]:
        """Accepted loop messages not yet applied (oldest first)."""
        if not channels:
            return []
        marks = ",".join("?" * len(channels))
        return [dict(r) for r in self.store.db.query(
            f"SELECT id, channel, raw, charset, message_type, control_id FROM messages WHERE applied_at IS NULL "
            f"AND status = 'accepted' AND channel IN ({marks}) ORDER BY id LIMIT ?", [*channels, int(limit)])]

    def mark_applied(self, message_id: int, at: str) -> None:
        self.conn.execute("UPDATE messages SET applied_at = ? WHERE id = ?", (at, message_id))

    # -- report --------------------------------------------------------------------------------

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction over the memory-mapped file, for reads that walk whole indexes.

        One snapshot: the groups, the overdue counts and the stage times agree with each other
        while the engine writes. Mapped: SQLite reads each index page in place instead of copying
        it through read() (a fifth to a quarter of the report's time on a million referrals, in a
        fresh process). Both end with the read (a SAVEPOINT nests in a caller's transaction); the
        connection is left as it was. The engine never shrinks the file (no VACUUM), so a mapping
        cannot outlive its pages.
        """
        c = self.conn
        mapped = c.execute("PRAGMA mmap_size").fetchone()[0]
        c.execute(f"PRAGMA mmap_size = {_MAP_BYTES}")
        try:
            c.execute("SAVEPOINT loop_snapshot")
            try:
                yield
            finally:
                c.execute("RELEASE loop_snapshot")
        finally:
            c.execute(f"PRAGMA mmap_size = {int(mapped)}")

    def report(self, *, since: str | None = None) -> dict:
        """Completion and leakage by specialty and destination; median and p90 seconds per stage.

        Completed = CLOSED (the note is back). Leaked = ended without the note (DECLINED,
        CANCELLED) or still open and overdue. Every query reads a covering index in its order
        (referrals_report, referrals_overdue, referrals_d_*, and referrals_created for the stage
        counts since a date; created_at is in each), so a million referrals cost index scans,
        never a sort of the table nor a row lookup; all of them in one snapshot (:meth:`_snapshot`).
        """
        with self._snapshot():
            return self._report(since)

    def _report(self, since: str | None) -> dict:
        where, args = ("WHERE created_at >= ?", [since]) if since else ("", [])
        # Counted per (specialty, destination, state) in the index's order, then folded: grouping on
        # coalesce() directly would sort every row in a temporary b-tree.
        groups = _dicts(
            self.conn,
            f"SELECT coalesce(specialty, '') AS specialty, coalesce(destination, '') AS destination, "
            f"sum(n) AS referrals, sum(CASE WHEN state = 'CLOSED' THEN n ELSE 0 END) AS completed, "
            f"sum(CASE WHEN state IN ('DECLINED', 'CANCELLED') THEN n ELSE 0 END) AS ended_without_note, "
            f"sum(CASE WHEN state NOT IN ('DECLINED', 'CANCELLED', 'CLOSED') THEN n ELSE 0 END) AS open "
            f"FROM (SELECT specialty, destination, state, count(*) AS n FROM referrals INDEXED BY referrals_report "
            f"{where} GROUP BY specialty, destination, state) GROUP BY 1, 2 ORDER BY 1, 2", args)
        overdue = {(r[0], r[1]): r[2] for r in self.conn.execute(
            f"SELECT coalesce(specialty, ''), coalesce(destination, ''), count(*) FROM referrals "
            f"INDEXED BY referrals_overdue WHERE overdue_at IS NOT NULL {'AND created_at >= ?' if since else ''} "
            f"GROUP BY 1, 2", args)}
        for g in groups:
            g["overdue"] = overdue.get((g["specialty"], g["destination"]), 0)
            g["leaked"] = g["ended_without_note"] + g["overdue"]
            g["completion_rate"] = round(g["completed"] / g["referrals"], 4) if g["referrals"] else 0.0
            g["leakage_rate"] = round(g["leaked"] / g["referrals"], 4) if g["referrals"] else 0.0
        stages = {}
        if since:   # one walk of the created_at range counts every stage (the index carries the durations)
            counts = self.conn.execute(
                "SELECT " + ", ".join(f"count({name})" for name, _, _ in DURATIONS)
                + " FROM referrals INDEXED BY referrals_created WHERE created_at >= ?", args).fetchone()
        for i, (name, _, _) in enumerate(DURATIONS):
            n = counts[i] if since else self.conn.execute(
                f"SELECT count(*) FROM referrals INDEXED BY referrals_{name} WHERE {name} IS NOT NULL").fetchone()[0]
            stages[name[2:]] = {"n": n, "median_s": self._percentile(name, n, 0.5, since),
                                "p90_s": self._percentile(name, n, 0.9, since)}
        counted = ("referrals", "completed", "ended_without_note", "open", "overdue", "leaked")
        total = {k: sum(g[k] for g in groups) for k in counted}
        total["completion_rate"] = round(total["completed"] / total["referrals"], 4) if total["referrals"] else 0.0
        total["leakage_rate"] = round(total["leaked"] / total["referrals"], 4) if total["referrals"] else 0.0
        return {"since": since, "total": total, "groups": groups, "stages": stages}

    def _percentile(self, column: str, n: int, q: float, since: str | None) -> float | None:
        if n == 0:
            return None
        k = min(n - 1, int(q * (n - 1) + 0.5))   # nearest rank
        # The k-th from the bottom is the (n-1-k)-th from the top: walk the index from the nearer end
        # (the p90 walks a tenth of it, not nine tenths).
        order, offset = ("DESC", n - 1 - k) if k > (n - 1) / 2 else ("", k)
        if since:
            row = self.conn.execute(f"SELECT {column} FROM referrals INDEXED BY referrals_{column} WHERE {column} "
                                    f"IS NOT NULL AND created_at >= ? ORDER BY {column} {order} LIMIT 1 OFFSET ?",
                                    (since, offset)).fetchone()
        else:
            row = self.conn.execute(f"SELECT {column} FROM referrals INDEXED BY referrals_{column} WHERE {column} "
                                    f"IS NOT NULL ORDER BY {column} {order} LIMIT 1 OFFSET ?", (offset,)).fetchone()
        return row[0] if row else None
