"""Inbound loop messages: what each says (events) and which referral it is about (keys)."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loop_messages as lm
from hl7referral.cda.mapping import Mapping
from hl7referral.cda.model import Identifier
from hl7referral.cda.pipeline import referral_key
from hl7referral.cda.referral_note import ii_attrs
from hl7referral.direct.mdn import Mdn
from hl7referral.loop.correlate import (
    DEFAULT_LOCAL_ROOT, DEFAULT_OSU, Note, Observation, OsuTable, ei_key, hl7_time, ii_key, mdn_event, read_consult_cda,
    load_tables, read_mdn, read_package, read_v2, referral_keys, table_for,
)
from hl7referral.loop.states import Kind, observe_all

ROOT = Path(__file__).resolve().parent.parent
THE_360X_REFERRAL = "889342@1.3.6.1.4.1.21367.2016.10.1.21.15"


def kinds(obs: Observation) -> list[Kind]:
    return [e.kind for e in obs.events]


def no_internal_error(obs: Observation) -> bool:
    return not any("internal error" in p for p in obs.problems)


# -- the public corpus ----------------------------------------------------------------------------

# file -> (message type, event kinds, a key it must carry, problems expected?)
CORPUS = {
    "OSU_O51_360x_cancel_nhapi.hl7": ("OSU^O51", [Kind.CANCEL_REQUESTED], ("referral", THE_360X_REFERRAL), False),
    "SIU_S26_360x_noshow_nhapi.hl7": ("SIU^S26", [Kind.NO_SHOW], ("referral", THE_360X_REFERRAL), False),
    "SIU_S12_msfhirconv_01.hl7": ("SIU^S12", [Kind.BOOKED], ("appointment", "36996"), False),
    "SIU_S13_msfhirconv_01.hl7": ("SIU^S13", [Kind.BOOKED], ("appointment", "36996"), False),
    "SIU_S14_msfhirconv_01.hl7": ("SIU^S14", [Kind.BOOKED], ("appointment", "36996"), False),
    "SIU_S14_hapi_NewPipeParserTest_v23.hl7": ("SIU^S14", [Kind.BOOKED], ("appointment", "569576"), False),
    "SIU_S15_msfhirconv_01.hl7": ("SIU^S15", [Kind.APPOINTMENT_CANCELLED], ("appointment", "36996"), False),
    "SIU_S26_msfhirconv_01.hl7": ("SIU^S26", [Kind.NO_SHOW], ("placer-appointment", "12345"), False),
    "RRI_I11_v2plus_ch11_immediate_response.hl7": ("RRI^I11", [Kind.DELIVERED, Kind.ACCEPTED],
                                                   ("control", "TUMM7900"), False),
    "RRI_I11_v2plus_ch11_deferred_response.hl7": ("RRI^I11", [Kind.DELIVERED, Kind.ACCEPTED],
                                                  ("referral", "REF4502"), False),
    "ACK_hapi_messages_txt_v21.hl7": ("ACK", [Kind.DELIVERED], ("control", "msgCtrlId"), False),
    # an authenticated note whose ED payload is empty: never a silently "closed" loop
    "MDM_T02_msfhirconv_01.hl7": ("MDM^T02", [], ("referral", "00012345"), True),
    # new referrals are the pipeline's, not the loop's: read, named, and parked with the reason
    "OMG_O19_360x_referral_request_nhapi.hl7": ("OMG^O19", [], ("referral", THE_360X_REFERRAL), True),
    "REF_I12_msfhirconv_01.hl7": ("REF^I12", [], ("referral", "226839"), True),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_relevant_public_sample_reads_back_its_kind_and_key(corpus, name):
    message_type, expected, key, problems = CORPUS[name]
    obs = read_v2((corpus / name).read_bytes())
    assert obs.message_type == message_type
    assert kinds(obs) == expected
    assert key in obs.keys
    assert bool(obs.problems) == problems, obs.problems


def test_every_public_sample_is_read_without_error(corpus):
    for path in corpus.glob("*.hl7"):
        obs = read_v2(path.read_bytes())
        assert no_internal_error(obs), (path.name, obs.problems)
        assert obs.events or obs.problems or obs.warnings, path.name   # never silently nothing


def test_the_360x_no_show_sample(corpus):
    obs = read_v2((corpus / "SIU_S26_360x_noshow_nhapi.hl7").read_bytes())
    (event,) = obs.events
    assert obs.keys == (("referral", THE_360X_REFERRAL), ("appointment", "18467@1.3.6.1.4.1.21367.2016.10.1.32.14"),
                        ("placer", "889342"))
    assert event.appointment == "18467@1.3.6.1.4.1.21367.2016.10.1.32.14"
    assert event.starts == "2016-10-09T14:00:00Z"            # TQ1-7
    assert event.at == "2016-10-10T17:28:13Z"                # MSH-7, +0000
    assert event.source == "SIU^S26 MSH-10=25882"
    assert obs.warnings == ()


def test_the_360x_cancel_sample_is_the_initiators_cancel_request(corpus):
    obs = read_v2((corpus / "OSU_O51_360x_cancel_nhapi.hl7").read_bytes())
    (event,) = obs.events
    assert event.kind == Kind.CANCEL_REQUESTED and event.at == "2016-10-07T09:28:57Z"
    assert obs.referral_ids == [THE_360X_REFERRAL]


def test_the_stored_referral_id_is_what_the_osu_and_siu_name(corpus):
    """Exact, not fuzzy: the pipeline's referral id for the 360X OMG is the OSU's and the SIU's key."""
    mapping = Mapping.load(ROOT / "mappings" / "omg-o19.toml")
    referral = mapping.map_bytes((corpus / "OMG_O19_360x_referral_request_nhapi.hl7").read_bytes()).referral
    stored = referral_key(referral.referral_id)
    assert stored == THE_360X_REFERRAL
    for name in ("OSU_O51_360x_cancel_nhapi.hl7", "SIU_S26_360x_noshow_nhapi.hl7"):
        obs = read_v2((corpus / name).read_bytes())
        assert obs.keys[0] == ("referral", referral_keys(stored)[0])
        assert ("placer", referral_keys(stored)[1]) in obs.keys


