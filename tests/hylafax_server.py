"""A real, private HylaFAX (hfaxd + faxq) on 127.0.0.1 for tests: no modem, its own spool.

Debian's hylafax-server keeps its spool in /var/spool/hylafax (etc/ there is a bind mount of
/etc/hylafax while the system service runs). We never touch it: :func:`running` copies the
spool's skeleton (programs, modem configs, empty queues; no jobs, FIFOs or sequence
files) into a private directory, copies /etc/hylafax/* into its etc/, writes a
hosts.hfaxd for loopback (mode 600), gives it all to the fax user (uucp), and starts::

    faxq  -q SPOOL -D                              the scheduler, in the foreground
    hfaxd -q SPOOL -d -l 127.0.0.1 -i PORT         the client protocol server, in the foreground

Without a modem faxq keeps submitted jobs waiting (state READY, "W" in faxstat), which is
what a gateway test wants: a job can be submitted, found, read back and killed.

hosts.hfaxd lets any user in from loopback without a password except two:
``REFUSED_USER`` (hfaxd turns it away) and ``PASSWORD_USER`` (it must give ``PASSWORD``).

Both daemons are stopped by PID (SIGTERM, then SIGKILL) and reaped. Without hfaxd the
fixture skips, unless the environment variable CI is set: then it fails, because .ci/run
must install hylafax-server.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

SYSTEM_SPOOL = Path("/var/spool/hylafax")
SYSTEM_ETC = Path("/etc/hylafax")
HFAXD = "/usr/sbin/hfaxd"
FAXQ = "/usr/sbin/faxq"

REFUSED_USER = "refused"
PASSWORD_USER = "secret"
PASSWORD = "fax-test-pw"

# Queue directories: their contents belong to the system's HylaFAX (jobs, documents, logs).
_QUEUES = {"sendq", "doneq", "docq", "recvq", "pollq", "archive", "tmp", "log", "info", "client", "status"}


class HylaFAXServer(NamedTuple):
    host: str
    port: int
    spool: Path


def available() -> str:
    """"" when a private HylaFAX can run here, else why not."""
    missing = [p for p in (HFAXD, FAXQ) if not os.access(p, os.X_OK)]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian package hylafax-server)"
    if not SYSTEM_SPOOL.is_dir():
        return f"{SYSTEM_SPOOL} is missing (hylafax-server not set up)"
    if os.geteuid() != 0:
        return "hfaxd and faxq need root (they chroot into the spool and run as the fax user)"
    return ""


def require() -> None:
    """Skip the test when HylaFAX cannot run; fail instead on CI, where .ci/run installs it."""
    why = available()
    if not why:
        return
    if os.environ.get("CI") and not why.startswith("hfaxd and faxq need root"):
        pytest.fail(f"{why}: .ci/run must install hylafax-server (and hylafax-client)", pytrace=False)
    pytest.skip(why)


@contextlib.contextmanager
def running(base: Path, *, scheduler: bool = True, start_timeout: float = 20.0,
            port: int = 0) -> Iterator[HylaFAXServer]:
    """A private HylaFAX in ``base/spool`` on a loopback port (``port``, or a free one), stopped on exit.

    ``scheduler=False`` starts hfaxd alone: it takes jobs but cannot hand them to faxq.
    """
    fixed = port
    spool = make_spool(base / "spool")
    log = open(base / "daemons.log", "ab")
    procs: list[subprocess.Popen] = []
    try:
        if scheduler:
            faxq = subprocess.Popen([FAXQ, "-q", str(spool), "-D"], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
            procs.append(faxq)
            # faxq makes the FIFO hfaxd hands submitted jobs through: a JSUBM before it exists fails.
            _wait(lambda: (spool / "FIFO").exists(), faxq, "faxq to create its FIFO", start_timeout)
        for _ in range(3):   # the port is free when picked; another process may take it before hfaxd binds
            port = fixed or _free_port()
            hfaxd = subprocess.Popen([HFAXD, "-q", str(spool), "-d", "-l", "127.0.0.1", "-i", str(port)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            procs.append(hfaxd)
            try:
                _wait(lambda: _accepts(port), hfaxd, f"hfaxd to listen on 127.0.0.1:{port}", start_timeout)
                break
            except RuntimeError:
                if hfaxd.poll() is None:
                    raise
        else:
            raise RuntimeError(f"hfaxd did not start; see {base / 'daemons.log'}")
        yield HylaFAXServer("127.0.0.1", port, spool)
    finally:
        for proc in reversed(procs):   # hfaxd first, then faxq
            _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def hylafax() -> Iterator[HylaFAXServer]:
    """A running private HylaFAX for the test module: ``host, port, spool = hylafax``."""
    require()
    # Not tmp_path: pytest's directories are 0700 root, and the daemons run as uucp.
    base = Path(tempfile.mkdtemp(prefix="hylafax-"))
    try:
        base.chmod(0o755)
        with running(base) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


def make_spool(spool: Path) -> Path:
    """The private spool: the system spool's skeleton, /etc/hylafax in etc/, a loopback hosts.hfaxd."""

    def skip(directory: str, names: list[str]) -> list[str]:
        here = Path(directory)
        return [n for n in names
                if here.name in _QUEUES and here.parent == SYSTEM_SPOOL      # queue contents
                or n in ("FIFO", "seqf") or n.startswith("FIFO.")
                or not ((here / n).is_dir() or (here / n).is_file())]      # FIFOs, sockets, devices

    shutil.copytree(SYSTEM_SPOOL, spool, symlinks=True, ignore=skip)
    etc = spool / "etc"
    if etc.is_symlink():
        etc.unlink()
    etc.mkdir(exist_ok=True)
    for item in SYSTEM_ETC.iterdir():
        target = etc / item.name
        if item.is_dir() and not item.is_symlink():
            shutil.copytree(item, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target, follow_symlinks=False)
    hosts = etc / "hosts.hfaxd"
    # The first entry that matches wins (hosts.hfaxd(5)); "!" denies. hfaxd answers a denied
    # user's USER with 331 like any other, and its PASS with 530.
    hosts.write_text(f"!^{REFUSED_USER}@\n"
                     f"^{PASSWORD_USER}@::{_crypt(PASSWORD)}:\n"
                     "127.0.0.1\n"
                     "localhost\n")
    hosts.chmod(0o600)
    owner = (SYSTEM_SPOOL / "sendq").stat()   # the fax user (uucp on Debian)
    for path in [spool, *spool.rglob("*")]:
        os.lchown(path, owner.st_uid, owner.st_gid)
    return spool


