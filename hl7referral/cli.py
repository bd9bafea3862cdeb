"""The ``hl7referral`` command line (click).

Every command that reads the store takes the same ``--config``/``--store``/
``--set`` options. Errors print one readable line on stderr and exit non-zero;
a traceback only with ``HL7REFERRAL_DEBUG=1``.

Start-up is part of every command's time (a coordinator times ``report`` as a
whole), so this module and the ``cli_*`` modules import only click and the
store at the top: a command imports what it needs in its body (Twisted, lxml,
the mapping pipeline, the MLLP client). The commands that only read the store
open it with :func:`~hl7referral.config.source.load_store`, the store's settings
alone; the commands that use channels, mappings or transports load and check
the whole configuration (``load_engine``), ``check`` and ``serve`` first.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import click

from . import __version__
from .config.schema import ConfigError
from .config.source import load_store
from .cli_direct import pick_channel, register as register_direct
from .cli_audit import register as register_audit
from .cli_loop import register as register_loop, register_actions as register_loop_actions
from .cli_fax import register as register_fax
from .cli_answer import register as register_answer
from .cli_demo import register as register_demo
from .store import Store, StoreError

# EndpointError, BrokenHeader and NotHL7 are ValueErrors: engine.endpoints (Twisted's endpoints,
# ~0.3 s of imports) and v2.header are loaded only by the commands that use them.
EXPECTED_ERRORS = (ConfigError, StoreError, OSError, ValueError)


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a command reports in one line. Asked only once something was raised, so the MLLP
    client's module (ssl, sockets) is imported by the commands that send, not by every command."""
    from .send import SendError
    return (*EXPECTED_ERRORS, SendError)


def fail(message: str, code: int = 2) -> None:
    click.echo(f"hl7referral: {message}", err=True)
    sys.exit(code)


def readable_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, expected_errors()) or os.environ.get("HL7REFERRAL_DEBUG"):
                raise
            message = str(exc) if not isinstance(exc, OSError) or not exc.strerror else \
                f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
            fail(message)
    return wrapper


def config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a configuration key, e.g. listeners.0.idle_timeout=60 (repeatable).")(fn)
    fn = click.option("--store", "store", metavar="PATH", help="SQLite store (overrides store.path).")(fn)
    fn = click.option("--config", "config", metavar="FILE", type=click.Path(dir_okay=False),
                      help="engine.toml (default: the embedded defaults).")(fn)
    return fn