def test_sample_times_with_offsets_are_converted_to_utc(corpus):
    obs = read_v2((corpus / "SIU_S12_msfhirconv_01.hl7").read_bytes())
    (event,) = obs.events
    assert event.at == "2021-09-14T09:05:00Z"        # MSH-7 202109141120+0215
    assert event.starts == "2021-09-24T07:15:00Z"    # TQ1-7 20210924093000+0215 (not SCH-11's stale 2020 date)


def test_a_v23_siu_without_tq1_takes_the_start_from_sch11(corpus):
    (event,) = read_v2((corpus / "SIU_S14_hapi_NewPipeParserTest_v23.hl7").read_bytes()).events
    assert event.starts == "2010-04-07T16:10:00Z"


def test_the_official_consultation_note_examples(standards):
    for path in (standards / "examples/C-CDA-Examples/Consultation_Note.xml",
                 standards / "examples/CDA-ccda/consultation-note-complete-example.xml"):
        if not path.exists():
            pytest.skip(f"{path} not found")
        obs = read_consult_cda(path.read_bytes())
        assert obs.message_type == "C-CDA consult note"
        assert obs.keys == (("referral", "1298989898@2.16.840.1.113883.6.96"), ("placer", "1298989898"))
        (event,) = obs.events
        assert event.kind == Kind.CONSULT_NOTE and event.at == "2013-08-01T13:00:00Z"   # 201308010500-0800
        assert obs.note.format == "cda" and obs.note.title == "Community Health Consult Note"
        assert obs.note.unique_id == "TT988@2.16.840.1.113883.19.5.99999.1"
        assert obs.problems == ()


def test_the_official_progress_note_with_infulfillmentof_is_an_interim_note(standards):
    path = standards / "examples/C-CDA-Examples/Progress_Note.xml"
    if not path.exists():
        pytest.skip(f"{path} not found")
    obs = read_consult_cda(path.read_bytes())
    assert kinds(obs) == [Kind.INTERIM_NOTE]
    # root 2.16.840.1.113883.19 is the engine's default local_root: its ids are stored bare
    assert obs.keys == (("referral", "12345-67890"),)
    assert kinds(read_consult_cda(path.read_bytes(), kind=Kind.CONSULT_NOTE)) == [Kind.CONSULT_NOTE]


# -- referral keys ----------------------------------------------------------------------------------

def test_referral_keys_are_the_stored_id_then_its_bare_extension():
    assert referral_keys(lm.REFERRAL_ID) == (lm.REFERRAL_ID, lm.REFERRAL_EXT)
    assert referral_keys("REF4502") == ("REF4502",)
    assert referral_keys("a@b.example") == ("a@b.example",)       # not an OID after the @
    assert referral_keys("  ") == ()


def test_ei_key_agrees_with_the_pipeline():
    assert ei_key(lm.REFERRAL_EI) == lm.REFERRAL_ID
    assert ei_key("REF4502^HOSP") == "REF4502"                      # namespace only: stored bare
    assert ei_key("REF4502^^HOSPITAL^L") == "REF4502"               # not an ISO OID
    assert ei_key("^^2.999.1^ISO") == ""                            # no entity id
    assert ei_key("") == ""


def test_a_returning_note_that_echoes_our_referral_act_id_finds_the_stored_id():
    """Namespace-only ids get a root under local_root in the Referral Note; the echo maps back to the bare id."""
    for ident in (Identifier(extension="REF4502", authority="HOSP"), Identifier(extension="REF4502"),
                  Identifier(root=lm.REFERRAL_ROOT, extension=lm.REFERRAL_EXT)):
        attrs = ii_attrs(ident, DEFAULT_LOCAL_ROOT)
        xml = lm.consult_note_cda(referral_root=attrs["root"], referral_extension=attrs["extension"])
        assert read_consult_cda(xml).referral_ids == [referral_key(ident)]
    assert ii_key("2.999.9", "X", local_root="2.999") == "X"
    assert ii_key("2.9991", "X", local_root="2.999") == "X@2.9991"   # not under it: only a common prefix
    assert ii_key("2.999.1", "") == "2.999.1"


# -- SIU ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, kind", [
    (lm.siu_s12, Kind.BOOKED), (lm.siu_s13, Kind.BOOKED), (lm.siu_s14, Kind.BOOKED),
    (lm.siu_s15, Kind.APPOINTMENT_CANCELLED), (lm.siu_s17, Kind.APPOINTMENT_CANCELLED),
    (lm.siu_s26, Kind.NO_SHOW), (lm.siu_completed, Kind.VISIT_DONE),
])
def test_siu_triggers(build, kind):
    obs = read_v2(build(start="20261120090000-0500", sent="20261104080000-0500", control_id="S1"))
    (event,) = obs.events
    assert event.kind == kind
    assert event.appointment == lm.APPOINTMENT_ID
    assert event.starts == "2026-11-20T14:00:00Z"
    assert event.at == "2026-11-04T13:00:00Z"
    assert obs.keys[0] == ("referral", lm.REFERRAL_ID)
    assert ("appointment", lm.APPOINTMENT_ID) in obs.keys and ("placer", lm.REFERRAL_EXT) in obs.keys
    assert obs.problems == () and obs.warnings == ()


