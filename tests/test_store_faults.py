"""With the store read-only or locked, no positive ACK is ever sent.

The engine runs as a real subprocess (``EngineProcess``); the test plays the
sender and, on the side, the thing that breaks the store: another SQLite
connection holding the write lock, or file permissions taken away. What is
checked is what a user would check: the MSA-1/ERR of every reply on the wire,
the exit status and stderr of ``hl7referral serve``, and the rows in the store.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor

from engine_process import EngineProcess
from hl7referral.config import load_engine
from hl7referral.engine.service import EngineService
from hl7referral.send import MLLPClient
from hl7referral.store import Store, StoreError
from referral_messages import err_codes, read_ack, referral


def exchange(client: MLLPClient, control_id: str, payload: bytes):
    client.send(payload)
    ack, result = read_ack(client, control_id)
    assert ack is not None, f"{control_id}: no reply at all (on_store_failure defaults to 'nak')"
    return ack, result


def stored_rows(path: Path) -> list[tuple[str, str, bytes, bytes, int]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT control_id, status, raw, ack, duplicates FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()


# -- locked --------------------------------------------------------------------


def test_locked_store_gets_ar_207_and_never_aa(tmp_path):
    engine = EngineProcess.start(tmp_path, "--set", "store.busy_timeout_ms=200")
    messages = {f"LOCK{n:04d}": referral(f"LOCK{n:04d}", n) for n in range(100)}
    ids = list(messages)
    try:
        # Another process (us) takes the write lock and keeps it.
        locker = sqlite3.connect(engine.store, isolation_level=None, timeout=5)
        locker.execute("BEGIN IMMEDIATE")
        try:
            replies: dict[str, tuple[bytes, object]] = {}
            with MLLPClient(engine.host, engine.port, timeout=15) as client:
                # One at a time (each waits out the busy timeout on its own) ...
                for cid in ids[:10]:
                    replies[cid] = exchange(client, cid, messages[cid])
                # ... and pipelined, so whole group-commit batches fail together.
                for cid in ids[10:]:
                    client.send(messages[cid])
                for cid in ids[10:]:
                    ack, result = read_ack(client, cid)
                    assert ack is not None, f"{cid}: no reply while the store was locked"
                    replies[cid] = ack, result
            codes = {cid: r.code for cid, (_, r) in replies.items()}
            assert [cid for cid, code in codes.items() if code in ("AA", "CA")] == [], \
                "positive ACK while the store was locked"
            assert set(codes.values()) == {"AR"}, codes
            for cid, (ack, result) in replies.items():
                assert "207" in err_codes(ack), f"{cid}: AR without ERR-3 207: {ack!r}"
                assert result.text, f"{cid}: AR with no readable reason"
            # Nothing was written behind the lock (our transaction would see it).
            assert locker.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        finally:
            locker.execute("ROLLBACK")
            locker.close()

        # Lock released: the same bytes, resent, are all accepted, on the same engine.
        received: dict[str, bytes] = {}
        with MLLPClient(engine.host, engine.port, timeout=15) as client:
            for cid in ids:
                ack, result = exchange(client, cid, messages[cid])
                assert (result.code, result.ok) == ("AA", True), f"{cid} after unlock: {ack!r}"
                received[cid] = ack
    finally:
        assert engine.stop() == 0, engine.log[-3000:]

    rows = stored_rows(engine.store)
    # Exactly the 100 messages, each once, accepted; the failed batches left nothing behind.
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert {r[1] for r in rows} == {"accepted"}
    for cid, status, raw, ack, duplicates in rows:
        assert raw == messages[cid], f"{cid}: stored bytes differ from the bytes sent"
        assert ack == received[cid], f"{cid}: stored ACK differs from the ACK sent"
        assert duplicates == 0


# -- read-only -----------------------------------------------------------------


def _chattr(flag: str, paths: list[Path]) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True, text=True)


def _writable(path: Path) -> bool:
    try:
        if path.is_dir():
            probe = path / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            with open(path, "ab"):
                pass
        return True
    except OSError:
        return False


@contextmanager
def read_only(paths: list[Path]):
    """Make ``paths`` unwritable for the engine; undo it afterwards.

    As a normal user that is chmod (files 0o444, directories 0o555). Root
    ignores permission bits, so as root the paths are also made immutable with
    ``chattr +i`` (ext2/3/4, xfs, btrfs...); if that is not possible the test
    is skipped, since root could then write the store anyway.
    """
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in paths}
    immutable: list[Path] = []
    try:
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        if os.geteuid() == 0:
            if shutil.which("chattr") is None:
                pytest.skip("running as root (permission bits are ignored) and chattr is not installed")
            try:
                _chattr("+i", paths)
            except subprocess.CalledProcessError as exc:
                pytest.skip("running as root (permission bits are ignored) and chattr +i does not work "
                            f"on this filesystem: {exc.stderr.strip()}")
            immutable = list(paths)
        still = [p for p in paths if _writable(p)]
        if still:
            pytest.skip(f"could not make {', '.join(map(str, still))} read-only here")
        yield
    finally:
        if immutable:
            _chattr("-i", immutable)
        for p, mode in modes.items():
            p.chmod(mode)


def serve(tmp_path: Path, store: Path, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """``hl7referral serve`` on ``store``, expected to give up: its exit status and output."""
    cmd = [sys.executable, "-m", "hl7referral", "serve", "--store", str(store),
           "--listen", "tcp:0:interface=127.0.0.1"]
    env = {k: v for k, v in os.environ.items() if k != "HL7REFERRAL_DEBUG"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"engine still running {timeout:g}s after start on {store}: "
                    f"stdout {out!r}, stderr {err!r}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("what", ["file", "file-and-directory"])
def test_read_only_store_refuses_to_start(tmp_path, what):
    store_dir = tmp_path / "store"
    store = store_dir / "engine.db"
    payload = referral("RO0001", 1)

    # A store with one message in it, made by the engine itself.
    engine = EngineProcess.start(tmp_path, store=store)
    try:
        with MLLPClient(engine.host, engine.port, timeout=10) as client:
            first_ack, result = exchange(client, "RO0001", payload)
        assert result.code == "AA"
    finally:
        assert engine.stop() == 0, engine.log[-3000:]

    files = sorted(store_dir.glob("engine.db*"))  # with -wal/-shm if they are still there
    paths = files + ([store_dir] if what == "file-and-directory" else [])
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    with read_only(paths):
        proc = serve(tmp_path, store)  # fails the test unless it exits within 10 s

    assert proc.returncode != 0, f"engine ran on a read-only store: {proc.stdout!r}"
    assert "listening on" not in proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hl7referral: ") and str(store) in lines[0], lines[0]
    # The failed start did not touch the store.
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before

    # Writable again: the engine starts on the same store, which still has the
    # message (a resend is a duplicate and gets the original ACK back).
    engine = EngineProcess.start(tmp_path, store=store)
    try:
        with MLLPClient(engine.host, engine.port, timeout=10) as client:
            ack, result = exchange(client, "RO0001", payload)
        assert (result.code, ack) == ("AA", first_ack)
    finally:
        assert engine.stop() == 0, engine.log[-3000:]
    rows = stored_rows(store)
    assert [(r[0], r[1], r[4]) for r in rows] == [("RO0001", "accepted", 1)]


def test_store_turning_read_only_while_running_gets_ar_207(tmp_path):
    """The store's files lose write access under a running engine (a remount, a
    full quota...): commits fail with an I/O error, replies are AR/207, never AA.

    An open file descriptor keeps the write access it was opened with, so
    chmod cannot do this; only an immutable flag (root, chattr +i) can.
    """
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr +i to take write access away from an open file")
    engine = EngineProcess.start(tmp_path)
    store = engine.store
    messages = {f"RW{n:04d}": referral(f"RW{n:04d}", n) for n in range(21)}
    ids = list(messages)
    received: dict[str, bytes] = {}
    try:
        with MLLPClient(engine.host, engine.port, timeout=15) as client:
            ack, result = exchange(client, ids[0], messages[ids[0]])
            assert result.code == "AA"
            received[ids[0]] = ack
            # The database and its WAL (the -shm index is left alone: SQLite
            # maps it into memory, and a write fault there is a SIGBUS).
            paths = [store, store.with_name(store.name + "-wal")]
            assert all(p.exists() for p in paths), sorted(p.name for p in store.parent.iterdir())
            with read_only(paths):
                for cid in ids[1:]:
                    ack, result = exchange(client, cid, messages[cid])
                    assert result.code == "AR" and "207" in err_codes(ack), f"{cid}: {ack!r}"
            for cid in ids[1:]:
                ack, result = exchange(client, cid, messages[cid])
                assert result.code == "AA", f"{cid} after write access came back: {ack!r}"
                received[cid] = ack
    finally:
        assert engine.stop() == 0, engine.log[-3000:]
    rows = stored_rows(store)
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert {r[1] for r in rows} == {"accepted"}
    assert all(received[r[0]] == r[3] and messages[r[0]] == r[2] for r in rows)


# -- pragmas -------------------------------------------------------------------


def test_engine_store_is_wal_synchronous_full_foreign_keys(tmp_path):
    engine = EngineProcess.start(tmp_path)
    try:
        with MLLPClient(engine.host, engine.port, timeout=10) as client:
            assert exchange(client, "PRAGMA1", referral("PRAGMA1", 1))[1].code == "AA"
    finally:
        assert engine.stop() == 0, engine.log[-3000:]

    # journal_mode=WAL is recorded in the file itself: any reader sees it.
    conn = sqlite3.connect(f"file:{engine.store}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    # synchronous and foreign_keys belong to a connection, so no other
    # connection can see them: check the connection the engine commits on
    # (built as `serve` builds it, without running the reactor) ...
    cfg = load_engine(None, store=str(engine.store), listen=("tcp:0:interface=127.0.0.1",))
    service = EngineService(cfg, MemoryReactor())
    try:
        assert service.store.pragmas() == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}
        assert service.store.count(status="accepted") == 1
    finally:
        service.store.close()
    # ... and the one any read-write Store.open gets.
    store = Store.open(engine.store)
    try:
        assert store.pragmas() == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}
    finally:
        store.close()


def test_engine_refuses_a_store_that_cannot_be_wal(tmp_path):
    # An in-memory database cannot use WAL (nor survive anything): refused.
    with pytest.raises(StoreError, match="WAL required"):
        Store.open(":memory:")
    proc = serve(tmp_path, Path(":memory:"))
    assert proc.returncode != 0
    assert "listening on" not in proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "WAL required" in lines[0], proc.stderr
