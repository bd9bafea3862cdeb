"""Configuration for the two-engine harness, generated from parameters.

Nothing here is a template: an engine's ``engine.toml``, its channel files and its
``directory.toml`` are Python dicts built by small functions from the harness's wiring
(ports, paths, the example PKI), then written as TOML. Later work adds a key or a channel
by passing a dict (deep-merged over the generated one) or a TOML fragment, never by
editing a file here.

Invariants
----------
* Every file written parses back (``tomllib``) to exactly the data it was written from;
  :func:`dump_toml` raises instead of writing TOML that would mean something else.
* Every path in a generated file is absolute, so the engine's working directory and the
  file's own location never change what it refers to.
* An engine's Direct identity (certificate and key) is read from the PKI in place; only
  its peers' public certificates (and the intermediate that chains them) are copied into
  the engine's own ``peers/`` directory, which is its ``direct.certificates_dir``.
"""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

LOOPBACK = "127.0.0.1"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# -- identities, wiring, specs --------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A Direct identity from the example PKI (``certs-example/make_certs.py``, ``direct/``)."""

    address: str
    stem: str            # <pki>/<stem>.pem and <stem>.key: the address-bound certificate and its key

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


# The two address-bound identities the example PKI makes (certs-example/README.md).
REFERRER_IDENTITY = Identity("referrals@direct.sender.test", "sender")
SPECIALIST_IDENTITY = Identity("cardiology@direct.receiver.test", "receiver")
# The referred-to provider's NPI in samples/ref-i12.hl7 (PRD|RT|...|1234567893^NPI).
SAMPLE_REFERRED_TO_NPI = "1234567893"
# The specialist engine's practice in the referrer's directory (by NPI, or by this name).
SPECIALIST_PRACTICE = "Harness Cardiology"


@dataclass(frozen=True)
class EnginePorts:
    """An engine's fixed loopback ports, chosen once so a restarted engine comes back on them."""

    mllp: int
    smtp: int


@dataclass(frozen=True)
class Wiring:
    """Everything a generated setting may refer to: the harness's ports and paths."""

    pki: Path                              # the example PKI's direct/ directory
    relay_port: int
    ports: Mapping[str, EnginePorts]       # engine name -> its ports
    dirs: Mapping[str, Path]               # engine name -> its directory
    ehr_ports: Mapping[str, int]           # engine name -> its EHR stand-in's MLLP port
    identities: Mapping[str, Identity]     # engine name -> its Direct identity


Settings = Mapping[str, Any] | Callable[[Wiring], Mapping[str, Any]]


@dataclass
class EngineSpec:
    """What makes one engine of the pair: its identity, channels, directory and extra settings.

    ``settings``, ``channels`` and ``directory`` may be callables taking the :class:`Wiring`,
    for values that need a port or a path known only once the harness has chosen them.
    ``settings`` is deep-merged over the generated ``engine.toml``; ``fragments`` are TOML
    text appended to it (the file must still parse); ``channels`` maps a file stem to a
    channel table; ``peers`` names the engines whose certificates this one may encrypt to.
    """

    name: str
    identity: Identity
    peers: tuple[str, ...]
    channels: Mapping[str, Any] | Callable[[Wiring], Mapping[str, Any]] = field(default_factory=dict)
    directory: list | Callable[[Wiring], list] = field(default_factory=list)
    settings: Settings = field(default_factory=dict)
    fragments: tuple[str, ...] = ()


def resolve(value, wiring: Wiring):
    return value(wiring) if callable(value) else value


# -- generated settings ----------------------------------------------------------------


