"""The harness's SMTP relay (hl7referral.demo.relay) against real SMTP on 127.0.0.1.

The relay is driven with smtplib, and delivers to an aiosmtpd sink standing in for an
engine's inbound listener; what the sink got is compared byte for byte with what was sent.
"""

from __future__ import annotations

import logging
import smtplib

import pytest
from aiosmtpd.controller import Controller

from hl7referral.demo.harness import free_ports
from hl7referral.demo.relay import Relay, Route

FROM, TO = "referrals@direct.sender.test", "cardiology@direct.receiver.test"
# Lines that start with a dot (SMTP dot-stuffing both ways), a CRLF-only body line, 8-bit bytes.
MESSAGE = (b"From: " + FROM.encode() + b"\r\nTo: " + TO.encode() + b"\r\nMessage-ID: <m1@direct.sender.test>\r\n"
           b"Subject: Referral R1\r\n\r\n.leading dot\r\n..two dots\r\n\r\n\xe9t\xe9\r\n.\r\nend\r\n")
FAST = (0.05, 0.05, 0.05)

pytestmark = pytest.mark.timeout(30)


class Sink:
    def __init__(self, reply: str = "250 2.0.0 stored") -> None:
        self.reply = reply
        self.got: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return self.reply


def sink_on(port: int, sink: Sink) -> Controller:
    c = Controller(sink, hostname="127.0.0.1", port=port)
    c.start()
    return c


@pytest.fixture
def ports():
    return free_ports(2)


def relay_to(port: int, **kw) -> Relay:
    return Relay({"direct.receiver.test": Route("specialist", "127.0.0.1", port)}, **kw).start()


def send(relay: Relay, message: bytes = MESSAGE, sender: str = FROM, rcpts=(TO,)) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
        s.sendmail(sender, list(rcpts), message)


def test_delivers_the_bytes_it_received_and_records_them(ports):
    sink = Sink()
    downstream = sink_on(ports[0], sink)
    relay = relay_to(ports[0])
    try:
        send(relay)
        [record] = relay.wait_for(lambda rs: rs and rs[0].result != "queued", 10)
    finally:
        relay.stop()
        downstream.stop()
    assert sink.got == [(FROM, [TO], MESSAGE)]
    assert (record.mail_from, record.rcpt_to, record.destination, record.size) == \
        (FROM, (TO,), "specialist", len(MESSAGE))
    assert (record.message_id, record.subject, record.result, record.attempts) == \
        ("<m1@direct.sender.test>", "Referral R1", "delivered", 1)


def test_mail_for_a_domain_it_has_no_route_to_is_refused(ports):
    relay = relay_to(ports[0])
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(relay, rcpts=["someone@elsewhere.test"])
    finally:
        relay.stop()
    assert refused.value.recipients["someone@elsewhere.test"][0] == 550
    assert relay.records() == []


def test_an_engine_that_is_down_gets_the_message_once_it_is_up(ports):
    relay = relay_to(ports[0], retry_delays=(0.1,) * 30)
    sink = Sink()
    downstream = None
    try:
        send(relay)
        relay.wait_for(lambda rs: rs[0].attempts >= 2, 10)
        assert "ConnectionRefusedError" in relay.records()[0].detail
        downstream = sink_on(ports[0], sink)
        [record] = relay.wait_for(lambda rs: rs[0].result != "queued", 10)
    finally:
        relay.stop()
        if downstream is not None:
            downstream.stop()
    assert record.result == "delivered" and record.attempts >= 3
    assert sink.got == [(FROM, [TO], MESSAGE)]


def test_a_delivery_that_keeps_failing_ends_failed_and_logged(ports, caplog):
    relay = relay_to(ports[0], retry_delays=FAST)
    try:
        with caplog.at_level(logging.ERROR, logger="hl7referral.demo.relay"):
            send(relay)
            [record] = relay.wait_for(lambda rs: rs[0].result != "queued", 10)
    finally:
        relay.stop()
    assert (record.result, record.attempts) == ("failed", 4)
    assert "gave up after 4 attempts" in record.detail
    assert any("NOT DELIVERED" in r.getMessage() and "<m1@direct.sender.test>" in r.getMessage()
               for r in caplog.records)


def test_a_5xx_from_the_engine_is_final(ports):
    sink = Sink("554 5.7.1 not for us")
    downstream = sink_on(ports[0], sink)
    relay = relay_to(ports[0], retry_delays=FAST)
    try:
        send(relay)
        [record] = relay.wait_for(lambda rs: rs[0].result != "queued", 10)
    finally:
        relay.stop()
        downstream.stop()
    assert (record.result, record.attempts) == ("failed", 1)
    assert record.detail.startswith("554") and len(sink.got) == 1


def test_a_held_sender_gets_451_and_nothing_is_accepted_until_released(ports):
    sink = Sink()
    downstream = sink_on(ports[0], sink)
    relay = relay_to(ports[0])
    try:
        relay.hold("direct.sender.test")
        with pytest.raises(smtplib.SMTPDataError) as deferred:
            send(relay)
        assert deferred.value.smtp_code == 451
        relay.release("direct.sender.test")
        send(relay)
        records = relay.wait_for(lambda rs: len(rs) == 2 and rs[1].result != "queued", 10)
    finally:
        relay.stop()
        downstream.stop()
    assert [(r.result, r.destination) for r in records] == [("deferred", ""), ("delivered", "specialist")]
    assert sink.got == [(FROM, [TO], MESSAGE)]


def test_stopping_with_a_message_undelivered_records_and_logs_it(ports, caplog):
    relay = relay_to(ports[0], retry_delays=(30.0,))
    with caplog.at_level(logging.ERROR, logger="hl7referral.demo.relay"):
        send(relay)
        relay.wait_for(lambda rs: rs[0].attempts == 1, 10)
        relay.stop(drain=0.2)
    [record] = relay.records()
    assert record.result == "abandoned" and "ConnectionRefusedError" in record.detail
    assert any("NOT DELIVERED" in r.getMessage() for r in caplog.records)


def test_a_refused_domain_gets_a_5xx_at_rcpt_until_accepted_again(ports):
    sink = Sink()
    downstream = sink_on(ports[0], sink)
    relay = relay_to(ports[0])
    try:
        relay.refuse("Direct.Receiver.TEST", code=554)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send(relay)
        relay.accept("direct.receiver.test")
        send(relay)
        records = relay.wait_for(lambda rs: len(rs) == 2 and rs[1].result != "queued", 10)
    finally:
        relay.stop()
        downstream.stop()
    code, reply = refused.value.recipients[TO]
    assert code == 554 and b"refused at the relay" in reply
    assert [(r.result, r.rcpt_to, r.size) for r in records] == [("refused", (TO,), 0),
                                                                ("delivered", (TO,), len(MESSAGE))]
    assert records[0].detail.startswith("554 ") and records[0].mail_from == FROM
    assert sink.got == [(FROM, [TO], MESSAGE)]   # only the message sent once the domain was accepted again


def test_refusing_only_takes_a_permanent_code(ports):
    relay = relay_to(ports[0], retry_delays=FAST)
    try:
        with pytest.raises(ValueError):
            relay.refuse("direct.receiver.test", code=451)
        send(relay)   # nothing was refused: taken, then tried (nobody listens downstream)
        [record] = relay.wait_for(lambda rs: rs and rs[0].result != "queued", 10)
    finally:
        relay.stop()
    assert (record.result, record.size) == ("failed", len(MESSAGE))
