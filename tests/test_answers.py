"""360X answers (OSU^O51, SIU^S12/S15/S26): hl7apy STRICT, and read back by the referring engine's read_v2.

The round trip is the contract: whatever the specialist's EHR said, read by ``read_v2`` and
answered by ``answers_for``, must read on the referring side as the same kind, about the same
referral (its stored id first among the keys), with the same appointment and start.
"""

from __future__ import annotations

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hl7apy import load_reference
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import ValidationError
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

import loop_messages as lm
from hl7referral.loop.correlate import Observation, ei_key, read_v2
from hl7referral.loop.states import Event, Kind
from hl7referral.v2.answers import (
    ANSWERS, Answer, Osu, Patient, answers_for, build_osu_o51, build_siu, ei_from_key, hl7_from_iso,
)
from hl7referral.v2.header import read_header

REFERRAL_EI, REFERRAL_ID = lm.REFERRAL_EI, lm.REFERRAL_ID
APPOINTMENT_EI, APPOINTMENT_ID = lm.APPOINTMENT_EI, lm.APPOINTMENT_ID
NOW = "20261103100000+0000"
SPECIALIST = ("", lm.RECIPIENT)
REFERRER = ("", lm.INITIATOR)
# MR (table 0203), not the samples' MRN, so hl7apy's table check stays quiet about our own data.
PATIENT = Patient("T000001^^^&2.999.1.21.5&ISO^MR", "Testpatient^Alex^^^L")
HEADER = dict(now_hl7=NOW, sending=SPECIALIST, receiving=REFERRER)

OSU_KINDS = [k for k, rule in ANSWERS.items() if isinstance(rule, Osu)]


def _segment_ref(name: str, cardinality: tuple[int, int]):
    return name, load_reference(name, "Segment", "2.5.1"), cardinality, "SEG"


# OSU_O51 is in no hl7apy version (2.1 to 2.8.2; 360X pre-adopts it into 2.5.1): HL7 v2+'s structure
# MSH [{SFT}] [{NTE}] [PID] {ORDER_STATUS: ORC} built from hl7apy's own 2.5.1 segment definitions
# (ARV, UAC and PRT do not exist in 2.5.1).
OSU_O51 = ("sequence", (
    _segment_ref("MSH", (1, 1)), _segment_ref("SFT", (0, -1)), _segment_ref("NTE", (0, -1)),
    _segment_ref("PID", (0, 1)),
    ("OSU_O51_ORDER_STATUS", ("sequence", (_segment_ref("ORC", (1, 1)),)), (1, -1), "GRP"),
))
OSU_TABLE_WARNINGS = {  # MSH-9 of a pre-adopted structure is, by definition, not in 2.5.1's tables
    "Value OSU not in table HL70076 in element MSH_9.MSG_1",
    "Value O51 not in table HL70003 in element MSH_9.MSG_2",
    "Value OSU_O51 not in table HL70354 in element MSH_9.MSG_3",
}


def strict(raw: bytes, tmp_path) -> tuple[object, set[str]]:
    """hl7apy STRICT parse and validation; returns the message and the table/length warnings."""
    text = raw.decode("utf-8")
    osu = b"|OSU^O51^OSU_O51|" in raw
    m = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True,
                      message_profile={"OSU_O51": OSU_O51} if osu else None)
    report = tmp_path / "hl7apy-report.txt"
    assert Validator.validate(m, OSU_O51 if osu else None, report_file=str(report)) is True
    warnings = {line.removeprefix("Warning: ") for line in report.read_text().splitlines()}
    return m, warnings - (OSU_TABLE_WARNINGS if osu else set())


def parsed(raw: bytes) -> hl7.Message:
    return hl7.parse(raw.decode("utf-8"))


def field(msg: hl7.Message, segment: str, n: int) -> str:
    return str(msg.segment(segment)[n])


def observation(*events: Event, keys=(), message_type="test") -> Observation:
    return Observation(message_type, tuple(keys), tuple(events))


def answer(kind: Kind, **kw) -> Answer:
    event = Event(kind, "2026-11-03T08:30:00Z", appointment=APPOINTMENT_ID, starts="2026-11-20T14:00:00Z")
    args = dict(referral_ei=REFERRAL_EI, control_id_prefix="M42", patient=PATIENT, **HEADER) | kw
    (only,) = answers_for(observation(event), **args)
    return only