def engine_settings(name: str, wiring: Wiring) -> dict:
    """The ``engine.toml`` every harness engine shares: its store, listener, channels and Direct."""
    ports, identity, pki, home = wiring.ports[name], wiring.identities[name], wiring.pki, wiring.dirs[name]
    return {
        "store": {"path": str(home / "store.db")},
        "log": {"level": "info"},
        "channels": {"dir": str(home / "channels")},
        "listeners": [{"name": "main", "endpoint": f"tcp:{ports.mllp}:interface={LOOPBACK}"}],
        "direct": {
            "address": identity.address,
            "certificate": str(pki / f"{identity.stem}.pem"),
            "key": str(pki / f"{identity.stem}.key"),
            "chain": [str(pki / "intermediate.pem")],
            "certificates_dir": str(home / "peers"),
            "crls": [str(pki / "intermediate.crl.pem"), str(pki / "anchor.crl.pem")],
            "anchors": [{"domain": "*", "files": [str(pki / "anchor.pem")]}],
            # Seconds, not the production minutes: a retry after a restart must come within a test.
            "retry": {"max_attempts": 30, "first_delay": 0.5, "max_delay": 2.0},
            "smtp": {"host": LOOPBACK, "port": wiring.relay_port, "starttls": "none", "timeout": 10.0},
            "inbound": {"endpoint": f"tcp:{ports.smtp}:interface={LOOPBACK}", "domains": [identity.domain]},
        },
    }


def referrer_settings(wiring: Wiring, name: str = "referrer") -> dict:
    """The referring side: consult notes go back to its EHR stand-in as MDM^T02 over MLLP."""
    return {"loop": {"return": {
        "endpoint": f"tcp:host={LOOPBACK}:port={wiring.ehr_ports[name]}",
        "ack_timeout": 10.0, "first_delay": 0.5, "max_delay": 2.0,
        "receiving_application": "EHR", "receiving_facility": "REFERRING CLINIC",
    }}}


def channel(name: str, accept: list[str], *, mapping: str | None = None, transports: list[str] | None = None,
            destination: dict | None = None, tracker: bool = False, listener: str = "main",
            description: str = "") -> dict:
    """One ``channels/<name>.toml`` table."""
    table: dict[str, Any] = {"name": name}
    if description:
        table["description"] = description
    if mapping:
        table["mapping"] = mapping
    if transports is not None:
        table["transports"] = list(transports)
    if tracker:
        table["tracker"] = True
    table["source"] = {"listener": listener, "accept": list(accept)}
    table["ack"] = {"mode": "after-store"}
    if destination:
        table["destination"] = dict(destination)
    return table


def ref_i12_channel() -> dict:
    """REF^I12 referrals, addressed by the referred-to provider's NPI, sent by Direct only (no fax gateway here)."""
    return channel("ref-i12", ["REF^I12"], mapping="ref-i12", transports=["direct"], destination={"by": "npi"},
                   description="Referrals from the referring EHR stand-in")


def vet_ref_i12_channel() -> dict:
    """Veterinary REF^I12 from the sample veterinary clinic's PIMS, routed by specialty."""
    table = channel("vet-ref-i12", ["REF^I12"], mapping="ref-i12", transports=["direct"],
                    destination={"by": "specialty", "specialty": "veterinary cardiology"},
                    description="Veterinary referrals from the PIMS stand-in")
    table["source"]["sending_facilities"] = ["SAMPLE VET CLINIC"]
    return table


def omg_o19_channel(destination: str = SPECIALIST_PRACTICE) -> dict:
    """360X referral requests (OMG^O19, the referral id in ORC-2) to one named partner, by Direct
    (the order travels in the XDM beside the Referral Note; samples/omg-o19.hl7 has no PRD to route by)."""
    return channel("omg-o19", ["OMG^O19"], mapping="omg-o19", transports=["direct"],
                   destination={"by": "named", "name": destination},
                   description="360X referral requests (OMG^O19) from the referring EHR stand-in")


LOOP_MESSAGES = ["SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15", "SIU^S17", "SIU^S26", "OSU^O51", "RRI^I12", "MDM^T02"]


def loop_events_channel() -> dict:
    """What the EHR says about referrals (its answers, or its cancel): applied by the tracker."""
    return channel("loop-events", LOOP_MESSAGES, tracker=True, description="Loop events from the EHR stand-in")


