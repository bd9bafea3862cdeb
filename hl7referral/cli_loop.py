"""The coordinator's CLI over the referral loop: ``status``, ``referrals list``, ``tasks``, ``report``, ``workqueue``.

One readable line per fact, never a traceback; exit 0 when all is well, 1 when the
answer is "no" (no such referral, task already done...), 2 on errors (bad input, no store).

What is never printed: the referral's ``contact`` column (patient or owner contact details,
kept for the notifier plugins only), a note's title, a notification's recipient and
subject (either may carry a name). Everything else here is ids, codes and times; times
are printed as stored (ISO-8601 UTC strings).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import getpass
import io
import json
import sqlite3
import sys
import time
from pathlib import Path

import click

from .loop.states import State, timeline
from .store import Store, StoreError

_STAGES = (("SENT", "sent_at", None), ("DELIVERED", "delivered_at", "d_delivered"),
           ("ACCEPTED", "accepted_at", "d_accepted"), ("SCHEDULED", "scheduled_at", "d_scheduled"),
           ("SEEN", "seen_at", "d_seen"), ("CLOSED", "closed_at", "d_closed"))
_NOTE_COLUMNS = ("id", "received_at", "kind", "format", "media_type", "size", "origin", "workqueue_id", "returned_at")
_NOTIFICATION_COLUMNS = ("id", "created_at", "rule", "audience", "notifier", "owner", "state", "attempts", "sent_at",
                         "last_error")
_CSV_COLUMNS = ("specialty", "destination", "referrals", "completed", "ended_without_note", "open", "overdue",
                "leaked", "completion_rate", "leakage_rate")


def human(seconds: float | None) -> str:
    """A duration as a person reads it: "2d 4h", "3h 10m", "5m 2s", "40s" ("-" for none)."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    for big, big_unit, small, small_unit in ((d, "d", h, "h"), (h, "h", m, "m"), (m, "m", sec, "s")):
        if big:
            return f"{big}{big_unit}" + (f" {small}{small_unit}" if small else "")
    return f"{sec}s"


def _percent(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def parse_since(text: str) -> tuple[str, str]:
    """``--since`` (a date or an ISO datetime; no zone means UTC) -> (query bound, display form).

    The bound has no zone suffix and a fraction only when there is one, so it is a prefix of
    the same instant in every stored form (``...00Z``, ``...00.000Z``) and compares below it.
    """
    raw = text.strip()
    try:
        if len(raw) == 10:
            when = dt.datetime.combine(dt.date.fromisoformat(raw), dt.time(), dt.timezone.utc)
        else:
            when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: not a date (2024-05-01) or an ISO datetime (2024-05-01T08:00:00Z)") \
            from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    when = when.astimezone(dt.timezone.utc)
    bound = when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{when.microsecond:06d}".rstrip("0") if when.microsecond else "")
    return bound, bound + "Z"


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(now))) + f".{int((now % 1) * 1000):03d}Z"


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return "cli"


