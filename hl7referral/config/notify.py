"""The ``[notify]`` section of ``engine.toml`` and of a channel file: who is told, how, and in what words.

::

    [notify]
    coordinator_notifier = "email"      # the notifier for coordinator alerts ("" = recorded, not sent)
    patient_notifier = "email"          # for patient/owner messages ("" = recorded, not sent)
    specialist_notifier = ""            # for consult-note requests to the specialist
    referrer_notifier = ""              # for follow-up tasks to the referring clinician
    default_owner = "role:referral-coordinators"

    [notify.owners]                     # owner -> their address per notifier
    "role:referral-coordinators" = { email = "coordinators@clinic.test", webhook = "#referrals" }
    "alice" = { email = "alice@clinic.test" }

    [notify.rule_owners]                # rule -> owner (else the referral's owner, else default_owner)
    "note-escalation" = "role:clinical-leads"

    [notify.notifiers.email]            # one table per notifier; plugin defaults to the table's name
    plugin = "email"
    host = "127.0.0.1"
    ...

    [notify.templates.booking-reminder-1]           # per rule; subject and/or body
    subject = "Please book your appointment with $specialist"
    [notify.templates.booking-reminder-1.webhook]   # only for the notifier named webhook
    body = "..."

A channel file's ``[notify]`` has the same shape: its scalars replace the
engine's, its owners and rule_owners add to (and per address override) the
engine's, its notifiers replace same-named ones, and its templates are looked
at before the engine's (:func:`merge`).

Loading builds every notifier once (no I/O, no secrets read), so a misspelt
key, a missing ``from`` or an owner without an address fails at start with the
file, line and key, never at the first alert.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..notify.base import AUDIENCES, Notice, Notifier, NotifierSettingsError, Owner, check_owner, load_notifier, \
    resolve_owner
from ..notify.templates import RULES, check_template, known_rule, render
from .schema import ConfigError, locate, validate

DEFAULT_OWNER = "role:referral-coordinators"
_NOTIFIER_KEYS = tuple(f"{a}_notifier" for a in AUDIENCES)  # coordinator_notifier, patient_notifier, ...
_SCALARS = (*_NOTIFIER_KEYS, "default_owner")
NOTIFY_SCHEMA = {
    **{k: str for k in _SCALARS},
    "owners": dict,        # owner -> {notifier name = address}; checked here
    "rule_owners": dict,   # rule -> owner
    "notifiers": dict,     # name -> {plugin = "...", settings...}; the plugin checks its settings
    "templates": dict,     # rule -> {subject, body, <notifier name> = {subject, body}}
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TEMPLATE_FIELDS = ("subject", "body")


@dataclass(frozen=True)
class Composed:
    """A notice ready to send, and how: ``notifier`` "" means record it, send nothing."""

    notifier: str
    notice: Notice
    owner: Owner


@dataclass(frozen=True)
class NotifyConfig:
    coordinator_notifier: str = ""
    patient_notifier: str = ""
    specialist_notifier: str = ""
    referrer_notifier: str = ""
    default_owner: str = DEFAULT_OWNER
    owners: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    rule_owners: Mapping[str, str] = field(default_factory=dict)
    notifiers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # name -> its table
    templates: tuple[Mapping[str, Mapping[str, Any]], ...] = ()                # layers, most specific first
    file: str = field(default="", compare=False)
    text: str = field(default="", repr=False, compare=False)
    given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)  # scalars set in the file
    instances: Mapping[str, Notifier] = field(default_factory=dict, repr=False, compare=False)

    def notifier_for(self, audience: str) -> str:
        """The notifier name for *audience* ("" = record, do not send)."""
        if audience not in AUDIENCES:
            raise ValueError(f"audience must be one of {', '.join(AUDIENCES)}")
        return getattr(self, f"{audience}_notifier")

    def owner(self, rule: str, notifier: str, requested: str = "") -> Owner:
        """Who owns a notice for *rule*, and their address for *notifier* (see notify.base.resolve_owner)."""
        return resolve_owner(rule=rule, notifier=notifier, default_owner=self.default_owner, owners=self.owners,
                             rule_owners=self.rule_owners, requested=requested)

    def build_notifiers(self) -> dict[str, Notifier]:
        """Every configured notifier, by name (built at load; stateless, safe to share between threads)."""
        return dict(self.instances)

    def address(self, audience: str, rule: str, *, owner: str = "", to: str = "") -> tuple[str, Owner, str]:
        """(notifier, owner, recipient) for a notice: coordinator alerts go to their owner's address,
        the others to *to* (the patient's or animal owner's address, the specialist's)."""
        notifier = self.notifier_for(audience)
        who = self.owner(rule, notifier, owner)
        return notifier, who, (to or who.to if audience == "coordinator" else to)

    def compose(self, *, key: str, referral_id: str, rule: str, audience: str, values: Mapping[str, Any],
                owner: str = "", to: str = "") -> Composed:
        """The notice for one due rule, rendered with this configuration's templates and addressed.

        *owner*: the referral's own owner, if it has one (else the rule's, else the
        default owner). *to*: the recipient's address for patient, specialist and
        referrer notices; coordinator alerts go to their owner's address from
        ``[notify.owners]`` (see :meth:`address`).
        """
        notifier, who, to = self.address(audience, rule, owner=owner, to=to)
        data = {str(k): str(v) for k, v in values.items() if v is not None}
        data.update(key=key, referral_id=referral_id, rule=rule, owner=who.name, audience=audience)
        text = render(rule, audience, data, notifier=notifier, layers=self.templates)
        notice = Notice(key=key, referral_id=referral_id, rule=rule, audience=audience, owner=who.name, to=to,
                        subject=text.subject, body=text.body, data=data)
        return Composed(notifier, notice, who)

    def messages(self, audience: str, rule: str, values: Mapping[str, Any], *, owner: str = "",
                 to: str = "") -> list[tuple[str, str, str, str]]:
        """``[(notifier, recipient, subject, body)]`` for a rule, as the loop tracker's ``Render`` hook wants.

        Empty when nobody can be reached this way: no notifier for the audience, or
        one that needs an address and has none (the tracker then makes a call task).
        """
        notifier, who, to = self.address(audience, rule, owner=owner, to=to)
        instance = self.instances.get(notifier)
        if instance is None or (instance.needs_address and (not to or instance.check_address(to))):
            return []
        data = {str(k): str(v) for k, v in values.items() if v is not None}
        data.update(rule=rule, owner=who.name, audience=audience)
        text = render(rule, audience, data, notifier=notifier, layers=self.templates)
        return [(notifier, to, text.subject, text.body)]


# --------------------------------------------------------------------------- parsing


def _fail(file: str, text: str, key: str, message: str) -> ConfigError:
    """A ConfigError at *key*'s line, else at the nearest enclosing table's."""
    line, parts = 0, key.split(".")
    while text and parts and not line:
        line = locate(text, ".".join(parts))
        parts.pop()
    return ConfigError(file, line, key, message)


def parse_notify(data: Mapping[str, Any], file: str, text: str, *, partial: bool = False) -> NotifyConfig:
    """The ``[notify]`` table *data* of *file* (its TOML *text*, for line numbers; "" if none).

    *partial*: a channel's table, which may name notifiers and owners only the
    engine defines; its cross-references are checked by :func:`merge`.
    """
    data = dict(data)
    validate(data, NOTIFY_SCHEMA, file=file, text=text, path="notify")

    def fail(key: str, message: str) -> ConfigError:
        return _fail(file, text, f"notify.{key}", message)

    default_owner = data.get("default_owner", DEFAULT_OWNER)
    if check_owner(default_owner):
        raise fail("default_owner", check_owner(default_owner))

    notifiers: dict[str, dict[str, Any]] = {}
    instances: dict[str, Notifier] = {}
    for name, table in data.get("notifiers", {}).items():
        if not _NAME.match(name):
            raise fail(f"notifiers.{name}", "a notifier name is letters, digits, - and _")
        if not isinstance(table, dict):
            raise fail(f"notifiers.{name}", "must be a table (plugin = \"email\", ...)")
        plugin = table.get("plugin", name)
        if not isinstance(plugin, str) or not plugin:
            raise fail(f"notifiers.{name}.plugin", "must be the name of a notifier plugin (email, webhook, ...)")
        settings = {k: v for k, v in table.items() if k != "plugin"}
        try:
            instances[name] = load_notifier(plugin, settings)
        except NotifierSettingsError as exc:
            raise fail(f"notifiers.{name}.{exc.key}", exc.message) from None
        notifiers[name] = dict(table)

    owners: dict[str, dict[str, str]] = {}
    for owner, addresses in data.get("owners", {}).items():
        if check_owner(owner):
            raise fail(f"owners.{owner}", check_owner(owner))
        if not isinstance(addresses, dict):
            raise fail(f"owners.{owner}", "must be a table of notifier = \"address\" "
                                          "(e.g. { email = \"alice@clinic.test\" })")
        for notifier, address in addresses.items():
            if not isinstance(address, str):
                raise fail(f"owners.{owner}.{notifier}", "must be a string (the address)")
        owners[owner] = dict(addresses)

    rule_owners: dict[str, str] = {}
    for rule, owner in data.get("rule_owners", {}).items():
        if not known_rule(rule):
            raise fail(f"rule_owners.{rule}", f"unknown rule (known: {', '.join(RULES)})")
        if not isinstance(owner, str) or check_owner(owner):
            raise fail(f"rule_owners.{rule}", check_owner(owner) if isinstance(owner, str) else "must be a string")
        rule_owners[rule] = owner

    templates: dict[str, dict[str, Any]] = {}
    for rule, table in data.get("templates", {}).items():
        if not known_rule(rule):
            raise fail(f"templates.{rule}", f"unknown rule (known: {', '.join(RULES)})")
        if not isinstance(table, dict):
            raise fail(f"templates.{rule}", "must be a table (subject = \"...\", body = \"...\")")
        for k, v in table.items():
            if isinstance(v, dict):  # a notifier's own subject/body
                for f, t in v.items():
                    _check_field(fail, f"templates.{rule}.{k}.{f}", f, t)
            else:
                _check_field(fail, f"templates.{rule}.{k}", k, v)
        templates[rule] = table

    cfg = NotifyConfig(
        **{k: data.get(k, "") for k in _NOTIFIER_KEYS}, default_owner=default_owner, owners=owners,
        rule_owners=rule_owners, notifiers=notifiers, templates=(templates,) if templates else (),
        file=file, text=text, given=frozenset(k for k in _SCALARS if k in data), instances=instances,
    )
    if not partial:
        _cross_check(cfg, cfg, everything=True)
    return cfg


def _check_field(fail, key: str, name: str, value: Any) -> None:
    if name not in _TEMPLATE_FIELDS:
        raise fail(key, "a template has a subject and a body (and tables named after notifiers)")
    if not isinstance(value, str):
        raise fail(key, "must be a string")
    problem = check_template(value, one_line=name == "subject")
    if problem:
        raise fail(key, problem)


def merge(engine: NotifyConfig, channel: NotifyConfig) -> NotifyConfig:
    """The configuration for one channel: the engine's, with the channel's ``[notify]`` over it.

    Checks what the channel adds against the whole (its notifiers, owners'
    addresses, template tables); errors name the channel's file.
    """
    owners = {o: dict(a) for o, a in engine.owners.items()}
    for o, addresses in channel.owners.items():
        owners[o] = {**owners.get(o, {}), **addresses}
    merged = dataclasses.replace(
        engine,
        **{k: getattr(channel, k) for k in channel.given},
        owners=owners,
        rule_owners={**engine.rule_owners, **channel.rule_owners},
        notifiers={**engine.notifiers, **channel.notifiers},
        templates=channel.templates + engine.templates,
        file=channel.file, text=channel.text, given=engine.given | channel.given,
        instances={**engine.instances, **channel.instances},
    )
    _cross_check(merged, channel, everything=False)
    return merged


def _cross_check(full: NotifyConfig, part: NotifyConfig, *, everything: bool) -> None:
    """Check the names and addresses *part* (a file's own table) uses against *full*; errors name part's file."""

    def fail(key: str, message: str) -> ConfigError:
        return _fail(part.file, part.text, f"notify.{key}", message)

    known = ", ".join(sorted(full.instances)) or "none: add a [notify.notifiers.<name>] table"
    for k in _NOTIFIER_KEYS:
        name = getattr(full, k)
        if (everything or k in part.given) and name and name not in full.instances:
            raise fail(k, f"no notifier named {name!r} (configured: {known})")
    for owner, addresses in part.owners.items():
        for name, address in addresses.items():
            notifier = full.instances.get(name)
            if notifier is None:
                raise fail(f"owners.{owner}.{name}", f"no notifier named {name!r} (configured: {known})")
            problem = notifier.check_address(address) if address else None
            if problem:
                raise fail(f"owners.{owner}.{name}", f"the {name} address {problem}")
    for layer in part.templates:
        for rule, table in layer.items():
            for k, v in table.items():
                if isinstance(v, dict) and k not in full.instances:
                    raise fail(f"templates.{rule}.{k}", f"no notifier named {k!r} (configured: {known})")
    # Coordinator alerts must reach someone: the default owner, and each rule's owner, need an address.
    coordinator = full.instances.get(full.coordinator_notifier)
    if coordinator is None or not coordinator.needs_address:
        return
    # Only what this file changed: a channel that touches none of it cannot have broken it.
    default_matters = everything or bool(part.given & {"default_owner", "coordinator_notifier"} or part.owners)
    rule_owners = full.rule_owners if everything or "coordinator_notifier" in part.given else part.rule_owners
    checks = [("default_owner", full.default_owner)] if default_matters else []
    checks += [(f"rule_owners.{rule}", owner) for rule, owner in rule_owners.items()]
    for key, owner in checks:
        if not full.owners.get(owner, {}).get(full.coordinator_notifier):
            raise fail(key, f"owner {owner!r} has no {full.coordinator_notifier} address in [notify.owners]: "
                            f"coordinator alerts would reach nobody")
