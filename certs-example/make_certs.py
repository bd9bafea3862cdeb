#!/usr/bin/env python3
"""Generate a throw-away test PKI for hl7referral's TLS (MLLP/TLS, mutual TLS).

FOR TESTS AND EXAMPLES ONLY. Every private key written here is unencrypted and
must never protect anything real, and none of it may be committed (the default
output directory, certs-example/out/, is git-ignored).

    python certs-example/make_certs.py [--out DIR] [--force]

Files already present are kept (the run is idempotent); --force regenerates
everything. A file is also regenerated when what it depends on was (a new CA
means new leaves and a new CRL) or when a certificate that should be valid is
about to expire. See certs-example/README.md for what each file is.

The building blocks are small so that later work can add certificates:
:func:`make_key`, :func:`make_ca`, :func:`make_leaf`, :func:`make_crl`, and
:func:`ensure_ca` / :func:`ensure_leaf` / :func:`ensure_crl` for the
skip-if-present logic. :func:`build` is the list of what gets made.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_OUT = Path(__file__).resolve().parent / "out"

CA_NAME = "hl7referral Example CA"
ROGUE_CA_NAME = "Rogue CA"
CLIENT_NAME = "Example Referring Clinic EHR"
ORGANISATION = "hl7referral examples"

CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 3650
RENEW_BEFORE = dt.timedelta(days=7)  # regenerate a "valid" certificate this close to expiry

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
EMAIL_PROTECTION = ExtendedKeyUsageOID.EMAIL_PROTECTION  # for the Direct / S/MIME certificates to come


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def name(common_name: str, organisation: str | None = ORGANISATION, email: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


# -- building blocks -------------------------------------------------------------


def make_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def make_ca(common_name: str, *, key: rsa.RSAPrivateKey | None = None, days: int = CA_DAYS,
            organisation: str | None = ORGANISATION, path_length: int = 0,
            issuer: tuple[x509.Certificate, rsa.RSAPrivateKey] | None = None,
            bits: int = 2048) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A CA (RSA, SHA-256): self-signed root, or an intermediate when ``issuer`` is given.

    ``path_length`` 0 means it may sign leaves only; 1 lets it sign one intermediate.
    """
    key = key or make_key(bits)
    subject = name(common_name, organisation)
    start = now() - dt.timedelta(days=1)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    aki = (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()) if issuer_cert
           else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def make_leaf(issuer: x509.Certificate, issuer_key: rsa.RSAPrivateKey, subject: str | x509.Name, *,
              usages: Sequence[x509.ObjectIdentifier], sans: Iterable[x509.GeneralName] = (),
              key: rsa.RSAPrivateKey | None = None, not_before: dt.datetime | None = None,
              not_after: dt.datetime | None = None, days: int = LEAF_DAYS,
              key_encipherment: bool = True, bits: int = 2048) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """An end-entity certificate signed by ``issuer``.

    ``usages`` are extended key usages (SERVER_AUTH, CLIENT_AUTH,
    EMAIL_PROTECTION...); ``sans`` subject alternative names (x509.DNSName,
    x509.IPAddress, x509.RFC822Name...). Validity defaults to yesterday for
    ``days`` days; pass ``not_before``/``not_after`` for expired or future ones.
    """
    key = key or make_key(bits)
    subject_name = name(subject) if isinstance(subject, str) else subject
    start = not_before or now() - dt.timedelta(days=1)
    end = not_after or start + dt.timedelta(days=days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject_name)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=key_encipherment, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False)
    )
    sans = list(sans)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_crl(issuer: x509.Certificate, issuer_key: rsa.RSAPrivateKey, revoked: Iterable[x509.Certificate] = (),
             *, days: int = CRL_DAYS, number: int = 1) -> x509.CertificateRevocationList:
    """A CRL by ``issuer`` listing the serial numbers of ``revoked``."""
    t = now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(t - dt.timedelta(minutes=5))
        .next_update(t + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(t - dt.timedelta(minutes=5))
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
            .build())
    return builder.sign(issuer_key, hashes.SHA256())


# -- files -----------------------------------------------------------------------


def pem(obj) -> bytes:
    if isinstance(obj, rsa.RSAPrivateKey):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


def write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> rsa.RSAPrivateKey:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