def emit(rows: list[dict], as_json: bool, line) -> None:
    """Print rows as one JSON array, or one line per row with ``line(row)``."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(line(r))


def _load(config, store, overrides, listen=()):
    """The whole configuration, checked: channels, mappings, directory, transports, loop, notify."""
    from .config.engine import load_engine
    return load_engine(config, overrides=overrides, store=store, listen=listen)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hl7referral")
def main() -> None:
    """hl7referral: an HL7 v2 / Direct interface engine that closes the referral loop."""


# -- serve ---------------------------------------------------------------------


@main.command()
@config_options
@click.option("--listen", multiple=True, metavar="ENDPOINT",
              help="Listen on this Twisted endpoint instead of the configured one, "
                   "e.g. tcp:2575:interface=127.0.0.1 (repeatable).")
@readable_errors
def serve(config, store, overrides, listen) -> None:
    """Run the engine: MLLP listeners, store, channels.

    With no options it runs on the embedded defaults: store hl7referral.db in
    the working directory, the sample channels, MLLP on 127.0.0.1:2575.
    """
    from twisted.internet import reactor
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    from .engine.service import EngineService

    cfg = _load(config, store, overrides, listen)
    level = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
             "error": LogLevel.error}[cfg.log_level]
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=level)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = EngineService(cfg, reactor)
    status = {"code": 0}

    def ready(bound):
        for lc, addr in bound:
            kind = lc.endpoint.split(":", 1)[0]
            click.echo(f"hl7referral: listening on {addr} ({kind}, listener {lc.name}); "
                       f"store {cfg.store_path}; channels: "
                       f"{', '.join(c.name for c in cfg.channels_for(lc.name)) or 'none'}")
        sys.stdout.flush()

    def failed(failure):
        click.echo(f"hl7referral: {failure.getErrorMessage()}", err=True)
        status["code"] = 1
        reactor.stop()

    service.ready.addCallbacks(ready, failed)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    sys.exit(status["code"])


# -- send ------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=2575, show_default=True, type=int)
@click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds to wait for each ACK.")
@click.option("--tls", is_flag=True, help="Use TLS (1.2 or later).")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False),
              help="Trust roots (PEM) for the server certificate.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate (PEM) for mutual TLS.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Private key (PEM) of --cert.")
@click.option("--server-name", help="Name to verify in the server certificate (default: --host).")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@readable_errors
def send(host, port, timeout, tls, ca, cert, key, server_name, files) -> None:
    """Send the messages in FILES over MLLP and print one line per ACK.

    Each line: control id, MSA-1, error text. Exit status 1 if any message was
    not accepted (AA/CA), or its ACK did not echo its MSH-10 in MSA-2.
    """
    from .send import MLLPClient, read_messages, tls_context

    context = tls_context(ca, cert, key) if (tls or ca or cert) else None
    messages = [m for f in files for m in read_messages(f)]
    if not messages:
        fail("no HL7 messages found in the given files")
    all_ok = True
    with MLLPClient(host, port, timeout=timeout, context=context, server_name=server_name) as client:
        for payload in messages:
            result = client.exchange(payload)
            click.echo(result.line())
            all_ok &= result.ok
    sys.exit(0 if all_ok else 1)


# -- messages --------------------------------------------------------------------


@main.group()
def messages() -> None:
    """Inspect the messages in the store."""


def _open_store(config, store, overrides) -> Store:
    """The store, read-only, for the commands that only read it: only its settings are loaded."""
    return Store.open(load_store(config, overrides=overrides, store=store).path, readonly=True)


@messages.command("list")
@config_options
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--status", type=click.Choice(["accepted", "rejected", "not_hl7"]))
@click.option("--control-id", help="Only messages with this MSH-10.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of objects.")
@readable_errors
def messages_list(config, store, overrides, limit, status, control_id, as_json) -> None:
    """The newest messages, one line each."""
    s = _open_store(config, store, overrides)
    rows = s.list_messages(limit=limit, status=status, control_id=control_id)
    emit(rows, as_json, lambda r: (
        f"{r['id']:>7}  {r['received_at']}  {r['status']:<8}  {r['ack_code'] or '-':<2}  "
        f"{r['message_type'] or '-':<8}  {r['control_id'] or '-'}"
        f"{'  dup×' + str(r['duplicates']) if r['duplicates'] else ''}"
        f"{'  ' + r['error'] if r['error'] else ''}"))


@messages.command("show")
@config_options
@click.option("--json", "as_json", is_flag=True)
@click.argument("message_id", type=int)
@readable_errors
def messages_show(config, store, overrides, as_json, message_id) -> None:
    """One message: summary, ACK sent, and its segments (parsed with python-hl7)."""
    from .v2.parse import ParseError, parse_message

    s = _open_store(config, store, overrides)
    row = s.get_message(message_id)
    if row is None:
        fail(f"no message #{message_id} in {s.path}", 1)
    raw, ack = row.pop("raw"), row.pop("ack")
    row.pop("text", None)
    try:
        parsed = parse_message(raw, row.get("charset") or "ascii")
        segments = [str(seg) for seg in parsed]
        parse_error = None
    except ParseError as exc:
        segments, parse_error = [], str(exc)
    if as_json:
        row.update(raw=raw.decode("latin-1"), ack=ack.decode("latin-1") if ack else None,
                   segments=segments, parse_error=parse_error)
        click.echo(json.dumps(row, indent=2))
        return
    for key in ("id", "received_at", "listener", "peer", "channel", "status", "message_type",
                "control_id", "sending_application", "sending_facility", "referral_id",
                "ack_code", "error", "duplicates"):
        click.echo(f"{key:>20}: {row.get(key) if row.get(key) not in (None, '') else '-'}")
    click.echo(f"{'size':>20}: {len(raw)} bytes")
    click.echo("--- segments" + (f" (not parseable: {parse_error})" if parse_error else ""))
    for seg in segments:
        click.echo(seg)
    if ack:
        click.echo("--- ACK sent")
        click.echo(ack.decode("latin-1").replace("\r", "\n").rstrip())


# -- channels, map, documents, alerts ------------------------------------------------


@main.group()
def channels() -> None:
    """The configured channels."""


@channels.command("list")
@config_options
@click.option("--json", "as_json", is_flag=True)
@readable_errors
def channels_list(config, store, overrides, as_json) -> None:
    """One line per channel: listener, message types, mapping, ACK mode, destination, transports."""
    cfg = _load(config, store, overrides)
    rows = [{"name": c.name, "listener": c.listener, "accept": list(c.accept), "mapping": c.mapping,
             "ack_mode": c.ack_mode, "destination": _destination_text(c), "transports": list(c.transports),
             "sending_facilities": list(c.sending_facilities), "file": c.file} for c in cfg.channels]
    emit(rows, as_json, lambda r: (
        f"{r['name']:<10} {r['listener']:<6} {','.join(r['accept']):<10} mapping={r['mapping'] or '-':<9} "
        f"ack={r['ack_mode']:<13} to={r['destination'] or '-'} via={','.join(r['transports']) or '-'}"))


def _destination_text(c) -> str:
    if c.destination_by == "named":
        return c.destination_name
    if c.destination_by == "specialty":
        return f"specialty:{c.destination_specialty or 'by requested service'}"
    return "npi:referred-to provider" if c.destination_by == "npi" else ""


@main.command("map")
@config_options
@click.option("--channel", "channel_name", help="Channel whose mapping to use (default: by message type).")
@click.option("--validate", "validate_only", is_flag=True,
              help="Print the validation report (CDA schema, C-CDA R2.1 Schematron) instead of the document.")
@click.argument("message", type=click.Path(exists=True, dir_okay=False))
@readable_errors
def map_command(config, store, overrides, channel_name, validate_only, message) -> None:
    """Map MESSAGE to a C-CDA Referral Note and print it (or, with --validate, the report).

    Exit status 1 when a required field is missing, no destination is found or
    the document does not validate.
    """
    from .cda.pipeline import Pipeline
    from .engine.ingest import hl7_timestamp
    from .send import read_messages

    cfg = _load(config, store, overrides)
    raws = read_messages(message)
    if not raws:
        fail(f"{message}: no HL7 message found")
    raw = raws[0]
    channel = pick_channel(cfg, channel_name, raw, fail)
    if not channel.mapping:
        fail(f"channel {channel.name} has no mapping")
    validator = None
    if cfg.standards_dir is not None:
        from .cda.validate import Validator
        validator = Validator(cfg.standards_dir, cache_dir=cfg.schematron_cache)
    pipeline = Pipeline(cfg.mappings, cfg.directory, validator, local_root=cfg.local_root)
    result = pipeline.run(raw, channel, now=hl7_timestamp(time.time()))
    if validate_only:
        for reason in result.reasons:
            click.echo(f"{message}: {reason}")
        if result.status == "ready":
            click.echo(f"{message}: valid (CDA schema, C-CDA R2.1 errors phase, Referral Note rules fired); "
                       f"referral {result.referral_id} to {result.destination.name}")
    else:
        if result.document is not None:
            click.echo(result.document.decode("utf-8"), nl=False)
        for reason in result.reasons:
            click.echo(f"hl7referral: {reason}", err=True)
    sys.exit(0 if result.status == "ready" else 1)


@main.group()
def documents() -> None:
    """The Referral Notes built from accepted messages: ready to send, or parked with reasons."""


@documents.command("list")
@config_options
@click.option("--status", type=click.Choice(["ready", "parked"]))
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@readable_errors
def documents_list(config, store, overrides, status, limit, as_json) -> None:
    """The newest documents: id, message, channel, referral id, status, destination or reasons."""
    rows = _open_store(config, store, overrides).list_documents(limit=limit, status=status)

    def line(r: dict) -> str:
        dest = json.loads(r["destination"] or "{}").get("name", "-")
        tail = f"to {dest}" if r["status"] == "ready" else (r["reasons"] or "").replace("\n", "; ")
        return (f"{r['id']:>6}  #{r['message_id']:<6} {r['channel']:<9} {r['referral_id'] or '-':<28} "
                f"{r['status']:<7} {tail}")

    emit(rows, as_json, line)


@documents.command("show")
@config_options
@click.argument("document_id", type=int)
@readable_errors
def documents_show(config, store, overrides, document_id) -> None:
    """Print one document's XML (or, for a parked one without XML, its reasons)."""
    row = _open_store(config, store, overrides).get_document(document_id)
    if row is None:
        fail(f"no document #{document_id}", 1)
    if row["xml"]:
        click.echo(row["xml"].decode("utf-8"), nl=False)
    if row["status"] != "ready":
        click.echo(f"hl7referral: parked: {row['reasons']}", err=True)


