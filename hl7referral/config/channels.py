"""``channels/*.toml``: one channel a file.

A channel says what a listener accepts (message types, optionally only from
some sending facilities) and how it is acknowledged. It also names the
mapping, the destination, the transports and the channel's own fax gateway
(``[fax]``, checked by its plugin); unknown keys are refused, so a channel file
never claims more than the engine does.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .notify import NOTIFY_SCHEMA, NotifyConfig, parse_notify
from .schema import ConfigError, locate, toml_error_line, validate

TRANSPORTS = ("direct", "fax")
CHANNEL_SCHEMA = {
    "name": str,
    "description": str,
    "mapping": str,
    "transports": [TRANSPORTS],
    "source": {"listener": str, "accept": [str], "sending_facilities": [str], "direct": [str]},
    "ack": {"mode": ("after-store", "after-mapping")},
    "destination": {"by": ("named", "specialty", "npi"), "name": str, "specialty": str},
    "tracker": bool,   # loop messages (SIU, OSU, RRI, MDM): applied to referrals, no document built
    "notify": NOTIFY_SCHEMA,   # the channel's own notifiers, owners and templates (over the engine's)
    "fax": dict,   # the channel's own fax gateway table (gateway = "http-fax", ...); its plugin checks the keys
    # Referrals that arrive over Direct (source.direct): how they are handed to our own EHR.
    "forward": {"endpoint": str, "message": ("REF^I12", "OMG^O19"), "cda": ("embed", "reference"),
                "documents_dir": str, "reference_url": str, "sending_application": str, "sending_facility": str,
                "receiving_application": str, "receiving_facility": str, "ack_timeout": float,
                "max_attempts": int},
}
FORWARD_DEFAULTS = {"message": "REF^I12", "cda": "embed", "documents_dir": "inbound-documents",
                    "reference_url": "file://{path}", "sending_application": "HL7REFERRAL", "sending_facility": "",
                    "receiving_application": "", "receiving_facility": "", "ack_timeout": 30.0, "max_attempts": 10}


@dataclass(frozen=True)
class ForwardConfig:
    """How an inbound referral reaches our EHR: MLLP endpoint, message type, the C-CDA embedded or referenced."""

    endpoint: str
    message: str = "REF^I12"
    cda: str = "embed"
    documents_dir: str = "inbound-documents"   # load_engine resolves it against engine.toml's directory
    reference_url: str = "file://{path}"       # {path}: the document's absolute path; {referral}, {file}
    sending_application: str = "HL7REFERRAL"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    ack_timeout: float = 30.0
    max_attempts: int = 10


_KIND = re.compile(r"^[A-Z][A-Z0-9]{2}\^[A-Z0-9]{3}$")


@dataclass(frozen=True)
class ChannelConfig:
    name: str
    file: str
    listener: str
    accept: tuple[str, ...]
    sending_facilities: tuple[str, ...] = ()
    ack_mode: str = "after-store"
    description: str = ""
    mapping: str | None = None
    transports: tuple[str, ...] = ()
    destination_by: str = ""
    destination_name: str = ""
    destination_specialty: str = ""
    fax: dict = dataclasses.field(default_factory=dict, compare=False)
    tracker: bool = False
    direct_from: tuple[str, ...] = ()          # inbound Direct referrals: senders taken ("*", "@domain", address)
    forward: ForwardConfig | None = None
    notify: NotifyConfig = dataclasses.field(default_factory=NotifyConfig, compare=False)
    text: str = dataclasses.field(default="", repr=False, compare=False)

    def line_of(self, key: str) -> int:
        return locate(self.text, key)

    @property
    def inbound(self) -> bool:
        """Referrals that arrive over Direct (we are the recipient), not messages on an MLLP listener."""
        return self.forward is not None

    def takes_from(self, address: str) -> bool:
        address = address.lower()
        return any(p == "*" or p.lower() == address or (p.startswith("@") and address.endswith(p.lower()))
                   for p in self.direct_from)

    @property
    def sends_order(self) -> bool:
        """ONC 360X: an OMG^O19 referral travels as the v2 order beside the C-CDA in the XDM packet."""
        return any(k.startswith("OMG^") for k in self.accept)

    def with_documents_dir(self, path: str) -> "ChannelConfig":
        return dataclasses.replace(self, forward=dataclasses.replace(self.forward, documents_dir=path))

    def with_listener(self, listener: str) -> "ChannelConfig":
        return dataclasses.replace(self, listener=listener)


def load_channel(path: Path) -> ChannelConfig:
    file = str(path)
    try:
        text = path.read_text("utf-8")
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(file, 0, "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, toml_error_line(exc), "", f"not valid TOML: {exc}") from None
    validate(data, CHANNEL_SCHEMA, file=file, text=text)
    for key in ("name", "source"):
        if key not in data:
            raise ConfigError(file, 0, key, "required")
    source = data["source"]
    if "direct" in source:
        return _inbound_channel(data, file, text)
    if "forward" in data:
        raise ConfigError(file, locate(text, "forward"), "forward",
                          "only a channel taking referrals over Direct (source.direct) forwards them")
    for key in ("listener", "accept"):
        if key not in source:
            raise ConfigError(file, locate(text, "source") or 0, f"source.{key}", "required")
    if not source["accept"]:
        raise ConfigError(file, locate(text, "source.accept"), "source.accept", "lists no message type")
    for kind in source["accept"]:
        if not _KIND.match(kind):
            raise ConfigError(file, locate(text, "source.accept"), "source.accept",
                              f"{kind!r} is not TYPE^EVENT (e.g. REF^I12)")
    ack_mode = data.get("ack", {}).get("mode", "after-store")
    if ack_mode == "after-mapping" and "mapping" not in data:
        raise ConfigError(file, locate(text, "ack.mode"), "ack.mode", "after-mapping needs a mapping = \"...\"")
    if data.get("tracker") and "mapping" in data:
        raise ConfigError(file, locate(text, "tracker"), "tracker",
                          "a tracker channel applies loop events and builds no document: remove mapping")
    dest = data.get("destination", {})
    by = dest.get("by", "")
    if dest and not by:
        raise ConfigError(file, locate(text, "destination"), "destination.by", "required: named, specialty or npi")
    if by == "named" and not dest.get("name"):
        raise ConfigError(file, locate(text, "destination.by"), "destination.name", "by = \"named\" needs a name")
    return ChannelConfig(
        name=data["name"], file=file, listener=source["listener"],
        accept=tuple(source["accept"]),
        sending_facilities=tuple(source.get("sending_facilities", ())),
        ack_mode=ack_mode,
        description=data.get("description", ""), text=text,
        mapping=data.get("mapping"), transports=tuple(data.get("transports", ())),
        destination_by=by, destination_name=dest.get("name", ""),
        destination_specialty=dest.get("specialty", ""),
        fax=dict(data.get("fax", {})),
        tracker=bool(data.get("tracker", False)),
        notify=parse_notify(data.get("notify", {}), file, text, partial=True),
    )


def _inbound_channel(data: dict, file: str, text: str) -> ChannelConfig:
    source = data["source"]
    for key in ("listener", "accept", "sending_facilities"):
        if key in source:
            raise ConfigError(file, locate(text, f"source.{key}"), f"source.{key}",
                              "a channel taking referrals over Direct has no MLLP source: remove it")
    for key in ("mapping", "transports", "destination", "tracker"):
        if key in data:
            raise ConfigError(file, locate(text, key), key,
                              "a channel taking referrals over Direct builds and sends nothing: remove it")
    if not source["direct"]:
        raise ConfigError(file, locate(text, "source.direct"), "source.direct",
                          'lists no sender: "*" takes every trusted sender')
    forward = data.get("forward")
    if not forward or not forward.get("endpoint"):
        raise ConfigError(file, locate(text, "forward") or locate(text, "source"), "forward.endpoint",
                          "required: our EHR's MLLP endpoint, e.g. \"tcp:127.0.0.1:6661\"")
    values = {**FORWARD_DEFAULTS, **forward}
    values["ack_timeout"] = float(values["ack_timeout"])
    if values["ack_timeout"] <= 0 or values["max_attempts"] < 1:
        raise ConfigError(file, locate(text, "forward"), "forward", "ack_timeout and max_attempts must be positive")
    return ChannelConfig(
        name=data["name"], file=file, listener="", accept=(), description=data.get("description", ""), text=text,
        direct_from=tuple(source["direct"]), forward=ForwardConfig(**values),
        notify=parse_notify(data.get("notify", {}), file, text, partial=True))


def load_channels(directory: Path) -> list[ChannelConfig]:
    if not directory.is_dir():
        raise ConfigError(str(directory), 0, "", "channels directory not found")
    channels = [load_channel(p) for p in sorted(directory.glob("*.toml")) if p.name != "directory.toml"]
    check_routes(channels)
    return channels


def check_routes(channels: list[ChannelConfig]) -> None:
    """Refuse two channels taking the same message type from the same facility on one listener."""
    seen: dict[str, ChannelConfig] = {}
    routes: dict[tuple[str, str, str], ChannelConfig] = {}
    for ch in channels:
        if ch.name in seen:
            raise ConfigError(ch.file, ch.line_of("name"), "name",
                              f"channel name {ch.name!r} also used in {seen[ch.name].file}")
        seen[ch.name] = ch
        for kind in ch.accept:
            for facility in ch.sending_facilities or ("*",):
                key = (ch.listener, kind, facility)
                if key in routes:
                    raise ConfigError(ch.file, ch.line_of("source.accept"), "source.accept",
                                      f"{kind} from {facility} is already taken by channel {routes[key].name!r}")
                routes[key] = ch
