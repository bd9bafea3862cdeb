"""Two engines talking through a real mail relay on 127.0.0.1: the harness behind the two-engine
tests and, later, ``hl7referral demo``.

- :mod:`.harness`: :class:`TwoEngines` (start, stop, kill, restart, send, wait, read the stores)
- :mod:`.relay`: the local SMTP relay between the engines (aiosmtpd), with its record
- :mod:`.ehr`: the EHR stand-ins (python-hl7's asyncio MLLP: a receiver that ACKs and records, a sender)
- :mod:`.config`: each engine's configuration, generated from the harness's ports and paths
"""

from .config import EngineSpec, Identity, Wiring
from .ehr import Ack, EhrReceiver, send_mllp
from .harness import REFERRER, SPECIALIST, TwoEngines, referrer_spec, specialist_spec
from .relay import Relay, Relayed, Route

__all__ = ["REFERRER", "SPECIALIST", "Ack", "EhrReceiver", "EngineSpec", "Identity", "Relay", "Relayed", "Route",
           "TwoEngines", "Wiring", "referrer_spec", "send_mllp", "specialist_spec"]
