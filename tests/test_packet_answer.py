"""hl7referral.direct.packet, the answer side: a 360X answer as a Direct message, opened as the referrer would.

The cardiology practice (receiver.pem) answers the referring clinic (sender.pem). The message is
opened with the openssl CLI (decrypt as the clinic, verify against the anchor: the independent
oracle), the XDM inside is read with ``read_xdm``, and the decrypted content goes through the
referring engine's own unpacking (``engine.direct._attachments``) and reading
(``loop.reread.read_documents``), which must give the answer's loop event, for the right
referral, with the Consultation Note as its note. Synthetic data only.
"""

from __future__ import annotations

import email
import email.policy
import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hl7referral.cda.consult_note import ConsultInput, build_consultation_note, to_bytes
from hl7referral.cda.model import Identifier, Name, Patient
from hl7referral.direct import packet
from hl7referral.direct.xdm import V2_MIME_TYPE, read_xdm
from hl7referral.engine.direct import _attachments
from hl7referral.loop.correlate import REFERRAL
from hl7referral.loop.reread import read_documents
from hl7referral.loop.states import Kind
from hl7referral.v2 import answers

SPECIALIST, REFERRER = "cardiology@direct.receiver.test", "referrals@direct.sender.test"
REFERRAL_EI = "990001^^1.3.6.1.4.1.99999.1.15^ISO"
REFERRAL_ID = "990001@1.3.6.1.4.1.99999.1.15"
PATIENT_CX = "SMRN0004^^^&1.3.6.1.4.1.99999.1.5&ISO"
DATE = 1_795_100_000.0
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not on PATH: it is the independent oracle")


class Identity:
    def __init__(self, pki: Path, name: str):
        self.pem, self.key_file = pki / f"{name}.pem", pki / f"{name}.key"
        self.cert = x509.load_pem_x509_certificate(self.pem.read_bytes())
        self.key = serialization.load_pem_private_key(self.key_file.read_bytes(), None)


def osu(control: str, status: str, control_id: str) -> bytes:
    return answers.build_osu_o51(order_control=control, order_status=status, referral_ei=REFERRAL_EI,
                                 control_id=control_id, now_hl7="20261123100000+0000",
                                 sending=("HL7REFERRAL", "^1.3.6.1.4.1.99999.2^ISO"), receiving=("", ""))


@pytest.fixture(scope="module")
def consult_note() -> bytes:
    return to_bytes(build_consultation_note(ConsultInput(
        text="Seen for chest pain.\nPlan: stress echo.", title="Cardiology consultation",
        effective_time="20261123093000+0000",
        referral_id=Identifier("1.3.6.1.4.1.99999.1.15", "990001"),
        patient=Patient(ids=[Identifier("1.3.6.1.4.1.99999.1.5", "SMRN0004")], names=[Name("Sample", ["Drew"])]))))


@pytest.fixture(scope="module")
def seal(direct_pki):
    specialist, intermediate = Identity(direct_pki, "receiver"), x509.load_pem_x509_certificate(
        (direct_pki / "intermediate.pem").read_bytes())
    referrer = Identity(direct_pki, "sender")

    def make(content: packet.AnswerContent, **kw) -> bytes:
        return packet.answer_message(
            content, sender=SPECIALIST, recipient=REFERRER,
            message_id=packet.message_id_for(f"relay/{content.key}", "direct.receiver.test"), date=DATE,
            signer=specialist.cert, key=specialist.key, chain=[intermediate], recipient_certs=[referrer.cert], **kw)
    return make


def note_answer(consult_note: bytes) -> packet.AnswerContent:
    return packet.AnswerContent(referral_id=REFERRAL_ID, created="20261123100000", patient_id=PATIENT_CX,
                                message=osu("SC", "CM", "HRA1-SCCM"), cda=consult_note, title="Consultation note",
                                key=f"{REFERRAL_ID}/CONSULT_NOTE/abc")


def openssl_open(eml: bytes, pki: Path) -> bytes:
    """Decrypt as the referring clinic, verify against the anchor: the signed content."""
    dec = subprocess.run([OPENSSL, "cms", "-decrypt", "-recip", str(pki / "sender.pem"), "-inkey",
                          str(pki / "sender.key"), "-binary"], input=eml, capture_output=True, timeout=60)
    assert dec.returncode == 0, dec.stderr.decode()
    ver = subprocess.run([OPENSSL, "cms", "-verify", "-CAfile", str(pki / "anchor.pem")], input=dec.stdout,
                         capture_output=True, timeout=60)
    assert ver.returncode == 0 and b"Verification successful" in ver.stderr, ver.stderr.decode()
    return ver.stdout


def parts_of(content: bytes) -> list:
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/mixed"
    return msg.get_payload()


def zip_bytes(parts) -> bytes:
    (z,) = [p for p in parts if p.get_content_type() == "application/zip"]
    assert z.get_filename() == "answer.zip"
    return z.get_payload(decode=True)


# -- the message ------------------------------------------------------------------------------------

