"""hl7referral.direct.packet: the referral packet as a Direct message, checked as a receiver or ETT would.

The message built for a real C-CDA (the HL7 C-CDA example Referral Note) and a real OMG^O19 order is
opened with the openssl CLI (the independent oracle: decrypt as the receiver, verify against the
anchor), and its shape is checked with Python's email parser and asn1crypto, not with the module
under test. Reference: /work/shared/reference/direct.md sections 3 and 7 (ONC ETT checks).
"""

from __future__ import annotations

import base64
import email
import hashlib
import email.policy
import io
import re
import shutil
import subprocess
import zipfile
from email.message import Message
from pathlib import Path

import pytest
from asn1crypto import cms as a_cms
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from lxml import etree

from hl7referral.direct import packet
from hl7referral.direct.xdm import V2_MIME_TYPE
from hl7referral.send import read_messages

REPO = Path(__file__).resolve().parents[1]
CCDA_EXAMPLE = Path("/work/shared/standards/examples/C-CDA-Examples/Referral_Note.xml")
ORDER_SAMPLE = REPO / "samples" / "omg-o19.hl7"
SENDER = "referrals@direct.sender.test"
RECIPIENT = "cardiology@direct.receiver.test"
REFERRAL_ID = "990001@1.3.6.1.4.1.99999.1.15"
PATIENT_CX = "PT-55501^^^&2.16.840.1.113883.19.5&ISO"
DATE = 1_795_000_000.0  # a fixed send time (2026-11-18)
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not on PATH: it is the independent oracle")
XDM_NS = {"rim": "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"}


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ccda() -> bytes:
    if not CCDA_EXAMPLE.is_file():
        pytest.skip(f"C-CDA example not found at {CCDA_EXAMPLE}")
    return CCDA_EXAMPLE.read_bytes()


@pytest.fixture(scope="module")
def order() -> bytes:
    return read_messages(ORDER_SAMPLE)[0]


class Identity:
    def __init__(self, pki: Path, name: str):
        self.pem = pki / f"{name}.pem"
        self.key_file = pki / f"{name}.key"
        self.cert = x509.load_pem_x509_certificate(self.pem.read_bytes())
        self.key = serialization.load_pem_private_key(self.key_file.read_bytes(), None)


@pytest.fixture(scope="module")
def pki(direct_pki) -> Path:
    return direct_pki


@pytest.fixture(scope="module")
def sender(pki) -> Identity:
    return Identity(pki, "sender")


@pytest.fixture(scope="module")
def receiver(pki) -> Identity:
    return Identity(pki, "receiver")


@pytest.fixture(scope="module")
def intermediate(pki) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki / "intermediate.pem").read_bytes())


@pytest.fixture(scope="module")
def build(ccda, order, sender, receiver, intermediate):
    def make(*, include_bare_cda=True, final_delivery=True, wrapped=False, with_order=True,
             message_id=None) -> bytes:
        content = packet.PacketContent(referral_id=REFERRAL_ID, cda=ccda, created="20261118093000",
                                       patient_id=PATIENT_CX, order=order if with_order else None,
                                       include_bare_cda=include_bare_cda)
        return packet.referral_message(
            content, sender=SENDER, recipient=RECIPIENT,
            message_id=message_id or packet.message_id_for(f"{REFERRAL_ID}/direct/1", "direct.sender.test"),
            date=DATE, signer=sender.cert, key=sender.key, chain=[intermediate], recipient_certs=[receiver.cert],
            final_delivery=final_delivery, wrapped=wrapped)
    return make


@pytest.fixture(scope="module")
def message(build) -> bytes:
    return build()


def openssl(*args: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, *args], input=data, capture_output=True, timeout=60)


