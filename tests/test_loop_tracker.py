"""The tracker over a real store: referrals opened, events applied, SLA items acted on once, auth holds."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from hl7referral.config.loop import LoopConfig, Rule
from hl7referral.loop.calendar import UTC, Calendar
from hl7referral.loop.sla import Policy
from hl7referral.loop.states import Event, Kind, State
from hl7referral.loop.tracker import Tracker, iso
from hl7referral.store import Store
from hl7referral.store.audit import AuditLog

FACTS = {"email": "pat@example.test", "phone": "+1-555-0100", "specialist": "Cardiology Associates",
         "purpose": "chest pain", "payer": "ACME Health"}


def t(day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    return dt.datetime(2026, 12, day, hour, minute, tzinfo=UTC)


def render(audience, rule, row, values, owner):
    """The notify layer's part, reduced: coordinators by email, patients only with an address."""
    if audience == "coordinator":
        return [("email", f"{owner}@clinic.test", f"{rule} {row['referral_id']}", "body")]
    email = json.loads(row["contact"]).get("email")
    return [("email", email, rule, "body")] if email else []


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "loop.db")
    yield s
    s.close()


def tracker(store, **config) -> Tracker:
    return Tracker(store, LoopConfig(calendar=Calendar(holidays=frozenset({dt.date(2026, 12, 25)})), **config),
                   render=render)


def sent(tr: Tracker, ref: str, at: dt.datetime) -> None:
    tr.open(ref, now=at, channel="ref-i12", facts=FACTS, specialty="cardiology", destination="Cardio")
    tr.transport_event(ref, Kind.SENT, at=iso(at), source="outbox #1", now=at)


def test_receipt_overdue_is_one_owned_alert_at_48_hours_however_often_timers_run(store):
    tr = tracker(store)
    sent(tr, "R1", t(1, 9))
    assert tr.run_timers(t(3, 8, 59)) == []
    acted = tr.run_timers(t(3, 9))
    assert [(a.rule, a.owner) for a in acted] == [("receipt-overdue", "role:referral-coordinators")]
    for _ in range(3):
        assert tr.run_timers(t(3, 10)) == [] and tr.evaluate("R1", t(4)) == []
    alerts = tr.loop.alerts("R1")
    assert [(a["kind"], a["owner"]) for a in alerts] == [("sla-receipt-overdue", "role:referral-coordinators")]
    assert [r["referral_id"] for r in tr.loop.referrals(overdue=True)] == ["R1"]
    # Receipt arrives: the referral is no longer overdue once the timers look again.
    tr.transport_event("R1", Kind.DELIVERED, at=iso(t(3, 11)), source="mdn processed", now=t(3, 11))
    tr.run_timers(t(3, 11))
    assert tr.loop.referrals(overdue=True) == []


def test_patient_notice_without_an_address_becomes_a_task_for_the_owner(store):
    tr = Tracker(store, LoopConfig(owners=((Rule(specialty="cardiology"), "alice"),)), render=render)
    tr.open("R2", now=t(1), channel="ref-i12", facts={**FACTS, "email": ""}, specialty="cardiology")
    tr.transport_event("R2", Kind.DELIVERED, at=iso(t(1, 1)), source="mdn", now=t(1, 1))
    acted = tr.run_timers(t(1, 1))
    assert [(a.rule, a.how, a.owner) for a in acted] == [("notify-patient", "task", "alice")]
    task = tr.loop.tasks(referral_id="R2")[0]
    assert task["owner"] == "alice" and task["due_at"] == "2026-12-01T02:00:00Z"


def test_patient_notice_with_an_address_is_queued_once(store):
    tr = tracker(store)
    tr.open("R3", now=t(1), channel="ref-i12", facts=FACTS)
    tr.transport_event("R3", Kind.DELIVERED, at=iso(t(1, 1)), source="mdn", now=t(1, 1))
    tr.run_timers(t(1, 1))
    tr.run_timers(t(1, 2))
    rows = tr.loop.notifications(referral_id="R3")
    assert [(n["rule"], n["audience"], n["state"]) for n in rows] == [("notify-patient", "patient", "pending")]


