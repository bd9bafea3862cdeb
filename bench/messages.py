"""Synthetic REF^I12 referrals for the benchmark (no real people, no real data).

A message is built once per size as a *template* cut around MSH-10:
``head + control_id + tail``, already MLLP-framed (``head`` starts with
``<VT>``, ``tail`` ends with ``<FS><CR>``). The load generator sends the three
pieces with one ``sendmsg`` (scatter/gather), so every message on the wire has
its own MSH-10 without copying or pre-allocating hundreds of megabytes of
64 KB frames. Control ids have a fixed width, so every frame of a size class
has exactly the same length.

What the engine needs to accept a REF^I12 (AA): MSH-9 ``REF^I12``, MSH-11
``P``, MSH-12 ``2.5.1``, MSH-15/16 empty (original-mode ACK), a PID with
PID-3, an RF1 with RF1-6, segments separated by ``\\r``, ASCII only (no
MSH-18). ``python bench/messages.py [1.6KB|64KB]`` prints one message,
segment per line.
"""

from __future__ import annotations

from dataclasses import dataclass

VT, FS, CR = b"\x0b", b"\x1c", b"\r"

SIZES = {"1.6KB": 1600, "64KB": 64 * 1024}
CONTROL_ID_WIDTH = 20  # "B" + 6 hex run id + 2 scenario + 3 connection + 8 sequence

# Free text for OBX/NTE padding: printable ASCII without HL7 delimiters.
_LOREM = ("Synthetic benchmark text for a specialist referral. Reason for referral, "
          "history of present illness, medications and allergies would go here. "
          "No real patient data is used in this message. ")


@dataclass(frozen=True)
class Template:
    """An MLLP frame with a hole for MSH-10."""

    head: bytes  # <VT> MSH ... MSH-9 |
    tail: bytes  # | MSH-11 ... last segment \r <FS><CR>
    payload_bytes: int  # HL7 message length (without VT/FS/CR), control id included

    @property
    def frame_bytes(self) -> int:
        return self.payload_bytes + 3

    def frame(self, control_id: bytes) -> bytes:
        return self.head + control_id + self.tail

    def payload(self, control_id: bytes) -> bytes:
        return self.frame(control_id)[1:-2]


def control_id(run: str, scenario: int, connection: int, seq: int) -> bytes:
    """A fixed-width, run-unique MSH-10 (the engine deduplicates on MSH-3/4/10)."""
    cid = f"B{run[:6]:0>6}{scenario % 100:02d}{connection % 1000:03d}{seq % 100_000_000:08d}"
    assert len(cid) == CONTROL_ID_WIDTH
    return cid.encode("ascii")


def _segments(referral_id: str, n_obx: int) -> list[str]:
    """REF^I12 body after MSH: RF1, PRD, PID, DG1, OBR, OBX..., NTE."""
    segs = [
        # RF1-1 status, -2 priority, -3 type, -4 disposition, -5 category,
        # -6 originating referral identifier, -7 effective date, -8 expiration,
        # -9 process date, -10 reason.
        f"RF1|P^Pending^HL70283|R^Routine^HL70280|MED^Medical^HL70281|WR^Send written report^HL70282|"
        f"O^Outpatient^HL70284|{referral_id}^BENCHEHR|20260101120000|20260401|20260101|"
        f"R^Second opinion^HL70336",
        "PRD|RP^Referring provider^HL70286|Synthetic^Referrer^A^^^Dr|1 Example Street^^Testville^ZZ^00000||"
        "^WPN^PH^^^555^0100000|||",
        "PRD|RT^Referred to provider^HL70286|Synthetic^Specialist^B^^^Dr|2 Example Street^^Testville^ZZ^00000||"
        "^WPN^PH^^^555^0100001|||",
        "PID|1||BENCH0000001^^^BENCHEHR^MR~900000001^^^ZZ^NI||Testpatient^Synthetic^Q||19700101|U|||"
        "3 Example Street^^Testville^ZZ^00000||^PRN^PH^^^555^0100002|||||BENCHACCT1",
        "DG1|1||R69^Illness, unspecified^I10|||F",
        f"OBR|1|{referral_id}^BENCHEHR||11488-4^Consult note^LN|||20260101110000",
    ]
    for i in range(n_obx):
        segs.append(f"OBX|{i + 1}|TX|11488-4^Consult note^LN|{i + 1}|{_LOREM}||||||F")
    return segs


def build_template(size: int, *, referral_id: str = "REFBENCH0001") -> Template:
    """A REF^I12 frame template whose payload is exactly ``size`` bytes."""
    msh_head = "MSH|^~\\&|BENCHEHR|BENCHCLINIC|HL7REF|HUB|20260101120000||REF^I12^REF_I12|"
    msh_tail = "|P|2.5.1"
    fixed = msh_head + "X" * CONTROL_ID_WIDTH + msh_tail
    nte_min = len("NTE|1|L|") + 1
    # As many OBX as fit, then one NTE to hit the exact size.
    n_obx = 0
    while len(("\r".join([fixed] + _segments(referral_id, n_obx + 1)) + "\r").encode()) + nte_min <= size:
        n_obx += 1
    body = _segments(referral_id, n_obx)
    used = len(("\r".join([fixed] + body) + "\r").encode())
    pad = size - used - nte_min
    if pad < 0:
        raise ValueError(f"size {size} is below the minimum REF^I12 of {used + nte_min} bytes")
    filler = (_LOREM * (pad // len(_LOREM) + 1))[:pad]
    body.append(f"NTE|1|L|{filler}")
    rest = "\r".join(body) + "\r"
    head = VT + msh_head.encode("ascii")
    tail = (msh_tail + "\r" + rest).encode("ascii") + FS + CR
    t = Template(head, tail, len(head) - 1 + CONTROL_ID_WIDTH + len(tail) - 2)
    assert t.payload_bytes == size, (t.payload_bytes, size)
    return t


def templates() -> dict[str, Template]:
    return {name: build_template(size) for name, size in SIZES.items()}


if __name__ == "__main__":
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "1.6KB"
    t = build_template(SIZES[name])
    text = t.payload(control_id("abcdef", 1, 2, 3)).decode("ascii")
    print(text.replace("\r", "\n"))
    print(f"-- {name}: {t.payload_bytes} bytes payload, {t.frame_bytes} bytes framed", file=sys.stderr)
