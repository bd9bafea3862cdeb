"""The specialist's engine receives a referral over Direct and hands it to its EHR (issue 7).

The referring clinic is a DirectAgent of its own (referrals@direct.sender.test, sender.pem)
that builds and seals the packet exactly as it does for a real send. The specialist is the
engine's DirectService (cardiology@direct.receiver.test, receiver.pem) with one inbound
channel, driven on a ``task.Clock`` with its Direct-thread work called in the test's thread:
the mail is saved as the SMTP listener saves it, then opened as the next tick opens it.

The last tests run the whole EngineService on the test reactor: the packet goes in over
SMTP, and the REF^I12 comes out over MLLP to tests/mllp_peer.py, which ACKs it.
"""

from __future__ import annotations

import functools
import base64
import json
import smtplib
import time
from pathlib import Path

import hl7
import pytest
from twisted.internet.task import Clock

import polling
import loop_messages as lm
from hl7referral.config.direct import DirectConfig
from hl7referral.direct import packet as packet_module
from hl7referral.engine import answering
from hl7referral.engine.direct import DirectAgent, Enqueued
from hl7referral.engine.direct_service import DirectService
from hl7referral.engine.smtp_client import SendResult
from hl7referral.loop.correlate import read_v2
from hl7referral.loop.reread import read_documents
from hl7referral.loop.states import Kind
from hl7referral.loop.tracker import Tracker
from hl7referral.store import Store
from hl7referral.store.audit import AuditLog
from hl7referral.store.loop import Loop
from hl7referral.store.outbox import Outbox
from hl7referral.store.relay import Relay, Side
from mllp_peer import Peer
from specialist_inputs import (
    CHANNEL,
    EHR_ENDPOINT,
    PATIENT_CX,
    RECEIVER,
    REFERRAL_EI,
    REFERRAL_ID,
    SENDER,
    channel_toml,
    order_of,
    referral_content,
    specialist_config,
    utc,
)

START = float(int(time.time()))   # the example certificates are valid from yesterday


# -- harness ---------------------------------------------------------------------------------------

def referrer_agent(tmp_path: Path, pki: Path) -> DirectAgent:
    store = Store.open(tmp_path / "referrer.db")
    config = DirectConfig(address=SENDER, certificate=pki / "sender.pem", key=pki / "sender.key",
                          chain=(pki / "intermediate.pem",), certificates_dir=pki,
                          crls=(pki / "intermediate.crl.pem",), anchors={"*": (pki / "anchor.pem",)})
    agent = DirectAgent(config, Outbox(store))
    agent.load()
    return agent


class Specialist:
    """The specialist engine's DirectService on a Clock; its Direct-thread work runs in the caller's thread."""

    def __init__(self, tmp_path: Path, pki: Path, *, text: str | None = None) -> None:
        self.config = specialist_config(tmp_path, text=text, pki=pki, store=tmp_path / "specialist.db")
        self.store = Store.open(self.config.store_path)
        self.clock = Clock()
        self.clock.advance(START)
        self.service = DirectService(self.config, self.store, self.clock, clock=self.clock)
        self.service.agent.load()
        self.outbox, self.loop = Outbox(self.store), Loop(self.store)

    def deliver(self, payload: bytes, sender: str = SENDER) -> int:
        """What the SMTP listener does (commit the mail), then the next tick (open it, pack answers)."""
        mail_id = self.outbox.save_mail(mail_from=sender, rcpt_to=[RECEIVER], raw=payload, message_id="",
                                        at="2026-11-18T11:00:00Z")
        self.tick()
        return mail_id

    def tick(self) -> None:
        self.service._housekeeping(self.clock.seconds())

    def rows(self, kind: str | None = None) -> list[dict]:
        return [self.outbox.get(r["id"]) for r in self.outbox.list() if kind is None or r["kind"] == kind]

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def referrer(tmp_path, direct_pki):
    a = referrer_agent(tmp_path, direct_pki)
    yield a
    a.outbox.store.close()


@pytest.fixture
def specialist(tmp_path, direct_pki):
    s = Specialist(tmp_path, direct_pki)
    yield s
    s.close()


def send_referral(referrer: DirectAgent, now: float, *, order: bytes | None = None, cda: bytes | None = None) -> dict:
    """The 360X sample (OMG^O19 + the pipeline's Referral Note), sealed for the specialist, sent."""
    content = referral_content("omg-o19")
    result = referrer.enqueue_referral(referral_id=REFERRAL_ID, document_id=None, channel="omg-o19",
                                       cda=cda if cda is not None else content.cda,
                                       order=order if order is not None else content.order, patient_id=PATIENT_CX,
                                       recipient=RECEIVER, now=now)
    assert isinstance(result, Enqueued), result
    row = referrer.outbox.get(result.id)
    referrer.on_send_result(row, SendResult("delivered", 250, "2.0.0 queued"), now)
    return referrer.outbox.get(result.id)


