"""``hl7referral answer``: the specialist answers a referral sent to it, from the command line.

The store holds the 360X sample as the specialist's engine recorded it (received over Direct,
tests/specialist_inputs.py). Each command is run through click's CliRunner, as a coordinator
types it; what it owes the initiator is read back from the relay rows by ``read_v2`` (as the
referring engine will read it), and the referral's state through ``status --json``.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hl7referral.cli import main
from hl7referral.loop.correlate import read_consult_cda, read_v2
from hl7referral.loop.states import Kind
from hl7referral.store import Store
from hl7referral.store.loop import Loop
from hl7referral.store.relay import INITIATOR, Relay
from specialist_inputs import REFERRAL_EI, REFERRAL_ID, SENDER, receive, specialist_config

OURS = "SAMPLEREF0009"   # a referral we sent


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "specialist.db"
    config = specialist_config(tmp_path, store=p)
    s = Store.open(p)
    receive(s, config)
    Loop(s).open_referral(OURS, at="2026-11-18T09:00:00Z", channel="ref-i12")
    Relay(s).set_side(OURS, INITIATOR, "cardiology@direct.receiver.test", at="2026-11-18T09:00:00Z")
    s.close()
    return p


def answer(path, *args):
    return CliRunner().invoke(main, ["answer", *args, "--store", str(path)])


def relay_rows(path) -> list[dict]:
    s = Store.open(path)
    try:
        return [dict(r) for r in s.db.query("SELECT * FROM relay ORDER BY id")]
    finally:
        s.close()


def state(path, ref: str = REFERRAL_ID) -> str:
    r = CliRunner().invoke(main, ["status", ref, "--json", "--store", str(path)])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)["state"]


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


def test_accept_owes_an_osu_to_the_initiator(path):
    r = answer(path, REFERRAL_ID, "accept", "--now", "2026-11-19T08:00:00Z")
    assert r.exit_code == 0, r.output
    assert one_line(r.output) == (f"referral {REFERRAL_ID}: DELIVERED -> ACCEPTED; ACCEPTED owed to {SENDER} "
                                  "(sent by Direct at the engine's next tick)")
    [row] = relay_rows(path)
    assert (row["kind"], row["recipient"], row["message_type"]) == ("ACCEPTED", SENDER, "OSU^O51^OSU_O51")
    back = read_v2(row["message"])
    assert [(e.kind, e.at) for e in back.events] == [(Kind.ACCEPTED, "2026-11-19T08:00:00Z")]
    assert back.referral_ids == [REFERRAL_ID]
    assert state(path) == "ACCEPTED"

    again = answer(path, REFERRAL_ID, "accept", "--now", "2026-11-19T08:00:00Z")
    assert again.exit_code == 0 and "nothing new to send" in again.output, again.output
    assert len(relay_rows(path)) == 1


def test_the_referral_may_be_named_by_its_order_number_alone(path):
    # As `status` finds a referral we sent by its bare extension, so `answer` finds one sent to us.
    r = answer(path, "990001", "decline", "--reason", "Outside our scope", "--now", "2026-11-19T08:00:00Z")
    assert r.exit_code == 0, r.output
    [row] = relay_rows(path)
    assert row["referral_id"] == REFERRAL_ID and b"Outside our scope" in row["message"]
    assert REFERRAL_EI.encode() in row["message"]   # named as the initiator sent it
    assert [e.kind for e in read_v2(row["message"]).events] == [Kind.DECLINED]


def test_book_then_no_show_names_the_same_appointment(path):
    r = answer(path, REFERRAL_ID, "book", "--start", "2026-12-03T09:30:00Z", "--now", "2026-11-19T08:00:00Z")
    assert r.exit_code == 0, r.output
    assert "-> SCHEDULED; BOOKED owed to" in r.output
    r = answer(path, REFERRAL_ID, "no-show", "--now", "2026-12-03T11:00:00Z")
    assert r.exit_code == 0, r.output
    assert "SCHEDULED -> NO_SHOW; NO_SHOW owed to" in r.output
    booked, no_show = (read_v2(row["message"]) for row in relay_rows(path))
    [b], [n] = booked.events, no_show.events
    assert (booked.message_type, b.kind, b.starts) == ("SIU^S12", Kind.BOOKED, "2026-12-03T09:30:00Z")
    assert (no_show.message_type, n.kind) == ("SIU^S26", Kind.NO_SHOW)
    assert b.appointment and n.appointment == b.appointment
    assert state(path) == "NO_SHOW"


def test_note_file_owes_a_consultation_note(path, tmp_path):
    note = tmp_path / "consult.txt"
    note.write_text("Seen for chest pain.\nPlan: stress echo in 2 weeks.\n")
    r = answer(path, REFERRAL_ID, "note", str(note), "--now", "2026-11-25T16:00:00Z")
    assert r.exit_code == 0, r.output
    assert "CONSULT_NOTE owed to" in r.output
    [row] = relay_rows(path)
    assert [e.kind for e in read_v2(row["message"]).events] == [Kind.CONSULT_NOTE]
    back = read_consult_cda(row["document"])
    assert back.problems == () and ("referral", REFERRAL_ID) in back.keys
    assert b"stress echo in 2 weeks" in row["document"]
    s = Store.open(path)
    try:
        [kept] = Loop(s).notes(REFERRAL_ID)   # the note is kept on our side too
        assert (kept["kind"], kept["format"]) == ("consult", "text")
    finally:
        s.close()


def test_a_referral_we_sent_cannot_be_answered_here(path):
    r = answer(path, OURS, "accept")
    assert r.exit_code == 1
    line = one_line(r.output)
    assert line.startswith("hl7referral: ") and OURS in line and "one we sent" in line
    assert relay_rows(path) == []
    assert state(path, OURS) == "RECEIVED"


def test_an_unknown_referral_is_one_line_and_exit_1(path):
    r = answer(path, "NOPE-404", "accept")
    assert r.exit_code == 1
    assert one_line(r.output) == "hl7referral: no referral NOPE-404"


@pytest.mark.parametrize("args, needs", [(["note"], "FILE"), (["interim-note"], "FILE"), (["book"], "--start"),
                                         (["book", "--start", "next tuesday"], "not an ISO datetime")])
def test_missing_or_bad_arguments_are_usage_errors(path, args, needs):
    r = answer(path, REFERRAL_ID, *args)
    assert r.exit_code == 2
    assert needs in one_line(r.output)
    assert relay_rows(path) == [] and state(path) == "DELIVERED"