@pytest.mark.parametrize("status, kind", [
    ("Complete", Kind.VISIT_DONE), ("COMPLETED", Kind.VISIT_DONE), ("Checked Out", Kind.VISIT_DONE),
    ("Arrived", Kind.VISIT_DONE), ("Started", Kind.VISIT_DONE), ("Cancelled", Kind.APPOINTMENT_CANCELLED),
    ("Deleted", Kind.APPOINTMENT_CANCELLED), ("Noshow", Kind.NO_SHOW), ("No Show", Kind.NO_SHOW),
    ("Booked", Kind.BOOKED), ("Pending", Kind.BOOKED), ("Overbook", Kind.BOOKED),
])
def test_the_filler_status_of_an_s12_to_s14_says_what_happened(status, kind):
    assert kinds(read_v2(lm.siu_s14(filler_status=status))) == [kind]


def test_the_filler_status_falls_back_to_the_service_resource():
    assert kinds(read_v2(lm.siu_s14(filler_status="Complete", start_in="ais").replace(
        b"|Complete|2.999", b"||2.999"))) == [Kind.VISIT_DONE]


def test_a_cancel_trigger_is_not_overridden_by_a_stale_status():
    assert kinds(read_v2(lm.siu_s15(filler_status="Booked"))) == [Kind.APPOINTMENT_CANCELLED]
    assert kinds(read_v2(lm.siu_s26(filler_status="Booked"))) == [Kind.NO_SHOW]


@pytest.mark.parametrize("start_in, starts", [("tq1", "2026-11-20T14:00:00Z"), ("sch11", "2026-11-20T14:00:00Z"),
                                              ("ais", "2026-11-20T14:00:00Z"), ("", "")])
def test_the_start_comes_from_tq1_sch11_or_the_resources(start_in, starts):
    (event,) = read_v2(lm.siu_s12(start_in=start_in, start="20261120140000+0000")).events
    assert event.starts == starts


def test_an_siu_without_sch26_correlates_through_orc2_or_its_appointment_ids():
    obs = read_v2(lm.siu_s12(referral_id="", placer_order=lm.REFERRAL_EI))
    assert obs.referral_ids == [lm.REFERRAL_ID] and obs.problems == ()
    obs = read_v2(lm.siu_s15(referral_id="", placer_appointment_id="P77"))
    assert obs.referral_ids == [] and obs.problems == ()
    assert obs.keys == (("appointment", lm.APPOINTMENT_ID), ("placer-appointment", "P77"))
    assert any("no referral id" in w for w in obs.warnings)


def test_an_siu_naming_nothing_is_a_problem():
    obs = read_v2(lm.siu_s12(referral_id="", appointment_id=""))
    assert obs.keys == () and obs.problems
    assert "no referral id" in obs.problems[-1]


def test_an_siu_whose_sch26_and_orc2_disagree_is_a_problem():
    obs = read_v2(lm.siu_s12(placer_order="OTHER^^2.999.1.21.15^ISO"))
    assert any("more than one referral" in p for p in obs.problems)
    assert kinds(obs) == [Kind.BOOKED]           # what it says is clear; which referral is not


def test_resource_triggers_say_nothing_about_the_appointment():
    obs = read_v2(lm.siu("S20"))
    assert obs.events == () and obs.problems == () and obs.warnings


# -- times ---------------------------------------------------------------------------------------------

def test_hl7_times():
    assert hl7_time("20161007092857+0000") == ("2016-10-07T09:28:57Z", "")
    assert hl7_time("202109141120+0215") == ("2021-09-14T09:05:00Z", "")
    assert hl7_time("20261120090000.1234-0500") == ("2026-11-20T14:00:00Z", "")
    assert hl7_time("20261120090000")[0] == "2026-11-20T09:00:00Z"
    assert "taken as UTC" in hl7_time("20261120090000")[1]
    assert hl7_time("20261120090000", zone="America/New_York")[0] == "2026-11-20T14:00:00Z"
    assert hl7_time("20260705090000", zone="America/New_York")[0] == "2026-07-05T13:00:00Z"   # summer time
    assert hl7_time("20261120")[0] == "2026-11-20T00:00:00Z" and "date only" in hl7_time("20261120")[1]
    for bad in ("2026132000", "20261120250000", "x", "20261120+9999", "00000101"):
        assert hl7_time(bad)[0] == "", bad
    assert hl7_time("") == ("", "")


def test_naive_message_times_follow_the_zone_and_are_noted():
    raw = lm.osu_accept(sent="20261104080000")
    (event,) = read_v2(raw).events
    assert event.at == "2026-11-04T08:00:00Z"
    assert any("no UTC offset" in w for w in read_v2(raw).warnings)
    (event,) = read_v2(raw, zone="Europe/Berlin").events
    assert event.at == "2026-11-04T07:00:00Z"


def test_without_a_message_time_the_receipt_time_stands_in_else_it_is_a_problem():
    raw = lm.osu_accept(sent="")
    obs = read_v2(raw, received="2026-11-04T08:00:00Z")
    assert obs.events[0].at == "2026-11-04T08:00:00Z" and obs.problems == ()
    obs = read_v2(raw)
    assert obs.events[0].at == "" and any("no event time" in p for p in obs.problems)