def hand_back(referrer: DirectAgent, payload: bytes, now: float):
    """The specialist's mail (an MDN, an answer) arriving at the referring clinic."""
    mail_id = referrer.outbox.save_mail(mail_from=RECEIVER, rcpt_to=[SENDER], raw=payload, message_id="", at="t")
    return referrer.receive(referrer.outbox.get_mail(mail_id), now)


def processed_by_referrer(specialist: Specialist, referrer: DirectAgent, row: dict,
                          on_documents=lambda *a, **kw: None) -> None:
    """Our packet *row* leaves (250), reaches the referring clinic (its documents to *on_documents*),
    whose processed MDN comes back to us."""
    now = specialist.clock.seconds()
    specialist.service.agent.on_send_result(row, SendResult("delivered", 250, "2.0.0 queued"), now)
    referrer.on_documents = on_documents
    hand_back(referrer, row["payload"], now)
    [mdn] = [r for r in referrer.outbox.list() if r["kind"] == "mdn-processed"]
    specialist.deliver(referrer.outbox.get(mdn["id"])["payload"])


def obx_document(payload: bytes) -> bytes:
    """The C-CDA a forwarded REF^I12 carries (OBX-5 ED: ^Application^XML^Base64^<data>), read by python-hl7."""
    message = hl7.parse(payload.decode("utf-8"))
    [obx] = [s for s in message.segments("OBX") if str(s(2)) == "ED"]
    ed = str(obx(5)).split("^")
    assert ed[1:4] == ["Application", "XML", "Base64"]
    return base64.b64decode(ed[4])


# -- a referral arrives ------------------------------------------------------------------------------

def test_a_referral_by_direct_is_recorded_and_queued_for_our_ehr(specialist, referrer):
    packet = send_referral(referrer, specialist.clock.seconds())
    mail_id = specialist.deliver(packet["payload"])

    mail = specialist.outbox.get_mail(mail_id)
    assert (mail["status"], mail["kind"], mail["from_address"], mail["trust"]) == \
        ("stored", "direct", SENDER, "trusted (address-bound)")

    referral = specialist.loop.get(REFERRAL_ID)
    assert (referral["state"], referral["channel"], referral["destination"]) == ("DELIVERED", CHANNEL, SENDER)
    assert (referral["side"], referral["partner"]) == ("recipient", SENDER)
    assert Relay(specialist.store).side_of(REFERRAL_ID) == Side("recipient", SENDER)
    assert [e.kind for e in specialist.loop.events(REFERRAL_ID)] == [Kind.SENT, Kind.DELIVERED]
    contact = json.loads(referral["contact"])
    assert (contact["referral_ei"], contact["patient_cx"]) == (REFERRAL_EI, PATIENT_CX)

    # The hand-over to our EHR: one MLLP row, a REF^I12 carrying the initiator's id and the C-CDA.
    [row] = specialist.rows("referral-in")
    assert (row["transport"], row["recipient"], row["channel"], row["state"], row["referral_id"]) == \
        ("mllp", EHR_ENDPOINT, CHANNEL, "QUEUED", REFERRAL_ID)
    message = hl7.parse(row["payload"].decode("utf-8"))
    msh = message.segment("MSH")
    assert str(msh(9)) == "REF^I12^REF_I12" and str(msh(10)) == row["message_id"]
    assert (str(msh(5)), str(msh(6))) == ("EHR", "CARDIOLOGY")
    assert str(message.segment("RF1")(6)) == REFERRAL_EI
    assert obx_document(row["payload"]) == referral_content("omg-o19").cda
    assert read_v2(row["payload"]).referral_ids == [REFERRAL_ID]   # the EHR's answers will key the same way

    # The processed MDN goes back, and the referring clinic's packet is processed.
    [mdn] = specialist.rows("mdn-processed")
    assert (mdn["transport"], mdn["recipient"]) == ("direct", SENDER)
    assert hand_back(referrer, mdn["payload"], specialist.clock.seconds()).status == "mdn-matched"
    assert referrer.outbox.get(packet["id"])["state"] == "MDN_PROCESSED"
    assert AuditLog(specialist.store).verify().ok