def decrypt(eml: bytes, receiver: Identity) -> bytes:
    """The decrypted entity (the multipart/signed), as openssl gives it."""
    done = openssl("cms", "-decrypt", "-recip", str(receiver.pem), "-inkey", str(receiver.key_file),
                   "-binary", data=eml)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def verify(signed: bytes, pki: Path) -> bytes:
    """The signed content, after openssl has verified the signature and the path to the anchor."""
    # No -binary here: openssl's multipart/signed reader needs to canonicalise the part it re-reads.
    done = openssl("cms", "-verify", "-CAfile", str(pki / "anchor.pem"), data=signed)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Verification successful" in done.stderr
    return done.stdout


def head_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


def raw_headers(data: bytes) -> list[tuple[str, str]]:
    """(name, raw value) of the header block, unfolded, without the email module's decoding."""
    out: list[tuple[str, str]] = []
    for line in head_of(data).split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = out[-1]
            out[-1] = (name, value + " " + line.strip().decode("latin-1"))
        else:
            name, _, value = line.partition(b":")
            out.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return out


def parts_of(content: bytes) -> list[Message]:
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/mixed"
    return msg.get_payload()


def zip_of(parts: list[Message]) -> zipfile.ZipFile:
    zips = [p for p in parts if p.get_content_type() == "application/zip"]
    assert len(zips) == 1
    assert zips[0].get_filename().endswith(".zip")
    return zipfile.ZipFile(io.BytesIO(zips[0].get_payload(decode=True)))


# --- outer headers (DTS 133a, 196, 201, 202, 203) -----------------------------------------------

def test_outer_headers(message):
    headers = dict(raw_headers(message))
    assert headers["From"] == SENDER
    assert headers["To"] == RECIPIENT
    assert email.utils.parsedate_to_datetime(headers["Date"]).timestamp() == DATE
    assert re.fullmatch(r"<[^<>@\s]+@direct\.sender\.test>", headers["Message-ID"])
    assert headers["MIME-Version"] == "1.0"
    assert headers["Disposition-Notification-Options"] == "X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true"
    ctype = headers["Content-Type"]
    assert ctype.split(";")[0].strip().lower() == "application/pkcs7-mime"
    assert "smime-type=enveloped-data" in ctype
    assert 'name="smime.p7m"' in ctype
    assert headers["Content-Transfer-Encoding"].lower() == "base64"
    assert headers["Content-Disposition"].startswith("attachment")
    assert 'filename="smime.p7m"' in headers["Content-Disposition"]
    head_of(message).decode("ascii")  # DTS 196: every header byte is ASCII
    # Each header once (a duplicate From/To/Message-ID would fail ETT).
    names = [n.lower() for n, _ in raw_headers(message)]
    assert len(names) == len(set(names))


def test_no_final_delivery_option_when_not_asked(build):
    eml = build(final_delivery=False)
    assert "Disposition-Notification-Options" not in dict(raw_headers(eml))
    assert b"X-DIRECT-FINAL-DESTINATION-DELIVERY" not in eml


