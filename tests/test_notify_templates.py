"""notify.templates: built-in text for every rule, layered overrides, and values that may be missing."""

from __future__ import annotations

import re
import string

import pytest

from hl7referral.notify.templates import (
    DEFAULTS,
    GENERIC,
    RULES,
    check_template,
    default_template,
    known_rule,
    pick,
    render,
)

# Every rule the SLA (hl7referral.loop.sla) and the engine raise, and who each is for.
EXPECTED = {
    "receipt-overdue": "coordinator", "notify-patient": "patient", "booking-reminder-1": "patient",
    "booking-reminder-2": "patient", "booking-overdue": "coordinator", "check-in-reminder": "patient",
    "no-show-alert": "coordinator", "no-show-outreach": "patient", "note-request": "specialist",
    "note-reminder": "specialist", "note-escalation": "coordinator", "follow-up-task": "referrer",
    "document-parked": "coordinator", "auth-pending": "coordinator",
}
FULL = {
    "key": "REF123/booking-overdue", "referral_id": "REF123", "owner": "alice", "due_at": "1 May 09:00",
    "deadline": "1 May 17:00", "detail": "not booked 14 days after receipt", "attempts": "2",
    "specialist": "Dr. Müller, Cardiology", "specialist_phone": "+1 555 0100", "specialist_address": "1 Heart St",
    "purpose": "a cardiology consultation", "how_to_book": "Call the clinic.", "scheduling_link": "https://book.test/c",
    "appointment": "Tue 7 May 10:30", "practice": "Riverside Family Practice", "practice_phone": "+1 555 0199",
    "reply_to": "notes@direct.riverside.test", "worklist_link": "https://engine.test/r/REF123",
    "document": "DOC-9", "payer": "Acme Health",
}
PATIENT_RULES = [r for r, a in EXPECTED.items() if a == "patient"]


def test_every_rule_has_built_in_text_for_its_audience():
    assert RULES == EXPECTED
    for rule, audience in EXPECTED.items():
        subject, body = DEFAULTS[(rule, audience)]
        assert subject.strip() and "\n" not in subject
        assert body.strip()
        assert check_template(subject, one_line=True) is None
        assert check_template(body, one_line=False) is None
    for audience in ("coordinator", "patient", "specialist", "referrer"):
        assert audience in GENERIC


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_rendering_with_every_value_leaves_no_placeholder(rule):
    out = render(rule, EXPECTED[rule], FULL)
    assert "$" not in out.subject + out.body
    assert out.body.endswith("\n") and not out.body.endswith("\n\n")
    assert "\n\n\n" not in out.body


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_missing_values_never_raise_and_leave_no_placeholder_or_empty_label(rule):
    out = render(rule, EXPECTED[rule], {})
    assert out.subject and out.body.strip()
    assert not re.search(r"\$\w", out.subject + out.body)
    # A line whose values are all missing is left out: no "Book online: " with nothing after it.
    assert not re.search(r":\s*$", out.body, re.M), out.body
    assert "[]" not in out.subject


def test_a_line_is_dropped_only_when_all_its_values_are_missing():
    values = dict(FULL)
    del values["scheduling_link"]
    out = render("booking-reminder-1", "patient", values)
    assert "Book online" not in out.body
    assert "Phone: +1 555 0100" in out.body
    assert "How to book: Call the clinic." in out.body
    assert "Book online: https://book.test/c" in render("booking-reminder-1", "patient", FULL).body


@pytest.mark.parametrize("rule", PATIENT_RULES)
def test_patient_messages_read_for_a_person_and_for_an_animals_owner(rule):
    person = render(rule, "patient", {k: v for k, v in FULL.items() if k != "patient_or_pet"})
    pet = render(rule, "patient", {**FULL, "patient_or_pet": "Bella"})
    for out in (person, pet):
        assert "Dr. Müller" in out.subject + out.body
        for word in ("your pet", "your health", "your child"):
            assert word not in out.body.lower()
    assert "Bella" in pet.body and "Bella" not in person.body
    assert " you " in person.body or " you." in person.body