def test_the_same_mail_twice_is_one_referral_and_one_hand_over(specialist, referrer):
    packet = send_referral(referrer, specialist.clock.seconds())
    first = specialist.deliver(packet["payload"])
    specialist.clock.advance(60)
    second = specialist.deliver(packet["payload"])   # the referrer's retry: same Message-ID, same bytes

    assert {specialist.outbox.get_mail(m)["status"] for m in (first, second)} == {"stored"}
    assert len(specialist.loop.referrals()) == 1
    assert [e.kind for e in specialist.loop.events(REFERRAL_ID)] == [Kind.SENT, Kind.DELIVERED]
    assert len(specialist.rows("referral-in")) == 1
    assert len(specialist.rows("mdn-processed")) == 1   # one MDN per Message-ID
    assert [a["kind"] for a in specialist.loop.alerts(REFERRAL_ID)] == ["inbound-referral-again"]


def test_a_sender_no_channel_takes_is_parked_with_an_alert_and_the_mail_kept(tmp_path, direct_pki, referrer):
    specialist = Specialist(tmp_path, direct_pki, text=channel_toml(direct=("@direct.elsewhere.test",)))
    try:
        packet = send_referral(referrer, specialist.clock.seconds())
        mail_id = specialist.deliver(packet["payload"])

        assert specialist.loop.get(REFERRAL_ID) is None
        assert specialist.rows("referral-in") == []
        [item] = specialist.loop.workqueue()
        assert (item["origin"], item["message_type"], item["status"]) == \
            (f"mail #{mail_id}", "referral (Direct)", "open")
        assert f"no channel takes referrals from {SENDER}" in item["reason"]
        assert ["referral", REFERRAL_ID] in json.loads(item["keys"])
        # Kept whole: the mail as received, and what it carried in the work item.
        assert specialist.outbox.get_mail(mail_id)["raw"] == packet["payload"]
        kept = specialist.loop.work_item(item["id"])["raw"]
        assert kept and read_documents_ok(kept)
        alerts = [a for a in specialist.store.list_alerts() if a["kind"] == "inbound-referral-parked"]
        assert len(alerts) == 1 and f"#{item['id']}" in alerts[0]["text"] and alerts[0]["owner"]
    finally:
        specialist.close()


def test_a_parked_referral_is_taken_by_replay_once_a_channel_takes_its_sender(tmp_path, direct_pki, referrer):
    """The analyst adds the sender to a channel, then `hl7referral replay`: recorded, queued for our
    EHR, the item resolved; before that, replay leaves it open as it was (no second item)."""
    from click.testing import CliRunner

    from hl7referral.cli import main
    from specialist_inputs import channels_dir

    specialist = Specialist(tmp_path, direct_pki, text=channel_toml(direct=("@direct.elsewhere.test",)))
    try:
        mail_id = specialist.deliver(send_referral(referrer, specialist.clock.seconds())["payload"])
        [item] = specialist.loop.workqueue()
    finally:
        specialist.close()
    store = str(tmp_path / "specialist.db")

    def replay(*args):
        return CliRunner().invoke(main, ["replay", *args, "--store", store, "--by", "analyst",
                                         "--set", f'channels.dir="{tmp_path / "channels"}"'])

    still = replay(str(item["id"]))
    assert still.exit_code == 1, still.output
    assert f"#{item['id']}: still parked: no channel takes referrals from {SENDER}" in still.output

    channels_dir(tmp_path, channel_toml())   # the channel now takes the sender's domain
    done = replay("--all")
    assert done.exit_code == 0, done.output
    assert f"#{item['id']}: referral {REFERRAL_ID} recorded, queued for the EHR" in done.output

    s = Store.open(store)
    try:
        loop, outbox = Loop(s), Outbox(s)
        [resolved] = loop.workqueue(status="resolved")
        assert (resolved["id"], resolved["resolved_by"], resolved["referral_id"]) == \
            (item["id"], "analyst", REFERRAL_ID)
        assert loop.workqueue(status="open") == []
        referral = loop.get(REFERRAL_ID)
        assert referral["state"] == "DELIVERED" and referral["channel"] == CHANNEL
        assert Relay(s).side_of(REFERRAL_ID) == Side("recipient", SENDER)
        [hand_over] = [r for r in outbox.list() if r["kind"] == "referral-in"]
        assert hand_over["recipient"] == EHR_ENDPOINT and hand_over["state"] == "QUEUED"
        assert json.loads(referral["contact"])["mail_id"] == mail_id
    finally:
        s.close()
    again = replay(str(item["id"]))   # resolved: nothing to take twice
    assert again.exit_code == 1 and "no open work-queue item" in again.output


