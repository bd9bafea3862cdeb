"""Run the engine as a real subprocess for integration tests.

``EngineProcess.start(tmp_path, ...)`` runs ``python -m hl7referral serve`` on
an ephemeral port on 127.0.0.1 with its own store, waits for the "listening
on" line and exposes the port. ``kill()`` is SIGKILL (crash tests),
``stop()`` is SIGTERM and waits.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "corpus" / "hl7" / "public"


@dataclass
class EngineProcess:
    proc: subprocess.Popen
    store: Path
    host: str
    port: int
    stderr_path: Path
    ports: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, tmp_path: Path, *args: str, store: Path | None = None,
              listen: list[str] | None = None, timeout: float = 20.0) -> "EngineProcess":
        store = store or tmp_path / "engine.db"
        listen = listen if listen is not None else ["tcp:0:interface=127.0.0.1"]
        cmd = [sys.executable, "-m", "hl7referral", "serve", "--store", str(store)]
        for e in listen:
            cmd += ["--listen", e]
        cmd += list(args)
        stderr_path = tmp_path / f"engine-{time.monotonic_ns()}.log"
        err = open(stderr_path, "wb")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=tmp_path,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        err.close()
        ports: list[int] = []
        host = "127.0.0.1"
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        while len(ports) < len(listen):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"engine did not start: {stderr_path.read_text()[-2000:]}")
            if sel.select(timeout=0.1):
                chunk = os.read(proc.stdout.fileno(), 4096)
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    m = LISTENING.search(line)
                    if m and int(m.group(2)) not in ports:
                        host = m.group(1)
                        ports.append(int(m.group(2)))
        sel.close()
        return cls(proc, store, host, ports[0], stderr_path, ports)

    @property
    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
