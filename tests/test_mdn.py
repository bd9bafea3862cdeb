"""MDN build/parse: ETT DTS 452/457/460/461/462 and test 40 as assertions, peers' MDNs, fuzz.

The ETT checks are read from the built bytes with the stdlib parser and regular expressions, not
with parse_mdn, so a bug shared by builder and parser cannot hide itself in a round trip.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hl7referral.direct.mdn import (
    FINAL_DELIVERY_OPTION,
    Mdn,
    MdnError,
    build_mdn,
    is_mdn,
    parse_mdn,
    wants_final_delivery,
)

ORIGINAL_ID = "<20240501.1234.referral@direct.sender.test>"
SENDER = "alice@direct.sender.test"
RECIPIENT = "bob@direct.receiver.test"
UA = "direct.receiver.test; hl7referral 0.1"


def build(disposition: str, **kw) -> tuple[dict[str, str], bytes]:
    return build_mdn(
        original_message_id=kw.pop("original_message_id", ORIGINAL_ID),
        original_from=SENDER,
        original_to=RECIPIENT,
        reporting_ua=UA,
        disposition=disposition,
        **kw,
    )


def notification_fields(entity: bytes) -> dict[str, list[str]]:
    """The message/disposition-notification fields, read independently of parse_mdn."""
    boundary = re.search(rb'boundary="([^"]+)"', entity).group(1)
    parts = entity.split(b"--" + boundary)
    part = next(p for p in parts if b"Content-Type: message/disposition-notification" in p)
    body = part.split(b"\r\n\r\n", 1)[1]
    fields: dict[str, list[str]] = {}
    for line in body.decode("ascii").split("\r\n"):
        if line:
            name, _, value = line.partition(":")
            fields.setdefault(name.lower(), []).append(value.strip())
    return fields


# -- built MDNs satisfy the ETT checks ---------------------------------------------------------


@pytest.mark.parametrize("disposition", ["processed", "dispatched", "failed"])
def test_built_mdn_passes_ett_checks(disposition):
    failure = "recipient mailbox does not exist" if disposition == "failed" else ""
    headers, entity = build(disposition, failure=failure)

    msg = email.message_from_bytes(entity, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "disposition-notification"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/disposition-notification"]
    assert not msg.defects and not any(p.defects for p in parts)

    fields = notification_fields(entity)
    assert fields["reporting-ua"] == [UA]  # DTS 457
    assert fields["final-recipient"] == [f"rfc822; {RECIPIENT}"]  # DTS 460
    assert fields["original-recipient"] == [f"rfc822; {RECIPIENT}"]
    assert fields["original-message-id"] == [ORIGINAL_ID]  # DTS 461: equals the sent Message-ID
    assert fields["disposition"] == [f"automatic-action/MDN-sent-automatically; {disposition}"]  # DTS 462
    assert ("failure" in fields) == (disposition == "failed")
    # DTS 452: an MDN never asks for an MDN, neither on the outer message nor in the entity.
    assert not any(k.lower() == "disposition-notification-to" for k in headers)
    assert b"disposition-notification-to" not in entity.lower()
    assert headers["In-Reply-To"] == ORIGINAL_ID and ORIGINAL_ID in headers["References"]
    assert set(headers) == {"Subject", "In-Reply-To", "References"}  # the caller owns From/To/Date/ID

    # The human-readable part says what happened and nothing else (no PHI can come from inputs).
    human = parts[0].get_content()
    assert ORIGINAL_ID in human and disposition in human

    # CRLF only, ASCII only (DTS 196), no line over 998 octets.
    assert entity.isascii()
    assert b"\n" not in entity.replace(b"\r\n", b"")
    assert b"\r" not in entity.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in entity.split(b"\r\n"))


@pytest.mark.parametrize("disposition", ["processed", "dispatched", "failed"])
@pytest.mark.parametrize("honoured", [False, True])
def test_final_destination_field_only_on_dispatched_when_honoured(disposition, honoured):
    """ETT test 40: the X-DIRECT field only on a dispatched MDN from a receiver honouring the option."""
    _, entity = build(disposition, final_destination_delivery=honoured)
    present = "x-direct-final-destination-delivery" in notification_fields(entity)
    assert present == (honoured and disposition == "dispatched")
    assert parse_mdn(entity).final_destination_delivery == present


@pytest.mark.parametrize(
    "disposition, failure, honoured",
    [("processed", "", False), ("dispatched", "", True), ("dispatched", "", False), ("failed", "no such user", False)],
)
def test_round_trip(disposition, failure, honoured):
    _, entity = build(disposition, failure=failure, final_destination_delivery=honoured)
    assert parse_mdn(entity) == Mdn(
        original_message_id=ORIGINAL_ID,
        disposition=disposition,
        mode="automatic-action/MDN-sent-automatically",
        final_recipient=RECIPIENT,
        original_recipient=RECIPIENT,
        reporting_ua=UA,
        failure=failure,
        final_destination_delivery=honoured and disposition == "dispatched",
    )
    assert is_mdn(entity)


def test_whole_message_round_trip_reports_sender():
    headers, entity = build("processed")
    outer = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    envelope = f"From: {RECIPIENT}\r\nTo: {SENDER}\r\nMIME-Version: 1.0\r\n".encode()
    message = envelope + outer + entity
    assert parse_mdn(message).sender == RECIPIENT


def test_build_is_deterministic_and_boundary_safe():
    assert build("processed") == build("processed")
    assert build("processed")[1] != build("dispatched")[1]
    # Human text that looks like a boundary or has non-ASCII still gives two intact parts.
    _, entity = build("processed", human_text="Zugestellt an Dr. Müller\n--=_mdn_ fake boundary\n")
    msg = email.message_from_bytes(entity, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert len(parts) == 2 and "Müller" in parts[0].get_content()
    assert parse_mdn(entity).disposition == "processed"


@pytest.mark.parametrize(
    "kw",
    [
        {"original_message_id": "<a@b>\r\nBcc: eve@evil.test"},  # header injection
        {"original_message_id": ""},
        {"failure": "line one\nDisposition: automatic-action/MDN-sent-automatically; processed"},
        {"failure": "not allowed on processed"},
        {"disposition": "processed; dispatched"},
        {"disposition": ""},
        {"failure": "Empfänger unbekannt", "disposition": "failed"},  # DTS 196: headers ASCII
        {"failure": "x" * 1200, "disposition": "failed"},
    ],
)
def test_build_refuses_bad_input(kw):
    kw.setdefault("disposition", "processed")
    with pytest.raises(MdnError):
        build(kw.pop("disposition"), **kw)


def test_build_normalises_message_id_brackets():
    _, entity = build("processed", original_message_id="20240501.1@direct.sender.test")
    assert notification_fields(entity)["original-message-id"] == ["<20240501.1@direct.sender.test>"]


# -- MDNs as other implementations write them --------------------------------------------------

# Direct Java RI style (gateway test resource MDNDispatchedMessage.txt): LF line endings, lower-case
# outer headers, no headers on the text part, "mode;type" without a space, a Final-Recipient without
# "rfc822;", the X-DIRECT field with an empty value.
RI_DISPATCHED = b"""to: alice@direct.sender.test
content-type: multipart/report; report-type=disposition-notification; boundary="----=_Part_5_31697654.1295630438108"
message-id: 0c796d0e-4c76-43e8-be40-2cd5e30c1005
subject: Processed: referral
From: bob@direct.receiver.test

