"""Closing the loop in the running engine: the consult note back to the referring EHR, and the SLA timers.

The engine runs in-process on the test reactor (the harness of tests/test_loop_engine.py);
the referring EHR is tests/mllp_peer.py, an MLLP receiver on plain sockets and threads that
can be told to misbehave, and ``[loop.return] endpoint`` points at it. Retry timings are
shortened through config overrides so a resend takes about a second.
"""

from __future__ import annotations

import datetime as dt
import time

import hl7
import pytest
from twisted.internet.task import Clock

import loop_messages as lm
from hl7referral.loop.states import Event, Kind
from hl7referral.loop.tracker import iso
from hl7referral.store import Store
from hl7referral.store.loop import Loop
from mllp_peer import Peer
from reactor_thread import call
from test_loop_engine import ORIGINAL_MODE, Engine, check_audit, cli, msa, open_referral, status, wait_for

NOTE_TEXT = "Seen for chest pain: echo normal, EF 60%.\nPlan: recheck in 3 months & continue aspirin."
FAST_RETRY = ("loop.return.ack_timeout=0.5", "loop.return.first_delay=0.2", "loop.return.max_delay=0.5",
              "loop.return.max_attempts=20")


@pytest.fixture
def peer():
    p = Peer().start()
    yield p
    p.stop()


def returning_engine(tmp_path, peer: Peer) -> Engine:
    return Engine(tmp_path, f'loop.return.endpoint="tcp:host=127.0.0.1:port={peer.port}"', *FAST_RETRY).start()


def send_note(engine: Engine, control_id: str = "MDM0001", text: str = NOTE_TEXT) -> None:
    mdm = lm.mdm_t02(referral_id=lm.REFERRAL_EI, text=text, status="AU", control_id=control_id, **ORIGINAL_MODE)
    assert msa(engine.send(mdm)) == ("AA", control_id)


def note_row(mine: Store, state: str | None = None):
    rows = list(mine.db.query("SELECT * FROM outbox WHERE transport = 'mllp' AND kind = 'consult-note'"))
    assert len(rows) <= 1, rows
    return rows[0] if rows and (state is None or rows[0]["state"] == state) else None


def events_of(mine: Store, outbox_id: int) -> list[str]:
    return [r["event"] for r in mine.db.query("SELECT event FROM transport_events WHERE outbox_id = ? ORDER BY id",
                                              [outbox_id])]


def read_mdm(payload: bytes) -> tuple[str, str, list[str]]:
    """(MSH-10, TXA-14, the OBX-5 lines, unescaped) of the MDM the peer received, read by python-hl7."""
    message = hl7.parse(payload.decode("utf-8"))
    assert str(message.segment("MSH")(9)).startswith("MDM^T02")
    lines = [message.unescape(str(obx(5))) for obx in message.segments("OBX")]
    return str(message.segment("MSH")(10)), str(message.segment("TXA")(14)), lines


def settle_return_leg(engine: Engine) -> None:
    """Run one return-leg tick to its end: whatever is due has been handed to the sender."""
    call(engine.reactor, engine.service.returns.tick)


# -- 6: the happy path -------------------------------------------------------------------------

