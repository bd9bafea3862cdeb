"""Issue 7, the other ends of the loop between two engine processes (a real SMTP relay on 127.0.0.1).

Beside the closing loop (tests/test_loop_two_engines.py): a decline, a cancel the specialist
confirms, a no-show and rebooking, Direct refused and the fax taking the referral, either
engine SIGKILLed mid-loop, and a 360X OMG^O19 handed to the specialist's EHR by reference.
Each checks what a user would: the states and timelines in both stores, what each EHR
received, and the outbox rows (one packet per answer, nothing sent twice).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import hl7
import pytest

from fax_api_server import FaxApiServer
from hl7referral.demo import scenario
from hl7referral.demo.config import SPECIALIST_IDENTITY, deep_merge, ref_i12_channel, referrer_settings, \
    specialist_entry
from hl7referral.demo.harness import REFERRER, SPECIALIST, TwoEngines, free_ports, referrer_spec, specialist_spec
from hl7referral.store.loop import Loop

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
REF_I12 = (SAMPLES / "ref-i12.hl7").read_bytes()
PDFTOTEXT = shutil.which("pdftotext")
SPECIALIST_DOMAIN = SPECIALIST_IDENTITY.domain

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from hl7referral.demo.harness import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- what a user reads off each side --------------------------------------------------------------


def steps(h, side, referral_id):
    """The loop events *side* recorded about the referral, as (kind, appointment), in time order.

    Read from the store, not the timeline (which lists equal events once), so a duplicate shows.
    Receipt is the one fact two events may confirm (a processed, then a dispatched MDN, once the
    specialist's EHR took the referral): it counts once, and no source may give any event twice."""
    events = h.read(side, lambda s: Loop(s).events(referral_id))
    given = [(e.kind.value, e.source) for e in events]
    assert len(set(given)) == len(given), f"{side} recorded an event twice: {given}"
    out: list[tuple[str, str]] = []
    for e in events:
        if e.kind.value == "DELIVERED" and any(k == "DELIVERED" for k, _ in out):
            continue
        out.append((e.kind.value, e.appointment))
    return out


def kinds(h, side, referral_id):
    return [kind for kind, _ in steps(h, side, referral_id)]


def both_sides(h, referral_id):
    return {side: kinds(h, side, referral_id) for side in (REFERRER, SPECIALIST)}


def received(h, side, message_type):
    return [r for r in h.ehrs[side].received if r.message_type.startswith(message_type)]


def parse(payload: bytes):
    return hl7.parse(payload.decode("utf-8").replace("\n", "\r"))


def packets(h, side, referral_id):
    """Direct packets *side* sent about the referral (MDNs are not about one)."""
    return h.outbox(side, referral_id=referral_id, transport="direct")


def answer_kinds(h, referral_id):
    """What each of the specialist's answer packets reports (its outbox key: relay/<referral>/<KIND>/...)."""
    return sorted(r["idempotency_key"].split("/")[-2] for r in packets(h, SPECIALIST, referral_id))


def tasks(h, side, referral_id):
    return h.read(side, lambda s: Loop(s).tasks(open_only=False, referral_id=referral_id))


# -- 1. decline ---------------------------------------------------------------------------------


def test_a_declined_referral_ends_declined_on_both_sides_with_no_note_and_no_task(tmp_path, pki):
    reason = "Not a cardiology problem: please refer to endocrinology"
    with TwoEngines(tmp_path / "two", pki=pki) as h:
        ref = scenario.refer(h, REF_I12)
        scenario.decline(h, ref, reason)
        scenario.settle(h)
        print(scenario.timelines(h, ref))
        # The referrer's DECLINED came from the specialist's OSU^O51 UA/CA, with the reason its
        # coordinator reads in the timeline.
        declined = [e for e in h.loop_events(REFERRER, ref.referral_id) if e["kind"] == "DECLINED"]
        assert len(declined) == 1 and "OSU^O51" in declined[0]["source"] and "UA/CA" in declined[0]["source"]
        assert declined[0]["source"].endswith(reason)
        # One answer packet, the decline; the referrer sent one referral packet.
        assert answer_kinds(h, ref.referral_id) == ["DECLINED"]
        assert [r["kind"] for r in packets(h, REFERRER, ref.referral_id)] == ["referral"]
        for side in (REFERRER, SPECIALIST):
            assert kinds(h, side, ref.referral_id) == ["SENT", "DELIVERED", "DECLINED"], side
            assert h.state(side, ref.referral_id) == "DECLINED"
            # Nothing to file and nobody to chase: no note, no task.
            assert h.read(side, lambda s: Loop(s).notes(ref.referral_id)) == []
            assert tasks(h, side, ref.referral_id) == [], side
        assert received(h, REFERRER, "MDM") == []
        assert [r.message_type.split("^")[:2] for r in h.ehrs[SPECIALIST].received] == [["REF", "I12"]]


# -- 2. cancel, confirmed -----------------------------------------------------------------------


def test_a_cancel_from_the_referring_ehr_reaches_the_specialist_ehr_and_its_confirmation_cancels_both(
        tmp_path, pki):
    with TwoEngines(tmp_path / "two", pki=pki) as h:
        ref = scenario.refer(h, REF_I12)
        scenario.accept(h, ref)
        got = scenario.cancel(h, ref, "Patient moved out of the area")
        # The specialist's EHR got the cancel request as an OSU^O51 ORC-1 CA naming the referral as it knows it.
        assert got.message_type.startswith("OSU^O51")
        orc = parse(got.payload).segment("ORC")
        assert str(orc(1)) == "CA" and str(orc(2)) == ref.ei
        assert parse(got.payload).unescape(str(orc(16)(1)(2))) == "Patient moved out of the area"   # why
        scenario.confirm_cancel(h, ref)
        scenario.settle(h)
        print(scenario.timelines(h, ref))
        expected = ["SENT", "DELIVERED", "ACCEPTED", "CANCEL_REQUESTED", "CANCEL_CONFIRMED"]
        assert both_sides(h, ref.referral_id) == {REFERRER: expected, SPECIALIST: expected}
        # One cancel request went to the specialist (after the referral), one packet per answer came back.
        sent = packets(h, REFERRER, ref.referral_id)
        assert [r["kind"] for r in sent] == ["referral", "answer"]
        assert "/CANCEL_REQUESTED/" in sent[1]["idempotency_key"]
        assert answer_kinds(h, ref.referral_id) == ["ACCEPTED", "CANCEL_CONFIRMED"]
        assert [r.message_type.split("^")[:2] for r in h.ehrs[SPECIALIST].received] == [["REF", "I12"],
                                                                                        ["OSU", "O51"]]
        assert received(h, REFERRER, "MDM") == []


# -- 3. no-show, rebooking, closed --------------------------------------------------------------


def test_a_no_show_then_a_rebooking_then_the_note_closes_the_loop_with_both_appointments(tmp_path, pki):
    a1, a2 = "APPT-1^^1.2.3.4^ISO", "APPT-2^^1.2.3.4^ISO"
    with TwoEngines(tmp_path / "two", pki=pki) as h:
        ref = scenario.refer(h, REF_I12)
        scenario.accept(h, ref)
        scenario.book(h, ref, a1, "20261203093000+0000")
        scenario.no_show(h, ref, a1, "20261203093000+0000")
        scenario.book(h, ref, a2, "20261210093000+0000")
        scenario.consult_note(h, ref, "Seen on the second appointment. Echo normal.")
        scenario.settle(h)
        print(scenario.timelines(h, ref))
        expected = [("SENT", ""), ("DELIVERED", ""), ("ACCEPTED", ""), ("BOOKED", "APPT-1@1.2.3.4"),
                    ("NO_SHOW", "APPT-1@1.2.3.4"), ("BOOKED", "APPT-2@1.2.3.4"), ("CONSULT_NOTE", ""),
                    ("NOTE_FILED", "")]
        for side in (REFERRER, SPECIALIST):
            assert steps(h, side, ref.referral_id) == expected, side
            assert h.state(side, ref.referral_id) == "CLOSED"
        assert answer_kinds(h, ref.referral_id) == ["ACCEPTED", "BOOKED", "BOOKED", "CONSULT_NOTE", "NO_SHOW"]
        assert len(received(h, REFERRER, "MDM^T02")) == 1


# -- 4. Direct refused, the fax takes it --------------------------------------------------------

FAX_NUMBER = "+1-555-555-0190"
FAX_TOKEN_ENV = "HARNESS_FAX_TOKEN"


def fax_fallback_referrer(api: FaxApiServer, callbacks_port: int):
    """The referring side with ref-i12 sent by Direct, else by fax through the HTTP fax API on 127.0.0.1."""
    spec = referrer_spec()
    channel = {**ref_i12_channel(), "transports": ["direct", "fax"]}
    fax = {"gateway": {"gateway": "http-fax", "url": api.url, "status_url": api.status_url, "auth_env": FAX_TOKEN_ENV,
                       "timeout": 5.0},
           "callbacks": {"endpoint": f"tcp:{callbacks_port}:interface=127.0.0.1",
                         "url": f"http://127.0.0.1:{callbacks_port}/fax/callback"},
           "retry": {"first_delay": 0.5, "max_delay": 2.0}}
    return dataclasses.replace(
        spec, channels={**spec.channels, "ref-i12": channel},
        directory=lambda w: [{**specialist_entry(w, SPECIALIST), "fax": FAX_NUMBER}],
        settings=lambda w: deep_merge(referrer_settings(w), {"fax": fax}))


def test_direct_refused_by_the_relay_falls_back_to_one_fax_and_its_callback_delivers_it(tmp_path, pki, monkeypatch):
    monkeypatch.setenv(FAX_TOKEN_ENV, "Bearer test-token")   # the engines inherit the environment
    [callbacks] = free_ports(1)
    with FaxApiServer() as api, \
            TwoEngines(tmp_path / "two", pki=pki, referrer=fax_fallback_referrer(api, callbacks)) as h:
        h.relay.refuse(SPECIALIST_DOMAIN, code=550)
        ack = h.send(REFERRER, REF_I12)
        assert ack.code == "AA"
        referral_id = "SAMPLEREF0001"
        h.wait_for(lambda: api.faxes, 30, "a fax at the fax API")
        h.wait_for(lambda: h.state(REFERRER, referral_id) == "SENT", 30, "the referral SENT by fax")
        # Direct was tried once and refused for good (the relay's 550); the fax took it.
        [direct] = packets(h, REFERRER, referral_id)
        assert (direct["kind"], direct["state"], direct["last_code"]) == ("referral", "FAILED", 550)
        refused = [r for r in h.relay.records() if r.result == "refused"]
        assert [r.rcpt_to for r in refused] == [(SPECIALIST_IDENTITY.address,)]
        [fax_row] = h.outbox(REFERRER, referral_id=referral_id, transport="fax")
        [fax] = api.faxes
        assert fax.number == "+15555550190" and fax.reference == f"{referral_id}/fax/1"
        assert fax_row["job_id"] == fax.job_id and fax_row["state"] == "SUBMITTED"
        if PDFTOTEXT is not None or os.environ.get("CI"):
            (tmp_path / "fax.pdf").write_bytes(fax.pdf)
            text = subprocess.run([PDFTOTEXT, str(tmp_path / "fax.pdf"), "-"], capture_output=True,
                                  check=True).stdout
            assert referral_id.encode() in text
        # The fax API says it went through: DELIVERED.
        assert api.send_callbacks(f"http://127.0.0.1:{callbacks}/fax/callback/ref-i12",
                                  [(fax.job_id, "success", fax.reference)]) == [200]
        h.wait_for(lambda: h.state(REFERRER, referral_id) == "DELIVERED", 30, "the referral DELIVERED by fax")
        events = h.loop_events(REFERRER, referral_id)
        assert [(e["kind"], e["source"].split()[0]) for e in events] == [("SENT", "fax"), ("DELIVERED", "fax")]
        assert len(api.faxes) == 1
        # The specialist got nothing by Direct, and its EHR nothing at all.
        assert h.mail(SPECIALIST) == [] and h.ehrs[SPECIALIST].received == []
        assert h.referral(SPECIALIST, referral_id) is None


# -- 5. an engine SIGKILLed mid-loop ------------------------------------------------------------


def deferred_from(h, identity):
    return [r for r in h.relay.records() if r.result == "deferred" and r.mail_from == identity.address]


def relayed(h, side, referral_id, kind):
    """What the relay did with the specialist's answer packet reporting *kind* (by its Message-ID)."""
    [row] = [r for r in packets(h, side, referral_id) if r["idempotency_key"].split("/")[-2] == kind]
    return [r.result for r in h.relay.records() if r.message_id == row["message_id"]]


def test_the_specialist_killed_mid_loop_restarts_and_the_loop_closes_with_nothing_twice(tmp_path, pki):
    with TwoEngines(tmp_path / "two", pki=pki) as h:
        ref = scenario.refer(h, REF_I12)
        # The accept is applied and its packet is on its way, held at the relay (451): then the crash.
        h.relay.hold(SPECIALIST_DOMAIN)
        scenario.answer(h, scenario.accept_message(ref))
        h.wait_for(lambda: h.state(SPECIALIST, ref.referral_id) == "ACCEPTED", 30, "the specialist ACCEPTED")
        h.wait_for(lambda: deferred_from(h, SPECIALIST_IDENTITY), 30, "the accept's packet held at the relay")
        h.kill(SPECIALIST)
        h.relay.release(SPECIALIST_DOMAIN)
        h.restart(SPECIALIST)
        scenario.wait_states(h, ref, referrer="ACCEPTED", specialist="ACCEPTED")
        # The booking ACKed by the specialist's engine, which is killed at once (its packet may or may not
        # have left): after the restart the referrer has it, once.
        scenario.answer(h, scenario.booking_message(ref, "APPT-1^^1.2.3.4^ISO", "20261203093000+0000"))
        h.kill(SPECIALIST)
        h.restart(SPECIALIST)
        scenario.wait_states(h, ref, referrer="SCHEDULED", specialist="SCHEDULED")
        scenario.consult_note(h, ref, "Echo normal.")
        scenario.settle(h)
        print(scenario.timelines(h, ref))
        assert h.engines[SPECIALIST].starts == 3
        # The held accept left again after the restart, as the same packet, and was delivered once.
        accept = relayed(h, SPECIALIST, ref.referral_id, "ACCEPTED")
        assert "deferred" in accept and accept.count("delivered") == 1 and set(accept) == {"deferred", "delivered"}
        # (The booking's packet may have left before the kill: were it sent again, the same Message-ID
        # would be applied once; the counts below are what must not grow.)
        assert "delivered" in relayed(h, SPECIALIST, ref.referral_id, "BOOKED")
        expected = ["SENT", "DELIVERED", "ACCEPTED", "BOOKED", "CONSULT_NOTE", "NOTE_FILED"]
        assert both_sides(h, ref.referral_id) == {REFERRER: expected, SPECIALIST: expected}
        # One packet per answer, one referral packet, one MDM^T02 in the referring chart.
        assert answer_kinds(h, ref.referral_id) == ["ACCEPTED", "BOOKED", "CONSULT_NOTE"]
        assert [r["kind"] for r in packets(h, REFERRER, ref.referral_id)] == ["referral"]
        mdm = received(h, REFERRER, "MDM^T02")
        assert len(mdm) == 1 and len({r.control_id for r in h.ehrs[REFERRER].received}) == \
            len(h.ehrs[REFERRER].received)
        assert [r.message_type.split("^")[:2] for r in h.ehrs[SPECIALIST].received] == [["REF", "I12"]]


def test_the_referrer_killed_while_the_note_is_held_at_the_relay_restarts_and_files_it_once(tmp_path, pki):
    with TwoEngines(tmp_path / "two", pki=pki) as h:
        ref = scenario.refer(h, REF_I12)
        scenario.accept(h, ref)
        scenario.book(h, ref, "APPT-1^^1.2.3.4^ISO", "20261203093000+0000")
        h.relay.hold(SPECIALIST_DOMAIN)
        scenario.answer(h, scenario.note_message(ref, "Echo normal.\nNo follow-up needed."))
        h.wait_for(lambda: h.state(SPECIALIST, ref.referral_id) == "SEEN", 30, "the specialist SEEN (note sent)")
        h.wait_for(lambda: deferred_from(h, SPECIALIST_IDENTITY), 30, "the note's packet held at the relay")
        h.kill(REFERRER)
        h.relay.release(SPECIALIST_DOMAIN)
        h.restart(REFERRER)
        scenario.wait_states(h, ref, referrer="CLOSED", specialist="CLOSED")
        scenario.settle(h)
        print(scenario.timelines(h, ref))
        expected = ["SENT", "DELIVERED", "ACCEPTED", "BOOKED", "CONSULT_NOTE", "NOTE_FILED"]
        assert both_sides(h, ref.referral_id) == {REFERRER: expected, SPECIALIST: expected}
        assert h.engines[REFERRER].starts == 2
        note = relayed(h, SPECIALIST, ref.referral_id, "CONSULT_NOTE")
        assert "deferred" in note and note.count("delivered") == 1 and set(note) == {"deferred", "delivered"}
        [mdm] = received(h, REFERRER, "MDM^T02")
        # The note in the referring chart is the one written (the Consultation Note, OBX-5 ED).
        assert b"No follow-up needed." in base64.b64decode(str(parse(mdm.payload).segment("OBX")(5)).split("^")[4])
        assert answer_kinds(h, ref.referral_id) == ["ACCEPTED", "BOOKED", "CONSULT_NOTE"]
        assert [r["kind"] for r in packets(h, REFERRER, ref.referral_id)] == ["referral"]
        assert [r["kind"] for r in h.outbox(REFERRER, referral_id=ref.referral_id, transport="mllp")] == \
            ["consult-note"]


# -- 6. a 360X OMG^O19, handed to the specialist's EHR by reference ------------------------------


def test_an_omg_o19_reaches_the_specialist_ehr_as_an_order_pointing_at_the_ccda_and_closes(tmp_path, pki):
    sample = (SAMPLES / "omg-o19.hl7").read_bytes()
    with TwoEngines(tmp_path / "two", pki=pki, specialist=specialist_spec(message="OMG^O19", cda="reference")) as h:
        ref = scenario.refer(h, sample)
        assert ref.referral_id == "990001@1.3.6.1.4.1.99999.1.15" and ref.ei == ref.placer_ei
        msg = parse(ref.forwarded)
        assert str(msg.segment("MSH")(9)).startswith("OMG^O19")
        orc = msg.segment("ORC")
        assert (str(orc(1)), str(orc(2))) == ("NW", "990001^^1.3.6.1.4.1.99999.1.15^ISO")
        # The C-CDA is not in the message: OBX-5 is an RP pointing at a file that holds it.
        [obx] = [s for s in msg if str(s[0]) == "OBX"]
        assert str(obx(2)) == "RP"
        pointer = msg.unescape(str(obx(5)(1)(1)))
        url = urllib.parse.urlparse(pointer)
        assert url.scheme == "file"
        document = Path(urllib.parse.unquote(url.path))
        assert document.is_file() and document.is_relative_to(h.engines[SPECIALIST].home)
        cda = document.read_bytes()
        assert b"ClinicalDocument" in cda and b"57133-1" in cda and b"990001" in cda
        scenario.accept(h, ref)
        scenario.book(h, ref, "APPT-9^^1.2.3.4^ISO", "20261203093000+0000")
        scenario.consult_note(h, ref, "Seen. Plan agreed.")
        scenario.settle(h)
        print(scenario.timelines(h, ref))
        expected = ["SENT", "DELIVERED", "ACCEPTED", "BOOKED", "CONSULT_NOTE", "NOTE_FILED"]
        assert both_sides(h, ref.referral_id) == {REFERRER: expected, SPECIALIST: expected}
        [mdm] = received(h, REFERRER, "MDM^T02")
        assert str(parse(mdm.payload).segment("TXA")(14)).split("~")[0] == ref.placer_ei
