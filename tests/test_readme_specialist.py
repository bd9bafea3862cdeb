"""The README's specialist-side examples are real: the inbound channel loads, and `answer` exists as shown."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from hl7referral.cli import main
from hl7referral.config.channels import load_channel

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"### {title}")
    end = README.index("\n#", start + 4)
    return README[start:end]


def test_the_inbound_channel_example_loads_with_every_key_it_shows(tmp_path):
    block = re.search(r"```toml\n(.*?)```", section("The inbound channel"), re.S).group(1)
    path = tmp_path / "referrals-in.toml"
    path.write_text(block)
    ch = load_channel(path)
    assert ch.inbound and ch.direct_from == ("*",)
    assert ch.forward.endpoint == "tcp:127.0.0.1:6661" and ch.forward.message == "REF^I12"
    assert ch.forward.cda == "embed" and ch.forward.max_attempts == 10
    # Every key the table lists is one the example sets.
    table = section("The inbound channel").split("| key |", 1)[1]
    for key in re.findall(r"^\| `forward\.([a-z_]+)`", table, re.M):
        assert hasattr(ch.forward, key)


def test_every_answer_shown_in_the_readme_is_a_choice_of_the_command():
    shown = set(re.findall(r"hl7referral answer \S+ ([a-z-]+)", README))
    assert shown >= {"accept", "decline", "book", "no-show", "note"}
    help_text = CliRunner().invoke(main, ["answer", "--help"]).output
    for what in shown:
        assert what in help_text
