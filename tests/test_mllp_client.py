"""The outbound MLLP sender: protocol on StringTransport + Clock, sender on MemoryReactorClock,
then real TCP (and TLS) against a misbehaving receiver (``mllp_peer.Peer``).

For every misbehaviour the tests check what a user would: no false delivery (a send
succeeds only on an ACK whose MSA-2 is its control id), nothing lost (after a failure
the caller's resend arrives; every message reaches the peer), each Deferred fired
exactly once, and, independently, that the peer's python-hl7 reads exactly the bytes
that were sent.
"""

from __future__ import annotations

import gc
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import hl7
import pytest
from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport, StringTransportWithDisconnection
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from hl7referral.engine.ingest import hl7_timestamp
from hl7referral.engine.mllp_client import MLLPClientFactory, MLLPSender, SendFailed
from hl7referral.v2.ack_match import AckResult
from hl7referral.v2.framer import Frame, MLLPFramer, encode_frame
from hl7referral.v2.mdm import ConsultNote, build_mdm_t02
from mllp_peer import Peer, refused_port
from reactor_thread import call, running_reactor

REFERRAL = "889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO"
NOW = hl7_timestamp(1767268800)
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 64 + b"\n%%EOF\n"


def mdm(control_id: str, *, document: bytes | None = None) -> bytes:
    """A synthetic consult note (MDM^T02) with MSH-10 = ``control_id``."""
    if document is None:
        n = ConsultNote(REFERRAL, f"DOC-{control_id}", text=f"Consult note {control_id}\nSynthetic | text ^ only.",
                        patient_ids="T7190334^^^&1.3.6.1.4.1.21367.2016.10.1.21.5&ISO^MRN",
                        patient_name="Testpatient^Alex")
    else:
        n = ConsultNote(REFERRAL, f"DOC-{control_id}", document=document, media_type="application/pdf")
    return build_mdm_t02(n, control_id=control_id, now_hl7=NOW, sending=("SPECIALIST", "SPECFAC"),
                         receiving=("EHR", "CLINIC"))


def ack(control_id: str, code: str = "AA") -> bytes:
    return f"MSH|^~\\&|EHR|CLINIC|SPECIALIST|SPECFAC|{NOW}||ACK^T02^ACK|A-{control_id}|P|2.5.1\r" \
           f"MSA|{code}|{control_id}\r".encode()


def frames(data: bytes) -> list[bytes]:
    return [e.payload for e in MLLPFramer().feed(data) if isinstance(e, Frame)]


class Outcome:
    """Records every firing of a Deferred (a second one would be a bug)."""

    def __init__(self, d: defer.Deferred) -> None:
        self.fired: list = []
        d.addCallbacks(self.fired.append, lambda f: self.fired.append(f.value))

    @property
    def value(self):
        assert len(self.fired) == 1, self.fired
        return self.fired[0]

    @property
    def pending(self) -> bool:
        return not self.fired


@pytest.fixture(autouse=True)
def no_logged_errors():
    """No unhandled error (a Deferred fired twice, a failure nobody consumed) during a test."""
    errors: list = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    yield errors
    gc.collect()  # "Unhandled error in Deferred" is reported when the Deferred is collected
    globalLogPublisher.removeObserver(observe)
    assert not errors, [e.get("log_failure") or e.get("log_format") for e in errors]


# == the protocol alone: StringTransport + Clock ===========================================


def connection(**kw):
    clock = Clock()
    factory = MLLPClientFactory(clock, **({"ack_timeout": 5.0} | kw))
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, factory, proto, transport


def test_protocol_writes_one_frame_and_accepts_its_ack_in_1_byte_chunks():
    clock, factory, proto, t = connection()
    out = Outcome(proto.send("M1", mdm("M1")))
    assert t.value() == encode_frame(mdm("M1"))
    data = encode_frame(ack("M1"))
    for byte in data[:-2]:
        proto.dataReceived(bytes([byte]))
        assert out.pending
    proto.dataReceived(data[-2:-1])  # <FS> ends the frame (the framer's invariant)
    proto.dataReceived(data[-1:])
    assert out.value == AckResult("accept", "AA", "M1")
    assert not proto.busy and not clock.getDelayedCalls()  # the timer was cancelled