def test_consult_note_goes_back_as_mdm_and_its_ack_closes_the_loop(tmp_path, peer):
    engine = returning_engine(tmp_path, peer)
    mine = Store.open(engine.path)
    try:
        open_referral(engine, mine)
        send_note(engine)
        row = wait_for(lambda: note_row(mine, "DELIVERED"), what="the consult note DELIVERED")
        wait_for(lambda: Loop(mine).get(lm.REFERRAL_ID)["state"] == "CLOSED", what="the referral CLOSED")
        received = peer.received
        assert len(received) == 1 and received[0].parse_error == ""
        control_id, txa14, lines = read_mdm(received[0].payload)
        assert control_id == row["message_id"] == received[0].control_id
        assert txa14 == lm.REFERRAL_EI
        assert "\n".join(lines) == NOTE_TEXT
        assert row["payload"] == received[0].payload and row["attempts"] == 1
        assert events_of(mine, row["id"]) == ["queued", "ack"]
        kinds = [e.kind for e in Loop(mine).events(lm.REFERRAL_ID)]
        assert kinds.count(Kind.NOTE_FILED) == 1 and Kind.CONSULT_NOTE in kinds
        notes = Loop(mine).notes(lm.REFERRAL_ID)
        assert len(notes) == 1 and notes[0]["returned_at"]
        assert Loop(mine).note(notes[0]["id"])["content"] == NOTE_TEXT.encode()
        settle_return_leg(engine)
        assert len(peer.received) == 1   # delivered once: nothing due any more
    finally:
        engine.stop()
        mine.close()
    assert status(engine.path, lm.REFERRAL_ID)["state"] == "CLOSED"
    check_audit(engine.path)


# -- revisions: the chart gets a revision of the note it holds ---------------------------------------

def note_rows(mine: Store) -> list[dict]:
    return list(mine.db.query("SELECT * FROM outbox WHERE transport = 'mllp' AND kind = 'consult-note' ORDER BY id"))


def txa(payload: bytes) -> tuple[str, str, str]:
    """(MSH-9, TXA-12, TXA-13) of an MDM the peer received, read by python-hl7."""
    message = hl7.parse(payload.decode("utf-8"))
    t = message.segment("TXA")
    return str(message.segment("MSH")(9)), str(t(12)), str(t(13)) if len(t) > 13 else ""


def test_a_replaced_addended_or_re_statused_note_goes_back_as_a_revision_of_the_charts_document(tmp_path, peer):
    """T02, then T10 (replaces it), T04 (its status changed: the same document), T06 of a document we
    never had (sent as an original): each delivered once, the referral stays CLOSED."""
    engine = returning_engine(tmp_path, peer)
    mine = Store.open(engine.path)
    try:
        open_referral(engine, mine)
        send_note(engine)                                                  # TXA-12 D0001
        wait_for(lambda: Loop(mine).get(lm.REFERRAL_ID)["state"] == "CLOSED", what="the referral CLOSED")
        revisions = [
            lm.mdm_t02(trigger="T10", document_id="D0002^^2.999.1.32.20^ISO", parent_document_id=lm.DOCUMENT_EI,
                       text="Corrected: EF 55%.", control_id="MDM0002", **ORIGINAL_MODE),
            lm.mdm_t02(trigger="T04", document_id="D0002^^2.999.1.32.20^ISO", status="LA",
                       text="Corrected: EF 55%.", control_id="MDM0003", **ORIGINAL_MODE),
            lm.mdm_t02(trigger="T06", document_id="D0009^^2.999.1.32.20^ISO",
                       parent_document_id="D0008^^2.999.1.32.20^ISO", text="Addendum.", control_id="MDM0004",
                       **ORIGINAL_MODE),
        ]
        for n, mdm in enumerate(revisions, 2):
            assert msa(engine.send(mdm))[0] == "AA"
            wait_for(lambda: len([r for r in note_rows(mine) if r["state"] == "DELIVERED"]) == n,
                     what=f"{n} notes delivered")
        first, replaced, statused, addendum = (txa(r.payload) for r in peer.received)
        rows = note_rows(mine)
        assert first == ("MDM^T02^MDM_T02", rows[0]["message_id"], "")
        assert replaced == ("MDM^T10^MDM_T02", rows[1]["message_id"], first[1])   # TXA-13: the chart's document
        assert statused == ("MDM^T04^MDM_T02", replaced[1], "")                  # the replacement, its status changed
        assert addendum == ("MDM^T02^MDM_T02", rows[3]["message_id"], "")        # its parent never reached the chart
        [queued] = mine.db.query("SELECT detail FROM transport_events WHERE outbox_id = ? AND event = 'queued'",
                                 [rows[1]["id"]])
        assert queued["detail"].endswith(f"T10 of {first[1]}")
        assert len(peer.received) == 4 and len(Loop(mine).notes(lm.REFERRAL_ID)) == 4
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "CLOSED"
    finally:
        engine.stop()
        mine.close()
    check_audit(engine.path)


