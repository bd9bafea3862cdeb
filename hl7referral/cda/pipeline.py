"""One referral message in, one checked Referral Note (or the reasons it is parked) out.

``Pipeline.run(raw, channel)`` parses (python-hl7), maps (the channel's
mapping), resolves the destination, builds the C-CDA and validates it (CDA
schema, C-CDA R2.1 Schematron errors phase, template fired). Pure apart from
reading the standards once: bytes and configuration in, a :class:`Processed`
out; the engine stores it.

Invariants
----------
* A document is ``ready`` only if it passed every check; otherwise it is
  ``parked`` with every reason, and nothing about it is sent.
* Never raises on message content: parse errors, missing fields, no
  destination and validation failures all become reasons.
* The referral id of the message is the id of the Referral Act in the
  document (and the key of everything later about this referral).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ..config.channels import ChannelConfig
from ..config.directory import Directory, Specialist
from ..destination import NoDestination, resolve
from ..v2.parse import ParseError
from .mapping import Mapping, MissingField
from .model import Identifier, Name, Referral, Telecom

READY, PARKED = "ready", "parked"


@dataclass
class Processed:
    status: str
    referral_id: str = ""
    document: bytes | None = None
    destination: Specialist | None = None
    reasons: list[str] = field(default_factory=list)
    missing: list[MissingField] = field(default_factory=list)
    referral: Referral | None = None  # the mapped model, for the transports (patient id, referral id)


def referral_key(ident: Identifier) -> str:
    """The referral id as one string: 'extension' or 'extension@root' when the root is an OID."""
    return f"{ident.extension}@{ident.root}" if ident.root else ident.extension


class Pipeline:
    def __init__(self, mappings: dict[str, Mapping], directory: Directory, validator=None,
                 default_charset: str = "ascii", local_root: str | None = None) -> None:
        self.mappings = mappings
        self.directory = directory
        self.validator = validator  # None: documents cannot be checked, so they are parked
        self.default_charset = default_charset
        self.local_root = local_root
        self.validator_error = "no standards directory configured: the document cannot be validated"

    def run(self, raw: bytes, channel: ChannelConfig, *, document_uuid: str | None = None,
            now: str | None = None, codec: str | None = None) -> Processed:
        from .referral_note import BuildOptions, build_referral_note, to_bytes

        mapping = self.mappings.get(channel.mapping or "")
        if mapping is None:
            return Processed(PARKED, reasons=[f"channel {channel.name} has no mapping"])
        try:
            result = mapping.map_bytes(raw, codec or self.default_charset)
        except ParseError as exc:
            return Processed(PARKED, reasons=[f"message not parseable: {exc}"])
        referral = result.referral
        out = Processed(PARKED, referral_id=referral_key(referral.referral_id), missing=result.errors,
                        referral=referral)
        out.reasons += [e.text for e in result.errors]
        try:
            out.destination = resolve(channel, self.directory, referral)
            _address_recipient(referral, out.destination)
        except NoDestination as exc:
            out.reasons.append(f"no destination: {exc}")
        if result.errors:
            return out  # a document without its required fields would be wrong, not just incomplete
        referral.document_id = Identifier(root=document_uuid or str(uuid.uuid4()))
        referral.created = now or referral.created
        options = BuildOptions(local_root=self.local_root) if self.local_root else None
        tree = build_referral_note(referral, options)
        out.document = to_bytes(tree)
        if self.validator is None:
            out.reasons.append(self.validator_error)
        else:
            report = self.validator.validate(tree)
            out.reasons += [line for line in report.lines()] if not report.ok else []
        if not out.reasons:
            out.status = READY
        return out


def _address_recipient(referral, specialist: Specialist) -> None:
    """Fill what the message left out about the recipient from the directory entry."""
    r = referral.recipient
    if not r.name and not r.organization:
        r.organization = specialist.organization or specialist.name
    if not r.organization:
        r.organization = specialist.organization
    if specialist.fax and not any(t.value.startswith("fax:") for t in r.telecom):
        r.telecom.append(Telecom(value="fax:" + specialist.fax.replace(" ", ""), use="WP"))
    if specialist.direct:
        r.direct_address = specialist.direct
    if not r.name and specialist.name and not specialist.organization:
        r.name = Name(family=specialist.name)
