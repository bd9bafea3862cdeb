"""Direct trust decisions (hl7referral.direct.trust) on the example Direct PKI, cross-checked with openssl verify."""

import asyncio
import datetime as dt
import re
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hl7referral.direct.trust import (
    Anchors, TrustDecision, TrustError, TrustPolicy, check_recipient, check_sender, load_crls,
)

SENDER, RECEIVER = "referrals@direct.sender.test", "cardiology@direct.receiver.test"


@pytest.fixture(scope="session")
def mc(make_certs):
    return make_certs


def now():
    return dt.datetime.now(dt.timezone.utc)


def cert(pki, name):
    return x509.load_pem_x509_certificate((pki / name).read_bytes())


@pytest.fixture(scope="session")
def pki(direct_pki):
    return direct_pki


@pytest.fixture(scope="session")
def inter(pki):
    return [cert(pki, "intermediate.pem")]


@pytest.fixture(scope="session")
def anchors(pki):
    return Anchors.load({"*": [pki / "anchor.pem"]})


@pytest.fixture(scope="session")
def anchor_crl(pki, mc, tmp_path_factory):
    """An empty CRL by the anchor (the fixture has none): hard-fail needs one for the intermediate."""
    path = tmp_path_factory.mktemp("crl") / "anchor.crl.pem"
    path.write_bytes(mc.pem(mc.make_crl(cert(pki, "anchor.pem"), mc.load_key(pki / "anchor.key"), [])))
    return path


def one_line(d: TrustDecision):
    assert d.reason and "\n" not in d.reason and "\r" not in d.reason, d
    return d


def sender_decision(pki, name, address=SENDER, anchors=None, policy=None, intermediates=None, at=None):
    anchors = anchors or Anchors.load({"*": [pki / "anchor.pem"]})
    intermediates = [cert(pki, "intermediate.pem")] if intermediates is None else intermediates
    return one_line(check_sender(cert(pki, name), intermediates, address, anchors, policy or TrustPolicy(),
                                 at or now()))


# -- anchors -----------------------------------------------------------------------


def test_anchors_from_pem_and_from_bundle_p7b(pki):
    from_pem = Anchors.load({"*": [pki / "anchor.pem"]}).for_address(SENDER)
    from_p7b = Anchors.load({"*": [pki / "bundle.p7b"]}).for_address(SENDER)
    assert from_pem == from_p7b == [cert(pki, "anchor.pem")]
    assert (pki / "bundle.p7b").read_bytes()[:1] == b"\x30"  # really DER
    d = sender_decision(pki, "sender.pem", anchors=Anchors.load({"*": [pki / "bundle.p7b"]}))
    assert (d.ok, d.code) == (True, "trusted")


def test_anchors_from_pem_encoded_p7b_and_multi_cert_pem(pki, tmp_path):
    bundle = tmp_path / "bundle-pem.p7b"
    bundle.write_bytes(pkcs7.serialize_certificates([cert(pki, "anchor.pem"), cert(pki, "rogue-anchor.pem")],
                                                    Encoding.PEM))
    both = tmp_path / "both.pem"
    both.write_bytes((pki / "anchor.pem").read_bytes() + (pki / "rogue-anchor.pem").read_bytes())
    for path in (bundle, both):
        got = Anchors.load({"direct.sender.test": [path]}).for_address(SENDER)
        assert sorted(c.subject.rfc4514_string() for c in got) == sorted(
            cert(pki, n).subject.rfc4514_string() for n in ("anchor.pem", "rogue-anchor.pem"))


def test_anchor_lookup_by_domain_case_insensitive_else_default_never_system(pki):
    a = Anchors.load({"DIRECT.Sender.test": [pki / "anchor.pem"], "*": [pki / "rogue-anchor.pem"]})
    assert a.for_address("referrals@direct.SENDER.test") == [cert(pki, "anchor.pem")]
    assert a.for_address(RECEIVER) == [cert(pki, "rogue-anchor.pem")]
    assert Anchors.load({"direct.sender.test": [pki / "anchor.pem"]}).for_address(RECEIVER) == []


