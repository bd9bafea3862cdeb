"""Synthetic REF^I12 referrals and ACK inspection for the integration tests.

Synthetic data only. ``referral(control_id, n)`` is deterministic, so
re-sending it yields the same bytes (what a retrying sender does).
"""

from __future__ import annotations

from hl7referral.send import Result, interpret_ack
from messages import ref_i12


def referral(control_id: str, n: int) -> bytes:
    return ref_i12(control_id, rf1=f"RF1|P|R|MED|RP|O|REF{n}",
                   pid=f"PID|1||MRN{n}^^^CLINIC^MR||Test^Pat||19700101|F")


def err_codes(ack: bytes) -> list[str]:
    """ERR-3.1 (HL7 table 0357 code) of every ERR segment of a v2.5.1 ACK."""
    codes = []
    for segment in ack.decode("ascii", errors="replace").split("\r"):
        fields = segment.split("|")
        if fields[0] == "ERR" and len(fields) > 3:
            codes.append(fields[3].split("^")[0])
    return codes


def read_ack(client, control_id: str) -> tuple[bytes | None, Result | None]:
    """The next ACK frame on ``client`` and its reading (None, None if none came)."""
    ack = client.read_frame()
    if ack is None:
        return None, None
    return ack, interpret_ack(ack, control_id)
