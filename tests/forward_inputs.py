"""Inputs for tests/test_referral_reader.py and tests/test_forward.py: Referral Notes as the engine builds them.

Each sample message goes through the engine's own pipeline (``hl7referral map`` minus
validation, as tests/test_fax_render.py does), so the reader and the forwarder are tested
on the documents the referring engine really sends. Synthetic data only.
"""

from __future__ import annotations

import functools
from pathlib import Path

from engine_process import CORPUS
from hl7referral.cda.model import OID, Address, Code, Identifier, Name, Party, Patient, Referral, Telecom
from hl7referral.cda.referral_note import build_referral_note, to_bytes

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
ORDER_360X = CORPUS / "OMG_O19_360x_referral_request_nhapi.hl7"   # the ONC 360X IG example
DOCUMENT_UUID = "2ec95490-5ab2-4d33-8e39-863f80dfc62c"
BUILT_AT = "20261122064151+0000"

# (message file, channel that maps it)
PIPELINE_SAMPLES = {
    "ref-i12": (SAMPLES / "ref-i12.hl7", "ref-i12"),
    "vet-ref-i12": (SAMPLES / "vet-ref-i12.hl7", "vet-ref-i12"),
    "omg-o19": (SAMPLES / "omg-o19.hl7", "omg-o19"),
    "orm-o01": (SAMPLES / "orm-o01.hl7", "orm-o01"),
    "360x": (ORDER_360X, "omg-o19"),
}


@functools.cache
def built(name: str):
    """(C-CDA bytes, the pipeline's Processed) for one sample."""
    from hl7referral.cda.pipeline import Pipeline
    from hl7referral.config import load_engine

    path, channel_name = PIPELINE_SAMPLES[name]
    cfg = load_engine()
    channel = next(c for c in cfg.channels if c.name == channel_name)
    raw = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    processed = Pipeline(cfg.mappings, cfg.directory, None).run(raw, channel, document_uuid=DOCUMENT_UUID,
                                                                now=BUILT_AT)
    assert processed.document is not None, processed.reasons
    return processed.document, processed


def non_latin_referral(**kw) -> Referral:
    """Zoë Ørsted referred to 王 小明 (as tests/test_fax_render.py's non-Latin referral)."""
    values = dict(
        referral_id=Identifier("2.16.840.1.113883.19.5.1", "REF-0001", "Good Health Clinic"),
        document_id=Identifier("1c2d8a3e-4b5f-4c6d-8e7f-901234567890"),
        created="20250301103000-0500",
        reason=Code("R07.9", OID["ICD10CM"], "Chest pain, unspecified", "ICD-10-CM"),
        reason_text="胸痛 — Brustschmerz — Боль в груди",
        priority=Code("UR", OID["ACT_PRIORITY"], "urgent"),
        requested_service=Code("183519002", OID["SNOMED"], "Referral to cardiology service", "SNOMED CT"),
        patient=Patient(ids=[Identifier("1.3.6.1.4.1.99999.1.5", "MRN12345")],
                        names=[Name("Ørsted", ["Zoë"]), Name("李", ["美玲"])],
                        gender=Code("F"), birth_time="19750501",
                        addr=[Address(["2222 Home Street"], "Beaverton", "OR", "97867", "US", "H")],
                        telecom=[Telecom("tel:+1-555-555-2003", "HP")]),
        referring=Party(ids=[Identifier(OID["NPI"], "1234567893")], name=Name("Primary", ["Patricia"], suffix="MD"),
                        organization="Good Health Clinic", telecom=[Telecom("tel:+1-555-555-1004", "WP")]),
        recipient=Party(ids=[Identifier(OID["NPI"], "1987654321")], name=Name("王", ["小明"]),
                        organization="Cardiology Associates", telecom=[Telecom("tel:+1-555-555-7000", "WP")]),
        custodian=Party(ids=[Identifier("2.16.840.1.113883.19.5")], organization="Good Health Clinic"),
    )
    values.update(kw)
    return Referral(**values)


def document(referral: Referral) -> bytes:
    return to_bytes(build_referral_note(referral))