# -- OSU^O51 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, kind", [
    (lm.osu_accept, Kind.ACCEPTED), (lm.osu_decline, Kind.DECLINED), (lm.osu_cancel, Kind.CANCEL_REQUESTED),
    (lm.osu_confirm_cancel, Kind.CANCEL_CONFIRMED), (lm.osu_refuse_cancel, Kind.CANCEL_REFUSED),
    (lm.osu_scheduled, Kind.ACCEPTED), (lm.osu_interim, Kind.INTERIM_NOTE), (lm.osu_outcome, Kind.CONSULT_NOTE),
])
def test_osu_default_table(build, kind):
    obs = read_v2(build(control_id="OSU9"))
    assert kinds(obs) == [kind]
    assert obs.keys == (("referral", lm.REFERRAL_ID), ("placer", lm.REFERRAL_EXT))
    assert obs.events[0].source.startswith("OSU^O51 MSH-10=OSU9 ")
    assert obs.problems == ()


@pytest.mark.parametrize("pair, kind", [
    (("OK", "IP"), Kind.ACCEPTED), (("OK", ""), Kind.ACCEPTED), (("UA", "CA"), Kind.DECLINED),
    (("CA", "CA"), Kind.CANCEL_REQUESTED), (("CR", ""), Kind.CANCEL_CONFIRMED), (("OC", "CA"), Kind.CANCEL_CONFIRMED),
    (("DC", "CA"), Kind.CANCEL_CONFIRMED), (("SC", "CA"), Kind.CANCEL_CONFIRMED), (("UC", ""), Kind.CANCEL_REFUSED),
    (("SC", "SC"), Kind.ACCEPTED), (("SC", "A"), Kind.INTERIM_NOTE), (("SC", "CM"), Kind.CONSULT_NOTE),
    (("ok", "ip"), Kind.ACCEPTED),
])
def test_default_decoding_of_orc1_orc5(pair, kind):
    assert DEFAULT_OSU.decode(*pair) == (True, kind)


def test_an_unknown_pair_is_parked_with_the_reason_and_no_event():
    obs = read_v2(lm.osu("SC", "HD"))
    assert obs.events == ()
    assert obs.problems == ("OSU^O51: ORC ORC-1=SC ORC-5=HD is not in the OSU decoding table (default)",)
    assert obs.keys[0] == ("referral", lm.REFERRAL_ID)     # so the work queue can show the referral


def test_the_transaction_time_orc9_is_the_event_time():
    (event,) = read_v2(lm.osu_accept(transaction_time="20261103120000+0100")).events
    assert event.at == "2026-11-03T11:00:00Z"


def test_filler_order_number_is_a_weaker_key():
    obs = read_v2(lm.osu_accept(filler_id=lm.FILLER_EI))
    assert obs.keys == (("referral", lm.REFERRAL_ID), ("filler", "F5521@2.999.1.32.15"), ("placer", lm.REFERRAL_EXT))


def test_an_osu_about_two_referrals_is_a_problem():
    obs = read_v2(lm.osu_accept(extra_orders=(("OK", "IP", "R999^^2.999.1.21.15^ISO"),)))
    assert any("more than one referral" in p for p in obs.problems)


PARTNER = {
    "partner": "SPECIALIST_APP^2.999.1.32",
    "decode": [{"orc1": "OC", "orc5": "CA", "event": "DECLINED"},     # this partner declines with OC/CA
               {"orc1": "SC", "orc5": "HD", "event": "NONE"},         # on hold: no state change
               {"orc1": "SC", "event": "ACCEPTED"}],                  # any other SC/*: accepted
}


def test_a_partner_table_overrides_the_default():
    table = OsuTable.from_config(PARTNER)
    assert (table.application, table.facility) == ("SPECIALIST_APP", "2.999.1.32")
    assert DEFAULT_OSU.decode("OC", "CA") == (True, Kind.CANCEL_CONFIRMED)
    assert table.decode("OC", "CA") == (True, Kind.DECLINED)
    assert table.decode("SC", "HD") == (True, None)
    assert table.decode("SC", "A") == (True, Kind.ACCEPTED)       # the partner's SC/* beats the default's */A
    assert table.decode("OK", "IP") == (True, Kind.ACCEPTED)      # inherited
    strict = OsuTable.from_config({**PARTNER, "inherit": False})
    assert strict.decode("OK", "IP") == (False, None)

    raw = lm.osu("OC", "CA", sending_application="SPECIALIST_APP")
    assert kinds(read_v2(raw)) == [Kind.CANCEL_CONFIRMED]
    assert kinds(read_v2(raw, osu_table=table)) == [Kind.DECLINED]
    assert kinds(read_v2(raw, osu_table=[table])) == [Kind.DECLINED]        # picked by MSH-3 / MSH-4
    assert kinds(read_v2(raw, tables=load_tables([PARTNER]))) == [Kind.DECLINED]
    other = lm.osu("OC", "CA", sending_application="SPECIALIST_APP", sending_facility="^2.999.7^ISO")
    assert kinds(read_v2(other, osu_table=[table])) == [Kind.CANCEL_CONFIRMED]
    on_hold = read_v2(lm.osu("SC", "HD", sending_application="SPECIALIST_APP"), osu_table=[table])
    assert on_hold.events == () and on_hold.problems == () and on_hold.warnings


def test_table_for_prefers_the_most_specific_partner():
    by_facility = OsuTable.from_config({"facility": "2.999.1.32", "decode": []})
    by_both = OsuTable.from_config({"partner": "APP^2.999.1.32", "decode": []})
    by_app = OsuTable.from_config({"partner": "APP^", "decode": []})
    tables = [by_app, by_facility, by_both]
    assert table_for("APP", "^2.999.1.32^ISO", tables) is by_both
    assert table_for("OTHER", "^2.999.1.32^ISO", tables) is by_facility
    assert table_for("APP", "ELSEWHERE", tables) is by_app
    assert table_for("X", "Y", tables) is DEFAULT_OSU
    assert table_for("X", "Y", []) is DEFAULT_OSU
    assert by_facility.partner == "*^2.999.1.32"


