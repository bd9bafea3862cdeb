"""The fax agent against a real HTTP fax API on loopback: one fax per attempt, the right final state.

The store is a real SQLite file with a real Referral Note built from samples/ref-i12.hl7;
the API is tests/fax_api_server.py over TCP; time is passed in (seconds from a test
clock), so retries, polls and deadlines run without sleeping.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import hylafax_server
from fax_api_server import FaxApiServer
from hl7referral.cda.pipeline import Pipeline
from hl7referral.config import load_engine
from hl7referral.config.direct import DirectConfig
from hl7referral.config.fax import FaxConfig
from hl7referral.engine.direct import DirectAgent
from hl7referral.engine.fax import FaxAgent
from hl7referral.engine.ingest import hl7_timestamp
from hl7referral.fax.gateway import load_gateway
from hl7referral.send import read_messages
from hl7referral.store import ACCEPTED, Inbound, Store
from hl7referral.store.outbox import Outbox

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000.0
NUMBER = "+1-555-555-0190"


@pytest.fixture(scope="module")
def referral():
    cfg = load_engine(None)
    raw = read_messages(ROOT / "samples" / "ref-i12.hl7")[0]
    channel = next(c for c in cfg.channels if c.name == "ref-i12")
    result = Pipeline(cfg.mappings, cfg.directory, None, local_root=cfg.local_root).run(
        raw, channel, now=hl7_timestamp(T0))
    assert result.document is not None
    return raw, result


@pytest.fixture
def outbox(tmp_path, referral):
    store = Store.open(tmp_path / "fax.db")
    yield Outbox(store)
    store.close()


@pytest.fixture
def api():
    with FaxApiServer() as server:
        yield server


def settings(api: FaxApiServer, **extra) -> dict:
    return {"url": api.url, "auth_env": "TEST_FAX_TOKEN", "status_url": api.status_url, "timeout": 2.0, **extra}


def make_agent(outbox: Outbox, api: FaxApiServer, monkeypatch, config: FaxConfig | None = None, **extra) -> FaxAgent:
    monkeypatch.setenv("TEST_FAX_TOKEN", "Bearer test-token")
    config = config or FaxConfig(from_name="Sample Clinic", from_fax="+1-555-555-0100", first_delay=60.0,
                                 max_delay=600.0, max_attempts=4, poll_interval=30.0, final_timeout=3600.0,
                                 callback_url="http://127.0.0.1:9/fax/callback")
    return FaxAgent(config, outbox, {}, gateways={"": load_gateway("http-fax", settings(api, **extra))})


def store_note(outbox: Outbox, referral, referral_id: str, number: str = NUMBER) -> int:
    """A referral and its Referral Note stored as the engine stores them; returns the document id."""
    raw, result = referral
    store = outbox.store
    stored = store.commit_batch([Inbound(raw=raw + referral_id.encode(), received_at="t", status=ACCEPTED,
                                         sending_application="EHR", sending_facility="CLINIC",
                                         control_id=referral_id, channel="ref-i12", referral_id=referral_id)])
    doc = store.save_document(message_id=stored[0].message_id, channel="ref-i12", referral_id=referral_id,
                              status="ready", xml=result.document, reasons=[], created_at="t",
                              destination='{"name": "Example Cardiology Associates", "fax": "%s"}' % number)
    return doc


def queue_fax(outbox: Outbox, referral, referral_id: str = "SAMPLEREF0001", number: str = NUMBER) -> dict:
    """A stored referral queued for fax, as a fax-first channel does."""
    doc = store_note(outbox, referral, referral_id, number)
    q = DirectAgent(DirectConfig(), outbox).enqueue_fax(referral_id=referral_id, document_id=doc, channel="ref-i12",
                                                        number=number, now=T0, detail="fax-first")
    return outbox.get(q.id)


def state(outbox: Outbox, row_id: int) -> str:
    return outbox.get(row_id)["state"]


def alerts(outbox: Outbox) -> list[dict]:
    return [a for a in outbox.store.list_alerts() if a["kind"] == "fax-failed"]


def test_a_queued_fax_goes_once_as_a_pdf_and_callbacks_settle_it(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch)
    row = queue_fax(outbox, referral)
    agent.tick(T0)
    assert len(api.faxes) == 1
    fax = api.faxes[0]
    assert fax.pdf.startswith(b"%PDF") and fax.number == "+15555550190"
    assert fax.reference == "SAMPLEREF0001/fax/1" and fax.callback_url.endswith("/fax/callback/ref-i12")
    got = outbox.get(row["id"])
    assert (got["state"], got["job_id"], got["gateway"]) == ("SUBMITTED", fax.job_id, "http-fax@default")
    assert got["payload"] == fax.pdf  # rendered once, kept: a retry sends these bytes

    # Duplicated and out-of-order callbacks: sending, delivered, sending again, delivered again.
    for status in ("in_progress", "success", "in_progress", "success"):
        body, headers = api.callback_request(fax.job_id, status, key=fax.reference)
        agent.store_callback("ref-i12", body, {k.lower(): v for k, v in headers.items()}, T0 + 5)
    agent.tick(T0 + 5)
    assert state(outbox, row["id"]) == "DELIVERED"
    results = [c["result"] for c in reversed(outbox.list_callbacks())]
    assert results == ["applied", "applied", "stale", "stale"]
    events = [e["event"] for e in outbox.events(outbox_id=row["id"])]
    assert events == ["queued", "rendered", "submitting", "submitted", "status-sending", "status-delivered",
                      "status-stale", "status-stale"]
    agent.tick(T0 + 10_000)
    assert len(api.faxes) == 1 and alerts(outbox) == []


def test_a_submit_that_times_out_is_looked_up_before_it_is_sent_again(outbox, api, referral, monkeypatch):
    api.forget_idempotency = True      # only find() can stop a second fax now
    agent = make_agent(outbox, api, monkeypatch, find_url=api.find_url, timeout=0.5)
    row = queue_fax(outbox, referral)
    api.delay_next_post(1.5)           # the fax is created, the answer comes too late
    agent.tick(T0)
    got = outbox.get(row["id"])
    assert got["state"] == "RETRY_WAIT" and got["find_first"] == 1 and got["next_attempt_at"] == T0 + 60
    agent.tick(T0 + 59)
    assert len(api.faxes) == 1
    agent.tick(T0 + 60)
    got = outbox.get(row["id"])
    assert got["state"] == "SUBMITTED" and got["job_id"] == api.faxes[0].job_id
    assert len(api.faxes) == 1
    assert "found the job of an earlier try" in outbox.events(outbox_id=row["id"])[-1]["detail"]


def test_a_crash_between_the_gateways_answer_and_our_commit_sends_no_second_fax(outbox, api, referral, monkeypatch):
    api.forget_idempotency = True      # the worst case: only the lookup by key can tell
    agent = make_agent(outbox, api, monkeypatch, find_url=api.find_url)
    row = queue_fax(outbox, referral)

    class Died(BaseException):
        pass

    real_submit = agent.routes[""].gateway.submit

    def submit_then_die(job):
        real_submit(job)               # the gateway has the fax ...
        raise Died()                   # ... and the engine dies before it records the job id
    monkeypatch.setattr(agent.routes[""].gateway, "submit", submit_then_die)
    with pytest.raises(Died):
        agent.tick(T0)
    assert outbox.get(row["id"])["state"] == "QUEUED" and len(api.faxes) == 1

    restarted = make_agent(outbox, api, monkeypatch, find_url=api.find_url)
    restarted.tick(T0 + 1)
    got = outbox.get(row["id"])
    assert got["state"] == "SUBMITTED" and got["job_id"] == api.faxes[0].job_id
    assert len(api.faxes) == 1


def test_an_idempotent_api_answers_the_resubmit_with_the_same_job(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch, timeout=0.5)   # no find_url: the Idempotency-Key does it
    row = queue_fax(outbox, referral)
    api.delay_next_post(1.5)
    agent.tick(T0)
    assert state(outbox, row["id"]) == "RETRY_WAIT"
    agent.tick(T0 + 60)
    assert len(api.faxes) == 1 and outbox.get(row["id"])["job_id"] == api.faxes[0].job_id
    assert {r.headers.get("idempotency-key") for r in api.requests if r.method == "POST"} == {"SAMPLEREF0001/fax/1"}


def test_a_job_id_the_gateway_already_gave_another_fax_is_not_merged(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch)
    first = queue_fax(outbox, referral, "REF-A")
    agent.tick(T0)
    second = queue_fax(outbox, referral, "REF-B")
    api.reuse_job_id()
    agent.tick(T0 + 1)
    assert state(outbox, first["id"]) == "SUBMITTED"
    assert state(outbox, second["id"]) == "FAILED"
    [alert] = alerts(outbox)
    assert alert["referral_id"] == "REF-B" and f"outbox #{first['id']}" in alert["text"]
    # A callback for that job id still reaches only the attempt that owns it.
    body, headers = api.callback_request(api.faxes[0].job_id, "success", key="REF-A/fax/1")
    agent.store_callback("ref-i12", body, {k.lower(): v for k, v in headers.items()}, T0 + 2)
    agent.tick(T0 + 2)
    assert state(outbox, first["id"]) == "DELIVERED" and state(outbox, second["id"]) == "FAILED"


def test_5xx_retries_with_backoff_then_fails_with_one_alert(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch)
    row = queue_fax(outbox, referral)
    api.force(503, count=10, method="POST")
    now = T0
    for delay in (60, 120, 240):
        agent.tick(now)
        got = outbox.get(row["id"])
        assert got["state"] == "RETRY_WAIT" and got["next_attempt_at"] == now + delay
        now += delay
    agent.tick(now)
    assert state(outbox, row["id"]) == "FAILED" and outbox.get(row["id"])["attempts"] == 4
    assert len(alerts(outbox)) == 1 and api.faxes == []
    agent.tick(now + 10_000)
    assert len(alerts(outbox)) == 1


def test_a_rejected_number_fails_at_once(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch)
    row = queue_fax(outbox, referral)
    api.force(422, body={"error": "invalid fax number"}, method="POST")
    agent.tick(T0)
    assert state(outbox, row["id"]) == "FAILED" and "422" in alerts(outbox)[0]["text"]


def test_a_callback_that_overtakes_the_submit_answer_settles_the_attempt(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch, timeout=0.5)
    row = queue_fax(outbox, referral)
    api.delay_next_post(1.5)
    agent.tick(T0)
    assert state(outbox, row["id"]) == "RETRY_WAIT"
    job = api.faxes[0].job_id
    body, headers = api.callback_request(job, "in_progress", key="SAMPLEREF0001/fax/1")
    agent.store_callback("ref-i12", body, {k.lower(): v for k, v in headers.items()}, T0 + 1)
    agent.tick(T0 + 1)
    got = outbox.get(row["id"])
    assert (got["state"], got["job_id"]) == ("SENDING", job)
    agent.tick(T0 + 600)                 # the retry that was due is not made
    assert len(api.faxes) == 1


def test_a_callback_for_a_job_not_yet_known_waits_for_it(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch)
    body, headers = api.callback_request("job-from-the-future", "success")
    agent.store_callback("ref-i12", body, {k.lower(): v for k, v in headers.items()}, T0)
    agent.tick(T0)
    assert outbox.list_callbacks()[0]["result"] is None       # kept, not yet matched
    agent.tick(T0 + 3601)
    assert outbox.list_callbacks()[0]["result"] == "no such job"


def test_refused_callbacks_are_kept_and_change_nothing(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch, callback_token_env="TEST_CB_TOKEN")
    monkeypatch.setenv("TEST_CB_TOKEN", "s3cret")
    row = queue_fax(outbox, referral)
    agent.tick(T0)
    body, _ = api.callback_request(api.faxes[0].job_id, "success")
    cid, refused = agent.store_callback("ref-i12", body, {"content-type": "application/json"}, T0 + 1)
    assert refused and outbox.list_callbacks()[0]["result"].startswith("refused")
    agent.tick(T0 + 1)
    assert state(outbox, row["id"]) == "SUBMITTED"


def test_polling_reads_the_final_state_and_a_silent_gateway_times_out(outbox, api, referral, monkeypatch):
    agent = make_agent(outbox, api, monkeypatch)
    delivered, silent = queue_fax(outbox, referral, "REF-A"), queue_fax(outbox, referral, "REF-B")
    agent.tick(T0)
    jobs = {f.reference: f.job_id for f in api.faxes}
    api.set_status(jobs["REF-A/fax/1"], "success", pages=4)
    agent.tick(T0 + 29)
    assert state(outbox, delivered["id"]) == "SUBMITTED"       # not yet time to poll
    agent.tick(T0 + 30)
    assert state(outbox, delivered["id"]) == "DELIVERED"
    assert state(outbox, silent["id"]) == "SUBMITTED"
    polls = [e for e in outbox.events(outbox_id=silent["id"]) if e["event"].startswith("status")]
    assert polls == []                 # a poll that only confirms "queued" writes no audit row
    agent.tick(T0 + 3600)
    assert state(outbox, silent["id"]) == "FAILED"
    assert [a["referral_id"] for a in alerts(outbox)] == ["REF-B"]


def test_no_gateway_or_no_number_fails_with_an_alert(outbox, api, referral, monkeypatch):
    agent = FaxAgent(FaxConfig(), outbox, {}, gateways={})
    row = queue_fax(outbox, referral)
    agent.tick(T0)
    assert state(outbox, row["id"]) == "FAILED" and "no fax gateway" in alerts(outbox)[0]["text"]
    agent = make_agent(outbox, api, monkeypatch)
    row = queue_fax(outbox, referral, "REF-NONUM", number="")
    agent.tick(T0)
    assert state(outbox, row["id"]) == "FAILED" and api.faxes == []


def test_direct_that_cannot_start_or_gets_no_mdn_in_time_goes_by_fax(tmp_path, direct_pki, outbox, api, referral,
                                                                     monkeypatch):
    """Direct → fax fallback on "no certificate" and on "no MDN in time", on a test clock."""
    from twisted.internet.task import Clock

    from hl7referral.engine.direct import Enqueued
    from hl7referral.engine.smtp_client import SendResult

    clock = Clock()
    clock.advance(float(int(time.time())))   # the example certificates are valid from yesterday
    config = DirectConfig(address="referrals@direct.sender.test", certificate=direct_pki / "sender.pem",
                          key=direct_pki / "sender.key", chain=(direct_pki / "intermediate.pem",),
                          certificates_dir=direct_pki, anchors={"*": (direct_pki / "anchor.pem",)})
    direct = DirectAgent(config, outbox)
    direct.load()
    fax = make_agent(outbox, api, monkeypatch)
    _, result = referral

    # No certificate for the address: Direct does not start; the channel's next transport is fax.
    from hl7referral.engine.direct_service import DirectService
    empty = tmp_path / "no-certificates"
    empty.mkdir()
    cfg = load_engine(None, overrides=[f'direct.certificate="{direct_pki / "sender.pem"}"',
                                       f'direct.key="{direct_pki / "sender.key"}"',
                                       f'direct.chain=["{direct_pki / "intermediate.pem"}"]',
                                       f'direct.crls=["{direct_pki / "intermediate.crl.pem"}"]',
                                       f'direct.anchors.0.files=["{direct_pki / "anchor.pem"}"]',
                                       f'direct.certificates_dir="{empty}"'])
    service = DirectService(cfg, outbox.store, clock, clock=clock)   # not started: _dispatch runs here
    service.agent.load()
    service.enabled = True
    doc = store_note(outbox, referral, "SAMPLEREF0001")
    raw, result = referral
    assert service._dispatch(doc, "ref-i12", "SAMPLEREF0001", result.document, raw, result.destination,
                             result.referral) == "fax"
    [nocert] = outbox.list(referral_id="SAMPLEREF0001", transport="fax")
    assert "no usable certificate for cardiology@direct.receiver.test" in \
        outbox.events(outbox_id=nocert["id"])[0]["detail"]
    fax.tick(clock.seconds())
    assert state(outbox, nocert["id"]) == "SUBMITTED"
    assert [f.reference for f in api.faxes] == ["SAMPLEREF0001/fax/1"]

    # Sent, but no MDN within processed_timeout: TIMED_OUT, and a fax attempt is queued.
    doc = store_note(outbox, referral, "REF-NOMDN")           # the stored note the fallback renders
    sent = direct.enqueue_referral(referral_id="REF-NOMDN", document_id=doc, channel="ref-i12",
                                   cda=result.document, order=None, patient_id="MRN1^^^&2.16.840.1.113883.19.5&ISO",
                                   recipient="cardiology@direct.receiver.test", now=clock.seconds())
    assert isinstance(sent, Enqueued)
    direct.on_send_result(outbox.get(sent.id), SendResult("delivered", 250, "2.0.0 ok"), clock.seconds())
    clock.advance(3600 - 1)
    assert direct.check_timeouts(clock.seconds()) == []
    clock.advance(1)
    assert direct.check_timeouts(clock.seconds()) == [sent.id]
    fallback = [r for r in outbox.list(referral_id="REF-NOMDN", transport="fax") if r["state"] == "QUEUED"]
    assert len(fallback) == 1 and fallback[0]["recipient"] == NUMBER
    assert "fallback: Direct TIMED_OUT" in outbox.events(outbox_id=fallback[0]["id"])[0]["detail"]
    fax.tick(clock.seconds())
    assert state(outbox, fallback[0]["id"]) == "SUBMITTED"
    assert [f.reference for f in api.faxes][-1] == "REF-NOMDN/fax/1" and len(api.faxes) == 2


hylafax = hylafax_server.hylafax   # a private HylaFAX (faxq + hfaxd) on loopback, for this module


def test_a_real_hylafax_takes_the_referral_and_the_agent_reads_back_its_queued_state(outbox, referral, hylafax):
    gateway = load_gateway("hylafax", {"host": hylafax.host, "port": hylafax.port, "timeout": 10.0})
    agent = FaxAgent(FaxConfig(poll_interval=30.0), outbox, {}, gateways={"": gateway})
    row = queue_fax(outbox, referral)
    agent.tick(T0)
    got = outbox.get(row["id"])
    assert got["state"] == "SUBMITTED" and got["gateway"] == "hylafax@default" and got["job_id"].isdigit()
    queue_file = (hylafax.spool / "sendq" / f"q{got['job_id']}").read_text(errors="replace")
    assert "jobtag:SAMPLEREF0001/fax/1" in queue_file and "15555550190" in queue_file
    agent.tick(T0 + 30)                 # the poll: hfaxd says the job waits (no modem here)
    assert gateway.status(got["job_id"]).status.value == "queued"
    assert outbox.get(row["id"])["state"] == "SUBMITTED"
    assert outbox.get(row["id"])["next_attempt_at"] == T0 + 60
    assert gateway.find("SAMPLEREF0001/fax/1") == got["job_id"]
    gateway.cancel(got["job_id"])
    agent.tick(T0 + 60)
    assert outbox.get(row["id"])["state"] == "FAILED"     # "Job aborted by request", with an alert
    assert "aborted" in alerts(outbox)[0]["text"].lower()


def test_a_lookup_that_fails_after_an_unknown_submit_keeps_looking(outbox, api, referral, monkeypatch):
    api.forget_idempotency = True
    agent = make_agent(outbox, api, monkeypatch, find_url=api.find_url, timeout=0.5)
    row = queue_fax(outbox, referral)
    api.delay_next_post(1.5)
    agent.tick(T0)                                   # unknown: the API made the fax
    api.force(503, method="GET")                     # ... and cannot be asked just now
    agent.tick(T0 + 60)
    got = outbox.get(row["id"])
    assert got["state"] == "RETRY_WAIT" and got["find_first"] == 1
    agent.tick(T0 + 180)
    assert outbox.get(row["id"])["job_id"] == api.faxes[0].job_id
    assert len(api.faxes) == 1


def test_job_ids_are_per_route_and_an_old_finished_attempt_does_not_block_a_reused_id(outbox, referral, monkeypatch):
    monkeypatch.setenv("TEST_FAX_TOKEN", "Bearer test-token")
    with FaxApiServer() as one, FaxApiServer() as two:      # two providers: both number from fax-0001
        gateways = {"": load_gateway("http-fax", settings(one)), "vet": load_gateway("http-fax", settings(two))}
        agent = FaxAgent(FaxConfig(), outbox, {}, gateways=gateways)
        a = queue_fax(outbox, referral, "REF-A")
        b = queue_fax(outbox, referral, "REF-B")
        outbox.update(b["id"], event="test", at="t", channel="vet")
        agent.tick(T0)
        rows = [outbox.get(a["id"]), outbox.get(b["id"])]
        assert [r["state"] for r in rows] == ["SUBMITTED", "SUBMITTED"]
        assert rows[0]["job_id"] == rows[1]["job_id"] and rows[0]["gateway"] != rows[1]["gateway"]

        # A rebuilt HylaFAX spool numbers from 1 again: a finished attempt's id may come back.
        body, headers = one.callback_request(rows[0]["job_id"], "success", key="REF-A/fax/1")
        agent.store_callback("ref-i12", body, {k.lower(): v for k, v in headers.items()}, T0 + 1)
        agent.tick(T0 + 1)
        assert state(outbox, a["id"]) == "DELIVERED"
        c = queue_fax(outbox, referral, "REF-C")
        one.reuse_job_id(rows[0]["job_id"])
        agent.tick(T0 + 2)
        assert state(outbox, c["id"]) == "SUBMITTED" and alerts(outbox) == []


def test_a_channel_without_fax_after_direct_gets_no_fax(tmp_path, direct_pki, outbox, api, referral):
    from hl7referral.engine.smtp_client import SendResult
    config = DirectConfig(address="referrals@direct.sender.test", certificate=direct_pki / "sender.pem",
                          key=direct_pki / "sender.key", chain=(direct_pki / "intermediate.pem",),
                          certificates_dir=direct_pki, anchors={"*": (direct_pki / "anchor.pem",)})
    direct = DirectAgent(config, outbox)
    direct.load()
    direct.fax_after_direct = {"some-other-channel"}
    now = float(int(time.time()))
    _, result = referral
    sent = direct.enqueue_referral(referral_id="REF-DIRECT-ONLY", document_id=None, channel="ref-i12",
                                   cda=result.document, order=None, patient_id="MRN1^^^&2.16.840.1.113883.19.5&ISO",
                                   recipient="cardiology@direct.receiver.test", now=now)
    direct.on_send_result(outbox.get(sent.id), SendResult("failed", 554, "5.7.1 refused"), now)
    assert outbox.list(referral_id="REF-DIRECT-ONLY", transport="fax") == []
    audit = [e for e in outbox.events(limit=1000) if e["event"] == "no-fallback"]
    assert audit and "lists no transport after direct" in audit[0]["detail"]
