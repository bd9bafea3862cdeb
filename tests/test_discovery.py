"""Recipient-certificate discovery (hl7referral.direct.discovery): a local directory, and DNS CERT records
served by a real dnslib DNS server on 127.0.0.1 (UDP and TCP), then the trust filter (DCDT 502, 511/512/520)."""

import datetime as dt
import logging
import socket
import struct
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from dnslib import QTYPE, RCODE, RD, RR, DNSLabel
from dnslib.server import DNSServer

from hl7referral.direct.discovery import CertificateFinder, DnsCertLookup, LocalCertStore
from hl7referral.direct.trust import Anchors, TrustPolicy, load_crls

SENDER, RECEIVER = "referrals@direct.sender.test", "cardiology@direct.receiver.test"


def cert(pki, name):
    return x509.load_pem_x509_certificate((pki / name).read_bytes())


def der(pki, name):
    return cert(pki, name).public_bytes(Encoding.DER)


def now():
    return dt.datetime.now(dt.timezone.utc)


# -- a real DNS server ---------------------------------------------------------------


def cert_rdata(cert_type: int, data: bytes, key_tag: int = 0, algorithm: int = 0) -> RD:
    """RFC 4398 CERT RDATA: type (2 bytes), key tag (2), algorithm (1), certificate or URL."""
    return RD(struct.pack("!HHB", cert_type, key_tag, algorithm) + data)


class CertZone:
    """A dnslib resolver serving CERT records; NXDOMAIN elsewhere. Truncates UDP answers over 512 bytes
    the RFC 1035 way (TC=1, no answer), which dnslib does not do by itself. Logs (protocol, name, tc)."""

    def __init__(self):
        self.records: dict[str, list[RD]] = {}
        self.queries: list[tuple[str, str, bool]] = []
        self.lock = threading.Lock()

    def add(self, name: str, rdata: RD) -> None:
        self.records.setdefault(str(DNSLabel(name)).lower(), []).append(rdata)

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).lower()
        if qname not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.CERT:
            for rd in self.records[qname]:
                reply.add_answer(RR(request.q.qname, QTYPE.CERT, rdata=rd, ttl=60))
        truncated = handler.protocol == "udp" and len(reply.pack()) > 512
        if truncated:
            reply = request.reply()
            reply.header.tc = 1
        with self.lock:
            self.queries.append((handler.protocol, qname.rstrip("."), truncated))
        return reply

    def names(self, protocol=None):
        return [n for p, n, _ in self.queries if protocol in (None, p)]


class _QuietLogger:
    def __getattr__(self, name):
        return lambda *args, **kw: None


@pytest.fixture
def dns_server():
    """(port, zone): UDP and TCP servers on the same ephemeral 127.0.0.1 port; both stopped afterwards."""
    zone = CertZone()
    servers = []
    for _ in range(20):
        udp = DNSServer(zone, address="127.0.0.1", port=0, logger=_QuietLogger())
        port = udp.server.server_address[1]
        try:
            tcp = DNSServer(zone, address="127.0.0.1", port=port, tcp=True, logger=_QuietLogger())
        except OSError:
            udp.server.server_close()
            continue
        servers = [udp, tcp]
        break
    assert servers, "no port free for both UDP and TCP"
    threads = [threading.Thread(target=s.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
               for s in servers]
    for t in threads:
        t.start()
    try:
        yield port, zone
    finally:
        for s, t in zip(servers, threads):
            s.stop()
            s.server.server_close()
            t.join(5)


# -- the local store -------------------------------------------------------------------


def test_local_store_indexes_by_subject_alt_name_not_file_name(direct_pki, tmp_path, caplog):
    (tmp_path / "a.pem").write_bytes((direct_pki / "receiver-org.pem").read_bytes())
    (tmp_path / "sender.pem").write_bytes((direct_pki / "receiver.pem").read_bytes())  # misleading name
    (tmp_path / "both.crt").write_bytes((direct_pki / "sender.pem").read_bytes()
                                        + (direct_pki / "sender-org.pem").read_bytes())
    (tmp_path / "ca.pem").write_bytes((direct_pki / "intermediate.pem").read_bytes())
    (tmp_path / "receiver.key").write_bytes((direct_pki / "receiver.key").read_bytes())
    (tmp_path / "broken.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        store = LocalCertStore(tmp_path)
    assert "broken.pem" in caplog.text
    receiver, receiver_org = cert(direct_pki, "receiver.pem"), cert(direct_pki, "receiver-org.pem")
    assert store.find(RECEIVER) == [receiver, receiver_org]  # address-bound first
    assert store.find("cardiology@DIRECT.Receiver.test") == [receiver, receiver_org]
    assert store.find("frontdesk@direct.receiver.test") == [receiver_org]
    assert store.find(SENDER) == [cert(direct_pki, "sender.pem"), cert(direct_pki, "sender-org.pem")]
    assert store.find("someone@elsewhere.test") == []
    assert store.intermediates == [cert(direct_pki, "intermediate.pem")]


def test_local_store_missing_directory_is_empty(tmp_path):
    assert LocalCertStore(tmp_path / "absent").find(RECEIVER) == []


# -- DNS CERT ------------------------------------------------------------------------


def test_dns_address_record_over_tcp_by_default(direct_pki, dns_server):
    port, zone = dns_server
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, der(direct_pki, "receiver.pem")))
    got = DnsCertLookup("127.0.0.1", port=port, timeout=2).find(RECEIVER)
    assert got == [cert(direct_pki, "receiver.pem")]
    assert zone.names("udp") == []
    assert zone.names("tcp") == ["cardiology.direct.receiver.test", "direct.receiver.test"]