# -- every answer: valid, and read back as what it means -----------------------------------------


@pytest.mark.parametrize("kind", OSU_KINDS)
def test_osu_answers_read_back_as_their_kind(kind, tmp_path):
    a = answer(kind)
    rule = ANSWERS[kind]
    assert a.kind == kind and a.message_type == "OSU^O51^OSU_O51"
    assert a.control_id == f"M42-{rule.order_control}{rule.order_status}"
    m, warnings = strict(a.raw, tmp_path)
    assert warnings == set()          # ORC-1 in table 0119, ORC-5 in table 0038, lengths within 2.5.1
    assert [c.name for c in m.children] == ["MSH", "PID", "OSU_O51_ORDER_STATUS"]
    msg = parsed(a.raw)
    assert field(msg, "ORC", 1) == rule.order_control and field(msg, "ORC", 5) == rule.order_status
    assert field(msg, "ORC", 2) == REFERRAL_EI
    assert field(msg, "ORC", 9) == "20261103083000+0000"     # the event's own time, not the message's

    obs = read_v2(a.raw)
    assert obs.problems == () and obs.warnings == ()
    assert obs.keys[0] == ("referral", REFERRAL_ID)
    (event,) = obs.events
    assert event.kind == kind and event.at == "2026-11-03T08:30:00Z"


@pytest.mark.parametrize("kind,trigger,status", [
    (Kind.BOOKED, "S12", "Booked"), (Kind.APPOINTMENT_CANCELLED, "S15", "Cancelled"), (Kind.NO_SHOW, "S26", "Noshow"),
])
def test_siu_answers_read_back_with_appointment_and_start(kind, trigger, status, tmp_path):
    a = answer(kind)
    assert a.message_type == f"SIU^{trigger}^SIU_S12" and a.control_id == f"M42-{trigger}"
    m, warnings = strict(a.raw, tmp_path)
    assert warnings == set()          # RGS-2 in table 0206 (hl7apy checks tables on ID fields only)
    assert status in load_reference("HL70278", "Table", "2.5.1")[1]      # so SCH-25 (CE) here
    assert m.name == "SIU_S12"
    assert [c.name for c in m.children] == ["MSH", "SCH", "TQ1", "SIU_S12_PATIENT", "SIU_S12_RESOURCES"]
    msg = parsed(a.raw)
    assert field(msg, "SCH", 2) == APPOINTMENT_EI and field(msg, "SCH", 26) == REFERRAL_EI
    assert field(msg, "SCH", 6) == "57133-1^^LN" and field(msg, "SCH", 25) == status
    assert field(msg, "TQ1", 7) == "20261120140000+0000"

    obs = read_v2(a.raw)
    assert obs.problems == () and obs.warnings == ()
    assert obs.keys[0] == ("referral", REFERRAL_ID)
    assert ("appointment", APPOINTMENT_ID) in obs.keys
    (event,) = obs.events
    assert (event.kind, event.appointment, event.starts) == (kind, APPOINTMENT_ID, "2026-11-20T14:00:00Z")


def test_every_answer_is_360x_over_direct():
    for kind in ANSWERS:
        raw = answer(kind).raw
        header = read_header(raw)
        msg = parsed(raw)
        assert str(msg["MSH.F12"]) == "2.5.1" and str(msg["MSH.F21"]) == "360X"
        assert (str(msg["MSH.F15"]), str(msg["MSH.F16"])) == ("NE", "NE")   # Direct MDNs, never an HL7 ACK
        assert field(msg, "MSH", 4) == lm.RECIPIENT and field(msg, "MSH", 6) == lm.INITIATOR
        assert str(msg["MSH.F7"]) == NOW and header.control_id == answer(kind).control_id
        assert field(msg, "PID", 3) == PATIENT.ids and field(msg, "PID", 5) == PATIENT.name
        assert raw.endswith(b"\r") and b"\n" not in raw and header.charset == ""


