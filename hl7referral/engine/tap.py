"""``twist hl7referral``: the Twisted plugin's options and ``makeService``.

The same service as ``hl7referral serve``, for sites that run Twisted
applications under ``twist``/``twistd``.
"""

from __future__ import annotations

from twisted.python import usage

from ..config import ConfigError, load_engine
from ..store import StoreError
from .endpoints import EndpointError
from .service import EngineService


class Options(usage.Options):
    synopsis = "[--config FILE] [--store PATH] [--listen ENDPOINT]... [--set KEY=VALUE]..."
    optParameters = [
        ["config", "c", None, "engine.toml (default: the embedded defaults)"],
        ["store", "s", None, "SQLite store path (overrides store.path)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["set"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint string instead (repeatable)."""
        self["listen"].append(endpoint)

    def opt_set(self, assignment: str) -> None:
        """Override one configuration key, KEY=VALUE (repeatable)."""
        self["set"].append(assignment)

    def postOptions(self) -> None:
        # Configuration errors are usage errors: twist prints them as one line.
        try:
            self["engine"] = load_engine(self["config"], overrides=self["set"], store=self["store"],
                                         listen=self["listen"])
        except ConfigError as exc:
            raise usage.UsageError(str(exc)) from None


def makeService(options: Options) -> EngineService:
    try:
        return EngineService(options["engine"])
    except (StoreError, EndpointError) as exc:
        # twist does not catch errors from makeService; exit with one line.
        raise SystemExit(f"hl7referral: {exc}") from None
