"""The ``[loop]`` section of ``engine.toml``: SLA thresholds, the business calendar, owners,
prior-authorization rules, per-partner OSU decoding and the return leg of consult notes.

Every threshold of :class:`~hl7referral.loop.sla.Policy` is a key of ``[loop.sla]``; each
``[[loop.sla.overrides]]`` entry names any of ``channel``, ``payer``, ``specialty`` and the
thresholds it changes. The entry matching the most of those three wins (a later one wins a
tie), so "cardiology at ACME" beats "cardiology" beats the defaults.

Invariants
----------
* Loading checks everything (types, unknown keys, the calendar's zone and dates, owners
  never empty), so a bad value fails at start with file, line and key, never at 3 a.m.
  when a timer fires.
* Resolution (:meth:`LoopConfig.policy_for`, :meth:`LoopConfig.owner_for`,
  :meth:`LoopConfig.auth_required`) is pure: values in, values out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..loop.calendar import Calendar
from ..loop.sla import Policy
from .schema import ConfigError, locate

_MATCH = {"channel": str, "payer": str, "specialty": str}
_THRESHOLDS = {"receipt_hours": float, "notify_patient_hours": float, "booking_reminder_days": [float],
               "booking_alert_days": float, "checkin_days_before": float, "no_show_outreach_hours": float,
               "note_reminder_business_day": int, "note_escalation_business_days": int}
LOOP_SCHEMA = {
    "timer_interval": float,
    "coordinator": str,
    "calendar": {"zone": str, "weekdays": [str], "holidays": [str]},
    "sla": {**_THRESHOLDS, "overrides": [{**_MATCH, **_THRESHOLDS}]},
    "owners": [{**_MATCH, "owner": str}],
    "auth": [{"payer": str, "specialty": str, "required": bool, "note": str}],
    "osu": [dict],
    "return": {"endpoint": str, "ack_timeout": float, "sending_application": str, "sending_facility": str,
               "receiving_application": str, "receiving_facility": str, "version": str, "max_attempts": int,
               "first_delay": float, "max_delay": float},
}


@dataclass(frozen=True)
class Rule:
    """A match on (channel, payer, specialty): "" matches anything."""

    channel: str = ""
    payer: str = ""
    specialty: str = ""

    def score(self, channel: str, payer: str, specialty: str) -> int | None:
        """How many fields matched (None: one that is set did not)."""
        n = 0
        for want, got in ((self.channel, channel), (self.payer, payer), (self.specialty, specialty)):
            if want:
                if want.casefold() != (got or "").casefold():
                    return None
                n += 1
        return n


def _best(entries, channel: str, payer: str, specialty: str):
    best, best_score = None, -1
    for rule, value in entries:
        s = rule.score(channel, payer, specialty)
        if s is not None and s >= best_score:
            best, best_score = value, s
    return best


@dataclass(frozen=True)
class ReturnLeg:
    """Where consult notes go back: the referring EHR's MLLP listener ("" = not configured)."""

    endpoint: str = ""
    ack_timeout: float = 30.0
    sending_application: str = "HL7REFERRAL"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    version: str = "2.5.1"
    max_attempts: int = 10
    first_delay: float = 30.0
    max_delay: float = 1800.0


@dataclass(frozen=True)
class LoopConfig:
    timer_interval: float = 60.0
    coordinator: str = "role:referral-coordinators"
    calendar: Calendar = field(default_factory=Calendar)
    policy: Policy = field(default_factory=Policy)
    overrides: tuple[tuple[Rule, Policy], ...] = ()
    owners: tuple[tuple[Rule, str], ...] = ()
    auth: tuple[tuple[Rule, bool], ...] = ()
    osu: tuple = ()                 # the partners' OSU decoding tables (correlate.OsuTable), parsed at load
    return_leg: ReturnLeg = field(default_factory=ReturnLeg)

    def policy_for(self, channel: str = "", payer: str = "", specialty: str = "") -> Policy:
        return _best(self.overrides, channel, payer, specialty) or self.policy

    def owner_for(self, channel: str = "", payer: str = "", specialty: str = "") -> str:
        """Who owns this referral's alerts: a named coordinator or a role, never nobody."""
        return _best(self.owners, channel, payer, specialty) or self.coordinator

    def owner_of(self, referral: dict) -> str:
        """:meth:`owner_for` a stored referral row (its channel, payer and specialty)."""
        return self.owner_for(referral.get("channel") or "", referral.get("payer") or "",
                              referral.get("specialty") or "")

    def auth_required(self, payer: str = "", specialty: str = "", channel: str = "") -> bool:
        """Do the payer rules hold this referral's send until authorization is approved?"""
        return bool(_best(self.auth, channel, payer, specialty))