def test_dns_domain_record(direct_pki, dns_server):
    port, zone = dns_server
    zone.add("direct.receiver.test", cert_rdata(1, der(direct_pki, "receiver-org.pem")))
    got = DnsCertLookup("127.0.0.1", port=port, timeout=2).find("frontdesk@direct.receiver.test")
    assert got == [cert(direct_pki, "receiver-org.pem")]
    assert zone.names() == ["frontdesk.direct.receiver.test", "direct.receiver.test"]


def test_dns_address_then_domain_records_both_returned_in_order(direct_pki, dns_server):
    port, zone = dns_server
    zone.add("direct.receiver.test", cert_rdata(1, der(direct_pki, "receiver-org.pem")))
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, der(direct_pki, "receiver.pem")))
    got = DnsCertLookup("127.0.0.1", port=port, timeout=2).find(RECEIVER)
    assert got == [cert(direct_pki, "receiver.pem"), cert(direct_pki, "receiver-org.pem")]


def test_dns_truncated_udp_answer_falls_back_to_tcp_dcdt_502(direct_pki, dns_server):
    port, zone = dns_server
    big = der(direct_pki, "receiver.pem")
    assert len(big) > 512
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, big))
    got = DnsCertLookup("127.0.0.1", port=port, timeout=2, tcp=False).find(RECEIVER)
    assert got == [cert(direct_pki, "receiver.pem")]
    name = "cardiology.direct.receiver.test"
    assert zone.queries[:2] == [("udp", name, True), ("tcp", name, False)]
    # the domain (NXDOMAIN, small answer) is not retried over TCP
    assert zone.queries[2:] == [("udp", "direct.receiver.test", False)]


def test_dns_ipkix_url_records_are_ignored_and_noted(direct_pki, dns_server, caplog):
    port, zone = dns_server
    zone.add("cardiology.direct.receiver.test", cert_rdata(4, b"http://certs.direct.receiver.test/c.der"))
    with caplog.at_level(logging.INFO, logger="hl7referral.direct.discovery"):
        got = DnsCertLookup("127.0.0.1", port=port, timeout=2, tcp=False).find(RECEIVER)
    assert got == []
    assert "IPKIX" in caplog.text
    assert zone.names("tcp") == []  # small answer: UDP was enough


def test_dns_no_record_is_empty_not_an_error(dns_server, caplog):
    port, zone = dns_server
    with caplog.at_level(logging.INFO, logger="hl7referral.direct.discovery"):
        assert DnsCertLookup("127.0.0.1", port=port, timeout=2).find("nobody@nowhere.test") == []
    assert "NXDOMAIN" in caplog.text
    assert zone.names() == ["nobody.nowhere.test", "nowhere.test"]


def test_dns_garbage_pkix_record_is_skipped(direct_pki, dns_server):
    port, zone = dns_server
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, b"\x30\x03\x02\x01\x00"))
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, der(direct_pki, "receiver.pem")))
    got = DnsCertLookup("127.0.0.1", port=port, timeout=2).find(RECEIVER)
    assert got == [cert(direct_pki, "receiver.pem")]


