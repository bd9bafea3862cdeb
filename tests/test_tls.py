"""MLLP over TLS against a real engine process, with the example PKI.

mTLS: a client certificate from the configured root connects; none, expired,
unknown CA and TLS 1.1 are refused. So is a revoked certificate (CRL). TLS 1.3
and 1.2 are accepted. A refused handshake processes no HL7: the store stays
empty and the engine logs the TLS failure.

The certificates come from certs-example/make_certs.py, run into a temporary
directory.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from engine_process import EngineProcess
from hl7referral.send import MLLPClient, SendError, tls_context

ROOT = Path(__file__).resolve().parents[1]
MAKE_CERTS = ROOT / "certs-example" / "make_certs.py"
FAILED = "TLS handshake with 127.0.0.1 failed"


def ref(control_id: str) -> bytes:
    return (f"MSH|^~\\&|EHR|CLINIC|HL7REF|HUB|20260101120000||REF^I12^REF_I12|{control_id}|P|2.5.1\r"
            "RF1|P|R|MED|RP|O|REF1\rPRD|RP|Doe^Jane^^^Dr\rPID|1||MRN1^^^CLINIC^MR||Test^Pat||19700101|F\r"
            ).encode()


def load_make_certs():
    spec = importlib.util.spec_from_file_location("make_certs", MAKE_CERTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_make_certs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAKE_CERTS), *args], capture_output=True, text=True,
                          timeout=60, check=True)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    run_make_certs("--out", str(out), "--quiet")
    return out


def ssl_listen(pki: Path, **extra: str) -> str:
    opts = dict(interface="127.0.0.1", privateKey=pki / "server.key", certKey=pki / "server.pem",
                caCerts=pki / "ca.pem", crl=pki / "crl.pem", **extra)
    return "ssl:0:" + ":".join(f"{k}={v}" for k, v in opts.items())


@pytest.fixture(scope="module")
def accepting(pki, tmp_path_factory):
    """An mTLS engine for the handshakes that should succeed."""
    e = EngineProcess.start(tmp_path_factory.mktemp("accepting"), listen=[ssl_listen(pki)])
    yield e
    e.stop()


@pytest.fixture(scope="module")
def guarded(pki, tmp_path_factory):
    """The same mTLS listener, only ever offered handshakes it must refuse: its store stays empty."""
    e = EngineProcess.start(tmp_path_factory.mktemp("guarded"), listen=[ssl_listen(pki)])
    yield e
    e.stop()


# -- helpers -------------------------------------------------------------------------


def client_context(pki: Path, stem: str | None, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    if stem is None:
        ctx = tls_context(str(pki / "ca.pem"), None, None)
    else:
        ctx = tls_context(str(pki / "ca.pem"), str(pki / f"{stem}.pem"), str(pki / f"{stem}.key"))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def attempt(engine: EngineProcess, ctx: ssl.SSLContext, control_id: str) -> tuple[str, str | None]:
    """Connect and send one referral: ('AA', 'TLSv1.3'), or ('refused', error text)."""
    try:
        with MLLPClient(engine.host, engine.port, timeout=5, context=ctx, server_name="localhost") as c:
            version = c.sock.version()
            result = c.exchange(ref(control_id))
    except SendError as exc:
        return "refused", str(exc)
    if not result.ok:
        return "refused", f"{result.code} {result.text}"
    return result.code, version


def stored(engine: EngineProcess) -> list[tuple[str, str]]:
    db = sqlite3.connect(f"file:{engine.store}?mode=ro", uri=True)
    try:
        return db.execute("SELECT control_id, status FROM messages ORDER BY id").fetchall()
    finally:
        db.close()


def wait_for_log(engine: EngineProcess, text: str, count: int, timeout: float = 5.0) -> str:
    """The engine log once ``text`` occurs at least ``count`` times in it."""
    deadline = time.monotonic() + timeout
    while True:
        log = engine.log
        if log.count(text) >= count or time.monotonic() > deadline:
            return log
        time.sleep(0.02)


def assert_refused_without_hl7(engine: EngineProcess, ctx: ssl.SSLContext, control_id: str,
                               alert: str, server_reason: str) -> str:
    before, rows = engine.log.count(FAILED), stored(engine)
    outcome, detail = attempt(engine, ctx, control_id)
    assert outcome == "refused", f"handshake was accepted ({detail})"
    # The server's alert, as the client saw it: proof that the engine refused, and why.
    assert alert in detail, detail
    log = wait_for_log(engine, FAILED, before + 1)
    failures = [line for line in log.splitlines() if FAILED in line]
    assert len(failures) == before + 1, log
    assert server_reason in failures[-1], failures[-1]
    assert stored(engine) == rows, "a refused handshake must not process any HL7"
    return detail


# -- the PKI itself ------------------------------------------------------------------

FILES = {"ca.pem", "ca.key", "crl.pem", "server.pem", "server.key", "client.pem", "client.key",
         "client-expired.pem", "client-expired.key", "client-revoked.pem", "client-revoked.key",
         "rogue-ca.pem", "client-rogue.pem", "client-rogue.key"}


def test_make_certs_writes_the_example_pki(pki):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    assert FILES <= {p.name for p in pki.iterdir()}

    def cert(stem):
        return x509.load_pem_x509_certificate((pki / f"{stem}.pem").read_bytes())

    def cn(c):
        return c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    def eku(c):
        return list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    ca, rogue = cert("ca"), cert("rogue-ca")
    assert cn(ca) == "hl7referral Example CA" and cn(rogue) == "Rogue CA"
    assert ca.public_key().key_size == 2048 and ca.signature_hash_algorithm.name == "sha256"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = cert("server")
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    now = dt.datetime.now(dt.timezone.utc)
    for stem in ("client", "client-expired", "client-revoked"):
        c = cert(stem)
        c.verify_directly_issued_by(ca)
        assert eku(c) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (c.not_valid_after_utc < now) == (stem == "client-expired")
    assert cn(cert("client")) == "Example Referring Clinic EHR"
    cert("client-rogue").verify_directly_issued_by(rogue)
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert [r.serial_number for r in crl] == [cert("client-revoked").serial_number]
    for stem in ("ca", "server", "client", "client-rogue"):
        assert (pki / f"{stem}.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        assert (pki / f"{stem}.key").stat().st_mode & 0o077 == 0


def test_make_certs_is_idempotent_fast_and_forceable(tmp_path):
    out = tmp_path / "pki"
    t0 = time.monotonic()
    first = run_make_certs("--out", str(out))
    assert time.monotonic() - t0 < 3.0
    assert "test material only" in first.stdout

    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    snapshot = files()
    assert FILES <= set(snapshot)
    assert {"direct/anchor.pem", "direct/sender.pem", "direct/bundle.p7b",
            "direct/intermediate.crl.pem"} <= set(snapshot)

    second = run_make_certs("--out", str(out))
    assert "wrote" not in second.stdout and "kept" in second.stdout
    assert files() == snapshot

    # A missing revoked certificate is remade, and the CRL with it; the rest is kept.
    (out / "client-revoked.key").unlink()
    run_make_certs("--out", str(out))
    now = files()
    changed = {n for n in snapshot if now[n] != snapshot[n]}
    assert changed == {"client-revoked.key", "client-revoked.pem", "crl.pem"}

    run_make_certs("--out", str(out), "--force")
    forced = files()
    assert all(forced[n] != now[n] for n in FILES)


def test_make_certs_functions_can_be_reused(tmp_path):
    """The building blocks later work (Direct / S/MIME) extends."""
    from cryptography import x509

    mc = load_make_certs()
    ca, ca_key = mc.make_ca("Other Example CA")
    leaf, _ = mc.make_leaf(ca, ca_key, "jane.doe", usages=[mc.EMAIL_PROTECTION],
                           sans=[x509.RFC822Name("jane.doe@direct.example.org")])
    leaf.verify_directly_issued_by(ca)
    crl = mc.make_crl(ca, ca_key, [leaf])
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None


# -- accepted ------------------------------------------------------------------------


@pytest.mark.parametrize("maximum, version", [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")],
                         ids=["tls1.3", "tls1.2"])
def test_client_certificate_from_the_configured_root_connects(accepting, pki, maximum, version):
    control_id = f"OK-{version}"
    before = accepting.log.count("TLS peer 127.0.0.1")
    assert attempt(accepting, client_context(pki, "client", maximum=maximum), control_id) == ("AA", version)
    assert (control_id, "accepted") in stored(accepting)
    log = wait_for_log(accepting, "TLS peer 127.0.0.1", before + 1)
    assert "CN=Example Referring Clinic EHR" in log


def test_cli_send_over_tls(accepting, pki, tmp_path):
    message = tmp_path / "referral.hl7"
    message.write_bytes(ref("CLI-TLS1"))
    proc = subprocess.run(
        [sys.executable, "-m", "hl7referral", "send", "--port", str(accepting.port), "--tls",
         "--ca", str(pki / "ca.pem"), "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"),
         "--server-name", "localhost", "--timeout", "5", str(message)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["CLI-TLS1\tAA"]
    assert ("CLI-TLS1", "accepted") in stored(accepting)


def test_cli_send_without_client_certificate_fails_readably(guarded, pki, tmp_path):
    message = tmp_path / "referral.hl7"
    message.write_bytes(ref("CLI-NOCERT"))
    rows = stored(guarded)
    proc = subprocess.run(
        [sys.executable, "-m", "hl7referral", "send", "--port", str(guarded.port), "--tls",
         "--ca", str(pki / "ca.pem"), "--server-name", "localhost", "--timeout", "5", str(message)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.startswith("hl7referral: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "CERTIFICATE_REQUIRED" in proc.stderr or "HANDSHAKE_FAILURE" in proc.stderr, proc.stderr
    assert stored(guarded) == rows


# -- refused -------------------------------------------------------------------------

# (client certificate, alert the server sends, reason the engine logs) for TLS 1.3 and 1.2.
# With TLS 1.3 the client's handshake ends before the server has checked its
# certificate, so the client has already sent its message when the alert comes.
REFUSED = [
    (None, {"TLSv1.3": "CERTIFICATE_REQUIRED", "TLSv1.2": "HANDSHAKE_FAILURE"}, "did not return a certificate"),
    ("client-expired", "CERTIFICATE_EXPIRED", "certificate verify failed"),
    ("client-revoked", "CERTIFICATE_REVOKED", "certificate verify failed"),
    ("client-rogue", "UNKNOWN_CA", "certificate verify failed"),
]


@pytest.mark.parametrize("stem, alert, server_reason", REFUSED, ids=["none", "expired", "revoked", "unknown-ca"])
@pytest.mark.parametrize("maximum, version", [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")],
                         ids=["tls1.3", "tls1.2"])
def test_refused_client_certificates(guarded, pki, stem, alert, server_reason, maximum, version):
    if isinstance(alert, dict):
        alert = alert[version]
    assert_refused_without_hl7(guarded, client_context(pki, stem, maximum=maximum),
                               f"NO-{stem}-{version}", alert, server_reason)


def _tls11_context(pki: Path, seclevel0: bool) -> ssl.SSLContext:
    ctx = client_context(pki, "client")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    if seclevel0:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS < 1.2 only at security level 0
    return ctx


def _speaks_tls11(ctx: ssl.SSLContext, pki: Path) -> bool:
    """Does ``ctx`` complete a TLS 1.1 handshake with a server that allows it (a local control)?"""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki / "server.pem", pki / "server.key")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server.minimum_version = ssl.TLSVersion.TLSv1_1
        server.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return False
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve():
            try:
                conn, _ = listener.accept()
                conn.settimeout(5)
                with server.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                version = tls.version()
        except OSError:
            version = None
        thread.join(5)
    return version == "TLSv1.1"


def test_tls_1_1_is_refused(guarded, pki):
    ctx = _tls11_context(pki, seclevel0=False)
    if not _speaks_tls11(ctx, pki):
        ctx = _tls11_context(pki, seclevel0=True)
    if _speaks_tls11(ctx, pki):
        # This client demonstrably speaks TLS 1.1, so the refusal is the engine's policy.
        assert_refused_without_hl7(guarded, ctx, "NO-TLS11", "PROTOCOL_VERSION", "unsupported protocol")
        return
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither Python's ssl nor an openssl binary can send a TLS 1.1 ClientHello here")
    before, rows = guarded.log.count(FAILED), stored(guarded)
    proc = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{guarded.port}", "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0",
         "-CAfile", str(pki / "ca.pem"), "-cert", str(pki / "client.pem"), "-key", str(pki / "client.key")],
        input="", capture_output=True, text=True, timeout=30)
    output = proc.stdout + proc.stderr
    if "no protocols available" in output or "unknown option" in output:
        pytest.skip(f"this openssl cannot offer TLS 1.1: {output[-300:]}")
    assert proc.returncode != 0 and "alert protocol version" in output, output
    log = wait_for_log(guarded, FAILED, before + 1)
    assert log.count(FAILED) == before + 1
    assert stored(guarded) == rows


def test_tls_min_1_3_refuses_tls_1_2(pki, tmp_path):
    engine = EngineProcess.start(tmp_path, listen=[ssl_listen(pki, tlsMin="1.3")])
    try:
        assert_refused_without_hl7(engine, client_context(pki, "client", maximum=ssl.TLSVersion.TLSv1_2),
                                   "NO-TLS12", "PROTOCOL_VERSION", "unsupported protocol")
        assert attempt(engine, client_context(pki, "client"), "OK-TLS13") == ("AA", "TLSv1.3")
    finally:
        engine.stop()


def test_guarded_engine_stored_nothing_and_logged_every_refusal(guarded):
    """Whatever ran before against this engine: nothing stored, refusals counted in the log."""
    assert stored(guarded) == []
    assert "TLS peer" not in guarded.log
