"""Two engines close the loop through a real mail relay (issue 7).

A referring engine and a specialist engine run as real processes, each with its own store,
configuration and Direct identity; a local SMTP relay (aiosmtpd) carries their mail; the
referral comes in over real TCP from python-hl7's MLLP client (``hl7referral.demo``). What is
checked is what a user would look at: the referral's state on the referring side, the mail
the specialist received and trusted, what went through the relay, and that a crash of the
specialist between receiving a referral and answering it loses and duplicates nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hl7referral.demo import REFERRER, SPECIALIST, TwoEngines, scenario
from hl7referral.send import read_messages

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = read_messages(ROOT / "samples" / "ref-i12.hl7")[0]
REF1, REF2 = "SAMPLEREF0001", "SAMPLEREF0002"
REFERRER_ADDRESS, SPECIALIST_ADDRESS = "referrals@direct.sender.test", "cardiology@direct.receiver.test"

pytestmark = pytest.mark.timeout(60)


def second_referral() -> bytes:
    """The sample with its own control id and referral id (RF1-6)."""
    message = SAMPLE.replace(b"|REFSAMPLE1|", b"|REFSAMPLE2|").replace(b"|SAMPLEREF0001|", b"|SAMPLEREF0002|")
    assert message.count(b"REFSAMPLE2") == 1 and message.count(b"SAMPLEREF0002") == 1
    return message


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def delivered(h: TwoEngines, referral_id: str) -> bool:
    """The referrer recorded the receipt, and the specialist's EHR took the referral (its packet has
    the dispatched MDN: final delivery)."""
    return "DELIVERED" in [e["kind"] for e in h.loop_events(REFERRER, referral_id)] and \
        [r["state"] for r in h.outbox(REFERRER, referral_id=referral_id)] == ["MDN_DISPATCHED"]


def test_a_referral_goes_through_the_relay_and_its_processed_mdn_comes_back(tmp_path, direct_pki):
    with TwoEngines(tmp_path / "two", pki=direct_pki) as h:
        ack = h.send(REFERRER, SAMPLE)
        assert (ack.code, ack.control_id) == ("AA", "REFSAMPLE1")

        h.wait_for(lambda: delivered(h, REF1), 30, f"the receipt of {REF1} on the referrer")
        scenario.settle(h, timeout=10)

        # The referring side: the referral is DELIVERED (once, though two MDNs prove it); one packet went
        # to the specialist engine's address; its processed MDN came back, trusted and matched, and,
        # once the specialist's EHR had ACKed the REF^I12, the dispatched MDN (final delivery).
        assert h.state(REFERRER, REF1) == "DELIVERED"
        assert [e["kind"] for e in h.loop_events(REFERRER, REF1)] == ["SENT", "DELIVERED"]
        [packet] = h.outbox(REFERRER, referral_id=REF1)
        assert (packet["transport"], packet["recipient"], packet["state"]) == \
            ("direct", SPECIALIST_ADDRESS, "MDN_DISPATCHED")
        assert [r.message_type for r in h.ehrs[SPECIALIST].received] == ["REF^I12^REF_I12"]
        [dispatched] = [r for r in h.outbox(SPECIALIST) if r["kind"] == "mdn-dispatched"]
        assert dispatched["recipient"] == REFERRER_ADDRESS
        [mdn_out] = [r for r in h.outbox(SPECIALIST) if r["kind"] == "mdn-processed"]
        [mdn_in] = [m for m in h.mail(REFERRER) if m["message_id"] == mdn_out["message_id"]]
        # Processed and dispatched leave in the same tick: whichever arrives second is audited as a
        # duplicate receipt (tracking table), never applied twice.
        assert (mdn_in["kind"], mdn_in["from_address"], mdn_in["original_message_id"]) == \
            ("mdn", SPECIALIST_ADDRESS, packet["message_id"])
        assert mdn_in["status"] in ("mdn-matched", "mdn-duplicate")
        assert mdn_in["trust"] == "trusted (address-bound)"

        # The specialist side: the Direct mail from the referrer's address, trusted.
        [mail] = [m for m in h.mail(SPECIALIST) if m["message_id"] == packet["message_id"]]
        assert (mail["kind"], mail["from_address"], mail["trust"]) == \
            ("direct", REFERRER_ADDRESS, "trusted (address-bound)")

        # The relay carried the packet and the MDN, each delivered once, bytes unchanged end to end.
        records = h.relay.records()
        [relayed_packet] = [r for r in records if r.message_id == packet["message_id"]]
        [relayed_mdn] = [r for r in records if r.message_id == mdn_out["message_id"]]
        assert (relayed_packet.mail_from, relayed_packet.rcpt_to, relayed_packet.destination, relayed_packet.result) \
            == (REFERRER_ADDRESS, (SPECIALIST_ADDRESS,), SPECIALIST, "delivered")
        assert (relayed_mdn.mail_from, relayed_mdn.rcpt_to, relayed_mdn.destination, relayed_mdn.result) == \
            (SPECIALIST_ADDRESS, (REFERRER_ADDRESS,), REFERRER, "delivered")
        assert relayed_mdn.in_reply_to == packet["message_id"]
        assert sha256(h.outbox_row(REFERRER, packet["id"])["payload"]) == relayed_packet.sha256 == \
            h.mail_row(SPECIALIST, mail["id"])["raw_sha256"]
        assert sha256(h.outbox_row(SPECIALIST, mdn_out["id"])["payload"]) == relayed_mdn.sha256 == \
            h.mail_row(REFERRER, mdn_in["id"])["raw_sha256"]


def test_a_specialist_killed_before_its_mdn_leaves_answers_once_after_restart(tmp_path):
    # No pki=: the harness makes the example PKI itself (certs-example/make_certs.py) in its work directory.
    with TwoEngines(tmp_path / "two") as h:
        specialist_domain = SPECIALIST_ADDRESS.rpartition("@")[2]
        h.relay.hold(specialist_domain)   # the specialist's mail gets 451 at the relay: its MDN stays with it
        assert h.send(REFERRER, second_referral()).code == "AA"

        h.relay.wait_for(lambda rs: any(r.mail_from == SPECIALIST_ADDRESS and r.result == "deferred" for r in rs),
                         30)
        h.kill(SPECIALIST)               # SIGKILL with the packet stored and its MDN not yet gone
        assert h.state(REFERRER, REF2) == "SENT"
        h.relay.release(specialist_domain)
        h.restart(SPECIALIST)            # same ports, same store

        h.wait_for(lambda: delivered(h, REF2), 30, f"the receipt of {REF2} on the referrer")
        scenario.settle(h, timeout=10)
        assert h.state(REFERRER, REF2) == "DELIVERED"
        assert [e["kind"] for e in h.loop_events(REFERRER, REF2)] == ["SENT", "DELIVERED"]

        # Exactly one packet and one processed MDN went through the relay.
        [packet] = h.outbox(REFERRER, referral_id=REF2)
        [mdn_out] = [r for r in h.outbox(SPECIALIST) if r["kind"] == "mdn-processed"]
        records = h.relay.records()
        assert [(r.destination, r.result) for r in records if r.message_id == packet["message_id"]] == \
            [(SPECIALIST, "delivered")]
        mdn_tries = [r for r in records if r.message_id == mdn_out["message_id"]]
        assert [r.result for r in mdn_tries if r.result != "deferred"] == ["delivered"]
        # Every try of the MDN, before and after the crash, was the same message byte for byte.
        payload = sha256(h.outbox_row(SPECIALIST, mdn_out["id"])["payload"])
        assert {r.sha256 for r in mdn_tries} == {payload}
        assert mdn_out["state"] == "SENT" and mdn_out["recipient"] == REFERRER_ADDRESS

        # One mail at the specialist (the packet, read once, handed to its EHR once); at the referrer the
        # processed MDN and, after the specialist's EHR took the referral, the dispatched one.
        assert [(m["message_id"], m["trust"]) for m in h.mail(SPECIALIST)] == \
            [(packet["message_id"], "trusted (address-bound)")]
        assert [r.message_type for r in h.ehrs[SPECIALIST].received] == ["REF^I12^REF_I12"]
        [dispatched] = [r for r in h.outbox(SPECIALIST) if r["kind"] == "mdn-dispatched"]
        mdns = {m["message_id"]: (m["status"], m["original_message_id"]) for m in h.mail(REFERRER)
                if m["kind"] == "mdn"}
        assert set(mdns) == {mdn_out["message_id"], dispatched["message_id"]}
        assert {original for _, original in mdns.values()} == {packet["message_id"]}
        assert mdns[dispatched["message_id"]][0] == "mdn-matched"
        assert mdns[mdn_out["message_id"]][0] in ("mdn-matched", "mdn-duplicate")
        assert packet["state"] == "MDN_DISPATCHED"