def test_a_referral_sent_again_does_not_touch_the_document_our_ehr_was_given(tmp_path, direct_pki, referrer):
    """Reference mode: the second copy (a resend, or a parked one replayed) is recorded once and its
    C-CDA does not replace the file our EHR was pointed at."""
    docs = tmp_path / "docs"
    specialist = Specialist(tmp_path, direct_pki, text=channel_toml(cda="reference", documents_dir=str(docs)))
    try:
        specialist.deliver(send_referral(referrer, specialist.clock.seconds())["payload"])
        [kept] = list(docs.rglob("referral-note.xml"))
        kept.write_bytes(b"what our EHR fetched")
        again = referral_content("omg-o19").cda.replace(b"</ClinicalDocument>", b"<!-- resent --></ClinicalDocument>")
        specialist.deliver(send_referral(referrer_agent(tmp_path / "again", direct_pki), specialist.clock.seconds(),
                                         cda=again)["payload"])
        assert kept.read_bytes() == b"what our EHR fetched"
        assert len(specialist.rows("referral-in")) == 1
        assert "inbound-referral-again" in [a["kind"] for a in specialist.store.list_alerts()]
    finally:
        specialist.close()


def read_documents_ok(content: bytes) -> bool:
    """The parked content still unpacks into the referral's documents (a person can look at them)."""
    from hl7referral.engine.direct import _attachments
    names = [n for n, _ in _attachments(content)]
    return "DOC0001.XML" in names and "DOC0002.HL7" in names


def test_a_package_that_cannot_be_read_is_parked_not_guessed(specialist, referrer):
    order = order_of("omg-o19").replace(b"ORC|NW|990001^^1.3.6.1.4.1.99999.1.15^ISO", b"ORC|NW|") \
        .replace(b"OBR|1|990001^^1.3.6.1.4.1.99999.1.15^ISO|", b"OBR|1||")
    cda = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><code code="57133-1"/></ClinicalDocument>'
    packet = send_referral(referrer, specialist.clock.seconds(), order=order, cda=cda)
    specialist.deliver(packet["payload"])
    assert specialist.loop.referrals() == [] and specialist.rows("referral-in") == []
    [item] = specialist.loop.workqueue()
    assert "no referral id" in item["reason"]


def test_a_document_that_cannot_be_kept_for_the_ehr_parks_the_referral_with_an_alert(tmp_path, direct_pki,
                                                                                     referrer):
    # reference mode, and the documents directory cannot be made (a file is in the way)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    specialist = Specialist(tmp_path, direct_pki, text=channel_toml(cda="reference", documents_dir=str(blocker)))
    try:
        mail_id = specialist.deliver(send_referral(referrer, specialist.clock.seconds())["payload"])
        assert specialist.outbox.get_mail(mail_id)["status"] == "stored"   # opened and dealt with, not an error
        assert specialist.loop.get(REFERRAL_ID) is None and specialist.rows("referral-in") == []
        [item] = specialist.loop.workqueue()
        assert "cannot be handed to our EHR" in item["reason"]
        assert [a["kind"] for a in specialist.store.list_alerts()] == ["inbound-referral-parked"]
    finally:
        specialist.close()


# -- the answer goes back --------------------------------------------------------------------------

def test_our_ehrs_accept_is_packed_for_the_referrer_at_the_next_tick(specialist, referrer):
    packet = send_referral(referrer, specialist.clock.seconds())
    specialist.deliver(packet["payload"])
    accept = lm.osu_accept(referral_id=REFERRAL_EI, accept_ack="", application_ack="")
    obs = read_v2(accept, local_root=specialist.config.local_root)
    specialist.clock.advance(3600)
    now = specialist.clock.seconds()
    with specialist.store.atomic():   # as LoopService applies our EHR's message
        out = Tracker(specialist.store, specialist.config.loop).observe(obs, now=utc(now), origin="message #1",
                                                                        raw=accept)
        answering.owe_from_ehr(specialist.store, specialist.config, referral_id=out.referral_id, obs=obs,
                               raw=accept, now_hl7="20261118120000+0000", at="2026-11-18T12:00:00Z")
    specialist.tick()

    [relay_row] = Relay(specialist.store).list(REFERRAL_ID)
    assert relay_row["packed_at"] and relay_row["error"] is None
    [answer] = specialist.rows("answer")
    assert (answer["id"], answer["transport"], answer["recipient"], answer["state"]) == \
        (relay_row["outbox_id"], "direct", SENDER, "QUEUED")
    specialist.tick()
    assert len(specialist.rows("answer")) == 1   # packed once

    # The referring clinic opens it and reads the accept of its referral.
    seen = []
    referrer.on_documents = lambda documents, *a, **kw: seen.append(documents)
    received = hand_back(referrer, answer["payload"], now)
    assert (received.kind, received.status) == ("direct", "stored")
    obs = read_documents(seen[0])
    assert [e.kind for e in obs.events] == [Kind.ACCEPTED] and obs.referral_ids[0] == REFERRAL_ID


