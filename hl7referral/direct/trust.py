"""Direct trust decisions: is this certificate good enough for this address, now?

Sans-I/O: anchors and CRLs are given (files read once at configuration time),
never fetched. A decision is a :class:`TrustDecision` with a short code and a
one-line reason that names addresses and certificate subjects, never message
content.

Checks, in order (the first failure decides):

1. a certification path from the certificate, through the intermediates that
   came with the message (or with the discovered certificate), to a trust
   anchor configured for the address's domain -- never the system roots
   (pyhanko-certvalidator: RFC 5280 path validation, validity at ``at``);
2. revocation, against the CRLs of the policy: a CRL of each issuer on the
   path is checked when present; an issuer without one is a note under
   ``soft-fail`` and a refusal (``no-crl``) under ``hard-fail``;
3. key size (path validators accept a 1024-bit leaf; the Direct RI does not);
4. key usage (``digitalSignature`` to sign, ``keyEncipherment`` to encrypt,
   when the extension is present) and extended key usage (``emailProtection``
   when the extension is present);
5. binding to the address: subjectAltName rfc822Name equal to the address
   (local part exact, domain case-insensitive), else dNSName equal to its
   domain; a legacy subject emailAddress counts as an address binding when the
   certificate has no rfc822Name at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import (
    DisallowedAlgorithmError,
    ExpiredError,
    InsufficientRevinfoError,
    InvalidCertificateError,
    NotYetValidError,
    PathBuildingError,
    PathValidationError,
    RevokedError,
    ValidationError,
)
from pyhanko_certvalidator.policy_decl import CertRevTrustPolicy, RevocationCheckingPolicy, RevocationCheckingRule

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = "*"
REVOCATION_MODES = ("soft-fail", "hard-fail")

TRUSTED = "trusted"
EXPIRED = "expired"
REVOKED = "revoked"
UNKNOWN_ANCHOR = "unknown-anchor"
WEAK_KEY = "weak-key"
NOT_BOUND = "not-bound"
BAD_USAGE = "bad-usage"
NO_CRL = "no-crl"
INVALID_PATH = "invalid-path"
CODES = (TRUSTED, EXPIRED, REVOKED, UNKNOWN_ANCHOR, WEAK_KEY, NOT_BOUND, BAD_USAGE, NO_CRL, INVALID_PATH)

MIN_EC_BITS = 256
_KU_NAMES = {"digital_signature": "digitalSignature", "key_encipherment": "keyEncipherment"}


class TrustError(Exception):
    """A trust configuration problem (unreadable anchor or CRL file, bad policy value)."""


# -- small helpers -----------------------------------------------------------------


def subject_of(cert: x509.Certificate) -> str:
    """The certificate's subject as one RFC 4514 line."""
    return _one_line(cert.subject.rfc4514_string())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, domain lower-cased); a bare domain -> ("", domain)."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, sep, domain = address.rpartition("@")
    return (local if sep else ""), domain.strip().rstrip(".").lower()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TrustError(f"cannot read {what} file {path}: {e.strerror or e}") from None


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """Certificates from a file: PEM (one or more), DER, or PKCS#7 certs-only (.p7b/.p7c, DER or PEM)."""
    path = Path(path)
    data = _read(path, "certificate")
    loaders = [x509.load_pem_x509_certificates, lambda d: [x509.load_der_x509_certificate(d)]]
    p7 = [pkcs7.load_der_pkcs7_certificates, pkcs7.load_pem_pkcs7_certificates]
    if b"-----BEGIN PKCS7-----" in data or path.suffix.lower() in (".p7b", ".p7c", ".p7"):
        loaders = p7 + loaders
    else:
        loaders = loaders + p7
    for loader in loaders:
        try:
            certs = list(loader(data))
        except Exception:  # each loader raises its own kind (ValueError, UnsupportedAlgorithm...): try the next
            continue
        if certs:
            return certs
    raise TrustError(f"no certificate in file {path} (expected PEM, DER or PKCS#7 certificates)")


def load_crls(paths: Iterable[str | Path]) -> list[x509.CertificateRevocationList]:
    """CRLs from files, each PEM (one or more CRLs) or DER."""
    out: list[x509.CertificateRevocationList] = []
    for p in paths:
        p = Path(p)
        data = _read(p, "CRL")
        found = []
        if b"-----BEGIN X509 CRL-----" in data:
            try:
                for block in data.split(b"-----END X509 CRL-----")[:-1]:
                    block = block[block.index(b"-----BEGIN X509 CRL-----"):] + b"-----END X509 CRL-----\n"
                    found.append(x509.load_pem_x509_crl(block))
            except ValueError as e:
                raise TrustError(f"cannot parse CRL file {p}: {_one_line(str(e))}") from None
        else:
            try:
                found.append(x509.load_der_x509_crl(data))
            except ValueError:
                raise TrustError(f"cannot parse CRL file {p} (expected PEM or DER)") from None
        out.extend(found)
    return out


