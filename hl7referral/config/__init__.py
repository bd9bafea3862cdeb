"""Configuration as data: ``engine.toml`` and ``channels/*.toml``.

Every file is validated when loaded; errors name file, line and key.

The names below are loaded on first use (PEP 562): importing ``hl7referral.config`` or
one of its light modules (``.schema``, ``.source``) must not load the channel, fax,
notify and loop sections and the plugins they pull in, which store-only commands
never need.
"""

from __future__ import annotations

import importlib

from .schema import ConfigError

_LAZY = {"EngineConfig": ".engine", "ListenerConfig": ".engine", "load_engine": ".engine",
         "ChannelConfig": ".channels", "load_channels": ".channels", "StoreSettings": ".source",
         "load_store": ".source"}

__all__ = ["ChannelConfig", "ConfigError", "EngineConfig", "ListenerConfig", "StoreSettings", "load_channels",
           "load_engine", "load_store"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value   # once: later lookups do not come here
    return value