def test_an_answer_for_a_partner_without_a_certificate_is_kept_with_an_alert(specialist, referrer):
    packet = send_referral(referrer, specialist.clock.seconds())
    specialist.deliver(packet["payload"])
    # The referrer's address changed to one we hold no certificate for.
    Relay(specialist.store).set_side(REFERRAL_ID, "recipient", "intake@unknown.example.org", at="t")
    obs = read_v2(lm.osu_accept(referral_id=REFERRAL_EI))
    answering.owe_from_ehr(specialist.store, specialist.config, referral_id=REFERRAL_ID, obs=obs, raw=None,
                           now_hl7="20261118120000+0000", at="2026-11-18T12:00:00Z")
    specialist.tick()
    [row] = Relay(specialist.store).list(REFERRAL_ID)
    assert row["packed_at"] is None and "no usable certificate for intake@unknown.example.org" in row["error"]
    assert specialist.rows("answer") == []
    assert [a["kind"] for a in specialist.loop.alerts(REFERRAL_ID)] == ["answer-not-sent"]


def test_a_consult_note_answer_is_filed_when_the_referrers_processed_mdn_comes_back(specialist, referrer):
    packet = send_referral(referrer, specialist.clock.seconds())
    specialist.deliver(packet["payload"])
    mdm = lm.mdm_t02(referral_id=REFERRAL_EI, text="Seen.\nPlan: stress echo.", accept_ack="", application_ack="")
    obs = read_v2(mdm)
    answering.owe_from_ehr(specialist.store, specialist.config, referral_id=REFERRAL_ID, obs=obs, raw=mdm,
                           now_hl7="20261118120000+0000", at="2026-11-18T12:00:00Z")
    specialist.tick()
    [note] = specialist.rows("consult-note")
    assert (note["transport"], note["recipient"]) == ("direct", SENDER)
    seen = []
    processed_by_referrer(specialist, referrer, note, lambda documents, *a, **kw: seen.append(documents))
    obs = read_documents(seen[0])
    assert Kind.CONSULT_NOTE in [e.kind for e in obs.events] and obs.note.format == "cda"
    assert specialist.outbox.get(note["id"])["state"] == "MDN_PROCESSED"
    assert Kind.NOTE_FILED in [e.kind for e in specialist.loop.events(REFERRAL_ID)]


def test_an_interim_note_does_not_close_the_referral_when_its_mdn_comes_back(specialist, referrer):
    from hl7referral.loop.correlate import Note, Observation
    from hl7referral.loop.states import Event

    packet = send_referral(referrer, specialist.clock.seconds())
    specialist.deliver(packet["payload"])
    interim = Observation("answer interim-note", (("referral", REFERRAL_ID),),
                          (Event(Kind.ACCEPTED, "2026-11-18T12:00:00Z", source="answer"),
                           Event(Kind.INTERIM_NOTE, "2026-11-18T12:00:00Z", source="answer"),),
                          note=Note("text", "text/plain", b"Labs pending; seen again next week.", "Interim note"))
    with specialist.store.atomic():
        specialist.loop.apply(REFERRAL_ID, interim.events, at="2026-11-18T12:00:00Z", actor="answer")
        answering.owe_from_ehr(specialist.store, specialist.config, referral_id=REFERRAL_ID, obs=interim, raw=None,
                               now_hl7="20261118120000+0000", at="2026-11-18T12:00:00Z")
    specialist.tick()
    [owed] = [r for r in Relay(specialist.store).list(REFERRAL_ID) if r["kind"] == "INTERIM_NOTE"]
    assert owed["document_size"]   # the note travels as a C-CDA beside the OSU
    note = specialist.outbox.get(owed["outbox_id"])
    processed_by_referrer(specialist, referrer, note)
    assert specialist.outbox.get(note["id"])["state"] == "MDN_PROCESSED"
    assert specialist.loop.get(REFERRAL_ID)["state"] == "ACCEPTED"   # an interim note changes no state


