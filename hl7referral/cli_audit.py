"""CLI commands for the audit trail: ``audit verify``, ``audit list``.

One readable line per fact, never a traceback; exit 0 when the chain is intact,
1 when it is not, 2 on errors.
"""

from __future__ import annotations

import sys

import click


def register(main, config_options, readable_errors, load, open_store, emit, fail) -> None:
    @main.group()
    def audit() -> None:
        """The hash-chained audit trail: check it, read it."""

    @audit.command("verify")
    @config_options
    @click.option("--expect-rows", type=int, help="The row count recorded earlier (catches rows cut off the end).")
    @readable_errors
    def audit_verify(config, store, overrides, expect_rows) -> None:
        """Walk the chain: exit 0 and print the head when every row fits, 1 naming the first that does not."""
        from .store.audit import AuditLog
        log = AuditLog(open_store(config, store, overrides))
        verdict = log.verify(expect_rows=expect_rows)
        if not verdict.ok:
            click.echo(f"audit trail BROKEN: {verdict.problem}")
            sys.exit(1)
        rows, head = log.head()
        click.echo(f"audit trail intact: {rows} rows; head {head} (record it to catch rows cut off the end)")

    @audit.command("list")
    @config_options
    @click.option("--referral", "referral_id", help="Only this referral's rows.")
    @click.option("--limit", default=1000, show_default=True, type=int)
    @click.option("--json", "as_json", is_flag=True)
    @readable_errors
    def audit_list(config, store, overrides, referral_id, limit, as_json) -> None:
        """Audit rows, oldest first: time, actor, referral, event, outcome, source."""
        from .store.audit import AuditLog
        rows = AuditLog(open_store(config, store, overrides)).rows(referral_id=referral_id, limit=limit)
        emit(rows, as_json, lambda r: (f"{r['id']:>6} {r['at']} {r['actor']:<12} {r['referral_id'] or '-':<22} "
                                       f"{r['event']:<20} {r['outcome']:<8} {r['source'] or ''}"))