@pytest.mark.parametrize("bad", [
    {"decode": [{"orc1": "OK", "orc5": "IP", "event": "ACCEPT"}]},
    {"decode": [{"orc1": "OK", "orc5": "IP"}]},
    {"decode": [{"orc1": "OK", "orc5": "IP", "event": "ACCEPTED", "extra": 1}]},
    {"decode": {"orc1": "OK"}},
    {"partner": "X", "inherit": "yes"},
    {"partnr": "X"},
    ["not", "a", "table"],
])
def test_a_bad_partner_table_is_refused_at_load(bad):
    with pytest.raises(ValueError):
        OsuTable.from_config(bad)
    with pytest.raises(ValueError, match=r"loop\.osu\[2\]"):
        load_tables([PARTNER, bad])


def test_status_orders_from_other_order_families():
    raw = lm.osu_accept().replace(b"OSU^O51^OSU_O51", b"ORG^O20^ORG_O20").replace(
        b"\rPID|", b"\rMSA|AA|OMG0001\rPID|")
    obs = read_v2(raw)
    assert kinds(obs) == [Kind.DELIVERED, Kind.ACCEPTED]
    assert ("control", "OMG0001") in obs.keys
    new = read_v2(lm.osu("NW", "").replace(b"OSU^O51^OSU_O51", b"OMG^O19^OMG_O19"))
    assert new.events == () and "new referral" in new.problems[0]


# -- RRI / REF --------------------------------------------------------------------------------------------

def test_rri_accepted_and_rejected():
    obs = read_v2(lm.rri_accepted(acknowledged_control_id="REF0042"))
    assert kinds(obs) == [Kind.DELIVERED, Kind.ACCEPTED]
    assert obs.keys == (("referral", "REF4502"), ("control", "REF0042"), ("filler", "EXT77"))
    assert kinds(read_v2(lm.rri_rejected())) == [Kind.DELIVERED, Kind.DECLINED]
    obs = read_v2(lm.rri_accepted(referral_id=lm.REFERRAL_EI))
    assert obs.keys[0] == ("referral", lm.REFERRAL_ID) and ("placer", lm.REFERRAL_EXT) in obs.keys


def test_rri_pending_expired_and_errors():
    pending = read_v2(lm.rri("P"))
    assert kinds(pending) == [Kind.DELIVERED] and pending.problems == ()
    expired = read_v2(lm.rri("E"))
    assert kinds(expired) == [Kind.DELIVERED] and "expired" in expired.problems[0]
    assert read_v2(lm.rri("X")).problems
    rejected = read_v2(lm.rri("A", ack_code="AE"))
    assert rejected.events == () and "MSA-1=AE" in rejected.problems[0]


def test_ref_i14_is_the_initiators_cancel():
    raw = lm.rri("A", trigger="I14").replace(b"RRI^I14^RRI_I12", b"REF^I14^REF_I12")
    obs = read_v2(raw)
    assert kinds(obs) == [Kind.CANCEL_REQUESTED] and obs.keys[0] == ("referral", "REF4502")


# -- MDM^T02 -------------------------------------------------------------------------------------------------

def test_mdm_text_note():
    obs = read_v2(lm.mdm_t02(text="Seen today.\nPlan: MRI | follow-up ^ 6 weeks & call", control_id="M7"))
    (event,) = obs.events
    assert event.kind == Kind.CONSULT_NOTE and event.source == "MDM^T02 MSH-10=M7 TXA-17=AU"
    assert obs.note == Note("text", "text/plain", b"Seen today.\nPlan: MRI | follow-up ^ 6 weeks & call",
                            "Consultation note", "D0001@2.999.1.32.20")
    assert obs.keys == (("referral", lm.REFERRAL_ID), ("document", "D0001@2.999.1.32.20"),
                        ("placer", lm.REFERRAL_EXT))
    assert obs.problems == ()


@pytest.mark.parametrize("status, kind", [("AU", Kind.CONSULT_NOTE), ("LA", Kind.CONSULT_NOTE),
                                          ("IP", Kind.INTERIM_NOTE), ("PA", Kind.INTERIM_NOTE),
                                          ("DO", Kind.INTERIM_NOTE), ("", Kind.INTERIM_NOTE)])
def test_mdm_completion_status(status, kind):
    assert kinds(read_v2(lm.mdm_t02(status=status))) == [kind]


def test_mdm_with_an_embedded_consultation_note():
    cda = lm.consult_note_cda()
    obs = read_v2(lm.mdm_t02(document=cda, with_order=True))
    assert kinds(obs) == [Kind.CONSULT_NOTE]
    assert obs.note.format == "cda" and obs.note.content == cda and obs.note.media_type == "application/xml"
    assert obs.note.title == "Consultation Note"
    assert obs.referral_ids == [lm.REFERRAL_ID] and obs.problems == ()
    # the v2 side names no referral: the document does
    obs = read_v2(lm.mdm_t02(referral_id="", document=cda))
    assert obs.referral_ids == [lm.REFERRAL_ID] and obs.problems == ()


def test_mdm_whose_document_names_another_referral_is_a_problem():
    obs = read_v2(lm.mdm_t02(document=lm.consult_note_cda(referral_extension="R5")))
    assert any("more than one referral" in p for p in obs.problems)