def test_patient_booking_messages_carry_what_the_patient_needs_to_book():
    for rule in ("notify-patient", "booking-reminder-1", "booking-reminder-2", "no-show-outreach"):
        _, body = default_template(rule, "patient")
        names = string.Template(body).get_identifiers()
        for needed in ("specialist", "specialist_phone", "how_to_book", "scheduling_link"):
            assert needed in names, (rule, needed)
    _, body = default_template("notify-patient", "patient")
    assert "purpose" in string.Template(body).get_identifiers()
    assert "appointment" in string.Template(default_template("check-in-reminder", "patient")[1]).get_identifiers()


def test_coordinator_alerts_name_their_owner_and_key():
    for rule, audience in EXPECTED.items():
        if audience == "coordinator":
            body = render(rule, audience, FULL).body
            assert "Owner: alice" in body
            assert "REF123/booking-overdue" in body
            assert "Due since: 1 May 09:00" in body


def test_overrides_are_layered_channel_first_and_per_field():
    engine = {"booking-reminder-1": {"subject": "Engine: book with $specialist", "body": "Engine body $purpose\n"}}
    channel = {"booking-reminder-1": {"subject": "Channel: book with $specialist"}}
    out = render("booking-reminder-1", "patient", FULL, layers=(channel, engine))
    assert out.subject == "Channel: book with Dr. Müller, Cardiology"     # the channel wins
    assert out.body == "Engine body a cardiology consultation\n"          # the body it did not override
    assert render("booking-reminder-1", "patient", FULL, layers=(engine,)).subject.startswith("Engine:")
    # Another rule is untouched.
    assert render("booking-reminder-2", "patient", FULL, layers=(channel, engine)).subject.startswith("Second")


def test_a_notifier_table_wins_within_its_layer_but_not_over_a_more_specific_layer():
    engine = {"no-show-alert": {"subject": "E generic", "webhook": {"subject": "E webhook"}}}
    channel = {"no-show-alert": {"body": "C body\n"}}
    assert pick("no-show-alert", "coordinator", notifier="webhook", layers=(channel, engine)) == \
        ("E webhook", "C body\n")
    assert pick("no-show-alert", "coordinator", notifier="email", layers=(channel, engine))[0] == "E generic"
    channel2 = {"no-show-alert": {"subject": "C generic"}}
    assert pick("no-show-alert", "coordinator", notifier="webhook", layers=(channel2, engine))[0] == "C generic"


def test_subjects_stay_one_line_and_dollars_survive():
    out = render("notify-patient", "patient", {**FULL, "specialist": "Dr. A\r\nBcc: x@y.test"},
                 layers=({"notify-patient": {"subject": "Fee $$20: $specialist $nothing", "body": "$5 and $$5\n"}},))
    assert out.subject == "Fee $20: Dr. A Bcc: x@y.test"
    assert "\n" not in out.subject and "\r" not in out.subject
    assert out.body == "$5 and $5\n"   # an invalid "$5" stays as written; "$$" is a dollar


def test_values_are_not_substituted_twice():
    out = render("notify-patient", "patient", {**FULL, "purpose": "$specialist ${referral_id}"})
    assert "The referral is for: $specialist ${referral_id}" in out.body


def test_unknown_rules_fall_back_to_the_audiences_generic_text():
    assert known_rule("booking-reminder-3") and not known_rule("booking-remider-1")
    assert default_template("booking-reminder-3", "patient") == DEFAULTS[("booking-reminder-2", "patient")]
    out = render("something-new", "coordinator", FULL)
    assert out.subject == "[REF123] something-new"
    assert "Owner: alice" in out.body
    assert render("notify-patient", "coordinator", FULL).subject == "[REF123] notify-patient"


def test_check_template_explains_what_is_wrong():
    assert check_template("one\ntwo", one_line=True) == "must be one line (a subject)"
    problem = check_template("costs $5", one_line=False)
    assert problem and "$$" in problem and "'$5'" in problem
    assert check_template("costs $$5 for ${specialist}", one_line=True) is None
