"""Synthetic loop messages for tests: SIU, OSU, RRI, MDM^T02, ACK and C-CDA Consultation Notes.

Synthetic data only (no real patient, provider or organisation). OIDs are under ``2.999``, the
ISO/ITU-T arc reserved for examples, so they never collide with the engine's ``cda.local_root``.

Every builder is deterministic (same arguments, same bytes: what a retrying sender produces),
returns ``bytes`` with ``\\r`` between segments, and takes keyword arguments named after what
they mean rather than where they go::

    siu_s12(referral_id=REFERRAL_EI, appointment_id="A7^^2.999.1.32.14^ISO", start="20261120140000+0000")
    osu_accept(referral_id=REFERRAL_EI, control_id="OSU0042")
    mdm_t02(referral_id=REFERRAL_EI, document=consult_note_cda())

``referral_id`` is always the id *as the message carries it* (an EI such as ``REFERRAL_EI``);
the engine stores it as :data:`REFERRAL_ID` (``extension@root``, ``Processed.referral_id``).
Pass ``referral_id=""`` to leave it out. Time stamps are HL7 TS (``YYYYMMDDHHMMSS+ZZZZ``).
"""

from __future__ import annotations

import base64

# The referral: what the initiator's order carries (ORC-2 / SCH-26 / TXA-14) and what the engine stores.
REFERRAL_ROOT = "2.999.1.21.15"
REFERRAL_EXT = "R100234"
REFERRAL_EI = f"{REFERRAL_EXT}^^{REFERRAL_ROOT}^ISO"
REFERRAL_ID = f"{REFERRAL_EXT}@{REFERRAL_ROOT}"
# The specialist's own ids.
APPOINTMENT_EI = "A18467^^2.999.1.32.14^ISO"
APPOINTMENT_ID = "A18467@2.999.1.32.14"
FILLER_EI = "F5521^^2.999.1.32.15^ISO"
DOCUMENT_EI = "D0001^^2.999.1.32.20^ISO"
# Facilities identified by OID only, as 360X does (MSH-3/MSH-5 empty).
INITIATOR = "^2.999.1.21^ISO"
RECIPIENT = "^2.999.1.32^ISO"
PATIENT = "PID|1||T000001^^^&2.999.1.21.5&ISO^MRN||Testpatient^Alex^^^L||19700101|F"
PROVIDER = "1234PC^Testdoctor^Sam^^^MD^^^&2.999.1.21.10&ISO^L^^DN"
SENT = "20261102090000+0000"

_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(text: str) -> str:
    """*text* as an HL7 field value (delimiters escaped with the default encoding characters)."""
    for plain, escaped in _ESCAPES:
        text = text.replace(plain, escaped)
    return text


def segment(name: str, *fields: str) -> str:
    """``segment("ORC", "OK", REFERRAL_EI)`` -> ``"ORC|OK|R100234^^2.999.1.21.15^ISO"``."""
    return "|".join((name, *fields))


def message(*segments: str, separator: str = "\r") -> bytes:
    return (separator.join(s for s in segments if s) + separator).encode("utf-8")


def msh(message_type: str, *, control_id: str, sent: str = SENT, version: str = "2.5.1",
        sending_application: str = "", sending_facility: str = RECIPIENT, receiving_application: str = "",
        receiving_facility: str = INITIATOR, accept_ack: str = "NE", application_ack: str = "NE",
        profile: str = "360X", charset: str = "") -> str:
    """MSH as the 360X samples write it (NE/NE, MSH-21 360X, facilities by OID)."""
    return segment("MSH", "^~\\&", sending_application, sending_facility, receiving_application, receiving_facility,
                   sent, "", message_type, control_id, "P", version, "", "", accept_ack, application_ack, "", charset,
                   "", profile)


def _header(message_type: str, control_id: str, sent: str, kw: dict) -> str:
    return msh(message_type, control_id=control_id, sent=sent, **kw)


# -- SIU ------------------------------------------------------------------------------------

