"""The coordinator's CLI over the loop (``status``, ``referrals``, ``tasks``, ``report``, ``workqueue``).

A real store file is filled through :class:`Loop` (events applied out of order, a parked
message, tasks), then each command runs through click's CliRunner with ``--store``, and
the test checks what a coordinator would look at.

The fixture, by hand:

=====  ==========  ===========  =========================================  ==========
ref    specialty   destination  events                                     state
=====  ==========  ===========  =========================================  ==========
R1     cardiology  heart-clinic SENT, DELIVERED +2h, BOOKED +1d (no         CLOSED
                                ACCEPTED: implied), VISIT +5d, NOTE +7d,
                                NOTE_FILED +7d4h (note and filing first)
R2     cardiology  heart-clinic SENT, DELIVERED +4h; overdue                DELIVERED
R3     dermatology skin-center  SENT, DECLINED                             DECLINED
R4     dermatology skin-center  none                                       RECEIVED
=====  ==========  ===========  =========================================  ==========

Completion 1/4 = 25%; leaked = R3 (ended without the note) + R2 (overdue) = 50%.
Delivered times 2h and 4h: nearest-rank median (rank round(0.5)) = 4h. R1: accepted 22h
after delivery, scheduled 0s after (same event), seen 4d after, closed 2d 4h after.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from hl7referral.cli import main
from hl7referral.cli_loop import human, parse_since
from hl7referral.loop.states import Event, Kind
from hl7referral.store import Store
from hl7referral.store.loop import Loop

T = "2024-03-0{}T{}:00:00.000Z"
OPENED = "2024-03-01T08:00:00.000Z"


def ev(kind: Kind, at: str, **kw) -> Event:
    return Event(kind, at, **kw)


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "loop.db"
    store = Store.open(p)
    loop = Loop(store)
    for rid, specialty, dest in (("R1", "cardiology", "heart-clinic"), ("R2", "cardiology", "heart-clinic"),
                                 ("R3", "dermatology", "skin-center"), ("R4", "dermatology", "skin-center")):
        loop.open_referral(rid, at=OPENED, channel="ref-i12", specialty=specialty, destination=dest,
                           contact={"name": "Jane Roe", "phone": "+15550100"}, keys=[(f"PLACER-{rid}^EHR", 1)])
    # R1 arrives out of order: the note (and its filing) first, then the booking, never an accept.
    loop.apply("R1", [ev(Kind.CONSULT_NOTE, "2024-03-08T10:00:00.000Z", source="MDM^T02 #9"),
                      ev(Kind.NOTE_FILED, "2024-03-08T14:00:00.000Z", source="ACK of our MDM^T02")],
               at="2024-03-09T00:00:00.000Z", actor="engine")
    loop.apply("R1", [ev(Kind.SENT, T.format(1, "10")), ev(Kind.DELIVERED, T.format(1, "12")),
                      ev(Kind.BOOKED, T.format(2, "10"), appointment="A1", starts=T.format(6, "10"),
                         source="SIU^S12 #4"),
                      ev(Kind.VISIT_DONE, T.format(6, "10"), appointment="A1")],
               at="2024-03-09T00:00:00.000Z", actor="engine")
    loop.apply("R2", [ev(Kind.SENT, T.format(1, "10")), ev(Kind.DELIVERED, T.format(1, "14"))],
               at=T.format(1, "14"), actor="engine")
    loop.set_schedule("R2", "2024-03-15T14:00:00.000Z", "2024-03-15T14:00:00.000Z")
    loop.apply("R3", [ev(Kind.SENT, T.format(1, "10")), ev(Kind.DECLINED, T.format(2, "09"))],
               at=T.format(2, "09"), actor="engine")
    loop.add_task(key="R2/call", at=T.format(3, "09"), referral_id="R2", kind="call", owner="coord-a",
                  text="call heart-clinic about R2")
    loop.add_task(key="R1/review", at=T.format(9, "09"), referral_id="R1", kind="review-note", owner="coord-b",
                  text="review the consult note of R1")
    loop.park(at=T.format(4, "09"), origin="mllp", message_type="SIU^S12", keys=[("referral", "UNKNOWN-9")],
              reason="no referral matches referral UNKNOWN-9", raw=b"MSH|^~\\&|...")
    store.close()
    return str(p)


def run(path: str, *args: str):
    return CliRunner().invoke(main, [*args, "--store", path])


def test_status_shows_the_implied_accept_and_hides_the_contact(path):
    done = run(path, "status", "R1")
    assert done.exit_code == 0, done.output
    assert "referral R1: CLOSED" in done.stdout
    assert "IMPLIED" in done.stdout and "ACCEPTED implied by BOOKED (SIU^S12 #4)" in done.stdout
    assert "CLOSED     2024-03-08T14:00:00.000Z  (+2d 4h)" in done.stdout
    assert "Jane" not in done.output and "5550100" not in done.output


def test_status_json_and_correlation_form(path):
    done = run(path, "status", "PLACER-R2^EHR", "--json")
    assert done.exit_code == 0, done.output
    got = json.loads(done.stdout)
    assert got["referral_id"] == "R2" and got["state"] == "DELIVERED"
    assert got["overdue_at"] == "2024-03-15T14:00:00.000Z"
    assert [t["kind"] for t in got["open_tasks"]] == ["call"]
    assert "contact" not in got["referral"] and "Jane" not in done.stdout


def test_status_of_an_unknown_referral_is_one_line_exit_1(path):
    done = run(path, "status", "NOPE")
    assert done.exit_code == 1
    assert done.output.strip() == "hl7referral: no referral NOPE"


def test_referrals_list_overdue_and_state(path):
    done = run(path, "referrals", "list", "--overdue")
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("R2 ") and "OVERDUE since 2024-03-15T14:00:00.000Z" in lines[0]
    rows = json.loads(run(path, "referrals", "list", "--state", "DECLINED", "--json").stdout)
    assert [r["referral_id"] for r in rows] == ["R3"] and "contact" not in rows[0]
    assert run(path, "referrals", "list", "--state", "BOGUS").exit_code == 2


def test_tasks_list_and_done_once(path):
    done = run(path, "tasks", "list", "--owner", "coord-a")
    assert done.exit_code == 0 and "call heart-clinic about R2" in done.stdout and "R1" not in done.stdout
    [task] = json.loads(run(path, "tasks", "list", "--referral", "R2", "--json").stdout)
    first = run(path, "tasks", "done", str(task["id"]), "--by", "alice", "--note", "called")
    assert first.exit_code == 0 and f"task #{task['id']} done by alice" in first.stdout
    assert run(path, "tasks", "list", "--referral", "R2", "--json").stdout.strip() == "[]"
    again = run(path, "tasks", "done", str(task["id"]), "--by", "alice")
    assert again.exit_code == 1 and "was done already" in again.output and len(again.output.splitlines()) == 1
    [row] = json.loads(run(path, "tasks", "list", "--referral", "R2", "--all", "--json").stdout)
    assert row["done_by"] == "alice" and row["note"] == "called"
    missing = run(path, "tasks", "done", "999", "--by", "alice")
    assert missing.exit_code == 1 and missing.output.strip() == "hl7referral: no task #999"


def test_report_numbers_match_the_hand_computed_fixture(path):
    done = run(path, "report")
    assert done.exit_code == 0, done.output
    assert "total: 4 referrals; completed 1 (25.0%); leaked 2 (50.0%" in done.stdout
    assert "median 4h" in done.stdout and "2d 4h" in done.stdout
    got = json.loads(run(path, "report", "--json").stdout)
    assert got["total"]["completion_rate"] == 0.25 and got["total"]["leakage_rate"] == 0.5
    assert got["stages"]["delivered"] == {"n": 2, "median_s": 14400.0, "p90_s": 14400.0}
    assert got["stages"]["closed"]["median_s"] == 2 * 86400 + 4 * 3600


def test_report_csv_one_row_per_group(path):
    done = run(path, "report", "--csv")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["specialty"], r["destination"], r["referrals"], r["completion_rate"], r["leakage_rate"])
            for r in rows] == [("cardiology", "heart-clinic", "2", "0.5", "0.5"),
                               ("dermatology", "skin-center", "2", "0.0", "0.5")]


def test_report_since(path):
    got = json.loads(run(path, "report", "--since", "2024-03-02", "--json").stdout)
    assert got["since"] == "2024-03-02T00:00:00Z" and got["total"]["referrals"] == 0
    got = json.loads(run(path, "report", "--since", "2024-03-01T09:00:00+01:00", "--json").stdout)
    assert got["total"]["referrals"] == 4     # 08:00 UTC: the created time itself counts
    bad = run(path, "report", "--since", "last tuesday")
    assert bad.exit_code == 2 and len(bad.output.splitlines()) == 1 and "--since" in bad.output


def test_workqueue_list_and_resolve(path):
    done = run(path, "workqueue", "list")
    assert done.exit_code == 0 and "SIU^S12" in done.stdout and "keys referral=UNKNOWN-9" in done.stdout
    [item] = json.loads(run(path, "workqueue", "list", "--json").stdout)
    assert "raw" not in item
    assert run(path, "workqueue", "resolve", str(item["id"]), "--by", "alice").exit_code == 2
    assert run(path, "workqueue", "resolve", str(item["id"]), "--referral", "NOPE", "--by", "alice").exit_code == 1
    done = run(path, "workqueue", "resolve", str(item["id"]), "--referral", "PLACER-R4^EHR", "--by", "alice")
    # The parked bytes are not a readable SIU: nothing to apply, but the item is attached and closed.
    assert done.exit_code == 0 and f"#{item['id']} attached to R4 by alice: 0 event(s) applied" in done.stdout
    assert run(path, "workqueue", "list").stdout == ""
    [resolved] = json.loads(run(path, "workqueue", "list", "--all", "--json").stdout)
    assert resolved["referral_id"] == "R4" and resolved["resolved_by"] == "alice"
    again = run(path, "workqueue", "resolve", str(item["id"]), "--discard", "--by", "bob")
    assert again.exit_code == 1 and "resolved already" in again.output


def test_a_store_without_loop_tables_or_missing_is_one_line(tmp_path):
    done = CliRunner().invoke(main, ["referrals", "list", "--store", str(tmp_path / "none.db")])
    assert done.exit_code == 2 and len(done.output.splitlines()) == 1 and "does not exist" in done.output
    done = CliRunner().invoke(main, ["tasks", "done", "1", "--store", str(tmp_path / "none.db")])
    assert done.exit_code == 2 and not (tmp_path / "none.db").exists()


# What a store-only command must not import: each costs its start-up more than a million-referral query
# (the engine and its Twisted reactor, the mapping pipeline and lxml, plugins, sqlite-utils, the MLLP client).
HEAVY = ("twisted", "lxml", "hl7", "sqlite_utils", "importlib.metadata", "ssl", "hl7referral.config.engine",
         "hl7referral.config.channels", "hl7referral.cda", "hl7referral.engine", "hl7referral.plugins",
         "hl7referral.send")


@pytest.mark.parametrize("args", [("report",), ("report", "--json"), ("referrals", "list", "--overdue"),
                                  ("status", "R1"), ("tasks", "list")])
def test_store_only_commands_start_without_the_engine(path, args):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "hl7referral", *args, "--store", path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "hl7referral.store.loop" in imported   # the log is the command's
    assert sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in HEAVY)) == []


def test_store_only_commands_read_only_the_store_settings(path, tmp_path):
    """``report`` needs the store: a channel ``check`` rejects does not stop it (check still says so)."""
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "a.toml").write_text('name = "a"\n[source]\nlistener = "main"\naccept = ["REFI12"]\n')
    config = tmp_path / "engine.toml"
    config.write_text(f'[store]\npath = "{path}"\n[channels]\ndir = "channels"\n')
    done = CliRunner().invoke(main, ["report", "--config", str(config)])
    assert done.exit_code == 0 and "total: 4 referrals" in done.stdout
    checked = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert checked.exit_code == 2 and "source.accept: 'REFI12' is not TYPE^EVENT" in checked.output
    config.write_text(f'[store]\npath = "{path}"\nbusy = 1\n')
    bad = CliRunner().invoke(main, ["report", "--config", str(config)])
    assert bad.exit_code == 2 and f"{config}:3: store.busy: unknown key" in bad.output


def test_human_durations_and_since_parsing():
    assert [human(s) for s in (None, 0, 59, 3600, 3660, 86400, 2 * 86400 + 4 * 3600 + 59)] == \
        ["-", "0s", "59s", "1h", "1h 1m", "1d", "2d 4h"]
    assert parse_since("2024-03-01T10:00:00.5Z") == ("2024-03-01T10:00:00.5", "2024-03-01T10:00:00.5Z")
    with pytest.raises(ValueError):
        parse_since("2024-13-01")
