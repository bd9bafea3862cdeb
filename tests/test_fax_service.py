"""The fax service in-process: its timer on a test Clock, its callback listener over real HTTP.

The reactor runs on a thread (tests/reactor_thread.py); the service's LoopingCall and
the agent's notion of "now" run on a ``task.Clock``, so the final-status deadline of a
day passes in one ``advance``.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.error
import urllib.request

import pytest
from twisted.internet.task import Clock

from fax_api_server import FaxApiServer
from hl7referral.config import load_engine
from hl7referral.engine.fax_service import MAX_CALLBACK, FaxService
from hl7referral.fax.gateway import load_gateway
from hl7referral.store import Store
from hl7referral.store.outbox import Outbox
from reactor_thread import call, running_reactor
from test_direct_engine import free_port
from test_fax_agent import T0, queue_fax, referral  # noqa: F401 (referral: the module fixture)


@pytest.fixture
def service(tmp_path, referral, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TEST_FAX_TOKEN", "Bearer test-token")
    reactor = running_reactor()
    port = free_port()
    cfg = load_engine(None, overrides=[f'fax.callbacks.endpoint="tcp:{port}:interface=127.0.0.1"',
                                       f'fax.callbacks.url="http://127.0.0.1:{port}/fax/callback"'])
    cfg = dataclasses.replace(cfg, fax=dataclasses.replace(cfg.fax, final_timeout=86400.0, poll_interval=600.0))
    clock = Clock()
    clock.advance(T0)
    store = Store.open(tmp_path / "engine.db")
    with FaxApiServer() as api:
        gateway = load_gateway("http-fax", {"url": api.url, "status_url": api.status_url,
                                            "auth_env": "TEST_FAX_TOKEN"})
        svc = FaxService(cfg, store, reactor, clock=clock, gateways={"": gateway})
        call(reactor, svc.startService)
        call(reactor, svc.listen_callbacks)
        # The test's own connection: the service's store belongs to its fax thread (one connection, one thread).
        mine = Store.open(tmp_path / "engine.db")
        yield svc, clock, api, f"http://127.0.0.1:{port}/fax/callback", Outbox(mine)
        call(reactor, svc.stopService)
        mine.close()
    store.close()


def tick(svc: FaxService, clock: Clock, seconds: float = 0.0) -> None:
    """Advance the test clock, then wait for the tick it fired (or run one) to finish."""
    reactor = running_reactor()
    call(reactor, clock.advance, seconds)
    deadline = time.monotonic() + 30
    while call(reactor, lambda: svc.tick() or "busy") == "busy":   # the tick the advance fired still runs
        assert time.monotonic() < deadline, "the fax tick never finished"
        time.sleep(0.01)


def test_a_day_without_a_final_status_fails_the_fax_on_the_test_clock(service, referral):  # noqa: F811
    svc, clock, api, _, outbox = service
    row = queue_fax(outbox, referral)
    tick(svc, clock)
    assert outbox.get(row["id"])["state"] == "SUBMITTED"
    tick(svc, clock, 86400 - 1)
    assert outbox.get(row["id"])["state"] == "SUBMITTED"
    tick(svc, clock, 1)
    assert outbox.get(row["id"])["state"] == "FAILED"
    assert [a["kind"] for a in outbox.store.list_alerts()] == ["fax-failed"]
    assert len(api.faxes) == 1


def test_the_callback_listener_answers_after_the_commit_and_refuses_what_it_cannot_use(service, referral):  # noqa
    svc, clock, api, url, outbox = service
    row = queue_fax(outbox, referral)
    tick(svc, clock)
    job = api.faxes[0].job_id
    twice = [(job, "success", "SAMPLEREF0001/fax/1")] * 2
    codes = api.send_callbacks(f"{url}/ref-i12", twice)
    assert codes == [200, 200]
    assert len(outbox.list_callbacks()) == 2          # both stored before their 200
    tick(svc, clock)
    assert outbox.get(row["id"])["state"] == "DELIVERED"
    assert api.send_callbacks(f"{url}/no-such-channel", [(job, "success")]) == [400]
    assert api.send_callbacks(f"{url}/ref-i12", [(job, "no-such-word")]) == [400]
    request = urllib.request.Request(f"{url}/ref-i12", data=b"x" * (MAX_CALLBACK + 1), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 413
    refused = [c for c in outbox.list_callbacks() if (c["result"] or "").startswith("refused")]
    assert len(refused) == 2                               # kept, with why, for the audit
