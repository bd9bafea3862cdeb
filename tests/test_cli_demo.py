"""`hl7referral demo`: two engines and a relay, a human and a veterinary referral, both loops closed.

Run as a user runs it (the console command, a process of its own); what it prints is what the
README shows. Afterwards nothing it started is running.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(180)


def running_under(path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line and "ps -eo" not in line]


def test_the_demo_closes_a_human_and_a_veterinary_referral_and_leaves_nothing_running(tmp_path):
    work = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "hl7referral", "demo", "--keep", str(work)],
                          capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for referral in ("referral SAMPLEREF0001", "referral VETREF0001"):
        block = out.split(referral, 1)[1].split("\nreferral ", 1)[0]
        assert "referrer (initiator): CLOSED" in block and "specialist (recipient): CLOSED" in block
        assert "NOTE_FILED" in block
    vet = out.split("referral VETREF0001", 1)[1]
    assert "NO_SHOW" in vet and vet.count("BOOKED") >= 4          # booked, no-show, rebooked: on both sides
    assert "done: both referrals CLOSED on both sides" in out
    # Both engines wrote their stores where --keep put them, and none of them is still running.
    assert (work / "referrer" / "store.db").is_file() and (work / "specialist" / "store.db").is_file()
    assert running_under(work) == []