# -- configuration ---------------------------------------------------------------


@dataclass
class Anchors:
    """Trust anchors per Direct domain (or per full address); ``"*"`` is the default for the rest.

    Never falls back to the operating system's roots: an address whose domain is
    not configured, with no ``"*"`` entry, has no anchors and nothing is trusted.
    """

    by_domain: dict[str, list[x509.Certificate]] = field(default_factory=dict)

    @classmethod
    def load(cls, config: Mapping[str, Sequence[str | Path]]) -> Anchors:
        """``{"direct.example.org": ["anchors/example.pem"], "*": ["DirectTrust.p7b"]}``.

        Files: ``.pem`` (one or more certificates), ``.p7b`` (PKCS#7 certs-only, DER
        or PEM, as DirectTrust publishes its bundles), or a single DER certificate.
        """
        by_domain: dict[str, list[x509.Certificate]] = {}
        for key, files in config.items():
            if isinstance(files, (str, Path)):
                files = [files]
            dest = by_domain.setdefault(_anchor_key(key), [])
            for f in files:
                for cert in load_certificates(f):
                    if cert not in dest:
                        dest.append(cert)
        return cls(by_domain)

    def for_address(self, address: str) -> list[x509.Certificate]:
        """Anchors for the address: its own entry, else its domain's (case-insensitive), else ``"*"``."""
        local, domain = split_address(address)
        if local and f"{local}@{domain}" in self.by_domain:
            return list(self.by_domain[f"{local}@{domain}"])
        if domain in self.by_domain:
            return list(self.by_domain[domain])
        return list(self.by_domain.get(DEFAULT_DOMAIN, []))


def _anchor_key(key: str) -> str:
    key = key.strip()
    if key == DEFAULT_DOMAIN:
        return key
    local, domain = split_address(key)
    return f"{local}@{domain}" if local else domain


@dataclass
class TrustPolicy:
    """How strict to be. ``revocation``: ``soft-fail`` (an issuer without a CRL is allowed and
    noted in the reason) or ``hard-fail`` (refused with ``no-crl``)."""

    revocation: str = "soft-fail"
    crls: list[x509.CertificateRevocationList] = field(default_factory=list)
    min_rsa_bits: int = 2048

    def __post_init__(self) -> None:
        if self.revocation not in REVOCATION_MODES:
            raise TrustError(f"revocation must be one of {', '.join(REVOCATION_MODES)}, not {self.revocation!r}")

    @staticmethod
    def load_crls(paths: Iterable[str | Path]) -> list[x509.CertificateRevocationList]:
        return load_crls(paths)

    @classmethod
    def from_files(cls, crl_files: Iterable[str | Path] = (), **kw) -> TrustPolicy:
        return cls(crls=load_crls(crl_files), **kw)


@dataclass(frozen=True)
class TrustDecision:
    ok: bool
    code: str
    reason: str
    binding: str = ""  # "address" | "domain" | ""
    path: tuple[str, ...] = ()  # subjects, leaf first

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


# -- decisions -------------------------------------------------------------------


def check_sender(signer: x509.Certificate, intermediates: Sequence[x509.Certificate], from_address: str,
                 anchors: Anchors, policy: TrustPolicy, at: datetime) -> TrustDecision:
    """Inbound: may a message signed with ``signer`` be accepted as coming from ``from_address``?

    ``intermediates``: the other certificates that came in the message's signature.
    """
    return _check(signer, intermediates, from_address, anchors, policy, at, "digital_signature")


def check_recipient(cert: x509.Certificate, intermediates: Sequence[x509.Certificate], to_address: str,
                    anchors: Anchors, policy: TrustPolicy, at: datetime) -> TrustDecision:
    """Outbound: may a message to ``to_address`` be encrypted to ``cert``?"""
    return _check(cert, intermediates, to_address, anchors, policy, at, "key_encipherment")


def _refuse(code: str, reason: str, path: tuple[str, ...] = (), binding: str = "") -> TrustDecision:
    return TrustDecision(False, code, _one_line(reason), binding, path)