def siu(trigger: str = "S12", *, referral_id: str = REFERRAL_EI, appointment_id: str = APPOINTMENT_EI,
        placer_appointment_id: str = "", start: str = "20261120140000+0000", end: str = "20261120143000+0000",
        filler_status: str = "", start_in: str = "tq1", placer_order: str = "", control_id: str = "SIU0001",
        sent: str = SENT, **header) -> bytes:
    """An SIU^<trigger> notification (structure SIU_S12).

    ``start_in`` says where the start time goes: ``"tq1"`` (TQ1-7, v2.5+), ``"sch11"`` (SCH-11.4,
    the pre-2.5 TQ), ``"ais"`` (AIS-4 only) or ``""`` (nowhere). ``filler_status`` is SCH-25
    (table 0278: Booked, Complete, Cancelled, Noshow, ...). ``placer_order`` adds an ORC-2 after PID
    (some schedulers send the order there instead of SCH-26).
    """
    sch = [""] * 27
    sch[1] = placer_appointment_id
    sch[2] = appointment_id
    sch[6] = "57133-1^^LN"
    sch[11] = f"^^^{start}^{end}" if start_in == "sch11" else ""
    sch[16] = "^Name^Registrar"
    sch[20] = "^Name^Enterer"
    sch[25] = filler_status
    sch[26] = referral_id
    segments = [_header(f"SIU^{trigger}^SIU_S12", control_id, sent, header), segment("SCH", *sch[1:])]
    if start_in == "tq1":
        segments.append(segment("TQ1", "", "", "", "", "", "", start, end))
    segments.append(PATIENT)
    if placer_order:
        segments.append(segment("ORC", "SC", placer_order))
    segments.append("RGS|1|A")
    if start_in == "ais":
        segments.append(segment("AIS", "1", "A", "57133-1^Referral note^LN", start, "", "", "30", "min", "",
                                filler_status))
    return message(*segments)


def siu_s12(**kw) -> bytes:
    """New appointment booked."""
    return siu("S12", **kw)


def siu_s13(**kw) -> bytes:
    """Appointment rescheduled."""
    return siu("S13", **kw)


def siu_s14(**kw) -> bytes:
    """Appointment modified (``filler_status="Complete"`` for a completed visit)."""
    return siu("S14", **kw)


def siu_s15(**kw) -> bytes:
    """Appointment cancelled."""
    kw.setdefault("filler_status", "Cancelled")
    return siu("S15", **kw)


def siu_s17(**kw) -> bytes:
    """Appointment deleted."""
    kw.setdefault("filler_status", "Deleted")
    return siu("S17", **kw)


def siu_s26(**kw) -> bytes:
    """Patient did not show up (the 360X No-Show Notification)."""
    kw.setdefault("filler_status", "Noshow")
    return siu("S26", **kw)


def siu_completed(**kw) -> bytes:
    """SIU^S14 with SCH-25 = Complete: the visit happened."""
    kw.setdefault("filler_status", "Complete")
    return siu("S14", **kw)


# -- OSU^O51 -----------------------------------------------------------------------------------

def osu(orc1: str, orc5: str = "", *, referral_id: str = REFERRAL_EI, filler_id: str = "", reason: str = "",
        transaction_time: str = "", control_id: str = "OSU0001", sent: str = SENT, extra_orders: tuple = (),
        **header) -> bytes:
    """OSU^O51^OSU_O51 with one ORC (ORC-1 order control, ORC-2 referral id, ORC-3 filler id,
    ORC-5 order status, ORC-9 transaction time, ORC-16 reason text).

    ``extra_orders`` adds more ORC segments, each a ``(orc1, orc5, referral_id)`` triple.
    """
    def orc(c1: str, c5: str, placer: str) -> str:
        fields = [""] * 17
        fields[1], fields[2], fields[3], fields[5], fields[9] = c1, placer, filler_id, c5, transaction_time
        fields[12] = PROVIDER
        fields[16] = f"^{escape(reason)}" if reason else ""
        return segment("ORC", *fields[1:])
    return message(_header("OSU^O51^OSU_O51", control_id, sent, header), PATIENT, orc(orc1, orc5, referral_id),
                   *(orc(*extra) for extra in extra_orders))


def osu_accept(**kw) -> bytes:
    """Recipient accepts: ORC-1 OK, ORC-5 IP."""
    kw.setdefault("reason", "Accepted")
    return osu("OK", "IP", **kw)


def osu_decline(**kw) -> bytes:
    """Recipient declines: ORC-1 UA, ORC-5 CA."""
    kw.setdefault("reason", "Declined")
    return osu("UA", "CA", **kw)


