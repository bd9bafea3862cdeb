"""S/MIME core for Direct messaging: sign, encrypt, decrypt, verify (sans-I/O).

Bytes and certificates go in, bytes and result objects come out; nothing here
touches the network, the clock (except the signing-time attribute cryptography
writes) or the file system. Profile: the Direct Applicability Statement v1.3
(RFC 5751 S/MIME 3.2 with the Direct restrictions), see
``/work/shared/reference/direct.md`` sections 2, 3, 9-11.

Invariants
----------
* **Sign then encrypt.** :func:`sign` returns a complete ``multipart/signed``
  entity; :func:`encrypt` wraps any entity (normally that one) in an
  ``application/pkcs7-mime; smime-type=enveloped-data`` entity. The caller adds
  the RFC 5322 headers (From/To/Date/Message-ID/MIME-Version).
* **Exact bytes.** The signed content is the first part of the multipart/signed
  exactly as transmitted: :func:`sign` canonicalises line endings to CRLF once,
  before hashing, and never touches the content again; :func:`verify` slices the
  part out of the received bytes (RFC 1847 section 2.1: the CRLF before a
  delimiter belongs to the delimiter) and never re-serialises it.
  :func:`decrypt` returns the decrypted bytes unchanged.
* **Direct algorithm profile.** Signatures: SHA-256/384/512 (SHA-224 accepted on
  receipt) with RSA PKCS#1 v1.5 or RSA-PSS (ECDSA accepted on receipt); MD5 and
  SHA-1 are refused inbound and outbound (AS 1.3, as the Java RI does). Content
  encryption: AES-128/192/256-CBC only (no 3DES/RC2, and no AES-GCM since the RI
  cannot read AuthEnvelopedData). Key transport: RSA PKCS#1 v1.5 or RSA-OAEP
  (any hash/MGF1 on receipt; SHA-256/MGF1-SHA-256 when sending).
* **Signed-data shape** (ONC ETT): detached (no eContent, DTS 182), signer
  certificate and chain included (DTS 167), ``protocol="application/pkcs7-signature"``
  quoted exactly (DTS 205), ``micalg`` matching the digest (DTS 160/165), two
  parts (DTS 207), signature part base64 (DTS 155).
* **Errors.** Every failure on untrusted input is a :class:`SmimeError` with a
  short machine ``code``; no other exception type escapes :func:`decrypt` or
  :func:`verify`, whatever the bytes.
* **Not here.** Path building, trust anchors, revocation, key-size policy and
  binding the signer to the From address belong to the trust module; this one
  only proves "these bytes were signed by the key in this certificate".

Why asn1crypto as well as cryptography: cryptography 50 signs and encrypts
(PKCS#1 v1.5 only) but cannot verify, cannot do RSA-OAEP key transport and
parses DER only (BouncyCastle and ``openssl cms -stream`` send BER). The CMS
structures are therefore built and parsed with asn1crypto; every cryptographic
primitive (RSA, AES, hashes) is cryptography's or hashlib's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from typing import Sequence

from asn1crypto import algos as a_algos
from asn1crypto import cms as a_cms
from asn1crypto import core as a_core
from asn1crypto import x509 as a_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding as sym_padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import pkcs7

from .multipart import Head, delimiters
from .multipart import head as head_of

__all__ = ["SmimeError", "Decrypted", "Verified", "sign", "encrypt", "decrypt", "verify"]


class SmimeError(Exception):
    """An S/MIME operation failed; ``code`` is a short machine-readable reason.

    Codes: not-encrypted, no-recipient-info, decrypt-failed, unsupported-algorithm,
    not-signed, not-detached, weak-digest, digest-mismatch, bad-signature,
    no-signer-certificate, malformed, bad-argument.
    """

    def __init__(self, code: str, message: str):
        # One readable line: a multi-line message would break log lines and SMTP replies.
        super().__init__(" ".join(message.split()))
        self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.args[0]}"


@dataclass(frozen=True)
class Decrypted:
    entity: bytes  # the decrypted MIME entity, byte for byte
    cipher: str  # "aes128" | "aes192" | "aes256"
    key_transport: str  # "rsa-pkcs1v15" | "rsa-oaep"


@dataclass(frozen=True)
class Verified:
    content: bytes  # the signed content exactly as hashed (the first part of multipart/signed)
    signer: x509.Certificate
    certificates: list[x509.Certificate]  # every certificate in the SignedData, signer included
    digest: str  # "sha256" ...
    micalg: str  # the micalg parameter as received ("" for opaque signed-data or when absent)
    detached: bool = True  # False for opaque application/pkcs7-mime signed-data (fails ETT DTS 182)


# --- algorithm tables --------------------------------------------------------------------------

_HASHES = {"sha224": hashes.SHA224, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_WEAK_DIGESTS = {"md2", "md5", "sha1"}
# RFC 5751 section 3.4.3.2 micalg names.
_MICALG = {"sha224": "sha-224", "sha256": "sha-256", "sha384": "sha-384", "sha512": "sha-512"}
_CIPHERS = {"aes128": ("aes128_cbc", 16), "aes192": ("aes192_cbc", 24), "aes256": ("aes256_cbc", 32)}
_CIPHER_BY_OID_NAME = {oid_name: (name, size) for name, (oid_name, size) in _CIPHERS.items()}
_KEY_TRANSPORTS = ("rsa-pkcs1v15", "rsa-oaep")

_SIGNED_MIME = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_ENVELOPE_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")


def _hash_for(name: str) -> hashes.HashAlgorithm:
    if name in _WEAK_DIGESTS:
        raise SmimeError("weak-digest", f"digest {name} is not allowed by the Direct Applicability Statement")
    try:
        return _HASHES[name]()
    except KeyError:
        raise SmimeError("unsupported-algorithm", f"digest {name} is not supported") from None


# --- sign --------------------------------------------------------------------------------------

_BARE_LF = re.compile(rb"(?<!\r)\n")


def _crlf(data: bytes) -> bytes:
    # RFC 5751 section 3.1.1: the canonical form has CRLF line endings. Counting first
    # avoids a regex pass (and a copy) on the common, already-canonical input.
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _BARE_LF.sub(b"\r\n", data)


def _b64_lines(der: bytes) -> bytes:
    # base64.encodebytes writes 76-character lines (RFC 2045 section 6.8) ending in LF.
    return base64.encodebytes(der).replace(b"\n", b"\r\n")


def sign(entity: bytes, signer: x509.Certificate, key, chain: Sequence[x509.Certificate] = (),
         digest: str = "sha256") -> bytes:
    """Sign ``entity`` and return the complete ``multipart/signed`` MIME entity (CRLF line endings).

    The first part is ``entity`` with line endings canonicalised to CRLF, otherwise untouched;
    the second is a detached DER SignedData (signer certificate + ``chain`` included, signed
    attributes content-type, signing-time, message-digest, SMIMECapabilities).
    """
    hash_alg = _hash_for(digest)
    content = _crlf(bytes(entity))
    builder = pkcs7.PKCS7SignatureBuilder().set_data(content)
    if isinstance(key, rsa.RSAPrivateKey):
        builder = builder.add_signer(signer, key, hash_alg, rsa_padding=padding.PKCS1v15())
    else:
        builder = builder.add_signer(signer, key, hash_alg)
    for cert in chain:
        if cert != signer:  # the signer certificate is always included; do not repeat it
            builder = builder.add_certificate(cert)
    # DER + our own multipart: Encoding.SMIME writes protocol="application/x-pkcs7-signature",
    # which fails ETT DTS 205. Binary: cryptography must not rewrite line endings (we already did,
    # and the bytes hashed must be the bytes sent).
    der = builder.sign(serialization.Encoding.DER,
                       [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
    boundary = _boundary(content)
    return b"".join((
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n'
        b" micalg=", _MICALG[digest].encode(), b'; boundary="', boundary, b'"\r\n',
        b"\r\n",
        b"--", boundary, b"\r\n",
        content, b"\r\n",
        b"--", boundary, b"\r\n",
        b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=smime.p7s\r\n"
        b"\r\n",
        _b64_lines(der),
        b"--", boundary, b"--\r\n",
    ))


def _boundary(content: bytes) -> bytes:
    # 128 random bits make a collision with the content practically impossible; the check
    # makes it impossible (a boundary must not occur inside the parts, RFC 2046 section 5.1.1).
    while True:
        boundary = b"----=_smime_" + secrets.token_hex(16).encode()
        if boundary not in content:
            return boundary


# --- encrypt -----------------------------------------------------------------------------------

_ENVELOPE_HEADERS = (
    b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="smime.p7m"\r\n'
    b"\r\n"
)

# RSAES-OAEP with SHA-256 and MGF1-SHA-256 (RFC 4055 section 4.1), the RI's non-default
# constructors and NIST SP 800-131A r2; cryptography's envelope builder has no OAEP.
_OAEP_SHA256 = a_cms.KeyEncryptionAlgorithm({
    "algorithm": "rsaes_oaep",
    "parameters": a_algos.RSAESOAEPParams({
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
    }),
}).dump()
_OAEP_SHA256_PADDING = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PKCS1V15 = a_cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15", "parameters": None}).dump()


def encrypt(entity: bytes, recipients: Sequence[x509.Certificate], cipher: str = "aes256",
            key_transport: str = "rsa-pkcs1v15") -> bytes:
    """Encrypt ``entity`` (unchanged) to every certificate in ``recipients``.

    Returns the ``application/pkcs7-mime; smime-type=enveloped-data`` entity: headers, blank
    line, base64 DER EnvelopedData in 76-character CRLF lines.
    """
    if cipher not in _CIPHERS:
        raise SmimeError("unsupported-algorithm", f"cipher {cipher!r} is not one of {', '.join(_CIPHERS)}")
    if key_transport not in _KEY_TRANSPORTS:
        raise SmimeError("unsupported-algorithm",
                         f"key transport {key_transport!r} is not one of {', '.join(_KEY_TRANSPORTS)}")
    if not recipients:
        raise SmimeError("bad-argument", "encrypt needs at least one recipient certificate")
    oid_name, key_size = _CIPHERS[cipher]
    cek, iv = os.urandom(key_size), os.urandom(16)
    padder = sym_padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(entity) + padder.finalize()) + encryptor.finalize()

    infos = []
    for cert in recipients:
        public_key = cert.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise SmimeError("unsupported-algorithm", f"recipient {cert.subject.rfc4514_string()} has no RSA key")
        if key_transport == "rsa-oaep":
            algorithm, encrypted_key = _OAEP_SHA256, public_key.encrypt(cek, _OAEP_SHA256_PADDING)
        else:
            algorithm, encrypted_key = _PKCS1V15, public_key.encrypt(cek, padding.PKCS1v15())
        # KeyTransRecipientInfo v0 with issuerAndSerialNumber, the form every peer reads; the
        # issuer is the certificate's own DER so it matches byte for byte on the other side.
        rid = _tlv(0x30, cert.issuer.public_bytes() + a_core.Integer(cert.serial_number).dump())
        infos.append(_tlv(0x30, b"".join((b"\x02\x01\x00", rid, algorithm, _tlv(0x04, encrypted_key)))))
    # Written as DER by hand: asn1crypto re-encodes every enclosing container on each
    # assignment, which copied the ~40 KB ciphertext a dozen times and cost 10 ms per message.
    # The layout is checked against `openssl cms` in tests/test_smime.py.
    infos.sort()  # DER SET OF: elements in ascending order of their encodings
    encrypted_content_info = _tlv(0x30, b"".join((
        _OID_DATA,
        _tlv(0x30, _CIPHER_OIDS[oid_name] + _tlv(0x04, iv)),
        _tlv(0x80, ciphertext),  # [0] IMPLICIT OCTET STRING, primitive
    )))
    enveloped_data = _tlv(0x30, b"".join((b"\x02\x01\x00", _tlv(0x31, b"".join(infos)), encrypted_content_info)))
    content_info = _tlv(0x30, _OID_ENVELOPED_DATA + _tlv(0xA0, enveloped_data))
    return _ENVELOPE_HEADERS + _b64_lines(content_info)


def _tlv(tag: int, value: bytes) -> bytes:
    """One DER tag-length-value (definite length, minimal length octets)."""
    size = len(value)
    if size < 0x80:
        return bytes((tag, size)) + value
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets + value


_OID_DATA = a_cms.ContentType("data").dump()
_OID_ENVELOPED_DATA = a_cms.ContentType("enveloped_data").dump()
_CIPHER_OIDS = {oid_name: a_algos.EncryptionAlgorithmId(oid_name).dump() for oid_name, _ in _CIPHERS.values()}


# --- MIME parsing (just enough, on bytes, without re-serialising) -----------------------------

def _decode_body(data: bytes, head: Head, end: int | None = None) -> bytes:
    body = data[head.body:end]
    encoding = head.transfer_encoding()
    if encoding == "base64":
        try:
            # validate=False drops line breaks and any other non-alphabet byte, as MUAs do.
            return base64.b64decode(body)
        except (binascii.Error, ValueError) as exc:
            raise SmimeError("malformed", f"bad base64 body: {exc}") from None
    if encoding in ("7bit", "8bit", "binary"):
        return body
    raise SmimeError("malformed", f"unsupported Content-Transfer-Encoding {encoding!r}")


def _load_content_info(der: bytes) -> a_cms.ContentInfo:
    # asn1crypto parses BER too (indefinite lengths, constructed OCTET STRINGs) which is
    # the point: cryptography's parser is DER-only. strict=False tolerates trailing bytes
    # (an MTA may append a line break to a binary body).
    info = a_cms.ContentInfo.load(der)
    info["content_type"].native  # force the outer parse so garbage fails here, not later
    return info


# --- decrypt -----------------------------------------------------------------------------------

def decrypt(message: bytes, cert: x509.Certificate, key) -> Decrypted:
    """Decrypt an ``application/pkcs7-mime`` enveloped-data message (whole message or entity).

    Accepts the x- type, base64 or binary bodies, DER or BER; PKCS#1 v1.5 or RSA-OAEP key
    transport; AES-CBC content encryption. The RecipientInfo is picked by ``cert`` (issuer and
    serial number, or subject key identifier).
    """
    try:
        return _decrypt(bytes(message), cert, key)
    except SmimeError:
        raise
    except Exception as exc:  # noqa: BLE001 - see below
        # asn1crypto parses lazily: malformed input can raise ValueError, TypeError, KeyError,
        # IndexError, RecursionError ... from any attribute access. Callers (the SMTP receiver)
        # rely on hostile bytes only ever producing SmimeError; the original stays chained.
        raise SmimeError("malformed", f"cannot parse the enveloped data: {type(exc).__name__}: {exc}") from exc


def _decrypt(message: bytes, cert: x509.Certificate, key) -> Decrypted:
    head = head_of(message)
    mime_type, params = head.content_type()
    if mime_type not in _ENVELOPE_MIME:
        raise SmimeError("not-encrypted", f"Content-Type is {mime_type}, not application/pkcs7-mime")
    smime_type = params.get("smime-type", "enveloped-data").lower()
    if smime_type not in ("enveloped-data", "authenveloped-data"):
        raise SmimeError("not-encrypted", f"smime-type is {smime_type}, not enveloped-data")
    info = _load_content_info(_decode_body(message, head))
    content_type = info["content_type"].native
    if content_type == "authenticated_enveloped_data":
        raise SmimeError("unsupported-algorithm", "AuthEnvelopedData (AES-GCM) is not used in Direct")
    if content_type != "enveloped_data":
        raise SmimeError("not-encrypted", f"CMS content type is {content_type}, not enveloped-data")
    envelope = info["content"]
    eci = envelope["encrypted_content_info"]

    # Check the content cipher before touching the key: 3DES/RC2 must be refused as such,
    # not reported as a decryption failure.
    cipher_id = eci["content_encryption_algorithm"]
    cipher_name = cipher_id["algorithm"].native
    if cipher_name not in _CIPHER_BY_OID_NAME:
        raise SmimeError("unsupported-algorithm",
                         f"content encryption {cipher_name} is not allowed (AES-128/192/256-CBC only)")
    cipher, key_size = _CIPHER_BY_OID_NAME[cipher_name]
    iv = cipher_id["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != 16:
        raise SmimeError("malformed", "AES-CBC parameters are not a 16-byte IV")
    if eci["encrypted_content"].native is None:
        raise SmimeError("malformed", "EnvelopedData has no encryptedContent (detached ciphertext)")

    recipient = _find_recipient(envelope["recipient_infos"], cert)
    kea = recipient["key_encryption_algorithm"]
    kea_name = kea["algorithm"].native
    if kea_name == "rsaes_pkcs1v15":
        key_transport, rsa_padding = "rsa-pkcs1v15", padding.PKCS1v15()
    elif kea_name == "rsaes_oaep":
        key_transport, rsa_padding = "rsa-oaep", _oaep_padding(kea["parameters"])
    else:
        raise SmimeError("unsupported-algorithm", f"key transport {kea_name} is not supported")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SmimeError("unsupported-algorithm", "key transport needs an RSA private key")

    # One error for every way decryption can fail (wrong key, bad padding, wrong key length,
    # bad content padding): distinct errors would be a padding oracle (Bleichenbacher /
    # Vaudenay). With PKCS#1 v1.5 OpenSSL >= 3.2 returns a pseudo-random key instead of an
    # error (implicit rejection), which then fails the content padding or length check.
    failed = SmimeError("decrypt-failed", "cannot decrypt: wrong key or corrupted message")
    try:
        cek = key.decrypt(recipient["encrypted_key"].native, rsa_padding)
    except ValueError:
        raise failed from None
    if len(cek) != key_size:
        raise failed
    ciphertext = eci["encrypted_content"].native
    if not ciphertext or len(ciphertext) % 16:
        raise failed
    decryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
    unpadder = sym_padding.PKCS7(128).unpadder()
    try:
        entity = unpadder.update(decryptor.update(ciphertext) + decryptor.finalize()) + unpadder.finalize()
    except ValueError:
        raise failed from None
    return Decrypted(entity=entity, cipher=cipher, key_transport=key_transport)


def _find_recipient(infos, cert: x509.Certificate):
    issuer_der = cert.issuer.public_bytes()
    issuer = a_x509.Name.load(issuer_der)
    ski = _ski(cert)
    ktris = [info.chosen for info in infos if info.name == "ktri"]
    if not ktris:
        raise SmimeError("no-recipient-info", "no key-transport RecipientInfo (only RSA key transport is supported)")
    for ktri in ktris:
        rid = ktri["rid"]
        if rid.name == "issuer_and_serial_number":
            ias = rid.chosen
            if ias["serial_number"].native == cert.serial_number and _same_name(ias["issuer"], issuer_der, issuer):
                return ktri
        elif ski is not None and rid.chosen.native == ski:
            return ktri
    raise SmimeError("no-recipient-info",
                     f"the message is not encrypted to {cert.subject.rfc4514_string()} "
                     f"(serial {cert.serial_number:x}); {len(ktris)} other recipient(s)")


def _same_name(name: a_x509.Name, der: bytes, parsed: a_x509.Name) -> bool:
    # Byte equality first: asn1crypto's Name equality runs RFC 4518 string preparation on
    # every attribute (about 2 ms per message); it is only needed when encodings differ.
    return name.dump() == der or name == parsed


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _oaep_padding(params) -> padding.OAEP:
    # Absent parameters mean the RFC 8017 defaults: SHA-1, MGF1-SHA-1, empty label
    # (what the Java RI's default constructor and `openssl cms -keyopt rsa_padding_mode:oaep` send).
    if params.native is None:
        params = a_algos.RSAESOAEPParams({})
    hash_name = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise SmimeError("unsupported-algorithm", f"OAEP mask generation {mgf['algorithm'].native} is not supported")
    mgf_hash_name = mgf["parameters"]["algorithm"].native
    label = params["p_source_algorithm"]["parameters"].native or None
    # SHA-1 is acceptable inside OAEP (it is a mask function, not a signature digest).
    table = dict(_HASHES, sha1=hashes.SHA1)
    if hash_name not in table or mgf_hash_name not in table:
        raise SmimeError("unsupported-algorithm", f"OAEP with {hash_name}/MGF1-{mgf_hash_name} is not supported")
    return padding.OAEP(mgf=padding.MGF1(table[mgf_hash_name]()), algorithm=table[hash_name](), label=label)


# --- verify ------------------------------------------------------------------------------------

def verify(entity: bytes) -> Verified:
    """Verify a ``multipart/signed`` entity (or opaque ``application/pkcs7-mime`` signed-data).

    Checks the cryptography only: detached shape, algorithm profile, content-type and
    message-digest attributes, and the signature with the signer certificate found in the
    SignedData. Trust (path, anchors, revocation, address binding) is the caller's job.
    """
    try:
        return _verify(bytes(entity))
    except SmimeError:
        raise
    except Exception as exc:  # noqa: BLE001 - same reason as in decrypt()
        raise SmimeError("malformed", f"cannot parse the signed data: {type(exc).__name__}: {exc}") from exc


def _verify(entity: bytes) -> Verified:
    head = head_of(entity)
    mime_type, params = head.content_type()
    if mime_type in _ENVELOPE_MIME:
        smime_type = params.get("smime-type", "").lower()
        if smime_type == "enveloped-data":
            raise SmimeError("not-signed", "the entity is encrypted; decrypt it first")
        info = _load_content_info(_decode_body(entity, head))
        if info["content_type"].native != "signed_data":
            raise SmimeError("not-signed", f"CMS content type is {info['content_type'].native}, not signed-data")
        signed = info["content"]
        econtent = signed["encap_content_info"]["content"]
        if econtent.native is None:
            raise SmimeError("not-signed", "opaque signed-data without content")
        return _check_signed_data(signed, econtent.native, "", detached=False)
    if mime_type != "multipart/signed":
        raise SmimeError("not-signed", f"Content-Type is {mime_type or 'missing'}, not multipart/signed")
    boundary = params.get("boundary", "")
    if not boundary:
        raise SmimeError("malformed", "multipart/signed without a boundary parameter")
    protocol = params.get("protocol", "").lower()
    if protocol not in _SIGNED_MIME:
        raise SmimeError("not-signed", f"multipart/signed protocol is {protocol!r}, not application/pkcs7-signature")
    content, sig_head, sig_end = _split_signed(entity, head.body, boundary.encode("latin-1"))
    sig_type, _ = sig_head.content_type()
    if sig_type not in _SIGNED_MIME:
        raise SmimeError("not-signed", f"second part is {sig_type}, not application/pkcs7-signature")
    info = _load_content_info(_decode_body(entity, sig_head, sig_end))
    if info["content_type"].native != "signed_data":
        raise SmimeError("not-signed", f"signature part holds {info['content_type'].native}, not signed-data")
    signed = info["content"]
    if signed["encap_content_info"]["content"].native is not None:
        raise SmimeError("not-detached", "multipart/signed carries a SignedData with eContent (must be detached)")
    return _check_signed_data(signed, content, params.get("micalg", ""))


def _split_signed(data: bytes, body: int, boundary: bytes) -> tuple[bytes, Head, int]:
    """Return (exact first-part bytes, header of the second part, end offset of the second part).

    The first part is exactly the bytes between the line break ending the first delimiter line
    and the one starting the next (RFC 1847 section 2.1, :func:`.multipart.delimiters`).
    """
    found = delimiters(data, body, boundary, limit=3)
    if len(found) < 3:
        raise SmimeError("malformed", "multipart/signed does not have two complete parts")
    if found[0].closing or found[1].closing or not found[2].closing:
        raise SmimeError("malformed", "multipart/signed must have exactly two parts (DTS 207)")
    content = data[found[0].end:found[1].start]
    return content, head_of(data, found[1].end), found[2].start


def _check_signed_data(signed, content: bytes, micalg: str, detached: bool = True) -> Verified:
    certificates = []
    asn1_certs = []
    for choice in signed["certificates"] or ():
        if choice.name == "certificate":  # attribute certificates etc. cannot sign
            asn1_certs.append(choice.chosen)
            certificates.append(x509.load_der_x509_certificate(choice.chosen.dump()))
    signer_infos = list(signed["signer_infos"])
    if not signer_infos:
        raise SmimeError("not-signed", "SignedData has no SignerInfo")
    # RFC 5652 section 5.1: any one valid signature suffices; report the first failure if none is.
    first_error = None
    for signer_info in signer_infos:
        try:
            signer, digest = _check_signer(signer_info, content, asn1_certs, certificates)
        except SmimeError as exc:
            first_error = first_error or exc
            continue
        return Verified(content=content, signer=signer, certificates=certificates, digest=digest, micalg=micalg,
                        detached=detached)
    raise first_error


def _check_signer(signer_info, content: bytes, asn1_certs, certificates) -> tuple[x509.Certificate, str]:
    sid = signer_info["sid"]
    signer = None
    for asn1_cert, cert in zip(asn1_certs, certificates):
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            if asn1_cert.serial_number == ias["serial_number"].native and _same_name(
                    ias["issuer"], asn1_cert.issuer.dump(), asn1_cert.issuer):
                signer = cert
                break
        elif asn1_cert.key_identifier == sid.chosen.native:
            signer = cert
            break
    if signer is None:
        raise SmimeError("no-signer-certificate", "the signer's certificate is not included in the signature (DTS 167)")

    digest = signer_info["digest_algorithm"]["algorithm"].native
    hash_alg = _hash_for(digest)
    sig_alg = signer_info["signature_algorithm"]
    sig_name = sig_alg["algorithm"].native
    public_key = signer.public_key()

    signed_attrs = signer_info["signed_attrs"]
    if signed_attrs.native is not None:
        attrs = {attr["type"].native: attr["values"] for attr in signed_attrs}
        content_types = attrs.get("content_type")
        if content_types is None or len(content_types) != 1 or content_types[0].native != "data":
            raise SmimeError("bad-signature", "content-type signed attribute missing or not id-data")
        digests = attrs.get("message_digest")
        if digests is None or len(digests) != 1:
            raise SmimeError("bad-signature", "message-digest signed attribute missing")
        if not hmac.compare_digest(digests[0].native, hashlib.new(digest, content).digest()):
            raise SmimeError("digest-mismatch", "the content does not match the signed message digest")
        # RFC 5652 section 5.4: the signature covers the DER SET OF, i.e. the [0] IMPLICIT
        # encoding with its tag replaced by the universal SET tag 0x31. Keep the received
        # bytes (re-encoding could change them) unless they use a BER indefinite length.
        raw = signed_attrs.dump()
        signed_bytes = b"\x31" + raw[1:] if raw[1] != 0x80 else signed_attrs.untag().dump(force=True)
    else:
        signed_bytes = content  # no signed attributes: the signature is over the content itself

    signature = signer_info["signature"].native
    try:
        if sig_name in ("rsassa_pkcs1v15", "sha224_rsa", "sha256_rsa", "sha384_rsa", "sha512_rsa"):
            if sig_name != "rsassa_pkcs1v15" and sig_name[:-4] != digest:
                raise SmimeError("bad-signature", f"signature algorithm {sig_name} disagrees with digest {digest}")
            _need(public_key, rsa.RSAPublicKey)
            public_key.verify(signature, signed_bytes, padding.PKCS1v15(), hash_alg)
        elif sig_name == "rsassa_pss":
            _need(public_key, rsa.RSAPublicKey)
            pss, pss_hash = _pss_padding(sig_alg["parameters"])
            public_key.verify(signature, signed_bytes, pss, pss_hash)
        elif sig_name in ("ecdsa", "sha224_ecdsa", "sha256_ecdsa", "sha384_ecdsa", "sha512_ecdsa"):
            _need(public_key, ec.EllipticCurvePublicKey)
            public_key.verify(signature, signed_bytes, ec.ECDSA(hash_alg))
        elif sig_name in ("md2_rsa", "md5_rsa", "sha1_rsa", "sha1_ecdsa", "sha1_dsa"):
            raise SmimeError("weak-digest", f"signature algorithm {sig_name} is not allowed")
        else:
            raise SmimeError("unsupported-algorithm", f"signature algorithm {sig_name} is not supported")
    except InvalidSignature:
        raise SmimeError("bad-signature", "the signature does not verify with the signer certificate's key") from None
    except UnsupportedAlgorithm as exc:
        raise SmimeError("unsupported-algorithm", str(exc)) from None
    return signer, digest


def _need(public_key, kind) -> None:
    if not isinstance(public_key, kind):
        raise SmimeError("bad-signature", "the signature algorithm does not match the signer certificate's key")


def _pss_padding(params) -> tuple[padding.PSS, hashes.HashAlgorithm]:
    if params.native is None:
        params = a_algos.RSASSAPSSParams({})
    hash_name = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    mgf_hash = mgf["parameters"]["algorithm"].native if mgf["algorithm"].native == "mgf1" else None
    if hash_name in _WEAK_DIGESTS or mgf_hash in _WEAK_DIGESTS:
        raise SmimeError("weak-digest", f"RSA-PSS with {hash_name}/MGF1-{mgf_hash} is not allowed")
    if hash_name not in _HASHES or mgf_hash not in _HASHES:
        raise SmimeError("unsupported-algorithm", f"RSA-PSS with {hash_name}/MGF1-{mgf_hash} is not supported")
    pss = padding.PSS(mgf=padding.MGF1(_HASHES[mgf_hash]()), salt_length=params["salt_length"].native)
    return pss, _HASHES[hash_name]()
