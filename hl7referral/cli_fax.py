"""CLI commands for the fax transport: ``fax gateways``, ``fax outbox``, ``fax callbacks``, ``fax status``.

One readable line per fact, never a traceback; exit 0 when all is well, 1 when
the answer is "no", 2 on errors. (``packet --out DIR`` writes the fax PDF.)
"""

from __future__ import annotations

import sys

import click

from .cli_direct import outbox_command


def register(main, config_options, readable_errors, load, open_store, emit, fail) -> None:
    @main.group()
    def fax() -> None:
        """The fax transport: gateways, fax attempts, status callbacks, a gateway's word on a job."""

    @fax.command("gateways")
    @config_options
    @readable_errors
    def fax_gateways(config, store, overrides) -> None:
        """Installed gateway plugins, and which gateway each channel's faxes go through."""
        from .fax.gateway import available
        cfg = load(config, store, overrides)
        for name, ep in sorted(available().items()):
            click.echo(f"plugin {name}: {ep.value}")
        default = cfg.fax.gateway.get("gateway", "")
        for ch in cfg.channels:
            if "fax" not in ch.transports:
                continue
            table = ch.fax or cfg.fax.gateway
            where = "its [fax] table" if ch.fax else "[fax.gateway]"
            click.echo(f"channel {ch.name}: {table.get('gateway') or default or 'none'} ({where})")

    outbox_command(fax, "Fax attempts: id, state, referral, number, gateway job, attempts, last error.",
                   "Only attempts in this state (QUEUED, SUBMITTED, SENDING, DELIVERED, FAILED...).", "fax",
                   lambda r: (f"{r['id']:>5} {r['state']:<11} {r['referral_id'] or '-':<22} to={r['recipient'] or '-'} "
                              f"job={(r['gateway'] or '-') + ':' + (r['job_id'] or '-')} attempts={r['attempts']}"
                              + (f" last={r['last_error']}" if r["last_error"] else "")),
                   config_options, readable_errors, open_store, emit)

    @fax.command("callbacks")
    @config_options
    @click.option("--limit", default=50, show_default=True, type=int)
    @click.option("--json", "as_json", is_flag=True)
    @readable_errors
    def fax_callbacks(config, store, overrides, limit, as_json) -> None:
        """Status callbacks received from gateways, and what became of each (applied, stale, refused...)."""
        from .store.outbox import Outbox
        rows = Outbox(open_store(config, store, overrides)).list_callbacks(limit=limit)
        emit(rows, as_json, lambda r: (
            f"{r['id']:>5} {r['received_at']} {r['channel']:<10} job={r['job_id'] or '-'} "
            f"{r['status'] or '-':<9} outbox={r['outbox_id'] or '-'} {r['result'] or 'pending'}"))

    @fax.command("status")
    @config_options
    @click.argument("outbox_id", type=int)
    @readable_errors
    def fax_status(config, store, overrides, outbox_id) -> None:
        """Ask the gateway now about fax attempt OUTBOX_ID (changes nothing in the store).

        Exit status 0 when the gateway answered, 1 when it could not tell.
        """
        from .engine.fax import FaxAgent
        from .fax.gateway import GatewayError
        from .store.outbox import Outbox
        cfg = load(config, store, overrides)
        outbox = Outbox(open_store(config, store, overrides))
        row = outbox.get(outbox_id)
        if row is None or row["transport"] != "fax":
            fail(f"no fax attempt #{outbox_id} in the store")
        if not row["job_id"]:
            click.echo(f"#{outbox_id} {row['state']}: no gateway job yet")
            sys.exit(1)
        route = FaxAgent(cfg.fax, outbox, {c.name: c for c in cfg.channels}).route(row["channel"])
        if route is None:
            fail(f"no fax gateway for channel {row['channel']!r}")
        try:
            status = route.gateway.status(row["job_id"])
        except GatewayError as exc:
            click.echo(f"#{outbox_id} {route.name} job {row['job_id']}: {exc.outcome}: {exc}")
            sys.exit(1)
        click.echo(f"#{outbox_id} {route.name} job {row['job_id']}: {status.status.value}"
                   + (f" ({status.detail})" if status.detail else "") + f"; stored state {row['state']}")
