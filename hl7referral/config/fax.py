"""The ``[fax]`` section of ``engine.toml``, and a channel's own ``[fax]`` gateway table.

A *gateway table* names a plugin (``gateway = "hylafax"``, an entry point of the group
``hl7referral.transports``) and carries that plugin's settings; the plugin validates them.
The engine's ``[fax.gateway]`` serves every channel without a ``[fax]`` table of its own.

Loading builds every gateway once, so a misspelt key or a missing URL fails at start
(file, line, key) and never at the first fax; building a gateway does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..fax.gateway import GatewaySettingsError, load_gateway
from .schema import ConfigError, locate

FAX_SCHEMA = {
    "from_name": str,
    "from_fax": str,
    "callback": str,
    "notice": str,
    "font_dirs": [str],
    "poll_interval": float,
    "final_timeout": float,
    "retry": {"max_attempts": int, "first_delay": float, "max_delay": float},
    "callbacks": {"endpoint": str, "url": str},
    "gateway": dict,
}


@dataclass(frozen=True)
class FaxConfig:
    from_name: str = ""               # the referring practice, on the cover sheet
    from_fax: str = ""
    callback: str = ""                # "" = the referring provider's phone from the C-CDA
    notice: str = ""                  # "" = the built-in confidentiality notice
    font_dirs: tuple[Path, ...] = ()
    poll_interval: float = 60.0       # seconds between status checks of a job the gateway holds
    final_timeout: float = 86400.0    # seconds from submit without a final status -> FAILED + alert
    max_attempts: int = 6             # submit attempts (refused, 5xx, timeouts) before FAILED
    first_delay: float = 60.0
    max_delay: float = 1800.0
    callback_endpoint: str = ""       # our listener for gateways' status callbacks; "" = off (poll)
    callback_url: str = ""            # that listener as the gateway reaches it (…/fax/callback)
    gateway: dict = field(default_factory=dict)   # the default gateway table ({} = none)


def gateway_table(table: dict[str, Any], *, source: str, text: str, prefix: str) -> dict[str, Any]:
    """Check a gateway table by building its plugin once; errors name the file, line and key."""
    name = table.get("gateway", "")
    if not isinstance(name, str) or not name:
        raise ConfigError(source, locate(text, prefix) if text else 0, f"{prefix}.gateway",
                          "required: the fax gateway plugin (hylafax, http-fax, ...)")
    settings = {k: v for k, v in table.items() if k != "gateway"}
    try:
        load_gateway(name, settings)
    except GatewaySettingsError as exc:
        key = f"{prefix}.{exc.key}"
        raise ConfigError(source, locate(text, key) if text else 0, key, exc.message) from None
    return dict(table)


def load_fax(data: dict[str, Any], defaults: dict[str, Any], source: str, text: str,
             resolve: Callable[[str], Path]) -> FaxConfig:
    d = {**defaults, **data}
    retry = {**defaults.get("retry", {}), **data.get("retry", {})}
    callbacks = {**defaults.get("callbacks", {}), **data.get("callbacks", {})}
    if retry.get("max_attempts", 1) < 1:
        raise ConfigError(source, locate(text, "fax.retry.max_attempts"), "fax.retry.max_attempts",
                          "must be at least 1")
    for key in ("poll_interval", "final_timeout"):
        if float(d.get(key, 1)) <= 0:
            raise ConfigError(source, locate(text, f"fax.{key}"), f"fax.{key}", "must be more than 0 seconds")
    if callbacks.get("endpoint") and not callbacks.get("url"):
        raise ConfigError(source, locate(text, "fax.callbacks.url"), "fax.callbacks.url",
                          "required with an endpoint: the URL the gateway posts to (…/fax/callback)")
    # The engine's own table wins whole: merging a hylafax default into an http-fax table
    # would hand one plugin the other's keys.
    gateway = data["gateway"] if "gateway" in data else defaults.get("gateway", {})  # {} = no default gateway
    if gateway:
        gateway = gateway_table(gateway, source=source, text=text if "gateway" in data else "",
                                prefix="fax.gateway")
    return FaxConfig(
        from_name=d.get("from_name", ""), from_fax=d.get("from_fax", ""), callback=d.get("callback", ""),
        notice=d.get("notice", ""), font_dirs=tuple(resolve(p) for p in d.get("font_dirs", [])),
        poll_interval=float(d.get("poll_interval", 60.0)), final_timeout=float(d.get("final_timeout", 86400.0)),
        max_attempts=int(retry.get("max_attempts", 6)), first_delay=float(retry.get("first_delay", 60.0)),
        max_delay=float(retry.get("max_delay", 1800.0)),
        callback_endpoint=callbacks.get("endpoint", ""), callback_url=callbacks.get("url", "").rstrip("/"),
        gateway=gateway,
    )
