"""The commands that change referrals: ``timers run``, ``auth approve``, ``replay``, ``workqueue resolve``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hl7referral.cli import main
from hl7referral.loop import correlate
from hl7referral.loop.states import Event, Kind
from hl7referral.loop.tracker import Tracker
from hl7referral.config.loop import LoopConfig, Rule
from hl7referral.store import Store
from hl7referral.store.audit import AuditLog
from hl7referral.store.loop import Loop
from loop_messages import REFERRAL_EI, REFERRAL_ID, siu_s12

SENT_AT = "2026-12-01T09:00:00Z"


def cli(path, *args):
    return CliRunner().invoke(main, [*args, "--store", str(path)])


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "loop.db"
    s = Store.open(p)
    loop = Loop(s)
    loop.open_referral("R1", at=SENT_AT, channel="ref-i12", specialty="cardiology")
    loop.apply("R1", [Event(Kind.SENT, SENT_AT, source="outbox #1")], at=SENT_AT, actor="test")
    s.close()
    return p


def test_timers_run_fires_at_the_threshold_once(path):
    early = cli(path, "timers", "run", "--now", "2026-12-03T08:59:59Z")
    assert early.exit_code == 0 and "0 SLA item(s)" in early.output
    due = cli(path, "timers", "run", "--now", "2026-12-03T09:00:00Z", "--json")
    assert due.exit_code == 0
    assert [(r["referral_id"], r["rule"], r["how"]) for r in json.loads(due.output)] == [
        ("R1", "receipt-overdue", "alert")]
    again = cli(path, "timers", "run", "--now", "2026-12-04T09:00:00Z")
    assert "0 SLA item(s)" in again.output
    s = Store.open(path)
    assert [(a["kind"], a["owner"]) for a in Loop(s).alerts("R1")] == [("sla-receipt-overdue",
                                                                        "role:referral-coordinators")]
    assert Loop(s).get("R1")["overdue_at"] == "2026-12-03T09:00:00Z"
    s.close()


def test_timers_run_refuses_a_bad_time_in_one_line(path):
    r = cli(path, "timers", "run", "--now", "tomorrow")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--now 'tomorrow'" in r.output


def test_auth_approve_releases_a_held_referral_once(path):
    s = Store.open(path)
    tr = Tracker(s, LoopConfig(auth=((Rule(payer="ACME"), True),)))
    import datetime as dt
    tr.open("R2", now=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc), channel="ref-i12", facts={"payer": "ACME"})
    s.close()
    r = cli(path, "auth", "approve", "R2", "--number", "AUTH-9", "--by", "alice")
    assert r.exit_code == 0 and "authorization AUTH-9 recorded; RECEIVED" in r.output
    s = Store.open(path)
    assert Loop(s).get("R2")["auth"] == "approved" and Loop(s).released() == ["R2"] and Loop(s).released() == []
    assert any(row["event"] == "AUTH_APPROVED" and row["actor"] == "alice" for row in AuditLog(s).rows())
    s.close()
    again = cli(path, "auth", "approve", "R2", "--number", "AUTH-9")
    assert again.exit_code == 1 and "not held for authorization" in again.output


def test_replay_applies_an_early_booking_once_its_referral_exists(path):
    s = Store.open(path)
    loop = Loop(s)
    raw = siu_s12(referral_id=REFERRAL_EI)
    obs = correlate.read_v2(raw)
    item = loop.park(at=SENT_AT, origin="message #7", message_type=obs.message_type, keys=obs.keys,
                     reason="no referral matches", raw=raw)
    s.close()
    still = cli(path, "replay", str(item))
    assert still.exit_code == 1 and "still parked" in still.output
    s = Store.open(path)
    Loop(s).open_referral(REFERRAL_ID, at=SENT_AT, channel="ref-i12")
    s.close()
    done = cli(path, "replay", "--all", "--by", "bob")
    assert done.exit_code == 0 and f"applied to {REFERRAL_ID}" in done.output and "SCHEDULED" in done.output
    s = Store.open(path)
    assert Loop(s).work_item(item)["status"] == "resolved" and Loop(s).get(REFERRAL_ID)["state"] == "SCHEDULED"
    s.close()


def test_a_referral_opened_by_the_tracker_picks_up_what_waited_for_it(tmp_path):
    import datetime as dt
    from hl7referral.loop.reread import observation_of
    s = Store.open(tmp_path / "early.db")
    loop = Loop(s)
    raw = siu_s12(referral_id=REFERRAL_EI)
    obs = correlate.read_v2(raw)
    loop.park(at=SENT_AT, origin="message #3", message_type=obs.message_type, keys=obs.keys, reason="early", raw=raw)
    tr = Tracker(s, LoopConfig(), reader=lambda item: observation_of(item["origin"], item["raw"]))
    state = tr.open(REFERRAL_ID, now=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc), channel="ref-i12", facts={},
                    keys=[(k, i) for i, k in enumerate(correlate.referral_keys(REFERRAL_ID)) if k != REFERRAL_ID])
    assert state.value == "SCHEDULED" and loop.workqueue(status="open") == []
    s.close()


def test_workqueue_resolve_applies_the_parked_events_to_the_named_referral(path):
    s = Store.open(path)
    raw = siu_s12(referral_id="SOMETHING-ELSE^^2.999.9^ISO")
    obs = correlate.read_v2(raw)
    item = Loop(s).park(at=SENT_AT, origin="message #8", message_type=obs.message_type, keys=obs.keys,
                        reason="no referral matches", raw=raw)
    s.close()
    r = cli(path, "workqueue", "resolve", str(item), "--referral", "R1", "--by", "carol")
    assert r.exit_code == 0 and "1 event(s) applied, state SCHEDULED" in r.output