@pytest.mark.parametrize("modes,enhanced", [(("", ""), False), (("AL", "NE"), True)])
def test_a_copy_for_mllp_can_ask_for_an_ack(modes, enhanced, tmp_path):
    """NE/NE is right over Direct only: an EHR on MLLP would never ACK it, and our sender would retry."""
    (a,) = answers_for(observation(Event(Kind.CANCEL_REQUESTED, "2026-11-03T08:30:00Z")), referral_ei=REFERRAL_EI,
                       control_id_prefix="F1", ack_modes=modes, **HEADER)
    header = read_header(a.raw)
    assert (header.accept_ack_type, header.application_ack_type) == modes
    assert header.enhanced_mode is enhanced
    strict(a.raw, tmp_path)
    assert [e.kind for e in read_v2(a.raw).events] == [Kind.CANCEL_REQUESTED]
    with pytest.raises(ValueError, match="ack_modes"):
        build_osu_o51(order_control="CA", referral_ei=REFERRAL_EI, control_id="C1", ack_modes=("YES", ""), **HEADER)


@pytest.mark.parametrize("kind", [Kind.SENT, Kind.DELIVERED, Kind.VISIT_DONE, Kind.NOTE_FILED, Kind.AUTH_REQUIRED,
                                  Kind.AUTH_APPROVED])
def test_kinds_without_a_360x_message_give_nothing(kind):
    assert answers_for(observation(Event(kind, "2026-11-03T08:30:00Z")), referral_ei=REFERRAL_EI,
                       control_id_prefix="M42", **HEADER) == []


def test_every_kind_is_either_answered_or_deliberately_not():
    silent = {Kind.SENT, Kind.DELIVERED, Kind.VISIT_DONE, Kind.NOTE_FILED, Kind.AUTH_REQUIRED, Kind.AUTH_APPROVED}
    assert set(ANSWERS) | silent == set(Kind) and not set(ANSWERS) & silent


# -- from the specialist EHR's own messages ------------------------------------------------------


@pytest.mark.parametrize("ehr_message,kind,orc", [
    (lm.rri_accepted(), Kind.ACCEPTED, ("OK", "IP")),
    (lm.rri_rejected(), Kind.DECLINED, ("UA", "CA")),
    (lm.osu_confirm_cancel(), Kind.CANCEL_CONFIRMED, ("CR", "CA")),
    (lm.osu_refuse_cancel(), Kind.CANCEL_REFUSED, ("UC", "IP")),
    (lm.mdm_t02(), Kind.CONSULT_NOTE, ("SC", "CM")),
    (lm.mdm_t02(status="IP"), Kind.INTERIM_NOTE, ("SC", "A")),
    (lm.osu_cancel(), Kind.CANCEL_REQUESTED, ("CA", "")),     # the referring EHR's cancel, to the specialist
])
def test_ehr_status_becomes_the_osu_the_referring_engine_reads_the_same(ehr_message, kind, orc, tmp_path):
    seen = read_v2(ehr_message)
    assert kind in [e.kind for e in seen.events]
    answers = answers_for(seen, referral_ei=REFERRAL_EI, control_id_prefix="IN7", patient=PATIENT, **HEADER)
    (a,) = answers                                   # an RRI's DELIVERED (MSA AA) gets no answer of its own
    assert a.kind == kind
    msg = parsed(a.raw)
    assert (field(msg, "ORC", 1), field(msg, "ORC", 5)) == orc
    strict(a.raw, tmp_path)
    back = read_v2(a.raw)
    assert [e.kind for e in back.events] == [kind]
    assert back.keys[0] == ("referral", REFERRAL_ID)
    assert back.events[0].at == next(e.at for e in seen.events if e.kind == kind)


def test_rri_reject_carries_the_callers_reason_or_declined():
    seen = read_v2(lm.rri_rejected())
    (a,) = answers_for(seen, referral_ei=REFERRAL_EI, control_id_prefix="IN7", **HEADER)
    assert field(parsed(a.raw), "ORC", 16) == "^Declined"
    (a,) = answers_for(seen, referral_ei=REFERRAL_EI, control_id_prefix="IN7", reason="Out of network", **HEADER)
    assert field(parsed(a.raw), "ORC", 16) == "^Out of network"


