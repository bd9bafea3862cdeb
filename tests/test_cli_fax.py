"""`hl7referral fax ...` and the fax configuration, run as an analyst runs them (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fax_api_server import FaxApiServer
from hl7referral.engine.fax import FaxAgent
from hl7referral.config.fax import FaxConfig
from hl7referral.fax.gateway import load_gateway
from hl7referral.store import Store
from hl7referral.store.outbox import Outbox
from test_cli_direct import CLI, no_traceback
from test_fax_agent import T0, queue_fax, referral  # noqa: F401 (referral: the module fixture)

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def api_settings(api: FaxApiServer) -> list[str]:
    values = {"fax.gateway.gateway": '"http-fax"', "fax.gateway.url": f'"{api.url}"',
              "fax.gateway.status_url": f'"{api.status_url}"', "fax.gateway.auth_env": '"TEST_FAX_TOKEN"'}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture
def sent(tmp_path, referral, monkeypatch):  # noqa: F811
    """A store with one fax attempt submitted to a running fake API."""
    monkeypatch.setenv("TEST_FAX_TOKEN", "Bearer test-token")
    with FaxApiServer() as api:
        store = Store.open(tmp_path / "engine.db")
        outbox = Outbox(store)
        gateway = load_gateway("http-fax", {"url": api.url, "status_url": api.status_url, "auth_env": "TEST_FAX_TOKEN"})
        row = queue_fax(outbox, referral)
        FaxAgent(FaxConfig(), outbox, {}, gateways={"": gateway}).tick(T0)
        store.close()
        yield tmp_path / "engine.db", row["id"], api


def test_fax_gateways_lists_the_plugins_and_each_channels_gateway():
    done = run("fax", "gateways")
    no_traceback(done)
    assert done.returncode == 0
    assert "plugin hylafax: hl7referral.fax.hylafax:HylaFAXGateway" in done.stdout
    assert "plugin http-fax: hl7referral.fax.http_api:HttpFaxGateway" in done.stdout
    assert "channel ref-i12: hylafax ([fax.gateway])" in done.stdout


def test_fax_outbox_and_status(sent):
    store, row_id, api = sent
    done = run("fax", "outbox", "--store", str(store))
    no_traceback(done)
    job = api.faxes[0].job_id
    assert done.returncode == 0 and "SUBMITTED" in done.stdout and f"job=http-fax@default:{job}" in done.stdout
    [row] = json.loads(run("fax", "outbox", "--store", str(store), "--json").stdout)
    assert row["referral_id"] == "SAMPLEREF0001" and row["transport"] == "fax"

    api.set_status(job, "success")
    done = run("fax", "status", str(row_id), "--store", str(store), *api_settings(api),
               env={"TEST_FAX_TOKEN": "Bearer test-token"})
    no_traceback(done)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"http-fax job {job}: delivered" in done.stdout and "stored state SUBMITTED" in done.stdout

    done = run("fax", "status", "999", "--store", str(store))
    assert done.returncode == 2 and "no fax attempt #999" in done.stderr


def test_fax_status_says_when_the_gateway_cannot_tell(sent):
    store, row_id, api = sent
    api.force(503, count=5)
    done = run("fax", "status", str(row_id), "--store", str(store), *api_settings(api),
               env={"TEST_FAX_TOKEN": "Bearer test-token"})
    no_traceback(done)
    assert done.returncode == 1 and "retry" in done.stdout


def test_fax_callbacks_lists_what_became_of_each(sent):
    store, _, api = sent
    s = Store.open(store)
    outbox = Outbox(s)
    body, headers = api.callback_request(api.faxes[0].job_id, "success", key="SAMPLEREF0001/fax/1")
    gateway = load_gateway("http-fax", {"url": api.url, "status_url": api.status_url})
    agent = FaxAgent(FaxConfig(), outbox, {}, gateways={"": gateway})
    agent.store_callback("ref-i12", body, {k.lower(): v for k, v in headers.items()}, T0 + 1)
    agent.tick(T0 + 1)
    s.close()
    done = run("fax", "callbacks", "--store", str(store))
    no_traceback(done)
    assert done.returncode == 0 and "success" not in done.stdout and "delivered" in done.stdout
    assert "applied" in done.stdout


def test_a_channel_fax_table_with_a_wrong_key_is_refused_with_file_line_and_key(tmp_path):
    channels = tmp_path / "channels"
    channels.mkdir()
    (channels / "directory.toml").write_text((REPO / "channels" / "directory.toml").read_text())
    (channels / "ref.toml").write_text(
        'name = "ref"\nmapping = "ref-i12"\ntransports = ["fax"]\n\n[source]\nlistener = "main"\n'
        'accept = ["REF^I12"]\n\n[destination]\nby = "npi"\n\n[fax]\ngateway = "http-fax"\n'
        'url = "https://fax.example.com/v1/faxes"\nstatus_url = "https://fax.example.com/v1/faxes/{id}"\n'
        'numbr_field = "to"\n')
    done = run("check", "--set", f'channels.dir="{channels}"')
    no_traceback(done)
    assert done.returncode == 2
    assert f"{channels / 'ref.toml'}:16: fax.numbr_field:" in done.stderr, done.stderr

    text = (channels / "ref.toml").read_text()
    (channels / "ref.toml").write_text(text.replace('gateway = "http-fax"', 'gateway = "carrier-pigeon"'))
    done = run("check", "--set", f'channels.dir="{channels}"')
    assert done.returncode == 2 and "no fax gateway plugin 'carrier-pigeon'" in done.stderr