def _check(cert: x509.Certificate, intermediates: Sequence[x509.Certificate], address: str, anchors: Anchors,
           policy: TrustPolicy, at: datetime, usage: str) -> TrustDecision:
    if at.tzinfo is None or at.utcoffset() is None:
        at = at.replace(tzinfo=timezone.utc)
    who = subject_of(cert)
    local, domain = split_address(address)
    roots = anchors.for_address(address)
    if not roots:
        return _refuse(UNKNOWN_ANCHOR, f"no trust anchor configured for {domain or address!r}", (who,))

    # 1. path (no revocation yet: the path tells which issuers need a CRL)
    leaf = _to_asn1(cert)
    others = [_to_asn1(c) for c in intermediates]
    trust_roots = [_to_asn1(c) for c in roots]
    try:
        vpath = _validate(leaf, others, trust_roots, [], at, RevocationCheckingRule.NO_CHECK,
                          RevocationCheckingRule.NO_CHECK)
    except Exception as e:  # mapped below; anything unexpected is an invalid path, never a crash
        return _refuse(*_map_error(e, who, domain), path=(who,))
    chain = _chain(vpath, cert, intermediates, roots)
    names = tuple(subject_of(c) for c in chain)

    # 2. revocation: every certificate below the anchor, by its issuer's CRL
    notes: list[str] = []
    crls = list(policy.crls)
    covered = [_crl_for(chain[i], chain[i + 1], crls, at) for i in range(len(chain) - 1)]
    missing = [subject_of(chain[i]) for i, ok in enumerate(covered) if not ok]
    if missing:
        if policy.revocation == "hard-fail":
            return _refuse(NO_CRL, f"no current CRL to check {missing[0]} (revocation hard-fail)", names)
        notes.append("not checked for revocation (no CRL): " + "; ".join(missing))
        log.info("soft-fail: no CRL for %s", "; ".join(missing))
    if any(covered):
        asn1_crls = [asn1_crl.CertificateList.load(c.public_bytes(Encoding.DER)) for c in crls]
        # Check each covered certificate as the end of its own sub-path, so a missing CRL
        # higher up (soft-fail) does not hide a revocation lower down.
        for i, ok in enumerate(covered):
            if not ok:
                continue
            target = leaf if i == 0 else _to_asn1(chain[i])
            try:
                _validate(target, others, trust_roots, asn1_crls, at, RevocationCheckingRule.CRL_REQUIRED,
                          RevocationCheckingRule.NO_CHECK)
            except RevokedError:
                return _refuse(REVOKED, _revoked_reason(chain[i], chain[i + 1], crls), names)
            except Exception as e:
                return _refuse(*_map_error(e, subject_of(chain[i]), domain), path=names)

    # 3. key size, every certificate below the anchor
    for c in chain[:-1] or chain:
        weak = _weak_key(c, policy.min_rsa_bits)
        if weak:
            return _refuse(WEAK_KEY, f"{subject_of(c)}: {weak}", names)

    # 4. usage
    bad = _bad_usage(cert, usage)
    if bad:
        return _refuse(BAD_USAGE, f"{who}: {bad}", names)

    # 5. binding
    binding = _binding(cert, local, domain)
    if not binding:
        return _refuse(NOT_BOUND, f"{who} is bound to {_bound_names(cert) or 'no address or domain'},"
                       f" not to {address.strip()}", names)

    anchor = names[-1]
    reason = f"{who} bound to {'address ' + address.strip() if binding == 'address' else 'domain ' + domain}" \
             f", path to anchor {anchor}"
    if notes:
        reason += "; " + "; ".join(notes)
    return TrustDecision(True, TRUSTED, _one_line(reason), binding, names)


def _to_asn1(cert: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))