def test_our_cancel_of_a_referral_we_sent_by_direct_is_packed_for_the_recipient(specialist):
    from forward_inputs import built
    from hl7referral.loop.tracker import referral_facts
    from hl7referral.store.sqlite import ACCEPTED, Inbound

    # A referral this engine sent: its order and Referral Note stored as the pipeline stores them, the
    # referral opened as LoopService opens it and marked as DirectService.dispatch does.
    cda, processed = built("omg-o19")
    [stored] = specialist.store.commit_batch([Inbound(raw=order_of("omg-o19"), received_at="2026-11-18T10:59:00Z",
                                                      status=ACCEPTED, channel="omg-o19", message_type="OMG^O19",
                                                      control_id="OMGSAMPLE1", referral_id=REFERRAL_ID)])
    specialist.store.save_document(message_id=stored.message_id, channel="omg-o19", referral_id=REFERRAL_ID,
                                   status="ready", xml=cda, destination="{}", reasons=[],
                                   created_at="2026-11-18T11:00:00Z")
    Tracker(specialist.store, specialist.config.loop).open(REFERRAL_ID, now=utc(specialist.clock.seconds()),
                                                           channel="omg-o19",
                                                           facts=referral_facts(processed.referral))
    Relay(specialist.store).set_side(REFERRAL_ID, "initiator", SENDER, at="2026-11-18T11:00:00Z")
    cancel = lm.osu_cancel(referral_id=REFERRAL_EI, accept_ack="", application_ack="")
    assert answering.owe_from_ehr(specialist.store, specialist.config, referral_id=REFERRAL_ID,
                                  obs=read_v2(cancel), raw=cancel, now_hl7="20261118120000+0000",
                                  at="2026-11-18T12:00:00Z") == ["CANCEL_REQUESTED"]
    specialist.tick()
    [owed] = Relay(specialist.store).list(REFERRAL_ID)
    assert owed["error"] is None and owed["packed_at"]
    [answer] = specialist.rows("answer")
    assert (answer["recipient"], answer["id"]) == (SENDER, owed["outbox_id"])


def test_an_answer_the_referrer_processed_does_not_time_out(specialist, referrer):
    packet = send_referral(referrer, specialist.clock.seconds())
    specialist.deliver(packet["payload"])
    obs = read_v2(lm.osu_accept(referral_id=REFERRAL_EI))
    answering.owe_from_ehr(specialist.store, specialist.config, referral_id=REFERRAL_ID, obs=obs, raw=None,
                           now_hl7="20261118120000+0000", at="2026-11-18T12:00:00Z")
    specialist.tick()
    [answer] = specialist.rows("answer")
    processed_by_referrer(specialist, referrer, answer)
    assert specialist.outbox.get(answer["id"])["state"] == "MDN_PROCESSED"
    specialist.clock.advance(specialist.config.direct.dispatched_timeout + 1)
    specialist.tick()
    assert specialist.outbox.get(answer["id"])["state"] != "TIMED_OUT"
    assert not [a for a in specialist.store.list_alerts() if a["kind"] == "direct-timed_out"]


def test_the_initiators_cancel_by_direct_reaches_our_ehr(specialist, referrer, tmp_path):
    packet = send_referral(referrer, specialist.clock.seconds())
    specialist.deliver(packet["payload"])
    # The referring side: its EHR cancels the referral it sent; the cancel is owed to us and packed.
    theirs = referrer.outbox.store
    Loop(theirs).open_referral(REFERRAL_ID, at="2026-11-18T11:00:00Z", channel="omg-o19")
    Relay(theirs).set_side(REFERRAL_ID, "initiator", RECEIVER, at="t")
    cancel = lm.osu_cancel(referral_id=REFERRAL_EI, accept_ack="", application_ack="")
    assert answering.owe_from_ehr(theirs, specialist.config, referral_id=REFERRAL_ID, obs=read_v2(cancel),
                                  raw=cancel, now_hl7="20261118120000+0000", at="2026-11-18T12:00:00Z") == \
        ["CANCEL_REQUESTED"]
    [owed] = Relay(theirs).pending()
    result = referrer.enqueue_answer(owed, patient_id=PATIENT_CX, now=specialist.clock.seconds())
    assert isinstance(result, Enqueued)

    specialist.deliver(referrer.outbox.get(result.id)["payload"])
    assert specialist.loop.get(REFERRAL_ID)["state"] == "CANCEL_REQUESTED"
    assert len(specialist.loop.referrals()) == 1   # an answer about it, not a new referral
    [row] = specialist.rows("cancel-request")
    assert (row["transport"], row["recipient"], row["channel"]) == ("mllp", EHR_ENDPOINT, CHANNEL)
    orc = hl7.parse(row["payload"].decode("utf-8")).segment("ORC")
    assert (str(orc(1)), str(orc(2))) == ("CA", REFERRAL_EI)


def test_the_initiators_cancel_reason_reaches_our_ehr(specialist, referrer):
    packet = send_referral(referrer, specialist.clock.seconds())
    specialist.deliver(packet["payload"])
    cancel = lm.osu_cancel(referral_id=REFERRAL_EI, reason="Seen elsewhere sooner")
    content = packet_module.AnswerContent(referral_id=REFERRAL_ID, created="20261118120000", patient_id=PATIENT_CX,
                                          message=cancel, key="cancel-1")
    certs = load_identity(referrer)
    eml = packet_module.answer_message(content, sender=SENDER, recipient=RECEIVER, message_id="<cancel-1@x>",
                                       date=specialist.clock.seconds(), **certs)
    specialist.deliver(eml)
    [row] = specialist.rows("cancel-request")
    orc = hl7.parse(row["payload"].decode("utf-8")).segment("ORC")
    assert "Seen elsewhere sooner" in str(orc(16))


