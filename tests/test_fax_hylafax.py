"""The HylaFAX gateway against a real hfaxd + faxq on loopback (tests/hylafax_server.py); no mocks.

Without a modem faxq keeps every job waiting, so a job can be submitted, read back, found
by its key and killed, and its queue file (sendq/q<id>, sendq(5)) shows what hfaxd stored.
"""

from __future__ import annotations

import ftplib
import io
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from fpdf import FPDF

import hylafax_server
from hl7referral.fax.gateway import FaxJob, GatewayError, GatewaySettingsError, Status, load_gateway
from hl7referral.fax.hylafax import DEFAULTS, HylaFAXGateway

hylafax = hylafax_server.hylafax   # the module-scoped fixture: a private HylaFAX, stopped after this module

NUMBER = "+1-555-555-0190"


def make_pdf() -> bytes:
    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=12)
    pdf.cell(text="Referral REF-TEST: fax gateway test page")
    return bytes(pdf.output())


PDF = make_pdf()


def gateway(server, **settings) -> HylaFAXGateway:
    return HylaFAXGateway({"host": server.host, "port": server.port, "timeout": 10, **settings})


def fax_job(key: str | None = None, number: str = NUMBER) -> FaxJob:
    return FaxJob(key=key or f"REF-{uuid.uuid4().hex[:8]}/fax/1", number=number, pdf=PDF, referral_id="REF-TEST")


def queue_file(spool, job_id: str) -> dict[str, str]:
    """sendq/q<id> (or doneq/q<id>) as tag -> value (sendq(5): "tag: value" lines)."""
    for queue in ("sendq", "doneq"):
        path = spool / queue / f"q{job_id}"
        if path.exists():
            return dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    raise AssertionError(f"no queue file for job {job_id}")