@pytest.mark.parametrize("encoding", ["Base64", "Hex", "A"])
def test_mdm_ed_encodings(encoding):
    cda = lm.consult_note_cda()
    obs = read_v2(lm.mdm_t02(document=cda, media=("text", "xml"), encoding=encoding))
    assert obs.note.content == cda and obs.note.format == "cda" and obs.note.media_type == "text/xml"


def test_mdm_pdf_and_other_media():
    pdf = b"%PDF-1.4\n% synthetic\n"
    obs = read_v2(lm.mdm_t02(document=pdf, media=("AP", "PDF")))
    assert (obs.note.format, obs.note.media_type, obs.note.content) == ("pdf", "application/pdf", pdf)
    obs = read_v2(lm.mdm_t02(document=b"\x89PNG....", media=("IM", "PNG")))
    assert (obs.note.format, obs.note.media_type) == ("image", "image/png")
    obs = read_v2(lm.mdm_t02(document=b"plain words", media=("TEXT", "plain")))
    assert (obs.note.format, obs.note.media_type) == ("text", "text/plain")


def test_mdm_without_content_or_with_broken_content_is_parked():
    empty = read_v2(lm.mdm_t02(text=None))
    assert empty.events == () and "no document content" in empty.problems[0]
    bad = read_v2(lm.mdm_t02(document=b"x").replace(base64.b64encode(b"x"), b"eA="))
    assert bad.events == () and any("not valid base64" in p for p in bad.problems)
    notification = read_v2(lm.mdm_t02(trigger="T01"))
    assert notification.events == () and "without the document" in notification.problems[0]
    cancelled = read_v2(lm.mdm_t02(availability="CA"))
    assert cancelled.events == () and "TXA-19=CA" in cancelled.problems[0]


@pytest.mark.parametrize("type_code,revision", [("RPLC", "T10"), ("APND", "T06"), ("XFRM", "")])
def test_a_consult_cda_that_replaces_or_adds_to_another_is_a_revision_of_it(type_code, revision):
    """relatedDocument/parentDocument: the note goes back to the chart as that revision (a transform is not one)."""
    related = (f'<relatedDocument typeCode="{type_code}"><parentDocument>'
               '<id root="2.999.1.32.20" extension="C0000"/></parentDocument></relatedDocument>')
    xml = lm.consult_note_cda().replace(b"</inFulfillmentOf>", b"</inFulfillmentOf>" + related.encode(), 1)
    obs = read_consult_cda(xml)
    assert kinds(obs) == [Kind.CONSULT_NOTE] and ("document", "C0000@2.999.1.32.20") in obs.keys
    assert (obs.note.unique_id, obs.note.revision) == ("C0001@2.999.1.32.20", revision)
    assert obs.note.parent_id == ("C0000@2.999.1.32.20" if revision else "")


def test_mdm_replacement_keeps_the_parent_document_as_a_key():
    obs = read_v2(lm.mdm_t02(trigger="T10", parent_document_id="D0000^^2.999.1.32.20^ISO"))
    assert ("document", "D0000@2.999.1.32.20") in obs.keys and kinds(obs) == [Kind.CONSULT_NOTE]
    # The note knows what it revises, so it goes back to the chart as a revision of that document.
    assert (obs.note.unique_id, obs.note.parent_id, obs.note.revision) == \
        ("D0001@2.999.1.32.20", "D0000@2.999.1.32.20", "T10")
    original = read_v2(lm.mdm_t02()).note
    assert (original.parent_id, original.revision) == ("", "")


# -- ACK ---------------------------------------------------------------------------------------------------

def test_ack_accept():
    obs = read_v2(lm.ack("AA", acknowledged_control_id="OMG0007"))
    assert obs.message_type == "ACK" and obs.keys == (("control", "OMG0007"),)
    assert kinds(obs) == [Kind.DELIVERED]
    assert kinds(read_v2(lm.ack("CA"))) == [Kind.DELIVERED]


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_ack_errors_name_msa1_and_the_error_text(code):
    obs = read_v2(lm.ack(code, acknowledged_control_id="OMG0007", text="Unknown patient",
                         error="204^Unknown key identifier^HL70357"))
    assert obs.events == ()
    (problem,) = obs.problems
    assert f"MSA-1={code}" in problem and "OMG0007" in problem
    assert "Unknown patient" in problem and "204" in problem


def test_ack_without_msa2_or_code():
    assert read_v2(lm.ack("AA", acknowledged_control_id="")).problems
    assert read_v2(lm.ack("ZZ")).problems


# -- C-CDA over Direct -------------------------------------------------------------------------------------

def test_consult_note_cda():
    obs = read_consult_cda(lm.consult_note_cda(document_extension="C9"))
    assert obs.keys == (("referral", lm.REFERRAL_ID), ("placer", lm.REFERRAL_EXT))
    (event,) = obs.events
    assert (event.kind, event.at) == (Kind.CONSULT_NOTE, "2026-11-21T11:00:00Z")
    assert event.source == "C-CDA Consultation Note id=C9@2.999.1.32.20"
    assert obs.note.unique_id == "C9@2.999.1.32.20" and obs.problems == ()


def test_a_cda_naming_no_referral_keeps_its_event_for_the_reviewer():
    obs = read_consult_cda(lm.consult_note_cda(referral_root="", referral_extension=""))
    assert obs.keys == () and kinds(obs) == [Kind.CONSULT_NOTE]
    assert obs.problems == ("C-CDA: no inFulfillmentOf/order/id: the document names no referral",)


def test_a_cda_fulfilling_two_orders():
    obs = read_consult_cda(lm.consult_note_cda(extra_orders=(("2.999.5", "OTHER"),)))
    assert ("referral", "OTHER@2.999.5") in obs.keys
    assert any("more than one referral" in p for p in obs.problems)


