import pytest

from hl7referral.config import ConfigError, load_engine, load_store
from hl7referral.config.schema import locate


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def engine_toml(tmp_path, body="", channels="channels"):
    (tmp_path / channels).mkdir(exist_ok=True)
    return write(tmp_path, "engine.toml", f'[channels]\ndir = "{channels}"\n{body}')


CHANNEL = '''name = "{name}"
[source]
listener = "main"
accept = ["REF^I12"]
'''


def test_embedded_defaults():
    cfg = load_engine()
    (lc,) = cfg.listeners
    assert lc.endpoint == "tcp:2575:interface=127.0.0.1" and lc.max_frame_bytes == 16 * 1024 * 1024
    assert {c.name for c in cfg.channels} == {"ref-i12", "orm-o01", "omg-o19", "vet-ref-i12", "loop-events"}
    assert [c.name for c in cfg.channels if c.tracker] == ["loop-events"]
    assert cfg.store_path.name == "hl7referral.db"


def test_set_overrides_and_listen_replaces_endpoint():
    cfg = load_engine(overrides=["listeners.0.idle_timeout=60", 'log.level="warn"', "store.busy_timeout_ms=10"],
                      listen=["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"])
    assert [lc.idle_timeout for lc in cfg.listeners] == [60, 60]
    assert cfg.log_level == "warn" and cfg.busy_timeout_ms == 10
    assert {c.listener for c in cfg.channels} == {cfg.listeners[0].name}


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    p = engine_toml(tmp_path, '[store]\npath = "data/x.db"\n')
    write(tmp_path / "channels", "a.toml", CHANNEL.format(name="a"))
    cfg = load_engine(p)
    assert cfg.store_path == tmp_path / "data" / "x.db"


@pytest.mark.parametrize("body, line, key, words", [
    ("[store]\npath = 3\n", 4, "store.path", "must be a str"),
    ("[store]\nbusy_timeout = 5\n", 4, "store.busy_timeout", "unknown key"),
    ("[[listeners]]\nname = \"main\"\nmax_frame_bytes = \"big\"\n", 5, "listeners.0.max_frame_bytes", "whole number"),
    ("[[listeners]]\nname = \"main\"\non_store_failure = \"maybe\"\n", 5, "listeners.0.on_store_failure", "one of"),
    ("[log]\nlevel = \"loud\"\n", 4, "log.level", "one of"),
])
def test_errors_name_file_line_and_key(tmp_path, body, line, key, words):
    p = engine_toml(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_engine(p)
    e = err.value
    assert (e.file, e.line, e.key) == (str(p), line, key) and words in e.message
    assert str(e).startswith(f"{p}:{line}: {key}: ")


def test_invalid_toml_names_the_line(tmp_path):
    p = write(tmp_path, "engine.toml", "[store]\npath = \n")
    with pytest.raises(ConfigError, match=r"engine.toml:2: not valid TOML"):
        load_engine(p)


def test_bad_channel_errors(tmp_path):
    p = engine_toml(tmp_path)
    write(tmp_path / "channels", "a.toml", 'name = "a"\n[source]\nlistener = "main"\naccept = ["REFI12"]\n')
    with pytest.raises(ConfigError, match=r"a.toml:4: source.accept: 'REFI12' is not TYPE\^EVENT"):
        load_engine(p)


def test_channel_for_unknown_listener(tmp_path):
    p = engine_toml(tmp_path)
    write(tmp_path / "channels", "a.toml", 'name = "a"\n[source]\nlistener = "nope"\naccept = ["REF^I12"]\n')
    with pytest.raises(ConfigError, match=r"a.toml:3: source.listener: no listener named 'nope'"):
        load_engine(p)


def test_two_channels_taking_the_same_messages(tmp_path):
    p = engine_toml(tmp_path)
    write(tmp_path / "channels", "a.toml", CHANNEL.format(name="a"))
    write(tmp_path / "channels", "b.toml", CHANNEL.format(name="b"))
    with pytest.raises(ConfigError, match="already taken by channel 'a'"):
        load_engine(p)


def test_misspelt_channel_key(tmp_path):
    p = engine_toml(tmp_path)
    write(tmp_path / "channels", "a.toml", CHANNEL.format(name="a") + "[ack]\nmdoe = \"after-store\"\n")
    with pytest.raises(ConfigError, match=r"a.toml:6: ack.mdoe: unknown key"):
        load_engine(p)


def test_bad_set_is_named():
    with pytest.raises(ConfigError, match="--set: listeners.0.max_connections: must be a whole number"):
        load_engine(overrides=["listeners.0.max_connections=lots"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_engine(overrides=["nonsense"])


def test_locate_finds_keys_in_array_tables():
    text = "[[listeners]]\nname = \"a\"\n[[listeners]]\nname = \"b\"\nendpoint = \"tcp:1\"\n[listeners.tls]\nx = 1\n"
    assert locate(text, "listeners.1.endpoint") == 5
    assert locate(text, "listeners.0.name") == 2
    assert locate(text, "listeners.1.tls.x") == 7


# -- load_store: the store-only commands' loader -------------------------------------------------


@pytest.mark.parametrize("body, overrides, store", [
    ("", (), None),
    ('[store]\npath = "data/x.db"\nbusy_timeout_ms = 250\n', (), None),
    ('[store]\npath = "~/x.db"\n', (), None),
    ('[store]\npath = "data/x.db"\n', ('store.path="y.db"', "store.busy_timeout_ms=9"), None),
    ('[store]\npath = "data/x.db"\n', (), "given.db"),
])
def test_load_store_opens_the_store_load_engine_opens(tmp_path, body, overrides, store):
    p = engine_toml(tmp_path, body)
    write(tmp_path / "channels", "a.toml", CHANNEL.format(name="a"))
    full, light = (f(p, overrides=overrides, store=store) for f in (load_engine, load_store))
    assert (light.path, light.busy_timeout_ms) == (full.store_path, full.busy_timeout_ms)


def test_load_store_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    light, full = load_store(), load_engine()
    assert light.path == full.store_path == tmp_path / "hl7referral.db" and light.busy_timeout_ms == 5000


def test_load_store_reads_no_channels(tmp_path):
    """A report needs the store, not the channels: a channel ``check`` rejects does not stop it."""
    p = engine_toml(tmp_path, '[store]\npath = "x.db"\n')
    write(tmp_path / "channels", "a.toml", 'name = "a"\n[source]\nlistener = "main"\naccept = ["REFI12"]\n')
    assert load_store(p).path == tmp_path / "x.db"
    with pytest.raises(ConfigError, match="is not TYPE"):
        load_engine(p)


@pytest.mark.parametrize("body, overrides", [
    ("[store]\npath = 3\n", ()),
    ("[store]\nbusy_timeout = 5\n", ()),
    ("[store]\npath = \n", ()),
    ("", ("store.busy_timeout_ms=soon",)),
    ("", ("nonsense",)),
])
def test_load_store_fails_as_load_engine_does_on_what_it_reads(tmp_path, body, overrides):
    p = engine_toml(tmp_path, body)
    errors = []
    for load in (load_engine, load_store):
        with pytest.raises(ConfigError) as err:
            load(p, overrides=overrides)
        errors.append(str(err.value))
    assert errors[0] == errors[1]