def test_protocol_ignores_a_mismatched_ack_and_keeps_waiting():
    clock, factory, proto, t = connection()
    out = Outcome(proto.send("M2", mdm("M2")))
    proto.dataReceived(encode_frame(ack("M1")))
    clock.advance(4.9)
    assert out.pending and factory.counts["mismatch"] == 1
    proto.dataReceived(encode_frame(ack("M2", "AE")))
    assert out.value.kind == "error" and out.value.control_id == "M2"


def test_protocol_ignores_frames_that_are_not_acks():
    clock, factory, proto, t = connection()
    out = Outcome(proto.send("M1", mdm("M1")))
    proto.dataReceived(b"junk" + encode_frame(b"not hl7") + encode_frame(mdm("X9")) + b"\r\n")
    assert out.pending and factory.counts["not_ack"] == 2
    proto.dataReceived(encode_frame(ack("M1")))
    assert out.value.delivered


def test_protocol_timeout_fails_the_send_and_drops_the_connection():
    clock, factory, proto, t = connection()
    out = Outcome(proto.send("M1", mdm("M1")))
    clock.advance(5.0)
    failure = out.value
    assert isinstance(failure, SendFailed) and failure.reason == "no ACK in 5 s" and failure.written
    assert t.disconnected  # aborted
    proto.dataReceived(encode_frame(ack("M1")))  # the late ACK on the dropped connection
    assert len(out.fired) == 1 and factory.counts["accept"] == 0
    proto.connectionLost(Failure(ConnectionDone()))
    assert len(out.fired) == 1


def test_protocol_connection_lost_fails_the_send_once():
    clock, factory, proto, t = connection()
    out = Outcome(proto.send("M1", mdm("M1")))
    proto.connectionLost(Failure(ConnectionDone("peer closed")))
    assert isinstance(out.value, SendFailed) and "connection lost" in out.value.reason
    clock.advance(10)
    assert len(out.fired) == 1 and not clock.getDelayedCalls()


def test_protocol_duplicate_ack_with_nothing_in_flight_is_ignored():
    clock, factory, proto, t = connection()
    out = Outcome(proto.send("M1", mdm("M1")))
    proto.dataReceived(encode_frame(ack("M1")) * 2)
    assert out.value.delivered and factory.counts == factory.counts | {"accept": 1, "unexpected": 1}


def test_protocol_second_ack_of_m1_is_not_taken_for_m2():
    """M2 is written from M1's callback, before the duplicate in the same read is looked at."""
    clock, factory, proto, t = connection()
    second: list[Outcome] = []

    def send_next(result):  # what the sender does when M1 is settled
        second.append(Outcome(proto.send("M2", mdm("M2"))))
        return result

    first = Outcome(proto.send("M1", mdm("M1")).addCallback(send_next))
    proto.dataReceived(encode_frame(ack("M1")) * 2)
    assert first.value.delivered
    assert second[0].pending and factory.counts["mismatch"] == 1
    clock.advance(5.0)
    assert isinstance(second[0].value, SendFailed)


def test_protocol_waits_for_the_application_ack_when_asked():
    clock, factory, proto, t = connection(need_application_ack=True)
    out = Outcome(proto.send("M1", mdm("M1")))
    proto.dataReceived(encode_frame(ack("M1", "CA")))
    assert out.pending and factory.counts["commit"] == 1
    proto.dataReceived(encode_frame(ack("M1", "AA")))
    assert out.value.code == "AA"


def test_protocol_commit_accept_is_delivery_by_default():
    clock, factory, proto, t = connection()
    out = Outcome(proto.send("M1", mdm("M1")))
    proto.dataReceived(encode_frame(ack("M1", "CA")))
    assert out.value.delivered and out.value.code == "CA"


def test_protocol_oversized_inbound_frame_drops_the_connection():
    clock, factory, proto, t = connection(max_frame_bytes=64)
    out = Outcome(proto.send("M1", mdm("M1")))
    proto.dataReceived(b"\x0b" + b"x" * 100)
    assert isinstance(out.value, SendFailed) and "larger than 64" in out.value.reason
    assert t.disconnected


def test_protocol_refuses_a_second_message_in_flight_and_a_closing_connection():
    clock, factory, proto, t = connection()
    first = Outcome(proto.send("M1", mdm("M1")))
    second = Outcome(proto.send("M2", mdm("M2")))
    assert isinstance(second.value, SendFailed) and not second.value.written
    assert t.value() == encode_frame(mdm("M1"))
    clock.advance(5)
    assert isinstance(first.value, SendFailed)
    third = Outcome(proto.send("M3", mdm("M3")))
    assert isinstance(third.value, SendFailed) and third.value.reason == "connection is closing"


