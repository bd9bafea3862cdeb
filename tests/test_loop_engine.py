"""The loop tracker in the running engine, end to end on 127.0.0.1.

The engine is the real :class:`~hl7referral.engine.service.EngineService` on Twisted's global
reactor (tests/reactor_thread.py), listening on an ephemeral port; the sender is python-hl7's
own MLLP client (an independent implementation); what the engine did is read through the
test's own ``Store.open`` connection and through the coordinator's CLI, never through the
service's connections.

The referral channel has no transports (``transports = []``), so nothing sends the referral
and its state stays RECEIVED until a loop message moves it; the loop channel is the shipped
sample ``channels/loop-events.toml``. Loop messages are sent with original-mode MSH-15/16
(empty): the 360X samples say NE/NE, which asks for no ACK at all.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections import Counter
from pathlib import Path

import hl7
import hl7.client
from click.testing import CliRunner

import polling
import loop_messages as lm
from hl7referral.cli import main
from hl7referral.config import load_engine
from hl7referral.config.engine import bundled_dir
from hl7referral.engine.service import EngineService
from hl7referral.loop.states import Kind
from hl7referral.store import Store
from hl7referral.store.loop import Loop
from reactor_thread import call, running_reactor

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_MODE = {"accept_ack": "", "application_ack": ""}   # MSH-15/16 empty: one ACK, AA when committed
UNKNOWN_EI, UNKNOWN_ID = "R999999^^2.999.1.21.15^ISO", "R999999@2.999.1.21.15"
# The referral channel, with no transport: nothing sends the referral, so its state is the tracker's alone.
REF_CHANNEL = """\
name = "ref-i12"
mapping = "ref-i12"
transports = []

[source]
listener = "main"
accept = ["REF^I12"]

[ack]
mode = "after-store"