def test_dns_silent_or_closed_server_is_empty_and_logged(caplog):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        with caplog.at_level(logging.WARNING, logger="hl7referral.direct.discovery"):
            assert DnsCertLookup("127.0.0.1", port=silent.getsockname()[1], timeout=0.3, tcp=False).find(RECEIVER) == []
            assert "no answer" in caplog.text
            assert DnsCertLookup("127.0.0.1", port=closed.getsockname()[1], timeout=1).find(RECEIVER) == []
            assert "failed" in caplog.text
    finally:
        silent.close()
        closed.close()


# -- trust filter ----------------------------------------------------------------------


@pytest.fixture
def anchors(direct_pki):
    return Anchors.load({"*": [direct_pki / "anchor.pem"]})


def test_finder_local_store_first_dns_not_asked(direct_pki, dns_server, anchors, tmp_path):
    port, zone = dns_server
    (tmp_path / "r.pem").write_bytes((direct_pki / "receiver.pem").read_bytes())
    (tmp_path / "ca.pem").write_bytes((direct_pki / "intermediate.pem").read_bytes())
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, der(direct_pki, "receiver-org.pem")))
    finder = CertificateFinder([LocalCertStore(tmp_path), DnsCertLookup("127.0.0.1", port=port, timeout=2)],
                               anchors, TrustPolicy())
    found = finder.find(RECEIVER, now())
    assert found.usable == [cert(direct_pki, "receiver.pem")] and found.rejected == []
    assert zone.queries == []


def test_finder_falls_back_to_dns_with_intermediate_published_alongside(direct_pki, dns_server, anchors, tmp_path):
    port, zone = dns_server
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, der(direct_pki, "receiver.pem")))
    zone.add("cardiology.direct.receiver.test", cert_rdata(1, der(direct_pki, "intermediate.pem")))
    finder = CertificateFinder([LocalCertStore(tmp_path), DnsCertLookup("127.0.0.1", port=port, timeout=2)],
                               anchors, TrustPolicy())
    found = finder.find(RECEIVER, now())
    assert found.usable == [cert(direct_pki, "receiver.pem")]


def test_finder_rejects_bad_dns_certificates_so_the_send_is_not_attempted(direct_pki, dns_server, anchors, tmp_path):
    """DCDT 511/512/520: only untrustworthy certificates → no usable certificate → the caller must not send."""
    port, zone = dns_server
    for name in ("rogue.pem", "expired.pem", "small.pem", "revoked.pem", "unbound.pem"):
        zone.add("referrals.direct.sender.test", cert_rdata(1, der(direct_pki, name)))
    policy = TrustPolicy(crls=load_crls([direct_pki / "intermediate.crl.pem"]))
    finder = CertificateFinder([LocalCertStore(tmp_path), DnsCertLookup("127.0.0.1", port=port, timeout=2)],
                               anchors, policy, intermediates=[cert(direct_pki, "intermediate.pem")])
    found = finder.find(SENDER, now())
    assert found.usable == [] and not found
    codes = {subject: d.code for subject, d in found.rejected}
    expected = {"rogue.pem": "unknown-anchor", "expired.pem": "expired", "small.pem": "weak-key",
                "revoked.pem": "revoked", "unbound.pem": "not-bound"}
    assert codes == {cert(direct_pki, n).subject.rfc4514_string(): c for n, c in expected.items()}
    assert all(not d.ok for _, d in found.rejected)


def test_finder_skips_a_bad_address_certificate_for_a_good_domain_one(direct_pki, dns_server, anchors, tmp_path):
    port, zone = dns_server
    zone.add("referrals.direct.sender.test", cert_rdata(1, der(direct_pki, "expired.pem")))
    zone.add("direct.sender.test", cert_rdata(1, der(direct_pki, "sender-org.pem")))
    finder = CertificateFinder([DnsCertLookup("127.0.0.1", port=port, timeout=2, tcp=False)], anchors, TrustPolicy(),
                               intermediates=[cert(direct_pki, "intermediate.pem")])
    found = finder.find(SENDER, now())
    assert found.usable == [cert(direct_pki, "sender-org.pem")]
    assert [d.code for _, d in found.rejected] == ["expired"]


def test_finder_with_nothing_anywhere(dns_server, anchors, tmp_path, caplog):
    port, _ = dns_server
    finder = CertificateFinder([LocalCertStore(tmp_path), DnsCertLookup("127.0.0.1", port=port, timeout=2)],
                               anchors, TrustPolicy())
    with caplog.at_level(logging.WARNING, logger="hl7referral.direct.discovery"):
        found = finder.find(RECEIVER, now())
    assert (found.usable, found.rejected) == ([], [])
    assert "do not send" in caplog.text
