"""CLI commands for Direct: ``packet``, ``direct verify``, ``direct outbox``, ``direct mail``, ``direct events``.

Each prints one readable line per fact (never a traceback) and exits 0 when all
is well, 1 when the answer is "no" (not trusted, not sendable), 2 on errors.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


def hl7_timestamp(seconds: float) -> str:
    # engine.ingest's, imported when used: it pulls in Twisted, which store-only commands do not need.
    from .engine.ingest import hl7_timestamp as stamp
    return stamp(seconds)


def register(main, config_options, readable_errors, load, open_store, emit, fail) -> None:
    @main.command("packet")
    @config_options
    @click.option("--channel", "channel_name", help="Channel to use (default: by message type).")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                  help="Directory for referral-note.xml, referral.zip (XDM), message.eml and, for fax "
                       "channels, referral-fax.pdf.")
    @click.argument("message", type=click.Path(exists=True, dir_okay=False))
    @readable_errors
    def packet_command(config, store, overrides, channel_name, out_dir, message) -> None:
        """Write what would be sent for MESSAGE, without sending: the C-CDA, the XDM zip, the Direct .eml
        and, when the channel lists fax among its transports, the fax PDF (cover sheet and note).

        Exit status 1 when the referral cannot go by Direct (no destination address,
        no usable recipient certificate, invalid document) or its fax cannot be
        rendered; the files that could be made are still written.
        """
        from .cda.pipeline import Pipeline
        from .direct import packet as packetlib
        from .engine.direct import DirectAgent, DirectUnavailable, utc
        from .send import read_messages

        cfg = load(config, store, overrides)
        raws = read_messages(message)
        if not raws:
            fail(f"{message}: no HL7 message found")
        channel = pick_channel(cfg, channel_name, raws[0], fail)
        validator = None
        if cfg.standards_dir is not None:
            from .cda.validate import Validator
            validator = Validator(cfg.standards_dir, cache_dir=cfg.schematron_cache)
        now = time.time()
        result = Pipeline(cfg.mappings, cfg.directory, validator, local_root=cfg.local_root).run(
            raws[0], channel, now=hl7_timestamp(now))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ok = result.status == "ready"
        for reason in result.reasons:
            click.echo(f"hl7referral: {reason}", err=True)
        if result.document is None:
            sys.exit(1)
        (out / "referral-note.xml").write_bytes(result.document)
        click.echo(f"{out / 'referral-note.xml'}: C-CDA Referral Note, referral {result.referral_id}"
                   + ("" if ok else " (NOT valid: see above)"))
        recipient = getattr(result.destination, "direct", "") if result.destination else ""
        order = raws[0] if channel.sends_order else None
        content = packetlib.PacketContent(referral_id=result.referral_id, cda=result.document,
                                          created=hl7_timestamp(now), patient_id=packetlib.patient_cx(result.referral),
                                          order=order, source_oid=cfg.local_root,
                                          include_bare_cda=cfg.direct.include_bare_cda)
        sender = cfg.direct.address or "sender@invalid"
        (out / "referral.zip").write_bytes(packetlib.build_xdm_for(content, sender, recipient or "unknown@invalid"))
        click.echo(f"{out / 'referral.zip'}: IHE XDM" + (" (C-CDA + v2 order)" if order else " (C-CDA)"))
        if "fax" in channel.transports:
            ok = write_fax_pdf(cfg, result, out / "referral-fax.pdf", now) and ok
        if not recipient:
            click.echo("no Direct address for the destination: the Direct send would not be attempted")
            sys.exit(1)
        agent = DirectAgent(cfg.direct, None, local_root=cfg.local_root)  # no outbox: nothing is queued
        try:
            agent.load()
        except DirectUnavailable as exc:
            fail(f"Direct is off: {exc}")
        found = agent.finder.find(recipient, utc(now))
        if not found.usable:
            for subject, decision in found.rejected:
                click.echo(f"certificate {subject}: {decision.code}: {decision.reason}")
            click.echo(f"no usable certificate for {recipient}: the Direct send would not be attempted")
            sys.exit(1)
        key = f"{result.referral_id}/direct/preview"
        eml = packetlib.referral_message(
            content, sender=cfg.direct.address, recipient=recipient,
            message_id=packetlib.message_id_for(key, cfg.direct.domain), date=now, signer=agent.certificate,
            key=agent.key, chain=agent.chain, recipient_certs=found.usable[:1], cipher=cfg.direct.cipher,
            key_transport=cfg.direct.key_transport, final_delivery=cfg.direct.request_final_delivery)
        (out / "message.eml").write_bytes(eml)
        click.echo(f"{out / 'message.eml'}: Direct message to {recipient} (signed, encrypted: "
                   f"{cfg.direct.cipher}, {cfg.direct.key_transport})")
        sys.exit(0 if ok else 1)

    @main.group()
    def direct() -> None:
        """Direct messaging: check a message, the outbox, inbound mail, the transport audit trail."""

    @direct.command("verify")
    @config_options
    @click.argument("eml", type=click.Path(exists=True, dir_okay=False))
    @readable_errors
    def direct_verify(config, store, overrides, eml) -> None:
        """Decrypt EML with our Direct identity, verify its signature, print the trust decision.

        Exit status 0 when the message is trusted, 1 when it is not.
        """
        from email.parser import BytesHeaderParser
        from email.utils import parseaddr

        from .direct import smime
        from .direct.trust import check_sender
        from .engine.direct import DirectAgent, DirectUnavailable, utc

        cfg = load(config, store, overrides)
        raw = Path(eml).read_bytes()
        # str(): a From with raw non-ASCII bytes comes back as an email.header.Header, which
        # parseaddr cannot take (TypeError); the address itself is ASCII either way.
        sender = parseaddr(str(BytesHeaderParser().parsebytes(raw).get("From", "")))[1]
        agent = DirectAgent(cfg.direct, None, local_root=cfg.local_root)
        try:
            agent.load()
        except DirectUnavailable as exc:
            fail(f"Direct is off: {exc}")
        try:
            opened = smime.decrypt(raw, agent.certificate, agent.key)
            click.echo(f"decrypted: {opened.cipher}, key transport {opened.key_transport}")
            verified = smime.verify(opened.entity)
        except smime.SmimeError as exc:
            click.echo(f"refused: {exc}")  # str(SmimeError) already starts with its code
            sys.exit(1)
        click.echo(f"signature: valid ({verified.digest}) by {verified.signer.subject.rfc4514_string()}")
        decision = check_sender(verified.signer, verified.certificates, sender, agent.anchors, agent.policy,
                                utc(time.time()))
        if decision.path:
            click.echo("path: " + " <- ".join(decision.path))
        bound = f", {decision.binding}-bound to {sender}" if decision.binding else ""
        click.echo(f"trust: {decision.code}{bound}: {decision.reason}" if decision.reason else
                   f"trust: {decision.code}{bound}")
        sys.exit(0 if decision.ok else 1)

    outbox_command(direct, "Outbound packets and MDNs: id, state, transport, kind, recipient, attempts, last error.",
                   "Only rows in this state (QUEUED, SENT, MDN_PROCESSED, FAILED, TIMED_OUT...).", None,
                   lambda r: (f"{r['id']:>5} {r['state']:<15} {r['transport']:<6} {r['kind']:<14} "
                              f"{r['referral_id'] or '-':<22} to={r['recipient'] or '-'} attempts={r['attempts']}"
                              + (f" last={r['last_code'] or ''} {r['last_error']}" if r["last_error"] else "")),
                   config_options, readable_errors, open_store, emit)

    @direct.command("mail")
    @config_options
    @click.option("--limit", default=50, show_default=True, type=int)
    @click.option("--json", "as_json", is_flag=True)
    @readable_errors
    def direct_mail(config, store, overrides, limit, as_json) -> None:
        """Inbound mail from the HISP: id, status, kind, sender, trust decision, detail."""
        from .store.outbox import Outbox
        rows = Outbox(open_store(config, store, overrides)).list_mail(limit=limit)
        emit(rows, as_json, lambda r: (
            f"{r['id']:>5} {r['received_at']} {r['status']:<14} {r['kind'] or '-':<8} from={r['from_address'] or '-'}"
            f" trust={r['trust'] or '-'} {r['detail'] or ''}"))

    @direct.command("events")
    @config_options
    @click.option("--outbox", "outbox_id", type=int, help="Only this outbox row's events.")
    @click.option("--mail", "mail_id", type=int, help="Only this mail's events.")
    @click.option("--limit", default=200, show_default=True, type=int)
    @click.option("--json", "as_json", is_flag=True)
    @readable_errors
    def direct_events(config, store, overrides, outbox_id, mail_id, limit, as_json) -> None:
        """The transport audit trail: every send, retry, MDN, timeout, refusal, with its reason."""
        from .store.outbox import Outbox
        rows = Outbox(open_store(config, store, overrides)).events(outbox_id=outbox_id, mail_id=mail_id, limit=limit)
        emit(rows, as_json, lambda r: (
            f"{r['at']} outbox={r['outbox_id'] or '-'} mail={r['mail_id'] or '-'} {r['event']:<16} "
            f"{r['state'] or '-':<15} {r['referral_id'] or '-'} {r['detail'] or ''}"))


def outbox_command(group, doc: str, state_help: str, transport: str | None, line, config_options, readable_errors,
                   open_store, emit) -> None:
    """``GROUP outbox``: outbox rows (of one transport, or all), one line each or --json."""
    @group.command("outbox", help=doc)
    @config_options
    @click.option("--state", help=state_help)
    @click.option("--referral", "referral_id", help="Only this referral's rows.")
    @click.option("--limit", default=50, show_default=True, type=int)
    @click.option("--json", "as_json", is_flag=True)
    @readable_errors
    def outbox(config, store, overrides, state, referral_id, limit, as_json) -> None:
        from .store.outbox import Outbox
        rows = Outbox(open_store(config, store, overrides)).list(limit=limit, state=state, referral_id=referral_id,
                                                                 transport=transport)
        emit(rows, as_json, line)


def pick_channel(cfg, channel_name, raw, fail):
    if channel_name:
        channel = next((c for c in cfg.channels if c.name == channel_name), None)
        if channel is None:
            fail(f"no channel named {channel_name!r} (have: {', '.join(c.name for c in cfg.channels)})")
        return channel
    from .engine.ingest import policy_for
    from .v2.header import read_header
    header = read_header(raw)
    policy = policy_for(cfg.listeners[0], cfg.channels)
    name = policy.route(header.type_and_event, header.sending_facility, header.delimiters.component)
    channel = next((c for c in cfg.channels if c.name == name), None)
    if channel is None or not channel.mapping:
        fail(f"no channel with a mapping takes {header.type_and_event}; name one with --channel")
    return channel


def write_fax_pdf(cfg, result, path: Path, now: float) -> bool:
    """The fax a fax channel would send for this referral (cover sheet + the note), as *path*."""
    from .engine.fax import fax_pdf, find_fonts
    from .fax.render import RenderError

    dest = result.destination
    number = getattr(dest, "fax", "") or ""
    try:
        pdf = fax_pdf(cfg.fax, result.document, to_name=getattr(dest, "name", "") or "", to_fax=number,
                      referral_id=result.referral_id or "", now=now, fonts=find_fonts(cfg.fax))
    except RenderError as exc:
        click.echo(f"hl7referral: the fax cannot be rendered: {exc}", err=True)
        return False
    path.write_bytes(pdf)
    to = f" to {number}" if number else " (no fax number for the destination)"
    click.echo(f"{path}: fax PDF{to}, {len(pdf)} bytes")
    return True