def referrals_in_channel(wiring: Wiring, engine: str, *, message: str = "REF^I12", cda: str = "embed") -> dict:
    """Referrals that arrive by Direct, handed to *engine*'s EHR stand-in over MLLP."""
    return {"name": "referrals-in", "description": "Referrals sent to us over Direct",
            "source": {"direct": ["*"]},
            "forward": {"endpoint": f"tcp:host={LOOPBACK}:port={wiring.ehr_ports[engine]}", "message": message,
                        "cda": cda, "receiving_application": "EHR", "receiving_facility": "SPECIALIST CLINIC",
                        "ack_timeout": 10.0, "max_attempts": 30}}


def specialist_settings(wiring: Wiring, name: str = "specialist") -> dict:
    """The specialist's side: fast retries towards its EHR stand-in (seconds, for tests)."""
    return {"loop": {"return": {"first_delay": 0.5, "max_delay": 2.0}}}


def specialist_entry(wiring: Wiring, engine: str, *, name: str = SPECIALIST_PRACTICE,
                     npi: str = SAMPLE_REFERRED_TO_NPI, specialty: str = "cardiology") -> dict:
    """A ``[[specialists]]`` entry whose Direct address is *engine*'s identity."""
    return {"name": name, "npi": npi, "specialty": specialty, "direct": wiring.identities[engine].address,
            "organization": name, "phone": "+1-555-555-0180"}


# -- writing -----------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict:
    """*extra* over *base*: tables merge key by key, every other value (lists too) is replaced."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def write_engine(spec: EngineSpec, wiring: Wiring) -> Path:
    """Write *spec*'s engine directory (engine.toml, channels/, directory.toml, peers/); return engine.toml."""
    home = wiring.dirs[spec.name]
    channels_dir, peers_dir = home / "channels", home / "peers"
    for d in (home, channels_dir, peers_dir):
        d.mkdir(parents=True, exist_ok=True)
    for peer in spec.peers:
        stem = wiring.identities[peer].stem
        shutil.copyfile(wiring.pki / f"{stem}.pem", peers_dir / f"{stem}.pem")
    # The intermediate lets the engine build the peer's path to the anchor (a CA certificate there is kept as such).
    shutil.copyfile(wiring.pki / "intermediate.pem", peers_dir / "intermediate.pem")
    for stem, table in resolve(spec.channels, wiring).items():
        write_toml(channels_dir / f"{stem}.toml", table)
    write_toml(channels_dir / "directory.toml", {"specialists": list(resolve(spec.directory, wiring))})
    data = deep_merge(engine_settings(spec.name, wiring), resolve(spec.settings, wiring))
    path = home / "engine.toml"
    text = dump_toml(data)
    for fragment in spec.fragments:
        text += "\n" + fragment.strip() + "\n"
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: a TOML fragment of engine {spec.name!r} does not fit: {exc}") from None
    path.write_text(text, "utf-8")
    return path


def write_toml(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(dump_toml(data), "utf-8")


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML for *data* (str, bool, int, float, lists, tables, arrays of tables).

    The standard library reads TOML but does not write it; this covers what engine and
    channel files hold and checks itself by reading the text back.
    """
    lines: list[str] = []
    _table(lines, [], data)
    text = "\n".join(lines).strip() + "\n"
    if tomllib.loads(text) != _plain(data):
        raise ValueError("dump_toml: the TOML written does not read back as the data given")
    return text


def _table(lines: list[str], prefix: list[str], data: Mapping[str, Any]) -> None:
    subtables, arrays = [], []
    for key, value in data.items():
        if _is_table(value):
            subtables.append((key, value))
        elif _is_tables(value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subtables:
        if not value or any(not _is_table(v) and not _is_tables(v) for v in value.values()):
            lines += ["", f"[{'.'.join(_key(k) for k in [*prefix, key])}]"]   # else its sub-tables define it
        _table(lines, [*prefix, key], value)
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{'.'.join(_key(k) for k in [*prefix, key])}]]"]
            _table(lines, [*prefix, key], item)


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_tables(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 0.5, 1e-06, inf: all TOML floats
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {type(value).__name__} value {value!r}")


def _plain(value: Any) -> Any:
    """*value* as tomllib returns it (tuples are lists, mappings are dicts)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