def test_a_consult_cda_replacing_one_the_chart_has_goes_as_its_replacement(tmp_path):
    """The decision alone, for notes as a C-CDA over Direct leaves them (relatedDocument RPLC: T10)."""
    from hl7referral.engine.return_leg import revision_in_chart
    from hl7referral.store.outbox import Outbox

    s = Store.open(tmp_path / "s.db")
    try:
        loop, outbox = Loop(s), Outbox(s)
        loop.open_referral("R1", at="2026-11-20T10:00:00Z")

        def note(document_id: str, parent: str = "", revision: str = "") -> dict:
            nid = loop.save_note(referral_id="R1", at="2026-11-21T10:00:00Z", kind="consult", format="cda",
                                 media_type="text/xml", title="Consultation Note", content=b"<x/>", origin="mail #1",
                                 document_id=document_id, parent_document_id=parent, revision=revision)
            return loop.note(nid)

        first = note("C0000@2.999.1.32.20")
        replacement = note("C0001@2.999.1.32.20", "C0000@2.999.1.32.20", "T10")
        # Not sent back yet: the chart does not have the first, so the replacement is an original there.
        assert revision_in_chart(loop, outbox, "R1", replacement) == ("T02", f"HRN{replacement['id']}", "")
        outbox.enqueue(key=f"R1/mllp/note-{first['id']}", referral_id="R1", document_id=None, channel="",
                       transport="mllp", kind="consult-note", sender="", recipient="tcp:host=127.0.0.1:port=1",
                       message_id=f"HRN{first['id']}", payload=b"", at="2026-11-21T10:00:00Z", now=0.0)
        assert revision_in_chart(loop, outbox, "R1", replacement) == \
            ("T10", f"HRN{replacement['id']}", f"HRN{first['id']}")
        assert revision_in_chart(loop, outbox, "R1", first) == ("T02", f"HRN{first['id']}", "")
        # An edit sent under the same TXA-12, without TXA-13: a revision of that document.
        edit = note("C0001@2.999.1.32.20", "", "T08")
        outbox.enqueue(key=f"R1/mllp/note-{replacement['id']}", referral_id="R1", document_id=None, channel="",
                       transport="mllp", kind="consult-note", sender="", recipient="tcp:host=127.0.0.1:port=1",
                       message_id=f"HRN{replacement['id']}", payload=b"", at="2026-11-21T10:00:00Z", now=0.0)
        assert revision_in_chart(loop, outbox, "R1", edit) == ("T08", f"HRN{edit['id']}", f"HRN{replacement['id']}")
        # The chart refused the first: what replaces it can only be filed as an original.
        outbox.update(outbox.by_key(f"R1/mllp/note-{first['id']}")["id"], event="failed", at="2026-11-21T11:00:00Z",
                      state="FAILED")
        assert revision_in_chart(loop, outbox, "R1", replacement) == ("T02", f"HRN{replacement['id']}", "")
    finally:
        s.close()


