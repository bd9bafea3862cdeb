"""Direct messages per second: packets out (XDM + sign + encrypt) and in (decrypt + verify + trust), and openssl.

Runs in one process pinned to one core (the openssl children inherit the pin):
the Referral Note built from the 2 KB REF^I12 of bench/cda.py goes into a Direct
packet with hl7referral.direct.packet.referral_message (IHE XDM zip, bare
C-CDA, sign, encrypt) using the example PKI of certs-example/make_certs.py,
for each key transport; then the same message is opened as the engine's
receiver does (smime.decrypt, smime.verify, trust.check_sender with the CRLs).
The peer, in the same rounds: the ``openssl cms`` CLI doing the same
sign + encrypt and decrypt + verify (with CRL checks), one pair of processes
per message.

    ./dev bench direct [--seconds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cda import two_kb_referral  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from lxml import etree  # noqa: E402
from hl7referral.cda.mapping import load_mappings  # noqa: E402
from hl7referral.cda.pipeline import referral_key  # noqa: E402
from hl7referral.direct.packet import patient_cx  # noqa: E402
from hl7referral.cda.referral_note import build_referral_note, to_bytes  # noqa: E402
from hl7referral.config import load_engine  # noqa: E402
from hl7referral.destination import resolve  # noqa: E402
from hl7referral.direct import packet, smime  # noqa: E402
from hl7referral.direct.trust import Anchors, TrustPolicy, check_sender, load_crls  # noqa: E402

KEY_TRANSPORTS = ("rsa-pkcs1v15", "rsa-oaep")
OPENSSL_KEYOPTS = {
    "rsa-pkcs1v15": [],
    # What smime.encrypt sends: RSAES-OAEP with SHA-256 and MGF1-SHA-256.
    "rsa-oaep": ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256",
                 "-keyopt", "rsa_mgf1_md:sha256"],
}
CIPHER = "aes256"


def make_pki(tmp: Path) -> Path:
    """certs-example/make_certs.py build(tmp): the example Direct PKI in tmp/direct/."""
    path = ROOT / "certs-example" / "make_certs.py"
    spec = importlib.util.spec_from_file_location("make_certs_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    module.build(tmp)
    return tmp / "direct"


def referral_note(compact: bool = False) -> tuple[bytes, str, str, int]:
    """The Referral Note of bench/cda.py's 2 KB REF^I12: (C-CDA bytes, referral id, patient CX, message size)."""
    cfg = load_engine()
    mapping = load_mappings(cfg.mappings_dir)["ref-i12"]
    channel = next(c for c in cfg.channels if c.name == "ref-i12")
    raw = two_kb_referral()
    referral = mapping.map_bytes(raw).referral
    resolve(channel, cfg.directory, referral)
    patient = patient_cx(referral)  # as the engine's Direct service does
    tree = build_referral_note(referral)
    # The engine stores and sends the indented form (42 KB); --compact gives the same document unindented
    # (27 KB), the size the target names (~30 KB).
    cda = etree.tostring(tree, xml_declaration=True, encoding="UTF-8") if compact else to_bytes(tree)
    return cda, referral_key(referral.referral_id), patient, len(raw)


def rates(fns: dict, seconds: float, rounds: int = 5) -> dict[str, list[float]]:
    """Calls per second of each function in each of *rounds* rounds, the functions taking turns within a
    round (so a noisy neighbour hits them all alike: this VM's single runs swing by 30%); sorted per function."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                fn()
                n += 1
            out[name].append(n / (time.perf_counter() - start))
    return {name: sorted(r) for name, r in out.items()}


def split_ms(chains: dict, seconds: float, rounds: int = 5) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per step, the steps of a chain running one after the other as on the real path (each gets
    the previous one's output), so that they add up to the whole; timed alone in a tight loop, each step ran
    ~30% faster (warm caches, recycled buffers) and the parts did not add up. Sorted per step, ms per round."""
    out = {c: {name: [] for name, _ in steps} for c, steps in chains.items()}
    for _ in range(rounds):
        for c, steps in chains.items():
            spent, n, start = [0.0] * len(steps), 0, time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                x = None
                for i, (_, fn) in enumerate(steps):
                    t0 = time.perf_counter()
                    x = fn(x)
                    spent[i] += time.perf_counter() - t0
                n += 1
            for i, (name, _) in enumerate(steps):
                out[c][name].append(spent[i] / n * 1000)
    return {c: {name: sorted(r) for name, r in d.items()} for c, d in out.items()}


