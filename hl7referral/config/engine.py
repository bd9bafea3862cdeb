"""Load ``engine.toml`` (or the embedded defaults), apply CLI overrides, validate.

Precedence, lowest first: the file (or the embedded defaults), ``--set
KEY=VALUE`` (dotted keys, list items by index: ``listeners.0.idle_timeout=60``),
then ``--store`` and ``--listen``. Relative paths in a file are relative to the
file; in the embedded defaults and on the command line, to the working
directory. Reading the file and the overrides is :mod:`.source`'s, shared with
``load_store()``, the store-only loader of the commands that only read the store.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .channels import ChannelConfig, check_routes, load_channels
from .direct import DIRECT_SCHEMA, DirectConfig, load_direct
from .fax import FAX_SCHEMA, FaxConfig, gateway_table, load_fax
from .loop import LOOP_SCHEMA, LoopConfig, load_loop
from .notify import NOTIFY_SCHEMA, NotifyConfig, merge as merge_notify, parse_notify
from .directory import Directory, load_directory
from .schema import ConfigError, validate
from .source import STORE_SCHEMA, read_source, store_settings

STANDARDS_FILES = ("cda-schema/extensions/SDTC/infrastructure/cda/CDA_SDTC.xsd", "ccda-r2.1/ccda-r2.1.sch",
                   "ccda-r2.1/voc.xml")

LISTENER_SCHEMA = {
    "name": str,
    "endpoint": str,
    "max_frame_bytes": int,
    "max_connections": int,
    "max_connections_per_peer": int,
    "first_frame_timeout": float,
    "frame_timeout": float,
    "idle_timeout": float,
    "max_junk_bytes": int,
    "max_in_flight": int,
    "processing_ids": [str],
    "versions": [str],
    "default_charset": str,
    "on_store_failure": ("nak", "silent"),
}
ENGINE_SCHEMA = {
    "store": STORE_SCHEMA,
    "log": {"level": ("debug", "info", "warn", "error")},
    "channels": {"dir": str},
    "mappings": {"dir": str},
    "standards": {"dir": str, "cache_dir": str},
    "cda": {"local_root": str},
    "listeners": [LISTENER_SCHEMA],
    "direct": DIRECT_SCHEMA,
    "fax": FAX_SCHEMA,
    "loop": LOOP_SCHEMA,
    "notify": NOTIFY_SCHEMA,
}


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    endpoint: str
    max_frame_bytes: int
    max_connections: int
    max_connections_per_peer: int
    first_frame_timeout: float
    frame_timeout: float
    idle_timeout: float
    max_junk_bytes: int
    max_in_flight: int
    processing_ids: tuple[str, ...]
    versions: tuple[str, ...]
    default_charset: str
    on_store_failure: str
    base_dir: Path = Path(".")


@dataclass(frozen=True)
class EngineConfig:
    source: str
    store_path: Path
    busy_timeout_ms: int
    log_level: str
    channels_dir: Path
    listeners: tuple[ListenerConfig, ...]
    channels: tuple[ChannelConfig, ...] = field(default=())
    mappings_dir: Path | None = None
    mappings: dict = field(default_factory=dict)
    directory: Directory | None = None
    standards_dir: Path | None = None
    schematron_cache: Path | None = None
    local_root: str = "2.16.840.1.113883.19"
    direct: DirectConfig = field(default_factory=DirectConfig)
    fax: FaxConfig = field(default_factory=FaxConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    def channels_for(self, listener: str) -> list[ChannelConfig]:
        return [c for c in self.channels if c.listener == listener]


def bundled_dir(name: str) -> Path:
    """Sample channels or mappings: in the checkout (editable install), else installed data."""
    checkout = Path(__file__).resolve().parents[2] / name
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "hl7referral" / name


def default_standards_dir() -> Path | None:
    """../shared/standards beside the checkout, where the project's standards live."""
    candidate = Path(__file__).resolve().parents[3] / "shared" / "standards"
    return candidate if candidate.is_dir() else None


