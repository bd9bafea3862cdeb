"""hl7referral.store.relay: whose referral it is, and the 360X answers owed to the other end.

Checked as a coordinator would: what is owed once, what was packed into which outbox row,
what could not go and why (the relay row, the alert with its owner, the audit trail), and
that a store written before the two sides existed (schema v6) opens with its referrals kept
and taken as ours (initiator).
"""

from __future__ import annotations

import sqlite3

import pytest

from hl7referral.store import Store
from hl7referral.store import sqlite as store_sqlite
from hl7referral.store.audit import AuditLog
from hl7referral.store.loop import Loop
from hl7referral.store.relay import INITIATOR, RECIPIENT, Relay, Side

AT = "2026-11-23T10:00:00Z"
LATER = "2026-11-23T10:01:00Z"
REF = "990001@1.3.6.1.4.1.99999.1.15"
PARTNER = "referrals@direct.sender.test"
OSU = b"MSH|^~\\&||^1.2^ISO||^1.3^ISO|20261123100000+0000||OSU^O51^OSU_O51|HRA1-OKIP|P|2.5.1\rORC|OK|990001\r"


@pytest.fixture
def relay(store) -> Relay:
    Loop(store).open_referral(REF, at=AT, channel="from-referrers")
    r = Relay(store)
    r.set_side(REF, RECIPIENT, PARTNER, at=AT)
    return r


def owe(relay: Relay, key: str = f"{REF}/ACCEPTED/1", **kw):
    args = dict(key=key, at=AT, referral_id=REF, kind="ACCEPTED", message_type="OSU^O51^OSU_O51", message=OSU,
                document=None, recipient=PARTNER)
    args.update(kw)
    return relay.add(**args)


def audit(store: Store, event: str) -> list[dict]:
    return [r for r in AuditLog(store).rows(referral_id=REF) if r["event"] == event]


# -- sides ---------------------------------------------------------------------------------------

def test_a_referral_is_ours_until_said_otherwise(store):
    loop, relay = Loop(store), Relay(store)
    assert relay.side_of(REF) is None   # no such referral
    loop.open_referral(REF, at=AT)
    assert relay.side_of(REF) == Side(INITIATOR, "")
    relay.set_side(REF, RECIPIENT, PARTNER, at=AT)
    assert relay.side_of(REF) == Side(RECIPIENT, PARTNER)
    relay.set_side(REF, INITIATOR, "", at=LATER)
    assert relay.side_of(REF) == Side(INITIATOR, "")
    relay.set_side("never-seen", RECIPIENT, PARTNER, at=AT)   # names nothing: nothing made up
    assert relay.side_of("never-seen") is None and Loop(store).get("never-seen") is None


# -- answers owed --------------------------------------------------------------------------------

def test_the_same_key_is_owed_once(relay, store):
    first = owe(relay)
    assert isinstance(first, int)
    assert owe(relay) is None
    assert owe(relay, at=LATER, message=OSU + b"NTE|1\r") is None   # same key, other bytes: still the first
    other = owe(relay, key=f"{REF}/BOOKED/1", kind="BOOKED", message_type="SIU^S12^SIU_S12")
    assert other == first + 1
    rows = relay.list(REF)
    assert [(r["key"], r["kind"], r["recipient"], r["message_size"]) for r in rows] == [
        (f"{REF}/ACCEPTED/1", "ACCEPTED", PARTNER, len(OSU)), (f"{REF}/BOOKED/1", "BOOKED", PARTNER, len(OSU))]
    [pending] = [r for r in relay.pending() if r["id"] == first]
    assert pending["message"] == OSU and pending["document"] is None
    owed = audit(store, "answer-owed")
    assert [(r["outcome"], r["detail"]) for r in owed] == [
        ("ACCEPTED", f"OSU^O51^OSU_O51 for {PARTNER}"), ("BOOKED", f"SIU^S12^SIU_S12 for {PARTNER}")]


