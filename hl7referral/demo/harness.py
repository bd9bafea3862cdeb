"""Two engines, a mail relay and two EHR stand-ins on 127.0.0.1: the referral loop end to end.

:class:`TwoEngines` runs a referring engine ("referrer") and a specialist engine
("specialist") as real processes (``python -m hl7referral serve``), each in its own
directory with its own store, ``engine.toml``, channels, directory and Direct identity
from the example PKI; a local SMTP relay (:mod:`.relay`) between them; and an MLLP
receiver per engine standing in for its EHR (:mod:`.ehr`)::

    referring EHR --MLLP--> referrer --SMTP--> relay --SMTP--> specialist
    referring EHR <--MLLP-- referrer <--SMTP-- relay <--SMTP-- specialist (MDNs, answers)
                                                              specialist --MLLP--> specialist EHR

Use it as a context manager: everything it started is stopped on the way out, also when
the block fails (and then the engines' log tails are written to stderr).

Invariants
----------
* Every port is on 127.0.0.1 and chosen once, at start: a killed engine restarts on the
  same MLLP and SMTP ports, so the relay's routes and the peers' settings stay right.
* An engine counts as started only when its MLLP listener said so on stdout and its
  inbound SMTP port takes connections; one that exits or is not ready in time fails
  :meth:`TwoEngines.start` with its log tail.
* The harness reads an engine's store only through :mod:`hl7referral.store`, on a
  read-only connection opened and closed for each query: it never writes, never holds a
  snapshot open across the engine's writes, and never locks it out.
* :meth:`TwoEngines.stop` stops everything it started (engines with SIGTERM, then SIGKILL
  if they linger; the relay after draining its deliveries; the EHR stand-ins) and leaves
  no process running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..store import Store
from ..store.loop import Loop
from ..store.outbox import Outbox
from .config import (LOOPBACK, REFERRER_IDENTITY, SPECIALIST_IDENTITY, EnginePorts, EngineSpec, Wiring,
                     loop_events_channel, omg_o19_channel, ref_i12_channel, referrals_in_channel, referrer_settings,
                     specialist_entry, specialist_settings, vet_ref_i12_channel, write_engine)
from .ehr import Ack, EhrReceiver, send_mllp
from .relay import Relay, Route

REFERRER, SPECIALIST = "referrer", "specialist"
LISTENING = re.compile(r"hl7referral: listening on ([\d.]+):(\d+)")
DIRECT_OFF = re.compile(r"Direct transport off: .*")
T = TypeVar("T")


def referrer_spec() -> EngineSpec:
    """The referring practice: REF^I12 from its EHR (and its vet PIMS) and 360X OMG^O19 go by Direct to
    the specialist engine (by NPI, by specialty, or by name); its EHR's cancels go the same way; the note
    comes back to its EHR."""
    return EngineSpec(
        name=REFERRER, identity=REFERRER_IDENTITY, peers=(SPECIALIST,),
        channels={"ref-i12": ref_i12_channel(), "vet-ref-i12": vet_ref_i12_channel(),
                  "omg-o19": omg_o19_channel(), "loop-events": loop_events_channel()},
        directory=lambda w: [specialist_entry(w, SPECIALIST),
                             specialist_entry(w, SPECIALIST, name="Harness Veterinary Cardiology", npi="",
                                              specialty="veterinary cardiology")],
        settings=referrer_settings,
    )


def specialist_spec(*, message: str = "REF^I12", cda: str = "embed") -> EngineSpec:
    """The specialist practice: referrals by Direct are handed to its EHR (REF^I12 or OMG^O19, the C-CDA
    embedded or referenced); its EHR's answers (RRI, OSU, SIU, MDM) go back to the referrer by Direct."""
    return EngineSpec(name=SPECIALIST, identity=SPECIALIST_IDENTITY, peers=(REFERRER,),
                      channels=lambda w: {"referrals-in": referrals_in_channel(w, SPECIALIST, message=message,
                                                                               cda=cda),
                                          "loop-events": loop_events_channel()},
                      settings=specialist_settings)


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """*n* distinct ports free on *host* now (bound together, then released for the engines to take)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def checkout_pki() -> Path:
    """``certs-example/make_certs.py`` beside the package (a checkout); FileNotFoundError elsewhere."""
    script = Path(__file__).resolve().parents[2] / "certs-example" / "make_certs.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: pass pki= (a directory made by certs-example/make_certs.py)")
    return script


def make_pki(out: Path) -> Path:
    """The example PKI in *out* (made by ``make_certs.py``, idempotent); its ``direct/`` directory."""
    done = subprocess.run([sys.executable, str(checkout_pki()), "--out", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"make_certs.py failed: {done.stderr.strip()[-2000:]}")
    return out / "direct"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Engine:
    """One engine process: its directory, ports and log; ``start``, ``stop``, ``kill``, ``restart``."""

    def __init__(self, name: str, home: Path, config: Path, ports: EnginePorts) -> None:
        self.name = name
        self.home = home
        self.config = config
        self.ports = ports
        self.log_path = home / "engine.log"
        self.store_path = home / "store.db"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.down_on_purpose = False   # stopped or killed by the harness's caller, not crashed

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        """Start the process (not waiting for it: see :meth:`wait_ready`)."""
        if self.running:
            raise RuntimeError(f"engine {self.name} is already running (pid {self.proc.pid})")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.down_on_purpose = False
        with open(self.log_path, "ab") as log:
            log.write(f"==== harness: start #{self.starts + 1} of {self.name} at {time.time():.3f}\n".encode())
            log.flush()
            # Own session: a Ctrl-C meant for the demo does not reach the engines half-way; we stop them.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hl7referral", "serve", "--config", str(self.config)],
                cwd=self.home, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.starts += 1

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        mllp = smtp = False
        while True:
            text = self._log_since_start()
            mllp = mllp or any(int(m.group(2)) == self.ports.mllp for m in LISTENING.finditer(text))
            if mllp and not smtp:
                smtp = _accepts(LOOPBACK, self.ports.smtp)
            if mllp and smtp:
                return
            off = DIRECT_OFF.search(text)
            if off or self.proc.poll() is not None or time.monotonic() > deadline:
                if off:
                    why = off.group(0)
                elif self.proc.poll() is not None:
                    why = f"exited with status {self.proc.returncode}"
                else:
                    why = f"not ready in {timeout} s"
                self.kill()
                raise RuntimeError(f"engine {self.name} did not start: {why}\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after *timeout*); the exit status (None if it never ran)."""
        if self.proc is None:
            return None
        self.down_on_purpose = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, nothing is flushed or closed by the engine."""
        self.down_on_purpose = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return f"---- {self.name}: no log\n"
        text = self.log_path.read_text("utf-8", errors="replace").splitlines()[-lines:]
        return f"---- {self.name}: last {len(text)} lines of {self.log_path}\n" + "\n".join(text) + "\n"

    def _log_since_start(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", errors="replace")


class TwoEngines:
    """The harness. ``with TwoEngines(work_dir) as h: h.send("referrer", message) ...``

    *pki*: a ``direct/`` directory made by ``certs-example/make_certs.py`` (default: made
    under *work_dir*). *referrer* / *specialist*: the :class:`EngineSpec` of each side
    (default :func:`referrer_spec`, :func:`specialist_spec`).
    """

    def __init__(self, work_dir: str | Path, *, pki: Path | None = None, referrer: EngineSpec | None = None,
                 specialist: EngineSpec | None = None, start_timeout: float = 30.0) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.pki = pki
        self.specs = {REFERRER: referrer or referrer_spec(), SPECIALIST: specialist or specialist_spec()}
        self.start_timeout = start_timeout
        self.engines: dict[str, Engine] = {}
        self.ehrs: dict[str, EhrReceiver] = {}
        self.relay: Relay | None = None
        self.wiring: Wiring | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> "TwoEngines":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            sys.stderr.write(self.tails())
        self.stop()

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        pki = self.pki or make_pki(self.work_dir / "pki")
        names = list(self.specs)
        numbers = iter(free_ports(2 * len(names)))
        ports = {n: EnginePorts(mllp=next(numbers), smtp=next(numbers)) for n in names}
        for n in names:
            self.ehrs[n] = EhrReceiver(f"{n}-ehr").start()
        routes = {self.specs[n].identity.domain: Route(n, LOOPBACK, ports[n].smtp) for n in names}
        self.relay = Relay(routes).start()
        self.wiring = Wiring(pki=Path(pki).resolve(), relay_port=self.relay.port, ports=ports,
                             dirs={n: self.work_dir / n for n in names},
                             ehr_ports={n: e.port for n, e in self.ehrs.items()},
                             identities={n: s.identity for n, s in self.specs.items()})
        for n in names:
            config = write_engine(self.specs[n], self.wiring)
            self.engines[n] = Engine(n, self.wiring.dirs[n], config, ports[n])
        for engine in self.engines.values():   # both start at once; then wait for each
            engine.spawn()
        for engine in self.engines.values():
            engine.wait_ready(self.start_timeout)

    def stop(self) -> None:
        """Stop everything started, whatever state it is in (safe to call twice)."""
        for engine in self.engines.values():
            engine.stop()
        if self.relay is not None:
            self.relay.stop()
        for ehr in self.ehrs.values():
            ehr.stop()

    def kill(self, engine: str) -> None:
        """SIGKILL one engine (a crash)."""
        self.engines[engine].kill()

    def restart(self, engine: str) -> None:
        """Start one engine again (after :meth:`kill` or a stop) on the same ports, store and config."""
        e = self.engines[engine]
        e.stop()
        e.spawn()
        e.wait_ready(self.start_timeout)

    # -- talking to the engines ------------------------------------------------------------------

    def send(self, engine: str, message: bytes, timeout: float = 10.0) -> Ack:
        """One HL7 message to *engine*'s MLLP listener, as its EHR would send it; the ACK."""
        return send_mllp(LOOPBACK, self.engines[engine].ports.mllp, message, timeout=timeout)

    def cli(self, engine: str, *args: str) -> Any:
        """``hl7referral ARGS --config <engine.toml>``; its stdout read as JSON (pass ``--json``)."""
        command = [sys.executable, "-m", "hl7referral", *args, "--config", str(self.engines[engine].config)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"hl7referral {' '.join(args)} ({engine}) exited {done.returncode}: {done.stderr}")
        return json.loads(done.stdout)

    # -- reading the stores ------------------------------------------------------------------------

    @contextmanager
    def store(self, engine: str) -> Iterator[Store]:
        """*engine*'s store, read-only, for the length of the block."""
        s = Store.open(self.engines[engine].store_path, readonly=True)
        try:
            yield s
        finally:
            s.close()

    def read(self, engine: str, query: Callable[[Store], T]) -> T:
        with self.store(engine) as s:
            return query(s)

    def referral(self, engine: str, referral_id: str) -> dict | None:
        return self.read(engine, lambda s: Loop(s).get(referral_id))

    def state(self, engine: str, referral_id: str) -> str | None:
        row = self.referral(engine, referral_id)
        return row["state"] if row else None

    def loop_events(self, engine: str, referral_id: str) -> list[dict]:
        return self.read(engine, lambda s: Loop(s).event_rows(referral_id))

    def outbox(self, engine: str, *, referral_id: str | None = None, transport: str | None = None,
               state: str | None = None) -> list[dict]:
        """Outbound packets and MDNs, oldest first (``payload`` left out; ``size`` instead)."""
        def query(s: Store) -> list[dict]:
            return Outbox(s).list(limit=10_000, referral_id=referral_id, transport=transport, state=state)
        return self.read(engine, query)[::-1]

    def outbox_row(self, engine: str, outbox_id: int) -> dict | None:
        """One outbox row with its payload (the exact bytes sent)."""
        return self.read(engine, lambda s: Outbox(s).get(outbox_id))

    def mail(self, engine: str) -> list[dict]:
        """Inbound mail, oldest first (``raw`` left out; ``size`` instead)."""
        return self.read(engine, lambda s: Outbox(s).list_mail(limit=10_000))[::-1]

    def mail_row(self, engine: str, mail_id: int) -> dict | None:
        """One inbound mail with its raw bytes and their SHA-256."""
        return self.read(engine, lambda s: Outbox(s).get_mail(mail_id))

    def transport_events(self, engine: str, *, outbox_id: int | None = None, mail_id: int | None = None) -> list[dict]:
        return self.read(engine, lambda s: Outbox(s).events(outbox_id=outbox_id, mail_id=mail_id, limit=10_000))

    # -- waiting and reporting ---------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float = 30.0, what: str = "") -> T:
        """Poll *predicate* until it returns something true; return that (AssertionError on timeout).

        An engine that exits by itself ends the wait at once (its log tail is in the
        message); one stopped or killed through the harness does not.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for e in self.engines.values():
                if e.proc is not None and e.proc.poll() is not None and not e.down_on_purpose:
                    raise AssertionError(f"engine {e.name} exited ({e.proc.returncode}) while waiting for "
                                         f"{what or predicate}\n{e.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
            time.sleep(0.1)

    def tails(self, lines: int = 40) -> str:
        """The last lines of each engine's log and the relay's records: what to print on a failure."""
        out = [e.tail(lines) for e in self.engines.values()]
        if self.relay is not None:
            out.append("---- relay\n" + "".join(r.line() + "\n" for r in self.relay.records()))
        return "".join(out)
