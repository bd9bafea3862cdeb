"""The MLLP server protocol and factory, driven by StringTransport and task.Clock."""

import dataclasses

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hl7referral.config import load_engine
from hl7referral.engine.ingest import Ingest, Reply, policy_for
from hl7referral.engine.mllp import MLLPServerFactory
from hl7referral.store import Store
from hl7referral.v2.framer import Frame, MLLPFramer, encode_frame
from hl7referral.v2.header import read_header
from committers import ManualCommitter
from messages import ref_i12

CONFIG = load_engine()
LISTENER = CONFIG.listeners[0]


def settings(**kw):
    return dataclasses.replace(LISTENER, **kw)


class Rig:
    def __init__(self, tmp_path, auto=True, fail=None, **kw):
        self.clock = Clock()
        self.store = Store.open(tmp_path / "s.db")
        self.settings = settings(**kw)
        self.committer = ManualCommitter(self.store, auto=auto, fail=fail)
        self.ingest = Ingest("main", policy_for(self.settings, CONFIG.channels), self.committer, self.clock)
        self.factory = MLLPServerFactory(self.settings, self.ingest, self.clock)

    def connect(self, host="127.0.0.1", port=40000):
        proto = self.factory.buildProtocol(IPv4Address("TCP", host, port))
        if proto is None:
            return None, None
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(transport)
        return proto, transport


def acks(transport):
    return [e.payload for e in MLLPFramer().feed(transport.value()) if isinstance(e, Frame)]


def msa(ack):
    seg = [s for s in ack.split(b"\r") if s.startswith(b"MSA")][0].split(b"|")
    return seg[1].decode(), seg[2].decode()


def test_pipelined_frames_get_acks_in_order(tmp_path):
    """Test 8: 20 frames back to back, 20 ACKs in order, MSA-2 = MSH-10."""
    rig = Rig(tmp_path)
    proto, t = rig.connect()
    proto.dataReceived(b"".join(encode_frame(ref_i12(f"P{i}")) for i in range(20)))
    assert [msa(a) for a in acks(t)] == [("AA", f"P{i}") for i in range(20)]
    assert rig.store.count(status="accepted") == 20


class ControlledIngest:
    def __init__(self):
        self.pending = []

    def receive(self, payload, peer):
        d = Deferred()
        self.pending.append((read_header(payload).control_id, d))
        return d


def test_replies_resolved_out_of_order_still_leave_in_order(tmp_path):
    rig = Rig(tmp_path)
    rig.factory.ingest = ControlledIngest()
    proto, t = rig.connect()
    proto.dataReceived(b"".join(encode_frame(ref_i12(f"O{i}")) for i in range(3)))
    (_, d0), (_, d1), (_, d2) = rig.factory.ingest.pending
    d2.callback(Reply(b"MSH|^~\\&|\rMSA|AA|O2\r"))
    d1.callback(Reply(b"MSH|^~\\&|\rMSA|AA|O1\r"))
    assert t.value() == b""  # nothing may overtake O0
    d0.callback(Reply(b"MSH|^~\\&|\rMSA|AA|O0\r"))
    assert [msa(a)[1] for a in acks(t)] == ["O0", "O1", "O2"]


def test_no_ack_before_commit(tmp_path):
    rig = Rig(tmp_path, auto=False)
    proto, t = rig.connect()
    proto.dataReceived(encode_frame(ref_i12("W1")))
    assert t.value() == b"" and rig.store.count() == 0
    rig.committer.finish()
    assert msa(acks(t)[0]) == ("AA", "W1") and rig.store.count() == 1


def test_store_failure_is_ar_207_never_aa(tmp_path):
    rig = Rig(tmp_path, fail="database is locked")
    proto, t = rig.connect()
    proto.dataReceived(b"".join(encode_frame(ref_i12(f"F{i}")) for i in range(5)))
    replies = acks(t)
    assert [msa(a)[0] for a in replies] == ["AR"] * 5
    assert all(b"207^" in a for a in replies)


def test_store_failure_silent_sends_nothing_and_closes(tmp_path):
    rig = Rig(tmp_path, fail="x", on_store_failure="silent")
    rig.ingest.on_store_failure = "silent"
    proto, t = rig.connect()
    proto.dataReceived(encode_frame(ref_i12("S1")))
    assert t.value() == b"" and t.disconnecting


def test_duplicate_gets_identical_ack_and_is_stored_once(tmp_path):
    rig = Rig(tmp_path)
    proto, t = rig.connect()
    proto.dataReceived(encode_frame(ref_i12("D1")))
    first = acks(t)[0]
    rig.clock.advance(5)  # a later timestamp would change a rebuilt ACK
    proto.dataReceived(encode_frame(ref_i12("D1")))
    assert acks(t) == [first, first]
    assert rig.store.count(status="accepted") == 1


