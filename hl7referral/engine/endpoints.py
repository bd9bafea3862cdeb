"""Listening endpoints from Twisted endpoint strings.

``tcp:``, ``unix:`` and the rest go to :func:`twisted.internet.endpoints.serverFromString`.
``ssl:`` is built here, so that mutual TLS is what an interface analyst expects
of a healthcare engine (IHE ATNA): TLS 1.2 or later, the trust roots named in
the configuration and never the system store, a client certificate required
whenever trust roots are given, and an optional CRL checked on every handshake.

``ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem[:extraCertChain=CHAIN.pem]
[:caCerts=ROOTS.pem][:caCertsDir=DIR][:crl=CRL.pem][:requireClientCert=yes|no]
[:tlsMin=1.2|1.3][:interface=ADDR][:backlog=N]``

Relative file names are resolved against the configuration file's directory.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet import endpoints, ssl

_SSL_KEYS = {"privateKey", "certKey", "extraCertChain", "caCerts", "caCertsDir", "crl",
             "requireClientCert", "tlsMin", "interface", "backlog", "port"}


class EndpointError(ValueError):
    pass


def split_description(description: str) -> list[str]:
    r"""Split on ':' honouring '\:' escapes, as Twisted's own parser does."""
    parts, cur, escaped = [], [], False
    for ch in description:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


class CRLCheckingOptions(ssl.CertificateOptions):
    """CertificateOptions that also checks peer certificates against CRLs."""

    def __init__(self, *args, crls: list[x509.CertificateRevocationList] = (), **kw) -> None:
        super().__init__(*args, **kw)
        self._crls = list(crls)

    def _makeContext(self, *args, **kw):
        ctx = super()._makeContext(*args, **kw)
        if self._crls:
            store = ctx.get_cert_store()
            for crl in self._crls:
                store.add_crl(crl)
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        return ctx


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise EndpointError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise EndpointError(f"{path}: not a PEM certificate file ({exc})") from None


def tls_options(kw: dict[str, str], base: Path) -> ssl.CertificateOptions:
    def path(name: str) -> Path:
        p = Path(kw[name]).expanduser()
        return p if p.is_absolute() else base / p

    if "privateKey" not in kw and "certKey" not in kw:
        raise EndpointError("ssl: needs certKey= (certificate) and privateKey=")
    cert_path = path("certKey" if "certKey" in kw else "privateKey")
    key_path = path("privateKey" if "privateKey" in kw else "certKey")
    cert = crypto.X509.from_cryptography(_read_certs(cert_path)[0])  # its errors name cert_path
    try:
        key = crypto.PKey.from_cryptography_key(
            serialization.load_pem_private_key(key_path.read_bytes(), password=None))
    except OSError as exc:
        raise EndpointError(f"{key_path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise EndpointError(f"{key_path}: not a usable PEM private key ({exc})") from None
    chain = [crypto.X509.from_cryptography(c) for c in _read_certs(path("extraCertChain"))] \
        if "extraCertChain" in kw else []
    roots: list[x509.Certificate] = []
    if "caCerts" in kw:
        roots += _read_certs(path("caCerts"))
    if "caCertsDir" in kw:
        d = path("caCertsDir")
        if not d.is_dir():
            raise EndpointError(f"{d}: not a directory")
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in (".pem", ".crt", ".cer"):
                roots += _read_certs(f)
    crls = []
    if "crl" in kw:
        try:
            crls = [x509.load_pem_x509_crl(path("crl").read_bytes())]
        except (OSError, ValueError) as exc:
            raise EndpointError(f"{path('crl')}: not a PEM CRL ({exc})") from None
    minimum = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}.get(kw.get("tlsMin", "1.2"))
    if minimum is None:
        raise EndpointError("tlsMin must be 1.2 or 1.3")
    require = kw.get("requireClientCert", "yes").lower() in ("yes", "true", "1")
    options: dict = dict(privateKey=key, certificate=cert, extraCertChain=chain, raiseMinimumTo=minimum, crls=crls)
    if roots and require:
        options["trustRoot"] = ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in roots])
    elif roots:
        # Verify a certificate when one is offered, but do not demand one.
        options.update(verify=True, caCerts=[crypto.X509.from_cryptography(c) for c in roots], requireCertificate=False)
    elif require and ("caCerts" in kw or "caCertsDir" in kw):
        raise EndpointError("no trust roots found for requireClientCert")
    return CRLCheckingOptions(**options)


def server_endpoint(reactor, description: str, base: Path = Path(".")):
    """An IStreamServerEndpoint for ``description``; raises EndpointError."""
    if description.startswith("ssl:"):
        parts = split_description(description)[1:]
        kw: dict[str, str] = {}
        positional = []
        for p in parts:
            k, sep, v = p.partition("=")
            if sep:
                if k not in _SSL_KEYS:
                    raise EndpointError(f"ssl: unknown option {k!r} (known: {', '.join(sorted(_SSL_KEYS))})")
                kw[k] = v
            else:
                positional.append(p)
        port = kw.get("port") or (positional[0] if positional else "")
        if not port.isdigit():
            raise EndpointError(f"ssl: port must be a number, not {port!r}")
        options = tls_options(kw, base)
        return endpoints.SSL4ServerEndpoint(reactor, int(port), options,
                                            backlog=int(kw.get("backlog", 50)),
                                            interface=kw.get("interface", ""))
    try:
        return endpoints.serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as exc:
        raise EndpointError(f"bad endpoint {description!r}: {exc}") from None


def is_tls(description: str) -> bool:
    return description.startswith("ssl:")


def describe_port(port) -> str:
    """'127.0.0.1:2575' for a listening port."""
    addr = port.getHost()
    host = getattr(addr, "host", None)
    return f"{host}:{addr.port}" if host is not None else str(getattr(addr, "name", addr))