@dataclass
class Output:
    """Where files go, whether to overwrite them, and what this run wrote or kept."""

    out: Path
    force: bool = False
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def path(self, filename: str) -> Path:
        return self.out / filename


@dataclass
class Issued:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey | None
    fresh: bool  # written by this run: everything it signed must be rewritten too


def _still_good(cert: x509.Certificate, must_be_valid: bool) -> bool:
    return not must_be_valid or cert.not_valid_after_utc - RENEW_BEFORE > now()


def ensure_ca(o: Output, stem: str, common_name: str, issuer: Issued | None = None, **kw) -> Issued:
    """``{stem}.pem`` and ``{stem}.key``: kept when present, otherwise made (signed by ``issuer`` if given)."""
    cert_path, key_path = o.path(f"{stem}.pem"), o.path(f"{stem}.key")
    if not (o.force or (issuer and issuer.fresh)) and cert_path.exists() and key_path.exists():
        cert = load_cert(cert_path)
        if _still_good(cert, True) and (issuer is None or cert.issuer == issuer.cert.subject):
            o.kept += [cert_path.name, key_path.name]
            return Issued(cert, load_key(key_path), fresh=False)
    if issuer is not None:
        kw["issuer"] = (issuer.cert, issuer.key)
    cert, key = make_ca(common_name, **kw)
    write(key_path, pem(key), private=True)
    write(cert_path, pem(cert))
    o.written += [cert_path.name, key_path.name]
    return Issued(cert, key, fresh=True)


def ensure_leaf(o: Output, stem: str, issuer: Issued, subject: str | x509.Name, *,
                expect_valid: bool = True, **kw) -> Issued:
    """``{stem}.pem`` and ``{stem}.key`` signed by ``issuer``; ``kw`` go to :func:`make_leaf`."""
    cert_path, key_path = o.path(f"{stem}.pem"), o.path(f"{stem}.key")
    if not (o.force or issuer.fresh) and cert_path.exists() and key_path.exists():
        cert = load_cert(cert_path)
        if cert.issuer == issuer.cert.subject and _still_good(cert, expect_valid):
            o.kept += [cert_path.name, key_path.name]
            return Issued(cert, None, fresh=False)
    cert, key = make_leaf(issuer.cert, issuer.key, subject, **kw)
    write(key_path, pem(key), private=True)
    write(cert_path, pem(cert))
    o.written += [cert_path.name, key_path.name]
    return Issued(cert, key, fresh=True)


def ensure_bundle(o: Output, filename: str, certs: Sequence[Issued]) -> None:
    """A DirectTrust-style trust bundle: PKCS#7 certs-only, DER (``.p7b``)."""
    path = o.path(filename)
    if not (o.force or any(c.fresh for c in certs)) and path.exists():
        o.kept.append(filename)
        return
    write(path, pkcs7.serialize_certificates([c.cert for c in certs], serialization.Encoding.DER))
    o.written.append(filename)


def ensure_crl(o: Output, filename: str, issuer: Issued, revoked: Sequence[Issued]) -> None:
    """A CRL by ``issuer`` listing ``revoked``; rewritten when any of them is new."""
    path = o.path(filename)
    if not (o.force or issuer.fresh or any(r.fresh for r in revoked)) and path.exists():
        crl = x509.load_pem_x509_crl(path.read_bytes())
        listed = {r.serial_number for r in crl}
        if (crl.issuer == issuer.cert.subject and crl.next_update_utc and crl.next_update_utc > now()
                and all(r.cert.serial_number in listed for r in revoked)):
            o.kept.append(filename)
            return
    write(path, pem(make_crl(issuer.cert, issuer.key, [r.cert for r in revoked])))
    o.written.append(filename)


# -- what gets made --------------------------------------------------------------


