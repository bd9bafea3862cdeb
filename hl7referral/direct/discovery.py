"""Finding a Direct recipient's encryption certificate: a local directory, then DNS CERT records.

A certificate found is only a candidate: :class:`CertificateFinder` keeps those that
:func:`hl7referral.direct.trust.check_recipient` says are trusted for the address.
No usable certificate means the message must not be sent over Direct (DCDT
511/512/520); the caller falls back to another route (fax).

DNS follows the Direct Project Java RI (``DNSCertificateStore``): RFC 4398 CERT
records at ``user.domain`` for ``user@domain`` (the ``@`` becomes a dot), then at
``domain`` for organisation (domain-bound) certificates; type PKIX (1) holds a DER
certificate, IPKIX (4) a URL (not fetched here: noted and ignored); TCP by default
as in the RI, or UDP with a retry over TCP when the answer is truncated (TC bit,
DCDT 502). LDAP discovery is not implemented.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .trust import Anchors, TrustDecision, TrustPolicy, check_recipient, split_address, subject_of

log = logging.getLogger(__name__)

CERT_PKIX = 1  # RFC 4398: X.509 as per PKIX (DER)
CERT_IPKIX = 4  # RFC 4398: the URL of an X.509 data object


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _bindings(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(rfc822Name addresses normalised as local@domain-lower-cased, dNSNames lower-cased)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return [], []
    emails = []
    for value in san.get_values_for_type(x509.RFC822Name):
        local, domain = split_address(value)
        if local:
            emails.append(f"{local}@{domain}")
    return emails, [d.strip().rstrip(".").lower() for d in san.get_values_for_type(x509.DNSName)]


def _dedupe(certs) -> list[x509.Certificate]:
    seen, out = set(), []
    for c in certs:
        key = _fingerprint(c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


class LocalCertStore:
    """A directory of PEM files (any names; one or more certificates each), indexed by subjectAltName.

    CA certificates found there are kept as :attr:`intermediates` for path building.
    The directory is read when the store is made and again on :meth:`reload`.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.by_address: dict[str, list[x509.Certificate]] = {}
        self.by_domain: dict[str, list[x509.Certificate]] = {}
        self.intermediates: list[x509.Certificate] = []
        self.reload()

    def reload(self) -> None:
        by_address: dict[str, list[x509.Certificate]] = {}
        by_domain: dict[str, list[x509.Certificate]] = {}
        intermediates: list[x509.Certificate] = []
        try:
            files = sorted(p for p in self.directory.iterdir() if p.is_file())
        except OSError as e:
            log.warning("certificate directory %s unreadable: %s", self.directory, e.strerror or e)
            files = []
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("certificate file %s unreadable: %s", path, e.strerror or e)
                continue
            if b"-----BEGIN CERTIFICATE-----" not in data:
                continue  # keys, CRLs, notes: not ours
            try:
                certs = x509.load_pem_x509_certificates(data)
            except ValueError as e:
                log.warning("certificate file %s skipped: %s", path, " ".join(str(e).split()))
                continue
            for cert in certs:
                if _is_ca(cert):
                    intermediates.append(cert)
                    continue
                emails, dns_names = _bindings(cert)
                for a in emails:
                    by_address.setdefault(a, []).append(cert)
                for d in dns_names:
                    by_domain.setdefault(d, []).append(cert)
        self.by_address, self.by_domain, self.intermediates = by_address, by_domain, intermediates

    def find(self, address: str) -> list[x509.Certificate]:
        """Certificates bound to the address, then those bound to its domain."""
        local, domain = split_address(address)
        found = list(self.by_address.get(f"{local}@{domain}", [])) if local else []
        found += self.by_domain.get(domain, [])
        return _dedupe(found)

    def __repr__(self) -> str:
        return f"LocalCertStore({str(self.directory)!r})"


