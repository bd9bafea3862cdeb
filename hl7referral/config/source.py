"""Read ``engine.toml`` (or the embedded defaults) and apply ``--set``: what every loader shares.

:func:`read_source` is the first half of :func:`~hl7referral.config.engine.load_engine`: the
file's text, its TOML, the overrides, each checked by the caller's schema. :func:`load_store`
stops there and returns the store's settings alone, for the commands that only read the store
(``report``, ``referrals list``, ``status``, ``messages list``...): they need the store's path,
not compiled mappings, the directory, certificates, plugins or validators, and loading those
cost them more than their query did.

Invariants
----------
* One reading of the file for both loaders: the same path, precedence and relative-path rule
  (relative to the file; in the defaults and on the command line, to the working directory),
  so a store-only command opens exactly the store ``serve`` writes.
* :func:`load_store` checks what it reads (the TOML, each ``--set``, the ``[store]`` table) and
  fails on it with the very error ``load_engine`` gives; it does not look at the rest of the
  file. ``hl7referral check`` and ``serve`` load and check everything.
* This module imports nothing but the standard library and :mod:`.schema`: it is on the
  start-up path of every store-only command.
"""

from __future__ import annotations

import copy
import pkgutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .schema import ConfigError, toml_error_line, validate

DEFAULTS_NAME = "<embedded defaults>"
STORE_SCHEMA = {"path": str, "busy_timeout_ms": int}

# check(data, file, text): raise ConfigError for what the caller's schema forbids in data.
Check = Callable[[dict[str, Any], str, str], None]


@dataclass(frozen=True)
class Source:
    """engine.toml as read: its data (overrides applied) over the embedded defaults."""

    data: dict[str, Any]
    defaults: dict[str, Any]
    text: str              # the file's text, for line numbers; "" once --set changed the data
    source: str            # the file's path, or DEFAULTS_NAME
    base: Path             # what relative paths are relative to

    def table(self, name: str) -> dict[str, Any]:
        """A plain table, the file's keys over the defaults'."""
        return {**self.defaults.get(name, {}), **self.data.get(name, {})}

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p


@dataclass(frozen=True)
class StoreSettings:
    source: str
    path: Path
    busy_timeout_ms: int


def embedded_defaults() -> tuple[dict[str, Any], str]:
    # pkgutil, not importlib.resources: the same package data (from a zip too), without the ~12 ms
    # of imports importlib.resources costs every command.
    text = pkgutil.get_data("hl7referral.config", "default_engine.toml").decode("utf-8")
    return tomllib.loads(text), text


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_override(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", 0, assignment, "expected KEY=VALUE")
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError("--set", 0, key, f"no list item {part!r} at {'.'.join(parts[:i])}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
    leaf = parts[-1]
    if isinstance(node, list):
        raise ConfigError("--set", 0, key, "name a field of a list item, e.g. listeners.0.endpoint")
    node[leaf] = _parse_value(raw.strip())


def read_source(config_file: str | Path | None, overrides: tuple[str, ...] | list[str], check: Check) -> Source:
    """The file (or the embedded defaults), checked, then each override applied, checked again."""
    defaults, default_text = embedded_defaults()
    if config_file is None:
        data, text, source, base = copy.deepcopy(defaults), default_text, DEFAULTS_NAME, Path.cwd()
    else:
        path = Path(config_file)
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise ConfigError(str(path), 0, "", f"cannot read: {exc.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(str(path), toml_error_line(exc), "", f"not valid TOML: {exc}") from None
        source, base = str(path), path.resolve().parent
    check(data, source, text)
    for assignment in overrides:
        apply_override(data, assignment)
    check(data, "--set" if overrides else source, "" if overrides else text)
    return Source(data=data, defaults=defaults, text="" if overrides else text, source=source, base=base)


def store_settings(src: Source, store: str | None) -> StoreSettings:
    """``[store]`` of a read source; ``--store`` (a path as given, relative to the working directory) wins."""
    table = src.table("store")
    return StoreSettings(source=src.source, path=Path(store) if store else src.path(table["path"]),
                         busy_timeout_ms=table["busy_timeout_ms"])


def _check_store(data: dict[str, Any], file: str, text: str) -> None:
    if "store" in data:
        validate(data["store"], STORE_SCHEMA, file=file, text=text, path="store")


def load_store(config_file: str | Path | None = None, *, overrides: tuple[str, ...] | list[str] = (),
               store: str | None = None) -> StoreSettings:
    """The store's settings from engine.toml (or the defaults), ``--set`` and ``--store``; nothing else loaded."""
    return store_settings(read_source(config_file, overrides, _check_store), store)
