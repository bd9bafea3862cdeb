"""What every notifier plugin implements, what it sends, and who a notice is for.

A notifier is a plugin: a class registered under the entry point group
``hl7referral.notifiers`` (``email`` and ``webhook`` are built in), built from a
``[notify.notifiers.<name>]`` table (its keys minus ``plugin``) by
:func:`load_notifier`. It sends one :class:`Notice` per call.

Invariants
----------
* Every notice has an ``owner``: a named coordinator (``"alice"``) or a role
  (``"role:referral-coordinators"``), never empty. An alert that nobody owns is
  an alert nobody acts on; :func:`resolve_owner` always ends at a named owner
  (the configured default) and says when it had to fall back.
* Every notice has a ``key`` (``REF123/booking-overdue``), stable across retries:
  the caller de-duplicates on it (one stall is one alert), and notifiers carry it
  to the far end (an email's ``Message-ID`` derived from it, a webhook's
  ``Idempotency-Key``) so a resend after a crash is recognisably the same message.
* Notifiers block (the engine calls them from a worker thread), keep no state
  between calls but their settings, open and close their own connection per
  call, and never retry inside a call: the caller's ledger owns retries.
* :meth:`Notifier.send` returns a :class:`Result` or raises :class:`NotifyError`
  whose ``outcome`` says what the caller may do next:

  - ``"retry"``: not delivered, or not known to be (no connection, a timeout, a
    4xx SMTP reply, an HTTP 5xx/408/429, a missing secret); send the same notice
    again later. The far end recognises a resend by the key.
  - ``"rejected"``: final for this notice (an SMTP 5xx, an HTTP 4xx, no address).
* No PHI in logs or exception text: keys, referral ids, rules, owners, reply
  codes. Never an address, a subject, a body or a template value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from .. import plugins
from types import MappingProxyType
from typing import Any, Mapping, Protocol, runtime_checkable

GROUP = "hl7referral.notifiers"
RETRY, REJECTED = "retry", "rejected"
AUDIENCES = ("coordinator", "patient", "specialist", "referrer")

# The SLA's actions (hl7referral.loop.sla) and the audience each one notifies.
AUDIENCE_OF_ACTION = {
    "alert-coordinator": "coordinator",
    "notify-patient": "patient",        # the patient, or the owner of an animal patient
    "request-note": "specialist",
    "task-referrer": "referrer",
}

# A key travels in mail and HTTP headers: printable ASCII, no spaces, bounded.
_KEY = re.compile(r"^[!-~]{1,200}$")
_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ADDRESS_IN_TEXT = re.compile(r"<?[^\s<>@]+@[^\s<>@]+>?")


def scrub(text: str, limit: int = 160) -> str:
    """One line of a far end's reply fit for logs: addresses masked, control characters gone, bounded."""
    text = _ADDRESS_IN_TEXT.sub("<address>", " ".join(_CONTROL.sub(" ", text).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_key(key: str) -> str | None:
    """Why *key* cannot be a notice key (None if it can)."""
    if not isinstance(key, str) or not _KEY.match(key):
        return "must be 1 to 200 printable ASCII characters without spaces (e.g. REF123/booking-overdue)"
    return None


def check_owner(owner: str) -> str | None:
    """Why *owner* cannot be an owner (None if it can): a coordinator's name or a role ("role:...")."""
    if not isinstance(owner, str) or not owner.strip():
        return "must name a coordinator or a role (role:referral-coordinators): an alert needs an owner"
    if owner != owner.strip() or _CONTROL.search(owner) or len(owner) > 100:
        return "must be one line of at most 100 characters, without leading or trailing spaces"
    if owner.endswith(":"):
        return "names nobody after the colon (role:<name>)"
    return None


@dataclass(frozen=True)
class Notice:
    """One message to one recipient, rendered and addressed; what a notifier sends."""

    key: str                  # dedup key "REF/rule[/suffix]": stable across retries
    referral_id: str
    rule: str                 # the SLA rule (receipt-overdue, booking-reminder-1, ... document-parked)
    audience: str             # coordinator | patient (or an animal's owner) | specialist | referrer
    owner: str                # who must act: "alice" or "role:referral-coordinators"; never empty
    to: str                   # the address for this notifier ("" where the notifier needs none)
    subject: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)   # the template values

    def __post_init__(self) -> None:
        problem = check_key(self.key)
        if problem:
            raise ValueError(f"key: {problem}")
        problem = check_owner(self.owner)
        if problem:
            raise ValueError(f"owner of {self.key}: {problem}")
        if not isinstance(self.rule, str) or not _RULE.match(self.rule):
            raise ValueError(f"rule of {self.key}: letters, digits, . _ - (e.g. booking-overdue)")
        if not isinstance(self.referral_id, str) or _CONTROL.search(self.referral_id) or len(self.referral_id) > 200:
            raise ValueError(f"referral_id of {self.key}: one line of at most 200 characters")
        if self.audience not in AUDIENCES:
            raise ValueError(f"audience of {self.key}: must be one of {', '.join(AUDIENCES)}")
        if _CONTROL.search(self.to) or _CONTROL.search(self.subject):
            raise ValueError(f"to/subject of {self.key}: control characters (a header injection)")
        # Read-only, so a notice handed to a worker thread cannot change under it.
        object.__setattr__(self, "data", MappingProxyType({str(k): str(v) for k, v in self.data.items()}))

    def __repr__(self) -> str:
        # No PHI in reprs either (they end up in tracebacks and logs).
        return (f"Notice(key={self.key!r}, referral_id={self.referral_id!r}, rule={self.rule!r}, "
                f"audience={self.audience!r}, owner={self.owner!r})")


@dataclass(frozen=True)
class Result:
    """A notice the far end accepted."""

    notifier: str             # the plugin's name ("email", "webhook")
    key: str
    reference: str = ""       # what the far end knows it by: the Message-ID, the Idempotency-Key
    detail: str = ""          # the far end's reply, scrubbed ("250 2.0.0 queued as 4B1C", "HTTP 202")


class NotifyError(Exception):
    """A send that did not succeed; ``outcome`` is ``retry`` or ``rejected`` (see the module invariants).

    ``code`` is short and machine-readable: ``"smtp-550"``, ``"http-503"``, ``"connect"``,
    ``"timeout"``, ``"tls"``, ``"config"``, ``"no-address"``...
    """

    def __init__(self, message: str, outcome: str = RETRY, code: str = "") -> None:
        super().__init__(message)
        if outcome not in (RETRY, REJECTED):
            raise ValueError(f"outcome {outcome!r}")
        self.outcome = outcome
        self.code = code


class NotifierSettingsError(ValueError):
    """A notifier's settings are wrong; ``key`` names the offending key (relative to its table)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@runtime_checkable
class Notifier(Protocol):
    name: str                 # the entry point name ("email")
    needs_address: bool       # True: a notice without ``to`` is rejected (email); False: ``to`` is optional

    def send(self, notice: Notice) -> Result:
        """Deliver *notice* once (blocking); NotifyError("retry" | "rejected") if not delivered."""

    def check_address(self, address: str) -> str | None:
        """Why *address* is not an address this notifier can send to (None if it is); for config checks."""


def available() -> dict[str, Any]:
    """Notifier entry points by name."""
    return plugins.available(GROUP)


def load_notifier(name: str, options: Mapping[str, Any]) -> Notifier:
    """Build the notifier plugin registered as *name* from its settings (NotifierSettingsError if wrong).

    Building does no I/O and reads no secret: those happen at send time.
    """
    return plugins.build(GROUP, name, options, lambda known: NotifierSettingsError(
        "plugin", f"no notifier plugin {name!r} (installed: {known})"))


# --------------------------------------------------------------------------- owners


@dataclass(frozen=True)
class Owner:
    """Who must act on a notice, and where this notifier reaches them."""

    name: str                 # who must act (never empty)
    to: str                   # the address for the notifier ("" when none is configured)
    via: str                  # whose address ``to`` is: ``name``, or the default owner on fallback

    @property
    def fell_back(self) -> bool:
        return self.via != self.name


def resolve_owner(*, rule: str, notifier: str, default_owner: str,
                  owners: Mapping[str, Mapping[str, str]], rule_owners: Mapping[str, str] | None = None,
                  requested: str = "") -> Owner:
    """The owner of a notice for *rule*, and their address for *notifier*.

    The owner is *requested* (say the referral's assigned coordinator), else the
    rule's owner (``[notify.rule_owners]``), else *default_owner*. If that owner
    has no address for *notifier*, the notice goes to the default owner's address
    (``via``) but keeps its owner: the role's mailbox sees that alice's alert
    could not reach alice. ValueError if there is no owner at all.
    """
    name = requested or (rule_owners or {}).get(rule, "") or default_owner
    if not name:
        raise ValueError(f"notice for rule {rule!r} has no owner and no default_owner is configured")
    to = owners.get(name, {}).get(notifier, "") if notifier else ""
    if to or not notifier or name == default_owner:
        return Owner(name, to, name)
    return Owner(name, owners.get(default_owner, {}).get(notifier, ""), default_owner)