def test_the_specialists_own_order_id_from_rf1_11_becomes_orc_3():
    seen = read_v2(lm.rri_accepted(external_id="EXT77^^2.999.1.32.15^ISO"))
    (a,) = answers_for(seen, referral_ei=REFERRAL_EI, control_id_prefix="IN7", **HEADER)
    assert field(parsed(a.raw), "ORC", 3) == "EXT77^^2.999.1.32.15^ISO"
    assert ("filler", "EXT77@2.999.1.32.15") in read_v2(a.raw).keys
    (a,) = answers_for(seen, referral_ei=REFERRAL_EI, control_id_prefix="IN7", filler_ei="", **HEADER)
    assert field(parsed(a.raw), "ORC", 3) == ""


@pytest.mark.parametrize("ehr_message,kind,trigger", [
    (lm.siu_s12(), Kind.BOOKED, "S12"),
    (lm.siu_s13(start="20261125090000+0000"), Kind.BOOKED, "S12"),   # a reschedule: 360X has S12, not S13
    (lm.siu_s12(start_in="sch11"), Kind.BOOKED, "S12"),
    (lm.siu_s15(), Kind.APPOINTMENT_CANCELLED, "S15"),
    (lm.siu_s17(), Kind.APPOINTMENT_CANCELLED, "S15"),
    (lm.siu_s14(filler_status="Cancelled"), Kind.APPOINTMENT_CANCELLED, "S15"),
    (lm.siu_s26(), Kind.NO_SHOW, "S26"),
])
def test_ehr_scheduling_becomes_the_siu_the_referring_engine_reads_the_same(ehr_message, kind, trigger, tmp_path):
    seen = read_v2(ehr_message)
    (told,) = seen.events
    (a,) = answers_for(seen, referral_ei=REFERRAL_EI, control_id_prefix="IN8", patient=PATIENT,
                       provider="1234PC^Specialist^Sam^^^Dr", location="CARD^^^SPEC", **HEADER)
    assert a.message_type == f"SIU^{trigger}^SIU_S12"
    _, warnings = strict(a.raw, tmp_path)
    assert warnings == set()
    back = read_v2(a.raw)
    (event,) = back.events
    assert back.keys[0] == ("referral", REFERRAL_ID)
    assert (event.kind, event.appointment, event.starts) == (kind, told.appointment, told.starts)
    assert told.appointment == APPOINTMENT_ID and told.starts


def test_a_completed_visit_or_a_bare_ack_gets_no_answer():
    for ehr_message in (lm.siu_completed(), lm.ack()):
        seen = read_v2(ehr_message)
        assert seen.events
        assert answers_for(seen, referral_ei=REFERRAL_EI, control_id_prefix="IN9", **HEADER) == []


def test_answers_read_like_the_public_360x_samples(corpus):
    """Relaying the sample's own facts gives a message read_v2 reads exactly as it reads the sample."""
    for name in ("SIU_S26_360x_noshow_nhapi.hl7", "OSU_O51_360x_cancel_nhapi.hl7"):
        sample = (corpus / name).read_bytes()
        seen = read_v2(sample)
        msg = parsed(sample.replace(b"\r\n", b"\r").replace(b"\n", b"\r"))
        referral = field(msg, "SCH", 26) if name.startswith("SIU") else field(msg, "ORC", 2)
        reason = msg.unescape(str(msg.segment("ORC")[16][0][1])) if name.startswith("OSU") else ""
        provider = field(msg, "ORC", 12) if name.startswith("OSU") else ""
        (a,) = answers_for(seen, referral_ei=referral, control_id_prefix="S", reason=reason,
                           ordering_provider=provider, now_hl7=str(msg["MSH.F7"]),
                           sending=(str(msg["MSH.F3"]), field(msg, "MSH", 4)),
                           receiving=(str(msg["MSH.F5"]), field(msg, "MSH", 6)))
        back = read_v2(a.raw)
        assert back.keys == seen.keys, name
        assert [(e.kind, e.at, e.appointment, e.starts) for e in back.events] == \
            [(e.kind, e.at, e.appointment, e.starts) for e in seen.events], name
        if name.startswith("OSU"):   # the cancel's ORC is the sample's, plus ORC-9 (its own time, explicit)
            ours = parsed(a.raw).segment("ORC")
            assert [str(ours[n]) for n in (1, 2, 12, 16)] == [str(msg.segment("ORC")[n]) for n in (1, 2, 12, 16)]