def test_a_cda_without_effective_time_uses_the_receipt_time():
    xml = lm.consult_note_cda().replace(b'<effectiveTime value="20261121110000+0000"/>', b"")
    assert read_consult_cda(xml).problems
    obs = read_consult_cda(xml, received="2026-11-22T10:00:00Z")
    assert obs.events[0].at == "2026-11-22T10:00:00Z" and obs.problems == ()


@pytest.mark.parametrize("xml", [b"", b"not xml", b"<a>unclosed", b"<other xmlns='urn:x'/>", "<x/>"])
def test_what_is_not_a_cda_is_a_problem(xml):
    obs = read_consult_cda(xml)
    assert obs.events == () and obs.keys == () and obs.problems


def test_entities_are_never_expanded_and_no_file_or_network_is_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-FILE-CONTENT")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    doctype = (f'<!DOCTYPE ClinicalDocument SYSTEM "http://127.0.0.1:{port}/cda.dtd" ['
               '<!ENTITY internal "EXPANDED-INTERNAL">'
               f'<!ENTITY file SYSTEM "file://{secret}">'
               f'<!ENTITY net SYSTEM "http://127.0.0.1:{port}/x">]>')
    try:
        for xml in (lm.consult_note_cda(doctype=doctype, title_xml="&internal;&file;&net;"),
                    lm.consult_note_cda(doctype=doctype, referral_extension="&internal;"),
                    lm.consult_note_cda(doctype=doctype, referral_extension="&file;")):
            for obs in (read_consult_cda(xml), read_v2(lm.mdm_t02(document=xml))):
                text = repr(obs.keys) + repr(obs.events) + repr(obs.problems) + repr(obs.warnings)
                text += obs.note.title if obs.note else ""
                assert "EXPANDED-INTERNAL" not in text and "TOP-SECRET" not in text
                assert obs.events == () and obs.problems, obs
        with pytest.raises(BlockingIOError):
            listener.accept()           # nobody connected: no DTD or entity was fetched
    finally:
        listener.close()


def test_a_billion_laughs_is_refused():
    lol = "".join(f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 10))
    xml = lm.consult_note_cda(doctype=f'<!DOCTYPE ClinicalDocument [<!ENTITY l0 "lol">{lol}]>', title_xml="&l9;")
    obs = read_consult_cda(xml)
    assert obs.events == () and obs.problems and len(repr(obs)) < 10_000


# -- Direct MDN ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("disposition", ["processed", "dispatched", "Processed"])
def test_mdn_delivered(disposition):
    obs = mdn_event("<abc@hisp.example>", disposition, "2026-11-02T09:00:05+00:00")
    assert obs.keys == (("message-id", "<abc@hisp.example>"),)
    (event,) = obs.events
    assert (event.kind, event.at) == (Kind.DELIVERED, "2026-11-02T09:00:05Z")
    assert obs.problems == ()


def test_mdn_failures_and_normalisation():
    for disposition, failure in (("failed", ""), ("denied", ""), ("deleted", ""), ("processed", "disk full"),
                                 ("", "")):
        obs = mdn_event("<abc@hisp.example>", disposition, "2026-11-02T09:00:05Z", failure)
        assert obs.events == () and obs.problems, disposition
    assert mdn_event(" abc@hisp.example ", "processed", "2026-11-02T09:00:05Z").keys == (
        ("message-id", "<abc@hisp.example>"),)
    assert mdn_event("", "processed", "2026-11-02T09:00:05Z").problems
    assert mdn_event("<a@b>", "processed", "yesterday").problems
    naive = mdn_event("<a@b>", "processed", "2026-11-02T09:00:05")
    assert naive.events[0].at == "2026-11-02T09:00:05Z" and naive.warnings


def test_read_mdn_adapts_a_parsed_mdn():
    mdn = Mdn("<abc@hisp.example>", "failed", "automatic-action/MDN-sent-automatically", "b@x", "b@x", "ua",
              failure="mailbox unknown")
    obs = read_mdn(mdn, "2026-11-02T09:00:05Z")
    assert obs.events == () and "mailbox unknown" in obs.problems[0]


# -- the observations feed the state machine -------------------------------------------------------------

def test_a_360x_loop_read_message_by_message():
    messages = [lm.osu_accept(sent="20261103100000+0000"), lm.siu_s12(sent="20261104080000+0000"),
                lm.siu_completed(sent="20261120150000+0000"),
                lm.mdm_t02(document=lm.consult_note_cda(), sent="20261121110000+0000")]
    observations = [read_v2(m) for m in messages]
    assert all(o.referral_ids == [lm.REFERRAL_ID] and not o.problems for o in observations)
    facts = observe_all(e for o in observations for e in o.events)
    assert {Kind.ACCEPTED, Kind.CONSULT_NOTE} <= facts.flags
    assert facts.appointment(lm.APPOINTMENT_ID).status == Kind.VISIT_DONE
    assert facts.appointment(lm.APPOINTMENT_ID).starts == "2026-11-20T14:00:00Z"


def test_the_same_bytes_give_the_same_observation():
    for raw in (lm.siu_s12(), lm.osu_accept(), lm.mdm_t02(document=lm.consult_note_cda()), lm.ack(), lm.rri()):
        assert read_v2(raw) == read_v2(raw)


def test_lf_separated_and_bom_prefixed_messages():
    raw = b"\xef\xbb\xbf" + lm.osu_accept().replace(b"\r", b"\n")
    assert kinds(read_v2(raw)) == [Kind.ACCEPTED]


