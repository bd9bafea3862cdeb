"""Inputs for the specialist side's tests (issue 7): referral and answer packages, a specialist's configuration.

Referral packages are built the way the referring engine builds them: the sample message goes
through the engine's own pipeline (tests/forward_inputs.py), the C-CDA and (for 360X) the v2
order are packed by :mod:`hl7referral.direct.packet` into the XDM health content, and the
documents are what :func:`hl7referral.engine.direct._attachments` reads back out of it, so
the recipient's code sees exactly what it sees after decrypting a real packet.

The specialist's configuration is generated from parameters (no template): one inbound
channel (``[source] direct`` + ``[forward]``) in a channels directory of its own, beside the
shipped ``directory.toml``. Synthetic data only.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from forward_inputs import built
from hl7referral.config.engine import bundled_dir
from hl7referral.direct import packet
from hl7referral.send import read_messages

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
SENDER, RECEIVER = "referrals@direct.sender.test", "cardiology@direct.receiver.test"
# The 360X sample (samples/omg-o19.hl7): ORC-2 = OBR-2 = this EI; the pipeline keys it the same way.
REFERRAL_EI = "990001^^1.3.6.1.4.1.99999.1.15^ISO"
REFERRAL_ID = "990001@1.3.6.1.4.1.99999.1.15"
PATIENT_CX = "SMRN0004^^^&1.3.6.1.4.1.99999.1.5&ISO"
NOW = 1_795_000_000.0                    # 2026-11-18T11:06:40Z
AT = "2026-11-18T11:06:40Z"
NOW_HL7 = "20261118110640+0000"
CHANNEL = "from-referrers"
EHR_ENDPOINT = "tcp:host=127.0.0.1:port=6661"


def utc(seconds: float = NOW) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def order_of(name: str) -> bytes:
    return read_messages(SAMPLES / f"{name}.hl7")[0]


def referral_content(name: str = "omg-o19", *, with_order: bool | None = None, order: bytes | None = None,
                     bare: bool = True) -> packet.PacketContent:
    """The referring engine's packet content for a sample: the pipeline's C-CDA, the v2 order for OMG^O19."""
    cda, processed = built(name)
    if order is None and (with_order if with_order is not None else name == "omg-o19"):
        order = order_of(name)
    return packet.PacketContent(referral_id=processed.referral_id, cda=cda, created="20261122090000",
                                patient_id=PATIENT_CX, order=order, include_bare_cda=bare)


def documents_of(entity: bytes) -> list[tuple[str, bytes]]:
    """What the recipient's Direct agent unpacks from a decrypted health content (the XDM's documents)."""
    from hl7referral.engine.direct import _attachments
    return _attachments(entity)


def referral_documents(name: str = "omg-o19", **kw) -> list[tuple[str, bytes]]:
    return documents_of(packet.health_content(referral_content(name, **kw), SENDER, RECEIVER, "seed"))


def answer_documents(*, message: bytes | None = None, cda: bytes | None = None,
                     referral_id: str = REFERRAL_ID) -> list[tuple[str, bytes]]:
    """An answer's package (the specialist's OSU/SIU/MDM and/or a Consultation Note), unpacked."""
    content = packet.AnswerContent(referral_id=referral_id, created="20261123100000", patient_id=PATIENT_CX,
                                   message=message, cda=cda, key="k1")
    return documents_of(packet.answer_content(content, RECEIVER, SENDER, "seed"))


def channel_toml(*, name: str = CHANNEL, direct: tuple[str, ...] = ("@direct.sender.test",),
                 endpoint: str = EHR_ENDPOINT, **forward) -> str:
    """An inbound channel file: referrals from *direct* senders, handed to our EHR at *endpoint*."""
    senders = ", ".join(f'"{s}"' for s in direct)
    values = {"endpoint": endpoint, "message": "REF^I12", "cda": "embed", "receiving_application": "EHR",
              "receiving_facility": "CARDIOLOGY", **forward}
    lines = [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in values.items()]
    return (f'name = "{name}"\ndescription = "Referrals sent to us over Direct"\n\n'
            f"[source]\ndirect = [{senders}]\n\n[forward]\n" + "\n".join(lines) + "\n")


def channels_dir(base: Path, text: str | None = None) -> Path:
    """A channels directory holding the shipped directory.toml and one inbound channel."""
    out = base / "channels"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(bundled_dir("channels") / "directory.toml", out / "directory.toml")
    (out / f"{CHANNEL}.toml").write_text(text if text is not None else channel_toml())
    return out


def direct_overrides(pki: Path, *, inbound: str = "") -> list[str]:
    """``--set`` values that make the engine the cardiology practice's Direct identity (receiver.pem)."""
    values = {
        "direct.address": f'"{RECEIVER}"',
        "direct.certificate": f'"{pki / "receiver.pem"}"', "direct.key": f'"{pki / "receiver.key"}"',
        "direct.chain": f'["{pki / "intermediate.pem"}"]', "direct.certificates_dir": f'"{pki}"',
        "direct.crls": f'["{pki / "intermediate.crl.pem"}"]', "direct.anchors.0.files": f'["{pki / "anchor.pem"}"]',
    }
    if inbound:
        values["direct.inbound.endpoint"] = f'"{inbound}"'
        values["direct.inbound.domains"] = '["direct.receiver.test"]'
    return [f"{k}={v}" for k, v in values.items()]


def specialist_config(base: Path, *, text: str | None = None, pki: Path | None = None, store: Path | None = None,
                      extra: tuple[str, ...] = ()):
    from hl7referral.config import load_engine
    overrides = [f'channels.dir="{channels_dir(base, text)}"', *(direct_overrides(pki) if pki else ()), *extra]
    return load_engine(None, store=str(store or base / "specialist.db"), overrides=overrides)


def receive(store, config, name: str = "omg-o19", *, sender: str = SENDER, mail_id: int = 1, now: float = NOW,
            **kw):
    """A sample referral received by *store*'s engine as InboundReferrals does on the Direct thread."""
    from hl7referral.engine.inbound import InboundReferrals
    from hl7referral.loop.inbound import read_inbound

    entity = packet.health_content(referral_content(name, **kw), sender, RECEIVER, "seed")
    ref = read_inbound(documents_of(entity), local_root=config.local_root)
    InboundReferrals(config, store).receive(ref, sender=sender, mail_id=mail_id, raw=entity, now=now)
    return ref
