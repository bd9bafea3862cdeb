"""The SQLite store (sqlite-utils over the stdlib driver).

Invariants
----------
* Durability: the database runs in WAL mode with ``synchronous=FULL`` and
  ``foreign_keys=ON``; :meth:`Store.open` reads the pragmas back and refuses to
  open (``StoreError``) if any did not take, or if the file cannot be written.
  (WAL + NORMAL may lose a committed transaction on power loss.)
* :meth:`Store.commit_batch` is one transaction: every record in it is stored,
  or none is and it raises. The caller sends no positive ACK unless it returned.
* Deduplication: at most one *accepted* message per (MSH-3, MSH-4, MSH-10)
  (a partial unique index). A record for a key already accepted is a duplicate
  when its bytes are identical (the stored ACK is returned, byte for byte, and
  nothing new is stored) and a conflict otherwise (stored as rejected with the
  205 NAK; the original row is untouched).
* Raw bytes are stored exactly as received, for every frame, accepted or not.
  The decoded text is stored beside them only when it differs from the raw
  bytes read as ASCII; :meth:`Store.get_message` always returns it.
* Checkpoints: a store opened with ``autocheckpoint=False`` never copies WAL
  frames into the database inside a commit (which made some commits last
  many milliseconds); the engine runs a :class:`Checkpointer` on a second
  connection instead.
* One connection, one thread. A :class:`Store` is used by a single thread at
  a time: sqlite-utils wraps every read in a SAVEPOINT, so a read from a second
  thread on the same connection opens, closes or breaks the first thread's
  transaction ("cannot start a transaction within a transaction"). Each thread
  that touches the database opens its own :class:`Store` on the same file;
  WAL lets their readers run beside the one writer, ``busy_timeout`` queues
  their writers.
* No SQL outside this package.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

ACCEPTED, REJECTED, NOT_HL7 = "accepted", "rejected", "not_hl7"


class StoreError(RuntimeError):
    """The store cannot be opened or written; one readable line."""


@dataclass(slots=True)
class Inbound:
    """One received frame, ready to commit."""

    raw: bytes
    received_at: str
    status: str  # ACCEPTED, REJECTED or NOT_HL7
    listener: str = ""
    peer: str = ""
    channel: str | None = None
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""
    control_id: str = ""
    referral_id: str = ""
    charset: str = ""
    text: str | None = None
    ack: bytes | None = None
    ack_code: str | None = None
    error: str = ""
    # Builds the 205 NAK for a same-id-different-content conflict, given the
    # original row's id. Called inside the transaction, so it must be pure.
    conflict_ack: Callable[[int], tuple[bytes | None, str]] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "stored", "duplicate" or "conflict"
    message_id: int
    ack: bytes | None


_MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def _migration(fn: Callable[[sqlite_utils.Database], None]) -> Callable[[sqlite_utils.Database], None]:
    _MIGRATIONS.append(fn)
    return fn


@_migration
def _v1_messages(db: sqlite_utils.Database) -> None:
    db["messages"].create(
        {
            "id": int, "received_at": str, "listener": str, "peer": str, "channel": str,
            "status": str, "sending_application": str, "sending_facility": str,
            "message_type": str, "control_id": str, "referral_id": str, "charset": str,
            "raw": bytes, "raw_sha256": str, "text": str, "ack": bytes, "ack_code": str,
            "error": str, "duplicates": int,
        },
        pk="id",
        not_null={"received_at", "status", "raw", "raw_sha256"},
        defaults={"duplicates": 0},
    )
    db.execute(
        "CREATE UNIQUE INDEX messages_dedup ON messages"
        "(sending_application, sending_facility, control_id) WHERE status = 'accepted'"
    )
    db["messages"].create_index(["control_id"], index_name="messages_control_id")
    db["messages"].create_index(["referral_id"], index_name="messages_referral_id")
    db["meta"].create({"key": str, "value": str}, pk="key")


@_migration
def _v2_documents_and_alerts(db: sqlite_utils.Database) -> None:
    db["documents"].create(
        {"id": int, "message_id": int, "channel": str, "referral_id": str, "kind": str, "status": str,
         "destination": str, "xml": bytes, "reasons": str, "created_at": str},
        pk="id", foreign_keys=[("message_id", "messages", "id")],
        not_null={"message_id", "status", "created_at"},
    )
    db["documents"].create_index(["message_id"], index_name="documents_message", unique=True)
    db["documents"].create_index(["referral_id"], index_name="documents_referral")
    db["alerts"].create(
        {"id": int, "created_at": str, "kind": str, "referral_id": str, "message_id": int, "channel": str,
         "text": str, "owner": str, "resolved_at": str},
        pk="id", not_null={"created_at", "kind", "text"},
    )


@_migration
def _v3_outbox_and_mail(db: sqlite_utils.Database) -> None:
    # One row per send attempt of a packet: the idempotency key (referral/transport/attempt) is unique,
    # so enqueuing twice (a crash between build and enqueue, a recovery race) never sends twice; the
    # Message-ID is fixed at enqueue, so every SMTP retry of the attempt carries the same one.
    db["outbox"].create(
        {"id": int, "created_at": str, "idempotency_key": str, "referral_id": str, "document_id": int,
         "channel": str, "transport": str, "kind": str, "sender": str, "recipient": str, "message_id": str,
         "payload": bytes, "state": str, "attempts": int, "next_attempt_at": float, "deadline": float,
         "final_delivery": int, "sent_at": float, "processed_at": float, "dispatched_at": float,
         "last_code": int, "last_error": str, "updated_at": str},
        pk="id", not_null={"created_at", "idempotency_key", "transport", "kind", "state"},
        defaults={"attempts": 0, "final_delivery": 0},
    )
    db["outbox"].create_index(["idempotency_key"], index_name="outbox_key", unique=True)
    db["outbox"].create_index(["message_id"], index_name="outbox_message_id")
    db["outbox"].create_index(["state", "next_attempt_at"], index_name="outbox_due")
    db["outbox"].create_index(["referral_id"], index_name="outbox_referral")
    # Inbound mail is committed before the SMTP 250, exactly as received.
    db["mail"].create(
        {"id": int, "received_at": str, "mail_from": str, "rcpt_to": str, "raw": bytes, "raw_sha256": str,
         "message_id": str, "status": str, "kind": str, "from_address": str, "trust": str, "detail": str,
         "original_message_id": str, "outbox_id": int, "processed_at": str},
        pk="id", not_null={"received_at", "raw", "raw_sha256", "status"},
    )
    db["mail"].create_index(["status"], index_name="mail_status")
    # The transport audit trail: every state change and every refusal, with its reason (no PHI).
    db["transport_events"].create(
        {"id": int, "at": str, "outbox_id": int, "mail_id": int, "referral_id": str, "event": str,
         "state": str, "detail": str},
        pk="id", not_null={"at", "event"},
    )
    db["transport_events"].create_index(["outbox_id"], index_name="transport_events_outbox")


@_migration
def _v4_fax(db: sqlite_utils.Database) -> None:
    # A fax attempt is an outbox row too (transport "fax"): the gateway that took it (plugin and
    # route, e.g. "hylafax@default") and the gateway's job id. Not unique: a HylaFAX whose spool
    # was rebuilt numbers its jobs from 1 again, so an old finished attempt may share an id with
    # a new one; the agent refuses an id only while another attempt still waits on it.
    db["outbox"].add_column("gateway", str)
    db["outbox"].add_column("job_id", str)
    db["outbox"].add_column("find_first", int)   # the gateway may hold a job we have not recorded: look first
    db["outbox"].create_index(["gateway", "job_id"], index_name="outbox_job")
    # Status callbacks are kept as received before the HTTP 200, then applied; one that
    # overtakes the submit answer (its job id not yet recorded) waits here until it matches.
    db["fax_callbacks"].create(
        {"id": int, "received_at": str, "channel": str, "gateway": str, "job_id": str, "key": str,
         "status": str, "detail": str, "body": bytes, "outbox_id": int, "applied_at": str, "result": str},
        pk="id", not_null={"received_at", "body"},
    )
    db["fax_callbacks"].create_index(["applied_at"], index_name="fax_callbacks_pending")


@_migration
def _v5_audit_log(db: sqlite_utils.Database) -> None:
    # The referral audit trail: append-only and hash-chained (store/audit.py). The triggers
    # stop an UPDATE or DELETE by mistake; one who drops them is caught by `audit verify`.
    db["audit_log"].create(
        {"id": int, "at": str, "actor": str, "referral_id": str, "event": str, "source": str, "outcome": str,
         "detail": str, "prev_hash": str, "hash": str},
        pk="id", not_null={"at", "actor", "event", "outcome", "prev_hash", "hash"},
    )
    db["audit_log"].create_index(["referral_id"], index_name="audit_log_referral")
    db.execute("CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
               "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END")
    db.execute("CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
               "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END")


@_migration
def _v6_loop(db: sqlite_utils.Database) -> None:
    # One row per referral: its business state and what reports and overdue lists read, kept
    # up to date with every event (store/loop.py) so a million referrals answer in milliseconds.
    # Stage times are ISO-8601 UTC; durations (seconds from the stage before) feed percentiles.
    db["referrals"].create(
        {"referral_id": str, "created_at": str, "updated_at": str, "message_id": int, "channel": str,
         "specialty": str, "destination": str, "payer": str, "veterinary": int, "contact": str, "state": str,
         "state_at": str, "sent_at": str, "delivered_at": str, "accepted_at": str, "scheduled_at": str,
         "seen_at": str, "closed_at": str, "final_at": str, "d_delivered": float, "d_accepted": float,
         "d_scheduled": float, "d_seen": float, "d_closed": float, "due_at": str, "overdue_at": str,
         "auth": str, "auth_number": str, "owner": str},
        pk="referral_id", not_null={"created_at", "state"}, defaults={"veterinary": 0, "auth": ""},
    )
    db["referrals"].create_index(["state", "created_at"], index_name="referrals_state")
    # The report's indexes cover its queries (created_at included for --since): a million referrals
    # are read from the indexes alone, in their order, never row by row.
    db["referrals"].create_index(["specialty", "destination", "state", "created_at"], index_name="referrals_report")
    db["referrals"].create_index(["created_at", "d_delivered", "d_accepted", "d_scheduled", "d_seen", "d_closed"],
                                 index_name="referrals_created")
    db.execute("CREATE INDEX referrals_due ON referrals(due_at) WHERE due_at IS NOT NULL")
    db.execute("CREATE INDEX referrals_overdue ON referrals(overdue_at, specialty, destination, created_at) "
               "WHERE overdue_at IS NOT NULL")
    for d in ("d_delivered", "d_accepted", "d_scheduled", "d_seen", "d_closed"):
        db.execute(f"CREATE INDEX referrals_{d} ON referrals({d}, created_at) WHERE {d} IS NOT NULL")
    # The exact forms under which an inbound message may name a referral (placer id, EI, root|ext).
    db["referral_keys"].create({"key": str, "referral_id": str, "strength": int}, pk=("key", "referral_id"))
    # Every event about a referral once: the same message seen twice is one row.
    db["loop_events"].create(
        {"id": int, "referral_id": str, "kind": str, "at": str, "appointment": str, "starts": str, "source": str,
         "received_at": str, "origin": str},
        pk="id", not_null={"referral_id", "kind", "at"}, defaults={"appointment": "", "starts": "", "source": ""},
    )
    db.execute("CREATE UNIQUE INDEX loop_events_once ON loop_events"
               "(referral_id, kind, at, appointment, starts, source)")
    # What matched no referral (or could not be read): kept whole, with the reason, until someone resolves it.
    db["workqueue"].create(
        {"id": int, "created_at": str, "origin": str, "message_type": str, "keys": str, "reason": str, "raw": bytes,
         "status": str, "resolved_at": str, "resolved_by": str, "referral_id": str, "resolution": str},
        pk="id", not_null={"created_at", "origin", "reason", "status"},
    )
    db["workqueue"].create_index(["status"], index_name="workqueue_status")
    # Notes from the specialist (consult / interim), kept whatever their referral's fate.
    db["notes"].create(
        {"id": int, "referral_id": str, "received_at": str, "kind": str, "format": str, "media_type": str,
         "title": str, "content": bytes, "origin": str, "workqueue_id": int, "returned_at": str},
        pk="id", not_null={"received_at", "kind"},
    )
    db["notes"].create_index(["referral_id"], index_name="notes_referral")
    # Work for people: a review of the returned note, a follow-up, a call to make.
    db["tasks"].create(
        {"id": int, "key": str, "created_at": str, "referral_id": str, "kind": str, "owner": str, "text": str,
         "due_at": str, "done_at": str, "done_by": str, "note": str},
        pk="id", not_null={"key", "created_at", "kind", "owner", "text"},
    )
    db["tasks"].create_index(["key"], index_name="tasks_key", unique=True)
    db["tasks"].create_index(["done_at", "owner"], index_name="tasks_open")
    # Every SLA item acted on, once (its key): one stall is one alert, however often timers run.
    db["sla_actions"].create(
        {"key": str, "referral_id": str, "rule": str, "action": str, "due_at": str, "fired_at": str, "owner": str,
         "outcome": str},
        pk="key", not_null={"referral_id", "rule", "fired_at"},
    )
    db["sla_actions"].create_index(["referral_id"], index_name="sla_actions_referral")
    # Messages to people (coordinators, patients or owners, specialists), sent by notifier plugins.
    db["notifications"].create(
        {"id": int, "key": str, "created_at": str, "referral_id": str, "rule": str, "audience": str,
         "notifier": str, "owner": str, "recipient": str, "subject": str, "body": str, "data": str, "state": str,
         "attempts": int, "next_attempt_at": float, "sent_at": str, "last_error": str},
        pk="id", not_null={"key", "created_at", "audience", "owner", "state"}, defaults={"attempts": 0},
    )
    db["notifications"].create_index(["key", "notifier"], index_name="notifications_key", unique=True)
    db["notifications"].create_index(["state", "next_attempt_at"], index_name="notifications_due")
    # Loop messages (SIU, OSU, RRI, MDM, ACK) are applied after their commit; until then this is NULL,
    # so a crash between ACK and apply is caught up at the next start.
    db["messages"].add_column("applied_at", str)
    # An SLA alert is raised once per item (its key); other alerts have no key.
    db["alerts"].add_column("key", str)
    db.execute("CREATE UNIQUE INDEX alerts_key ON alerts(key) WHERE key IS NOT NULL")
    db.execute("CREATE INDEX messages_unapplied ON messages(channel) WHERE applied_at IS NULL AND status = 'accepted'")


@_migration
def _v7_two_sides(db: sqlite_utils.Database) -> None:
    # The specialist's engine keeps the referrals it receives in the same table, with the same
    # states (the recipient's view): side says whose referral it is, partner where answers go
    # (the initiator's Direct address) or come from.
    db["referrals"].add_column("side", str, not_null_default="initiator")
    db["referrals"].add_column("partner", str)
    # 360X messages for the partner, written in the transaction that applied the event they
    # report, packed into Direct packets later by the Direct thread (which holds the keys).
    db["relay"].create(
        {"id": int, "key": str, "created_at": str, "referral_id": str, "kind": str, "message_type": str,
         "message": bytes, "document": bytes, "recipient": str, "outbox_id": int, "packed_at": str, "error": str},
        pk="id", not_null={"key", "created_at", "referral_id", "kind", "recipient"},
    )
    db["relay"].create_index(["key"], index_name="relay_key", unique=True)
    db.execute("CREATE INDEX relay_pending ON relay(id) WHERE packed_at IS NULL")


@_migration
def _v8_note_revisions(db: sqlite_utils.Database) -> None:
    # A note's own document id (TXA-12, the C-CDA's id), the document it revises (TXA-13) and how
    # (the MDM trigger: T04 status, T06 addendum, T08 edit, T10 replacement; '' for an original):
    # a revision goes back to the chart as a revision of the document the chart holds.
    db["notes"].add_column("document_id", str)
    db["notes"].add_column("parent_document_id", str)
    db["notes"].add_column("revision", str, not_null_default="")
    db.execute("CREATE INDEX notes_document ON notes(referral_id, document_id) WHERE document_id IS NOT NULL")


_INSERT = (
    "INSERT OR IGNORE INTO messages (received_at, listener, peer, channel, status, "
    "sending_application, sending_facility, message_type, control_id, referral_id, charset, "
    "raw, raw_sha256, text, ack, ack_code, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_LIST_COLUMNS = (
    "id, received_at, listener, peer, channel, status, sending_application, sending_facility, "
    "message_type, control_id, referral_id, ack_code, error, duplicates, length(raw) AS size"
)


DEFAULT_OWNER = "role:referral-coordinators"


def owner_of(conn: sqlite3.Connection, referral_id: str | None) -> str:
    """Who owns this referral's alerts (chosen by [loop] config when it was opened); never nobody."""
    if referral_id:
        row = conn.execute("SELECT owner FROM referrals WHERE referral_id = ?", (referral_id,)).fetchone()
        if row and row[0]:
            return row[0]
    return DEFAULT_OWNER