# -- escaping and character set ------------------------------------------------------------------


def test_delimiters_in_a_reason_are_escaped_and_read_back():
    reason = "a|b^c~d\\e&f"
    a = answer(Kind.DECLINED, reason=reason)
    orc = [s for s in a.raw.split(b"\r") if s.startswith(b"ORC|")][0]
    assert orc.endswith(b"|^a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f")
    msg = parsed(a.raw)
    assert len(msg.segment("ORC")) == 17                        # no extra fields from the text
    assert msg.unescape(str(msg.segment("ORC")[16][0][1])) == reason
    assert [e.kind for e in read_v2(a.raw).events] == [Kind.DECLINED]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_any_reason_reads_back_and_never_breaks_the_message(reason):
    a = answer(Kind.DECLINED, reason=reason)
    assert b"\n" not in a.raw and b"\x0b" not in a.raw and b"\x1c" not in a.raw
    msg = parsed(a.raw)
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "ORC"]
    expected = " ".join(reason.replace("\r\n", " ").replace("\r", " ").replace("\n", " ").split("\t")).strip()
    assert msg.unescape(str(msg.segment("ORC")[16][0][1])) == (expected or "Declined")
    obs = read_v2(a.raw)
    assert [e.kind for e in obs.events] == [Kind.DECLINED] and obs.keys[0] == ("referral", REFERRAL_ID)


def test_a_reason_is_one_line():
    msg = parsed(answer(Kind.CANCEL_REQUESTED, reason="two\r\nlines\tand a tab").raw)
    assert field(msg, "ORC", 16) == "^two lines and a tab"


def test_er7_names_keep_their_escapes_and_raw_delimiters_are_refused(tmp_path):
    patient = Patient("T1^^^&2.999.1.21.5&ISO^MR~S9^^^&2.999.1.32.11&ISO^MR", "O\\T\\Brien^Pat\\F\\Lee")
    a = answer(Kind.BOOKED, patient=patient, provider="1234PC^D\\S\\Arcy^Sam")
    msg = parsed(a.raw)
    assert field(msg, "PID", 5) == "O\\T\\Brien^Pat\\F\\Lee"
    assert msg.unescape(str(msg.segment("PID")[5][0][0])) == "O&Brien"
    assert str(msg["PID.F3.R2.C1"]) == "S9"
    assert field(msg, "AIP", 3) == "1234PC^D\\S\\Arcy^Sam"
    strict(a.raw, tmp_path)
    for bad in (Patient("T1", "A|B"), Patient("T1\r", "A"), Patient("T1\x0b", "A")):
        with pytest.raises(ValueError, match="patient"):
            answer(Kind.ACCEPTED, patient=bad)


def test_non_ascii_reason_is_utf8_and_declared_in_msh_18(tmp_path):
    reason = "Überweisung abgelehnt: kein Termin für Zoë → 心臓"
    a = answer(Kind.DECLINED, reason=reason, patient=Patient("T1^^^&2.999.1.21.5&ISO^MR", "Müller^Zoë"))
    assert read_header(a.raw).charset == "UNICODE UTF-8"
    assert reason.encode("utf-8") in a.raw
    msg = parsed(a.raw)
    assert str(msg["MSH.F18"]) == "UNICODE UTF-8" and str(msg["MSH.F21"]) == "360X"
    assert msg.unescape(str(msg.segment("ORC")[16][0][1])) == reason
    strict(a.raw, tmp_path)
    back = read_v2(a.raw)                                     # default codec ascii: MSH-18 says otherwise
    assert back.warnings == () and [e.kind for e in back.events] == [Kind.DECLINED]


def test_ascii_answers_declare_no_charset():
    assert all(b"UNICODE" not in answer(kind).raw for kind in ANSWERS)


# -- determinism and control ids -----------------------------------------------------------------


def test_a_retry_rebuilds_identical_bytes():
    seen = read_v2(lm.siu_s12())
    args = dict(referral_ei=REFERRAL_EI, control_id_prefix="IN12", patient=PATIENT, **HEADER)
    assert answers_for(seen, **args) == answers_for(seen, **args)
    assert answers_for(seen, **args)[0].control_id == "IN12-S12"
    assert answers_for(seen, **(args | {"control_id_prefix": "IN13"}))[0].raw != answers_for(seen, **args)[0].raw