def test_thresholds_per_specialty_and_payer(store):
    fast = Policy(receipt_hours=4.0)
    tr = tracker(store, overrides=((Rule(specialty="cardiology", payer="ACME Health"), fast),))
    sent(tr, "R4", t(1, 9))
    assert [a.rule for a in tr.run_timers(t(1, 13))] == ["receipt-overdue"]
    tr.open("R5", now=t(1, 9), channel="ref-i12", facts={**FACTS, "payer": "Other"}, specialty="cardiology")
    tr.transport_event("R5", Kind.SENT, at=iso(t(1, 9)), source="outbox", now=t(1, 9))
    assert tr.run_timers(t(1, 13)) == []


def test_a_payer_rule_holds_the_referral_until_approved(store):
    from hl7referral.config.loop import Rule as R
    tr = tracker(store, auth=((R(payer="ACME Health", specialty="cardiology"), True),))
    assert tr.open("R6", now=t(1), channel="ref-i12", facts=FACTS, specialty="cardiology") == State.AUTH_PENDING
    assert tr.held("R6")
    assert tr.approve("R6", number="AUTH-77", now=t(2), actor="cli:alice") == State.RECEIVED
    assert not tr.held("R6") and tr.loop.get("R6")["auth_number"] == "AUTH-77"
    # An authorization number in the message itself means nothing is held.
    assert tr.open("R7", now=t(1), channel="ref-i12", facts={**FACTS, "authorization": "A1"},
                   specialty="cardiology") == State.RECEIVED


def test_an_event_with_empty_columns_moves_the_referral_as_its_stored_row_would(store):
    """apply() recomputes from the events read plus the ones it added: those as read back (NULL as "")."""
    tr = tracker(store)
    sent(tr, "R9", t(1, 9))
    tr.loop.apply("R9", [Event(Kind.BOOKED, iso(t(2)), appointment="A1", starts=iso(t(9)))], at=iso(t(2)),
                  actor="test")
    out = tr.loop.apply("R9", [Event(Kind.BOOKED, iso(t(3)), appointment=None, starts=None, source=None)],
                        at=iso(t(3)), actor="test")   # compared with the first booking's strings
    assert out.after == State.SCHEDULED
    assert tr.loop.events("R9")[-1] == Event(Kind.BOOKED, iso(t(3)))


def test_every_event_is_audited_and_the_chain_verifies(store):
    tr = tracker(store)
    sent(tr, "R8", t(1, 9))
    tr.loop.apply("R8", [Event(Kind.BOOKED, iso(t(2)), appointment="A1", starts=iso(t(9)))], at=iso(t(2)),
                  actor="test")
    tr.loop.apply("R8", [Event(Kind.BOOKED, iso(t(2)), appointment="A1", starts=iso(t(9)))], at=iso(t(2)),
                  actor="test")   # a duplicate: no new row
    rows = AuditLog(store).rows(referral_id="R8")
    assert [r["event"] for r in rows] == ["RECEIVED", "SENT", "BOOKED"]
    assert rows[-1]["outcome"] == "SCHEDULED"
    assert AuditLog(store).verify().ok


def test_an_answer_carrying_the_payers_authorization_releases_the_hold(store):
    from hl7referral.loop import correlate
    from loop_messages import rri_accepted
    tr = tracker(store, auth=((Rule(payer="ACME Health"), True),))
    aut = b"AUT|PLAN1|ACME^ACME Health|ACME Health|20261201|20270101|AUTH-555\r"
    raw = rri_accepted(referral_id="HOLD1^HOSP") + aut
    obs = correlate.read_v2(raw)
    assert Kind.AUTH_APPROVED in [e.kind for e in obs.events]
    [(_, ref)] = [k for k in obs.keys if k[0] == "referral"]
    assert tr.open(ref, now=t(1), channel="ref-i12", facts=FACTS) == State.AUTH_PENDING
    tr.observe(obs, now=t(2), origin="message #5", raw=raw)
    assert tr.loop.get(ref)["auth"] == "approved" and tr.loop.released() == [ref]


@pytest.mark.parametrize("sample, contact_phone, vet", [("ref-i12.hl7", "5550111", False),
                                                        ("vet-ref-i12.hl7", "5550199", True)])