def test_a_referrals_notes_reach_the_chart_in_the_order_they_came(tmp_path):
    """A revision queued while the note it revises waits for a retry waits behind it."""
    from hl7referral.store.outbox import Outbox

    s = Store.open(tmp_path / "s.db")
    try:
        outbox = Outbox(s)

        def row(referral: str, n: int, kind: str = "consult-note") -> int:
            return outbox.enqueue(key=f"{referral}/mllp/note-{n}", referral_id=referral, document_id=None,
                                  channel="", transport="mllp", kind=kind, sender="", recipient="tcp:host=h:port=1",
                                  message_id=f"HRN{n}", payload=b"", at="2026-11-21T10:00:00Z", now=0.0).id

        first, revision, other = row("R1", 1), row("R1", 2), row("R2", 3)
        outbox.update(first, event="send-failed", at="2026-11-21T10:00:01Z", state="RETRY_WAIT", next_attempt_at=50.0)

        def in_order() -> list[int]:
            return [r["id"] for r in outbox.due(10.0, transports=("mllp",), in_order=("consult-note",))]

        assert in_order() == [other]
        assert [r["id"] for r in outbox.due(10.0, transports=("mllp",))] == [revision, other]   # what it filters
        outbox.update(first, event="ack", at="2026-11-21T10:01:00Z", state="DELIVERED")
        assert in_order() == [revision, other]
    finally:
        s.close()


# -- 7: a misbehaving peer ----------------------------------------------------------------------

@pytest.mark.parametrize("behaviour", ["wrong-id", "late:1.5", "no-ack"])
def test_no_false_delivery_while_the_ack_is_wrong_or_late_then_delivery_once_it_behaves(tmp_path, peer, behaviour):
    peer.default = behaviour
    engine = returning_engine(tmp_path, peer)
    mine = Store.open(engine.path)
    try:
        open_referral(engine, mine)
        send_note(engine)
        # Two sends answered wrongly (or too late): both recorded as failures, nothing delivered or closed.
        failed = wait_for(lambda: (r := note_row(mine)) and r["attempts"] >= 2 and r, what="two failed sends")
        assert failed["state"] == "RETRY_WAIT" and failed["last_error"]
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "SEEN"
        assert Loop(mine).notes(lm.REFERRAL_ID)[0]["returned_at"] is None
        assert Kind.NOTE_FILED not in [e.kind for e in Loop(mine).events(lm.REFERRAL_ID)]

        peer.default = "aa"
        row = wait_for(lambda: note_row(mine, "DELIVERED"), what="DELIVERED once the peer behaves")
        wait_for(lambda: Loop(mine).get(lm.REFERRAL_ID)["state"] == "CLOSED", what="the referral CLOSED")
        received = peer.received
        # Every resend is the same message: same MSH-10, same bytes; each one was recorded.
        assert {r.control_id for r in received} == {row["message_id"]}
        assert {r.payload for r in received} == {row["payload"]}
        assert received[-1].behaviour == "aa"
        assert row["attempts"] == len(received) >= 3
        assert events_of(mine, row["id"]) == ["queued"] + ["send-failed"] * (len(received) - 1) + ["ack"]
        assert [e.kind for e in Loop(mine).events(lm.REFERRAL_ID)].count(Kind.NOTE_FILED) == 1
    finally:
        engine.stop()
        mine.close()
    check_audit(engine.path)


@pytest.mark.parametrize("behaviour", ["two-acks", "dribble", "wrong-then-aa"])
def test_odd_but_right_acks_deliver_once(tmp_path, peer, behaviour):
    peer.default = behaviour
    engine = returning_engine(tmp_path, peer)
    mine = Store.open(engine.path)
    try:
        open_referral(engine, mine)
        send_note(engine)
        row = wait_for(lambda: note_row(mine, "DELIVERED"), what="DELIVERED")
        wait_for(lambda: Loop(mine).get(lm.REFERRAL_ID)["state"] == "CLOSED", what="the referral CLOSED")
        settle_return_leg(engine)
        assert [(r.control_id, r.behaviour) for r in peer.received] == [(row["message_id"], behaviour)]
        assert row["attempts"] == 1 and events_of(mine, row["id"]) == ["queued", "ack"]
        assert [e.kind for e in Loop(mine).events(lm.REFERRAL_ID)].count(Kind.NOTE_FILED) == 1
    finally:
        engine.stop()
        mine.close()