def test_two_answers_of_one_kind_get_distinct_control_ids():
    events = (Event(Kind.BOOKED, "2026-11-03T08:30:00Z", appointment="A1", starts="2026-11-20T14:00:00Z"),
              Event(Kind.BOOKED, "2026-11-03T08:30:00Z", appointment="A2", starts="2026-11-21T14:00:00Z"),
              Event(Kind.ACCEPTED, "2026-11-03T08:00:00Z"))
    answers = answers_for(observation(*events), referral_ei=REFERRAL_EI, control_id_prefix="P", **HEADER)
    assert [(a.kind, a.control_id) for a in answers] == [(Kind.BOOKED, "P-S12"), (Kind.BOOKED, "P-S12-2"),
                                                         (Kind.ACCEPTED, "P-OKIP")]
    assert [read_v2(a.raw).events[0].appointment for a in answers[:2]] == ["A1", "A2"]


def test_an_event_without_a_time_is_sent_at_now():
    (a,) = answers_for(observation(Event(Kind.ACCEPTED, "")), referral_ei=REFERRAL_EI, control_id_prefix="P",
                       **HEADER)
    assert field(parsed(a.raw), "ORC", 9) == NOW


# -- builders alone ----------------------------------------------------------------------------


def test_osu_without_patient_has_no_pid_and_is_still_valid(tmp_path):
    raw = build_osu_o51(order_control="OK", order_status="IP", referral_ei=REFERRAL_EI, control_id="C1", **HEADER)
    assert [s[:3] for s in raw.split(b"\r") if s] == [b"MSH", b"ORC"]
    strict(raw, tmp_path)


def test_the_osu_structure_check_is_not_a_formality(tmp_path):
    """The OSU_O51 structure used above refuses an OSU without its ORC (ORDER_STATUS is required)."""
    raw = build_osu_o51(order_control="OK", order_status="IP", referral_ei=REFERRAL_EI, control_id="C1", **HEADER)
    without_orc = b"".join(s + b"\r" for s in raw.split(b"\r") if s and not s.startswith(b"ORC"))
    with pytest.raises(ValidationError, match="ORDER_STATUS"):
        strict(without_orc, tmp_path)


def test_siu_without_patient_or_times_is_still_valid(tmp_path):
    raw = build_siu("S15", referral_ei=REFERRAL_EI, appointment_ei=APPOINTMENT_EI, control_id="C1", **HEADER)
    assert [s[:3] for s in raw.split(b"\r") if s] == [b"MSH", b"SCH", b"RGS"]
    assert b"RGS|1|D" in raw
    strict(raw, tmp_path)
    (event,) = read_v2(raw).events
    assert event.kind == Kind.APPOINTMENT_CANCELLED and event.starts == ""


def test_siu_resources_come_in_the_order_siu_s12_defines(tmp_path):
    raw = build_siu("S12", referral_ei=REFERRAL_EI, appointment_ei=APPOINTMENT_EI, placer_appointment_ei="P1",
                    start="20261120140000+0000", end="20261120143000+0000", service="57133-1^Referral note^LN",
                    location="CARD^101^1^SPEC", provider="1234PC^Specialist^Sam", event_reason="R1^Referral^L",
                    control_id="C1", **HEADER)
    assert [s[:3] for s in raw.split(b"\r") if s] == [b"MSH", b"SCH", b"TQ1", b"RGS", b"AIS", b"AIL", b"AIP"]
    m, warnings = strict(raw, tmp_path)
    (resources,) = [c for c in m.children if c.name == "SIU_S12_RESOURCES"]
    assert [c.name for c in resources.children] == ["RGS", "SIU_S12_SERVICE", "SIU_S12_LOCATION_RESOURCE",
                                                    "SIU_S12_PERSONNEL_RESOURCE"]
    msg = parsed(raw)
    assert field(msg, "SCH", 1) == "P1" and field(msg, "SCH", 6) == "R1^Referral^L"
    assert field(msg, "TQ1", 8) == "20261120143000+0000"
    assert str(msg["AIS.F4"]) == str(msg["AIL.F6"]) == str(msg["AIP.F6"]) == "20261120140000+0000"
    obs = read_v2(raw)
    assert ("placer-appointment", "P1") in obs.keys


