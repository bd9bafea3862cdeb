"""Issue 7: the whole loop between two engine processes through a real SMTP relay on 127.0.0.1.

A REF^I12 entering the referring engine over MLLP ends CLOSED with the consult note delivered
to the referring EHR (its MLLP stand-in), and the specialist's copy ends CLOSED too; states
and timelines are checked on both sides.
"""

from __future__ import annotations

import base64
from pathlib import Path

import hl7
import pytest

from hl7referral.demo import scenario
from hl7referral.demo.harness import REFERRER, SPECIALIST, TwoEngines
from hl7referral.loop.states import timeline
from hl7referral.store.loop import Loop

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from hl7referral.demo.harness import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"))


def kinds(h, side, referral_id):
    return [s.kind for s in timeline(h.read(side, lambda s: Loop(s).events(referral_id)))]


def test_a_referral_closes_on_both_sides_and_the_note_reaches_the_referring_ehr(tmp_path, pki):
    with TwoEngines(tmp_path / "two", pki=pki) as h:
        ref = scenario.refer(h, (SAMPLES / "ref-i12.hl7").read_bytes())
        # The specialist's EHR got a REF^I12 with the referral id in RF1-6 and the C-CDA in OBX-5 (ED).
        msg = hl7.parse(ref.forwarded.decode("utf-8"))
        assert str(msg.segment("MSH")(9)).startswith("REF^I12")
        cda = base64.b64decode(str(msg.segment("OBX")(5)).split("^")[4])
        assert b"57133-1" in cda and b"ClinicalDocument" in cda
        assert h.referral(SPECIALIST, ref.referral_id)["side"] == "recipient"
        assert h.referral(SPECIALIST, ref.referral_id)["partner"] == "referrals@direct.sender.test"
        scenario.accept(h, ref)
        scenario.book(h, ref, "APPT-1^^1.2.3.4^ISO", "20261203093000+0000")
        scenario.consult_note(h, ref, "Echo normal.\nNo follow-up needed.")
        # The referring EHR got the note as MDM^T02 (referral id in TXA-14): the Consultation Note the
        # specialist's engine built from the text, as OBX-5 ED.
        mdm = [r for r in h.ehrs[REFERRER].received if r.message_type.startswith("MDM^T02")]
        assert len(mdm) == 1
        parsed = hl7.parse(mdm[0].payload.decode())
        assert str(parsed.segment("TXA")(14)).split("~")[0] == ref.ei
        note = base64.b64decode(str(parsed.segment("OBX")(5)).split("^")[4])
        assert b"2.16.840.1.113883.10.20.22.1.4" in note and b"Echo normal." in note
        # Timelines on both sides: the same business steps, each in its own store.
        steps = ["SENT", "DELIVERED", "ACCEPTED", "BOOKED", "CONSULT_NOTE", "NOTE_FILED"]
        for side in (REFERRER, SPECIALIST):
            assert [k for k in kinds(h, side, ref.referral_id) if k != "IMPLIED"] == steps, side
        # Nothing duplicated: one referral packet, one answer per event.
        packets = [r for r in h.outbox(REFERRER, referral_id=ref.referral_id) if r["kind"] == "referral"]
        assert len(packets) == 1
        answers = [r for r in h.outbox(SPECIALIST, referral_id=ref.referral_id) if r["transport"] == "direct"]
        assert sorted(r["kind"] for r in answers) == ["answer", "answer", "consult-note"]
        print(scenario.timelines(h, ref))
