"""The hl7referral command line, run as a user runs it (subprocesses)."""

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

from engine_process import EngineProcess
from messages import ref_i12

CLI = [sys.executable, "-m", "hl7referral"]


def run(*args, cwd=None, timeout=30):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def one_line_error(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hl7referral: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("cmd", [[], ["serve"], ["send"], ["messages"], ["messages", "list"],
                                 ["messages", "show"], ["check"]])
def test_every_command_has_help(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_check_embedded_defaults(tmp_path):
    r = run("check", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.startswith("ok: <embedded defaults>: 1 listener(s), 5 channel(s), 3 mapping(s)")


def test_check_reports_file_line_key(tmp_path):
    (tmp_path / "channels").mkdir()
    cfg = tmp_path / "engine.toml"
    cfg.write_text('[channels]\ndir = "channels"\n[[listeners]]\nname = "main"\nidle_timeout = "soon"\n')
    line = one_line_error(run("check", "--config", str(cfg)))
    assert f"{cfg}:5: listeners.0.idle_timeout: must be a number" in line


def test_check_bad_endpoint(tmp_path):
    line = one_line_error(run("check", "--listen", "ssl:2576:certKey=missing.pem:privateKey=missing.key", cwd=tmp_path))
    assert "missing" in line


def test_serve_on_a_busy_port_is_one_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    r = run("serve", "--store", str(tmp_path / "x.db"), "--listen", f"tcp:{port}:interface=127.0.0.1")
    s.close()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in r.stderr


def test_send_messages_list_and_show(engine, tmp_path):
    good = tmp_path / "good.hl7"
    good.write_bytes(ref_i12("CLI1").replace(b"\r", b"\n"))  # file-loaded LF text is normalised
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(ref_i12("CLI2", rf1=None))
    r = run("send", "--port", str(engine.port), str(good))
    assert r.returncode == 0 and r.stdout.strip() == "CLI1\tAA"
    r = run("send", "--port", str(engine.port), str(good), str(bad))
    assert r.returncode == 1
    assert r.stdout.splitlines()[0] == "CLI1\tAA"
    assert re.match(r"CLI2\tAE\trequired RF1 segment", r.stdout.splitlines()[1])

    r = run("messages", "list", "--store", str(engine.store), "--json")
    rows = json.loads(r.stdout)
    assert [(x["control_id"], x["status"], x["duplicates"]) for x in rows] == \
        [("CLI2", "rejected", 0), ("CLI1", "accepted", 1)]
    r = run("messages", "list", "--store", str(engine.store), "--status", "accepted")
    assert "CLI1" in r.stdout and "CLI2" not in r.stdout
    ident = rows[1]["id"]
    r = run("messages", "show", str(ident), "--store", str(engine.store))
    assert r.returncode == 0 and "REF^I12" in r.stdout and "RF1|P|R|MED|RP|O|REF0001" in r.stdout
    assert "MSA|AA|CLI1" in r.stdout
    shown = json.loads(run("messages", "show", str(ident), "--store", str(engine.store), "--json").stdout)
    assert shown["control_id"] == "CLI1" and shown["segments"][0].startswith("MSH|^~\\&|EHR|CLINIC")


def test_show_missing_and_store_missing(tmp_path):
    line = one_line_error(run("messages", "list", "--store", str(tmp_path / "nope.db")))
    assert "does not exist" in line


def test_send_to_nothing_is_one_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    f = tmp_path / "m.hl7"
    f.write_bytes(ref_i12("X"))
    line = one_line_error(run("send", "--port", str(port), str(f)))
    assert "cannot connect" in line


def test_logs_carry_control_ids_never_patient_names(tmp_path):
    e = EngineProcess.start(tmp_path, "--set", 'log.level="debug"')
    try:
        f = tmp_path / "m.hl7"
        name = "Zebul\\pl\\onia^Quixtrophe"  # an unknown escape: python-hl7 would log the field
        msgs = [ref_i12("PHI1", pid=f"PID|1||MRN777^^^C^MR||{name}||19700101|F"),
                ref_i12("PHI2", pid=f"PID|1||MRN777^^^C^MR||{name}||1970XX01|F"),
                ref_i12("PHI3", kind="ADT^A01", pid=f"PID|1||MRN777^^^C^MR||{name}||19700101|F")]
        f.write_bytes(b"".join(msgs))
        run("send", "--port", str(e.port), str(f))
    finally:
        e.stop()
    log = e.log
    assert "PHI1" in log and "PHI2" in log and "PHI3" in log
    assert "Zebul" not in log and "Quixtrophe" not in log and "MRN777" not in log


@pytest.mark.timeout(60)
def test_twist_plugin_runs_the_same_service(tmp_path):
    twist = os.path.join(os.path.dirname(sys.executable), "twist")
    proc = subprocess.Popen([twist, "--log-format=text", "hl7referral", "--store", str(tmp_path / "t.db"),
                             "--listen", "tcp:0:interface=127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        port = None
        seen = ""
        deadline = time.monotonic() + 20
        with selectors.DefaultSelector() as sel:  # never block past the deadline
            sel.register(proc.stdout, selectors.EVENT_READ)
            while port is None and time.monotonic() < deadline and proc.poll() is None:
                if sel.select(timeout=0.2):
                    seen += os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
                    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", seen)
                    port = int(m.group(1)) if m else None
        assert port, "twist hl7referral did not start listening"
        f = tmp_path / "m.hl7"
        f.write_bytes(ref_i12("TWIST1"))
        r = run("send", "--port", str(port), str(f))
        assert r.stdout.strip() == "TWIST1\tAA"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_twist_plugin_bad_config_is_a_usage_error(tmp_path):
    twist = os.path.join(os.path.dirname(sys.executable), "twist")
    r = subprocess.run([twist, "hl7referral", "--set", "listeners.0.max_connections=lots"],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode != 0 and "must be a whole number" in (r.stdout + r.stderr)
    assert "Traceback" not in r.stdout + r.stderr


def test_readme_send_example_and_samples(engine):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = run("send", "--port", str(engine.port), "samples/ref-i12.hl7", "samples/ref-i12-no-rf1.hl7", cwd=root)
    assert r.stdout.splitlines() == [
        "REFSAMPLE1\tAA",
        "REFSAMPLE2\tAE\trequired RF1 segment (referral information) missing (RF1)",
    ]
    r = run("send", "--port", str(engine.port), "samples/orm-o01.hl7", "samples/omg-o19.hl7", cwd=root)
    assert r.returncode == 0 and r.stdout.splitlines() == ["ORMSAMPLE1\tAA", "OMGSAMPLE1\tCA"]