def load_identity(agent: DirectAgent) -> dict:
    """The referring agent's signing identity and the specialist's certificate, for a hand-built packet."""
    from cryptography import x509
    receiver = x509.load_pem_x509_certificate((agent.config.certificates_dir / "receiver.pem").read_bytes())
    return dict(signer=agent.certificate, key=agent.key, chain=agent.chain, recipient_certs=[receiver])


@pytest.mark.parametrize("message, cda", [("REF^I12", "reference"), ("OMG^O19", "embed"), ("OMG^O19", "reference")])
def test_the_forward_follows_the_channel(tmp_path, direct_pki, referrer, message, cda):
    docs = tmp_path / "documents"
    text = channel_toml(message=message, cda=cda, documents_dir=str(docs),
                        reference_url="https://docs.example.org/referrals/{file}?id={referral}")
    specialist = Specialist(tmp_path, direct_pki, text=text)
    try:
        specialist.deliver(send_referral(referrer, specialist.clock.seconds())["payload"])
        [row] = specialist.rows("referral-in")
        parsed = hl7.parse(row["payload"].decode("utf-8"))
        assert str(parsed.segment("MSH")(9)).startswith(message)
        assert read_v2(row["payload"]).referral_ids == [REFERRAL_ID]
        original = referral_content("omg-o19").cda
        if cda == "embed":
            assert obx_document(row["payload"]) == original
            assert not docs.exists()
        else:
            [obx] = [s for s in parsed.segments("OBX") if str(s(2)) == "RP"]
            pointer = parsed.unescape(str(obx(5)).split("^")[0])
            [kept] = list(docs.rglob("*.xml"))
            assert kept.read_bytes() == original   # written whole before it is named
            assert pointer == f"https://docs.example.org/referrals/{kept.name}?id={REFERRAL_ID}"
    finally:
        specialist.close()


# -- the whole engine: SMTP in, MLLP out -----------------------------------------------------------

@pytest.fixture
def peer():
    p = Peer().start()
    yield p
    p.stop()


wait_for = functools.partial(polling.wait_for, timeout=20.0)


