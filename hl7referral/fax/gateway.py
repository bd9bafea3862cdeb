"""What every fax gateway plugin implements, and how the engine finds one.

A gateway is a plugin: a class registered under the entry point group
``hl7referral.transports`` (``hylafax`` and ``http-fax`` are built in), built
from the ``[fax]`` table of a channel file (its keys minus ``gateway``).

Invariants
----------
* Gateways block (the engine runs them on its transport thread), keep no state
  between calls but their settings, and never log or raise with PHI in the
  message: job ids, keys and referral ids only, never a name or the PDF.
* :meth:`FaxGateway.submit` returns :class:`Submitted` with the gateway's job
  id, or raises :class:`GatewayError` whose ``outcome`` says what the engine
  may do next:

  - ``"retry"``: nothing was created (connection refused, 429, 5xx); send again later.
  - ``"unknown"``: the request may have created a job (a timeout after it was
    sent). The engine sends the *same* :class:`FaxJob` again later, with the
    same ``key``; the gateway must not turn that into a second fax: it asks the
    far end for a job with that key first (:meth:`find`) or passes the key in
    a way the far end de-duplicates on (an idempotency header).
  - ``"rejected"``: final (a bad number, refused credentials, a 4xx); no retry.
* Statuses only move forward: QUEUED < SENDING < DELIVERED | FAILED (both
  final). A gateway reports what the far end says; the engine ignores a report
  that would move a send backwards or out of a final state (callbacks arrive
  twice and out of order).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from .. import plugins
from typing import Any, Protocol, runtime_checkable

GROUP = "hl7referral.transports"


class Status(str, enum.Enum):
    QUEUED = "queued"        # the gateway has it and has not started dialling
    SENDING = "sending"      # dialling or transmitting (may include the gateway's own redials)
    DELIVERED = "delivered"  # the far machine confirmed every page (final)
    FAILED = "failed"        # the gateway gave up (final)

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def final(self) -> bool:
        return self in (Status.DELIVERED, Status.FAILED)


_RANK = {Status.QUEUED: 1, Status.SENDING: 2, Status.DELIVERED: 3, Status.FAILED: 3}


@dataclass(frozen=True)
class FaxJob:
    key: str                 # the idempotency key: referral/fax/attempt, one per attempt
    number: str              # the number as the directory gives it (the gateway normalises it)
    pdf: bytes
    referral_id: str
    callback_url: str = ""   # where the gateway should POST status callbacks ("" = none; poll)


@dataclass(frozen=True)
class GatewayStatus:
    status: Status
    detail: str = ""         # the gateway's own words ("READY", "Busy signal"); no PHI
    pages: int | None = None


@dataclass(frozen=True)
class Submitted:
    job_id: str
    status: GatewayStatus | None = None   # the first status, when the submit answer carries one


@dataclass(frozen=True)
class Callback:
    job_id: str
    status: GatewayStatus
    key: str = ""            # our idempotency key, when the gateway echoes it back


class GatewayError(Exception):
    """A gateway call that did not succeed; ``outcome`` is retry, unknown or rejected (see invariants)."""

    def __init__(self, message: str, outcome: str = "retry", code: str = "") -> None:
        super().__init__(message)
        if outcome not in ("retry", "unknown", "rejected"):
            raise ValueError(f"outcome {outcome!r}")
        self.outcome = outcome
        self.code = code


@runtime_checkable
class FaxGateway(Protocol):
    name: str                 # the entry point name ("hylafax")
    supports_callbacks: bool  # True: give it a callback_url; False: the engine polls status()

    def submit(self, job: FaxJob) -> Submitted: ...

    def status(self, job_id: str) -> GatewayStatus:
        """The job's state now; GatewayError("retry") when the far end cannot tell just now."""

    def find(self, key: str) -> str | None:
        """The job id of an earlier submit of this key, None if none (or the gateway cannot look it up)."""

    def parse_callback(self, body: bytes, headers: dict[str, str]) -> Callback:
        """A status callback's body; GatewayError("rejected") if it is not one (or fails its check)."""


class GatewaySettingsError(ValueError):
    """A gateway's settings are wrong; ``key`` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def available() -> dict[str, Any]:
    """Gateway classes by entry point name."""
    return plugins.available(GROUP)


def load_gateway(name: str, settings: dict[str, Any]) -> FaxGateway:
    """Build the gateway registered as *name* from its settings (GatewaySettingsError if wrong)."""
    return plugins.build(GROUP, name, settings, lambda known: GatewaySettingsError(
        "gateway", f"no fax gateway plugin {name!r} (installed: {known})"))