def test_crlf_and_line_length(message, receiver):
    assert b"\n" not in message.replace(b"\r\n", b"")
    body = message.split(b"\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    base64.b64decode(b"".join(body.split()), validate=True)


def test_outer_envelope_is_aes256_to_the_receiver(message, receiver):
    der = base64.b64decode(b"".join(message.split(b"\r\n\r\n", 1)[1].split()))
    info = a_cms.ContentInfo.load(der)
    assert info["content_type"].native == "enveloped_data"
    env = info["content"]
    assert env["encrypted_content_info"]["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
    (ri,) = list(env["recipient_infos"])
    rid = ri.chosen["rid"].chosen
    assert rid["serial_number"].native == receiver.cert.serial_number


# --- openssl as the receiver -------------------------------------------------------------------

@needs_openssl
def test_openssl_decrypts_and_verifies(message, receiver, pki, ccda, order):
    content = verify(decrypt(message, receiver), pki)
    parts = parts_of(content)
    types = [p.get_content_type() for p in parts]
    assert types == ["text/plain", "application/zip", "application/xml"]

    # The bare C-CDA, byte for byte.
    bare = parts[2]
    assert bare.get_filename() == "referral-note.xml"
    assert bare.get_payload(decode=True) == ccda

    # The XDM zip: layout, documents byte for byte, metadata naming both.
    z = zip_of(parts)
    names = set(z.namelist())
    assert {"README.TXT", "INDEX.HTM", "IHE_XDM/SUBSET01/METADATA.XML"} <= names
    docs = {n: z.read(n) for n in names if n.startswith("IHE_XDM/SUBSET01/") and not n.endswith("METADATA.XML")}
    assert ccda in docs.values()
    assert order in docs.values()
    assert len(docs) == 2
    meta = etree.fromstring(z.read("IHE_XDM/SUBSET01/METADATA.XML"))
    entries = meta.findall(".//rim:ExtrinsicObject", XDM_NS)
    assert len(entries) == 2
    assert sorted(e.get("mimeType") for e in entries) == sorted(["text/xml", V2_MIME_TYPE])
    text = z.read("IHE_XDM/SUBSET01/METADATA.XML").decode("utf-8")
    assert RECIPIENT in text  # intendedRecipient
    assert "PT-55501" in text  # sourcePatientId
    for name, data in docs.items():
        # Each document is referenced from the metadata by its file name (URI slot) and its hash.
        assert name.rsplit("/", 1)[1] in text
        assert hashlib.sha1(data).hexdigest() in text.lower()


@needs_openssl
def test_without_bare_cda(build, receiver, pki, ccda):
    content = verify(decrypt(build(include_bare_cda=False), receiver), pki)
    parts = parts_of(content)
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/zip"]
    assert ccda in [zip_of(parts).read(n) for n in zip_of(parts).namelist()]


@needs_openssl
def test_without_order_the_zip_holds_only_the_ccda(build, receiver, pki, ccda, order):
    z = zip_of(parts_of(verify(decrypt(build(with_order=False), receiver), pki)))
    docs = [z.read(n) for n in z.namelist() if n.startswith("IHE_XDM/SUBSET01/") and not n.endswith("METADATA.XML")]
    assert docs == [ccda]


@needs_openssl
def test_other_key_cannot_decrypt(message, pki):
    done = openssl("cms", "-decrypt", "-recip", str(pki / "sender.pem"), "-inkey", str(pki / "sender.key"),
                   data=message)
    assert done.returncode != 0


@needs_openssl
def test_other_anchor_does_not_verify(message, receiver, pki):
    done = openssl("cms", "-verify", "-CAfile", str(pki / "rogue-anchor.pem"), "-out", "/dev/null",
                   data=decrypt(message, receiver))
    assert done.returncode != 0


# --- the signature part (DTS 155, 160, 165, 167, 182, 205, 207) --------------------------------

@needs_openssl
def test_signed_entity_shape(message, receiver, sender):
    signed = decrypt(message, receiver)
    # DTS 205 compares the raw parameter, quotes included.
    ctype = dict(raw_headers(signed))["Content-Type"]
    assert 'protocol="application/pkcs7-signature"' in ctype
    assert re.search(r"micalg=\"?sha-256\"?", ctype)  # DTS 160
    msg = email.message_from_bytes(signed, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/signed"
    parts = msg.get_payload()
    assert len(parts) == 2  # DTS 207
    assert parts[0].get_content_type() == "multipart/mixed"
    sig = parts[1]
    assert sig.get_content_type() == "application/pkcs7-signature"  # DTS 155
    assert sig["Content-Transfer-Encoding"].lower() == "base64"
    assert sig.get_param("name") == "smime.p7s" or sig.get_filename() == "smime.p7s"

    info = a_cms.ContentInfo.load(sig.get_payload(decode=True))
    assert info["content_type"].native == "signed_data"
    sd = info["content"]
    assert sd["encap_content_info"]["content"].native is None  # DTS 182: detached
    (signer_info,) = list(sd["signer_infos"])
    assert signer_info["digest_algorithm"]["algorithm"].native == "sha256"  # DTS 165: matches micalg
    sid = signer_info["sid"].chosen
    certs = [c.chosen for c in sd["certificates"]]
    serials = {c.serial_number for c in certs}
    assert sender.cert.serial_number in serials  # DTS 167
    assert sid["serial_number"].native == sender.cert.serial_number
    assert len(certs) >= 2  # the intermediate goes with it


# --- wrapped (message/rfc822) ------------------------------------------------------------------

@needs_openssl
def test_wrapped(build, receiver, pki, ccda):
    message_id = packet.message_id_for("wrapped-key", "direct.sender.test")
    eml = build(wrapped=True, message_id=message_id)
    content = verify(decrypt(eml, receiver), pki)
    outer = email.message_from_bytes(content, policy=email.policy.compat32)
    assert outer.get_content_type() == "message/rfc822"
    (inner,) = outer.get_payload()
    assert inner["From"] == SENDER
    assert inner["To"] == RECIPIENT
    assert inner["Subject"]
    assert inner["Message-ID"] == message_id
    assert inner.get_content_type() == "multipart/mixed"
    bare = [p for p in inner.get_payload() if p.get_content_type() == "application/xml"]
    assert bare[0].get_payload(decode=True) == ccda
    assert dict(raw_headers(eml))["Message-ID"] == message_id


# --- Message-ID and the text part --------------------------------------------------------------

def test_message_id_for_is_stable_per_key():
    a = packet.message_id_for("R1/direct/1", "direct.sender.test")
    assert a == packet.message_id_for("R1/direct/1", "direct.sender.test")
    assert a != packet.message_id_for("R1/direct/2", "direct.sender.test")
    assert a != packet.message_id_for("R2/direct/1", "direct.sender.test")
    assert re.fullmatch(r"<[0-9a-f-]{36}@direct\.sender\.test>", a)
    assert packet.message_id_for("R1/direct/1", "other.test").endswith("@other.test>")


def test_same_inputs_same_health_content(ccda, order):
    content = packet.PacketContent(referral_id=REFERRAL_ID, cda=ccda, created="20261118093000", order=order,
                                   patient_id=PATIENT_CX)
    one = packet.health_content(content, SENDER, RECIPIENT, "<seed@x>")
    assert one == packet.health_content(content, SENDER, RECIPIENT, "<seed@x>")


@needs_openssl
def test_text_part_has_no_patient_data(message, receiver, pki, ccda):
    (text,) = [p for p in parts_of(verify(decrypt(message, receiver), pki)) if p.get_content_type() == "text/plain"]
    body = text.get_payload(decode=True).decode("ascii")
    assert REFERRAL_ID in body
    assert "PT-55501" not in body
    # Nothing from the document's patient: name parts, birth time, ids.
    doc = etree.fromstring(ccda)
    ns = {"h": "urn:hl7-org:v3"}
    patient_role = doc.find(".//h:recordTarget/h:patientRole", ns)
    words = [w.text for w in patient_role.iter("{urn:hl7-org:v3}given", "{urn:hl7-org:v3}family") if w.text]
    words += [i.get("extension") for i in patient_role.findall("h:id", ns) if i.get("extension")]
    birth = patient_role.find(".//h:birthTime", ns)
    if birth is not None and birth.get("value"):
        words.append(birth.get("value"))
    assert words
    for word in words:
        assert word not in body
    headers = head_of(message).decode("ascii")
    for word in words:
        assert word not in headers


def test_non_ascii_header_is_refused():
    with pytest.raises(UnicodeEncodeError):
        packet.headers(sender=SENDER, recipient=RECIPIENT, message_id="<a@b>", date=DATE, subject="Überweisung",
                       final_delivery=True)
