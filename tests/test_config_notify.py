"""config.notify: the [notify] tables of engine.toml and channel files, merged, and notices composed from them."""

from __future__ import annotations

import tomllib

import pytest

from hl7referral.config.notify import DEFAULT_OWNER, NOTIFY_SCHEMA, NotifyConfig, merge, parse_notify
from hl7referral.config.schema import ConfigError
from hl7referral.notify.email import EmailNotifier, message_id
from hl7referral.notify.webhook import WebhookNotifier

ENGINE = '''\
[store]
path = "x.db"

[notify]
coordinator_notifier = "email"
patient_notifier = "email"
specialist_notifier = ""
default_owner = "role:referral-coordinators"

[notify.owners]
"role:referral-coordinators" = { email = "coordinators@clinic.test", webhook = "#referrals" }
"alice" = { email = "alice@clinic.test" }
"role:clinical-leads" = { email = "leads@clinic.test" }
"bob" = { webhook = "@bob" }

[notify.rule_owners]
"note-escalation" = "role:clinical-leads"

[notify.notifiers.email]
plugin = "email"
host = "127.0.0.1"
port = 25
starttls = "none"
from = "referrals@clinic.test"
timeout = 30.0

[notify.notifiers.webhook]
url = "https://hooks.example.org/referrals"
secret_env = "HL7REFERRAL_WEBHOOK_SECRET"
timeout = 10.0

[notify.templates.booking-reminder-1]
subject = "Please book your appointment with $specialist"

[notify.templates.no-show-alert.webhook]
subject = "Missed: $referral_id ($owner)"
'''

CHANNEL = '''\
name = "cardiology"

[source]
listener = "main"
accept = ["REF^I12"]

[notify]
default_owner = "alice"

[notify.owners]
"alice" = { webhook = "@alice" }

[notify.templates.booking-reminder-1]
body = """Hello from cardiology: book with $specialist.
Book online: $scheduling_link
"""
'''


def parse(text: str, file: str = "engine.toml", *, partial: bool = False) -> NotifyConfig:
    return parse_notify(tomllib.loads(text).get("notify", {}), file, text, partial=partial)


def error(text: str, file: str = "engine.toml", *, partial: bool = False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, file, partial=partial)
    return info.value


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture
def engine() -> NotifyConfig:
    return parse(ENGINE)


# -- parsing ---------------------------------------------------------------------------------


def test_the_documented_example_parses(engine):
    assert engine.notifier_for("coordinator") == "email"
    assert engine.notifier_for("patient") == "email"
    assert engine.notifier_for("specialist") == "" and engine.notifier_for("referrer") == ""
    assert engine.default_owner == "role:referral-coordinators"
    assert engine.owners["alice"] == {"email": "alice@clinic.test"}
    assert engine.rule_owners == {"note-escalation": "role:clinical-leads"}
    notifiers = engine.build_notifiers()
    assert isinstance(notifiers["email"], EmailNotifier) and notifiers["email"].port == 25
    assert isinstance(notifiers["webhook"], WebhookNotifier)   # plugin defaults to the table's name
    assert engine.notifiers["webhook"]["url"] == "https://hooks.example.org/referrals"


def test_no_notify_table_records_everything_with_a_named_owner():
    cfg = parse_notify({}, "engine.toml", "")
    assert cfg.notifier_for("coordinator") == "" and cfg.build_notifiers() == {}
    assert cfg.default_owner == DEFAULT_OWNER
    out = cfg.compose(key="REF1/receipt-overdue", referral_id="REF1", rule="receipt-overdue",
                      audience="coordinator", values={})
    assert out.notifier == "" and out.notice.owner == DEFAULT_OWNER and out.notice.to == ""
    assert "Owner: role:referral-coordinators" in out.notice.body


def test_the_schema_is_exported_for_the_engine_and_channel_schemas():
    assert set(NOTIFY_SCHEMA) == {"coordinator_notifier", "patient_notifier", "specialist_notifier",
                                  "referrer_notifier", "default_owner", "owners", "rule_owners", "notifiers",
                                  "templates"}


