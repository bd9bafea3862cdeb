"""Subjects and bodies of notices: built-in defaults per rule and audience, overridable.

Templates are :class:`string.Template` text (``$specialist``, ``${referral_id}``,
``$$`` for a dollar sign), rendered with ``safe_substitute``:

* A missing value never raises: it renders as nothing, and a body line whose
  every placeholder is empty is left out, so ``Book online: $scheduling_link``
  disappears where no scheduling link is configured. A ``$`` that is not a
  placeholder stays as written.
* Subjects are one line: line breaks in values become spaces there.
* Patient messages read well for a person and for an animal's owner: the
  patient is ``$patient_or_pet`` ("you" unless the caller gives the pet's
  name), and nothing says "your health" or "your pet".

Layers, most specific first (see :func:`render`): a channel's
``[notify.templates.<rule>]``, then the engine's, then the built-in default
for (rule, audience), then the built-in default for the audience. In each
layer a sub-table named after the notifier (``[notify.templates.<rule>.webhook]``)
wins over the rule's own ``subject``/``body``; subject and body are looked up
separately, so overriding one keeps the other.

Template values (the caller gives what it has; :func:`render` adds none but the
fallbacks in :data:`FALLBACK_VALUES`):

==================  ==========================================================
key, referral_id    the notice's key and referral (always given by compose)
rule, owner         the SLA rule; who must act ("alice", "role:...")
due_at, deadline    when the rule fell due; by when to act (caller-formatted)
detail, attempts    the SLA's one-line reason; attempts/reminders so far
patient_or_pet      "you" (default), or the animal's name for veterinary referrals
specialist          the specialist or clinic; ``specialist_phone``, ``specialist_address``
purpose             what the referral is for (plain words)
how_to_book         how to book (call, online, the specialist calls you...)
scheduling_link     an online booking link, where configured
appointment         the appointment's date and time (caller-formatted)
practice            the referring practice; ``practice_phone``
reply_to            where the specialist sends the consult note
worklist_link       the referral in the coordinators' worklist
document, payer     for document-parked and auth-pending
==================  ==========================================================
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Every rule with built-in text, and the audience that text is for.
RULES: dict[str, str] = {
    "receipt-overdue": "coordinator",
    "notify-patient": "patient",
    "booking-reminder-1": "patient",
    "booking-reminder-2": "patient",
    "booking-overdue": "coordinator",
    "check-in-reminder": "patient",
    "no-show-alert": "coordinator",
    "no-show-outreach": "patient",
    "note-request": "specialist",
    "note-reminder": "specialist",
    "note-escalation": "coordinator",
    "follow-up-task": "referrer",
    "document-parked": "coordinator",
    "auth-pending": "coordinator",
}
# Rules a policy may add in numbered series (a third booking reminder) without new text.
_SERIES = re.compile(r"^booking-reminder-\d+$")

FALLBACK_VALUES: dict[str, dict[str, str]] = {
    "patient": {"patient_or_pet": "you", "specialist": "the specialist", "practice": "Your care team"},
    "specialist": {"practice": "the referring practice"},
}

_FIELDS = ("subject", "body")


def known_rule(rule: str) -> bool:
    return rule in RULES or bool(_SERIES.match(rule))


# --------------------------------------------------------------------------- built-in text

_BOOKING = """How to book: $how_to_book
Book online: $scheduling_link
Phone: $specialist_phone"""

_ALERT_FACTS = """Referral: $referral_id
Owner: $owner
Due since: $due_at
Act by: $deadline
Why: $detail
Specialist: $specialist
Specialist phone: $specialist_phone
Attempts so far: $attempts
Open in the worklist: $worklist_link"""

_ALERT_FOOTER = """This alert is sent once per stall (alert key $key): its owner acts on it and records the outcome."""


def _alert(what: str, action: str, extra: str = "") -> str:
    return f"{what}\n\n{_ALERT_FACTS}\n{extra}\n\nWhat to do: {action}\n\n{_ALERT_FOOTER}\n"


DEFAULTS: dict[tuple[str, str], tuple[str, str]] = {
    ("receipt-overdue", "coordinator"): (
        "[$referral_id] No receipt from the specialist",
        _alert("The referral was sent, and nothing has come back to show the specialist has it: "
               "no delivery confirmation, acceptance or appointment.",
               "check how it was sent (Direct or fax) and call the specialist's office to confirm they have it; "
               "send it again if they do not."),
    ),
    ("notify-patient", "patient"): (
        "Your referral to $specialist: how to book",
        f"""Hello,