# == the sender on MemoryReactorClock =====================================================


class MemoryRig:
    def __init__(self, **kw):
        self.reactor = MemoryReactorClock()
        self.sender = MLLPSender("tcp:127.0.0.1:2575", self.reactor, retry_policy=lambda attempt: 1.0,
                                 **({"ack_timeout": 5.0, "name": "test-out"} | kw))
        self.sender.startService()
        self.transport: StringTransportWithDisconnection | None = None

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    def accept(self) -> StringTransportWithDisconnection:
        """Complete the latest connection attempt."""
        factory = self.reactor.tcpClients[-1][2]
        proto = factory.buildProtocol(None)
        t = StringTransportWithDisconnection()
        t.protocol = proto
        proto.makeConnection(t)
        self.transport = t
        return t

    def refuse(self) -> None:
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))

    def written(self) -> list[bytes]:
        out = frames(self.transport.value())
        self.transport.clear()
        return out

    def answer(self, control_id: str, code: str = "AA") -> None:
        self.transport.protocol.dataReceived(encode_frame(ack(control_id, code)))


def test_sender_keeps_one_message_in_flight_in_order():
    rig = MemoryRig()
    outs = [Outcome(rig.sender.send(c, mdm(c))) for c in ("M1", "M2", "M3")]
    assert rig.sender.pending == 3
    rig.accept()
    for i, c in enumerate(("M1", "M2", "M3")):
        assert rig.written() == [mdm(c)]  # only the head is on the wire
        assert all(o.pending for o in outs[i:])
        rig.answer(c)
    assert [o.value.kind for o in outs] == ["accept"] * 3
    assert rig.sender.pending == 0 and rig.attempts == 1


def test_sender_error_and_reject_are_answers_the_queue_goes_on():
    rig = MemoryRig()
    rig.accept()
    outs = [Outcome(rig.sender.send(c, mdm(c))) for c in ("M1", "M2", "M3")]
    for c, code in (("M1", "AE"), ("M2", "AR"), ("M3", "AA")):
        assert rig.written() == [mdm(c)]
        rig.answer(c, code)
    assert [o.value.kind for o in outs] == ["error", "reject", "accept"]


def test_sender_connection_refused_fails_the_head_and_the_queue_unwritten():
    rig = MemoryRig()
    outs = [Outcome(rig.sender.send(c, mdm(c))) for c in ("M1", "M2", "M3")]
    rig.refuse()
    failures = [o.value for o in outs]
    assert all(isinstance(f, SendFailed) and not f.written for f in failures)
    assert failures[0].reason.startswith("cannot connect")
    assert failures[1].reason.startswith("not sent: cannot connect") and "M1" in failures[1].reason
    assert [f.control_id for f in failures] == ["M1", "M2", "M3"]
    assert rig.sender.pending == 0


def test_sender_timeout_drops_the_connection_and_a_resend_reconnects():
    rig = MemoryRig()
    rig.accept()
    resent: list[Outcome] = []

    def resend(failure):  # what a caller's outbox does: send again from the errback
        resent.append(Outcome(rig.sender.send("M1", mdm("M1"))))
        return failure

    first = Outcome(rig.sender.send("M1", mdm("M1")).addErrback(resend))
    assert rig.written() == [mdm("M1")]
    rig.reactor.advance(5.0)
    assert isinstance(first.value, SendFailed) and first.value.reason == "no ACK in 5 s"
    assert rig.transport.disconnected
    assert resent[0].pending and rig.attempts == 1
    rig.reactor.advance(0)  # the dropped connection is forgotten on the next turn
    rig.reactor.advance(1.0)  # ClientService's retry delay
    assert rig.attempts == 2
    rig.accept()
    assert rig.written() == [mdm("M1")]
    rig.answer("M1")
    assert resent[0].value.delivered


def test_sender_connection_lost_fails_in_flight_written_and_queue_unwritten():
    rig = MemoryRig()
    rig.accept()
    outs = [Outcome(rig.sender.send(c, mdm(c))) for c in ("M1", "M2")]
    rig.transport.loseConnection()
    assert outs[0].value.written and "connection lost" in outs[0].value.reason
    assert not outs[1].value.written
    rig.reactor.advance(1.0)
    rig.accept()
    later = Outcome(rig.sender.send("M3", mdm("M3")))
    assert rig.written() == [mdm("M3")]
    rig.answer("M3")
    assert later.value.delivered