@pytest.mark.parametrize("change, key, needle", [
    (("coordinator_notifier = \"email\"", "coordinator_notifer = \"email\""),
     "notify.coordinator_notifer", "coordinator_notifer"),
    (("coordinator_notifier = \"email\"", "coordinator_notifier = \"pager\""),
     "notify.coordinator_notifier", "coordinator_notifier"),
    (("from = \"referrals@clinic.test\"", "frm = \"referrals@clinic.test\""),
     "notify.notifiers.email.frm", "frm ="),
    (("starttls = \"none\"", "starttls = \"sometimes\""), "notify.notifiers.email.starttls", "starttls ="),
    (("plugin = \"email\"", "plugin = \"carrier-pigeon\""), "notify.notifiers.email.plugin", "plugin ="),
    (("secret_env = \"HL7REFERRAL_WEBHOOK_SECRET\"", "secret_env = \"the secret itself\""),
     "notify.notifiers.webhook.secret_env", "secret_env"),
    (("\"alice\" = { email = \"alice@clinic.test\" }", "\"alice\" = { email = \"Alice <alice@clinic.test>\" }"),
     "notify.owners.alice.email", "\"alice\" ="),
    (("\"alice\" = { email = \"alice@clinic.test\" }", "\"alice\" = { emial = \"alice@clinic.test\" }"),
     "notify.owners.alice.emial", "\"alice\" ="),
    (("\"alice\" = { email", "\" alice\" = { email"), "notify.owners. alice", "\" alice\""),
    (("\"role:referral-coordinators\" = { email = \"coordinators@clinic.test\", ",
      "\"role:referral-coordinators\" = { "), "notify.default_owner", "default_owner"),
    (("\"note-escalation\" = \"role:clinical-leads\"", "\"note-escalation\" = \"bob\""),
     "notify.rule_owners.note-escalation", "\"note-escalation\""),
    (("\"note-escalation\" = \"role:clinical-leads\"", "\"note-escalaton\" = \"alice\""),
     "notify.rule_owners.note-escalaton", "\"note-escalaton\""),
    (("subject = \"Please book", "subjet = \"Please book"), "notify.templates.booking-reminder-1.subjet",
     "subjet ="),
    (("subject = \"Please book your appointment with $specialist\"", "subject = \"Costs $5\""),
     "notify.templates.booking-reminder-1.subject", "Costs $5"),
    (("[notify.templates.booking-reminder-1]", "[notify.templates.booking-remnder-1]"),
     "notify.templates.booking-remnder-1", "booking-remnder-1"),
    (("[notify.templates.no-show-alert.webhook]", "[notify.templates.no-show-alert.slack]"),
     "notify.templates.no-show-alert.slack", "no-show-alert.slack"),
    (("default_owner = \"role:referral-coordinators\"", "default_owner = \"\""), "notify.default_owner",
     "default_owner"),
])
def test_errors_name_the_file_line_and_key(change, key, needle):
    old, new = change
    assert old in ENGINE
    text = ENGINE.replace(old, new, 1)
    err = error(text)
    assert (err.file, err.key) == ("engine.toml", key), str(err)
    assert err.line == line_of(text, needle), str(err)
    assert str(err).startswith(f"engine.toml:{err.line}: {key}: ")


def test_a_missing_required_setting_points_at_its_table():
    text = ENGINE.replace("from = \"referrals@clinic.test\"\n", "")
    err = error(text)
    assert err.key == "notify.notifiers.email.from" and err.message == "required"
    assert err.line == line_of(text, "[notify.notifiers.email]")


def test_a_subject_must_be_one_line():
    text = ENGINE.replace('subject = "Please book your appointment with $specialist"',
                          'subject = """Please book\nnow"""')
    assert error(text).message == "must be one line (a subject)"


def test_an_alert_owner_without_an_address_is_refused_for_every_rule_owner():
    text = ENGINE.replace('"note-escalation" = "role:clinical-leads"', '"note-escalation" = "carol"')
    err = error(text)
    assert err.key == "notify.rule_owners.note-escalation"
    assert "no email address" in err.message and "reach nobody" in err.message


def test_with_a_webhook_for_alerts_owners_need_no_address():
    text = ENGINE.replace('coordinator_notifier = "email"', 'coordinator_notifier = "webhook"').replace(
        '"note-escalation" = "role:clinical-leads"', '"note-escalation" = "carol"')
    cfg = parse(text)
    out = cfg.compose(key="REF1/note-escalation", referral_id="REF1", rule="note-escalation",
                      audience="coordinator", values={})
    assert (out.notifier, out.notice.owner, out.notice.to) == ("webhook", "carol", "#referrals")
    assert out.owner.fell_back and out.owner.via == "role:referral-coordinators"


# -- channels ----------------------------------------------------------------------------------


