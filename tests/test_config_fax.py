"""The [fax] section and gateway tables: defaults, and errors that name the file, line and key."""

import pytest

from hl7referral.config import ConfigError, load_engine


def test_embedded_defaults_send_every_fax_channel_through_hylafax():
    cfg = load_engine(None)
    assert cfg.fax.gateway == {"gateway": "hylafax"}
    assert (cfg.fax.poll_interval, cfg.fax.final_timeout, cfg.fax.max_attempts) == (60.0, 86400.0, 6)
    assert cfg.fax.callback_endpoint == "" and cfg.fax.from_name == "Sample Clinic"
    assert all(c.fax == {} for c in cfg.channels)


def test_an_engine_gateway_table_replaces_the_default_whole(tmp_path):
    path = tmp_path / "engine.toml"
    path.write_text('[fax.gateway]\ngateway = "http-fax"\nurl = "https://fax.example.com/v1/faxes"\n'
                    'status_url = "https://fax.example.com/v1/faxes/{id}"\n')
    cfg = load_engine(path)
    assert cfg.fax.gateway["gateway"] == "http-fax" and "host" not in cfg.fax.gateway


@pytest.mark.parametrize("body, line, key, words", [
    ('[fax.gateway]\ngateway = "hylafax"\nprot = 4559\n', 3, "fax.gateway.prot", "not a setting"),
    ('[fax.gateway]\nhost = "127.0.0.1"\n', 1, "fax.gateway.gateway", "required"),
    ('[fax.callbacks]\nendpoint = "tcp:8089"\n', 0, "fax.callbacks.url", "required with an endpoint"),
    ('[fax.retry]\nmax_attempts = 0\n', 2, "fax.retry.max_attempts", "at least 1"),
    ('[fax]\npoll_interval = 0.0\n', 2, "fax.poll_interval", "more than 0"),
    ('[fax]\nfrom_nam = "x"\n', 2, "fax.from_nam", "unknown key"),
])
def test_fax_errors_name_file_line_and_key(tmp_path, body, line, key, words):
    path = tmp_path / "engine.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_engine(path)
    assert err.value.key == key and words in err.value.message
    if line:
        assert err.value.line == line


def test_fax_in_transports_needs_a_gateway(tmp_path):
    path = tmp_path / "engine.toml"
    path.write_text('[fax]\ngateway = {}   # no default gateway, and the sample channels list fax\n')
    with pytest.raises(ConfigError) as err:
        load_engine(path)
    assert err.value.key == "transports" and "fax needs a gateway" in err.value.message