We have referred $patient_or_pet to $specialist.
The referral is for: $purpose

{_BOOKING}
Address: $specialist_address

If you have questions, call us at $practice_phone.

$practice
""",
    ),
    ("booking-reminder-1", "patient"): (
        "Reminder: please book the appointment with $specialist",
        f"""Hello,

We referred $patient_or_pet to $specialist, and we have not yet heard that an appointment is booked.
The referral is for: $purpose

{_BOOKING}

If the appointment is already booked, thank you: there is nothing more to do.

$practice
""",
    ),
    ("booking-reminder-2", "patient"): (
        "Second reminder: please book the appointment with $specialist",
        f"""Hello,

This is a second reminder: we referred $patient_or_pet to $specialist, and no appointment is booked yet.
The referral is for: $purpose

{_BOOKING}

If something makes booking difficult, or the referral is no longer needed, call us at $practice_phone and we will help.
If the appointment is already booked, thank you: there is nothing more to do.

$practice
""",
    ),
    ("booking-overdue", "coordinator"): (
        "[$referral_id] Not booked: no appointment after the reminders",
        _alert("The specialist has the referral, but no appointment has been booked, "
               "and the reminders to the patient (or the animal's owner) have been sent.",
               "call the patient or owner and the specialist's office; book the appointment, "
               "or record why the referral is not going ahead."),
    ),
    ("check-in-reminder", "patient"): (
        "Appointment reminder: $specialist",
        """Hello,

This is a reminder of the appointment for $patient_or_pet with $specialist.
When: $appointment
Where: $specialist_address

To change or cancel the appointment, call $specialist_phone.

$practice
""",
    ),
    ("no-show-alert", "coordinator"): (
        "[$referral_id] Missed appointment",
        _alert("The appointment with the specialist was missed and no new one is booked.",
               "contact the patient or owner today to book again, or record why the referral is closing.",
               "Appointment: $appointment"),
    ),
    ("no-show-outreach", "patient"): (
        "Missed appointment with $specialist",
        f"""Hello,

The appointment for $patient_or_pet with $specialist was missed.
Appointment: $appointment
The referral is still open, so a new appointment can be booked.

{_BOOKING}

If the referral is no longer needed, or something makes it hard to attend, call us at $practice_phone.

$practice
""",
    ),
    ("note-request", "specialist"): (
        "Consult note requested: referral $referral_id",
        """Hello,

Thank you for seeing the patient we referred to you (referral $referral_id).
Please send your consult note to $practice, so we can plan the follow-up.
Send it to: $reply_to
Questions: $practice_phone
""",
    ),
    ("note-reminder", "specialist"): (
        "Reminder: consult note for referral $referral_id",
        """Hello,

We have not yet received your consult note for the patient we referred to you (referral $referral_id).
Please send it to $practice.
Send it to: $reply_to
Questions: $practice_phone
""",
    ),
    ("note-escalation", "coordinator"): (
        "[$referral_id] No consult note after the visit",
        _alert("The patient has been seen, and the specialist's consult note has not arrived "
               "after the request and the reminder.",
               "call the specialist's office for the note, and tell the referring clinician."),
    ),
    ("follow-up-task", "referrer"): (
        "[$referral_id] Consult note received: follow-up",
        """The specialist's consult note for referral $referral_id has arrived.
Specialist: $specialist