def test_a_packed_row_is_never_pending_again(relay, store):
    rid = owe(relay, document=b"<ClinicalDocument/>", kind="CONSULT_NOTE", key=f"{REF}/CONSULT_NOTE/1")
    relay.packed(rid, outbox_id=42, at=LATER)
    assert relay.pending() == []
    [row] = relay.list(REF)
    assert (row["outbox_id"], row["packed_at"], row["error"], row["document_size"]) == (42, LATER, None, 19)
    assert owe(relay, document=b"<ClinicalDocument/>", kind="CONSULT_NOTE", key=f"{REF}/CONSULT_NOTE/1") is None
    relay.retry(rid)   # a packed row has nothing to retry
    assert relay.pending() == []
    [packed] = audit(store, "answer-packed")
    assert (packed["outcome"], packed["detail"], packed["actor"]) == ("CONSULT_NOTE", f"relay #{rid} -> outbox #42",
                                                                      "direct")


def test_a_row_that_cannot_go_keeps_its_reason_alerts_its_owner_and_can_be_retried(relay, store):
    rid = owe(relay)
    why = f"no usable certificate for {PARTNER} (none found)"
    relay.failed(rid, error=why, at=LATER, owner="coordinator:kim")
    assert relay.pending() == []   # not tried again every tick
    [row] = relay.list(REF)
    assert (row["error"], row["packed_at"]) == (why, None)
    [alert] = Loop(store).alerts(REF)
    assert (alert["kind"], alert["owner"]) == ("answer-not-sent", "coordinator:kim")
    assert why in alert["text"] and "ACCEPTED" in alert["text"]
    [audited] = audit(store, "answer-not-sent")
    assert (audited["outcome"], audited["detail"]) == ("ACCEPTED", why)

    relay.retry(rid)   # the certificate arrived
    assert [r["id"] for r in relay.pending()] == [rid]
    relay.packed(rid, outbox_id=7, at=LATER)
    [row] = relay.list(REF)
    assert (row["error"], row["outbox_id"]) == (None, 7)
    assert AuditLog(store).verify().ok


def test_list_and_pending_are_in_the_order_owed(relay):
    ids = [owe(relay, key=f"{REF}/k{i}") for i in range(5)]
    assert [r["id"] for r in relay.pending(limit=3)] == ids[:3]
    assert [r["id"] for r in relay.list()] == ids
    assert relay.list("another-referral") == []


# -- migration v7 --------------------------------------------------------------------------------

def test_a_v6_store_upgrades_with_its_referrals_kept_as_ours(tmp_path, monkeypatch):
    path = tmp_path / "v6.db"
    with monkeypatch.context() as m:
        m.setattr(store_sqlite, "_MIGRATIONS", store_sqlite._MIGRATIONS[:6])
        old = Store.open(path)
        assert old.conn.execute("PRAGMA user_version").fetchone()[0] == 6
        assert old.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'relay'").fetchone() is None
        Loop(old).open_referral(REF, at=AT, channel="ref-i12", contact={"phone": "5550100"})
        Loop(old).open_referral("SAMPLEREF0001", at=LATER, channel="ref-i12")
        with pytest.raises(sqlite3.OperationalError):
            old.conn.execute("SELECT side FROM referrals")
        old.close()

    s = Store.open(path)
    try:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == len(store_sqlite._MIGRATIONS) >= 7
        rows = s.conn.execute("SELECT referral_id, state, contact, side, partner FROM referrals "
                              "ORDER BY referral_id").fetchall()
        assert rows == [(REF, "RECEIVED", '{"phone": "5550100"}', "initiator", None),
                        ("SAMPLEREF0001", "RECEIVED", "{}", "initiator", None)]
        relay = Relay(s)
        assert relay.side_of(REF) == Side(INITIATOR, "")
        assert relay.list() == [] and relay.pending() == []
        assert owe(relay) is not None and owe(relay) is None   # the new table keeps its unique key
        assert AuditLog(s).verify().ok
    finally:
        s.close()
