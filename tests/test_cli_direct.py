"""The Direct CLI (``hl7referral packet``, ``hl7referral direct verify|outbox|mail|events``) as a user runs it.

Each command runs as a subprocess of the installed entry point with ``--set`` overrides pointing the
``[direct]`` keys at the example PKI (the ``direct_pki`` fixture). The packet's message.eml is opened
with the openssl CLI as the receiver; ``direct verify`` runs as the receiver's identity on the
engine's own message and on openssl-made negatives. Every refusal must be one readable line and an
exit status, never a traceback.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hl7referral.send import read_messages
from hl7referral.store import Store

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("hl7referral")
SAMPLES = REPO / "samples"
SENDER = "referrals@direct.sender.test"
RECEIVER = "cardiology@direct.receiver.test"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not on PATH: it is the independent oracle")


def direct_overrides(pki: Path, *, name: str = "sender", address: str = SENDER) -> list[str]:
    """--set arguments: our identity is *name* (sender.pem/.key or receiver.pem/.key) with *address*."""
    sets = [
        f"direct.address={address}",
        f"direct.certificate={pki / (name + '.pem')}",
        f"direct.key={pki / (name + '.key')}",
        f'direct.chain=["{pki / "intermediate.pem"}"]',
        f"direct.certificates_dir={pki}",
        f'direct.crls=["{pki / "intermediate.crl.pem"}", "{pki / "anchor.crl.pem"}"]',
        f'direct.anchors=[{{domain = "*", files = ["{pki / "anchor.pem"}"]}}]',
    ]
    return [arg for s in sets for arg in ("--set", s)]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def no_traceback(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


def openssl(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, *args], input=data, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(direct_pki) -> Path:
    return direct_pki


@pytest.fixture(scope="module")
def as_receiver(pki) -> list[str]:
    return direct_overrides(pki, name="receiver", address=RECEIVER)


@pytest.fixture(scope="module")
def ref_packet(pki, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("packet-ref")
    done = run("packet", str(SAMPLES / "ref-i12.hl7"), "--out", str(out), *direct_overrides(pki))
    return done, out


@pytest.fixture(scope="module")
def content(ref_packet, pki) -> bytes:
    """What the receiver reads after decrypting and verifying message.eml with openssl."""
    if OPENSSL is None:
        pytest.skip("openssl CLI not on PATH")
    _, out = ref_packet
    decrypted = openssl("cms", "-decrypt", "-in", str(out / "message.eml"), "-recip", str(pki / "receiver.pem"),
                        "-inkey", str(pki / "receiver.key"))
    assert decrypted.returncode == 0, decrypted.stderr.decode()
    verified = openssl("cms", "-verify", "-CAfile", str(pki / "anchor.pem"), data=decrypted.stdout)
    assert verified.returncode == 0, verified.stderr.decode()
    assert b"Verification successful" in verified.stderr
    return verified.stdout


# --- packet ------------------------------------------------------------------------------------

def test_packet_writes_the_four_files(ref_packet):
    done, out = ref_packet
    no_traceback(done)
    assert done.returncode == 0, done.stdout + done.stderr
    # ref-i12's transports are direct, fax: the fax PDF is written too.
    assert sorted(p.name for p in out.iterdir()) == ["message.eml", "referral-fax.pdf", "referral-note.xml",
                                                     "referral.zip"]
    assert (out / "referral-fax.pdf").read_bytes().startswith(b"%PDF")
    assert "referral-fax.pdf: fax PDF to +1-555-555-0190" in done.stdout
    assert f"Direct message to {RECEIVER}" in done.stdout
    assert (out / "referral-note.xml").read_bytes().lstrip().startswith(b"<?xml")
    with zipfile.ZipFile(out / "referral.zip") as z:
        assert z.read("IHE_XDM/SUBSET01/DOC0001.XML") == (out / "referral-note.xml").read_bytes()
        assert "IHE_XDM/SUBSET01/DOC0002.HL7" not in z.namelist()  # REF^I12: no v2 order in the zip


def test_packet_message_headers(ref_packet):
    _, out = ref_packet
    eml = (out / "message.eml").read_bytes()
    head = eml.split(b"\r\n\r\n", 1)[0].decode("ascii")  # DTS 196
    msg = email.message_from_string(head + "\r\n\r\n", policy=email.policy.compat32)
    assert msg["From"] == SENDER
    assert msg["To"] == RECEIVER
    assert msg["Message-ID"].endswith("@direct.sender.test>")
    assert msg["Date"] and msg["MIME-Version"] == "1.0"
    assert msg["Disposition-Notification-Options"] == "X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true"
    assert msg.get_content_type() == "application/pkcs7-mime"
    assert msg.get_param("smime-type") == "enveloped-data"


@needs_openssl
def test_packet_message_opens_as_the_receiver(ref_packet, content):
    _, out = ref_packet
    msg = email.message_from_bytes(content, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/mixed"
    parts = {p.get_content_type(): p for p in msg.get_payload()}
    assert set(parts) == {"text/plain", "application/zip", "application/xml"}
    cda = (out / "referral-note.xml").read_bytes()
    assert parts["application/xml"].get_payload(decode=True) == cda
    with zipfile.ZipFile(io.BytesIO(parts["application/zip"].get_payload(decode=True))) as z:
        assert z.read("IHE_XDM/SUBSET01/DOC0001.XML") == cda
        assert RECEIVER in z.read("IHE_XDM/SUBSET01/METADATA.XML").decode()


def test_packet_without_certificate_for_the_destination(pki, tmp_path):
    # omg-o19 routes to Example Neurology (referrals@neuro.example.org): no certificate anywhere.
    done = run("packet", str(SAMPLES / "omg-o19.hl7"), "--out", str(tmp_path), *direct_overrides(pki))
    no_traceback(done)
    assert done.returncode == 1, done.stdout + done.stderr
    reasons = [line for line in done.stdout.splitlines() if "no usable certificate" in line]
    assert len(reasons) == 1
    assert "referrals@neuro.example.org" in reasons[0]
    assert reasons[0].endswith("would not be attempted")
    # What would go instead: the fax (omg-o19 lists direct, fax).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["referral-fax.pdf", "referral-note.xml", "referral.zip"]
    assert "referral-fax.pdf: fax PDF to +1-555-555-0192" in done.stdout
    order = read_messages(SAMPLES / "omg-o19.hl7")[0]
    with zipfile.ZipFile(tmp_path / "referral.zip") as z:
        assert z.read("IHE_XDM/SUBSET01/DOC0001.XML") == (tmp_path / "referral-note.xml").read_bytes()
        assert z.read("IHE_XDM/SUBSET01/DOC0002.HL7") == order
        assert "referrals@neuro.example.org" in z.read("IHE_XDM/SUBSET01/METADATA.XML").decode()


def test_packet_unknown_channel(pki, tmp_path):
    done = run("packet", str(SAMPLES / "ref-i12.hl7"), "--channel", "nope", "--out", str(tmp_path),
               *direct_overrides(pki))
    no_traceback(done)
    assert done.returncode == 2
    assert "no channel named 'nope'" in done.stderr


def test_packet_with_a_config_file(pki, tmp_path):
    """The same through --config: relative paths resolve against the file, channels/mappings bundled."""
    (tmp_path / "pki").symlink_to(pki)
    (tmp_path / "engine.toml").write_text(f"""