[destination]
by = "npi"
"""
KINDS = frozenset(k.value for k in Kind)


# -- harness ---------------------------------------------------------------------------------

def channels_dir(tmp_path: Path) -> Path:
    """The shipped loop-events channel and directory, beside a transport-less ref-i12 channel."""
    out = tmp_path / "channels"
    if not out.exists():
        out.mkdir()
        shipped = bundled_dir("channels")
        for name in ("loop-events.toml", "directory.toml"):
            shutil.copy(shipped / name, out / name)
        (out / "ref-i12.toml").write_text(REF_CHANNEL)
    return out


def ref_i12(referral_ei: str = lm.REFERRAL_EI, control_id: str = "REFSAMPLE1") -> bytes:
    """The sample REF^I12 with RF1-6 = *referral_ei* (the placer's EI, as SCH-26 / TXA-14 carry it)."""
    raw = (ROOT / "samples" / "ref-i12.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    assert b"|SAMPLEREF0001|" in raw and b"|REFSAMPLE1|" in raw
    return raw.replace(b"|SAMPLEREF0001|", f"|{referral_ei}|".encode()).replace(b"|REFSAMPLE1|",
                                                                                f"|{control_id}|".encode())


wait_for = functools.partial(polling.wait_for, timeout=15.0)


class Engine:
    """An EngineService on the test reactor, its store at *path*, listening on 127.0.0.1:<ephemeral>."""

    def __init__(self, tmp_path: Path, *overrides: str, path: Path | None = None) -> None:
        self.path = path or tmp_path / "engine.db"
        self.config = load_engine(None, store=str(self.path), listen=("tcp:0:interface=127.0.0.1",),
                                  overrides=[f'channels.dir="{channels_dir(tmp_path)}"', *overrides])
        self.reactor = running_reactor()
        self.service = EngineService(self.config, self.reactor)
        self.port = 0
        self.running = False

    def start(self) -> "Engine":
        call(self.reactor, self.service.startService)
        self.running = True
        bound = call(self.reactor, lambda: self.service.ready)
        self.port = int(bound[0][1].rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.running:
            self.running = False
            call(self.reactor, self.service.stopService)

    def send(self, raw: bytes) -> bytes:
        """One message with python-hl7's MLLP client; the ACK frame's payload."""
        with hl7.client.MLLPClient("127.0.0.1", self.port) as client:
            client.socket.settimeout(10)
            reply = client.send_message(raw)   # python-hl7 returns what one recv() brought: maybe part of it
            while not reply.endswith(b"\x1c\r"):
                chunk = client.socket.recv(65536)
                assert chunk, f"connection closed before the ACK ({reply!r})"
                reply += chunk
        return reply.strip(b"\x0b\x1c\r")


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK, read by python-hl7."""
    segment = hl7.parse(ack.decode("utf-8")).segment("MSA")
    return str(segment(1)), str(segment(2))


def applied(mine: Store, control_id: str):
    """The stored message with this MSH-10, once the tracker has applied it (else None)."""
    rows = list(mine.db.query("SELECT id, applied_at FROM messages WHERE control_id = ?", [control_id]))
    return rows[0] if rows and rows[0]["applied_at"] else None


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def status(path: Path, ref: str) -> dict:
    code, out = cli("status", ref, "--json", "--store", str(path))
    assert code == 0, out
    return json.loads(out)


def check_audit(path: Path) -> list[dict]:
    """``audit verify`` passes, and every loop event stored has exactly one audit row (and no more)."""
    code, out = cli("audit", "verify", "--store", str(path))
    assert code == 0 and "audit trail intact" in out, out
    store = Store.open(path)
    try:
        events = Counter((r["referral_id"], r["kind"]) for r in store.db.query(
            "SELECT referral_id, kind FROM loop_events"))
        rows = list(store.db.query("SELECT * FROM audit_log ORDER BY id"))
        audited = Counter((r["referral_id"], r["event"]) for r in rows if r["event"] in KINDS)
        assert audited == events
        opened = Counter(r["referral_id"] for r in rows if r["event"] == "RECEIVED")
        assert opened == Counter(r["referral_id"] for r in store.db.query("SELECT referral_id FROM referrals"))
        parked = [r for r in rows if r["event"] == "WORKQUEUE"]
        assert len(parked) == store.conn.execute("SELECT count(*) FROM workqueue").fetchone()[0]
        return rows
    finally:
        store.close()


def open_referral(engine: Engine, mine: Store, referral_ei: str = lm.REFERRAL_EI,
                  referral_id: str = lm.REFERRAL_ID, control_id: str = "REFSAMPLE1") -> dict:
    """Send the REF^I12 (AA expected) and wait for its referral row."""
    assert msa(engine.send(ref_i12(referral_ei, control_id))) == ("AA", control_id)
    return wait_for(lambda: Loop(mine).get(referral_id), what=f"referral {referral_id} in the referrals table")


# -- tests ----------------------------------------------------------------------------------

def test_referral_then_booking_schedules_it_with_accepted_implied(tmp_path):
    engine = Engine(tmp_path).start()
    mine = Store.open(engine.path)
    try:
        row = open_referral(engine, mine)
        assert row["state"] == "RECEIVED" and row["channel"] == "ref-i12"
        assert row["destination"] == "Example Cardiology Associates"
        # The document was saved in the same job; with no transport nothing moves the state.
        wait_for(lambda: list(mine.db.query("SELECT id FROM documents WHERE referral_id = ?", [lm.REFERRAL_ID])),
                 what="the referral's document")
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "RECEIVED"

        siu = lm.siu_s12(referral_id=lm.REFERRAL_EI, control_id="SIU0001", **ORIGINAL_MODE)
        ack = engine.send(siu)
        assert msa(ack) == ("AA", "SIU0001")
        wait_for(lambda: applied(mine, "SIU0001"), what="the SIU applied")
        row = Loop(mine).get(lm.REFERRAL_ID)
        assert row["state"] == "SCHEDULED"
        assert [(e.kind, e.appointment) for e in Loop(mine).events(lm.REFERRAL_ID)] == \
            [(Kind.BOOKED, lm.APPOINTMENT_ID)]

        # The same bytes again (a sender's retry): the stored ACK, nothing applied twice.
        assert engine.send(siu) == ack
        assert len(Loop(mine).events(lm.REFERRAL_ID)) == 1
        assert mine.db.execute("SELECT count(*) FROM messages WHERE control_id = 'SIU0001'").fetchone()[0] == 1
    finally:
        engine.stop()
        mine.close()

    s = status(engine.path, lm.REFERRAL_ID)
    assert s["state"] == "SCHEDULED"
    implied = [step for step in s["timeline"] if step["kind"] == "IMPLIED"]
    assert [step["detail"].split(" implied by ")[0] for step in implied] == ["SENT", "DELIVERED", "ACCEPTED"]
    assert all(" implied by BOOKED" in step["detail"] for step in implied)
    assert s["timeline"][-1]["kind"] == "BOOKED" and s["timeline"][-1]["state"] == "SCHEDULED"
    assert {st["stage"] for st in s["stages"] if st["at"]} == {"SENT", "DELIVERED", "ACCEPTED", "SCHEDULED"}
    # Any form the messages name it by finds it.
    assert status(engine.path, lm.REFERRAL_EXT)["referral_id"] == lm.REFERRAL_ID
    rows = check_audit(engine.path)
    assert [r["event"] for r in rows if r["referral_id"] == lm.REFERRAL_ID] == ["RECEIVED", "BOOKED"]


def test_messages_for_an_unknown_referral_are_acked_and_parked_with_the_note_kept(tmp_path):
    engine = Engine(tmp_path).start()
    mine = Store.open(engine.path)
    note = lm.consult_note_cda(referral_extension="R999999", title="Consultation Note")
    try:
        open_referral(engine, mine)   # a referral exists: the unknown ones must not land on it
        siu = lm.siu_s12(referral_id=UNKNOWN_EI, appointment_id="A9^^2.999.1.32.14^ISO", control_id="SIU0404",
                         **ORIGINAL_MODE)
        assert msa(engine.send(siu)) == ("AA", "SIU0404")
        mdm = lm.mdm_t02(referral_id=UNKNOWN_EI, document=note, document_id="D9^^2.999.1.32.20^ISO",
                         control_id="MDM0404", **ORIGINAL_MODE)
        assert msa(engine.send(mdm)) == ("AA", "MDM0404")
        wait_for(lambda: applied(mine, "SIU0404") and applied(mine, "MDM0404"), what="both messages handled")

        items = Loop(mine).workqueue()
        assert [i["message_type"] for i in items] == ["SIU^S12", "MDM^T02"]
        for item in items:
            assert UNKNOWN_ID in item["reason"] and item["status"] == "open"
            assert ["referral", UNKNOWN_ID] in json.loads(item["keys"])
        # Kept whole: the bytes as sent.
        assert Loop(mine).work_item(items[0]["id"])["raw"] == siu
        assert Loop(mine).work_item(items[1]["id"])["raw"] == mdm
        notes = list(mine.db.query("SELECT * FROM notes"))
        assert len(notes) == 1
        assert notes[0]["referral_id"] is None and notes[0]["workqueue_id"] == items[1]["id"]
        assert notes[0]["content"] == note and notes[0]["format"] == "cda"
        # Nothing reached the known referral.
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "RECEIVED"
        assert Loop(mine).events(lm.REFERRAL_ID) == []
    finally:
        engine.stop()
        mine.close()
    code, out = cli("workqueue", "list", "--store", str(engine.path))
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2, out
    assert all(f"no referral matches referral {UNKNOWN_ID}" in line for line in lines), out
    check_audit(engine.path)


def test_a_loop_message_committed_but_not_applied_is_applied_at_the_next_start(tmp_path):
    engine = Engine(tmp_path).start()
    mine = Store.open(engine.path)
    try:
        open_referral(engine, mine)
        # The engine dies between the commit (and its AA) and the apply: the apply never runs.
        engine.service.loop.submit = lambda *args, **kw: None
        assert msa(engine.send(lm.siu_s12(control_id="SIU0500", **ORIGINAL_MODE))) == ("AA", "SIU0500")
        stored = list(mine.db.query("SELECT id, status, applied_at FROM messages WHERE control_id = 'SIU0500'"))
        assert [(r["status"], r["applied_at"]) for r in stored] == [("accepted", None)]
    finally:
        engine.stop()
    try:
        assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "RECEIVED"
        again = Engine(tmp_path).start()
        try:
            wait_for(lambda: applied(mine, "SIU0500"), what="the SIU applied after the restart")
            assert Loop(mine).get(lm.REFERRAL_ID)["state"] == "SCHEDULED"
            assert [e.kind for e in Loop(mine).events(lm.REFERRAL_ID)] == [Kind.BOOKED]
            origins = [r["origin"] for r in mine.db.query("SELECT origin FROM loop_events")]
            assert origins == [f"message #{stored[0]['id']}"]
        finally:
            again.stop()
    finally:
        mine.close()
    check_audit(engine.path)
