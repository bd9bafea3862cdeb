"""Inbound channels (``[source] direct`` + ``[forward]``): referrals that reach us over Direct, handed to our EHR.

A channel file is written as a practice would write it; what loads is checked as the engine
uses it (who it takes referrals from, where and how it forwards them), and what is refused
must name the file, the line and the key, as every other configuration error does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hl7referral.config import ConfigError, load_engine
from hl7referral.config.channels import ForwardConfig, load_channel

INBOUND = """\
name = "from-referrers"
description = "Referrals sent to us over Direct"

[source]
direct = ["@direct.sender.test", "Intake@Clinic.Example.org"]

[forward]
endpoint = "tcp:host=127.0.0.1:port=6661"
message = "OMG^O19"
cda = "reference"
documents_dir = "/srv/referrals"
reference_url = "https://docs.example.org/{referral}/{file}"
receiving_application = "EHR"
receiving_facility = "CARDIOLOGY"
ack_timeout = 10
max_attempts = 3
"""


def write(tmp_path: Path, text: str, name: str = "in.toml") -> Path:
    d = tmp_path / "channels"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(text)
    return p


def refused(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_channel(path)
    return err.value


def test_an_inbound_channel_loads_with_its_forwarding(tmp_path):
    ch = load_channel(write(tmp_path, INBOUND))
    assert ch.inbound and ch.name == "from-referrers"
    assert (ch.listener, ch.accept, ch.mapping, ch.transports, ch.tracker) == ("", (), None, (), False)
    assert ch.forward == ForwardConfig(endpoint="tcp:host=127.0.0.1:port=6661", message="OMG^O19", cda="reference",
                                       documents_dir="/srv/referrals",
                                       reference_url="https://docs.example.org/{referral}/{file}",
                                       receiving_application="EHR", receiving_facility="CARDIOLOGY",
                                       ack_timeout=10.0, max_attempts=3)
    assert isinstance(ch.forward.ack_timeout, float)


def test_forward_defaults(tmp_path):
    ch = load_channel(write(tmp_path, 'name = "in"\n[source]\ndirect = ["*"]\n[forward]\nendpoint = "tcp:ehr:6661"\n'))
    assert ch.forward == ForwardConfig(endpoint="tcp:ehr:6661")
    assert (ch.forward.message, ch.forward.cda, ch.forward.sending_application) == ("REF^I12", "embed", "HL7REFERRAL")


@pytest.mark.parametrize("sender, taken", [
    ("referrals@direct.sender.test", True),
    ("Someone.Else@DIRECT.SENDER.TEST", True),            # the domain, whatever the case
    ("intake@clinic.example.org", True),                  # the named address, whatever the case
    ("other@clinic.example.org", False),
    ("x@evil-direct.sender.test", False),                 # "@domain" is the whole domain, not a suffix of it
    ("", False),
])
def test_who_an_inbound_channel_takes_referrals_from(tmp_path, sender, taken):
    assert load_channel(write(tmp_path, INBOUND)).takes_from(sender) is taken


def test_a_star_takes_every_sender(tmp_path):
    ch = load_channel(write(tmp_path, INBOUND.replace('direct = ["@direct.sender.test", "Intake@Clinic.Example.org"]',
                                                      'direct = ["*"]')))
    assert ch.takes_from("anyone@anywhere.test")


def test_an_engine_with_only_an_inbound_channel_needs_no_listener_for_it(tmp_path):
    p = write(tmp_path, INBOUND)
    cfg = load_engine(None, store=str(tmp_path / "s.db"), overrides=[f'channels.dir="{p.parent}"'])
    [ch] = cfg.channels
    assert ch.inbound and ch.listener == ""
    listened = load_engine(None, store=str(tmp_path / "s.db"), overrides=[f'channels.dir="{p.parent}"'],
                           listen=("tcp:0",))
    assert [c.listener for c in listened.channels] == [""]   # --listen moves MLLP channels only


# -- refused: file, line, key ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, where, key", [
    ('mapping = "ref-i12"\n', "top", "mapping"),
    ('tracker = true\n', "top", "tracker"),
    ('transports = ["direct"]\n', "top", "transports"),
    ('listener = "main"\n', "source", "source.listener"),
    ('accept = ["REF^I12"]\n', "source", "source.accept"),
    ('sending_facilities = ["CLINIC"]\n', "source", "source.sending_facilities"),
])
def test_what_a_direct_channel_cannot_have_is_refused_where_it_is(tmp_path, extra, where, key):
    if where == "top":
        text = INBOUND.replace('description = ', extra + 'description = ')
    else:
        text = INBOUND.replace('[source]\n', '[source]\n' + extra)
    path = write(tmp_path, text)
    line = text.splitlines().index(extra.rstrip("\n")) + 1
    e = refused(path)
    assert (e.file, e.line, e.key) == (str(path), line, key)
    assert "over Direct" in e.message
    assert str(e).startswith(f"{path}:{line}: {key}: ")


def test_a_destination_table_is_refused(tmp_path):
    text = INBOUND + '\n[destination]\nby = "npi"\n'
    path = write(tmp_path, text)
    e = refused(path)
    assert (e.file, e.line, e.key) == (str(path), text.splitlines().index("[destination]") + 1, "destination")


def test_forward_without_an_endpoint_is_refused(tmp_path):
    text = INBOUND.replace('endpoint = "tcp:host=127.0.0.1:port=6661"\n', "")
    path = write(tmp_path, text)
    e = refused(path)
    assert (e.file, e.line, e.key) == (str(path), text.splitlines().index("[forward]") + 1, "forward.endpoint")
    assert "our EHR's MLLP endpoint" in e.message


def test_no_forward_table_at_all_is_refused(tmp_path):
    text = 'name = "in"\n\n[source]\ndirect = ["*"]\n'
    path = write(tmp_path, text)
    e = refused(path)
    assert (e.file, e.line, e.key) == (str(path), 3, "forward.endpoint")


def test_forward_on_an_mllp_channel_is_refused(tmp_path):
    text = ('name = "ref"\nmapping = "ref-i12"\n\n[source]\nlistener = "main"\naccept = ["REF^I12"]\n\n'
            '[forward]\nendpoint = "tcp:ehr:6661"\n')
    path = write(tmp_path, text)
    e = refused(path)
    assert (e.file, e.line, e.key) == (str(path), 8, "forward")


def test_no_sender_is_refused(tmp_path):
    text = INBOUND.replace('direct = ["@direct.sender.test", "Intake@Clinic.Example.org"]', "direct = []")
    path = write(tmp_path, text)
    e = refused(path)
    assert (e.file, e.line, e.key) == (str(path), 5, "source.direct")


@pytest.mark.parametrize("old, new, key", [
    ('message = "OMG^O19"', 'message = "ORM^O01"', "forward.message"),
    ('cda = "reference"', 'cda = "inline"', "forward.cda"),
    ('max_attempts = 3', 'max_attempts = 0', "forward"),
    ('ack_timeout = 10', 'ack_timeout = -1', "forward.ack_timeout"),
    ('ack_timeout = 10', 'ack_timeout = "soon"', "forward.ack_timeout"),
    ('receiving_facility = "CARDIOLOGY"', 'receiving_faclity = "CARDIOLOGY"', "forward.receiving_faclity"),
])
def test_bad_forward_values_are_refused_with_their_key(tmp_path, old, new, key):
    text = INBOUND.replace(old, new)
    assert text != INBOUND
    path = write(tmp_path, text)
    e = refused(path)
    # The key's own line; a rule on the table as a whole (positive numbers) names the table.
    line = text.splitlines().index("[forward]" if key == "forward" else new) + 1
    assert (e.file, e.line, e.key) == (str(path), line, key)
