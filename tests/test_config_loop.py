"""``[loop]``: SLA thresholds per channel/payer/specialty, owners, auth rules, and errors naming file/line/key."""

from __future__ import annotations

import pytest

from hl7referral.config import load_engine
from hl7referral.config.schema import ConfigError

BASE = '[channels]\ndir = "{channels}"\n'


def engine(tmp_path, body: str):
    from hl7referral.config.engine import bundled_dir
    cfg = tmp_path / "engine.toml"
    cfg.write_text(BASE.format(channels=bundled_dir("channels")) + body)
    return load_engine(cfg), cfg


def test_defaults_are_the_fields(tmp_path):
    loop = load_engine().loop
    assert loop.policy.receipt_hours == 48 and loop.policy.booking_reminder_days == (5.0, 10.0)
    assert loop.policy.note_escalation_business_days == 5 and loop.owner_for() == "role:referral-coordinators"
    assert not loop.auth_required(payer="ACME")


def test_the_most_specific_override_wins(tmp_path):
    cfg, _ = engine(tmp_path, """
[loop.sla]
receipt_hours = 36
[[loop.sla.overrides]]
specialty = "cardiology"
receipt_hours = 24
[[loop.sla.overrides]]
specialty = "cardiology"
payer = "ACME"
receipt_hours = 12
booking_reminder_days = [3]
[[loop.owners]]
channel = "vet-ref-i12"
owner = "dr-vet-desk"
[[loop.auth]]
payer = "ACME"
specialty = "cardiology"
[loop.calendar]
zone = "America/New_York"
holidays = ["2026-12-25"]
""")
    loop = cfg.loop
    assert loop.policy_for().receipt_hours == 36
    assert loop.policy_for(specialty="Cardiology").receipt_hours == 24
    acme = loop.policy_for(specialty="cardiology", payer="ACME")
    assert acme.receipt_hours == 12 and acme.booking_reminder_days == (3.0,) and acme.booking_alert_days == 14
    assert loop.owner_for(channel="vet-ref-i12") == "dr-vet-desk" and loop.owner_for(channel="ref-i12") != "dr-vet-desk"
    assert loop.auth_required(payer="ACME", specialty="cardiology") and not loop.auth_required(payer="ACME")
    assert loop.calendar.zone == "America/New_York"


@pytest.mark.parametrize("body, where", [
    ('[loop.calendar]\nzone = "Mars/Olympus"\n', "loop.calendar"),
    ('[loop.sla]\nreceipt_hours = 0\n', "loop.sla.receipt_hours"),
    ('[[loop.sla.overrides]]\nreceipt_hours = 4\n', "loop.sla.overrides.0"),
    ('[[loop.owners]]\nchannel = "ref-i12"\nowner = ""\n', "loop.owners.0.owner"),
    ('[loop.sla]\nreceipt_hour = 4\n', "loop.sla.receipt_hour"),
    ('[[loop.osu]]\nbogus = 1\n', "loop.osu"),
])
def test_bad_values_name_file_line_and_key(tmp_path, body, where):
    with pytest.raises(ConfigError) as info:
        engine(tmp_path, body)
    assert info.value.key.startswith(where) and str(tmp_path) in info.value.file


def test_the_readmes_loop_and_notify_examples_load(tmp_path):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [re.search(rf"### The `\[{name}\]` keys\n\n```toml\n(.*?)```", readme, re.S).group(1)
              for name in ("loop", "notify")]
    cfg, _ = engine(tmp_path, "\n".join(blocks))
    assert cfg.loop.policy_for(specialty="cardiology", payer="ACME Health").receipt_hours == 24
    assert cfg.notify.coordinator_notifier == "email" and cfg.loop.return_leg.receiving_application == "EHR"