def test_sender_resends_from_errbacks_keep_their_order():
    rig = MemoryRig()
    rig.accept()
    resent: dict[str, Outcome] = {}

    def again(failure, c):
        resent[c] = Outcome(rig.sender.send(c, mdm(c)))

    for c in ("M1", "M2", "M3"):
        rig.sender.send(c, mdm(c)).addErrback(again, c)
    rig.reactor.advance(5.0)  # M1 times out; M2, M3 fail unwritten; all three resent in order
    rig.reactor.advance(0)
    rig.reactor.advance(1.0)
    rig.accept()
    for c in ("M1", "M2", "M3"):
        assert rig.written() == [mdm(c)]
        rig.answer(c)
    assert [resent[c].value.kind for c in ("M1", "M2", "M3")] == ["accept"] * 3


def test_sender_stop_fails_every_pending_send_with_stopping():
    rig = MemoryRig()
    rig.accept()
    outs = [Outcome(rig.sender.send(c, mdm(c))) for c in ("M1", "M2")]
    stopped = Outcome(rig.sender.stopService())
    assert [o.value.reason for o in outs] == ["stopping", "stopping"]
    assert [o.value.written for o in outs] == [True, False]
    assert stopped.value is None and not rig.sender.running
    rig.answer("M1")  # an ACK racing the close changes nothing
    assert [len(o.fired) for o in outs] == [1, 1]
    after = Outcome(rig.sender.send("M3", mdm("M3")))
    assert after.value.reason == "sender is not running"


def test_sender_stop_while_connecting_fails_the_waiting_send():
    rig = MemoryRig()
    out = Outcome(rig.sender.send("M1", mdm("M1")))
    Outcome(rig.sender.stopService())
    assert out.value.reason == "stopping" and not out.value.written


@pytest.mark.parametrize("control_id,payload,match", [
    ("M2", mdm("M1"), "MSH-10"),
    ("", mdm("M1"), "MSH-10"),
    ("M1", mdm("M1").replace(b"Synthetic", b"Synth\x1ctic"), "framing"),
    ("M1", b"<xml/>", "not an HL7 message"),
])
def test_sender_refuses_payloads_no_resend_could_deliver(control_id, payload, match):
    rig = MemoryRig()
    with pytest.raises(ValueError, match=match):
        rig.sender.send(control_id, payload)
    assert rig.sender.pending == 0


# == real TCP against a misbehaving peer ===================================================


ACK_TIMEOUT = 1.0
FAST_RETRY = backoffPolicy(initialDelay=0.05, maxDelay=0.2, jitter=lambda: 0.0)


@pytest.fixture(scope="module")
def reactor():
    return running_reactor()


@pytest.fixture
def peer():
    p = Peer().start()
    yield p
    p.stop()


def start_sender(reactor, endpoint: str, **kw) -> MLLPSender:
    settings = {"ack_timeout": ACK_TIMEOUT, "retry_policy": FAST_RETRY, "name": "test-peer"} | kw
    sender = MLLPSender(endpoint, reactor, **settings)
    call(reactor, sender.startService)
    return sender


@pytest.fixture
def sender(reactor, peer):
    s = start_sender(reactor, f"tcp:127.0.0.1:{peer.port}")
    yield s
    call(reactor, s.stopService)


def send_all(reactor, sender: MLLPSender, control_ids, *, payloads=None, timeout=20.0) -> list:
    """Send several messages in one reactor turn; their outcomes in order (AckResult or SendFailed).

    Each Deferred is counted as it fires; the outcome list is built only when all have
    fired once.
    """
    payloads = payloads or {c: mdm(c) for c in control_ids}
    fired = {c: 0 for c in control_ids}

    def go():
        ds = []
        for c in control_ids:
            def count(result, c=c):
                fired[c] += 1
                return result

            def failed(f):
                f.trap(SendFailed)
                return f.value

            ds.append(sender.send(c, payloads[c]).addBoth(count).addErrback(failed))
        return defer.gatherResults(ds)

    results = call(reactor, go, timeout=timeout)
    assert all(n == 1 for n in fired.values()), fired
    return results


