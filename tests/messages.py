"""Synthetic test messages (no PHI). ``ref_i12(...)`` builds variants of one referral."""

from __future__ import annotations


def ref_i12(control_id: str = "C1", *, msh_extra: str = "", version: str = "2.5.1", processing: str = "P",
            kind: str = "REF^I12^REF_I12", rf1: str | None = "RF1|P|R|MED|RP|O|REF0001|20260101",
            pid: str | None = "PID|1||MRN0001^^^CLINIC^MR||Testpatient^Alex||19700101|F",
            delims: str = "|^~\\&", sep: str = "\r", app: str = "EHR", facility: str = "CLINIC",
            extra: tuple[str, ...] = ()) -> bytes:
    f = delims[0]
    msh = f.join(["MSH", delims[1:], app, facility, "HL7REF", "HUB", "20260101120000", "", kind,
                  control_id, processing, version]) + msh_extra
    segs = [msh]
    if rf1 is not None:
        segs.append(rf1)
    segs.append("PRD|RP|Referrer^Robin^^^Dr|1 Main St^^Town^ST^00000||^WPN^PH^^^555^5550100")
    if pid is not None:
        segs.append(pid)
    segs += list(extra)
    return (sep.join(segs) + sep).encode("utf-8")


def orm_o01(control_id: str = "O1", placer: str = "ORD0001", **kw) -> bytes:
    return (f"MSH|^~\\&|EHR|CLINIC|HL7REF|HUB|20260101120000||ORM^O01|{control_id}|P|2.3.1\r"
            f"PID|1||MRN0002^^^CLINIC^MR||Testpatient^Sam||19800202|M\r"
            f"ORC|NW|{placer}\rOBR|1|{placer}||REFCARD^Referral to cardiology^L\r").encode()
