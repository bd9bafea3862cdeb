"""The whole Direct path through a running engine, over real sockets.

An MLLP client sends a REF^I12; the engine builds the Referral Note, packs it
(XDM, signed, encrypted) and sends it through a real SMTP relay (aiosmtpd) that
can be told to fail; ``openssl cms`` opens what the relay received; ``swaks``
brings the cardiology practice's MDN back into the engine's SMTP listener.
"""

from __future__ import annotations

import functools
import shutil
import socket
import sqlite3
import subprocess
import time
from email.parser import BytesHeaderParser
from pathlib import Path

import hl7.client
import pytest
from aiosmtpd.controller import Controller

import polling
from engine_process import EngineProcess
from hl7referral.direct import mdn as mdnlib
from hl7referral.direct import packet
from hl7referral.send import read_messages

ROOT = Path(__file__).resolve().parents[1]
SENDER, RECEIVER = "referrals@direct.sender.test", "cardiology@direct.receiver.test"
OPENSSL, SWAKS = shutil.which("openssl"), shutil.which("swaks")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")


class Relay:
    """A HISP relay: replies from a script (first N DATA commands), then 250."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.attempts = 0

    async def handle_DATA(self, server, session, envelope):
        self.attempts += 1
        if self.script:
            action = self.script.pop(0)
            if action == "drop":  # store it, then vanish before the final reply
                self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
                server.transport.close()
                return "421 closing"  # never reaches the client
            return action
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 queued"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_relay(relay: Relay, port: int = 0) -> Controller:
    c = Controller(relay, hostname="127.0.0.1", port=port or free_port())
    c.start()
    return c


def direct_settings(pki: Path, relay_port: int, inbound_port: int, **extra) -> list[str]:
    values = {
        "direct.certificate": f'"{pki / "sender.pem"}"', "direct.key": f'"{pki / "sender.key"}"',
        "direct.chain": f'["{pki / "intermediate.pem"}"]', "direct.certificates_dir": f'"{pki}"',
        "direct.crls": f'["{pki / "intermediate.crl.pem"}"]', "direct.anchors.0.files": f'["{pki / "anchor.pem"}"]',
        "direct.smtp.host": '"127.0.0.1"', "direct.smtp.port": str(relay_port), "direct.smtp.starttls": '"none"',
        "direct.smtp.timeout": "5.0", "direct.retry.first_delay": "0.3", "direct.retry.max_delay": "1.0",
        "direct.inbound.endpoint": f'"tcp:{inbound_port}:interface=127.0.0.1"',
    }
    values.update(extra)
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def rows(store: Path, sql: str, args=()) -> list[dict]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    except sqlite3.OperationalError:
        return []  # the engine has not created the tables yet
    finally:
        conn.close()


wait_for = functools.partial(polling.wait_for, timeout=30.0)


def send_referral(engine: EngineProcess) -> None:
    raw = read_messages(ROOT / "samples" / "ref-i12.hl7")[0].decode()
    with hl7.client.MLLPClient(engine.host, engine.port) as client:
        ack = client.send_message(raw)
    assert b"MSA|AA|" in ack


def outbox(store: Path) -> list[dict]:
    return rows(store, "SELECT * FROM outbox ORDER BY id")


def openssl_open(eml: bytes, pki: Path, tmp_path: Path, as_: str = "receiver") -> bytes:
    path = tmp_path / f"in-{time.monotonic_ns()}.eml"
    path.write_bytes(eml)
    dec = subprocess.run([OPENSSL, "cms", "-decrypt", "-in", str(path), "-recip", str(pki / f"{as_}.pem"),
                          "-inkey", str(pki / f"{as_}.key")], capture_output=True, check=True).stdout
    ver = subprocess.run([OPENSSL, "cms", "-verify", "-CAfile", str(pki / "anchor.pem")], input=dec,
                         capture_output=True)
    assert ver.returncode == 0 and b"Verification successful" in ver.stderr, ver.stderr
    return ver.stdout


@pytest.fixture
def engine_with_relay(tmp_path, direct_pki, request):
    script = getattr(request, "param", [])
    relay = Relay(script)
    controller = start_relay(relay)
    inbound = free_port()
    engine = EngineProcess.start(tmp_path, *direct_settings(direct_pki, controller.port, inbound))
    yield engine, relay, inbound
    engine.stop()
    controller.stop()


def test_referral_goes_out_by_direct_and_the_mdn_comes_back(engine_with_relay, direct_pki, tmp_path):
    engine, relay, inbound = engine_with_relay
    send_referral(engine)
    wait_for(lambda: relay.messages, what="the packet at the relay")
    mail_from, rcpts, data = relay.messages[0]
    assert (mail_from, rcpts) == (SENDER, [RECEIVER])
    content = openssl_open(data, direct_pki, tmp_path)
    assert b"application/zip" in content and b"referral.zip" in content
    row = wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "SENT"], what="SENT")[0]
    assert row["message_id"] == BytesHeaderParser().parsebytes(data)["Message-ID"]
    assert row["referral_id"] == "SAMPLEREF0001"

    # The cardiology practice answers with a processed MDN, signed by it and encrypted to us.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    certs = {n: x509.load_pem_x509_certificate((direct_pki / f"{n}.pem").read_bytes())
             for n in ("receiver", "sender", "intermediate")}
    key = serialization.load_pem_private_key((direct_pki / "receiver.key").read_bytes(), None)
    headers, entity = mdnlib.build_mdn(original_message_id=row["message_id"], original_from=SENDER,
                                       original_to=RECEIVER, reporting_ua="cardiology-ehr", disposition="processed")
    outer = packet.headers(sender=RECEIVER, recipient=SENDER, message_id="<mdn-1@direct.receiver.test>",
                           date=time.time(), subject=headers.pop("Subject"), final_delivery=False,
                           extra=list(headers.items()))
    eml = packet.seal(entity, outer_headers=outer, signer=certs["receiver"], key=key, chain=[certs["intermediate"]],
                      recipient_certs=[certs["sender"]], cipher="aes128", key_transport="rsa-oaep")
    (tmp_path / "mdn.eml").write_bytes(eml)
    if SWAKS:
        done = subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(inbound), "--from", RECEIVER,
                               "--to", SENDER, "--data", str(tmp_path / "mdn.eml")], capture_output=True, timeout=30)
        assert done.returncode == 0, done.stdout[-500:]
    else:
        import smtplib
        with smtplib.SMTP("127.0.0.1", inbound) as s:
            s.sendmail(RECEIVER, [SENDER], eml)
    wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "MDN_PROCESSED"], what="MDN_PROCESSED")
    mail = rows(engine.store, "SELECT status, kind, trust, original_message_id FROM mail")
    assert mail == [{"status": "mdn-matched", "kind": "mdn", "trust": "trusted (address-bound)",
                     "original_message_id": row["message_id"]}]
    assert "Sample" not in engine.log and "Alex" not in engine.log  # control and referral ids only, no names
    assert "SAMPLEREF0001" in engine.log


@pytest.mark.parametrize("engine_with_relay", [["451 4.3.0 try again later", "drop"]], indirect=True)
def test_4xx_and_a_dropped_connection_are_retried_with_the_same_message_id(engine_with_relay):
    engine, relay, _ = engine_with_relay
    send_referral(engine)
    row = wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "SENT"], what="SENT")[0]
    assert row["attempts"] == 3 and relay.attempts == 3
    # The dropped attempt reached the relay too: two copies, one Message-ID; nothing lost.
    ids = {BytesHeaderParser().parsebytes(m[2])["Message-ID"] for m in relay.messages}
    assert len(relay.messages) == 2 and ids == {row["message_id"]}
    events = [e["event"] for e in rows(engine.store, "SELECT event FROM transport_events WHERE outbox_id = ?",
                                       (row["id"],))]
    assert events == ["queued", "send_retry", "send_retry", "send_ok"]


@pytest.mark.parametrize("engine_with_relay", [["554 5.7.1 recipient refuses Direct mail"]], indirect=True)
def test_5xx_fails_with_the_reason_and_falls_back_to_fax(engine_with_relay):
    engine, relay, _ = engine_with_relay
    send_referral(engine)
    failed = wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "FAILED"], what="FAILED")[0]
    assert failed["last_code"] == 554 and "refuses Direct mail" in failed["last_error"]
    fax = wait_for(lambda: [r for r in outbox(engine.store) if r["transport"] == "fax"], what="fax fallback")
    assert fax[0]["referral_id"] == "SAMPLEREF0001" and fax[0]["recipient"] == "+1-555-555-0190"
    alerts = rows(engine.store, "SELECT kind, referral_id FROM alerts")
    assert {"kind": "direct-failed", "referral_id": "SAMPLEREF0001"} in alerts
    assert relay.messages == []


def test_relay_down_then_up_loses_nothing(tmp_path, direct_pki):
    port, inbound = free_port(), free_port()
    engine = EngineProcess.start(tmp_path, *direct_settings(direct_pki, port, inbound))
    try:
        send_referral(engine)
        waiting = wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "RETRY_WAIT"], what="retry")
        assert waiting[0]["last_error"]
        relay = Relay()
        controller = start_relay(relay, port)
        try:
            wait_for(lambda: relay.messages, what="delivery once the relay is up")
            wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "SENT"], what="SENT")
            time.sleep(1.0)
            assert len(relay.messages) == 1
        finally:
            controller.stop()
    finally:
        engine.stop()


def test_no_processed_mdn_times_out_and_falls_back(tmp_path, direct_pki):
    relay = Relay()
    controller = start_relay(relay)
    engine = EngineProcess.start(tmp_path, *direct_settings(direct_pki, controller.port, free_port(),
                                                            **{"direct.processed_timeout": "1.5"}))
    try:
        send_referral(engine)
        row = wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "TIMED_OUT"], what="TIMED_OUT")[0]
        timeout = rows(engine.store, "SELECT detail FROM transport_events WHERE outbox_id = ? AND event = 'timeout'",
                       (row["id"],))
        assert [t["detail"] for t in timeout] == ["no processed MDN by the deadline"]
        assert wait_for(lambda: [r for r in outbox(engine.store) if r["transport"] == "fax"], what="fax")
    finally:
        engine.stop()
        controller.stop()
