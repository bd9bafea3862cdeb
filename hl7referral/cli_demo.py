"""``hl7referral demo``: the whole loop between two engines on 127.0.0.1, printed as it goes.

A referring engine, a specialist engine (each its own process, store and Direct identity from
the example PKI) and a local SMTP relay; one human and one veterinary referral from the
samples go through the loop; each referral's timeline is printed from both stores. Everything
runs under a temporary directory and is stopped on the way out, also on Ctrl-C or failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import click


def register(main, fail) -> None:
    @main.command("demo")
    @click.option("--keep", type=click.Path(file_okay=False, path_type=Path),
                  help="Run in this directory and keep it (stores, configs, logs) instead of a temporary one.")
    def demo(keep) -> None:
        """Two engines and a mail relay on 127.0.0.1: a human and a veterinary referral, closed loops.

        Takes about 20 s (a minute at most) and leaves nothing running.
        """
        import tempfile

        from .demo import scenario
        from .demo.harness import TwoEngines, checkout_pki

        samples = Path(__file__).resolve().parents[1] / "samples"
        try:
            checkout_pki()
        except FileNotFoundError as exc:
            fail(f"the demo runs from a checkout: {exc}", 1)
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="hl7referral-demo-") as tmp:
            work = keep or Path(tmp)

            def say(text: str) -> None:
                click.echo(f"[{time.monotonic() - started:5.1f} s] {text}")
            say(f"starting a referring engine, a specialist engine and an SMTP relay on 127.0.0.1 (in {work})")
            with TwoEngines(work) as h:
                say(f"relay on port {h.relay.port}; referrer MLLP {h.engines['referrer'].ports.mllp}, "
                    f"specialist MLLP {h.engines['specialist'].ports.mllp}")
                say("human referral: the referring EHR sends samples/ref-i12.hl7")
                human = scenario.refer(h, (samples / "ref-i12.hl7").read_bytes())
                say(f"  {human.referral_id}: delivered (MDN back), the specialist's EHR has it")
                scenario.accept(h, human)
                say("  accepted (OSU^O51 OK/IP over Direct)")
                scenario.book(h, human, "CARD-77^^2.16.840.1.113883.19.77^ISO", "20261203093000+0000")
                say("  booked (SIU^S12)")
                scenario.consult_note(h, human, "Echocardiogram normal. No follow-up needed.")
                say("  consult note: Consultation Note by Direct, MDM^T02 into the referring chart: CLOSED")
                say("veterinary referral: the PIMS sends samples/vet-ref-i12.hl7")
                vet = scenario.refer(h, (samples / "vet-ref-i12.hl7").read_bytes())
                say(f"  {vet.referral_id}: delivered, the specialist's EHR has it")
                scenario.accept(h, vet)
                scenario.book(h, vet, "VET-5^^2.16.840.1.113883.19.78^ISO", "20261204100000+0000")
                say("  accepted, booked")
                scenario.no_show(h, vet, "VET-5^^2.16.840.1.113883.19.78^ISO", "20261204100000+0000")
                say("  no-show (SIU^S26)")
                scenario.book(h, vet, "VET-6^^2.16.840.1.113883.19.78^ISO", "20261211100000+0000")
                say("  rebooked (SIU^S12)")
                scenario.consult_note(h, vet, "Grade II murmur; no treatment needed. Recheck in 12 months.")
                say("  consult note back in the referring chart: CLOSED")
                click.echo("")
                click.echo(scenario.timelines(h, human))
                click.echo("")
                click.echo(scenario.timelines(h, vet))
                click.echo("")
                relayed = h.relay.records()
                say(f"relay carried {len(relayed)} messages (packets, answers, MDNs); stopping everything")
            say("done: both referrals CLOSED on both sides; nothing left running")
