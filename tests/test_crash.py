"""Crash test: kill -9 the engine at random moments under a retrying sender.

The engine runs as a subprocess on one store. A sender (this test's thread)
sends 2,000 numbered referrals one at a time on a persistent connection; on a
connection error or a missing ACK it reconnects (waiting for the engine to be
back) and resends the same bytes until it gets AA. After every reconnect it
also resends its last acknowledged message once, as a sender unsure of its
last ACK would: that must be answered with the byte-identical stored ACK.

A killer thread SIGKILLs the engine at random moments and restarts it on the
same store (on a new port). Kills are spread over the run by progress (a
seeded sample of message counts) with a random delay on top, so their number
does not depend on how fast the machine is and each lands at a random point
of the send/commit/ACK cycle.

At the end: every message that got AA is stored exactly once as accepted, all
2,000 are, nothing else is, the stored bytes are the bytes sent and the
stored ACK is the ACK the sender received.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine_process import EngineProcess
from hl7referral.send import MLLPClient, SendError
from referral_messages import err_codes, read_ack, referral

MESSAGES = 2000
KILLS = 24
SEED = int(os.environ.get("HL7REFERRAL_CRASH_SEED", "20260101"))  # vary it to explore
DEADLINE_S = 90.0
ACK_TIMEOUT_S = 5.0


class Deadline(AssertionError):
    pass


@dataclass
class Chaos:
    """The running engine, shared by the killer and the sender."""

    tmp_path: Path
    engine: EngineProcess
    deadline: float
    cond: threading.Condition = field(default_factory=threading.Condition)
    generation: int = 0
    acked: int = 0
    done: bool = False
    kills: list[float] = field(default_factory=list)  # seconds into the run
    error: BaseException | None = None
    engines: list[EngineProcess] = field(default_factory=list)

    def current(self) -> tuple[int, str, int]:
        with self.cond:
            self.check()
            return self.generation, self.engine.host, self.engine.port

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"killer failed: {self.error!r}")
        if time.monotonic() > self.deadline:
            raise Deadline(f"crash test passed its {DEADLINE_S:.0f}s deadline "
                           f"({self.acked}/{MESSAGES} acknowledged, {len(self.kills)} kills)")

    def wait_for_restart(self, generation: int) -> None:
        """Block until the engine of ``generation`` has been replaced."""
        with self.cond:
            while self.generation == generation:
                self.check()
                self.cond.wait(timeout=0.05)

    def progress(self, acked: int) -> None:
        with self.cond:
            self.acked = acked
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()


def killer(chaos: Chaos, rng: random.Random, started: float) -> None:
    # Not in the last 200 messages: the sender must not finish during the
    # random delay before a kill (200 fsynced round trips take far longer).
    targets = sorted(rng.sample(range(1, MESSAGES - 200), KILLS))
    try:
        for target in targets:
            with chaos.cond:
                while chaos.acked < target and not chaos.done:
                    if time.monotonic() > chaos.deadline:
                        return
                    chaos.cond.wait(timeout=0.05)
                if chaos.done:
                    return
            # A random moment: a few send/commit/ACK cycles later, or sooner.
            time.sleep(rng.uniform(0.0, 0.03))
            chaos.engine.kill()
            chaos.kills.append(time.monotonic() - started)
            new = EngineProcess.start(chaos.tmp_path, store=chaos.engine.store)
            with chaos.cond:
                chaos.engines.append(new)
                chaos.engine = new
                chaos.generation += 1
                chaos.cond.notify_all()
    except BaseException as exc:  # noqa: BLE001 - reported by the sender
        chaos.error = exc


@dataclass
class Ledger:
    sent: dict[str, bytes] = field(default_factory=dict)
    acks: dict[str, bytes] = field(default_factory=dict)  # control id -> the AA received
    attempts: Counter = field(default_factory=Counter)
    negative: list[tuple[str, bytes]] = field(default_factory=list)
    replays: list[tuple[str, bytes]] = field(default_factory=list)  # (control id, ACK) on a resend
    reconnects: int = 0


def send_all(chaos: Chaos, ledger: Ledger) -> None:
    client: MLLPClient | None = None
    last_acked: str | None = None

    def drop() -> None:
        nonlocal client
        if client is not None:
            client.close()
        client = None

    def exchange(cid: str) -> tuple[bytes | None, object]:
        """Send once; the ACK, or None after dropping a broken connection."""
        try:
            client.send(ledger.sent[cid])
            ack, result = read_ack(client, cid)
        except SendError:
            ack = result = None
        if ack is None:
            drop()
        return ack, result

    try:
        for n in range(MESSAGES):
            cid = f"CRASH{n:05d}"
            ledger.sent[cid] = referral(cid, n)
            while True:
                if client is None:
                    generation, host, port = chaos.current()
                    try:
                        client = MLLPClient(host, port, timeout=ACK_TIMEOUT_S)
                    except SendError:
                        client = None
                    if client is None:
                        chaos.wait_for_restart(generation)  # the engine is down; wait for the new one
                        continue
                    ledger.reconnects += 1
                    if last_acked is not None:
                        ack, result = exchange(last_acked)
                        if ack is None:
                            continue
                        if result.code == "AA":
                            ledger.replays.append((last_acked, ack))
                        else:
                            ledger.negative.append((last_acked, ack))
                chaos.check()
                ledger.attempts[cid] += 1
                ack, result = exchange(cid)
                if ack is None:
                    continue
                if result.code == "AA":
                    ledger.acks[cid] = ack
                    last_acked = cid
                    break
                ledger.negative.append((cid, ack))  # the engine may refuse; the sender retries
                if len(ledger.negative) > 100:
                    raise AssertionError(f"too many negative ACKs, last: {ack!r}")
            chaos.progress(n + 1)
    finally:
        drop()
        chaos.finish()


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    started = time.monotonic()
    rng = random.Random(SEED)
    first = EngineProcess.start(tmp_path)
    chaos = Chaos(tmp_path, first, deadline=started + DEADLINE_S, engines=[first])
    ledger = Ledger()
    thread = threading.Thread(target=killer, args=(chaos, rng, started), name="killer", daemon=True)
    thread.start()
    try:
        send_all(chaos, ledger)
    finally:
        thread.join(timeout=30)
        for e in chaos.engines[:-1]:
            if e.proc.poll() is None:
                e.kill()
        exit_code = chaos.engine.stop()
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), "killer thread did not finish"
    assert chaos.error is None, f"killer failed: {chaos.error!r}"
    assert exit_code == 0, f"engine did not stop cleanly: {chaos.engine.log[-3000:]}"
    assert len(chaos.kills) == KILLS, f"only {len(chaos.kills)} kills happened"
    assert len(ledger.acks) == MESSAGES

    # Every negative reply was a store-failure NAK (retried), never a reject.
    assert all(err_codes(ack) == ["207"] and b"|AR|" in ack for _, ack in ledger.negative), ledger.negative[:3]

    conn = sqlite3.connect(f"file:{first.store}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT control_id, status, raw, ack, duplicates FROM messages").fetchall()
    finally:
        conn.close()

    accepted = Counter(r[0] for r in rows if r[1] == "accepted")
    twice = [cid for cid, k in accepted.items() if k > 1]
    assert twice == [], f"stored twice as accepted: {twice[:10]}"
    missing = [cid for cid in ledger.acks if accepted[cid] != 1]
    assert missing == [], f"acknowledged (AA) but not stored: {missing[:10]}"
    assert sum(accepted.values()) == MESSAGES
    assert set(accepted) == set(ledger.sent)
    assert len(rows) == MESSAGES, Counter(r[1] for r in rows)  # nothing else: no fragments, no conflicts

    stored = {r[0]: r for r in rows}
    for cid, ack in ledger.acks.items():
        _, _, raw, stored_ack, _ = stored[cid]
        assert raw == ledger.sent[cid], f"{cid}: stored bytes differ from the bytes sent"
        # The AA the sender got is the one committed with the message: a
        # resend after a lost ACK got the stored ACK back, byte for byte.
        assert stored_ack == ack, f"{cid}: received {ack!r}, stored {stored_ack!r}"

    # Deliberate resends of the last acknowledged message after each reconnect:
    # each got the byte-identical stored ACK, also across a kill -9 and restart.
    # (A kill can land before the sender is back, so there may be fewer than KILLS.)
    assert ledger.replays, "the sender never reconnected and resent"
    for cid, ack in ledger.replays:
        assert ack == ledger.acks[cid] == stored[cid][3], f"{cid}: replayed ACK differs"
    resent = {cid for cid, k in ledger.attempts.items() if k > 1}
    dup_rows = {cid for cid, r in stored.items() if r[4] > 0}
    assert {cid for cid, _ in ledger.replays} <= dup_rows

    replayed = Counter(cid for cid, _ in ledger.replays)
    # Committed before a kill, but the AA never arrived: the resend was a duplicate.
    lost_acks = {cid for cid in resent if stored[cid][4] > replayed[cid]}
    print(f"\ncrash test (seed {SEED}): {MESSAGES} messages in {elapsed:.1f}s, {len(chaos.kills)} kills at "
          f"{', '.join(f'{t:.2f}' for t in chaos.kills)}s; {len(resent)} messages resent after a failure, "
          f"{len(lost_acks)} of them committed before the kill (AA lost, stored ACK replayed), "
          f"{len(dup_rows)} rows with duplicates > 0, {len(ledger.replays)} deliberate replays, "
          f"{len(ledger.negative)} AR/207, {ledger.reconnects} connections")