def osu_cancel(**kw) -> bytes:
    """Initiator cancels (the 360X Referral Cancellation): ORC-1 CA, sent by the initiator."""
    kw.setdefault("reason", "Symptoms resolved")
    kw.setdefault("sending_facility", INITIATOR)
    kw.setdefault("receiving_facility", RECIPIENT)
    return osu("CA", "", **kw)


def osu_confirm_cancel(**kw) -> bytes:
    """Recipient confirms the cancel: ORC-1 CR, ORC-5 CA."""
    return osu("CR", "CA", **kw)


def osu_refuse_cancel(**kw) -> bytes:
    """Recipient cannot cancel: ORC-1 UC."""
    return osu("UC", "IP", **kw)


def osu_scheduled(**kw) -> bytes:
    """SNF extension's Confirmation Notification: ORC-1 SC, ORC-5 SC (no appointment id)."""
    return osu("SC", "SC", **kw)


def osu_interim(**kw) -> bytes:
    """Interim consultation: ORC-1 SC, ORC-5 A (some results available)."""
    return osu("SC", "A", **kw)


def osu_outcome(**kw) -> bytes:
    """Referral outcome: ORC-1 SC, ORC-5 CM (completed)."""
    return osu("SC", "CM", **kw)


# -- RRI^I12 -------------------------------------------------------------------------------

def rri(status: str = "A", *, referral_id: str = "REF4502^HOSP", external_id: str = "EXT77^SPEC",
        acknowledged_control_id: str = "REF0001", ack_code: str = "AA", trigger: str = "I12",
        control_id: str = "RRI0001", sent: str = SENT, **header) -> bytes:
    """RRI^<trigger>: MSA (``ack_code``, ``acknowledged_control_id`` = our REF's MSH-10), RF1-1 = ``status``
    (A accepted, R rejected, P pending, E expired), RF1-6 = ``referral_id``, RF1-11 = ``external_id``."""
    header.setdefault("profile", "")
    rf1 = [""] * 12
    rf1[1], rf1[2], rf1[3], rf1[6], rf1[11] = status, "R", "MED", referral_id, external_id
    return message(_header(f"RRI^{trigger}^RRI_I12", control_id, sent, header),
                   segment("MSA", ack_code, acknowledged_control_id), segment("RF1", *rf1[1:]),
                   "PRD|RT|Specialist^Pat^^^DR||^^^SPEC", PATIENT)


def rri_accepted(**kw) -> bytes:
    return rri("A", **kw)


def rri_rejected(**kw) -> bytes:
    return rri("R", **kw)


# -- MDM^T02 -------------------------------------------------------------------------------

def mdm_t02(*, referral_id: str = REFERRAL_EI, text: str | None = "Consultation: findings and plan.",
            document: bytes | None = None, media: tuple[str, str] = ("application", "xml"),
            encoding: str = "Base64", status: str = "AU", availability: str = "AV", document_id: str = DOCUMENT_EI,
            parent_document_id: str = "", document_type: str = "CN^Consultation note", filler_id: str = "",
            event_time: str = "", with_order: bool = False, trigger: str = "T02", control_id: str = "MDM0001",
            sent: str = SENT, **header) -> bytes:
    """MDM^<trigger>^MDM_T02 with TXA (TXA-12 ``document_id``, TXA-14 ``referral_id``, TXA-17 ``status``:
    AU authenticated / LA legally authenticated / IP in progress / PA pre-authenticated ...).

    With ``document`` the content is one OBX of type ED (``media`` = type ^ subtype, ``encoding``
    Base64 / A / Hex); otherwise each line of ``text`` is an OBX of type TX (``text=None``: no OBX).
    ``with_order`` adds ORC/OBR carrying the referral id too.
    """
    header.setdefault("profile", "")
    txa = [""] * 23
    txa[1], txa[2], txa[3], txa[4], txa[6] = "1", document_type, "TX", sent, sent
    txa[12], txa[13], txa[14], txa[15], txa[17], txa[19] = (document_id, parent_document_id, referral_id, filler_id,
                                                            status, availability)
    segments = [_header(f"MDM^{trigger}^MDM_T02", control_id, sent, header),
                segment("EVN", trigger, event_time or sent), PATIENT, "PV1|1|O"]
    if with_order:
        segments += [segment("ORC", "SC", referral_id, filler_id),
                     segment("OBR", "1", referral_id, filler_id, "11488-4^Consult note^LN")]
    segments.append(segment("TXA", *txa[1:]))
    if document is not None:
        if encoding.upper() == "BASE64":
            data = base64.b64encode(document).decode("ascii")
        elif encoding.upper() == "HEX":
            data = document.hex().upper()
        else:
            data = escape(document.decode("utf-8"))
        value = f"^{media[0]}^{media[1]}^{encoding}^{data}"
        segments.append(segment("OBX", "1", "ED", "11488-4^Consult note^LN", "", value, "", "", "", "", "", "F"))
    elif text is not None:
        for i, line in enumerate(text.split("\n"), 1):
            segments.append(segment("OBX", str(i), "TX", "11488-4^Consult note^LN", "", escape(line),
                                    "", "", "", "", "", "F"))
    return message(*segments)


