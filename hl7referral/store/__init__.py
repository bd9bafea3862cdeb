"""The store: every message, referral and event, in SQLite (sqlite-utils).

No SQL lives outside this package; the engine talks to :class:`Store`.
"""

from .sqlite import ACCEPTED, NOT_HL7, REJECTED, Checkpointer, Inbound, Outcome, Store, StoreError

__all__ = ["ACCEPTED", "NOT_HL7", "REJECTED", "Checkpointer", "Inbound", "Outcome", "Store", "StoreError"]
