import pytest

from hl7referral.cda.model import OID, Code, Identifier, Referral
from hl7referral.config import ConfigError, load_engine
from hl7referral.config.channels import ChannelConfig
from hl7referral.config.directory import load_directory
from hl7referral.destination import NoDestination, resolve

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def directory():
    return load_directory(ROOT / "channels" / "directory.toml")


def channel(**kw):
    return ChannelConfig(name="c", file="c.toml", listener="main", accept=("REF^I12",), **kw)


def test_named(directory):
    assert resolve(channel(destination_by="named", destination_name="Example Neurology"), directory,
                   Referral()).direct == "referrals@neuro.example.org"


def test_by_npi_of_the_referred_to_provider(directory):
    r = Referral()
    r.recipient.ids = [Identifier(root="", extension="X1"), Identifier(root=OID["NPI"], extension="1234567893")]
    assert resolve(channel(destination_by="npi"), directory, r).name == "Example Cardiology Associates"


def test_by_npi_unknown_or_absent(directory):
    r = Referral()
    with pytest.raises(NoDestination, match="no NPI"):
        resolve(channel(destination_by="npi"), directory, r)
    r.recipient.ids = [Identifier(root=OID["NPI"], extension="9999999999")]
    with pytest.raises(NoDestination, match="no specialist with NPI 9999999999"):
        resolve(channel(destination_by="npi"), directory, r)


def test_by_specialty_fixed_or_by_requested_service(directory):
    assert resolve(channel(destination_by="specialty", destination_specialty="Gastroenterology"), directory,
                   Referral()).npi == "1245319599"
    r = Referral(requested_service=Code(code="VETCARD"))
    assert resolve(channel(destination_by="specialty"), directory, r).veterinary
    with pytest.raises(NoDestination, match="requested service '24725-4'"):
        resolve(channel(destination_by="specialty"), directory, Referral(requested_service=Code(code="24725-4")))


def test_channel_without_destination(directory):
    with pytest.raises(NoDestination, match="no \\[destination\\]"):
        resolve(channel(), directory, Referral())


def test_directory_errors_name_the_key(tmp_path):
    p = tmp_path / "directory.toml"
    p.write_text('[[specialists]]\nname = "A"\nfaxx = "1"\n')
    with pytest.raises(ConfigError, match=r"directory.toml:3: specialists.0.faxx: unknown key"):
        load_directory(p)


def engine_dir(tmp_path, channel_text):
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "a.toml").write_text(channel_text)
    (tmp_path / "engine.toml").write_text(f'[channels]\ndir = "channels"\n[mappings]\ndir = "{ROOT / "mappings"}"\n')
    return tmp_path / "engine.toml"


def test_channel_naming_an_unknown_mapping(tmp_path):
    cfg = engine_dir(tmp_path, 'name = "a"\nmapping = "nope"\n[source]\nlistener = "main"\naccept = ["REF^I12"]\n')
    with pytest.raises(ConfigError, match=r"a.toml:2: mapping: no mapping named 'nope'"):
        load_engine(cfg)


def test_mapping_for_another_message_type(tmp_path):
    cfg = engine_dir(tmp_path, 'name = "a"\nmapping = "ref-i12"\n[source]\nlistener = "main"\naccept = ["ORM^O01"]\n')
    with pytest.raises(ConfigError, match="mapping 'ref-i12' is for REF\\^I12, not ORM\\^O01"):
        load_engine(cfg)


def test_after_mapping_needs_a_mapping(tmp_path):
    cfg = engine_dir(tmp_path, 'name = "a"\n[source]\nlistener = "main"\naccept = ["REF^I12"]\n'
                               '[ack]\nmode = "after-mapping"\n')
    with pytest.raises(ConfigError, match="after-mapping needs a mapping"):
        load_engine(cfg)


def test_listen_merging_listeners_rechecks_routes(tmp_path):
    (tmp_path / "channels").mkdir()
    for name, listener in (("a", "one"), ("b", "two")):
        (tmp_path / "channels" / f"{name}.toml").write_text(
            f'name = "{name}"\n[source]\nlistener = "{listener}"\naccept = ["REF^I12"]\n')
    cfg = tmp_path / "engine.toml"
    cfg.write_text('[channels]\ndir = "channels"\n[[listeners]]\nname = "one"\nendpoint = "tcp:1"\n'
                   '[[listeners]]\nname = "two"\nendpoint = "tcp:2"\n')
    assert len(load_engine(cfg).channels) == 2  # fine on two listeners
    with pytest.raises(ConfigError, match="already taken by channel 'a'"):
        load_engine(cfg, listen=["tcp:0"])


def test_standards_dir_must_hold_the_schema(tmp_path):
    with pytest.raises(ConfigError, match="standards.dir: .*CDA_SDTC.xsd not found"):
        load_engine(overrides=[f'standards.dir="{tmp_path}"'])
