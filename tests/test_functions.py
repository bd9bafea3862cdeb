import pytest

from hl7referral.cda import functions as f
from hl7referral.cda.model import OID


def rep(text):
    return [c.split("&") for c in text.split("^")]


def test_cwe_maps_system_names_to_oids():
    c = f.cwe(rep("K63.3^Ulcer of intestine^I10"))
    assert (c.code, c.system, c.display) == ("K63.3", OID["ICD10CM"], "Ulcer of intestine")
    assert f.cwe(rep("N^Normal^HL70078")).system == "2.16.840.1.113883.12.78"
    assert f.cwe(rep("^^^44054006^Diabetes^SCT")).system == OID["SNOMED"]  # alternate code only
    assert f.cwe(rep("")) is None


def test_identifiers():
    assert f.cx(rep("M1^^^CLINIC&1.2.3&ISO^MR")).root == "1.2.3"
    assert f.cx(rep("M1^^^CLINIC^MR")).authority == "CLINIC"
    e = f.ei(rep("889342^^1.3.6.1.4.1.21367.2016.10.1.21.15^ISO"))
    assert (e.root, e.extension) == ("1.3.6.1.4.1.21367.2016.10.1.21.15", "889342")
    assert f.pi(rep("1234567893^NPI")).root == OID["NPI"]
    assert f.pi(rep("PLN1001^SL")).root == ""  # a state licence is not an NPI
    assert f.xcn_id(rep("34225PC^Allen^Anthony^M^III^MD^^^&1.2.3&ISO^L^^^NPI")).root == OID["NPI"]


def test_names():
    n = f.xpn(rep("Everyman^Adam^A^III^Dr"))
    assert (n.family, n.given, n.suffix, n.prefix) == ("Everyman", ["Adam", "A"], "III", "Dr")
    n = f.xcn_name(rep("34225PC^Allen^Anthony^M^III^MD"))
    assert (n.family, n.given, n.prefix) == ("Allen", ["Anthony", "M"], "MD")


@pytest.mark.parametrize("xtn, url, use", [
    ("^PRN^PH^^1^270^6009800", "tel:+1-2706009800", "HP"),
    ("(626)555-1234^WPN^PH", "tel:626-555-1234", "WP"),
    ("^NET^Internet^clinic@example.org", "mailto:clinic@example.org", ""),
    ("^WPN^FX^^^555^5550111", "fax:5555550111", "WP"),
    ("^PRN^CP^^^555^5550112^12", "tel:5555550112;ext=12", "MC"),
])
def test_telecoms(xtn, url, use):
    t = f.xtn(rep(xtn))
    assert (t.value, t.use) == (url, use)


def test_addresses_and_timestamps():
    a = f.xad(rep("1 Main St^Suite 2^Town^ST^00001^USA^B"))
    assert (a.lines, a.city, a.state, a.postal_code, a.country, a.use) == (
        ["1 Main St", "Suite 2"], "Town", "ST", "00001", "USA", "WP")
    assert f.ts(rep("20220101123009+0000")) == "20220101123009+0000"
    assert f.ts(rep("not a date")) is None


@pytest.mark.parametrize("fn", list(f.BUILTIN.values()))
@pytest.mark.parametrize("value", ["", "^^^", [[""]], [["&&&"]], "x" * 300, [["a"], ["b", "c"]]])
def test_functions_never_raise(fn, value):
    fn(value if isinstance(value, list) else rep(value))