class DnsCertLookup:
    """RFC 4398 CERT records from one name server (the resolver the deployment trusts for this)."""

    def __init__(self, nameserver: str, port: int = 53, timeout: float = 5.0, tcp: bool = True):
        self.nameserver = nameserver
        self.port = port
        self.timeout = timeout
        self.tcp = tcp

    @staticmethod
    def names_for(address: str) -> list[str]:
        """The names queried for an address: ``user.domain`` then ``domain`` (a bare domain: just it)."""
        local, domain = split_address(address)
        return ([f"{local}.{domain}"] if local else []) + [domain]

    def find(self, address: str) -> list[x509.Certificate]:
        """PKIX certificates at the address's name, then at its domain; [] on any DNS failure.

        A CA certificate published alongside is returned too (the finder uses it as an intermediate).
        """
        found: list[x509.Certificate] = []
        for name in self.names_for(address):
            found += self.lookup(name)
        return _dedupe(found)

    def lookup(self, name: str) -> list[x509.Certificate]:
        """The certificates of the CERT RRset at ``name``."""
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError) as e:
            log.warning("DNS CERT %s: not a DNS name (%s)", name, e)
            return []
        query = dns.message.make_query(qname, dns.rdatatype.CERT)
        where = f"{self.nameserver}:{self.port}"
        try:
            if self.tcp:
                response = dns.query.tcp(query, self.nameserver, timeout=self.timeout, port=self.port)
            else:
                response = dns.query.udp(query, self.nameserver, timeout=self.timeout, port=self.port)
                if response.flags & dns.flags.TC:
                    log.info("DNS CERT %s: UDP answer from %s truncated, retrying over TCP", name, where)
                    response = dns.query.tcp(query, self.nameserver, timeout=self.timeout, port=self.port)
        except dns.exception.Timeout:
            log.warning("DNS CERT %s: no answer from %s within %ss", name, where, self.timeout)
            return []
        except (dns.exception.DNSException, OSError, EOFError, ValueError) as e:
            why = " ".join(str(e).split()) or type(e).__name__
            log.warning("DNS CERT %s: query to %s failed: %s", name, where, why)
            return []
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            log.info("DNS CERT %s: no such name (NXDOMAIN) at %s", name, where)
            return []
        if rcode != dns.rcode.NOERROR:
            log.warning("DNS CERT %s: %s from %s", name, dns.rcode.to_text(rcode), where)
            return []
        found: list[x509.Certificate] = []
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.CERT or rrset.name != qname:
                continue
            for rd in rrset:
                if rd.certificate_type == CERT_IPKIX:
                    log.info("DNS CERT %s: IPKIX (URL) record ignored: URLs are not fetched", name)
                    continue
                if rd.certificate_type != CERT_PKIX:
                    log.info("DNS CERT %s: CERT type %s ignored (only PKIX is used)", name, rd.certificate_type)
                    continue
                try:
                    cert = x509.load_der_x509_certificate(rd.certificate)
                except ValueError as e:
                    log.warning("DNS CERT %s: PKIX record is not a DER certificate: %s", name, " ".join(str(e).split()))
                    continue
                found.append(cert)
        if not found:
            log.info("DNS CERT %s: no PKIX certificate at %s", name, where)
        return found

    def __repr__(self) -> str:
        return f"DnsCertLookup({self.nameserver!r}, port={self.port}, tcp={self.tcp})"


@dataclass
class Found:
    """Outcome of a search: usable certificates (trusted for the address), and the rejected ones with why."""

    usable: list[x509.Certificate] = field(default_factory=list)
    rejected: list[tuple[str, TrustDecision]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.usable)


class CertificateFinder:
    """Sources in order (local store first, then DNS); stops at the first source with a usable certificate.

    Intermediates for path building: ``intermediates`` given here plus CA certificates the
    sources found (a local directory's CA files, CA certificates published in DNS).
    """

    def __init__(self, sources: Sequence[LocalCertStore | DnsCertLookup], anchors: Anchors, policy: TrustPolicy,
                 intermediates: Sequence[x509.Certificate] = ()):
        self.sources = list(sources)
        self.anchors = anchors
        self.policy = policy
        self.intermediates = list(intermediates)

    def find(self, address: str, at: datetime) -> Found:
        found = Found()
        seen: set[bytes] = set()
        for source in self.sources:
            candidates = source.find(address)
            chain = _dedupe([*self.intermediates, *getattr(source, "intermediates", []),
                             *(c for c in candidates if _is_ca(c))])
            for cert in (c for c in candidates if not _is_ca(c)):
                key = _fingerprint(cert)
                if key in seen:
                    continue
                seen.add(key)
                decision = check_recipient(cert, chain, address, self.anchors, self.policy, at)
                if decision.ok:
                    found.usable.append(cert)
                else:
                    found.rejected.append((subject_of(cert), decision))
                    log.info("certificate for %s from %r rejected: %s", address, source, decision)
            if found.usable:
                break
        if not found.usable:
            log.warning("no usable Direct certificate for %s (%d found, all rejected): do not send over Direct",
                        address, len(found.rejected))
        return found


__all__ = ["CERT_IPKIX", "CERT_PKIX", "CertificateFinder", "DnsCertLookup", "Found", "LocalCertStore"]
