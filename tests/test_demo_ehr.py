"""The harness's EHR stand-ins (hl7referral.demo.ehr) over real TCP on 127.0.0.1.

The receiver is checked with the engine's own blocking client (hl7referral.send), the
sender against tests/mllp_peer.py (plain sockets): neither side is python-hl7 talking to itself.
"""

from __future__ import annotations

import pytest

from hl7referral.demo.ehr import EhrReceiver, MllpError, send_mllp
from hl7referral.send import MLLPClient
from mllp_peer import Peer

pytestmark = pytest.mark.timeout(30)


def mdm(control_id: str, extra: bytes = b"") -> bytes:
    return (b"MSH|^~\\&|HL7REFERRAL|CLINIC|EHR|CLINIC|20261201090000||MDM^T02^MDM_T02|" + control_id.encode()
            + b"|P|2.5.1\rEVN|T02|20261201090000\rPID|1||MRN1^^^CLINIC^MR||Test^Pat\r"
            + b"TXA|1|CN|TX|20261201090000|||||||||R1||||AU\rOBX|1|TX|11488-4^Consult note^LN||" + extra + b"\r")


def test_the_receiver_acks_each_message_and_keeps_its_bytes():
    ehr = EhrReceiver("referrer").start()
    big = mdm("N2", b"x" * 200_000)   # far over asyncio's default 64 KiB stream limit
    try:
        with MLLPClient("127.0.0.1", ehr.port) as client:
            results = [client.exchange(m) for m in (mdm("N1"), big)]
        received = ehr.wait_for(2, 10)
    finally:
        ehr.stop()
    assert [(r.control_id, r.code) for r in results] == [("N1", "AA"), ("N2", "AA")]
    assert [(r.connection, r.payload, r.message_type, r.control_id, r.parse_error) for r in received] == [
        (1, mdm("N1"), "MDM^T02^MDM_T02", "N1", ""), (1, big, "MDM^T02^MDM_T02", "N2", "")]


def test_the_sender_reads_a_split_ack_and_refuses_one_for_another_message():
    peer = Peer().start()
    try:
        peer.plan("S1", "dribble")
        ack = send_mllp("127.0.0.1", peer.port, mdm("S1"))
        peer.plan("S2", "wrong-id")
        with pytest.raises(MllpError, match="not for the 'S2' sent"):
            send_mllp("127.0.0.1", peer.port, mdm("S2"), timeout=2)
        peer.plan("S3", "no-ack")
        with pytest.raises(MllpError, match="no ACK for S3"):
            send_mllp("127.0.0.1", peer.port, mdm("S3"), timeout=0.5)
    finally:
        peer.stop()
    assert (ack.code, ack.control_id) == ("AA", "S1")
    assert peer.payloads() == [mdm("S1"), mdm("S2"), mdm("S3")]