Please review it and plan the follow-up with the patient (or the animal's owner).
Open in the worklist: $worklist_link
""",
    ),
    ("document-parked", "coordinator"): (
        "Document parked: it matches no referral",
        _alert("A document arrived that could not be matched to a referral, so it is parked.",
               "match it to its referral in the worklist, or return it to the sender.",
               "Document: $document"),
    ),
    ("auth-pending", "coordinator"): (
        "[$referral_id] Prior authorization still pending",
        _alert("The referral is waiting for the payer's prior authorization.",
               "follow up with the payer, and tell the patient or owner if the appointment must wait.",
               "Payer: $payer"),
    ),
}

GENERIC: dict[str, tuple[str, str]] = {
    "coordinator": (
        "[$referral_id] $rule",
        _alert("A referral needs attention ($rule).", "review the referral in the worklist and act on it."),
    ),
    "patient": (
        "About your referral to $specialist",
        f"""Hello,

This is a message about the referral of $patient_or_pet to $specialist.
The referral is for: $purpose

{_BOOKING}

If you have questions, call us at $practice_phone.

$practice
""",
    ),
    "specialist": (
        "Referral $referral_id",
        """Hello,

This is a message about the patient we referred to you (referral $referral_id).
Questions: $practice_phone

$practice
""",
    ),
    "referrer": (
        "[$referral_id] $rule",
        """Referral $referral_id needs your attention ($rule).
Open in the worklist: $worklist_link
""",
    ),
}


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str


class _Values(dict):
    """Template values where a missing one is empty (``safe_substitute`` then never leaves ``$name``)."""

    def __missing__(self, key: str) -> str:
        return ""


def default_template(rule: str, audience: str) -> tuple[str, str]:
    """The built-in (subject, body) for *rule* sent to *audience* (the audience's generic text if none)."""
    if (rule, audience) in DEFAULTS:
        return DEFAULTS[(rule, audience)]
    if _SERIES.match(rule) and audience == "patient":
        return DEFAULTS[("booking-reminder-2", "patient")]
    return GENERIC.get(audience, GENERIC["coordinator"])


def pick(rule: str, audience: str, *, notifier: str = "",
         layers: Iterable[Mapping[str, Mapping[str, Any]]] = ()) -> tuple[str, str]:
    """The (subject, body) templates for *rule*: the first layer that has each, else the built-in one."""
    found: dict[str, str] = {}
    for layer in layers:
        table = layer.get(rule) or {}
        for f in _FIELDS:
            if f in found:
                continue
            specific = table.get(notifier) if notifier else None
            if isinstance(specific, Mapping) and isinstance(specific.get(f), str):
                found[f] = specific[f]
            elif isinstance(table.get(f), str):
                found[f] = table[f]
    subject, body = default_template(rule, audience)
    return found.get("subject", subject), found.get("body", body)


def render(rule: str, audience: str, values: Mapping[str, Any], *, notifier: str = "",
           layers: Iterable[Mapping[str, Mapping[str, Any]]] = ()) -> Rendered:
    """Subject and body for *rule* to *audience* with *values* (see the module docstring). Never raises on values."""
    subject_t, body_t = pick(rule, audience, notifier=notifier, layers=layers)
    merged = _Values(FALLBACK_VALUES.get(audience, {}))
    # An empty value counts as missing, so the audience's fallback (if any) shows instead.
    merged.update({str(k): str(v) for k, v in values.items() if v is not None and str(v) != ""})
    merged.setdefault("rule", rule)
    return Rendered(render_subject(subject_t, merged), render_body(body_t, merged))


def render_subject(template: str, values: Mapping[str, str]) -> str:
    flat = _Values({k: " ".join(v.split()) for k, v in values.items()})
    text = string.Template(template).safe_substitute(flat)
    return " ".join(re.sub(r"\[\s*\]", "", text).split())  # "[$referral_id]" with no referral id: gone


def render_body(template: str, values: Mapping[str, str]) -> str:
    lines: list[str] = []
    for line in template.splitlines():
        t = string.Template(line)
        names = t.get_identifiers()
        if names and not any(values.get(n) for n in names):
            continue  # every value this line shows is missing: leave the line out
        lines.append(t.safe_substitute(values).rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n"


def check_template(text: str, *, one_line: bool) -> str | None:
    """Why *text* is not a usable template (None if it is); for configuration checks."""
    if one_line and ("\n" in text or "\r" in text):
        return "must be one line (a subject)"
    for m in string.Template.pattern.finditer(text):
        if m.group("invalid") is not None:
            near = text[m.start():m.start() + 12]
            return f"{near!r} is not a placeholder: write $$ for a dollar sign, $name or ${{name}} for a value"
    return None