def test_hl7apy_refuses_an_siu_without_its_required_contacts(tmp_path):
    """SCH-16 and SCH-20 are required in 2.5.1: the defaults exist so the message is valid."""
    raw = build_siu("S12", referral_ei=REFERRAL_EI, appointment_ei=APPOINTMENT_EI, filler_contact="", entered_by="",
                    control_id="C1", **HEADER)
    with pytest.raises(ValidationError, match="SCH_16"):
        strict(raw, tmp_path)


def test_filler_status_can_be_overridden_or_left_out():
    raw = build_siu("S26", referral_ei=REFERRAL_EI, appointment_ei=APPOINTMENT_EI, filler_status="", control_id="C1",
                    **HEADER)
    assert field(parsed(raw), "SCH", 25) == ""                   # as in the 360X no-show sample
    assert read_v2(raw).events[0].kind == Kind.NO_SHOW            # the trigger says it


@pytest.mark.parametrize("kw,match", [
    ({"order_control": "OKK"}, "order_control"), ({"order_control": "ok"}, "order_control"),
    ({"order_control": ""}, "order_control"), ({"order_status": "I^P"}, "order_status"),
    ({"referral_ei": ""}, "referral_ei"), ({"referral_ei": "R1~R2"}, "referral_ei"),
    ({"referral_ei": "R1|2"}, "referral_ei"), ({"filler_ei": "F\r1"}, "filler_ei"),
    ({"transaction_time": "yesterday"}, "transaction_time"), ({"control_id": ""}, "control_id"),
    ({"control_id": "A^B"}, "control_id"), ({"control_id": "A|B"}, "control_id"), ({"now_hl7": "now"}, "now_hl7"),
    ({"sending": ("A|B", "F")}, "sending"), ({"receiving": ("R", "F\r")}, "receiving"),
    ({"ordering_provider": "X|Y"}, "ordering_provider"),
])
def test_osu_inputs_that_would_break_the_message_are_refused(kw, match):
    args = dict(order_control="OK", order_status="IP", referral_ei=REFERRAL_EI, control_id="C1", **HEADER) | kw
    with pytest.raises(ValueError, match=match):
        build_osu_o51(**args)


@pytest.mark.parametrize("kw,match", [
    ({"trigger": "S13"}, "trigger"), ({"trigger": "s12"}, "trigger"), ({"start": "2026-11-20"}, "start"),
    ({"end": "x"}, "end"), ({"appointment_ei": "A~B"}, "appointment_ei"), ({"event_reason": ""}, "event_reason"),
    ({"location": "L|1"}, "location"), ({"provider": "P\x1c"}, "provider"), ({"service": "S\r"}, "service"),
    ({"filler_status": "Booked|x"}, "filler_status"), ({"referral_ei": ""}, "referral_ei"),
])
def test_siu_inputs_that_would_break_the_message_are_refused(kw, match):
    args = dict(trigger="S12", referral_ei=REFERRAL_EI, appointment_ei=APPOINTMENT_EI, control_id="C1", **HEADER) | kw
    trigger = args.pop("trigger")
    with pytest.raises(ValueError, match=match):
        build_siu(trigger, **args)


# -- value conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize("ei", [REFERRAL_EI, APPOINTMENT_EI, "889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO", "A1"])
def test_ei_from_key_inverts_ei_key(ei):
    assert ei_from_key(ei_key(ei)) == ei


def test_ei_from_key_keeps_what_is_not_an_oid_rooted_key():
    assert ei_from_key("") == "" and ei_from_key("someone@example.org") == "someone@example.org"


@pytest.mark.parametrize("iso,hl7_time", [
    ("2026-11-20T14:00:00Z", "20261120140000+0000"),
    ("2026-11-20T15:00:00+01:00", "20261120140000+0000"),
    ("2026-11-20T14:00:00", "20261120140000+0000"),     # no offset: UTC, as the loop's times are
    ("", ""),
])
def test_hl7_from_iso(iso, hl7_time):
    assert hl7_from_iso(iso) == hl7_time


def test_hl7_from_iso_refuses_what_is_not_a_time():
    with pytest.raises(ValueError, match="ISO-8601"):
        hl7_from_iso("yesterday")
