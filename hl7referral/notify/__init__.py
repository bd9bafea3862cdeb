"""Notifications as plugins: coordinator alerts and patient/owner messages.

A notifier plugin (entry point group ``hl7referral.notifiers``; ``email`` and
``webhook`` are built in) sends one rendered, addressed :class:`Notice`.
:mod:`.templates` renders subjects and bodies; :mod:`hl7referral.config.notify`
reads the ``[notify]`` configuration, picks the notifier and the owner, and
composes notices. De-duplication is the caller's (a ledger keyed by the notice's
``key``); notifiers carry the key to the far end so a resend is recognisable.
"""

from .base import (
    AUDIENCE_OF_ACTION,
    AUDIENCES,
    GROUP,
    REJECTED,
    RETRY,
    Notice,
    Notifier,
    NotifierSettingsError,
    NotifyError,
    Owner,
    Result,
    available,
    load_notifier,
    resolve_owner,
)
from .templates import RULES, Rendered, render

__all__ = [
    "AUDIENCE_OF_ACTION", "AUDIENCES", "GROUP", "REJECTED", "RETRY", "RULES", "Notice", "Notifier",
    "NotifierSettingsError", "NotifyError", "Owner", "Rendered", "Result", "available", "load_notifier", "render",
    "resolve_owner",
]