def test_the_contact_for_notices_is_the_patient_or_for_a_pet_the_owner(sample, contact_phone, vet):
    from pathlib import Path
    from hl7referral.cda.pipeline import Pipeline
    from hl7referral.config import load_engine
    from hl7referral.loop.tracker import referral_facts
    cfg = load_engine()
    raw = (Path(__file__).resolve().parents[1] / "samples" / sample).read_bytes().replace(b"\n", b"\r")
    channel = next(c for c in cfg.channels if c.name == sample.removesuffix(".hl7"))
    processed = Pipeline(cfg.mappings, cfg.directory).run(raw, channel)
    facts = referral_facts(processed.referral, processed.destination)
    assert contact_phone in facts["phone"].replace("-", "") and facts["veterinary"] is vet
    assert facts["specialist"] == processed.destination.name and facts["referring_provider"]


def test_the_referral_row_is_what_all_its_events_give_whatever_the_arrival_order(store):
    """Stage times, durations and state as the report reads them, after every arrival, in any order;
    a late event that moves an earlier stage (the accept before the booking that implied it) rewrites it."""
    import random

    from hl7referral.loop.states import stage_times, state, observe_all
    from hl7referral.store.loop import DURATIONS

    events = [Event(Kind.SENT, iso(t(1, 9)), source="outbox #1"),
              Event(Kind.DELIVERED, iso(t(1, 10)), source="mdn"),
              Event(Kind.ACCEPTED, iso(t(2, 8)), source="OSU"),
              Event(Kind.BOOKED, iso(t(3, 8)), appointment="A1", starts=iso(t(9)), source="SIU^S12"),
              Event(Kind.NO_SHOW, iso(t(9, 12)), appointment="A1", source="SIU^S26"),
              Event(Kind.BOOKED, iso(t(10, 8)), appointment="A2", starts=iso(t(16)), source="SIU^S12 again"),
              Event(Kind.VISIT_DONE, iso(t(16, 10)), appointment="A2", source="SIU^S14")]
    columns = {"SENT": "sent_at", "DELIVERED": "delivered_at", "ACCEPTED": "accepted_at", "SCHEDULED": "scheduled_at",
               "SEEN": "seen_at", "CLOSED": "closed_at"}
    for seed in range(6):
        order = random.Random(seed).sample(events, len(events))
        tr = tracker(store)
        ref = f"ORDER{seed}"
        tr.open(ref, now=t(1, 8), channel="ref-i12", facts=FACTS)
        for k, e in enumerate(order, 1):
            tr.loop.apply(ref, [e], at=iso(t(20, 0, k)), actor="test")
            row = tr.loop.get(ref)
            stages = stage_times(order[:k])
            want = {col: stages.get(State(name)) for name, col in columns.items()}
            for name, a, b in DURATIONS:
                want[name] = ((dt.datetime.fromisoformat(want[b][:-1]) - dt.datetime.fromisoformat(want[a][:-1]))
                              .total_seconds() if want[a] and want[b] else None)
            got = {k2: row[k2] for k2 in want}
            assert got == want and row["state"] == state(observe_all(order[:k])).value, (seed, k)
            assert row["updated_at"] == iso(t(20, 0, k))
        assert row["state"] == "SEEN"


def test_a_referral_sent_to_us_raises_our_coordinators_alerts_but_never_speaks_for_the_initiator(store):
    from hl7referral.store.relay import Relay
    tr = tracker(store)
    tr.open("IN1", now=t(1), channel="referrals-in", facts=FACTS)
    Relay(store).set_side("IN1", "recipient", "referrals@direct.sender.test", at=iso(t(1)))
    tr.transport_event("IN1", Kind.DELIVERED, at=iso(t(1, 1)), source="mail #1", now=t(1, 1))
    # The same facts on one of ours would notify the patient at once and remind them at +5 days.
    acted = tr.run_timers(t(16))
    assert [a.rule for a in acted] == ["booking-overdue"]            # our coordinators: nothing booked
    assert {n["audience"] for n in tr.loop.notifications(referral_id="IN1")} == {"coordinator"}
    assert tr.loop.tasks(referral_id="IN1") == []
    tr.loop.apply("IN1", [Event(Kind.CONSULT_NOTE, iso(t(17)), source="MDM")], at=iso(t(17)), actor="test")
    assert [a.rule for a in tr.run_timers(t(18))] == []              # no follow-up task: the referrer's