def consult_note_cda(*, referral_root: str = REFERRAL_ROOT, referral_extension: str = REFERRAL_EXT,
                     title: str = "Consultation Note", effective_time: str = "20261121110000+0000",
                     document_root: str = "2.999.1.32.20", document_extension: str = "C0001", consult: bool = True,
                     doctype: str = "", extra_orders: tuple[tuple[str, str], ...] = (), title_xml: str = "") -> bytes:
    """A small C-CDA Consultation Note header with ``inFulfillmentOf/order/id`` = the referral.

    ``consult=False`` makes it a Progress Note (LOINC 11506-3). ``referral_root=""`` and
    ``referral_extension=""`` leave inFulfillmentOf out. ``doctype`` is inserted before the root
    element verbatim (for entity tests); ``title_xml`` replaces the escaped title (e.g. ``"&x;"``).
    Header only, not a schema-valid document: enough for correlation.
    """
    template, code, name = (("2.16.840.1.113883.10.20.22.1.4", "11488-4", "Consultation note") if consult else
                            ("2.16.840.1.113883.10.20.22.1.9", "11506-3", "Progress note"))
    title_text = title_xml or title.replace("&", "&amp;").replace("<", "&lt;")
    orders = [(referral_root, referral_extension)] if (referral_root or referral_extension) else []
    fulfil = "".join(
        f'<inFulfillmentOf typeCode="FLFS"><order classCode="ACT" moodCode="RQO">'
        f'<id{f" root={chr(34)}{root}{chr(34)}" if root else ""}'
        f'{f" extension={chr(34)}{ext}{chr(34)}" if ext else ""}/></order></inFulfillmentOf>'
        for root, ext in [*orders, *extra_orders])
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + (doctype + "\n" if doctype else "")
        + '<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        '<realmCode code="US"/><typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>'
        '<templateId root="2.16.840.1.113883.10.20.22.1.1" extension="2015-08-01"/>'
        f'<templateId root="{template}" extension="2015-08-01"/>'
        f'<id root="{document_root}" extension="{document_extension}"/>'
        f'<code code="{code}" codeSystem="2.16.840.1.113883.6.1" displayName="{name}"/>'
        f'<title>{title_text}</title><effectiveTime value="{effective_time}"/>'
        '<confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/>'
        '<recordTarget><patientRole><id root="2.999.1.21.5" extension="T000001"/></patientRole></recordTarget>'
        f"{fulfil}"
        "<component><structuredBody/></component></ClinicalDocument>\n"
    )
    return xml.encode("utf-8")


# -- ACK -------------------------------------------------------------------------------------

def ack(code: str = "AA", *, acknowledged_control_id: str = "MSG0001", text: str = "", error: str = "",
        trigger: str = "O19", control_id: str = "ACK0001", sent: str = SENT, **header) -> bytes:
    """ACK^<trigger>^ACK: MSA-1 ``code`` (AA/AE/AR/CA/CE/CR), MSA-2 ``acknowledged_control_id``,
    MSA-3 ``text``; ``error`` adds ERR (ERR-3 = ``error``, e.g. ``"207^Application internal error^HL70357"``)."""
    header.setdefault("profile", "")
    header.setdefault("accept_ack", "")
    header.setdefault("application_ack", "")
    segments = [_header(f"ACK^{trigger}^ACK", control_id, sent, header),
                segment("MSA", code, acknowledged_control_id, escape(text))]
    if error:
        segments.append(segment("ERR", "", "", error, "E"))
    return message(*segments)