def med(r: list[float]) -> float:
    return statistics.median(r)


def pin_to_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu} of {os.cpu_count()}"
    except (AttributeError, OSError) as exc:  # not Linux: say so rather than pretend
        return f"not pinned ({exc.__class__.__name__}); the openssl pair may use two cores"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="measured seconds per headline figure (splits get a fifth of it each)")
    ap.add_argument("--skip-peer", action="store_true", help="do not run the openssl CLI (no ratio then)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compact", action="store_true",
                    help="send the C-CDA unindented (27 KB) instead of as the engine writes it (42 KB)")
    a = ap.parse_args()
    openssl = None if a.skip_peer else shutil.which("openssl")
    if openssl is None and not a.skip_peer:
        print("bench/direct.py: no openssl on PATH (use --skip-peer)", file=sys.stderr)
        return 2
    pinned = pin_to_one_core()

    with tempfile.TemporaryDirectory(prefix="bench-direct-") as tmpdir:
        tmp = Path(tmpdir)
        pki = make_pki(tmp / "pki")

        def cert(name: str) -> x509.Certificate:
            return x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes())

        def key(name: str):
            return serialization.load_pem_private_key((pki / f"{name}.key").read_bytes(), password=None)

        sender_cert, sender_key, receiver_cert, receiver_key = cert("sender"), key("sender"), cert("receiver"), \
            key("receiver")
        chain = [cert("intermediate")]
        sender, recipient = "referrals@direct.sender.test", "cardiology@direct.receiver.test"
        anchors = Anchors.load({"direct.sender.test": [pki / "anchor.pem"]})
        policy = TrustPolicy(crls=load_crls([pki / "intermediate.crl.pem", pki / "anchor.crl.pem"]))

        cda, referral_id, patient_id, hl7_size = referral_note(a.compact)
        content = packet.PacketContent(referral_id=referral_id, cda=cda, created="20261101120000",
                                       patient_id=patient_id)
        message_id = packet.message_id_for(f"{referral_id}/direct/1", "direct.sender.test")
        date = time.time()

        def build(kt: str) -> bytes:
            return packet.referral_message(content, sender=sender, recipient=recipient, message_id=message_id,
                                           date=date, signer=sender_cert, key=sender_key, chain=chain,
                                           recipient_certs=[receiver_cert], cipher=CIPHER, key_transport=kt)

        def open_message(eml: bytes, at: datetime | None = None):
            opened = smime.decrypt(eml, receiver_cert, receiver_key)
            verified = smime.verify(opened.entity)
            decision = check_sender(verified.signer, verified.certificates, sender, anchors, policy,
                                    at or datetime.now(timezone.utc))
            assert decision.ok, decision
            return opened, verified, decision

        # The pieces, made once: what each step of the split gets as input.
        entity = packet.health_content(content, sender, recipient, message_id)
        messages = {kt: build(kt) for kt in KEY_TRANSPORTS}
        for kt, eml in messages.items():
            opened, verified, decision = open_message(eml)
            assert opened.key_transport == kt and opened.cipher == CIPHER, opened
            assert verified.content == entity
        xdm_size = len(packet.build_xdm_for(content, sender, recipient))
        now = datetime.now(timezone.utc)

        # The peer: the same entity, the same certificates, the same algorithms; CRLs in the CAfile
        # (openssl 3.0's cms has no -CRLfile) with -crl_check_all, as check_sender checks both levels.
        (tmp / "entity.eml").write_bytes(entity)
        ca_bundle = tmp / "ca-with-crls.pem"
        ca_bundle.write_bytes(b"".join((pki / f).read_bytes()
                                       for f in ("anchor.pem", "intermediate.crl.pem", "anchor.crl.pem")))
        for kt, eml in messages.items():
            (tmp / f"engine-{kt}.eml").write_bytes(eml)

        def pipe(first: list, second: list, check: bytes = b"") -> bytes:
            """`openssl first | openssl second`: two processes per message, as a shell pipe would start."""
            p1 = subprocess.Popen([openssl, *map(str, first)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            p2 = subprocess.Popen([openssl, *map(str, second)], stdin=p1.stdout, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
            p1.stdout.close()
            out, err = p2.communicate()
            if p1.wait() or p2.returncode or check not in err:
                raise RuntimeError(f"openssl {first[0]} | {second[0]} failed: {err.decode(errors='replace')}")
            return out

        def openssl_seal(kt: str) -> bytes:
            return pipe(["cms", "-sign", "-binary", "-md", "sha256", "-in", tmp / "entity.eml",
                         "-signer", pki / "sender.pem", "-inkey", pki / "sender.key",
                         "-certfile", pki / "intermediate.pem"],
                        ["cms", "-encrypt", "-binary", "-aes256", "-recip", pki / "receiver.pem",
                         *OPENSSL_KEYOPTS[kt]])

        def openssl_open(kt: str) -> bytes:
            return pipe(["cms", "-decrypt", "-in", tmp / f"engine-{kt}.eml",
                         "-recip", pki / "receiver.pem", "-inkey", pki / "receiver.key"],
                        ["cms", "-verify", "-CAfile", ca_bundle, "-crl_check_all", "-purpose", "smimesign"],
                        check=b"Verification successful")

        if openssl:
            for kt in KEY_TRANSPORTS:  # each peer output must open with the engine, and vice versa
                theirs = openssl_seal(kt)
                opened, verified, _ = open_message(b"From: " + sender.encode() + b"\r\n" + theirs)
                assert opened.key_transport == kt and verified.content == entity
                assert openssl_open(kt) == entity

        # -- measure ---------------------------------------------------------------------------------
        s = a.seconds
        chains = {}
        for kt in KEY_TRANSPORTS:
            chains[f"out {kt}"] = [
                ("XDM zip + MIME entity", lambda _: packet.health_content(content, sender, recipient, message_id)),
                ("sign", lambda e: smime.sign(e, sender_cert, sender_key, chain)),
                ("encrypt", lambda signed, kt=kt: smime.encrypt(signed, [receiver_cert], CIPHER, kt)),
            ]
            chains[f"in {kt}"] = [
                ("decrypt", lambda _, kt=kt: smime.decrypt(messages[kt], receiver_cert, receiver_key)),
                ("verify", lambda opened: smime.verify(opened.entity)),
                ("path + CRL (check_sender)", lambda v: check_sender(v.signer, v.certificates, sender, anchors,
                                                                     policy, now)),
            ]
        split = split_ms(chains, s / 2)
        out_fns, in_fns = {}, {}
        for kt in KEY_TRANSPORTS:
            out_fns[f"packet {kt}"] = lambda kt=kt: build(kt)
            out_fns[f"sign+encrypt {kt}"] = lambda kt=kt: packet.seal(
                entity, outer_headers=b"", signer=sender_cert, key=sender_key, chain=chain,
                recipient_certs=[receiver_cert], cipher=CIPHER, key_transport=kt)
            if openssl:
                out_fns[f"openssl {kt}"] = lambda kt=kt: openssl_seal(kt)
            in_fns[f"inbound {kt}"] = lambda kt=kt: open_message(messages[kt], now)
            if openssl:
                in_fns[f"openssl {kt}"] = lambda kt=kt: openssl_open(kt)
        outbound = rates(out_fns, s)
        inbound = rates(in_fns, s)

    # -- report ------------------------------------------------------------------------------------
    def steps(chain: str) -> None:
        whole = sum(med(r) for r in split[chain].values())
        for step, r in split[chain].items():
            print(f"      {step:<26} {med(r):7.3f} ms (best {r[0]:.3f})  {100 * med(r) / whole:3.0f}%")

    def per_s(r: list[float]) -> str:
        return f"{med(r):8,.0f}/s (best {r[-1]:,.0f})"

    print(f"one core ({pinned}); median of 5 rounds, every figure of a table measured in the same rounds, "
          f"taking turns")
    print(f"REF^I12 of {hl7_size} bytes -> Referral Note (C-CDA) of {len(cda):,} bytes ("
          f"{'unindented, --compact' if a.compact else 'as the engine sends it; --compact for ~30 KB'}; "
          f"not padded or cut) -> XDM zip of {xdm_size:,} bytes")
    print(f"  packet: text part + XDM zip + bare C-CDA, {len(entity):,} bytes signed; Direct message "
          + ", ".join(f"{kt} {len(m):,} bytes" for kt, m in messages.items()) + f"; {CIPHER}-cbc, sha256")
    print("\nOutbound: referral_message (XDM + sign + encrypt), target >= 300/s")
    for kt in KEY_TRANSPORTS:
        print(f"  {kt:<14} {per_s(outbound[f'packet {kt}'])}  = {1000 / med(outbound[f'packet {kt}']):.3f} ms")
    print("  split (steps timed in sequence, as in referral_message; the zip is ~8 KB, the bare C-CDA goes too):")
    for kt in KEY_TRANSPORTS:
        print(f"    {kt}")
        steps(f"out {kt}")
    print("\nInbound: decrypt + verify + check_sender (path to the anchor, CRLs of intermediate and anchor)")
    for kt in KEY_TRANSPORTS:
        print(f"  {kt:<14} {per_s(inbound[f'inbound {kt}'])}  = {1000 / med(inbound[f'inbound {kt}']):.3f} ms")
    print("  split (steps timed in sequence):")
    for kt in KEY_TRANSPORTS:
        print(f"    {kt}")
        steps(f"in {kt}")
    ratios = {}
    if openssl:
        version = subprocess.run([openssl, "version"], capture_output=True, text=True).stdout.strip()
        print(f"\nPeer: {version} CLI, per message `openssl cms -sign | openssl cms -encrypt` and "
              f"`openssl cms -decrypt | openssl cms -verify -crl_check_all`.")
        print("  Includes starting 2 processes per message (fork/exec from this Python process, loading libcrypto,")
        print("  reading the PEM files), which dominates its cost: this compares deployable per-message paths,")
        print("  not the two crypto libraries. openssl does not check the Direct address binding, key size")
        print("  or algorithm profile, which the engine's inbound figure includes.")
        print(f"  {'':<38} {'engine':>10} {'openssl':>10}  engine/openssl")
        for kt in KEY_TRANSPORTS:
            for label, eng, peer in ((f"sign+encrypt {kt}", outbound[f"sign+encrypt {kt}"], outbound[f"openssl {kt}"]),
                                     (f"decrypt+verify+trust {kt}", inbound[f"inbound {kt}"],
                                      inbound[f"openssl {kt}"])):
                ratios[label] = med(eng) / med(peer)
                print(f"  {label:<38} {med(eng):8,.0f}/s {med(peer):8,.0f}/s  {ratios[label]:6.1f}x")
            ratios[f"whole packet {kt}"] = med(outbound[f"packet {kt}"]) / med(outbound[f"openssl {kt}"])
            print(f"  {'whole packet (with XDM) ' + kt:<38} {med(outbound[f'packet {kt}']):8,.0f}/s "
                  f"{med(outbound[f'openssl {kt}']):8,.0f}/s  {ratios[f'whole packet {kt}']:6.1f}x  "
                  f"(openssl given the entity ready-made)")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "cda_bytes": len(cda), "signed_entity_bytes": len(entity), "xdm_bytes": xdm_size,
            "message_bytes": {kt: len(m) for kt, m in messages.items()}, "pinned": pinned,
            "outbound_per_s": {k: med(v) for k, v in outbound.items()},
            "outbound_per_s_best": {k: v[-1] for k, v in outbound.items()},
            "inbound_per_s": {k: med(v) for k, v in inbound.items()},
            "inbound_per_s_best": {k: v[-1] for k, v in inbound.items()},
            "steps_ms": {c: {k: med(v) for k, v in d.items()} for c, d in split.items()},
            "ratio_engine_over_openssl": ratios,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