def send_one(reactor, sender, control_id, **kw):
    return send_all(reactor, sender, [control_id], **kw)[0]


def assert_received_as_sent(peer: Peer, expected: dict[str, bytes]) -> None:
    """The independent check: python-hl7 (in the peer) read every frame, byte-identical to what was sent."""
    for r in peer.received:
        assert r.parse_error == ""
        assert r.payload == expected[r.control_id]
        msg = hl7.parse(r.payload.decode("utf-8"))
        assert str(msg.segment("MSH")[9]) == "MDM^T02^MDM_T02" and str(msg["MSH.F10"]) == r.control_id


def assert_one_at_a_time(peer: Peer) -> None:
    """No frame arrived on a connection before the previous one there was answered."""
    rs = peer.received
    for a, b in zip(rs, rs[1:]):
        if a.connection == b.connection and a.answered is not None:
            assert b.arrived >= a.answered


def test_tcp_accepts_in_order_and_the_peer_reads_the_same_bytes(reactor, peer, sender):
    docs = {"T1": mdm("T1"), "T2": mdm("T2", document=PDF), "T3": mdm("T3")}
    results = send_all(reactor, sender, list(docs), payloads=docs)
    assert [(r.kind, r.control_id) for r in results] == [("accept", c) for c in docs]
    assert peer.control_ids() == list(docs) and peer.connections == 1
    assert_received_as_sent(peer, docs)
    assert_one_at_a_time(peer)


def test_tcp_error_and_reject_are_not_deliveries_and_the_queue_goes_on(reactor, peer, sender):
    peer.plan("E1", "ae")
    peer.plan("E2", "ar")
    results = send_all(reactor, sender, ["E1", "E2", "E3"])
    assert [(r.kind, r.delivered) for r in results] == [("error", False), ("reject", False), ("accept", True)]
    assert peer.control_ids() == ["E1", "E2", "E3"]


def test_tcp_late_ack_times_out_drops_the_connection_and_the_resend_arrives(reactor, peer, sender):
    peer.plan("L1", "late:2.0")
    failed = send_one(reactor, sender, "L1")
    assert isinstance(failed, SendFailed) and failed.reason == "no ACK in 1 s" and failed.written
    result = send_one(reactor, sender, "L1")  # the caller's resend
    assert result.delivered and result.control_id == "L1"
    time.sleep(1.5)  # past the late ACK: it met a closed connection
    assert sender.factory.counts["accept"] == 1 and sender.factory.counts["timeouts"] == 1
    rs = peer.received
    assert [r.control_id for r in rs] == ["L1", "L1"]  # the documented resend
    assert [r.connection for r in rs] == [1, 2]
    assert_received_as_sent(peer, {"L1": mdm("L1")})


def test_tcp_wrong_msa_2_never_delivers(reactor, peer, sender):
    peer.plan("W1", "wrong-id")
    failed = send_one(reactor, sender, "W1")
    assert isinstance(failed, SendFailed) and failed.reason == "no ACK in 1 s"
    assert sender.factory.counts["mismatch"] == 1 and sender.factory.counts["accept"] == 0
    assert send_one(reactor, sender, "W1").delivered
    assert peer.control_ids() == ["W1", "W1"]


def test_tcp_the_right_ack_after_a_wrong_one_decides(reactor, peer, sender):
    peer.plan("W2", "wrong-then-aa")
    result = send_one(reactor, sender, "W2")
    assert result.delivered and result.control_id == "W2"
    assert sender.factory.counts["mismatch"] == 1
    assert peer.control_ids() == ["W2"]


def test_tcp_a_frame_that_is_no_ack_is_skipped(reactor, peer, sender):
    peer.plan("N1", "not-ack-then-aa")
    assert send_one(reactor, sender, "N1").delivered
    assert sender.factory.counts["not_ack"] == 1


def test_tcp_second_ack_is_not_taken_for_the_next_message(reactor, peer, sender):
    """D1 is acknowledged twice; D2 gets no ACK. The duplicate must not deliver D2."""
    peer.plan("D1", "two-acks")
    peer.plan("D2", "no-ack")
    first, second = send_all(reactor, sender, ["D1", "D2"])
    assert first.delivered and first.control_id == "D1"
    assert isinstance(second, SendFailed) and second.reason == "no ACK in 1 s"
    assert sender.factory.counts["mismatch"] == 1  # the duplicate, seen while D2 was in flight
    assert send_one(reactor, sender, "D2").delivered
    assert peer.control_ids() == ["D1", "D2", "D2"]
    assert_received_as_sent(peer, {"D1": mdm("D1"), "D2": mdm("D2")})