[store]
path = "store.db"

[direct]
address = "{SENDER}"
certificate = "pki/sender.pem"
key = "pki/sender.key"
chain = ["pki/intermediate.pem"]
certificates_dir = "pki"
crls = ["pki/intermediate.crl.pem"]

[[direct.anchors]]
domain = "*"
files = ["pki/anchor.pem"]
""")
    done = run("packet", str(SAMPLES / "ref-i12.hl7"), "--config", str(tmp_path / "engine.toml"),
               "--out", str(tmp_path / "out"))
    no_traceback(done)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / "message.eml").is_file()


# --- direct verify -----------------------------------------------------------------------------

def test_verify_the_packet_as_the_receiver(ref_packet, as_receiver):
    _, out = ref_packet
    done = run("direct", "verify", str(out / "message.eml"), *as_receiver)
    no_traceback(done)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("decrypted: aes256") for line in lines)
    assert any(line.startswith("signature: valid (sha256)") for line in lines)
    assert any(line.startswith("trust: trusted") for line in lines)
    assert f"address-bound to {SENDER}" in done.stdout


def test_verify_as_the_sender_cannot_decrypt(ref_packet, pki):
    _, out = ref_packet
    done = run("direct", "verify", str(out / "message.eml"), *direct_overrides(pki))
    no_traceback(done)
    assert done.returncode == 1
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("refused:")]
    assert line.startswith("refused: no-recipient-info") or line.startswith("refused: decrypt-failed")


def _openssl_message(tmp_path: Path, pki: Path, content: bytes, signer: str, *, md: str = "sha256",
                     tamper: bool = False) -> Path:
    """A Direct message made by openssl: *content* signed by *signer*, encrypted to the receiver."""
    (tmp_path / "content.eml").write_bytes(content)
    signed = openssl("cms", "-sign", "-in", str(tmp_path / "content.eml"), "-signer", str(pki / f"{signer}.pem"),
                     "-inkey", str(pki / f"{signer}.key"), "-certfile", str(pki / "intermediate.pem"),
                     "-md", md, "-binary")
    assert signed.returncode == 0, signed.stderr.decode()
    data = signed.stdout
    if tamper:
        marker = b"Referral "
        assert marker in data
        data = data.replace(marker, b"Referal! ", 1)
    (tmp_path / "signed.eml").write_bytes(data)
    out = tmp_path / f"{signer}-{md}{'-tampered' if tamper else ''}.eml"
    enc = openssl("cms", "-encrypt", "-in", str(tmp_path / "signed.eml"), "-aes256", "-binary",
                  "-from", SENDER, "-to", RECEIVER, "-subject", "Referral (openssl)", "-out", str(out),
                  str(pki / "receiver.pem"))
    assert enc.returncode == 0, enc.stderr.decode()
    return out


@needs_openssl
def test_verify_openssl_made_positive(tmp_path, pki, content, as_receiver):
    eml = _openssl_message(tmp_path, pki, content, "sender")
    done = run("direct", "verify", str(eml), *as_receiver)
    no_traceback(done)
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("trust: trusted") for line in done.stdout.splitlines())


@needs_openssl
@pytest.mark.parametrize("signer, md, tamper, expected", [
    ("expired", "sha256", False, "trust: expired"),
    ("revoked", "sha256", False, "trust: revoked"),
    ("rogue", "sha256", False, "trust: unknown-anchor"),
    ("small", "sha256", False, "trust: weak-key"),
    ("unbound", "sha256", False, "trust: not-bound"),
    ("sender", "sha1", False, "refused: weak-digest"),
    ("sender", "sha256", True, "refused: digest-mismatch"),
])
def test_verify_negatives(tmp_path, pki, content, as_receiver, signer, md, tamper, expected):
    eml = _openssl_message(tmp_path, pki, content, signer, md=md, tamper=tamper)
    done = run("direct", "verify", str(eml), *as_receiver)
    no_traceback(done)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [x for x in done.stdout.splitlines() if x.startswith(expected)]
    assert len(lines) == 1, done.stdout
    code = expected.split(": ")[1]
    assert f"{code}: {code}" not in lines[0]  # the code once, not repeated
    assert not any(x.startswith("trust: trusted") for x in done.stdout.splitlines())


@pytest.mark.parametrize("data", [
    b"not a message at all\n",
    b"",
    bytes(range(256)) * 8,
    b"From: \xff\xfe caf\xc3\xa9 <a@b.test>\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!notbase64\r\n",
    b"From: a@b.test\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nMIIBAgMEBQ==\r\n",
], ids=["text", "empty", "binary", "non-ascii-from", "bad-der"])
def test_verify_garbage(tmp_path, as_receiver, data):
    eml = tmp_path / "garbage.eml"
    eml.write_bytes(data)
    done = run("direct", "verify", str(eml), *as_receiver)
    no_traceback(done)
    assert done.returncode in (1, 2), done.stdout + done.stderr
    out = (done.stdout + done.stderr).strip().splitlines()
    assert len(out) == 1, out
    assert out[0].startswith("refused: ") or out[0].startswith("hl7referral: ")


def test_verify_missing_file(tmp_path, as_receiver):
    done = run("direct", "verify", str(tmp_path / "absent.eml"), *as_receiver)
    no_traceback(done)
    assert done.returncode == 2


# --- outbox, mail, events on a fresh store ----------------------------------------------------

@pytest.fixture
def fresh_store(tmp_path) -> Path:
    path = tmp_path / "fresh.db"
    Store.open(path).close()
    return path


@pytest.mark.parametrize("command", ["outbox", "mail", "events"])
def test_lists_on_a_fresh_store(fresh_store, command):
    done = run("direct", command, "--store", str(fresh_store))
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    done = run("direct", command, "--store", str(fresh_store), "--json")
    no_traceback(done)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_lists_on_a_missing_store(tmp_path):
    done = run("direct", "outbox", "--store", str(tmp_path / "nothing.db"))
    no_traceback(done)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
