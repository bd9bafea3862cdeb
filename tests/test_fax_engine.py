"""The whole fax path through a running engine, over real sockets.

An MLLP client sends a REF^I12 to an engine whose Direct transport finds no
certificate for the specialist; the channel's next transport, fax, renders the
Referral Note as a PDF and submits it to a real HTTP fax API on loopback
(tests/fax_api_server.py); the API's status callbacks come back, duplicated and
out of order, to the engine's callback listener.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from engine_process import EngineProcess
from fax_api_server import FaxApiServer
from test_direct_engine import direct_settings, free_port, outbox, rows, send_referral, wait_for

PDFTOTEXT = shutil.which("pdftotext")


@pytest.fixture
def fax_engine(tmp_path, monkeypatch, direct_pki):
    monkeypatch.setenv("TEST_FAX_TOKEN", "Bearer test-token")
    empty = tmp_path / "no-certificates"
    empty.mkdir()
    callbacks = free_port()
    with FaxApiServer() as api:
        # Direct is on (our identity, a relay address) but knows no certificate for anyone.
        direct = direct_settings(direct_pki, free_port(), free_port(), **{"direct.certificates_dir": f'"{empty}"'})
        settings = {
            "fax.gateway.gateway": '"http-fax"', "fax.gateway.url": f'"{api.url}"',
            "fax.gateway.status_url": f'"{api.status_url}"', "fax.gateway.auth_env": '"TEST_FAX_TOKEN"',
            "fax.gateway.timeout": "5.0",
            "fax.callbacks.endpoint": f'"tcp:{callbacks}:interface=127.0.0.1"',
            "fax.callbacks.url": f'"http://127.0.0.1:{callbacks}/fax/callback"',
        }
        engine = EngineProcess.start(tmp_path, *direct,
                                     *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")])
        yield engine, api, f"http://127.0.0.1:{callbacks}/fax/callback/ref-i12"
        engine.stop()


def test_no_certificate_falls_back_to_one_fax_and_callbacks_settle_it(fax_engine, tmp_path):
    engine, api, callback_url = fax_engine
    send_referral(engine)
    wait_for(lambda: api.faxes, what="the fax at the API")
    fax = api.faxes[0]
    assert fax.number == "+15555550190" and fax.reference == "SAMPLEREF0001/fax/1"
    assert fax.callback_url == callback_url
    if PDFTOTEXT is None and not os.environ.get("CI"):
        pytest.skip("pdftotext not installed (Debian: poppler-utils)")
    (tmp_path / "fax.pdf").write_bytes(fax.pdf)
    text = subprocess.run([PDFTOTEXT, str(tmp_path / "fax.pdf"), "-"], capture_output=True, check=True).stdout
    assert b"SAMPLEREF0001" in text and b"Alex" in text and b"5555550100" in text.replace(b"-", b"")
    row = wait_for(lambda: [r for r in outbox(engine.store) if r["transport"] == "fax" and r["job_id"]],
                   what="the job id stored")[0]
    assert row["state"] == "SUBMITTED" and row["job_id"] == fax.job_id
    skipped = rows(engine.store, "SELECT detail FROM transport_events WHERE event = 'direct-skipped'")
    assert skipped and "no usable certificate" in skipped[0]["detail"]

    codes = api.send_callbacks(callback_url, [(fax.job_id, "success", fax.reference),
                                              (fax.job_id, "in_progress", fax.reference),
                                              (fax.job_id, "success", fax.reference)])
    assert codes == [200, 200, 200]
    wait_for(lambda: [r for r in outbox(engine.store) if r["state"] == "DELIVERED"], what="DELIVERED")
    results = wait_for(lambda: [c["result"] for c in rows(engine.store, "SELECT result FROM fax_callbacks ORDER BY id")
                                if c["result"]] if len(rows(engine.store, "SELECT id FROM fax_callbacks "
                                                                          "WHERE applied_at IS NOT NULL")) == 3
                       else None, what="all callbacks applied")
    assert results == ["applied", "stale", "stale"]
    assert len(api.faxes) == 1
    assert api.send_callbacks(callback_url.replace("ref-i12", "no-such-channel"),
                              [(fax.job_id, "success")]) == [400]
    assert "Sample" not in engine.log and "Alex" not in engine.log
