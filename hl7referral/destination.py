"""Where a referral goes: the channel's destination rule applied to a referral.

``resolve(channel, directory, referral)`` returns the :class:`Specialist` or
raises :class:`NoDestination` with the reason a coordinator needs (the
referral is then parked, never dropped). Pure: values in, a value out.

* ``by = "named"``: the directory entry the channel names.
* ``by = "npi"``: the entry whose NPI is the referred-to provider's
  (an identifier with the NPI root among ``referral.recipient.ids``).
* ``by = "specialty"``: the channel's fixed ``specialty``, else the entry
  that lists the requested-service code (OBR-4 / RF1-3) among its ``codes``.
"""

from __future__ import annotations

from .cda.model import OID, Referral
from .config.channels import ChannelConfig
from .config.directory import Directory, Specialist


class NoDestination(LookupError):
    pass


def resolve(channel: ChannelConfig, directory: Directory, referral: Referral) -> Specialist:
    by = channel.destination_by
    if not by:
        raise NoDestination(f"channel {channel.name} has no [destination]")
    if by == "named":
        found = directory.by_name(channel.destination_name)
        if found is None:
            raise NoDestination(f"{channel.destination_name!r} is not in the directory")
        return found
    if by == "npi":
        npis = [i.extension for i in referral.recipient.ids if i.root == OID["NPI"]]
        if not npis:
            raise NoDestination("the referred-to provider has no NPI in the message")
        for npi in npis:
            found = directory.by_npi(npi)
            if found is not None:
                return found
        raise NoDestination(f"no specialist with NPI {', '.join(npis)} in the directory")
    if channel.destination_specialty:
        found = directory.by_specialty(channel.destination_specialty)
        if found is None:
            raise NoDestination(f"no specialist for {channel.destination_specialty!r} in the directory")
        return found
    code = referral.requested_service.code
    found = directory.by_code(code) if code else None
    if found is None:
        raise NoDestination(f"no specialist takes requested service {code or '(none given)'!r}")
    return found
