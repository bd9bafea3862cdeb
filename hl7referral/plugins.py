"""Plugins by entry point: fax gateways (``hl7referral.transports``), notifiers (``hl7referral.notifiers``).

A plugin is a class registered under a name in its group, built from its settings table;
building does no I/O, so a misspelt key fails at load with the plugin's own message.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable, Mapping


def available(group: str) -> dict[str, Any]:
    """The group's entry points by name."""
    return {ep.name: ep for ep in entry_points(group=group)}


def build(group: str, name: str, settings: Mapping[str, Any], missing: Callable[[str], Exception]):
    """The plugin *name* of *group* built from *settings*; ``missing(known)`` is raised when there is none."""
    found = available(group)
    if name not in found:
        raise missing(", ".join(sorted(found)) or "none")
    return found[name].load()(dict(settings))