def test_a_channel_overrides_scalars_adds_addresses_and_its_templates_win(engine):
    channel = parse(CHANNEL, "channels/cardiology.toml", partial=True)
    merged = merge(engine, channel)
    assert merged.default_owner == "alice"
    assert merged.owners["alice"] == {"email": "alice@clinic.test", "webhook": "@alice"}
    assert merged.coordinator_notifier == "email"               # not set by the channel: the engine's
    assert merged.rule_owners == engine.rule_owners
    values = {"specialist": "Dr. Müller", "scheduling_link": "https://book.test/c"}
    out = merged.compose(key="REF9/booking-reminder-1", referral_id="REF9", rule="booking-reminder-1",
                         audience="patient", values=values, to="pat@example.test")
    assert out.notice.subject == "Please book your appointment with Dr. Müller"   # the engine's subject
    assert out.notice.body == "Hello from cardiology: book with Dr. Müller.\nBook online: https://book.test/c\n"
    # The engine alone keeps the built-in body.
    alone = engine.compose(key="REF9/booking-reminder-1", referral_id="REF9", rule="booking-reminder-1",
                           audience="patient", values=values, to="pat@example.test")
    assert alone.notice.body.startswith("Hello,\n\nWe referred you to Dr. Müller")
    # The engine's own configuration is untouched by the merge.
    assert engine.default_owner == "role:referral-coordinators" and engine.owners["alice"] == {
        "email": "alice@clinic.test"}


def test_an_empty_channel_table_changes_nothing(engine):
    merged = merge(engine, parse_notify({}, "channels/x.toml", "", partial=True))
    assert merged == engine


def test_a_channel_can_switch_patient_messages_off(engine):
    merged = merge(engine, parse('[notify]\npatient_notifier = ""\n', "channels/x.toml", partial=True))
    out = merged.compose(key="REF9/notify-patient", referral_id="REF9", rule="notify-patient", audience="patient",
                         values={}, to="pat@example.test")
    assert out.notifier == ""  # recorded, not sent


@pytest.mark.parametrize("text, key, needle", [
    ('[notify]\ncoordinator_notifier = "pager"\n', "notify.coordinator_notifier", "coordinator_notifier"),
    ('[notify]\ndefault_owner = "dave"\n', "notify.default_owner", "default_owner"),
    ('[notify.owners]\n"dave" = { sms = "+15550100" }\n', "notify.owners.dave.sms", '"dave"'),
    ('[notify.owners]\n"dave" = { email = "dave" }\n', "notify.owners.dave.email", '"dave"'),
    ('[notify.templates.no-show-alert.pager]\nsubject = "x"\n', "notify.templates.no-show-alert.pager",
     "no-show-alert.pager"),
])
def test_channel_errors_name_the_channel_file(engine, text, key, needle):
    channel = parse(text, "channels/cardiology.toml", partial=True)   # alone it cannot tell
    with pytest.raises(ConfigError) as info:
        merge(engine, channel)
    err = info.value
    assert (err.file, err.key) == ("channels/cardiology.toml", key), str(err)
    assert err.line == line_of(text, needle)


def test_a_channel_may_bring_its_own_notifier(engine):
    text = ('[notify]\ncoordinator_notifier = "cardio-hook"\n'
            '[notify.notifiers.cardio-hook]\nplugin = "webhook"\nurl = "https://cardio.example.org/hook"\n')
    merged = merge(engine, parse(text, "channels/cardiology.toml", partial=True))
    assert isinstance(merged.build_notifiers()["cardio-hook"], WebhookNotifier)
    out = merged.compose(key="REF9/no-show-alert/2024-05-07", referral_id="REF9", rule="no-show-alert",
                         audience="coordinator", values={})
    assert out.notifier == "cardio-hook" and out.notice.to == ""


# -- composing -------------------------------------------------------------------------------


def test_coordinator_alerts_go_to_their_owners_address(engine):
    def alert(rule, owner=""):
        return engine.compose(key=f"REF1/{rule}", referral_id="REF1", rule=rule, audience="coordinator",
                              values={"detail": "x"}, owner=owner)

    out = alert("booking-overdue")
    assert (out.notifier, out.notice.owner, out.notice.to) == ("email", "role:referral-coordinators",
                                                               "coordinators@clinic.test")
    assert not out.owner.fell_back
    out = alert("booking-overdue", owner="alice")                    # the referral's own coordinator
    assert (out.notice.owner, out.notice.to) == ("alice", "alice@clinic.test")
    out = alert("note-escalation")                                   # the rule's owner
    assert (out.notice.owner, out.notice.to) == ("role:clinical-leads", "leads@clinic.test")
    out = alert("booking-overdue", owner="bob")                      # bob has no email: the role's inbox
    assert (out.notice.owner, out.notice.to) == ("bob", "coordinators@clinic.test")
    assert out.owner.fell_back and "Owner: bob" in out.notice.body
    assert out.notice.data["owner"] == "bob" and out.notice.data["key"] == "REF1/booking-overdue"