def wait_for(gw: HylaFAXGateway, job_id: str, want, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        status = gw.status(job_id)
        if want(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- submit, status, find -------------------------------------------------------------------


def test_submit_returns_a_job_that_status_reads_back_as_queued(hylafax):
    gw = gateway(hylafax)
    submitted = gw.submit(fax_job())
    assert submitted.job_id.isdigit()
    assert submitted.status is not None and submitted.status.status == Status.QUEUED
    status = gw.status(submitted.job_id)
    assert status.status == Status.QUEUED
    assert status.detail.split(":")[0] in ("SUSPENDED", "PENDING", "SLEEPING", "BLOCKED", "READY")
    gw.cancel(submitted.job_id)


def test_the_queue_file_carries_the_key_number_and_parameters(hylafax):
    gw = gateway(hylafax, resolution="normal", maxdials=5, maxtries=2)
    job = fax_job()
    job_id = gw.submit(job).job_id
    q = queue_file(hylafax.spool, job_id)
    assert q["jobtag"].strip() == job.key
    assert q["number"].strip() == "+15555550190"          # e164: the + and the digits
    assert q["owner"].strip() == DEFAULTS["user"]
    assert q["resolution"].strip() == "98"
    assert q["maxdials"].strip() == "5" and q["maxtries"].strip() == "2"
    assert q["notify"].strip() == "none"
    # The kill time is LASTTIME (3 hours by default) after the time to send, not 1970.
    assert int(q["killtime"]) - int(q["tts"]) == pytest.approx(3 * 3600, abs=120)
    document = [v.strip() for k, v in q.items() if k == "pdf"]
    assert document and document[0].endswith(f".{job_id}")
    assert (hylafax.spool / document[0].split(":")[-1]).read_bytes() == PDF
    gw.cancel(job_id)


def test_digits_format_with_a_dial_prefix(hylafax):
    gw = gateway(hylafax, number_format="digits", dial_prefix="9,")
    job_id = gw.submit(fax_job(number="(555) 555-0190")).job_id
    assert queue_file(hylafax.spool, job_id)["number"].strip() == "9,5555550190"
    gw.cancel(job_id)


def test_find_returns_the_job_of_a_key_and_none_for_an_unknown_key(hylafax):
    gw = gateway(hylafax)
    job = fax_job(key="REF-FIND-1/fax/1 (a key with spaces, \"quotes\" and \\)")
    job_id = gw.submit(job).job_id
    assert gw.find(job.key) == job_id
    assert gw.find("REF-NOT-SENT/fax/1") is None
    assert gw.find("REF-FIND-1/fax/1") is None           # a prefix of a key is not the key
    gw.cancel(job_id)
    assert gw.find(job.key) == job_id                     # still found once it is in doneq


def test_two_submits_get_two_job_ids(hylafax):
    gw = gateway(hylafax)
    first, second = gw.submit(fax_job()), gw.submit(fax_job())
    assert first.job_id != second.job_id
    for s in (first, second):
        gw.cancel(s.job_id)


def test_the_job_survives_its_first_seconds_thanks_to_lasttime(hylafax):
    """hfaxd's default kill time is 1970: a job without LASTTIME dies at once (next test)."""
    gw = gateway(hylafax)
    job_id = gw.submit(fax_job()).job_id
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        status = gw.status(job_id)
        assert status.status == Status.QUEUED, status
        time.sleep(0.2)
    assert queue_file(hylafax.spool, job_id)["state"].strip() in ("1", "2", "3", "4", "5")
    gw.cancel(job_id)


def test_without_lasttime_hylafax_kills_the_job_at_once(hylafax):
    """The pitfall the gateway avoids, shown with a plain ftplib session that skips LASTTIME."""
    ftp = ftplib.FTP()
    ftp.connect(hylafax.host, hylafax.port, timeout=10)
    ftp.sendcmd("USER pitfall")
    ftp.sendcmd("FORM PDF")
    tmp = re.search(r"FILE:\s*([^\s)]+)", ftp.storbinary("STOT", io.BytesIO(PDF))).group(1)
    job_id = re.search(r"jobid:\s*(\d+)", ftp.sendcmd("JNEW")).group(1)
    ftp.sendcmd('JPARM DIALSTRING "+15555550190"')
    ftp.sendcmd(f"JPARM DOCUMENT {tmp}")
    try:
        ftp.sendcmd("JSUBM")   # answered 460 (faxq NAKs it) or 200, depending on timing
    except ftplib.error_temp:
        pass
    ftp.quit()
    status = wait_for(gateway(hylafax), job_id, lambda s: s.status.final, timeout=5)
    assert status.status == Status.FAILED
    assert "Kill time expired" in status.detail


def test_cancel_moves_the_job_to_failed_in_doneq(hylafax):
    gw = gateway(hylafax)
    job_id = gw.submit(fax_job()).job_id
    gw.cancel(job_id)
    status = wait_for(gw, job_id, lambda s: s.status.final)
    assert status.status == Status.FAILED
    assert status.detail.startswith("FAILED") and "abort" in status.detail.lower()
    assert (hylafax.spool / "doneq" / f"q{job_id}").exists()
    gw.cancel(job_id)                                     # a finished job: nothing to do, no error


# -- failures ---------------------------------------------------------------------------------


class DropAfterJSUBM:
    """A TCP relay to hfaxd that passes JSUBM on, then hangs up on the client before the answer.

    The real hfaxd submits the job; the gateway sees its connection end with no reply: the
    submit's outcome is unknown, and find(key) is what settles it.
    """

    def __init__(self, server):
        self.upstream = (server.host, server.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(self.upstream, timeout=10)
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        tail = b""
        with client, server:
            while data := client.recv(65536):
                tail = (tail + data)[-64:]
                if b"JSUBM" in tail.upper():
                    self.dropped.set()                    # before hfaxd can answer: _pipe holds the answer back
                    server.sendall(data)
                    client.shutdown(socket.SHUT_RDWR)     # the gateway hears nothing more
                    time.sleep(0.5)                       # let hfaxd take the JSUBM before the session ends
                    return
                server.sendall(data)

    def _pipe(self, src, dst):
        try:
            while data := src.recv(65536):
                if not self.dropped.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        self.thread.join(timeout=5)


def test_a_submit_that_loses_its_answer_is_unknown_and_find_settles_it(hylafax):
    relay = DropAfterJSUBM(hylafax)
    try:
        job = fax_job()
        with pytest.raises(GatewayError) as exc:
            HylaFAXGateway({"host": "127.0.0.1", "port": relay.port, "timeout": 10}).submit(job)
        assert exc.value.outcome == "unknown"
        assert relay.dropped.is_set()
    finally:
        relay.close()
    gw = gateway(hylafax)
    job_id = gw.find(job.key)                             # the job hfaxd took: no second submit needed
    assert job_id is not None
    assert gw.status(job_id).status == Status.QUEUED
    assert queue_file(hylafax.spool, job_id)["jobtag"].strip() == job.key
    gw.cancel(job_id)


def test_a_submit_faxq_does_not_take_is_unknown_and_find_finds_nothing():
    """hfaxd answers JSUBM with 460 when it cannot reach faxq, and drops the job when the session ends."""
    hylafax_server.require()
    base = Path(tempfile.mkdtemp(prefix="hylafax-"))
    try:
        base.chmod(0o755)
        with hylafax_server.running(base, scheduler=False) as server:
            gw = gateway(server)
            job = fax_job()
            with pytest.raises(GatewayError, match="460") as exc:
                gw.submit(job)
            assert exc.value.outcome == "unknown"
            # hfaxd unlinks the unsubmitted job as the session ends, just after its 221 to our QUIT.
            deadline = time.monotonic() + 5
            while gw.find(job.key) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert gw.find(job.key) is None               # nothing was queued: submitting again is safe
            assert not list((server.spool / "sendq").glob("q*"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_connection_refused_is_retry():
    gw = HylaFAXGateway({"port": closed_port(), "timeout": 5})
    with pytest.raises(GatewayError) as exc:
        gw.submit(fax_job())
    assert exc.value.outcome == "retry"
    for call in (lambda: gw.status("1"), lambda: gw.find("REF-X/fax/1")):
        with pytest.raises(GatewayError) as exc:
            call()
        assert exc.value.outcome == "retry"


def test_status_of_an_unknown_job_is_rejected(hylafax):
    gw = gateway(hylafax)
    with pytest.raises(GatewayError, match="no job 31999") as exc:
        gw.status("31999")
    assert exc.value.outcome == "rejected"
    with pytest.raises(GatewayError) as exc:
        gw.status("1; JKILL 2")
    assert exc.value.outcome == "rejected"


def test_a_refused_login_is_rejected(hylafax):
    gw = gateway(hylafax, user=hylafax_server.REFUSED_USER)
    with pytest.raises(GatewayError, match="password") as exc:
        gw.submit(fax_job())
    assert exc.value.outcome == "rejected"


def test_a_password_from_the_environment(hylafax, monkeypatch):
    monkeypatch.setenv("HL7REFERRAL_TEST_FAX_PW", hylafax_server.PASSWORD)
    gw = gateway(hylafax, user=hylafax_server.PASSWORD_USER, password_env="HL7REFERRAL_TEST_FAX_PW")
    job = fax_job()
    job_id = gw.submit(job).job_id
    assert queue_file(hylafax.spool, job_id)["owner"].strip() == hylafax_server.PASSWORD_USER
    assert gw.find(job.key) == job_id
    gw.cancel(job_id)
    monkeypatch.setenv("HL7REFERRAL_TEST_FAX_PW", "wrong")
    gw = gateway(hylafax, user=hylafax_server.PASSWORD_USER, password_env="HL7REFERRAL_TEST_FAX_PW")
    with pytest.raises(GatewayError) as exc:   # hfaxd waits a couple of seconds before its 530
        gw.submit(fax_job())
    assert exc.value.outcome == "rejected" and "530" in str(exc.value)


def test_numbers_and_documents_that_cannot_be_sent_are_rejected_before_connecting():
    gw = HylaFAXGateway({"port": closed_port()})   # nothing listens: a connection would be "retry"
    for number in ("1-800-FLOWERS", "+1 555 0190 ext 12", "12", ""):
        with pytest.raises(GatewayError) as exc:
            gw.submit(fax_job(number=number))
        assert exc.value.outcome == "rejected", number
    with pytest.raises(GatewayError) as exc:
        gw.submit(FaxJob(key="REF-1/fax/1", number=NUMBER, pdf=b"not a pdf", referral_id="REF-1"))
    assert exc.value.outcome == "rejected"
    with pytest.raises(GatewayError) as exc:
        gw.submit(fax_job(key="REF-1/fax/1\r\nJKILL 1"))
    assert exc.value.outcome == "rejected"
    with pytest.raises(GatewayError) as exc:
        gw.parse_callback(b"{}", {})
    assert exc.value.outcome == "rejected"


def test_dialstring():
    e164 = HylaFAXGateway({})
    assert e164.dialstring("+1-555-555-0190") == "+15555550190"
    assert e164.dialstring(" +1 (555) 555.0190 ") == "+15555550190"
    assert e164.dialstring("555-0190") == "5550190"     # HylaFAX's dial rules add country and area
    digits = HylaFAXGateway({"number_format": "digits", "dial_prefix": "9,"})
    assert digits.dialstring("+1-555-555-0190") == "9,15555550190"


@pytest.mark.parametrize("settings, key", [
    ({"hots": "x"}, "hots"),
    ({"port": "4559"}, "port"),
    ({"port": 70000}, "port"),
    ({"port": True}, "port"),
    ({"host": ""}, "host"),
    ({"user": "two words"}, "user"),
    ({"timeout": 0}, "timeout"),
    ({"lasttime": "3h"}, "lasttime"),
    ({"lasttime": "002400"}, "lasttime"),
    ({"lasttime": "000000"}, "lasttime"),
    ({"lasttime": 300}, "lasttime"),
    ({"maxdials": 0}, "maxdials"),
    ({"maxtries": "3"}, "maxtries"),
    ({"resolution": "high"}, "resolution"),
    ({"notify": "always"}, "notify"),
    ({"number_format": "raw"}, "number_format"),
    ({"dial_prefix": "9w"}, "dial_prefix"),
    ({"dial_prefix": "9"}, "dial_prefix"),             # needs number_format "digits"
    ({"password_env": "NO-SUCH VAR"}, "password_env"),
    ({"password_env": "HL7REFERRAL_NO_SUCH_VARIABLE"}, "password_env"),
])
def test_bad_settings_name_the_key(settings, key):
    with pytest.raises(GatewaySettingsError) as exc:
        HylaFAXGateway(settings)
    assert exc.value.key == key


def test_the_entry_point_builds_the_gateway():
    gw = load_gateway("hylafax", {"host": "127.0.0.1", "port": 4559})
    assert isinstance(gw, HylaFAXGateway)
    assert gw.name == "hylafax" and gw.supports_callbacks is False