def _crypt(password: str) -> str:
    """An MD5-crypt hash for hosts.hfaxd, by the libcrypt hfaxd itself checks it with."""
    lib = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = "$1$" + os.urandom(6).hex()[:8] + "$"
    hashed = lib.crypt(password.encode(), salt.encode())
    if not hashed or not hashed.startswith(b"$1$"):
        raise RuntimeError("libcrypt made no MD5-crypt hash")
    return hashed.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait(ready, proc: subprocess.Popen, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"waiting for {what}: it exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"waiting for {what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


if __name__ == "__main__":
    # ./dev hylafax: the same private HylaFAX, on 127.0.0.1:4559 (the engine's default
    # [fax.gateway]), for trying the fax path by hand; Ctrl-C stops it.
    import argparse

    parser = argparse.ArgumentParser(description="a private HylaFAX (hfaxd + faxq, no modem) on loopback")
    parser.add_argument("--port", type=int, default=4559)
    args = parser.parse_args()
    why = available()
    if why:
        raise SystemExit(f"hylafax: {why}")
    base = Path(tempfile.mkdtemp(prefix="hylafax-"))
    base.chmod(0o755)
    try:
        with running(base, port=args.port) as server:
            print(f"hylafax: hfaxd on {server.host}:{server.port}, spool {server.spool} (Ctrl-C stops it)",
                  flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    finally:
        shutil.rmtree(base, ignore_errors=True)