def test_same_id_different_content_is_ae_205(tmp_path):
    rig = Rig(tmp_path)
    proto, t = rig.connect()
    proto.dataReceived(encode_frame(ref_i12("D2")))
    proto.dataReceived(encode_frame(ref_i12("D2", rf1="RF1|P|R|MED|RP|O|REF0002")))
    second = acks(t)[1]
    assert msa(second) == ("AE", "D2") and b"205^" in second
    rows = rig.store.list_messages(control_id="D2")
    assert sorted(r["status"] for r in rows) == ["accepted", "rejected"]


def test_not_hl7_frame_gets_no_ack_is_kept_and_closes(tmp_path):
    rig = Rig(tmp_path)
    proto, t = rig.connect()
    proto.dataReceived(encode_frame(b"<?xml version='1.0'?><x/>"))
    assert t.value() == b"" and t.disconnecting
    assert rig.store.count(status="not_hl7") == 1


@pytest.mark.parametrize("hello", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                                   b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_tls_hello_or_http_on_plain_port_is_closed_without_ack(tmp_path, hello):
    rig = Rig(tmp_path)
    proto, t = rig.connect()
    proto.dataReceived(hello)
    assert t.value() == b"" and t.disconnecting


def test_some_junk_then_a_valid_frame_is_processed(tmp_path):
    rig = Rig(tmp_path)
    proto, t = rig.connect()
    proto.dataReceived(b"\x00\x00\r\n" + encode_frame(ref_i12("J1")))
    assert msa(acks(t)[0]) == ("AA", "J1") and not t.disconnecting


def test_too_much_junk_closes(tmp_path):
    rig = Rig(tmp_path, max_junk_bytes=100)
    proto, t = rig.connect()
    proto.dataReceived(b"x" * 101)
    assert t.disconnecting


def test_oversized_frame_gets_ae_104_then_close(tmp_path):
    rig = Rig(tmp_path, max_frame_bytes=2048)
    proto, t = rig.connect()
    proto.dataReceived(b"\x0b" + ref_i12("BIG1") + b"NTE|" + b"x" * 4000)
    ack = acks(t)[0]
    assert msa(ack) == ("AE", "BIG1") and b"104^" in ack and t.disconnecting
    row = rig.store.list_messages(control_id="BIG1")[0]
    assert row["status"] == "rejected" and row["size"] <= 4096


def test_first_frame_deadline(tmp_path):
    rig = Rig(tmp_path, first_frame_timeout=30.0)
    proto, t = rig.connect()
    rig.clock.advance(29.9)
    assert not t.disconnecting
    rig.clock.advance(0.2)
    assert t.disconnecting


def test_slowloris_frame_deadline_even_with_trickling_bytes(tmp_path):
    rig = Rig(tmp_path, first_frame_timeout=0, frame_timeout=30.0, idle_timeout=3600.0)
    proto, t = rig.connect()
    proto.dataReceived(b"\x0bMSH")
    for _ in range(5):
        rig.clock.advance(5)
        proto.dataReceived(b"|")
    assert not t.disconnecting
    rig.clock.advance(5.1)
    assert t.disconnecting


def test_idle_timeout_between_messages_resets_on_traffic(tmp_path):
    rig = Rig(tmp_path, idle_timeout=60.0)
    proto, t = rig.connect()
    proto.dataReceived(encode_frame(ref_i12("I1")))
    rig.clock.advance(59)
    proto.dataReceived(encode_frame(ref_i12("I2")))
    rig.clock.advance(59)
    assert not t.disconnecting
    rig.clock.advance(2)
    assert t.disconnecting


def test_connection_caps(tmp_path):
    rig = Rig(tmp_path, max_connections=5, max_connections_per_peer=2)
    assert rig.connect("10.0.0.1")[0] and rig.connect("10.0.0.1")[0]
    assert rig.connect("10.0.0.1")[0] is None  # per-peer cap
    protos = [rig.connect(f"10.0.0.{i}")[0] for i in (2, 3, 4)]
    assert all(protos) and rig.connect("10.0.0.9")[0] is None  # total cap
    protos[0].connectionLost()
    assert rig.connect("10.0.0.9")[0] is not None  # a slot freed


def test_backpressure_pauses_reading_until_commits_drain(tmp_path):
    rig = Rig(tmp_path, auto=False, max_in_flight=4)
    proto, t = rig.connect()
    proto.dataReceived(b"".join(encode_frame(ref_i12(f"B{i}")) for i in range(6)))
    assert t.producerState == "paused"
    rig.committer.finish()
    assert t.producerState == "producing" and len(acks(t)) == 6