def test_patient_messages_go_to_the_given_address_and_keep_an_owner(engine):
    out = engine.compose(key="REF1/notify-patient", referral_id="REF1", rule="notify-patient", audience="patient",
                         values={"specialist": "Dr. Müller", "patient_or_pet": "Bella", "purpose": "a limp"},
                         to="owner@example.test")
    assert (out.notifier, out.notice.to, out.notice.owner) == ("email", "owner@example.test",
                                                               "role:referral-coordinators")
    assert "We have referred Bella to Dr. Müller." in out.notice.body


def test_notifier_specific_templates_apply_to_that_notifier_only():
    cfg = parse(ENGINE.replace('coordinator_notifier = "email"', 'coordinator_notifier = "webhook"'))
    out = cfg.compose(key="REF1/no-show-alert/d", referral_id="REF1", rule="no-show-alert", audience="coordinator",
                      values={}, owner="alice")
    assert out.notice.subject == "Missed: REF1 (alice)"
    email_cfg = parse(ENGINE)
    assert email_cfg.compose(key="REF1/no-show-alert/d", referral_id="REF1", rule="no-show-alert",
                             audience="coordinator", values={}).notice.subject == "[REF1] Missed appointment"


def test_a_composed_alert_arrives_by_email(engine):
    """From configuration to a real SMTP server: the owner's address, the key's Message-ID."""
    from smtp_servers import running_smtpd
    from test_notify_email import Relay

    with running_smtpd(Relay()) as (relay, port):
        text = ENGINE.replace("port = 25", f"port = {port}")
        cfg = parse(text)
        out = cfg.compose(key="REF7/booking-overdue", referral_id="REF7", rule="booking-overdue",
                          audience="coordinator", owner="alice",
                          values={"specialist": "Dr. Müller", "attempts": "2", "due_at": "1 May"})
        cfg.build_notifiers()[out.notifier].send(out.notice)
    msg = relay.parsed()
    assert relay.messages[0][1] == ["alice@clinic.test"]
    assert msg["Subject"] == "[REF7] Not booked: no appointment after the reminders"
    assert msg["Message-ID"] == message_id("REF7/booking-overdue", "clinic.test")
    assert msg["X-Hl7referral-Owner"] == "alice"
    assert "Owner: alice" in relay.body() and "Attempts so far: 2" in relay.body()


def test_a_notice_always_has_a_key_an_owner_and_header_safe_fields():
    from hl7referral.notify import Notice, resolve_owner

    ok = dict(key="REF1/booking-overdue", referral_id="REF1", rule="booking-overdue", audience="coordinator",
              owner="alice", to="alice@clinic.test", subject="s", body="b")
    Notice(**ok)
    for field, bad in [("key", ""), ("key", "REF 1/x"), ("key", "REF1/x\r\nBcc: y"), ("owner", ""),
                       ("owner", "role:"), ("owner", " alice"), ("owner", "a\nb"), ("audience", "everyone"),
                       ("rule", "x\ny"), ("to", "a@b.test\r\nBcc: c"),
                       ("subject", "s\nBcc: c"), ("referral_id", "R\n1")]:
        with pytest.raises(ValueError):
            Notice(**{**ok, field: bad})
    n = Notice(**ok, data={"patient": "Jones"})
    assert "Jones" not in repr(n) and "alice@clinic.test" not in repr(n)
    with pytest.raises(TypeError):
        n.data["patient"] = "x"          # read-only once made
    with pytest.raises(ValueError):
        resolve_owner(rule="r", notifier="email", default_owner="", owners={})


def test_messages_is_the_loop_trackers_render_hook(engine):
    values = {"referral_id": "REF1", "specialist": "Dr. Müller", "patient_or_pet": "your pet",
              "due_at": "2024-05-01T09:00:00Z"}
    [(notifier, to, subject, body)] = engine.messages("coordinator", "booking-overdue", values, owner="alice")
    assert (notifier, to, subject) == ("email", "alice@clinic.test", "[REF1] Not booked: no appointment after the "
                                                                     "reminders")
    assert "Owner: alice" in body and "Due since: 2024-05-01T09:00:00Z" in body
    [(notifier, to, subject, body)] = engine.messages("patient", "notify-patient", values, to="pat@example.test")
    assert (notifier, to) == ("email", "pat@example.test")
    assert "We have referred your pet to Dr. Müller." in body
    # Nobody reachable: no address for an email, or no notifier for the audience -> [] (the tracker makes a task).
    assert engine.messages("patient", "notify-patient", values) == []
    assert engine.messages("patient", "notify-patient", values, to="not-an-address") == []
    assert engine.messages("specialist", "note-request", values, to="dr@spec.test") == []
    # Any one-line owner the loop configuration names will do.
    [(_, to, _, body)] = engine.messages("coordinator", "no-show-alert", values, owner="Alice Smith")
    assert to == "coordinators@clinic.test" and "Owner: Alice Smith" in body