class RunningSpecialist:
    """The EngineService with the specialist's configuration, on the test reactor."""

    def __init__(self, tmp_path: Path, pki: Path, peer: Peer) -> None:
        from hl7referral.config import load_engine
        from specialist_inputs import channels_dir, direct_overrides
        from reactor_thread import call, running_reactor

        self.call = call
        endpoint = f"tcp:host=127.0.0.1:port={peer.port}"
        self.path = tmp_path / "engine.db"
        self.config = load_engine(None, store=str(self.path), listen=("tcp:0:interface=127.0.0.1",), overrides=[
            f'channels.dir="{channels_dir(tmp_path, channel_toml(endpoint=endpoint, ack_timeout=2.0))}"',
            *direct_overrides(pki, inbound="tcp:0:interface=127.0.0.1")])
        from hl7referral.engine.service import EngineService
        self.reactor = running_reactor()
        self.service = EngineService(self.config, self.reactor)
        self.endpoint = endpoint

    def __enter__(self) -> "RunningSpecialist":
        self.call(self.reactor, self.service.startService)
        self.call(self.reactor, lambda: self.service.ready)
        port = wait_for(lambda: self.service.direct.port, what="the SMTP listener")
        self.smtp_port = port.getHost().port
        return self

    def __exit__(self, *exc) -> None:
        self.call(self.reactor, self.service.stopService)

    def mail(self, payload: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as s:
            s.sendmail(SENDER, [RECEIVER], payload)


def outbox_rows(path: Path, kind: str) -> list[dict]:
    s = Store.open(path)
    try:
        return [r for r in Outbox(s).list() if r["kind"] == kind]
    finally:
        s.close()


def test_smtp_in_mllp_out_the_ehr_acks_and_the_hand_over_is_delivered(tmp_path, direct_pki, referrer, peer):
    with RunningSpecialist(tmp_path, direct_pki, peer) as engine:
        packet = send_referral(referrer, time.time())
        engine.mail(packet["payload"])
        [got] = peer.wait_for(1, timeout=20)
        row = wait_for(lambda: [r for r in outbox_rows(engine.path, "referral-in") if r["state"] == "DELIVERED"],
                       what="the hand-over DELIVERED")[0]
    assert got.parse_error == "" and got.control_id == row["message_id"]
    message = hl7.parse(got.payload.decode("utf-8"))
    assert str(message.segment("MSH")(9)) == "REF^I12^REF_I12"
    assert str(message.segment("RF1")(6)) == REFERRAL_EI
    assert obx_document(got.payload) == referral_content("omg-o19").cda
    assert row["recipient"] == engine.endpoint and row["attempts"] == 1
    s = Store.open(engine.path)
    try:
        assert Loop(s).get(REFERRAL_ID)["state"] == "DELIVERED"
        assert [e["event"] for e in Outbox(s).events(outbox_id=row["id"])] == ["queued", "ack"]
        assert len(peer.received) == 1
    finally:
        s.close()


def test_a_referral_our_ehr_refuses_fails_with_an_alert(tmp_path, direct_pki, referrer, peer):
    peer.default = "ae"
    with RunningSpecialist(tmp_path, direct_pki, peer) as engine:
        engine.mail(send_referral(referrer, time.time())["payload"])
        row = wait_for(lambda: [r for r in outbox_rows(engine.path, "referral-in") if r["state"] == "FAILED"],
                       what="the hand-over FAILED")[0]
    assert len(peer.received) == 1   # refused, not resent
    s = Store.open(engine.path)
    try:
        [alert] = [a for a in Loop(s).alerts(REFERRAL_ID) if a["kind"] == "referral-in-failed"]
        assert "our EHR answered AE" in alert["text"] and alert["owner"]
        assert Outbox(s).get(row["id"])["last_error"]
    finally:
        s.close()


def test_once_our_ehr_took_the_referral_the_initiator_is_told_it_was_dispatched(tmp_path, direct_pki, referrer, peer):
    with RunningSpecialist(tmp_path, direct_pki, peer) as engine:
        packet = send_referral(referrer, time.time())
        assert packet["final_delivery"]   # the referrer asked for it
        engine.mail(packet["payload"])
        wait_for(lambda: [r for r in outbox_rows(engine.path, "referral-in") if r["state"] == "DELIVERED"],
                 what="the hand-over DELIVERED")
        time.sleep(2.5)   # two more Direct ticks
        assert outbox_rows(engine.path, "mdn-dispatched")


# -- received mail opened in groups ----------------------------------------------------------------

def test_mail_received_meanwhile_is_opened_in_one_transaction_and_a_bad_one_alone(
        specialist, referrer, monkeypatch):
    packet = send_referral(referrer, specialist.clock.seconds())
    good = specialist.outbox.save_mail(mail_from=SENDER, rcpt_to=[RECEIVER], raw=packet["payload"], message_id="",
                                       at="2026-11-18T11:00:00Z")
    junk = specialist.outbox.save_mail(mail_from=SENDER, rcpt_to=[RECEIVER], raw=b"Subject: hi\r\n\r\nnot S/MIME",
                                       message_id="", at="2026-11-18T11:00:01Z")
    again = specialist.outbox.save_mail(mail_from=SENDER, rcpt_to=[RECEIVER], raw=packet["payload"],
                                        message_id="", at="2026-11-18T11:00:02Z")
    commits = []
    plain = specialist.store._transaction

    def counted():
        if specialist.store._depth == 0:
            commits.append(1)
        return plain()
    monkeypatch.setattr(specialist.store, "_transaction", counted)
    specialist.service._open_received(specialist.clock.seconds())
    monkeypatch.undo()
    statuses = {m["id"]: m["status"] for m in specialist.outbox.list_mail()}
    assert statuses[good] in ("stored", "delivered") and statuses[again] in ("stored", "delivered")
    assert statuses[junk] == "rejected"
    assert len(commits) == 1                      # three mails acted on in one transaction (one fsync)
    assert [r["referral_id"] for r in specialist.loop.referrals()] == [REFERRAL_ID]   # recorded once

    # A mail whose handling fails makes its group roll back; each mail is then opened alone: the bad
    # one is marked "error" (kept, with the reason), the others are processed.
    packet2 = send_referral(referrer, specialist.clock.seconds() + 1)
    first = specialist.outbox.save_mail(mail_from=SENDER, rcpt_to=[RECEIVER], raw=packet2["payload"],
                                        message_id="", at="2026-11-18T11:01:00Z")
    broken = specialist.outbox.save_mail(mail_from=SENDER, rcpt_to=[RECEIVER], raw=packet2["payload"],
                                         message_id="", at="2026-11-18T11:01:01Z")
    real = specialist.service.agent._on_content

    def failing(mail_id, *args, **kwargs):
        if mail_id == broken:
            raise RuntimeError("disk says no")
        return real(mail_id, *args, **kwargs)
    monkeypatch.setattr(specialist.service.agent, "_on_content", failing)
    specialist.service._open_received(specialist.clock.seconds())
    mails = {m["id"]: m for m in specialist.outbox.list_mail()}
    assert mails[broken]["status"] == "error"   # kept, marked, never lost
    assert mails[first]["status"] in ("stored", "delivered")