def test_what_is_not_a_loop_message():
    for raw in (b"", b"GET / HTTP/1.1\r\n", b"MSH|", b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\r", b"<x/>"):
        obs = read_v2(raw)
        assert obs.events == () and obs.problems, raw


# -- fuzz ---------------------------------------------------------------------------------------------

SEGMENTS = ["MSH", "MSA", "ERR", "EVN", "PID", "PV1", "ORC", "OBR", "TQ1", "SCH", "RGS", "AIS", "AIG", "AIL", "AIP",
            "RF1", "TXA", "OBX", "NTE"]
TYPES = ["ACK", "OSU^O51", "ORG^O20", "OMG^O19", "RRI^I12", "REF^I14", "SIU^S12", "SIU^S14", "SIU^S26", "MDM^T02",
         "MDM^T10", "SIU", "MDM^", "^"]
field_text = st.text(alphabet=st.sampled_from(list("|^~\\&ABCDEFOKUAIPSCMRT0123456789+-.=< \r\n")), max_size=40)


@st.composite
def v2_messages(draw):
    mtype = draw(st.sampled_from(TYPES))
    msh = f"MSH|^~\\&|{draw(field_text)}|{draw(field_text)}|||{draw(field_text)}||{mtype}|{draw(field_text)}|P|2.5.1"
    segments = [msh]
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(SEGMENTS))
        fields = draw(st.lists(field_text, max_size=30))
        segments.append("|".join([name, *fields]))
    return "\r".join(segments).encode("latin-1", errors="replace")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_read_v2_never_raises_on_bytes(raw):
    obs = read_v2(raw)
    assert isinstance(obs, Observation) and no_internal_error(obs)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(v2_messages())
def test_read_v2_never_raises_on_message_shaped_input(raw):
    obs = read_v2(raw, osu_table=[OsuTable.from_config(PARTNER)])
    assert isinstance(obs, Observation) and no_internal_error(obs), obs.problems
    assert len(set(obs.keys)) == len(obs.keys)
    for event in obs.events:
        assert event.at == "" or event.at.endswith("Z")


BUILT = [lm.siu_s12(), lm.siu_s26(start_in="ais"), lm.osu_accept(), lm.osu_cancel(), lm.rri_accepted(), lm.ack("AE"),
         lm.mdm_t02(), lm.mdm_t02(document=lm.consult_note_cda())]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BUILT), st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8))
def test_read_v2_never_raises_on_mutated_messages(raw, flips):
    data = bytearray(raw)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    obs = read_v2(bytes(data), codec="utf-8")
    assert isinstance(obs, Observation) and no_internal_error(obs), obs.problems


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), max_size=6), st.binary(max_size=64))
def test_read_consult_cda_never_raises(flips, junk):
    data = bytearray(lm.consult_note_cda())
    for pos, value in flips:
        data[pos % len(data)] = value
    for xml in (bytes(data), junk):
        obs = read_consult_cda(xml)
        assert isinstance(obs, Observation) and no_internal_error(obs), obs.problems


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.text(max_size=20), st.text(max_size=30), st.text(max_size=20))
def test_mdn_event_never_raises(mid, disposition, at, failure):
    obs = mdn_event(mid, disposition, at, failure)
    assert isinstance(obs, Observation)


# -- XDM packages -------------------------------------------------------------------------------------------

def test_a_package_takes_interim_or_outcome_from_its_status_message():
    cda = lm.consult_note_cda()
    interim = read_package([lm.osu_interim()], [cda])
    assert kinds(interim) == [Kind.INTERIM_NOTE]                     # not the document's own CONSULT_NOTE
    assert interim.note.format == "cda" and interim.referral_ids == [lm.REFERRAL_ID]
    assert interim.message_type == "OSU^O51 + C-CDA consult note" and interim.problems == ()
    outcome = read_package([lm.osu_outcome()], [cda])
    assert kinds(outcome) == [Kind.CONSULT_NOTE]
    cancel_only = read_package([lm.osu_accept()], [cda])              # no note event in the v2 part
    assert kinds(cancel_only) == [Kind.ACCEPTED, Kind.CONSULT_NOTE]
    assert kinds(read_package([], [cda])) == [Kind.CONSULT_NOTE]
    assert read_package([], []).problems
    mixed = read_package([lm.osu_interim()], [lm.consult_note_cda(referral_extension="R5")])
    assert any("more than one referral" in p for p in mixed.problems)


def test_delimiters_that_do_not_survive_the_declared_charset():
    raw = bytearray(lm.ack("AE"))      # found by hypothesis: non-ASCII bytes in MSH-2, read as ASCII
    raw[4], raw[121 % len(raw)] = 128, 129
    obs = read_v2(bytes(raw))
    assert obs.events == () and "MSH unreadable in its character set" in obs.problems[0]


@pytest.mark.parametrize("codec", ["utf-16", "utf-32", "cp500"])
def test_a_codec_that_does_not_keep_ascii_is_refused_not_read_as_garbage(codec):
    """The default codec of a site (no MSH-18) read as UTF-16 or EBCDIC: MSH does not survive it."""
    obs = read_v2(lm.ack("AA"), codec)
    assert obs.events == () and "MSH unreadable in its character set" in obs.problems[0]


def test_a_decline_keeps_its_reason_with_the_event_for_the_coordinator():
    obs = read_v2(lm.osu_decline(reason="Not a cardiology problem & no capacity"))   # sent as \\T\\ (escaped)
    [event] = obs.events
    assert event.kind == Kind.DECLINED
    assert event.source.endswith(": Not a cardiology problem & no capacity")
    accepted = read_v2(lm.osu_accept())
    assert ":" not in accepted.events[0].source.split("OK/IP")[1]   # no reason where none is asked
