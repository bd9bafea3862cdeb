"""Declarative mappings: loading errors name file, line and key; applying fills the model."""

import pytest

from hl7referral.cda.mapping import Mapping, load_mappings
from hl7referral.cda.model import OID
from hl7referral.config import ConfigError
from hl7referral.send import read_messages

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mappings():
    return load_mappings(ROOT / "mappings")


def test_sample_mappings_load(mappings):
    assert sorted(mappings) == ["omg-o19", "orm-o01", "ref-i12"]
    assert mappings["ref-i12"].messages == ("REF^I12",)


def test_ref_i12_corpus_sample(mappings, corpus):
    r = mappings["ref-i12"].map_bytes(read_messages(corpus / "REF_I12_msfhirconv_01.hl7")[0])
    x = r.referral
    assert r.ok
    assert (x.referral_id.extension, x.referral_id.authority) == ("226839", "EPIC")
    assert x.patient.names[0].family == "EVERYMAN" and x.patient.birth_time == "19610615"
    assert (x.patient.gender.code, x.patient.gender.system) == ("M", OID["ADMIN_GENDER"])
    assert x.referring.name.family == "POWELL" and x.referring.telecom[0].value == "tel:626-555-1234"
    assert x.recipient.name.family == "McWILLIAMS"
    assert [p.code.code for p in x.problems] == ["K63.3"]
    assert x.payers[0].name == "Blue Cross Blue Shield of Texas"
    assert x.payers[0].authorization.number == "HL71001111111111"
    assert x.priority.code == "R" and x.referral_type.code == "44383000"


def test_360x_omg_ids_carry_oids(mappings, corpus):
    x = mappings["omg-o19"].map_bytes(read_messages(corpus / "OMG_O19_360x_referral_request_nhapi.hl7")[0]).referral
    assert (x.referral_id.root, x.referral_id.extension) == ("1.3.6.1.4.1.21367.2016.10.1.21.15", "889342")
    assert x.patient.ids[0].root == "1.3.6.1.4.1.21367.2016.10.1.21.5"
    assert x.referring.name.family == "Allen" and x.reason_text == "Rule out headache"


def test_missing_required_fields_are_named(mappings, corpus):
    r = mappings["omg-o19"].map_bytes(read_messages(corpus / "OMG_O19_msfhirconv_01.hl7")[0])
    assert [(e.path, e.target) for e in r.errors] == [("ORC-2 or OBR-2", "referral_id")]
    r = mappings["ref-i12"].map_bytes(b"MSH|^~\\&|A|B|C|D|2026||REF^I12|X|P|2.5\rPID|1||\r")
    assert {e.path for e in r.errors} == {"RF1-6", "PID-3(*)"}
    assert "required RF1-6 (referral_id) is missing" in r.errors[0].text


def test_veterinary_species_and_owner(mappings):
    raw = ("MSH|^~\\&|PIMS|VETCLINIC|HUB|HUB|20260101||REF^I12^REF_I12|V1|P|2.5.1\r"
           "RF1|P|R|MED|RP|O|VREF1\rPRD|RP|Vet^Val^^^Dr\rPRD|RT|Cardio^Cam^^^Dr\r"
           "PID|1||PET42^^^VETCLINIC^PI||Rex||20180301|M" + "|" * 27 + "448771007^Canis lupus familiaris^SCT|"
           "Labrador^Labrador retriever^L\r"
           "NK1|1|Owner^Olive|OWN^Owner^HL70063|3 Farm Rd^^Village^ST^00003|^PRN^PH^^^555^5550199\r").encode()
    x = mappings["ref-i12"].map_bytes(raw).referral
    assert x.veterinary and x.patient.species.code == "448771007"
    assert x.patient.owner.name.family == "Owner" and x.patient.owner.telecom[0].value == "tel:5555550199"


def test_no_owner_for_a_human_patient(mappings, corpus):
    x = mappings["ref-i12"].map_bytes(read_messages(corpus / "REF_I12_msfhirconv_01.hl7")[0]).referral
    assert x.patient.owner is None and not x.veterinary


def write(tmp_path, text):
    p = tmp_path / "m.toml"
    p.write_text('name = "m"\n' + text)
    return p


@pytest.mark.parametrize("text, line, key, words", [
    ('referal_id = "RF1-6"\n', 2, "referal_id", "has no field 'referal_id'"),
    ('referral_id = "RF1-"\n', 2, "referral_id", "not a field path"),
    ('referral_id = { path = "RF1-6", fn = "nope" }\n', 2, "referral_id", "unknown function 'nope'"),
    ('[patient]\ngender = { path = "PID-8", table = "sex" }\n', 3, "patient.gender", "no [tables.sex]"),
    ('[problems]\ncode = "3"\n', 2, "problems", "give each ="),
    ('[patient]\nnames = { path = "PID-5", colour = "x" }\n', 3, "patient.names", "unknown rule key(s) colour"),
    ('referral_id = { path = "6" }\n', 2, "referral_id", "only works in a list with each"),
])
def test_broken_mapping_files_name_file_line_key(tmp_path, text, line, key, words):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        Mapping.load(p)
    assert (err.value.file, err.value.line, err.value.key) == (str(p), line, key)
    assert words in err.value.message


def test_plugin_functions_are_found(monkeypatch, tmp_path):
    from hl7referral.cda import functions

    monkeypatch.setitem(functions.BUILTIN, "shout", lambda v: functions.text(v).upper())
    p = write(tmp_path, 'reason_text = { path = "RF1-14", fn = "shout" }\n')
    raw = b"MSH|^~\\&|A|B|C|D|2026||REF^I12|X|P|2.5\rRF1" + b"|" * 14 + b"chest pain\r"
    x = Mapping.load(p).map_bytes(raw).referral
    assert x.reason_text == "CHEST PAIN"
