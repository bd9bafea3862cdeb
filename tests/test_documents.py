"""The engine turns accepted referrals into checked Referral Notes, or parks them with an alert."""

import json
import sqlite3
import subprocess
import sys
import time

from lxml import etree

from engine_process import EngineProcess
from hl7referral.send import MLLPClient, read_messages
from hl7referral.store import Store

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
NS = {"v3": "urn:hl7-org:v3"}


def documents(engine, n, timeout=60):
    """Poll the store until n documents exist (building + Schematron runs after the ACK)."""
    deadline = time.monotonic() + timeout
    while True:
        store = Store.open(engine.store, readonly=True)
        try:
            rows = store.list_documents(limit=100)
        except sqlite3.OperationalError:
            rows = []
        store.close()
        if len(rows) >= n or time.monotonic() > deadline:
            return sorted(rows, key=lambda r: r["id"])
        time.sleep(0.2)


def send_all(engine, *paths):
    with MLLPClient(engine.host, engine.port, timeout=10) as c:
        return [c.exchange(m) for p in paths for m in read_messages(p)]


def xml_of(engine, doc_id):
    store = Store.open(engine.store, readonly=True)
    xml = store.get_document(doc_id)["xml"]
    store.close()
    return etree.fromstring(xml)


def test_samples_become_ready_documents(tmp_path):
    e = EngineProcess.start(tmp_path)
    try:
        results = send_all(e, ROOT / "samples/ref-i12.hl7", ROOT / "samples/orm-o01.hl7", ROOT / "samples/omg-o19.hl7",
                           ROOT / "samples/vet-ref-i12.hl7")
        assert [r.code for r in results] == ["AA", "AA", "CA", "AA"]
        rows = documents(e, 4)
    finally:
        e.stop()
    assert [(r["channel"], r["status"], r["referral_id"]) for r in rows] == [
        ("ref-i12", "ready", "SAMPLEREF0001"), ("orm-o01", "ready", "SAMPLEORD0001"),
        ("omg-o19", "ready", "990001@1.3.6.1.4.1.99999.1.15"),
        ("vet-ref-i12", "ready", "VETREF0001")]  # the facility-specific channel won over the catch-all
    assert [json.loads(r["destination"])["name"] for r in rows] == [
        "Example Cardiology Associates", "Example Cardiology Associates", "Example Neurology",
        "Example Veterinary Cardiology"]
    doc = xml_of(e, rows[0]["id"])
    act_ids = doc.xpath("//v3:act[v3:templateId/@root='2.16.840.1.113883.10.20.22.4.140']/v3:id/@extension",
                        namespaces=NS)
    assert act_ids == ["SAMPLEREF0001"]
    assert doc.xpath("string(//v3:recordTarget//v3:patient/v3:name/v3:family)", namespaces=NS) == "Sample"


def test_unroutable_referral_is_parked_with_an_alert(tmp_path, corpus):
    e = EngineProcess.start(tmp_path)
    try:
        assert [r.code for r in send_all(e, corpus / "REF_I12_msfhirconv_01.hl7")] == ["AA"]
        (row,) = documents(e, 1)
        alerts = subprocess.run([sys.executable, "-m", "hl7referral", "alerts", "list", "--store", str(e.store),
                                 "--json"], capture_output=True, text=True).stdout
    finally:
        e.stop()
    assert row["status"] == "parked" and "no destination" in row["reasons"]
    (alert,) = json.loads(alerts)
    assert alert["referral_id"] == "226839" and alert["owner"] == "role:referral-coordinators"
    assert "no destination" in alert["text"]
    assert "ALERT referral 226839" in e.log and "EVERYMAN" not in e.log


def test_ack_after_mapping_names_the_missing_field(tmp_path):
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    mapping = (ROOT / "mappings/ref-i12.toml").read_text().replace(
        'reason = { paths = ["DG1-3", "RF1-10"] }', 'reason = { path = "DG1-3", required = true }')
    (tmp_path / "mappings/ref-i12.toml").write_text(mapping)
    channel = (ROOT / "channels/ref-i12.toml").read_text().replace('mode = "after-store"', 'mode = "after-mapping"')
    (tmp_path / "channels/ref-i12.toml").write_text(channel)
    (tmp_path / "channels/directory.toml").write_text((ROOT / "channels/directory.toml").read_text())
    (tmp_path / "engine.toml").write_text('[channels]\ndir = "channels"\n[mappings]\ndir = "mappings"\n')
    e = EngineProcess.start(tmp_path, "--config", str(tmp_path / "engine.toml"))
    try:
        no_dg1 = tmp_path / "no-dg1.hl7"
        no_dg1.write_bytes(b"\r".join(s for s in read_messages(ROOT / "samples/ref-i12.hl7")[0].split(b"\r")
                                      if not s.startswith(b"DG1")))
        with MLLPClient(e.host, e.port, timeout=10) as c:
            c.send(read_messages(no_dg1)[0])
            ack = c.read_frame()
            good = c.exchange(read_messages(ROOT / "samples/ref-i12.hl7")[0])
    finally:
        e.stop()
    err = [s for s in ack.split(b"\r") if s.startswith(b"ERR")][0].split(b"|")
    assert b"|AE|REFSAMPLE1" in ack
    assert err[2] == b"DG1^1^3" and err[3].startswith(b"101^") and b"DG1-3 (reason)" in err[8]
    assert good.code == "AA"  # a rejected message does not claim its id: the corrected resend is accepted
    store = Store.open(e.store, readonly=True)
    assert [r["status"] for r in store.list_messages(control_id="REFSAMPLE1")] == ["accepted", "rejected"]


def test_accepted_messages_without_a_document_are_processed_at_start(tmp_path):
    # An accepted message whose document was never built (a crash after the ACK).
    e = EngineProcess.start(tmp_path)
    e.stop()
    raw = read_messages(ROOT / "samples/orm-o01.hl7")[0]
    db = sqlite3.connect(e.store)
    db.execute("INSERT INTO messages (received_at, listener, channel, status, sending_application, "
               "sending_facility, message_type, control_id, raw, raw_sha256) VALUES "
               "('2026-01-01T00:00:00.000Z','main','orm-o01','accepted','SAMPLE-EHR','SAMPLE CLINIC','ORM^O01',"
               "'ORMSAMPLE1',?, 'x')", (raw,))
    db.commit()
    db.close()
    e = EngineProcess.start(tmp_path, store=e.store)
    try:
        (row,) = documents(e, 1)
    finally:
        e.stop()
    assert (row["channel"], row["status"], row["referral_id"]) == ("orm-o01", "ready", "SAMPLEORD0001")


def test_local_root_names_namespace_only_ids(tmp_path):
    e = EngineProcess.start(tmp_path, "--set", 'cda.local_root="1.2.3.4.5"')
    try:
        send_all(e, ROOT / "samples/orm-o01.hl7")
        (row,) = documents(e, 1)
        doc = xml_of(e, row["id"])
    finally:
        e.stop()
    roots = doc.xpath("//v3:recordTarget/v3:patientRole/v3:id/@root", namespaces=NS)
    assert roots and all(r.startswith("1.2.3.4.5.") for r in roots)


def test_local_root_must_be_an_oid(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hl7referral", "check", "--set", 'cda.local_root="my-org"'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "cda.local_root: 'my-org' is not an OID" in r.stderr