def _run(coro_factory):
    """Run a coroutine to completion from sync code, whether or not this thread has a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(coro_factory())).result()


def _validate(leaf, others, trust_roots, crls, at: datetime, ee_rule, ca_rule):
    """pyhanko-certvalidator path validation; returns the ValidationPath or raises its errors."""
    async def go():
        context = ValidationContext(
            trust_roots=trust_roots, other_certs=others, crls=crls, moment=at, allow_fetching=False,
            revinfo_policy=CertRevTrustPolicy(RevocationCheckingPolicy(ee_rule, ca_rule)),
        )
        return await CertificateValidator(leaf, validation_context=context).async_validate_path()
    return _run(go)


def _map_error(e: Exception, who: str, domain: str) -> tuple[str, str]:
    text = _one_line(str(e))
    if isinstance(e, RevokedError):
        return REVOKED, f"{who} is revoked: {text}"
    if isinstance(e, (ExpiredError, NotYetValidError)):
        return EXPIRED, f"{who}: {text}"
    if isinstance(e, InsufficientRevinfoError):
        return NO_CRL, f"{who}: {text}"
    if isinstance(e, DisallowedAlgorithmError):
        return INVALID_PATH, f"{who}: {text}"
    if isinstance(e, PathBuildingError):
        return UNKNOWN_ANCHOR, f"no path from {who} to a trust anchor for {domain}"
    if isinstance(e, InvalidCertificateError) and "self-signed" in text:
        return UNKNOWN_ANCHOR, f"{who} is self-signed and not a trust anchor for {domain}"
    if isinstance(e, (PathValidationError, ValidationError)):
        return INVALID_PATH, f"{who}: {text}"
    return INVALID_PATH, f"{who}: {type(e).__name__}: {text}"


def _chain(vpath, cert: x509.Certificate, intermediates: Sequence[x509.Certificate],
           roots: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The validated path as cryptography certificates, leaf first, anchor last."""
    pool = {c.public_bytes(Encoding.DER): c for c in [cert, *intermediates, *roots]}
    out = []
    for c in vpath.iter_certs(include_root=True):
        out.append(pool.get(c.dump()) or x509.load_der_x509_certificate(c.dump()))
    out.reverse()
    return out


def _crl_for(cert: x509.Certificate, issuer: x509.Certificate, crls: Sequence[x509.CertificateRevocationList],
             at: datetime) -> bool:
    """Whether a CRL signed by ``issuer`` and current at ``at`` is available for ``cert``."""
    for c in crls:
        if c.issuer != cert.issuer:
            continue
        try:
            if not c.is_signature_valid(issuer.public_key()):
                continue
        except TypeError:
            continue
        if c.last_update_utc > at or (c.next_update_utc is not None and c.next_update_utc < at):
            continue
        return True
    return False


def _revoked_reason(cert: x509.Certificate, issuer: x509.Certificate,
                    crls: Sequence[x509.CertificateRevocationList]) -> str:
    for c in crls:
        entry = c.get_revoked_certificate_by_serial_number(cert.serial_number) if c.issuer == cert.issuer else None
        if entry is not None:
            return (f"{subject_of(cert)} (serial {cert.serial_number:x}) was revoked on "
                    f"{entry.revocation_date_utc:%Y-%m-%d %H:%M:%SZ} (CRL of {subject_of(issuer)})")
    return f"{subject_of(cert)} is revoked (CRL of {subject_of(issuer)})"


def _weak_key(cert: x509.Certificate, min_rsa_bits: int) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA key of {key.key_size} bits, below {min_rsa_bits}" if key.key_size < min_rsa_bits else ""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC key of {key.key_size} bits, below {MIN_EC_BITS}" if key.key_size < MIN_EC_BITS else ""
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ""
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA key"
    return f"unsupported key type {type(key).__name__}"


def _bad_usage(cert: x509.Certificate, usage: str) -> str:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not getattr(ku, usage):
        return f"key usage lacks {_KU_NAMES[usage]}"
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not ({ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
                                & set(eku)):
        return "extended key usage lacks emailProtection"
    return ""


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    except ValueError:  # malformed SAN: no binding
        return [], []
    return san.get_values_for_type(x509.RFC822Name), san.get_values_for_type(x509.DNSName)


def _same_address(value: str, local: str, domain: str) -> bool:
    v_local, v_domain = split_address(value)
    return bool(v_local) and v_local == local and v_domain == domain


def _binding(cert: x509.Certificate, local: str, domain: str) -> str:
    emails, dns_names = _sans(cert)
    if local and any(_same_address(e, local, domain) for e in emails):
        return "address"
    if local and not emails:
        legacy = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
        if any(isinstance(v, str) and _same_address(v, local, domain) for v in legacy):
            return "address"
    if domain and any(d.strip().rstrip(".").lower() == domain for d in dns_names):
        return "domain"
    return ""


def _bound_names(cert: x509.Certificate) -> str:
    emails, dns_names = _sans(cert)
    return ", ".join([*emails, *dns_names])


__all__ = [
    "Anchors", "TrustDecision", "TrustError", "TrustPolicy", "check_recipient", "check_sender", "load_certificates",
    "load_crls", "subject_of", "CODES",
]