def build(out: Path, force: bool = False) -> Output:
    """Write the example PKI into ``out`` (see README.md); returns what was written or kept."""
    out.mkdir(parents=True, exist_ok=True)
    o = Output(out, force)
    ca = ensure_ca(o, "ca", CA_NAME)
    ensure_leaf(o, "server", ca, "localhost", usages=[SERVER_AUTH],
                sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    ensure_leaf(o, "client", ca, CLIENT_NAME, usages=[CLIENT_AUTH])
    t = now()
    ensure_leaf(o, "client-expired", ca, f"{CLIENT_NAME} (expired)", usages=[CLIENT_AUTH], expect_valid=False,
                not_before=t - dt.timedelta(days=400), not_after=t - dt.timedelta(days=30))
    revoked = ensure_leaf(o, "client-revoked", ca, f"{CLIENT_NAME} (revoked)", usages=[CLIENT_AUTH])
    ensure_crl(o, "crl.pem", ca, [revoked])
    rogue = ensure_ca(o, "rogue-ca", ROGUE_CA_NAME, organisation="Rogue Example")
    ensure_leaf(o, "client-rogue", rogue, x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, CLIENT_NAME),  # same name, wrong issuer
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Rogue Example")]), usages=[CLIENT_AUTH])
    # rogue-ca.key is only needed to extend the rogue PKI; it is as throw-away as the rest.
    build_direct(o, "direct/")
    return o


# The Direct (S/MIME) example PKI: two organisations under one anchor, as a HISP's
# DirectTrust-style bundle would hold it, plus the certificates trust must refuse.
SENDER_DOMAIN, RECEIVER_DOMAIN = "direct.sender.test", "direct.receiver.test"
SENDER_ADDRESS, RECEIVER_ADDRESS = f"referrals@{SENDER_DOMAIN}", f"cardiology@{RECEIVER_DOMAIN}"


def build_direct(o: Output, sub: str) -> None:
    """``direct/``: anchor → intermediate → address- and domain-bound leaves; negatives; CRL; bundle."""
    o.path(sub).mkdir(parents=True, exist_ok=True)
    anchor = ensure_ca(o, sub + "anchor", "hl7referral Example Direct Anchor", path_length=1, bits=3072)
    inter = ensure_ca(o, sub + "intermediate", "hl7referral Example Direct Intermediate", issuer=anchor)

    def leaf(stem: str, cn: str, *, address: str = "", domain: str = "", **kw) -> Issued:
        sans = [x509.RFC822Name(address)] if address else [x509.DNSName(domain)]
        return ensure_leaf(o, sub + stem, inter, cn, usages=[EMAIL_PROTECTION], sans=sans, **kw)

    leaf("sender", "Example Referring Clinic (Direct)", address=SENDER_ADDRESS)
    leaf("sender-org", "Example Referring Clinic", domain=SENDER_DOMAIN)
    leaf("receiver", "Example Cardiology (Direct)", address=RECEIVER_ADDRESS)
    leaf("receiver-org", "Example Cardiology", domain=RECEIVER_DOMAIN)
    t = now()
    leaf("expired", "Example Referring Clinic (expired)", address=SENDER_ADDRESS, expect_valid=False,
         not_before=t - dt.timedelta(days=400), not_after=t - dt.timedelta(days=30))
    revoked = leaf("revoked", "Example Referring Clinic (revoked)", address=SENDER_ADDRESS)
    leaf("small", "Example Referring Clinic (1024-bit)", address=SENDER_ADDRESS, bits=1024)
    leaf("unbound", "Some Other Practice", address="someone@elsewhere.test")
    ensure_crl(o, sub + "intermediate.crl.pem", inter, [revoked])
    ensure_crl(o, sub + "anchor.crl.pem", anchor, [])  # nothing revoked: lets hard-fail revocation pass
    ensure_bundle(o, sub + "bundle.p7b", [anchor])
    rogue = ensure_ca(o, sub + "rogue-anchor", "Rogue Direct Anchor", organisation="Rogue Example")
    ensure_leaf(o, sub + "rogue", rogue, "Example Referring Clinic (rogue)", usages=[EMAIL_PROTECTION],
                sans=[x509.RFC822Name(SENDER_ADDRESS)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate a test PKI for hl7referral (FOR TESTS AND EXAMPLES ONLY: unencrypted keys).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="regenerate every file, even those present")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    o = build(args.out, args.force)
    if not args.quiet:
        if o.written:
            print(f"wrote {len(o.written)} file(s) to {args.out}: {' '.join(o.written)}")
        if o.kept:
            print(f"kept {len(o.kept)} existing file(s) in {args.out} (--force to regenerate)")
        print("test material only: never use these keys for anything real, never commit them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
