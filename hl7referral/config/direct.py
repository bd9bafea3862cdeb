"""The ``[direct]`` section of ``engine.toml``: our Direct identity, trust, the HISP relay, MDN timers.

Paths are resolved like every other path in the engine configuration. Loading
only checks shapes and values; whether the certificate and key files exist is
decided when the Direct service starts (a missing example certificate turns the
Direct transport off with one log line, and referrals fall back to fax).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .schema import ConfigError

DIRECT_SCHEMA = {
    "address": str,
    "certificate": str,
    "key": str,
    "chain": [str],
    "cipher": ("aes128", "aes256"),
    "key_transport": ("rsa-pkcs1v15", "rsa-oaep"),
    "include_bare_cda": bool,
    "request_final_delivery": bool,
    "processed_timeout": float,
    "dispatched_timeout": float,
    "certificates_dir": str,
    "dns": str,
    "revocation": ("soft-fail", "hard-fail"),
    "crls": [str],
    "anchors": [{"domain": str, "files": [str]}],
    "retry": {"max_attempts": int, "first_delay": float, "max_delay": float},
    "smtp": {"host": str, "port": int, "starttls": ("require", "opportunistic", "none"), "username": str,
             "password_env": str, "ca_file": str, "helo": str, "timeout": float},
    "inbound": {"endpoint": str, "domains": [str], "max_size": int, "deliver_dir": str},
    "mailbox": {"host": str, "port": int, "username": str, "password_env": str,
                "tls": ("implicit", "starttls", "none"), "ca_file": str, "interval": float},
}

_ADDRESS = re.compile(r"^[^@\s]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$|^[^@\s]+@[A-Za-z0-9.-]+$")


@dataclass(frozen=True)
class RelayConfig:
    host: str = ""
    port: int = 25
    starttls: str = "require"
    username: str = ""
    password_env: str = ""
    ca_file: Path | None = None
    helo: str = "localhost"
    timeout: float = 60.0


@dataclass(frozen=True)
class DirectConfig:
    address: str = ""
    certificate: Path | None = None
    key: Path | None = None
    chain: tuple[Path, ...] = ()
    cipher: str = "aes256"
    key_transport: str = "rsa-pkcs1v15"
    include_bare_cda: bool = True
    request_final_delivery: bool = True
    processed_timeout: float = 3600.0
    dispatched_timeout: float = 3600.0
    certificates_dir: Path | None = None
    dns: str = ""
    revocation: str = "soft-fail"
    crls: tuple[Path, ...] = ()
    anchors: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    max_attempts: int = 8
    first_delay: float = 60.0
    max_delay: float = 3600.0
    relay: RelayConfig = RelayConfig()
    inbound_endpoint: str = ""
    inbound_domains: tuple[str, ...] = ()
    inbound_max_size: int = 25 * 2 ** 20
    deliver_dir: Path | None = None
    mailbox: dict = field(default_factory=dict)  # [direct.mailbox]: POP3 polling ("host" "" = off)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


def load_direct(data: dict[str, Any], defaults: dict[str, Any], source: str,
                resolve: Callable[[str], Path]) -> DirectConfig:
    d = {**defaults, **data}
    smtp = {**defaults.get("smtp", {}), **data.get("smtp", {})}
    inbound = {**defaults.get("inbound", {}), **data.get("inbound", {})}
    retry = {**defaults.get("retry", {}), **data.get("retry", {})}

    def path(value: str) -> Path | None:
        return resolve(value) if value else None

    address = d.get("address", "")
    if address and not _ADDRESS.match(address):
        raise ConfigError(source, 0, "direct.address", f"{address!r} is not an email address")
    anchors: dict[str, tuple[Path, ...]] = {}
    for i, a in enumerate(d.get("anchors", [])):
        domain = a.get("domain", "").lower()
        if not domain:
            raise ConfigError(source, 0, f"direct.anchors.{i}.domain", "required (a domain, or \"*\" for all)")
        anchors[domain] = tuple(resolve(f) for f in a.get("files", []))
    for key in ("processed_timeout", "dispatched_timeout"):
        if float(d.get(key, 1)) <= 0:
            raise ConfigError(source, 0, f"direct.{key}", "must be more than 0 seconds")
    if retry.get("max_attempts", 1) < 1:
        raise ConfigError(source, 0, "direct.retry.max_attempts", "must be at least 1")
    domains = tuple(x.lower() for x in inbound.get("domains", []))
    if inbound.get("endpoint") and not domains and address:
        domains = (address.rpartition("@")[2].lower(),)
    return DirectConfig(
        address=address,
        certificate=path(d.get("certificate", "")),
        key=path(d.get("key", "")),
        chain=tuple(resolve(c) for c in d.get("chain", [])),
        cipher=d.get("cipher", "aes256"),
        key_transport=d.get("key_transport", "rsa-pkcs1v15"),
        include_bare_cda=bool(d.get("include_bare_cda", True)),
        request_final_delivery=bool(d.get("request_final_delivery", True)),
        processed_timeout=float(d.get("processed_timeout", 3600.0)),
        dispatched_timeout=float(d.get("dispatched_timeout", 3600.0)),
        certificates_dir=path(d.get("certificates_dir", "")),
        dns=d.get("dns", ""),
        revocation=d.get("revocation", "soft-fail"),
        crls=tuple(resolve(c) for c in d.get("crls", [])),
        anchors=anchors,
        max_attempts=int(retry.get("max_attempts", 8)),
        first_delay=float(retry.get("first_delay", 60.0)),
        max_delay=float(retry.get("max_delay", 3600.0)),
        relay=RelayConfig(host=smtp.get("host", ""), port=int(smtp.get("port", 25)),
                          starttls=smtp.get("starttls", "require"), username=smtp.get("username", ""),
                          password_env=smtp.get("password_env", ""), ca_file=path(smtp.get("ca_file", "")),
                          helo=smtp.get("helo", "localhost"), timeout=float(smtp.get("timeout", 60.0))),
        inbound_endpoint=inbound.get("endpoint", ""),
        inbound_domains=domains,
        inbound_max_size=int(inbound.get("max_size", 25 * 2 ** 20)),
        deliver_dir=path(inbound.get("deliver_dir", "")),
        mailbox={**defaults.get("mailbox", {}), **data.get("mailbox", {})},
    )