------=_Part_5_31697654.1295630438108

Your message was successfully dispatched.
------=_Part_5_31697654.1295630438108
Content-Type: message/disposition-notification

Disposition: automatic-action/MDN-sent-automatically;dispatched
Reporting-UA: direct.receiver.test;NHIN Direct Security Agent
Final-Recipient: bob@direct.receiver.test
Original-Message-ID: <20240501.1234.referral@direct.sender.test>
X-DIRECT-FINAL-DESTINATION-DELIVERY:\x20

------=_Part_5_31697654.1295630438108--
"""

# A HISP that folds long fields and writes field names in lower case, CRLF, processed.
FOLDED_PROCESSED = (
    b"From: postmaster@direct.receiver.test\r\n"
    b"Date: Wed, 01 May 2024 10:00:05 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/report;\r\n"
    b"\treport-type=\"disposition-notification\";\r\n"
    b"\tboundary=\"b1_0123\"\r\n"
    b"\r\n"
    b"--b1_0123\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Processed.\r\n"
    b"--b1_0123\r\n"
    b"Content-Type: message/disposition-notification\r\n"
    b"\r\n"
    b"reporting-ua: direct.receiver.test;\r\n"
    b"  Example HISP Security Agent 6.1\r\n"
    b"original-recipient: rfc822;bob@direct.receiver.test\r\n"
    b"final-recipient: rfc822;\r\n"
    b" bob@direct.receiver.test\r\n"
    b"original-message-id:\r\n"
    b" <20240501.1234.referral@direct.sender.test>\r\n"
    b"disposition: automatic-action/MDN-sent-automatically;\r\n"
    b"  processed\r\n"
    b"\r\n"
    b"--b1_0123--\r\n"
)

# Failed with a Failure: field (Direct IG style), inside multipart/signed as it is after decryption.
SIGNED_FAILED = (
    b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256;\r\n"
    b" boundary=\"sig\"\r\n"
    b"\r\n"
    b"--sig\r\n"
    b"Content-Type: multipart/report; report-type=disposition-notification; boundary=\"r\"\r\n"
    b"\r\n"
    b"--r\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"Your message could not be delivered.\r\n"
    b"--r\r\n"
    b"Content-Type: message/disposition-notification\r\n"
    b"\r\n"
    b"Reporting-UA: direct.receiver.test; HISP\r\n"
    b"Final-Recipient: rfc822; nobody@direct.receiver.test\r\n"
    b"Original-Message-ID: <20240501.1234.referral@direct.sender.test>\r\n"
    b"Disposition: automatic-action/MDN-sent-automatically; failed\r\n"
    b"Failure: 550 5.1.1 recipient unknown\r\n"
    b"\r\n"
    b"--r--\r\n"
    b"--sig\r\n"
    b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwEAAA==\r\n"
    b"--sig--\r\n"
)

# RFC 3798 "/error" modifier with an Error: field, a comment, and no Original-Message-ID field:
# correlation falls back to the report's In-Reply-To.
ERROR_MODIFIER = (
    b"In-Reply-To: <20240501.1234.referral@direct.sender.test>\r\n"
    b"Content-Type: multipart/report; report-type=disposition-notification; boundary=XYZ\r\n"
    b"\r\n"
    b"--XYZ\r\n"
    b"\r\n"
    b"error\r\n"
    b"--XYZ\r\n"
    b"Content-Type: message/disposition-notification\r\n"
    b"\r\n"
    b"Reporting-UA: hisp.example; Mailer\r\n"
    b"Final-Recipient: rfc822; bob@direct.receiver.test\r\n"
    b"Disposition: automatic-action/MDN-sent-automatically (policy); processed/error\r\n"
    b"Error: content could not be decrypted\r\n"
    b"\r\n"
    b"--XYZ--\r\n"
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            RI_DISPATCHED,
            Mdn(
                original_message_id=ORIGINAL_ID,
                disposition="dispatched",
                mode="automatic-action/MDN-sent-automatically",
                final_recipient=RECIPIENT,
                original_recipient="",
                reporting_ua="direct.receiver.test;NHIN Direct Security Agent",
                final_destination_delivery=True,
                sender=RECIPIENT,
            ),
        ),
        (
            FOLDED_PROCESSED,
            Mdn(
                original_message_id=ORIGINAL_ID,
                disposition="processed",
                mode="automatic-action/MDN-sent-automatically",
                final_recipient=RECIPIENT,
                original_recipient=RECIPIENT,
                reporting_ua="direct.receiver.test; Example HISP Security Agent 6.1",
                sender="postmaster@direct.receiver.test",
            ),
        ),
        (
            SIGNED_FAILED,
            Mdn(
                original_message_id=ORIGINAL_ID,
                disposition="failed",
                mode="automatic-action/MDN-sent-automatically",
                final_recipient="nobody@direct.receiver.test",
                original_recipient="",
                reporting_ua="direct.receiver.test; HISP",
                failure="550 5.1.1 recipient unknown",
            ),
        ),
        (
            ERROR_MODIFIER,
            Mdn(
                original_message_id=ORIGINAL_ID,
                disposition="processed",
                mode="automatic-action/MDN-sent-automatically",
                final_recipient=RECIPIENT,
                original_recipient="",
                reporting_ua="hisp.example; Mailer",
                failure="content could not be decrypted",
            ),
        ),
    ],
    ids=["java-ri-dispatched", "folded-processed", "signed-failed", "error-modifier"],
)
def test_parse_peer_mdns(raw, expected):
    assert is_mdn(raw)
    assert parse_mdn(raw) == expected


def test_base64_notification_part_is_decoded():
    """message/* must not be base64 (RFC 2046 §5.2), but some gateways encode it anyway."""
    head, _, rest = FOLDED_PROCESSED.partition(b"Content-Type: message/disposition-notification\r\n\r\n")
    fields, _, tail = rest.partition(b"\r\n--b1_0123--")
    encoded = base64.encodebytes(fields).replace(b"\n", b"\r\n")
    raw = (
        head + b"Content-Type: message/disposition-notification\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + encoded + b"--b1_0123--" + tail
    )
    assert parse_mdn(raw) == parse_mdn(FOLDED_PROCESSED)


def test_bare_notification_part_parses():
    """The message/disposition-notification entity alone, as a caller that already split the report has it."""
    raw = b"Content-Type: message/disposition-notification\r\n\r\n" + FOLDED_PROCESSED.split(
        b"Content-Type: message/disposition-notification\r\n\r\n"
    )[1].split(b"\r\n--b1_0123--")[0]
    assert is_mdn(raw)
    assert parse_mdn(raw) == Mdn(
        original_message_id=ORIGINAL_ID,
        disposition="processed",
        mode="automatic-action/MDN-sent-automatically",
        final_recipient=RECIPIENT,
        original_recipient=RECIPIENT,
        reporting_ua="direct.receiver.test; Example HISP Security Agent 6.1",
    )


def test_error_modifier_without_error_field_is_a_failure():
    raw = ERROR_MODIFIER.replace(b"Error: content could not be decrypted\r\n", b"")
    assert parse_mdn(raw).failure == "error"
    # RFC 2298's "warning" modifier still reports a processed message.
    assert parse_mdn(raw.replace(b"processed/error", b"processed/warning")).failure == ""


# -- not MDNs, and broken MDNs ---------------------------------------------------------------

PLAIN = b"From: a@b.test\r\nTo: c@d.test\r\nSubject: hi\r\n\r\nhello\r\n"
DSN = (
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=d\r\n\r\n"
    b"--d\r\nContent-Type: text/plain\r\n\r\nfailed\r\n"
    b"--d\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.test\r\n\r\n"
    b"Final-Recipient: rfc822; x@y.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--d--\r\n"
)
MIXED_WITH_FORWARDED_MDN = (
    b"Content-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
    b"--m\r\nContent-Type: message/rfc822\r\n\r\n" + FOLDED_PROCESSED + b"\r\n--m--\r\n"
)


@pytest.mark.parametrize("raw", [PLAIN, DSN, MIXED_WITH_FORWARDED_MDN, b"", b"\r\n\r\n"], ids=[
    "plain", "dsn", "forwarded-mdn-in-mixed", "empty", "blank"])
def test_not_an_mdn_is_none(raw):
    assert parse_mdn(raw) is None
    assert not is_mdn(raw)


def _strip_field(raw: bytes, name: bytes) -> bytes:
    return re.sub(rb"(?im)^" + name + rb":.*\r?\n", b"", raw)


@pytest.mark.parametrize(
    "raw",
    [
        _strip_field(SIGNED_FAILED, b"Disposition"),
        SIGNED_FAILED.replace(b"automatic-action/MDN-sent-automatically; failed", b"failed"),
        SIGNED_FAILED.replace(b"; failed\r\n", b"; \r\n"),
        SIGNED_FAILED.replace(b"automatic-action/MDN-sent-automatically; failed", b"automatic-action; failed"),
        _strip_field(SIGNED_FAILED, b"Original-Message-ID"),  # and no In-Reply-To to fall back on
        FOLDED_PROCESSED.replace(b"message/disposition-notification", b"text/plain"),
    ],
    ids=["no-disposition", "no-mode", "no-type", "half-mode", "no-original-id", "no-notification-part"],
)
def test_broken_mdn_raises_one_line_error_and_is_still_an_mdn(raw):
    with pytest.raises(MdnError) as info:
        parse_mdn(raw)
    assert "\n" not in str(info.value) and str(info.value)
    assert is_mdn(raw)  # routed to the tracker's audit, not to the referral pipeline


def _parse_or_none(raw: bytes) -> Mdn | None:
    try:
        return parse_mdn(raw)
    except MdnError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_garbage_bytes(raw):
    result = _parse_or_none(raw)  # any exception but MdnError fails the test
    assert result is None or isinstance(result, Mdn)
    assert isinstance(is_mdn(raw), bool)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([RI_DISPATCHED, FOLDED_PROCESSED, SIGNED_FAILED, ERROR_MODIFIER, build("dispatched")[1]]),
    st.integers(min_value=0, max_value=2000),
    st.integers(min_value=0, max_value=60),
    st.binary(max_size=40),
)
def test_fuzz_mutated_mdns(raw, at, cut, insert):
    """Near-MDNs (a slice cut out, junk spliced in) are parsed, refused with MdnError, or None."""
    at = at % (len(raw) + 1)
    mutated = raw[:at] + insert + raw[at + cut :]
    result = _parse_or_none(mutated)
    if result is not None:
        assert result.original_message_id.startswith("<") and result.original_message_id.endswith(">")
        assert result.disposition == result.disposition.lower() and result.disposition
    assert isinstance(is_mdn(mutated), bool)


def _flattened_fields(part) -> dict[str, str]:
    """The notification fields read from the part flattened back by the stdlib generator (the reference)."""
    import io
    from email.generator import BytesGenerator

    inner = part.get_payload()[0]
    buf = io.BytesIO()
    BytesGenerator(buf, mangle_from_=False, maxheaderlen=0).flatten(inner)
    raw = buf.getvalue()
    if str(part.get("Content-Transfer-Encoding", "")).strip().lower() == "base64":
        raw = base64.b64decode(b"".join(raw.split()), validate=False)
    fields: dict[str, str] = {}
    for line in re.sub(r"\r?\n(?=[ \t])", "", raw.decode("utf-8", errors="replace")).splitlines():
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if colon and name and " " not in name:
            fields.setdefault(name, " ".join(value.split()))
    return fields


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([RI_DISPATCHED, FOLDED_PROCESSED, SIGNED_FAILED, ERROR_MODIFIER, build("dispatched")[1]]),
    st.integers(min_value=0, max_value=2000),
    st.integers(min_value=0, max_value=20),
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"\r ", b" ", b"\t", b":", b"x", b"\r\n\r\n", b"\xc3\xa9",
                              b"\xff", b"\x0c", b"Content-Type: text/plain\r\n"]), max_size=4),
)
@example(FOLDED_PROCESSED, FOLDED_PROCESSED.index(b"\r\n  processed"), 2, [b"\r"])   # a fold after a bare CR
@example(FOLDED_PROCESSED, FOLDED_PROCESSED.index(b"\r\n  Example"), 1, [b"\x0c"])   # a form feed in a field
def test_notification_fields_are_read_as_the_generator_writes_them(raw, at, cut, insert):
    """The fields are read off the parsed part directly; that must give what flattening it gave."""
    from hl7referral.direct import mdn

    at = at % (len(raw) + 1)
    message = email.message_from_bytes(raw[:at] + b"".join(insert) + raw[at + cut:], policy=email.policy.compat32)
    parts = [p for p in message.walk() if p.get_content_type() == "message/disposition-notification"]
    if not parts or not parts[0].is_multipart() or not parts[0].get_payload():
        return
    try:
        expected = _flattened_fields(parts[0])
    except Exception:   # the generator refuses it (then so does parse_mdn, with an MdnError)
        with pytest.raises(MdnError):
            mdn._fields(parts[0])
        return
    assert mdn._fields(parts[0]) == expected


def test_an_8bit_field_is_read_as_utf8():
    raw = FOLDED_PROCESSED.replace(b"Example HISP", "Exemple de HISP d\u00e9j\u00e0".encode())
    assert parse_mdn(raw).reporting_ua == "direct.receiver.test; Exemple de HISP d\u00e9j\u00e0 Security Agent 6.1"


def test_parse_refuses_non_bytes():
    with pytest.raises(MdnError):
        parse_mdn("Content-Type: text/plain\r\n\r\n")  # type: ignore[arg-type]


# -- timely and reliable delivery requested? ---------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, False),
        (FINAL_DELIVERY_OPTION, True),
        ("x-direct-final-destination-delivery=OPTIONAL,TRUE", True),
        ("  X-DIRECT-FINAL-DESTINATION-DELIVERY = optional , true ", True),
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,\r\n true", True),  # folded
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY=required,true", True),
        ('X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,"true"', True),
        ("signed-receipt=optional,pkcs7-signature; X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true", True),
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,true (timely and reliable)", True),
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY=optional,false", False),
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY=true", False),  # no importance: not RFC 3798 syntax
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY", False),
        ("X-DIRECT-FINAL-DESTINATION-DELIVERY=mandatory,true", False),  # importance is required|optional
        ("X-DIRECT-OTHER-OPTION=optional,true", False),
        ("signed-receipt=optional,pkcs7-signature", False),
        ("", False),
    ],
)
def test_wants_final_delivery(value, expected):
    headers = {"From": SENDER} if value is None else {"From": SENDER, "disposition-notification-options": value}
    assert wants_final_delivery(headers) is expected
    raw = "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\nbody\r\n"
    assert wants_final_delivery(email.message_from_string(raw, policy=email.policy.compat32)) is expected


def test_wants_final_delivery_looks_at_every_header():
    raw = (
        "Disposition-Notification-Options: signed-receipt=optional,pkcs7-signature\r\n"
        f"Disposition-Notification-Options: {FINAL_DELIVERY_OPTION}\r\n\r\n"
    )
    assert wants_final_delivery(email.message_from_string(raw))


# -- the split parse (direct/multipart.py) reads every MDN as the stdlib's whole parse does ---------


def _read_with(parse, raw: bytes):
    """What the MDN reader makes of *raw* on the tree *parse* builds: an Mdn, None, or the error."""
    from hl7referral.direct import mdn as m

    try:
        top = parse(raw)
        report = m._find_report(top, 0)
        return None if report is None else m._read_report(top, report)
    except MdnError as exc:
        return ("MdnError", str(exc))


SAMPLES = [RI_DISPATCHED, FOLDED_PROCESSED, SIGNED_FAILED, ERROR_MODIFIER, build("dispatched")[1],
           build("processed")[1], build("failed", failure="no key")[1], PLAIN, DSN, MIXED_WITH_FORWARDED_MDN]

_DN = (b"Content-Type: message/disposition-notification\r\n\r\nReporting-UA: x\r\nOriginal-Message-ID: <a@b>\r\n"
       b"Disposition: automatic-action/MDN-sent-automatically; processed\r\n")
_REPORT = b"Content-Type: multipart/report; report-type=disposition-notification; %s\r\n\r\n"
# Found in review: where the stdlib reads delimiters otherwise than multipart does, the whole parse is taken.
EDGES = [
    _REPORT % b"boundary*=''a%0D%0Ab" + b"--a\r\nb\r\n" + _DN + b"--a\r\nb--\r\n",   # a line break in the boundary
    _REPORT % b'boundary="a\r\n b"' + b"--a b\r\n" + _DN + b"--a b--\r\n",              # a folded quoted boundary
    _REPORT % b"boundary=b" + b"--b\r\n--b--\r\n" + _DN,                         # a close delimiter right after one
    _REPORT % b"boundary=b" + b"--b\r\n--b\r\n" + _DN + b"--b--\r\n",                   # two delimiters in a row
]


@pytest.mark.parametrize("raw", SAMPLES + EDGES)
def test_split_parse_reads_as_the_whole_parse(raw):
    from hl7referral.direct import mdn as m

    assert _read_with(m._parse_message, raw) == _read_with(m._stdlib_parse, raw)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(SAMPLES[:7]),
    st.integers(min_value=0, max_value=2000),
    st.integers(min_value=0, max_value=60),
    st.sampled_from([b"", b"\r\n", b"\n", b"--", b"\r\n--", b" ", b"\r\n\r\n", b":", b"x"]) | st.binary(max_size=20),
)
@example(FOLDED_PROCESSED, FOLDED_PROCESSED.index(b"--b1_0123--"), 11, b"")         # no closing delimiter
@example(FOLDED_PROCESSED, FOLDED_PROCESSED.index(b"Content-Type"), 0, b"junk\r\n")  # a header line without a colon
@example(FOLDED_PROCESSED, FOLDED_PROCESSED.index(b"--b1_0123\r\n"), 0, b"--b1_0123x\r\n")  # a longer boundary
def test_split_parse_reads_mutated_mdns_as_the_whole_parse(raw, at, cut, insert):
    from hl7referral.direct import mdn as m

    at = at % (len(raw) + 1)
    mutated = raw[:at] + insert + raw[at + cut:]
    assert _read_with(m._parse_message, mutated) == _read_with(m._stdlib_parse, mutated)


def test_an_mdn_is_parsed_without_compiling_its_boundary(monkeypatch):
    """The point of the split: CPython < 3.13 compiles a regex per boundary (gh-106628)."""
    import email.feedparser

    from hl7referral.direct import mdn as m

    raw = build("processed")[1]
    boundary = re.search(rb'boundary="([^"]+)"', raw).group(1).decode()
    compiled = []
    real = re.compile
    monkeypatch.setattr(email.feedparser.re, "compile", lambda p, *a: compiled.append(p) or real(p, *a))
    assert parse_mdn(raw).disposition == "processed"
    assert not [p for p in compiled if re.escape(boundary) in p or boundary in p]
    m._stdlib_parse(raw)   # the oracle: the whole parse does compile it (else this test proves nothing)
    assert [p for p in compiled if re.escape(boundary) in p or boundary in p]