def where_equal(**filters: object) -> tuple[str, list]:
    """``WHERE a = ? AND b = ?`` and its arguments for the filters given ("" and None mean "any").

    The names are column names from our own code, never input.
    """
    given = {k: v for k, v in filters.items() if v is not None and v != ""}
    if not given:
        return "", []
    return "WHERE " + " AND ".join(f"{k} = ?" for k in given), list(given.values())


def dicts(conn, sql: str, args: Iterable = ()) -> list[dict]:
    """A read's rows as dicts, straight off the connection: the store-only commands (report,
    referrals list, status) then never import sqlite-utils, which costs more than their query."""
    cur = conn.execute(sql, tuple(args))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur]


class Store:
    """One SQLite file. Writes come from one thread at a time (the committer)."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.conn = conn
        self.path = path
        # Re-entrant, like the transaction: a helper's write inside another's (a loop event
        # inside an outbox state change) joins the outer transaction instead of deadlocking.
        self._lock = threading.RLock()
        self._depth = 0

    @functools.cached_property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils over the connection, made at first use: importing it takes longer than a
        store-only command's query (``report``, ``referrals list``), which read through ``conn``."""
        import sqlite_utils
        return sqlite_utils.Database(self.conn)

    @classmethod
    def open(cls, path: str | Path, *, busy_timeout_ms: int = 5000, readonly: bool = False,
             autocheckpoint: bool = True) -> Store:
        path = str(path)
        try:
            if readonly:
                if not Path(path).exists():
                    raise StoreError(f"store {path} does not exist")
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            else:
                if Path(path).parent and not Path(path).parent.exists():
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            store = cls(conn, path)
            if not readonly:
                store._configure()
                if not autocheckpoint:
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                store._migrate()
                store._probe_write()
            return store
        except sqlite3.Error as exc:
            raise StoreError(f"store {path}: {exc}") from None
        except OSError as exc:
            raise StoreError(f"store {path}: {exc.strerror or exc}") from None

    def _configure(self) -> None:
        c = self.conn
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = FULL")
        c.execute("PRAGMA foreign_keys = ON")
        got = self.pragmas()
        if got["journal_mode"] != "wal":
            raise StoreError(f"store {self.path}: journal_mode is {got['journal_mode']}, WAL required")
        if got["synchronous"] not in (2, 3):
            raise StoreError(f"store {self.path}: synchronous is {got['synchronous']}, FULL required")
        if got["foreign_keys"] != 1:
            raise StoreError(f"store {self.path}: foreign_keys could not be enabled")

    def pragmas(self) -> dict[str, object]:
        c = self.conn
        return {
            "journal_mode": c.execute("PRAGMA journal_mode").fetchone()[0],
            "synchronous": c.execute("PRAGMA synchronous").fetchone()[0],
            "foreign_keys": c.execute("PRAGMA foreign_keys").fetchone()[0],
        }

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        for number, migration in enumerate(_MIGRATIONS[version:], start=version + 1):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                migration(self.db)
                self.conn.execute(f"PRAGMA user_version = {number}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def _probe_write(self) -> None:
        # A read-only file opens fine and even reads; find out now, not at the
        # first message.
        with self._transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_open', datetime('now'))")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; nested uses join the outermost (which alone commits or rolls back)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        self._depth = 0
        self.conn.execute("COMMIT")

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Several helpers' writes as one transaction (each helper's own joins this one)."""
        with self._lock, self._transaction():
            yield

    def commit_batch(self, records: Iterable[Inbound]) -> list[Outcome]:
        """Store every record in one transaction (group commit). See invariants."""
        with self._lock:
            try:
                with self._transaction():
                    return [self._store_one(r) for r in records]
            except sqlite3.Error as exc:
                raise StoreError(f"commit failed: {exc}") from None

    def _store_one(self, r: Inbound) -> Outcome:
        c = self.conn
        sha = hashlib.sha256(r.raw).hexdigest()
        params = [r.received_at, r.listener, r.peer, r.channel, r.status,
                  r.sending_application, r.sending_facility, r.message_type, r.control_id,
                  r.referral_id, r.charset, r.raw, sha, r.text, r.ack, r.ack_code, r.error]
        cur = c.execute(_INSERT, params)
        if cur.rowcount == 1:
            return Outcome("stored", cur.lastrowid, r.ack)
        # The partial unique index refused it: this key was accepted before.
        original_id, original_sha, original_ack = c.execute(
            "SELECT id, raw_sha256, ack FROM messages WHERE status = 'accepted' AND "
            "sending_application = ? AND sending_facility = ? AND control_id = ?",
            (r.sending_application, r.sending_facility, r.control_id),
        ).fetchone()
        if original_sha == sha:
            c.execute("UPDATE messages SET duplicates = duplicates + 1 WHERE id = ?", (original_id,))
            return Outcome("duplicate", original_id, original_ack)
        ack, ack_code = r.conflict_ack(original_id) if r.conflict_ack else (None, None)
        params[4] = REJECTED
        params[14] = ack
        params[15] = ack_code
        params[16] = (f"control id already used by message {original_id} with different content")
        cur = c.execute(_INSERT, params)
        return Outcome("conflict", cur.lastrowid, ack)

    # -- reads -------------------------------------------------------------

    def list_messages(self, *, limit: int = 50, status: str | None = None,
                      control_id: str | None = None) -> list[dict]:
        clause, args = where_equal(status=status, control_id=control_id)
        return [dict(row) for row in self.db.query(
            f"SELECT {_LIST_COLUMNS} FROM messages {clause} ORDER BY id DESC LIMIT ?", [*args, int(limit)])]

    def get_message(self, message_id: int) -> dict | None:
        rows = list(self.db.query("SELECT * FROM messages WHERE id = ?", [int(message_id)]))
        if not rows:
            return None
        row = rows[0]
        if row["text"] is None and row["status"] != NOT_HL7 and row["raw"].isascii():
            row["text"] = row["raw"].decode("ascii")
        return row

    def count(self, **where: str) -> int:
        clause, args = where_equal(**where)
        return self.conn.execute(f"SELECT count(*) FROM messages {clause}", args).fetchone()[0]

    # -- documents and alerts ----------------------------------------------------

    def save_document(self, *, message_id: int, channel: str, referral_id: str, status: str,
                      xml: bytes | None, destination: str, reasons: list[str], created_at: str,
                      kind: str = "referral-note", owner: str | None = None) -> int:
        """Store a built (or parked) document; a parked one raises an alert in the same transaction."""
        with self._lock, self._transaction():
            existing = self.conn.execute("SELECT id FROM documents WHERE message_id = ?", (message_id,)).fetchone()
            if existing:  # built twice (a recovery race): the first stands, no second alert
                return existing[0]
            cur = self.conn.execute(
                "INSERT INTO documents (message_id, channel, referral_id, kind, status, destination, "
                "xml, reasons, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (message_id, channel, referral_id, kind, status, destination, xml, "\n".join(reasons), created_at))
            if status != "ready":
                self.conn.execute(
                    "INSERT INTO alerts (created_at, kind, referral_id, message_id, channel, text, owner) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (created_at, f"{kind}-{status}", referral_id, message_id, channel, "; ".join(reasons),
                     owner or owner_of(self.conn, referral_id)))
            return cur.lastrowid

    def unprocessed(self, channels: list[str], limit: int = 1000) -> list[dict]:
        """Accepted messages of these channels with no document yet (oldest first): recovery after a restart."""
        if not channels:
            return []
        marks = ",".join("?" * len(channels))
        return [dict(r) for r in self.db.query(
            f"SELECT m.id, m.channel, m.raw, m.charset FROM messages m LEFT JOIN documents d ON d.message_id = m.id "
            f"WHERE m.status = 'accepted' AND m.channel IN ({marks}) AND d.id IS NULL ORDER BY m.id LIMIT ?",
            [*channels, int(limit)])]

    def list_documents(self, *, limit: int = 50, status: str | None = None) -> list[dict]:
        clause, args = where_equal(status=status)
        return [dict(r) for r in self.db.query(
            f"SELECT id, message_id, channel, referral_id, kind, status, destination, reasons, created_at, "
            f"length(xml) AS size FROM documents {clause} ORDER BY id DESC LIMIT ?", [*args, int(limit)])]

    def get_document(self, document_id: int) -> dict | None:
        rows = list(self.db.query("SELECT * FROM documents WHERE id = ?", [int(document_id)]))
        return rows[0] if rows else None

    def ready_document_for(self, referral_id: str) -> dict | None:
        """The referral's latest ready document with its message's raw bytes (id, channel, xml, raw, charset)."""
        rows = list(self.db.query(
            "SELECT d.id, d.channel, d.xml, m.raw, m.charset FROM documents d JOIN messages m ON m.id = d.message_id "
            "WHERE d.referral_id = ? AND d.status = 'ready' ORDER BY d.id DESC LIMIT 1", [referral_id]))
        return rows[0] if rows else None

    def list_alerts(self, *, limit: int = 50) -> list[dict]:
        return [dict(r) for r in self.db.query("SELECT * FROM alerts ORDER BY id DESC LIMIT ?", [int(limit)])]

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass


class Checkpointer:
    """A second connection that copies WAL frames into the database.

    PASSIVE never waits for the writer; TRUNCATE (at shutdown) empties the WAL.
    Returns SQLite's (busy, frames in the WAL, frames checkpointed).
    """

    def __init__(self, path: str | Path, busy_timeout_ms: int = 5000) -> None:
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")

    def run(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(mode)
        try:
            return tuple(self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone())
        except sqlite3.Error as exc:
            raise StoreError(f"checkpoint failed: {exc}") from None

    def close(self) -> None:
        self.conn.close()