def _policy(base: Policy, table: dict) -> Policy:
    values = {k: (tuple(float(x) for x in v) if k == "booking_reminder_days" else v)
              for k, v in table.items() if k in _THRESHOLDS}
    return dataclasses.replace(base, **values)


def _rule(entry: dict) -> Rule:
    return Rule(entry.get("channel", ""), entry.get("payer", ""), entry.get("specialty", ""))


def load_loop(data: dict[str, Any], defaults: dict[str, Any], source: str, text: str) -> LoopConfig:
    def err(key: str, message: str) -> ConfigError:
        return ConfigError(source, locate(text, f"loop.{key}") if text else 0, f"loop.{key}", message)

    d = {**defaults, **data}
    sla = {**defaults.get("sla", {}), **data.get("sla", {})}
    try:
        calendar = Calendar.from_config({**defaults.get("calendar", {}), **data.get("calendar", {})})
    except (ValueError, KeyError) as exc:   # ZoneInfoNotFoundError is a KeyError
        raise err("calendar", f"{exc}") from None
    if not calendar.weekdays:
        raise err("calendar.weekdays", "no working weekdays: business-day deadlines could never fall due")
    for key, value in sla.items():
        if key in _THRESHOLDS and key != "booking_reminder_days" and value <= 0:
            raise err(f"sla.{key}", "must be more than 0")
    policy = _policy(Policy(), sla)
    overrides = []
    for i, entry in enumerate(sla.get("overrides", [])):
        if not any(entry.get(k) for k in _MATCH):
            raise err(f"sla.overrides.{i}", "names none of channel, payer, specialty: it would replace the defaults")
        overrides.append((_rule(entry), _policy(policy, entry)))
    coordinator = d.get("coordinator", "role:referral-coordinators")
    if not coordinator.strip():
        raise err("coordinator", "must name a coordinator or a role: an alert needs an owner")
    owners = []
    for i, entry in enumerate(d.get("owners", [])):
        if not entry.get("owner", "").strip():
            raise err(f"owners.{i}.owner", "required: a named coordinator or a role (role:...)")
        owners.append((_rule(entry), entry["owner"]))
    auth = []
    for i, entry in enumerate(d.get("auth", [])):
        if not entry.get("payer") and not entry.get("specialty"):
            raise err(f"auth.{i}", "names neither payer nor specialty")
        auth.append((_rule(entry), bool(entry.get("required", True))))
    ret = {**defaults.get("return", {}), **data.get("return", {})}
    if ret.get("ack_timeout", 30.0) <= 0:
        raise err("return.ack_timeout", "must be more than 0 seconds")
    if ret.get("max_attempts", 10) < 1:
        raise err("return.max_attempts", "must be at least 1")
    from ..loop.correlate import load_tables   # here: correlate imports the cda package, which imports config
    try:
        osu = load_tables(d.get("osu", []))
    except ValueError as exc:
        raise err("osu", str(exc).removeprefix("loop.osu")) from None
    interval = float(d.get("timer_interval", 60.0))
    if interval <= 0:
        raise err("timer_interval", "must be more than 0 seconds")
    return LoopConfig(timer_interval=interval, coordinator=coordinator, calendar=calendar, policy=policy,
                      overrides=tuple(overrides), owners=tuple(owners), auth=tuple(auth),
                      osu=osu, return_leg=ReturnLeg(**ret))
