"""Read a parked loop message again: the same bytes through the same reader, for replay.

A work-queue item keeps what arrived whole (an HL7 message, or a Direct message's MIME
content); :func:`observation_of` turns it back into an
:class:`~hl7referral.loop.correlate.Observation` exactly as the engine read it first
(the readers are deterministic), with the configuration's OSU tables, zone and root.
"""

from __future__ import annotations

from . import correlate


def observation_of(origin: str, raw: bytes, *, osu_tables=(), zone: str = "UTC",
                   local_root: str = correlate.DEFAULT_LOCAL_ROOT, codec: str = "ascii"):
    if origin.startswith("mail"):
        from ..engine.direct import _attachments   # the Direct layer's own unpacking (XDM or attachments)
        return read_documents(_attachments(raw), osu_tables=osu_tables, zone=zone, local_root=local_root)
    return correlate.read_v2(raw, codec, tables=osu_tables, zone=zone, local_root=local_root)


def read_documents(documents, *, osu_tables=(), zone: str = "UTC", local_root: str = correlate.DEFAULT_LOCAL_ROOT):
    """A Direct message's documents ((name, bytes) pairs) as one observation: its v2 messages and its
    C-CDA documents read together (360X package); None when it carries neither."""
    messages = [d for _, d in documents if d.lstrip()[:4] == b"MSH|"]
    cdas = [d for _, d in documents if b"ClinicalDocument" in d[:4096]]
    if not messages and not cdas:
        return None
    return correlate.read_package(messages, cdas, osu_table=osu_tables or correlate.DEFAULT_OSU, zone=zone,
                                  local_root=local_root)