def test_tcp_ack_dribbled_one_byte_at_a_time(reactor, peer, sender):
    peer.plan("B1", "dribble")
    result = send_one(reactor, sender, "B1")
    assert result.delivered and result.control_id == "B1"


def test_tcp_no_ack_fails_and_the_resend_arrives(reactor, peer, sender):
    peer.plan("Q1", "no-ack")
    failed = send_one(reactor, sender, "Q1")
    assert isinstance(failed, SendFailed) and failed.written
    assert send_one(reactor, sender, "Q1").delivered
    assert peer.control_ids() == ["Q1", "Q1"] and peer.connections == 2


def test_tcp_connection_closed_without_ack(reactor, peer, sender):
    peer.plan("C1", "close")
    failed = send_one(reactor, sender, "C1")
    assert isinstance(failed, SendFailed) and failed.reason.startswith("connection lost") and failed.written
    assert send_one(reactor, sender, "C1").delivered
    assert peer.control_ids() == ["C1", "C1"] and peer.connections == 2


def test_tcp_a_failure_fails_the_queue_and_every_message_arrives_after_resends(reactor, peer, sender):
    peer.plan("F1", "no-ack")
    ids = ["F1", "F2", "F3", "F4"]
    first = send_all(reactor, sender, ids)
    assert all(isinstance(r, SendFailed) for r in first)
    assert [r.written for r in first] == [True, False, False, False]
    assert peer.control_ids() == ["F1"]  # nothing queued behind it left
    second = send_all(reactor, sender, ids)
    assert [r.kind for r in second] == ["accept"] * 4
    assert peer.control_ids() == ["F1", "F1", "F2", "F3", "F4"]  # F1 twice: the documented resend
    assert_received_as_sent(peer, {c: mdm(c) for c in ids})
    assert_one_at_a_time(peer)


def test_tcp_refused_then_the_receiver_comes_up(reactor):
    port = refused_port()
    sender = start_sender(reactor, f"tcp:127.0.0.1:{port}")
    try:
        ids = ["R1", "R2", "R3"]
        first = send_all(reactor, sender, ids)
        assert all(isinstance(r, SendFailed) and not r.written for r in first)
        assert first[0].reason.startswith("cannot connect")
        peer = Peer(port=port).start()
        try:
            second = send_all(reactor, sender, ids)
            assert [r.kind for r in second] == ["accept"] * 3
            assert peer.control_ids() == ids
        finally:
            peer.stop()
    finally:
        call(reactor, sender.stopService)


def test_tcp_stop_fails_the_pending_sends(reactor, peer):
    sender = start_sender(reactor, f"tcp:127.0.0.1:{peer.port}", ack_timeout=30.0)
    peer.plan("S1", "no-ack")
    outs: list[Outcome] = []
    call(reactor, lambda: outs.extend(Outcome(sender.send(c, mdm(c))) for c in ("S1", "S2")))
    peer.wait_for(1)
    call(reactor, sender.stopService)
    values = call(reactor, lambda: [o.value for o in outs])
    assert [(v.reason, v.written) for v in values] == [("stopping", True), ("stopping", False)]
    assert peer.control_ids() == ["S1"]


# == TLS: the same sender, a tls: endpoint string ============================================


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    script = Path(__file__).resolve().parents[1] / "certs-example" / "make_certs.py"
    subprocess.run([sys.executable, str(script), "--out", str(out), "--quiet"], check=True, timeout=60,
                   capture_output=True)
    roots = out / "roots"
    roots.mkdir()
    shutil.copy(out / "ca.pem", roots / "ca.pem")
    return out


def test_tls_endpoint_string_costs_no_code(reactor, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    peer = Peer(ssl_context=ctx).start()
    sender = start_sender(reactor, f"tls:host=localhost:port={peer.port}:trustRoots={pki / 'roots'}")
    try:
        peer.plan("S2", "dribble")
        results = send_all(reactor, sender, ["S1", "S2"])
        assert [r.kind for r in results] == ["accept", "accept"]
        assert_received_as_sent(peer, {"S1": mdm("S1"), "S2": mdm("S2")})
    finally:
        call(reactor, sender.stopService)
        peer.stop()
