"""The Direct agent between two practices: packets out, MDNs back, trust negatives in.

Two agents with their own stores — the referring clinic (referrals@direct.sender.test)
and the cardiology practice (cardiology@direct.receiver.test) — exchange real
signed and encrypted messages; only the SMTP hop is left out (the bytes are handed
over as the listener would store them). Time is a ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import shutil
import time
import subprocess
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from hl7referral.config.direct import DirectConfig
from hl7referral.direct import mdn as mdnlib
from hl7referral.engine.direct import DirectAgent, Enqueued, Skipped
from hl7referral.engine.smtp_client import SendResult
from hl7referral.store import Store
from hl7referral.store.outbox import Outbox

SENDER, RECEIVER = "referrals@direct.sender.test", "cardiology@direct.receiver.test"
START = float(int(time.time()))  # the example certificates are valid from yesterday
CDA = b'<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3"><title>Referral Note</title></ClinicalDocument>'
OPENSSL = shutil.which("openssl")


def make_agent(tmp_path: Path, pki: Path, name: str, address: str, stem: str, **kw) -> DirectAgent:
    store = Store.open(tmp_path / f"{name}.db")
    config = DirectConfig(address=address, certificate=pki / f"{stem}.pem", key=pki / f"{stem}.key",
                          chain=(pki / "intermediate.pem",), certificates_dir=pki,
                          crls=(pki / "intermediate.crl.pem",), anchors={"*": (pki / "anchor.pem",)}, **kw)
    agent = DirectAgent(config, Outbox(store))
    agent.load()
    return agent


@pytest.fixture
def clock():
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def clinic(tmp_path, direct_pki):
    a = make_agent(tmp_path, direct_pki, "clinic", SENDER, "sender")
    yield a
    a.outbox.store.close()


@pytest.fixture
def cardiology(tmp_path, direct_pki):
    deliver = tmp_path / "ehr-inbox"
    a = make_agent(tmp_path, direct_pki, "cardiology", RECEIVER, "receiver", deliver_dir=deliver)
    yield a
    a.outbox.store.close()


def hand_over(agent: DirectAgent, payload: bytes, sender: str, recipient: str, now: float):
    """What the SMTP listener does: commit the mail as received, then open it."""
    mail_id = agent.outbox.save_mail(mail_from=sender, rcpt_to=[recipient], raw=payload, message_id="", at="t")
    return agent.receive(agent.outbox.get_mail(mail_id), now), mail_id


def send_referral(clinic: DirectAgent, clock: Clock, referral_id: str = "REF-1") -> dict:
    result = clinic.enqueue_referral(referral_id=referral_id, document_id=None, channel="ref-i12", cda=CDA,
                                     order=None, patient_id="MRN1^^^&2.16.840.1.113883.19.5&ISO",
                                     recipient=RECEIVER, now=clock.seconds())
    assert isinstance(result, Enqueued) and result.created
    row = clinic.outbox.get(result.id)
    clinic.on_send_result(row, SendResult("delivered", 250, "2.0.0 queued"), clock.seconds())
    row = clinic.outbox.get(result.id)
    assert row["state"] == "SENT" and row["deadline"] == clock.seconds() + 3600
    return row


def mdns_from(agent: DirectAgent) -> dict[str, bytes]:
    return {r["kind"]: agent.outbox.get(r["id"])["payload"] for r in agent.outbox.list() if r["kind"].startswith("mdn")}


def state(agent: DirectAgent, outbox_id: int) -> str:
    return agent.outbox.get(outbox_id)["state"]


# -- the loop: referral out, processed and dispatched back ---------------------------------


def test_processed_and_dispatched(clinic, cardiology, clock, tmp_path):
    row = send_referral(clinic, clock)
    clock.advance(5)
    received, _ = hand_over(cardiology, row["payload"], SENDER, RECEIVER, clock.seconds())
    assert (received.kind, received.status) == ("direct", "delivered")
    delivered = sorted(p.name for p in (tmp_path / "ehr-inbox").rglob("*") if p.is_file())
    assert "DOC0001.XML" in delivered and (tmp_path / "ehr-inbox").rglob("DOC0001.XML")
    assert next((tmp_path / "ehr-inbox").rglob("DOC0001.XML")).read_bytes() == CDA
    mdns = mdns_from(cardiology)
    assert set(mdns) == {"mdn-processed", "mdn-dispatched"}
    r1, _ = hand_over(clinic, mdns["mdn-processed"], RECEIVER, SENDER, clock.seconds())
    assert r1.status == "mdn-matched" and state(clinic, row["id"]) == "MDN_PROCESSED"
    r2, _ = hand_over(clinic, mdns["mdn-dispatched"], RECEIVER, SENDER, clock.seconds())
    assert r2.status == "mdn-matched" and state(clinic, row["id"]) == "MDN_DISPATCHED"
    clock.advance(3 * 3600)
    assert clinic.check_timeouts(clock.seconds()) == []
    events = [e["event"] for e in clinic.outbox.events(outbox_id=row["id"])]
    assert events == ["queued", "send_ok", "mdn_processed", "mdn-matched", "mdn_dispatched", "mdn-matched"]


def test_processed_only_without_final_delivery_stays_processed(tmp_path, direct_pki, cardiology, clock):
    clinic = make_agent(tmp_path, direct_pki, "clinic-nofinal", SENDER, "sender", request_final_delivery=False)
    row = send_referral(clinic, clock)
    hand_over(cardiology, row["payload"], SENDER, RECEIVER, clock.seconds())
    mdns = mdns_from(cardiology)
    assert set(mdns) == {"mdn-processed"}  # not asked for timely and reliable: no dispatched MDN
    hand_over(clinic, mdns["mdn-processed"], RECEIVER, SENDER, clock.seconds())
    clock.advance(10 * 3600)
    assert clinic.check_timeouts(clock.seconds()) == []
    assert state(clinic, row["id"]) == "MDN_PROCESSED"


def test_processed_without_dispatched_times_out_and_falls_back(tmp_path, direct_pki, clinic, clock):
    # The specialist's engine has no onward delivery: processed MDN only, though dispatched was asked for.
    plain = make_agent(tmp_path, direct_pki, "cardiology-plain", RECEIVER, "receiver")
    row = send_referral(clinic, clock)
    hand_over(plain, row["payload"], SENDER, RECEIVER, clock.seconds())
    hand_over(clinic, mdns_from(plain)["mdn-processed"], RECEIVER, SENDER, clock.seconds())
    clock.advance(3599)
    assert clinic.check_timeouts(clock.seconds()) == []
    clock.advance(2)
    assert clinic.check_timeouts(clock.seconds()) == [row["id"]]
    assert state(clinic, row["id"]) == "TIMED_OUT"
    fax = clinic.outbox.list(referral_id="REF-1")
    assert [(r["transport"], r["state"]) for r in fax if r["transport"] == "fax"] == [("fax", "QUEUED")]
    assert any(a["kind"] == "direct-timed_out" and a["referral_id"] == "REF-1"
               for a in clinic.outbox.store.list_alerts())


def test_no_mdn_times_out_at_the_deadline(clinic, clock):
    row = send_referral(clinic, clock)
    clock.advance(3600 - 1)
    assert clinic.check_timeouts(clock.seconds()) == []
    clock.advance(1)
    assert clinic.check_timeouts(clock.seconds()) == [row["id"]]
    assert state(clinic, row["id"]) == "TIMED_OUT"
    assert [r["transport"] for r in clinic.outbox.list(referral_id="REF-1")].count("fax") == 1
    clock.advance(3600)
    assert clinic.check_timeouts(clock.seconds()) == []  # once only


def test_failed_mdn_fails_and_falls_back(clinic, cardiology, clock):
    row = send_referral(clinic, clock)
    from email.parser import BytesHeaderParser
    original = BytesHeaderParser().parsebytes(row["payload"])
    cardiology.queue_mdn(original, "failed", clock.seconds(), mail_id=0, failure="recipient mailbox unknown")
    hand_over(clinic, mdns_from(cardiology)["mdn-failed"], RECEIVER, SENDER, clock.seconds())
    assert state(clinic, row["id"]) == "FAILED"
    assert any(r["transport"] == "fax" for r in clinic.outbox.list(referral_id="REF-1"))
    assert "recipient mailbox unknown" in clinic.outbox.events(outbox_id=row["id"])[-1]["detail"]


def test_duplicate_mdn_changes_nothing(clinic, cardiology, clock):
    row = send_referral(clinic, clock)
    hand_over(cardiology, row["payload"], SENDER, RECEIVER, clock.seconds())
    processed = mdns_from(cardiology)["mdn-processed"]
    assert hand_over(clinic, processed, RECEIVER, SENDER, clock.seconds())[0].status == "mdn-matched"
    before = clinic.outbox.get(row["id"])
    second, mail_id = hand_over(clinic, processed, RECEIVER, SENDER, clock.seconds() + 60)
    assert second.status == "mdn-duplicate"
    after = clinic.outbox.get(row["id"])
    assert (after["state"], after["processed_at"], after["deadline"]) == \
        (before["state"], before["processed_at"], before["deadline"])
    assert clinic.outbox.get_mail(mail_id)["status"] == "mdn-duplicate"


def test_mdn_for_unknown_message_id(clinic, cardiology, clock):
    row = send_referral(clinic, clock)
    fake = {"From": SENDER, "To": RECEIVER, "Message-ID": "<never-sent@direct.sender.test>"}
    cardiology.queue_mdn(fake, "processed", clock.seconds(), mail_id=0)
    result, mail_id = hand_over(clinic, mdns_from(cardiology)["mdn-processed"], RECEIVER, SENDER, clock.seconds())
    assert result.status == "mdn-unmatched"
    assert state(clinic, row["id"]) == "SENT"
    assert clinic.outbox.get_mail(mail_id)["original_message_id"] == "<never-sent@direct.sender.test>"


def test_no_certificate_means_no_direct_send(clinic, clock):
    result = clinic.enqueue_referral(referral_id="REF-2", document_id=None, channel="c", cda=CDA, order=None,
                                     patient_id="", recipient="intake@gi.example.org", now=clock.seconds())
    assert isinstance(result, Skipped) and "no usable certificate" in result.reason
    assert clinic.outbox.list(referral_id="REF-2") == []


def test_retry_then_give_up(tmp_path, direct_pki, clock):
    clinic = make_agent(tmp_path, direct_pki, "clinic-retry", SENDER, "sender", max_attempts=3, first_delay=60)
    result = clinic.enqueue_referral(referral_id="REF-3", document_id=None, channel="c", cda=CDA, order=None,
                                     patient_id="MRN3^^^&2.16.840.1.113883.19.5&ISO", recipient=RECEIVER,
                                     now=clock.seconds())
    delays = []
    for _ in range(3):
        row = clinic.outbox.get(result.id)
        clinic.on_send_result(row, SendResult("retry", 451, "4.3.0 try later"), clock.seconds())
        after = clinic.outbox.get(result.id)
        delays.append(None if after["state"] == "FAILED" else after["next_attempt_at"] - clock.seconds())
    assert delays == [60, 120, None]
    assert "gave up after 3 attempts" in clinic.outbox.events(outbox_id=result.id)[-1]["detail"]
    assert clinic.outbox.get(result.id)["message_id"] == row["message_id"]  # the same Message-ID throughout


# -- trust negatives, audited ------------------------------------------------------------------


def openssl_message(pki: Path, tmp_path: Path, signer: str, *, md: str = "sha256", tamper: bool = False,
                    sender: str = SENDER) -> bytes:
    inner = tmp_path / "inner.eml"
    inner.write_bytes(b"Content-Type: text/plain\r\n\r\nReferral for REF-9: please see attached.\r\n")
    signed = tmp_path / "signed.eml"
    subprocess.run([OPENSSL, "cms", "-sign", "-in", str(inner), "-signer", str(pki / f"{signer}.pem"),
                    "-inkey", str(pki / f"{signer}.key"), "-certfile", str(pki / "intermediate.pem"),
                    "-md", md, "-binary", "-out", str(signed)], check=True, capture_output=True)
    if tamper:
        signed.write_bytes(signed.read_bytes().replace(b"REF-9", b"REF-8", 1))
    out = tmp_path / "msg.eml"
    subprocess.run([OPENSSL, "cms", "-encrypt", "-in", str(signed), "-aes256", "-binary", "-from", sender,
                    "-to", RECEIVER, "-subject", "Referral", "-out", str(out), str(pki / "receiver.pem")],
                   check=True, capture_output=True)
    # openssl writes To/From/Subject only; a Direct message also has a Message-ID (MDNs name it).
    return b"Message-ID: <openssl-1@direct.sender.test>\r\n" + out.read_bytes()


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("signer, options, code", [
    ("sender", {}, None),
    ("sender", {"tamper": True}, "digest-mismatch"),
    ("expired", {}, "expired"),
    ("revoked", {}, "revoked"),
    ("rogue", {}, "unknown-anchor"),
    ("sender", {"md": "sha1"}, "weak-digest"),
    ("small", {}, "weak-key"),
    ("unbound", {}, "not-bound"),
    ("sender", {"sender": "someone@direct.sender.test"}, "not-bound"),
])
def test_trust_negatives_are_refused_and_audited(cardiology, direct_pki, tmp_path, clock, signer, options, code):
    message = openssl_message(direct_pki, tmp_path, signer, **options)
    result, mail_id = hand_over(cardiology, message, options.get("sender", SENDER), RECEIVER, clock.seconds())
    mail = cardiology.outbox.get_mail(mail_id)
    if code is None:
        assert result.status == "stored" and mail["status"] == "stored"  # text only: nothing to deliver onward
        assert set(mdns_from(cardiology)) == {"mdn-processed"}
        return
    assert (result.kind, mail["status"], mail["trust"]) == ("rejected", "rejected", code)
    audit = cardiology.outbox.events(mail_id=mail_id)
    assert audit[-1]["event"] == "mail-rejected" and audit[-1]["detail"].startswith(code + ":")
    assert mail["raw"] == message  # kept as received
    assert mdns_from(cardiology) == {}  # no processed MDN for what we could not trust


def test_built_mdns_are_signed_encrypted_and_pass_ett_checks(clinic, cardiology, clock, direct_pki, tmp_path):
    row = send_referral(clinic, clock)
    hand_over(cardiology, row["payload"], SENDER, RECEIVER, clock.seconds())
    for kind, payload in mdns_from(cardiology).items():
        head = payload.split(b"\r\n\r\n", 1)[0].decode()
        assert "application/pkcs7-mime" in head and "Disposition-Notification-To" not in head  # DTS 450, 452
        if OPENSSL:
            eml = tmp_path / f"{kind}.eml"
            eml.write_bytes(payload)
            dec = subprocess.run([OPENSSL, "cms", "-decrypt", "-in", str(eml), "-recip", str(direct_pki / "sender.pem"),
                                  "-inkey", str(direct_pki / "sender.key")], capture_output=True, check=True).stdout
            ver = subprocess.run([OPENSSL, "cms", "-verify", "-CAfile", str(direct_pki / "anchor.pem")],
                                 input=dec, capture_output=True)
            assert ver.returncode == 0, ver.stderr
            report = mdnlib.parse_mdn(ver.stdout)
            assert report.original_message_id == row["message_id"]
            assert report.disposition == kind.removeprefix("mdn-")