def load_engine(
    config_file: str | Path | None = None,
    *,
    overrides: tuple[str, ...] | list[str] = (),
    store: str | None = None,
    listen: tuple[str, ...] | list[str] = (),
) -> EngineConfig:
    src = read_source(config_file, overrides, lambda d, file, text: validate(d, ENGINE_SCHEMA, file=file, text=text))
    data, defaults, text, source, base = src.data, src.defaults, src.text, src.source, src.base

    listener_defaults = defaults["listeners"][0]
    listeners_data = data.get("listeners") or [dict(listener_defaults)]
    if listen:
        template = listeners_data[0]
        listeners_data = [dict(template, endpoint=e, name=template.get("name", "main") if i == 0
                               else f"{template.get('name', 'main')}-{i + 1}")
                          for i, e in enumerate(listen)]
    listeners = []
    names = set()
    for i, ld in enumerate(listeners_data):
        merged = {**listener_defaults, **ld}
        if merged["name"] in names:
            raise ConfigError(source, 0, f"listeners.{i}.name", f"duplicate listener name {merged['name']!r}")
        names.add(merged["name"])
        if merged["max_frame_bytes"] < 64:
            raise ConfigError(source, 0, f"listeners.{i}.max_frame_bytes", "must be at least 64")
        merged["processing_ids"] = tuple(merged["processing_ids"])
        merged["versions"] = tuple(merged["versions"])
        listeners.append(ListenerConfig(**merged, base_dir=base))

    store_cfg = store_settings(src, store)   # the same reading as load_store(), for store-only commands
    store_path = store_cfg.path
    channels_dir_value = {**defaults["channels"], **data.get("channels", {})}["dir"]
    channels_dir = _resolve(base, channels_dir_value) if channels_dir_value else bundled_dir("channels")
    channels = load_channels(channels_dir)
    mappings_value = {**defaults["mappings"], **data.get("mappings", {})}["dir"]
    mappings_dir = _resolve(base, mappings_value) if mappings_value else bundled_dir("mappings")
    from ..cda.mapping import load_mappings  # here: cda.mapping itself imports config.schema

    mappings = load_mappings(mappings_dir) if any(c.mapping for c in channels) else {}
    directory = load_directory(channels_dir / "directory.toml")
    standards_cfg = {**defaults["standards"], **data.get("standards", {})}
    standards_dir = _resolve(base, standards_cfg["dir"]) if standards_cfg["dir"] else default_standards_dir()
    schematron_cache = _resolve(base, standards_cfg["cache_dir"]) if standards_cfg["cache_dir"] else None
    if standards_dir is not None:
        for needed in STANDARDS_FILES:
            if not (standards_dir / needed).is_file():
                raise ConfigError(source, 0, "standards.dir", f"{standards_dir / needed} not found")
    local_root = {**defaults["cda"], **data.get("cda", {})}["local_root"]
    if not re.fullmatch(r"[0-2](\.(0|[1-9]\d*))+", local_root):
        raise ConfigError(source, 0, "cda.local_root", f"{local_root!r} is not an OID")
    fax = load_fax(data.get("fax", {}), defaults.get("fax", {}), source, "" if overrides else text,
                   lambda value: _resolve(base, value))
    notify = parse_notify(data.get("notify", {}), source, "" if overrides else text)
    for ch in channels:
        _check_channel(ch, mappings, directory, fax)
        merge_notify(notify, ch.notify)   # a channel's [notify] must make sense on top of the engine's
    known = {lc.name for lc in listeners}
    # With --listen, every channel goes to the (renamed) first listener.
    for ch in channels:
        if ch.inbound:
            continue   # referrals over Direct: no MLLP listener
        if ch.listener not in known and not listen:
            raise ConfigError(ch.file, ch.line_of("source.listener"), "source.listener",
                              f"no listener named {ch.listener!r} (have: {', '.join(sorted(known))})")
    if listen:
        # --listen puts every channel on the new listeners: their routes must still be distinct.
        channels = [ch if ch.inbound else ch.with_listener(listeners[0].name) for ch in channels]
        check_routes(channels)
    # An inbound channel's documents_dir is relative to engine.toml, like every other path in it.
    channels = [ch.with_documents_dir(str(_resolve(base, ch.forward.documents_dir))) if ch.inbound else ch
                for ch in channels]
    return EngineConfig(
        source=source,
        store_path=store_path,
        busy_timeout_ms=store_cfg.busy_timeout_ms,
        log_level={**defaults["log"], **data.get("log", {})}["level"],
        channels_dir=channels_dir,
        listeners=tuple(listeners),
        channels=tuple(channels),
        mappings_dir=mappings_dir,
        mappings=mappings,
        directory=directory,
        standards_dir=standards_dir,
        schematron_cache=schematron_cache,
        local_root=local_root,
        direct=load_direct(data.get("direct", {}), defaults.get("direct", {}), source,
                           lambda value: _resolve(base, value)),
        fax=fax,
        notify=notify,
        loop=load_loop(data.get("loop", {}), defaults.get("loop", {}), source, "" if overrides else text),
    )


def _check_channel(ch: ChannelConfig, mappings: dict, directory: Directory, fax: FaxConfig) -> None:
    if ch.fax:
        gateway_table(ch.fax, source=ch.file, text=ch.text, prefix="fax")
    elif "fax" in ch.transports and not fax.gateway:
        raise ConfigError(ch.file, ch.line_of("transports"), "transports",
                          "fax needs a gateway: a [fax] table here or [fax.gateway] in the engine configuration")
    if ch.mapping:
        m = mappings.get(ch.mapping)
        if m is None:
            raise ConfigError(ch.file, ch.line_of("mapping"), "mapping",
                              f"no mapping named {ch.mapping!r} (have: {', '.join(sorted(mappings)) or 'none'})")
        uncovered = [k for k in ch.accept if m.messages and k not in m.messages]
        if uncovered:
            raise ConfigError(ch.file, ch.line_of("mapping"), "mapping",
                              f"mapping {ch.mapping!r} is for {', '.join(m.messages)}, not {', '.join(uncovered)}")
    if ch.destination_by == "named" and directory.by_name(ch.destination_name) is None:
        raise ConfigError(ch.file, ch.line_of("destination.name"), "destination.name",
                          f"{ch.destination_name!r} is not in {directory.file}")


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