# -- 8: no return interface ---------------------------------------------------------------------

def test_without_a_return_endpoint_a_file_note_task_closes_the_loop_when_done(tmp_path):
    engine = Engine(tmp_path).start()
    mine = Store.open(engine.path)
    try:
        open_referral(engine, mine)
        send_note(engine)
        task = wait_for(lambda: Loop(mine).tasks(referral_id=lm.REFERRAL_ID), what="the file-note task")
        assert [(t["kind"], t["owner"]) for t in task] == [("file-note", "role:referral-coordinators")]
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "SEEN"
        assert note_row(mine) is None

        code, out = cli("tasks", "done", str(task[0]["id"]), "--by", "coordinator-test", "--store", str(engine.path))
        assert code == 0 and f"task #{task[0]['id']} done by coordinator-test" in out, out
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "CLOSED"
        code, out = cli("tasks", "done", str(task[0]["id"]), "--by", "coordinator-test", "--store", str(engine.path))
        assert code == 1 and "done already" in out, out
    finally:
        engine.stop()
        mine.close()
    assert status(engine.path, lm.REFERRAL_ID)["state"] == "CLOSED"
    rows = check_audit(engine.path)
    assert [r["event"] for r in rows if r["referral_id"] == lm.REFERRAL_ID] == \
        ["RECEIVED", "CONSULT_NOTE", "TASK", "NOTE_FILED", "TASK_DONE"]


# -- 9: SLA timers --------------------------------------------------------------------------------

def test_a_sent_referral_without_receipt_alerts_its_owner_once_after_48_hours(tmp_path):
    engine = Engine(tmp_path, 'loop.coordinator="coordinator:kim"')
    # The tracker's clock (the LoopService takes one for this): 48 hours pass in one advance.
    clock = Clock()
    clock.advance(time.time())
    engine.service.loop.clock = clock
    engine.service.loop.timers.clock = clock
    engine.start()
    mine = Store.open(engine.path)
    hour = 3600.0

    def tick(advance: float) -> list[dict]:
        call(engine.reactor, clock.advance, advance)
        call(engine.reactor, engine.service.loop.tick)   # serial on the writer: runs after any tick the advance fired
        # (the channel's "no-transport" alert, raised when the referral came in, is not an SLA's)
        return [a for a in Loop(mine).alerts(lm.REFERRAL_ID) if a["kind"].startswith("sla-")]

    try:
        open_referral(engine, mine)
        t0 = dt.datetime.fromtimestamp(clock.seconds(), dt.timezone.utc)
        # No transport in this channel: the send is recorded as a transport would record it.
        Loop(mine).apply(lm.REFERRAL_ID, [Event(Kind.SENT, iso(t0), source="test: relay 250")], at=iso(t0),
                         actor="test")
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "SENT"

        assert tick(47 * hour) == []
        alerts = tick(1 * hour + 60)
        assert [(a["kind"], a["owner"]) for a in alerts] == [("sla-receipt-overdue", "coordinator:kim")]
        assert tick(24 * hour) == alerts
        assert tick(7 * 24 * hour) == alerts
        actions = Loop(mine).sla_actions(lm.REFERRAL_ID)
        assert [(a["rule"], a["owner"], a["due_at"]) for a in actions] == \
            [("receipt-overdue", "coordinator:kim", iso(t0 + dt.timedelta(hours=48)))]
        assert Loop(mine).get(lm.REFERRAL_ID)["overdue_at"] == iso(t0 + dt.timedelta(hours=48))
    finally:
        engine.stop()
        mine.close()
    code, out = cli("referrals", "list", "--overdue", "--store", str(engine.path))
    assert code == 0 and lm.REFERRAL_ID in out and "OVERDUE since" in out, out
    rows = check_audit(engine.path)
    assert [r["event"] for r in rows if r["event"].startswith("SLA")] == ["SLA receipt-overdue"]