def test_unreadable_or_empty_anchor_file_is_a_one_line_trust_error(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(TrustError) as e:
        Anchors.load({"*": [missing]})
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    junk = tmp_path / "junk.p7b"
    junk.write_bytes(b"not a certificate\n")
    with pytest.raises(TrustError) as e:
        Anchors.load({"*": [pki / "anchor.pem", junk]})
    assert str(junk) in str(e.value) and "\n" not in str(e.value)


def test_policy_rejects_unknown_revocation_mode():
    with pytest.raises(TrustError):
        TrustPolicy(revocation="ignore")


def test_load_crls_pem_and_der(pki, tmp_path):
    pem = load_crls([pki / "intermediate.crl.pem"])
    der = tmp_path / "i.crl"
    der.write_bytes(pem[0].public_bytes(Encoding.DER))
    assert load_crls([der]) == pem
    assert pem[0].get_revoked_certificate_by_serial_number(cert(pki, "revoked.pem").serial_number) is not None
    with pytest.raises(TrustError):
        load_crls([tmp_path / "missing.crl"])


# -- decisions -----------------------------------------------------------------------


def test_trusted_address_bound_sender_and_recipient(pki, inter, anchors):
    d = sender_decision(pki, "sender.pem")
    assert (d.ok, d.code, d.binding) == (True, "trusted", "address")
    assert d.path == tuple(cert(pki, n).subject.rfc4514_string()
                           for n in ("sender.pem", "intermediate.pem", "anchor.pem"))
    r = one_line(check_recipient(cert(pki, "receiver.pem"), inter, RECEIVER, anchors, TrustPolicy(), now()))
    assert (r.ok, r.code, r.binding) == (True, "trusted", "address")
    # the domain of the address is case-insensitive, the local part is not
    assert sender_decision(pki, "sender.pem", "referrals@Direct.Sender.TEST").ok
    assert sender_decision(pki, "sender.pem", "Referrals@direct.sender.test").code == "not-bound"


def test_trusted_domain_bound(pki, inter, anchors):
    d = sender_decision(pki, "sender-org.pem", "anyone@direct.sender.test")
    assert (d.ok, d.code, d.binding) == (True, "trusted", "domain")
    r = one_line(check_recipient(cert(pki, "receiver-org.pem"), inter, RECEIVER, anchors, TrustPolicy(), now()))
    assert (r.ok, r.binding) == (True, "domain")
    assert sender_decision(pki, "sender-org.pem", RECEIVER).code == "not-bound"


def test_per_domain_anchors(pki):
    only_receiver = Anchors.load({"direct.receiver.test": [pki / "anchor.pem"]})
    d = sender_decision(pki, "sender.pem", anchors=only_receiver)
    assert (d.ok, d.code) == (False, "unknown-anchor")
    wrong_default = Anchors.load({"direct.receiver.test": [pki / "anchor.pem"], "*": [pki / "rogue-anchor.pem"]})
    assert sender_decision(pki, "sender.pem", anchors=wrong_default).code == "unknown-anchor"
    assert sender_decision(pki, "receiver.pem", RECEIVER, anchors=wrong_default).ok
    # and the rogue leaf is trusted exactly where its anchor is configured: it is the anchor that decides
    rogue_for_sender = Anchors.load({"direct.sender.test": [pki / "rogue-anchor.pem"]})
    assert sender_decision(pki, "rogue.pem", anchors=rogue_for_sender, intermediates=[]).ok


def test_expired_and_not_yet_valid(pki):
    d = sender_decision(pki, "expired.pem")
    assert (d.ok, d.code) == (False, "expired")
    early = cert(pki, "sender.pem").not_valid_before_utc - dt.timedelta(days=1)
    assert sender_decision(pki, "sender.pem", at=early).code == "expired"
    # the decision is taken at ``at``: a good certificate is "expired" once past its notAfter
    after = cert(pki, "sender.pem").not_valid_after_utc + dt.timedelta(days=1)
    d = sender_decision(pki, "sender.pem", at=after)
    assert d.code == "expired"


def test_revoked_via_crl(pki):
    crls = load_crls([pki / "intermediate.crl.pem"])
    d = sender_decision(pki, "revoked.pem", policy=TrustPolicy(crls=crls))
    assert (d.ok, d.code) == (False, "revoked")
    assert cert(pki, "revoked.pem").subject.rfc4514_string() in d.reason
    # the same CRL does not touch an unrevoked sibling
    assert sender_decision(pki, "sender.pem", policy=TrustPolicy(crls=crls)).ok


def test_revoked_intermediate_via_anchor_crl(pki, mc):
    crl = mc.make_crl(cert(pki, "anchor.pem"), mc.load_key(pki / "anchor.key"), [cert(pki, "intermediate.pem")])
    d = sender_decision(pki, "sender.pem", policy=TrustPolicy(crls=[crl]))
    assert (d.ok, d.code) == (False, "revoked")
    assert "Intermediate" in d.reason


def test_soft_fail_versus_hard_fail_without_crl(pki, anchor_crl):
    soft = sender_decision(pki, "revoked.pem", policy=TrustPolicy("soft-fail"))
    assert (soft.ok, soft.code) == (True, "trusted") and "no CRL" in soft.reason
    hard = sender_decision(pki, "sender.pem", policy=TrustPolicy("hard-fail"))
    assert (hard.ok, hard.code) == (False, "no-crl")
    # hard-fail needs a CRL for every certificate below the anchor: the leaf's and the intermediate's
    only_leaf = TrustPolicy("hard-fail", load_crls([pki / "intermediate.crl.pem"]))
    d = sender_decision(pki, "sender.pem", policy=only_leaf)
    assert d.code == "no-crl" and "Intermediate" in d.reason
    full = TrustPolicy("hard-fail", load_crls([pki / "intermediate.crl.pem", anchor_crl]))
    ok = sender_decision(pki, "sender.pem", policy=full)
    assert (ok.ok, ok.code) == (True, "trusted") and "no CRL" not in ok.reason
    assert sender_decision(pki, "revoked.pem", policy=full).code == "revoked"


def test_stale_crl_does_not_count(pki, mc):
    # a CRL whose nextUpdate has passed is no CRL: hard-fail refuses
    crl = mc.make_crl(cert(pki, "intermediate.pem"), mc.load_key(pki / "intermediate.key"), [], days=1)
    later = now() + dt.timedelta(days=3)
    assert sender_decision(pki, "sender.pem", policy=TrustPolicy("hard-fail", [crl]), at=later).code == "no-crl"


def test_unknown_anchor_rogue(pki):
    d = sender_decision(pki, "rogue.pem", intermediates=[cert(pki, "intermediate.pem")])
    assert (d.ok, d.code) == (False, "unknown-anchor")
    # adding the rogue root as a mere "intermediate" from the message does not make it an anchor
    d = sender_decision(pki, "rogue.pem", intermediates=[cert(pki, "rogue-anchor.pem")])
    assert not d.ok and d.code in ("unknown-anchor", "invalid-path")


def test_weak_key(pki):
    d = sender_decision(pki, "small.pem")
    assert (d.ok, d.code) == (False, "weak-key") and "1024" in d.reason
    assert sender_decision(pki, "small.pem", policy=TrustPolicy(min_rsa_bits=1024)).ok


def test_not_bound(pki, inter, anchors):
    d = sender_decision(pki, "unbound.pem")
    assert (d.ok, d.code) == (False, "not-bound") and "someone@elsewhere.test" in d.reason
    d = sender_decision(pki, "sender.pem", "other@direct.sender.test")
    assert (d.ok, d.code) == (False, "not-bound")
    r = check_recipient(cert(pki, "sender.pem"), inter, RECEIVER, anchors, TrustPolicy(), now())
    assert (r.ok, r.code) == (False, "not-bound")


def test_intermediate_must_come_with_the_message(pki):
    d = sender_decision(pki, "sender.pem", intermediates=[])
    assert not d.ok and d.code in ("invalid-path", "unknown-anchor")
    # and the intermediate alone is not an anchor
    inter_as_anchor_elsewhere = Anchors.load({"direct.receiver.test": [pki / "intermediate.pem"],
                                              "*": [pki / "rogue-anchor.pem"]})
    assert sender_decision(pki, "sender.pem", anchors=inter_as_anchor_elsewhere).code == "unknown-anchor"


def _leaf(pki, mc, subject, **kw):
    issuer = cert(pki, "intermediate.pem")
    c, _ = mc.make_leaf(issuer, mc.load_key(pki / "intermediate.key"), subject, **kw)
    return c


def test_key_usage_sign_only_certificate_cannot_be_encrypted_to(pki, mc, inter, anchors):
    c = _leaf(pki, mc, "Sign only", usages=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
              sans=[x509.RFC822Name(RECEIVER)], key_encipherment=False)
    r = check_recipient(c, inter, RECEIVER, anchors, TrustPolicy(), now())
    assert (r.ok, r.code) == (False, "bad-usage") and "keyEncipherment" in r.reason
    s = check_sender(c, inter, RECEIVER, anchors, TrustPolicy(), now())
    assert (s.ok, s.code) == (True, "trusted")


def test_extended_key_usage_must_allow_email(pki, mc, inter, anchors):
    c = _leaf(pki, mc, "TLS client", usages=[ExtendedKeyUsageOID.CLIENT_AUTH], sans=[x509.RFC822Name(SENDER)])
    d = check_sender(c, inter, SENDER, anchors, TrustPolicy(), now())
    assert (d.ok, d.code) == (False, "bad-usage")


def test_legacy_subject_email_address_binds_the_address(pki, mc, inter, anchors):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Legacy"),
                      x509.NameAttribute(NameOID.EMAIL_ADDRESS, SENDER)])
    c = _leaf(pki, mc, name, usages=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
    d = check_sender(c, inter, SENDER, anchors, TrustPolicy(), now())
    assert (d.ok, d.binding) == (True, "address")
    assert check_sender(c, inter, "other@direct.sender.test", anchors, TrustPolicy(), now()).code == "not-bound"


def test_works_from_inside_a_running_event_loop(pki):
    async def inside():
        return sender_decision(pki, "revoked.pem", policy=TrustPolicy(crls=load_crls([pki / "intermediate.crl.pem"])))
    assert asyncio.run(inside()).code == "revoked"


def test_naive_time_is_taken_as_utc(pki):
    naive = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert sender_decision(pki, "sender.pem", at=naive).ok


# -- cross-check with openssl verify ----------------------------------------------------

OPENSSL_ERRORS = {
    10: "expired", 9: "expired",  # has expired / not yet valid
    23: "revoked",
    20: "unknown-anchor", 2: "unknown-anchor", 19: "unknown-anchor", 18: "unknown-anchor",
    3: "no-crl",
    66: "weak-key",
    62: "not-bound", 63: "not-bound",
    26: "bad-usage",
}

# (certificate, address, CRL files, hard-fail); the policy for each case and the openssl flags follow from it
CROSS = [
    ("sender.pem", SENDER, (), False),
    ("sender-org.pem", "anyone@direct.sender.test", (), False),
    ("receiver.pem", RECEIVER, (), False),
    ("expired.pem", SENDER, (), False),
    ("revoked.pem", SENDER, ("intermediate.crl.pem",), False),
    ("revoked.pem", SENDER, (), False),
    ("sender.pem", SENDER, ("intermediate.crl.pem",), True),
    ("sender.pem", SENDER, ("intermediate.crl.pem", "anchor.crl.pem"), True),
    ("revoked.pem", SENDER, ("intermediate.crl.pem", "anchor.crl.pem"), True),
    ("small.pem", SENDER, (), False),
    ("unbound.pem", SENDER, (), False),
    ("sender.pem", "other@direct.sender.test", (), False),
    ("rogue.pem", SENDER, (), False),
]


def _openssl(pki, name, address, crl_paths, hard, at):
    args = ["openssl", "verify", "-CAfile", str(pki / "anchor.pem"), "-untrusted", str(pki / "intermediate.pem"),
            "-attime", str(int(at.timestamp())), "-auth_level", "2", "-purpose", "smimesign"]
    if crl_paths:
        args += ["-crl_check_all" if hard else "-crl_check"]
        for p in crl_paths:
            args += ["-CRLfile", str(p)]
    c = cert(pki, name)
    if c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.RFC822Name):
        args += ["-verify_email", address]
    else:
        args += ["-verify_hostname", address.rpartition("@")[2]]
    out = subprocess.run(args + [str(pki / name)], capture_output=True, text=True, timeout=30)
    m = re.search(r"error (\d+) at", out.stdout + out.stderr)
    if out.returncode == 0 and not m:
        return "trusted", ""
    assert m, out
    return OPENSSL_ERRORS.get(int(m.group(1)), "other"), (out.stdout + out.stderr).strip()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("name,address,crl_names,hard", CROSS)
def test_verdicts_agree_with_openssl(pki, anchor_crl, name, address, crl_names, hard):
    crl_paths = [anchor_crl if n == "anchor.crl.pem" else pki / n for n in crl_names]
    at = now()
    policy = TrustPolicy("hard-fail" if hard else "soft-fail", load_crls(crl_paths))
    ours = sender_decision(pki, name, address, policy=policy, at=at)
    theirs, detail = _openssl(pki, name, address, crl_paths, hard, at)
    assert theirs != "other", detail
    assert ours.code == theirs, (ours, detail)