@needs_openssl
def test_a_note_answer_opens_with_openssl_and_holds_the_osu_and_the_consultation_note(
        seal, direct_pki, consult_note):
    content = note_answer(consult_note)
    eml = seal(content)
    head = eml.split(b"\r\n\r\n", 1)[0].decode("ascii")   # ASCII headers (ETT DTS 196)
    headers = email.message_from_string(head + "\r\n\r\n")
    assert (headers["From"], headers["To"]) == (SPECIALIST, REFERRER)
    assert headers["Subject"] == f"Referral {REFERRAL_ID}: Consultation note"   # ids only, no patient data
    assert headers["Message-ID"] == packet.message_id_for(f"relay/{content.key}", "direct.receiver.test")
    assert "Disposition-Notification-Options" not in headers   # not asked for
    assert "application/pkcs7-mime" in headers["Content-Type"]

    signed = openssl_open(eml, direct_pki)
    parts = parts_of(signed)
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/zip", "application/xml"]
    text = parts[0].get_payload(decode=True).decode("ascii")
    assert REFERRAL_ID in text and "SMRN0004" not in text and "Sample" not in text
    assert parts[2].get_filename() == "consultation-note.xml"
    assert parts[2].get_payload(decode=True) == consult_note

    package = read_xdm(zip_bytes(parts), strict=True)   # hashes and sizes must match too
    assert package.warnings == []
    by_type = {d.mime_type: d for d in package.documents}
    assert set(by_type) == {V2_MIME_TYPE, "text/xml"}
    assert by_type[V2_MIME_TYPE].content == content.message
    cda = by_type["text/xml"]
    assert cda.content == consult_note
    assert (cda.type_code.code, cda.class_code.code, cda.format_code.code) == (
        "11488-4", "11488-4", "urn:hl7-org:sdwg:ccda-structuredBody:2.1")
    assert package.submission.patient_id == PATIENT_CX
    assert package.submission.intended_recipients == [REFERRER]


@needs_openssl
def test_the_referring_engine_reads_it_as_the_consult_note_of_its_referral(seal, direct_pki, consult_note):
    signed = openssl_open(seal(note_answer(consult_note)), direct_pki)
    obs = read_documents(_attachments(signed))
    assert obs is not None and obs.problems == (), obs.problems
    assert [e.kind for e in obs.events] == [Kind.CONSULT_NOTE]
    assert (REFERRAL, REFERRAL_ID) in obs.keys
    assert obs.note is not None and (obs.note.format, obs.note.content) == ("cda", consult_note)


@needs_openssl
@pytest.mark.parametrize("control, status, kind", [("OK", "IP", Kind.ACCEPTED), ("UA", "CA", Kind.DECLINED),
                                                   ("CR", "CA", Kind.CANCEL_CONFIRMED)])
def test_a_status_answer_carries_the_v2_message_alone(seal, direct_pki, control, status, kind):
    message = osu(control, status, f"HRA1-{control}{status}")
    content = packet.AnswerContent(referral_id=REFERRAL_ID, created="20261123100000", patient_id=PATIENT_CX,
                                   message=message, title="Referral status", key=f"{REFERRAL_ID}/{kind.value}/1")
    signed = openssl_open(seal(content), direct_pki)
    parts = parts_of(signed)
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/zip"]
    package = read_xdm(zip_bytes(parts), strict=True)
    assert [(d.mime_type, d.content) for d in package.documents] == [(V2_MIME_TYPE, message)]
    obs = read_documents(_attachments(signed))
    assert [e.kind for e in obs.events] == [kind] and (REFERRAL, REFERRAL_ID) in obs.keys
    assert obs.note is None and obs.problems == ()


@needs_openssl
def test_a_consultation_note_alone_is_read_as_the_consult_note(seal, direct_pki, consult_note):
    content = packet.AnswerContent(referral_id=REFERRAL_ID, created="20261123100000", patient_id=PATIENT_CX,
                                   cda=consult_note, title="Consultation note", key=f"{REFERRAL_ID}/CONSULT_NOTE/2")
    signed = openssl_open(seal(content), direct_pki)
    package = read_xdm(zip_bytes(parts_of(signed)), strict=True)
    assert [d.content for d in package.documents] == [consult_note]
    obs = read_documents(_attachments(signed))
    assert obs.problems == () and obs.note.content == consult_note
    assert [(e.kind, e.at) for e in obs.events] == [(Kind.CONSULT_NOTE, "2026-11-23T09:30:00Z")]
    assert (REFERRAL, REFERRAL_ID) in obs.keys


@needs_openssl
def test_only_the_referrer_can_open_it(seal, direct_pki, consult_note):
    eml = seal(note_answer(consult_note))
    done = subprocess.run([OPENSSL, "cms", "-decrypt", "-recip", str(direct_pki / "receiver.pem"), "-inkey",
                           str(direct_pki / "receiver.key")], input=eml, capture_output=True, timeout=60)
    assert done.returncode != 0


# -- deterministic ---------------------------------------------------------------------------------

def test_the_same_answer_packs_to_the_same_xdm_and_another_key_to_other_ids(consult_note):
    content = note_answer(consult_note)
    one = packet.build_xdm_answer(content, SPECIALIST, REFERRER)
    assert one == packet.build_xdm_answer(content, SPECIALIST, REFERRER)
    assert packet.answer_content(content, SPECIALIST, REFERRER, "<m@x>") == \
        packet.answer_content(content, SPECIALIST, REFERRER, "<m@x>")
    other = packet.build_xdm_answer(packet.AnswerContent(**{**content.__dict__, "key": "another"}), SPECIALIST,
                                    REFERRER)
    ids = {d.unique_id for d in read_xdm(one).documents} | {read_xdm(one).submission.unique_id}
    other_ids = {d.unique_id for d in read_xdm(other).documents} | {read_xdm(other).submission.unique_id}
    assert len(ids) == 3 and ids.isdisjoint(other_ids)
    with zipfile.ZipFile(io.BytesIO(one)) as z:
        assert "IHE_XDM/SUBSET01/METADATA.XML" in z.namelist()