def _sqlite_errors(fn):
    """A locked or damaged store is one readable line (readable_errors knows StoreError), not a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(f"store: {exc}") from None
    return wrapper


def _loop(store: Store):
    from .store.loop import Loop
    if store.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'referrals'").fetchone() is None:
        raise StoreError(f"store {store.path} has no referral loop tables yet: start the engine once to upgrade it")
    return Loop(store)


def _writable_store(load, config, store, overrides) -> Store:
    path = load(config, store, overrides).store_path
    if not Path(path).exists():
        raise StoreError(f"store {path} does not exist")
    return Store.open(path)


def referral_to_change(cfg, ref_id: str, fail) -> tuple[Store, object, dict]:
    """A writable store of *cfg*, its Loop and the referral REF_ID names (``fail`` exits 1 when none);
    the caller closes the store."""
    path = cfg.store_path
    if not Path(path).exists():
        raise StoreError(f"store {path} does not exist")
    s = Store.open(path)
    try:
        loop = _loop(s)
        row, problem = _find_referral(loop, ref_id)
        if row is None:
            fail(problem, 1)
    except BaseException:
        s.close()
        raise
    return s, loop, row


def _find_referral(loop, ref: str) -> tuple[dict | None, str]:
    """The referral named by its id or by any correlation form; else (None, why not)."""
    row = loop.get(ref)
    if row is not None:
        return row, ""
    match = loop.find([("referral", ref)])
    if match.referral_id is not None:
        return loop.get(match.referral_id), ""
    if "names" in match.reason:   # a key shared by several referrals: say so rather than guess
        return None, f"no single referral {ref}: {match.reason}"
    return None, f"no referral {ref}"


def _reapply(store: Store, item: dict, referral_id: str, config, by: str):
    """Re-read the parked item and apply its events to *referral_id* (the person vouches for the match)."""
    from .loop.tracker import Tracker
    tracker = Tracker(store, config.loop)
    return tracker.replay(item, _reread(item, config), now=_utcnow(), by=by, referral_id=referral_id)


def _reread(item: dict, config):
    from .loop.reread import observation_of
    return observation_of(item["origin"] or "", item["raw"] or b"", osu_tables=config.loop.osu,
                          zone=config.loop.calendar.zone, local_root=config.local_root)


def _replay_referral(config, store, item: dict, *, by: str) -> int:
    """A referral sent to us and parked (engine/inbound.py) taken again: 0 when recorded, 1 when not."""
    from .engine.inbound import InboundReferrals
    ok, what = InboundReferrals(config, store).replay(item, now=_utcnow().timestamp(), by=by)
    click.echo(f"#{item['id']}: {what}" if ok else f"#{item['id']}: still parked: {what}")
    return 0 if ok else 1


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _parse_now(text: str | None) -> dt.datetime:
    if not text:
        return _utcnow()
    try:
        at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise StoreError(f"--now {text!r}: not an ISO datetime (2026-12-01T09:00:00Z)") from None
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)


def register(main, config_options, readable_errors, load, open_store, emit, fail) -> None:
    # -- status -------------------------------------------------------------------------

    @main.command("status")
    @config_options
    @click.argument("ref_id")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object.")
    @readable_errors
    @_sqlite_errors
    def status(config, store, overrides, ref_id, as_json) -> None:
        """One referral: state, stage times, due/overdue, timeline, tasks, notes, notifications, SLA actions.

        REF_ID is the referral id or any form a message may name it by (placer id, root|ext).
        Exit status 1 when no (single) referral has it.
        """
        loop = _loop(open_store(config, store, overrides))
        row, problem = _find_referral(loop, ref_id)
        if row is None:
            fail(problem, 1)
        rid = row["referral_id"]
        row.pop("contact", None)   # patient/owner contact details: for the notifiers, never for a screen
        steps = timeline(loop.events(rid))
        stages = [{"stage": name, "at": row[col], "seconds": row[d] if d else None} for name, col, d in _STAGES]
        tasks = loop.tasks(referral_id=rid, open_only=True)
        notes = [{k: n[k] for k in _NOTE_COLUMNS} for n in loop.notes(rid)]
        notifications = [{k: n[k] for k in _NOTIFICATION_COLUMNS} for n in loop.notifications(referral_id=rid)]
        sla = loop.sla_actions(rid)
        if as_json:
            click.echo(json.dumps({
                "referral_id": rid, "state": row["state"], "state_at": row["state_at"], "due_at": row["due_at"],
                "overdue_at": row["overdue_at"], "referral": row, "stages": stages,
                "timeline": [{"at": s.at, "kind": s.kind, "state": s.state.value, "detail": s.detail} for s in steps],
                "open_tasks": tasks, "notes": notes, "notifications": notifications, "sla_actions": sla}, indent=2))
            return
        echo = click.echo
        alias = f" (named {ref_id})" if ref_id != rid else ""
        echo(f"referral {rid}{alias}: {row['state']} since {row['state_at']}")
        echo(f"  created {row['created_at']}  channel {row['channel'] or '-'}  specialty {row['specialty'] or '-'}  "
             f"destination {row['destination'] or '-'}" + (f"  payer {row['payer']}" if row["payer"] else "")
             + (f"  auth {row['auth']} {row['auth_number'] or ''}".rstrip() if row["auth"] else ""))
        echo(f"  due {row['due_at'] or '-'}  " + (f"OVERDUE since {row['overdue_at']}" if row["overdue_at"]
                                                  else "not overdue"))
        echo("stages:")
        for s in stages:
            if s["at"]:
                took = f"  (+{human(s['seconds'])})" if s["seconds"] is not None else ""
                echo(f"  {s['stage']:<10} {s['at']}{took}")
        if row["final_at"] and row["state"] in ("DECLINED", "CANCELLED"):
            echo(f"  {row['state']:<10} {row['final_at']}")
        echo("timeline:" if steps else "timeline: no events yet")
        for s in steps:
            echo(f"  {s.at}  {s.kind:<22} -> {s.state.value:<16} {s.detail}".rstrip())
        echo(f"open tasks: {len(tasks)}")
        for t in tasks:
            echo(f"  #{t['id']} {t['kind']} for {t['owner']}" + (f" due {t['due_at']}" if t["due_at"] else "")
                 + f": {t['text']}")
        echo(f"notes: {len(notes)}")
        for n in notes:
            echo(f"  #{n['id']} {n['received_at']} {n['kind']} {n['format'] or '-'} {n['size'] or 0} bytes"
                 + (f" returned {n['returned_at']}" if n["returned_at"] else ""))
        echo(f"notifications: {len(notifications)}")
        for n in notifications:
            echo(f"  #{n['id']} {n['created_at']} {n['rule'] or '-'} to {n['audience']} via {n['notifier'] or '-'}: "
                 f"{n['state']}" + (f" {n['sent_at']}" if n["sent_at"] else "")
                 + (f" ({n['last_error']})" if n["last_error"] else ""))
        echo(f"SLA actions: {len(sla)}")
        for a in sla:
            echo(f"  {a['fired_at']} {a['rule']} {a['action'] or '-'} (due {a['due_at'] or '-'}) "
                 f"owner {a['owner'] or '-'}: {a['outcome'] or '-'}")

    # -- referrals list ----------------------------------------------------------------------

    @main.group()
    def referrals() -> None:
        """The referrals the loop tracks."""

    @referrals.command("list")
    @config_options
    @click.option("--state", type=click.Choice([s.value for s in State]), help="Only referrals in this state.")
    @click.option("--overdue", is_flag=True, help="Only overdue referrals, longest overdue first.")
    @click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
    @click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
    @readable_errors
    @_sqlite_errors
    def referrals_list(config, store, overrides, state, overdue, limit, as_json) -> None:
        """One line per referral: id, state, since, channel, specialty, destination, overdue since (newest first)."""
        rows = _loop(open_store(config, store, overrides)).referrals(state=state, overdue=overdue, limit=limit)
        emit(rows, as_json, lambda r: (
            f"{r['referral_id']:<24} {r['state']:<16} since {r['state_at']}  {r['channel'] or '-':<10} "
            f"{r['specialty'] or '-':<16} {r['destination'] or '-':<20}"
            + (f" OVERDUE since {r['overdue_at']}" if r["overdue_at"] else "")).rstrip())

    # -- tasks ---------------------------------------------------------------------------------

    @main.group()
    def tasks() -> None:
        """Work for people: review a returned note, follow up, call."""

    @tasks.command("list")
    @config_options
    @click.option("--owner", help="Only this owner's tasks.")
    @click.option("--referral", "referral_id", help="Only this referral's tasks.")
    @click.option("--all", "show_all", is_flag=True, help="Done tasks too.")
    @click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
    @click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
    @readable_errors
    @_sqlite_errors
    def tasks_list(config, store, overrides, owner, referral_id, show_all, limit, as_json) -> None:
        """Open tasks (with --all, done ones too): id, created, kind, owner, referral, due, text."""
        loop = _loop(open_store(config, store, overrides))
        rows = loop.tasks(open_only=not show_all, owner=owner, referral_id=referral_id, limit=limit)
        emit(rows, as_json, lambda r: (
            f"{r['id']:>6} {r['created_at']} {r['kind']:<14} {r['owner']:<14} {r['referral_id'] or '-':<24} "
            + (f"due {r['due_at']} " if r["due_at"] else "")
            + (f"DONE {r['done_at']} by {r['done_by']} " if r["done_at"] else "") + r["text"]))

    @tasks.command("done")
    @config_options
    @click.argument("task_id", type=int)
    @click.option("--by", "by", metavar="NAME", help="Who did it (default: the login name); goes to the audit trail.")
    @click.option("--note", default="", help="What was done.")
    @readable_errors
    @_sqlite_errors
    def tasks_done(config, store, overrides, task_id, by, note) -> None:
        """Mark task TASK_ID done. Exit status 1 when there is no such task or it was done already."""
        s = _writable_store(load, config, store, overrides)
        try:
            loop, who = _loop(s), _who(by)
            if not loop.task_done(task_id, at=_now(), by=who, note=note):
                row = loop.task(task_id)
                fail(f"task #{task_id} was done already ({row['done_at']} by {row['done_by']})" if row
                     else f"no task #{task_id}", 1)
            click.echo(f"task #{task_id} done by {who}")
        finally:
            s.close()

    # -- report -----------------------------------------------------------------------------------

    @main.command("report")
    @config_options
    @click.option("--since", metavar="DATE", help="Only referrals created since (2024-05-01 or an ISO datetime, UTC).")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object (durations in seconds).")
    @click.option("--csv", "as_csv", is_flag=True, help="CSV: one row per specialty/destination with its rates.")
    @readable_errors
    @_sqlite_errors
    def report(config, store, overrides, since, as_json, as_csv) -> None:
        """Completion and leakage by specialty and destination; median and p90 time per stage.

        Completed: the consult note is back (CLOSED). Leaked: ended without it (DECLINED,
        CANCELLED) or open and overdue. A stage's time runs from the stage before it.
        """
        if as_json and as_csv:
            fail("--json and --csv: choose one")
        bound, shown = parse_since(since) if since else (None, None)
        result = _loop(open_store(config, store, overrides)).report(since=bound)
        result["since"] = shown
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        if as_csv:
            buffer = io.StringIO()
            out = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
            out.writeheader()
            out.writerows(result["groups"])
            click.echo(buffer.getvalue(), nl=False)
            return
        t, echo = result["total"], click.echo
        echo(f"referrals created since {shown}" if shown else "all referrals")
        echo(f"total: {t['referrals']} referrals; completed {t['completed']} ({_percent(t['completion_rate'])}); "
             f"leaked {t['leaked']} ({_percent(t['leakage_rate'])}: {t['ended_without_note']} ended without the "
             f"note, {t['overdue']} overdue); open {t['open']}")
        if result["groups"]:
            echo(f"{'specialty':<18} {'destination':<22} {'referrals':>9} {'completed':>10} {'leaked':>8} "
                 f"{'open':>5} {'overdue':>7}")
        for g in result["groups"]:
            echo(f"{g['specialty'] or '-':<18} {g['destination'] or '-':<22} {g['referrals']:>9} "
                 f"{_percent(g['completion_rate']):>10} {_percent(g['leakage_rate']):>8} {g['open']:>5} "
                 f"{g['overdue']:>7}")
        echo("time per stage (from the stage before):")
        for name, s in result["stages"].items():
            echo(f"  {name:<10} n={s['n']:<6} median {human(s['median_s']):<8} p90 {human(s['p90_s'])}")

    # -- work queue ---------------------------------------------------------------------------------

    @main.group()
    def workqueue() -> None:
        """Inbound messages that matched no (single) referral, kept whole until a person resolves them."""

    @workqueue.command("list")
    @config_options
    @click.option("--all", "show_all", is_flag=True, help="Resolved items too.")
    @click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
    @click.option("--json", "as_json", is_flag=True, help="One JSON array of objects (without the raw message).")
    @readable_errors
    @_sqlite_errors
    def workqueue_list(config, store, overrides, show_all, limit, as_json) -> None:
        """Open items (with --all, resolved ones too): id, parked at, status, origin, type, size, reason."""
        rows = _loop(open_store(config, store, overrides)).workqueue(status=None if show_all else "open", limit=limit)
        for r in rows:
            r["keys"] = json.loads(r["keys"] or "[]")

        def line(r: dict) -> str:
            keys = ", ".join(f"{k}={v}" for k, v in r["keys"]) or "-"
            done = (f" -> {r['resolved_at']} by {r['resolved_by']}: {r['referral_id'] or 'discarded'}"
                    if r["status"] != "open" else "")
            return (f"{r['id']:>6} {r['created_at']} {r['status']:<8} {r['origin'] or '-':<12} "
                    f"{r['message_type'] or '-':<10} {r['size'] or 0} bytes keys {keys}; {r['reason']}{done}")

        emit(rows, as_json, line)

    @workqueue.command("resolve")
    @config_options
    @click.argument("item_id", type=int)
    @click.option("--referral", "referral_id", metavar="REF_ID", help="Attach the item to this referral.")
    @click.option("--discard", is_flag=True, help="Close the item without a referral.")
    @click.option("--by", "by", metavar="NAME", required=True, help="Who resolved it (goes to the audit trail).")
    @click.option("--note", default="", help="Why.")
    @readable_errors
    @_sqlite_errors
    def workqueue_resolve(config, store, overrides, item_id, referral_id, discard, by, note) -> None:
        """Resolve work-queue item ITEM_ID: attach it to a referral (--referral) or discard it (--discard).

        Exit status 1 when there is no such open item or no such referral.
        """
        if bool(referral_id) == discard:
            fail("give either --referral REF_ID or --discard")
        s = _writable_store(load, config, store, overrides)
        try:
            loop = _loop(s)
            item = loop.work_item(item_id)
            if item is None:
                fail(f"no work-queue item #{item_id}", 1)
            if item["status"] != "open":
                fail(f"work-queue item #{item_id} was resolved already ({item['resolved_at']} by "
                     f"{item['resolved_by']})", 1)
            if discard:
                loop.resolve(item_id, at=_now(), by=by, resolution="discarded" + (f": {note}" if note else ""))
                click.echo(f"work-queue item #{item_id} discarded by {by}")
                return
            row, problem = _find_referral(loop, referral_id)
            if row is None:
                fail(problem, 1)
            rid = row["referral_id"]
            out = _reapply(s, item, rid, load(config, store, overrides), by)
            if note:
                from .store.audit import AuditLog
                AuditLog(s).append(at=_now(), actor=by, referral_id=rid, event="WORKQUEUE_NOTE",
                                   source=f"workqueue #{item_id}", outcome="noted", detail=note)
            click.echo(f"work-queue item #{item_id} attached to {rid} by {by}: {out.added} event(s) applied, "
                       f"state {out.after.value if out.after else '?'}")
        finally:
            s.close()


def register_actions(main, config_options, readable_errors, load, open_store, emit, fail) -> None:
    """``timers run``, ``auth approve``, ``replay``: the commands that change referrals."""

    @main.group()
    def timers() -> None:
        """SLA timers: reminders and escalations (the running engine runs them on its own too)."""

    @timers.command("run")
    @config_options
    @click.option("--now", "now_text", metavar="ISO", help="Evaluate as of this time (default: now), e.g. for tests.")
    @click.option("--json", "as_json", is_flag=True)
    @readable_errors
    @_sqlite_errors
    def timers_run(config, store, overrides, now_text, as_json) -> None:
        """Evaluate every due SLA timer once and act on each (once: a second run changes nothing)."""
        from .engine.notify_service import make_render
        from .loop.tracker import Tracker
        cfg = load(config, store, overrides)
        now = _parse_now(now_text)
        s = _writable_store(load, config, store, overrides)
        try:
            _loop(s)
            acted = Tracker(s, cfg.loop, render=make_render(cfg)).run_timers(now, limit=1_000_000)
        finally:
            s.close()
        rows = [{"referral_id": a.referral_id, "rule": a.rule, "action": a.action, "owner": a.owner, "how": a.how,
                 "key": a.key} for a in acted]
        emit(rows, as_json, lambda r: f"{r['referral_id']:<24} {r['rule']:<20} {r['how']:<22} owner {r['owner']}")
        if not as_json:
            click.echo(f"{len(rows)} SLA item(s) acted on as of {now.strftime('%Y-%m-%dT%H:%M:%SZ')}")

    @main.group()
    def auth() -> None:
        """Prior authorization: approve a referral held in AUTH_PENDING."""

    @auth.command("approve")
    @config_options
    @click.argument("ref_id")
    @click.option("--number", required=True, help="The payer's authorization number.")
    @click.option("--by", "by", metavar="NAME", help="Who approved it (default: your login name).")
    @readable_errors
    @_sqlite_errors
    def auth_approve(config, store, overrides, ref_id, number, by) -> None:
        """Record the authorization; the engine then sends the held referral (at its next timer tick)."""
        from .loop.tracker import Tracker
        cfg = load(config, store, overrides)
        s, loop, row = referral_to_change(cfg, ref_id, fail)
        try:
            if row["state"] != State.AUTH_PENDING.value:
                fail(f"referral {row['referral_id']} is {row['state']}, not held for authorization", 1)
            after = Tracker(s, cfg.loop).approve(row["referral_id"], number=number, now=_utcnow(),
                                                 actor=_who(by), source=f"hl7referral auth approve by {_who(by)}")
        finally:
            s.close()
        click.echo(f"referral {row['referral_id']}: authorization {number} recorded; {after.value}, "
                   f"the engine sends it at its next timer run")

    @main.command("replay")
    @config_options
    @click.argument("item_ids", nargs=-1, type=int)
    @click.option("--all", "replay_all", is_flag=True, help="Every open work-queue item.")
    @click.option("--by", "by", metavar="NAME", help="Who replayed (default: your login name).")
    @readable_errors
    @_sqlite_errors
    def replay(config, store, overrides, item_ids, replay_all, by) -> None:
        """Read parked work-queue items again and apply those whose keys now name one referral.

        A referral sent to us by Direct and parked (no channel for its sender, a document that
        could not be kept) is taken again with today's configuration: recorded and queued for
        our EHR. Exit status 1 when some item still cannot be (it stays open, with its reason).
        """
        from .engine.inbound import PARKED_TYPE
        from .loop.tracker import Tracker
        if not item_ids and not replay_all:
            fail("name work-queue item ids, or --all")
        cfg = load(config, store, overrides)
        s = _writable_store(load, config, store, overrides)
        still = 0
        try:
            loop = _loop(s)
            tracker = Tracker(s, cfg.loop)
            ids = item_ids or [r["id"] for r in loop.workqueue(status="open", limit=1_000_000)]
            for item_id in ids:
                item = loop.work_item(item_id)
                if item is None or item["status"] != "open":
                    click.echo(f"#{item_id}: no open work-queue item")
                    still += 1
                    continue
                if item["message_type"] == PARKED_TYPE:
                    still += _replay_referral(cfg, s, item, by=_who(by))
                    continue
                out = tracker.replay(item, _reread(item, cfg), now=_utcnow(), by=_who(by))
                if out.referral_id is None:
                    still += 1
                    click.echo(f"#{item_id}: still parked: {out.reason}")
                else:
                    click.echo(f"#{item_id}: applied to {out.referral_id}: {out.added} event(s), "
                               f"state {out.after.value}")
        finally:
            s.close()
        if still:
            sys.exit(1)