@main.group()
def alerts() -> None:
    """Alerts raised for coordinators (a parked referral, ...)."""


@alerts.command("list")
@config_options
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@readable_errors
def alerts_list(config, store, overrides, limit, as_json) -> None:
    """The newest alerts: when, kind, referral id, owner, text."""
    rows = _open_store(config, store, overrides).list_alerts(limit=limit)
    emit(rows, as_json, lambda r: (
        f"{r['id']:>6}  {r['created_at']}  {r['kind']:<22} {r['referral_id'] or '-':<24} "
        f"{r['owner']:<12} {r['text']}"))


# -- check -----------------------------------------------------------------------


@main.command()
@config_options
@click.option("--listen", multiple=True, metavar="ENDPOINT")
@readable_errors
def check(config, store, overrides, listen) -> None:
    """Validate the configuration (engine, channels, endpoints) without starting anything."""
    from twisted.internet.testing import MemoryReactor

    cfg = _load(config, store, overrides, listen)
    for lc in cfg.listeners:
        from .engine.endpoints import server_endpoint
        server_endpoint(MemoryReactor(), lc.endpoint, lc.base_dir)
        if not cfg.channels_for(lc.name):
            click.echo(f"hl7referral: warning: listener {lc.name} has no channel; it will refuse everything",
                       err=True)
    parent = cfg.store_path.resolve().parent
    if not parent.exists() or not os.access(parent, os.W_OK):
        raise ConfigError(cfg.source, 0, "store.path", f"directory {parent} is not writable")
    if cfg.standards_dir is None and any(c.mapping for c in cfg.channels):
        click.echo("hl7referral: warning: no standards directory ([standards] dir): documents cannot be "
                   "validated and will be parked", err=True)
    click.echo(f"ok: {cfg.source}: {len(cfg.listeners)} listener(s), {len(cfg.channels)} channel(s), "
               f"{len(cfg.mappings)} mapping(s), {len(cfg.directory.specialists) if cfg.directory else 0} "
               f"specialist(s) from {cfg.channels_dir}; store {cfg.store_path}")


register_direct(main, config_options, readable_errors, _load, _open_store, emit, fail)
register_fax(main, config_options, readable_errors, _load, _open_store, emit, fail)
register_audit(main, config_options, readable_errors, _load, _open_store, emit, fail)
register_loop(main, config_options, readable_errors, _load, _open_store, emit, fail)
register_loop_actions(main, config_options, readable_errors, _load, _open_store, emit, fail)
register_answer(main, config_options, readable_errors, _load, _open_store, emit, fail)
register_demo(main, fail)
