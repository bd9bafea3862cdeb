"""Benchmark the MLLP listener against python-hl7's asyncio MLLP server.

For each message size (1.6 KB and 64 KB REF^I12) and each connection count
(1 and 8, one message in flight per connection) it runs the same load
generator (bench/loadgen.py, its own process) against

* ``engine``: ``python -m hl7referral serve`` on a fresh store (SQLite, WAL,
  synchronous=FULL: every ACK follows a durable commit), and
* ``python-hl7``: bench/peer_python_hl7.py (parse + ACK, nothing stored),

and prints msgs/s, p50/p99 ACK latency and the engine/peer throughput ratio,
then the engine's resident memory with 1,000 idle connections open, and the
issue's targets with PASS/MISS. Exit status: 0 when every ACK was a correct
AA and every ACKed message was found in the store, 1 otherwise (targets
missed do not change it).

  .venv/bin/python bench/run.py                  # full run, about 75 s
  .venv/bin/python bench/run.py --quick          # about 25 s
  .venv/bin/python bench/run.py --out results.json
  .venv/bin/python bench/run.py --profile --skip-peer --sizes 1.6KB   # cProfile the engine

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(HERE))
from messages import SIZES  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
IDLE_CAP = 2000  # listener caps raised for the idle-connections test

TARGETS = {
    "msgs_8": 10_000,  # 1.6 KB, 8 connections
    "msgs_1": 4_000,  # 1.6 KB, 1 connection
    "p99_ms": 5.0,  # 1.6 KB
    "idle_rss_mb": 150.0,  # 1,000 idle connections
}


# -- processes -------------------------------------------------------------------


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@dataclass
class Server:
    """A server subprocess that prints 'listening on HOST:PORT' when ready."""

    name: str
    cmd: list[str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    ready_line: str = ""

    def start(self, timeout: float = 30.0) -> "Server":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, stdout=subprocess.PIPE, stderr=log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     preexec_fn=_raise_nofile)
        log.close()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buf = b""
        try:
            while True:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError(f"{self.name} did not start; see {self.log_path}:\n"
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                if sel.select(timeout=0.1):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    buf += chunk
                    m = re.search(rb"listening on 127\.0\.0\.1:(\d+)[^\n]*", buf)
                    if m:
                        self.port = int(m.group(1))
                        self.ready_line = m.group(0).decode(errors="replace")
                        return self
        finally:
            sel.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def engine_server(workdir: Path, *, profile: Path | None = None, caps: int | None = None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [PY]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    # The listener and the store only: one REF^I12 channel without a mapping. Document
    # building runs after the ACK on its own thread and is measured by bench/cda.py.
    (workdir / "channels").mkdir(exist_ok=True)
    (workdir / "channels" / "ref-i12.toml").write_text(
        'name = "bench-ref-i12"\n[source]\nlistener = "main"\naccept = ["REF^I12"]\n')
    (workdir / "engine.toml").write_text('[channels]\ndir = "channels"\n')
    cmd += ["-m", "hl7referral", "serve", "--config", str(workdir / "engine.toml"),
            "--store", str(workdir / "engine.db"),
            "--listen", "tcp:0:interface=127.0.0.1", "--set", 'log.level="warn"']
    if caps:
        cmd += ["--set", f"listeners.0.max_connections={caps}",
                "--set", f"listeners.0.max_connections_per_peer={caps}"]
    return Server("engine", cmd, workdir, workdir / "engine.log")


def peer_server(workdir: Path) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    return Server("python-hl7", [PY, str(HERE / "peer_python_hl7.py")], workdir, workdir / "peer.log")


# -- /proc -------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) in kB, Threads."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def thread_cpu(pid: int) -> dict[int, int]:
    """Clock ticks (user + system) per thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def system_busy_ticks() -> int:
    """Non-idle clock ticks of the whole machine (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # minus idle and iowait


def wait_quiet(max_wait: float, limit_pct: float = 15.0) -> float | None:
    """Wait (at most ``max_wait`` s) until the machine is nearly idle; seconds waited, None if never."""
    t0 = time.monotonic()
    while True:
        a = system_busy_ticks()
        time.sleep(0.5)
        if 100 * (system_busy_ticks() - a) / TICK / 0.5 < limit_pct:
            return time.monotonic() - t0
        if time.monotonic() - t0 >= max_wait:
            return None


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


# -- one load scenario -----------------------------------------------------------


def run_load(server: Server, *, size: str, connections: int, seconds: float, warmup: float,
             run_id: str, scenario: int) -> dict:
    cmd = [PY, str(HERE / "loadgen.py"), "load", "--port", str(server.port),
           "--connections", str(connections), "--size", size, "--seconds", str(seconds),
           "--warmup", str(warmup), "--run", run_id, "--scenario", str(scenario)]
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_raise_nofile)
    cpu0 = cpu1 = None
    t0 = t1 = 0.0
    result = None
    deadline = time.monotonic() + seconds + warmup + 90
    try:
        for line in gen.stdout:
            line = line.strip()
            if line == "measure-start":
                cpu0, t0, sys0 = thread_cpu(server.pid), time.monotonic(), system_busy_ticks()
            elif line == "measure-end":
                cpu1, t1, sys1 = thread_cpu(server.pid), time.monotonic(), system_busy_ticks()
            elif line.startswith("{"):
                result = json.loads(line)
            if time.monotonic() > deadline:
                break
        gen.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    if result is None:
        raise RuntimeError(f"load generator failed (exit {gen.returncode}) against {server.name}")
    result["server"] = server.name
    if cpu0 and cpu1 and t1 > t0:
        wall = t1 - t0
        main = (cpu1.get(server.pid, 0) - cpu0.get(server.pid, 0)) / TICK
        total = sum(cpu1.values()) / TICK - sum(v for k, v in cpu0.items() if k in cpu1) / TICK
        result["server_cpu_pct"] = 100 * total / wall
        result["server_main_thread_cpu_pct"] = 100 * main / wall
        result["server_other_threads_cpu_pct"] = max(0.0, 100 * (total - main) / wall)
        result["server_cpu_us_per_msg"] = 1e6 * total / max(1, result["count"]) * (seconds / wall)
        # Whatever else ran on the machine meanwhile (other processes, kernel
        # work not charged to either): a noisy machine makes the figures low.
        busy = 100 * (sys1 - sys0) / TICK / wall
        result["other_cpu_pct"] = max(0.0, busy - result["server_cpu_pct"] - result["client_cpu_pct"])
    st = proc_status(server.pid)
    result["server_rss_mb"] = st.get("VmRSS", 0) / 1024
    result["server_peak_rss_mb"] = st.get("VmHWM", 0) / 1024
    return result


def store_check(db: Path) -> dict:
    """Rows in the store after the engine stopped, and its size on disk."""
    out = {"store_bytes": sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            out["stored_accepted"] = conn.execute(
                "SELECT count(*) FROM messages WHERE status = 'accepted'").fetchone()[0]
            out["stored_total"] = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        out["store_error"] = str(exc)
    return out


# -- idle connections --------------------------------------------------------------


def run_idle(server: Server, connections: int, settle: float = 1.0) -> dict:
    time.sleep(settle)
    before = proc_status(server.pid)
    fds_before = fd_count(server.pid)
    cmd = [PY, str(HERE / "loadgen.py"), "idle", "--port", str(server.port), "--connections", str(connections)]
    gen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           preexec_fn=_raise_nofile)
    try:
        opened = json.loads(gen.stdout.readline())
        time.sleep(settle)
        during = proc_status(server.pid)
        fds_during = fd_count(server.pid)
        gen.stdin.write("\n")
        gen.stdin.flush()
        alive = json.loads(gen.stdout.readline())
        gen.wait(timeout=30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    return {
        "server": server.name,
        "connections": connections,
        **opened,
        **alive,
        "server_fds_opened": fds_during - fds_before,
        "rss_before_mb": before["VmRSS"] / 1024,
        "rss_mb": during["VmRSS"] / 1024,
        "kb_per_connection": (during["VmRSS"] - before["VmRSS"]) / max(1, connections),
    }


# -- output ------------------------------------------------------------------------


def fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def scenario_name(r: dict) -> str:
    return f"{r['size']:>5} x {r['connections']} conn"


def print_tables(results: list[dict], idle: list[dict]) -> None:
    peers = {(r["size"], r["connections"]): r for r in results if r["server"] == "python-hl7"}
    print()
    print(f"{'scenario':<16} {'server':<11} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
          f"{'max ms':>8} {'errors':>6} {'engine/peer':>12}")
    for r in results:
        ratio = ""
        if r["server"] == "engine":
            p = peers.get((r["size"], r["connections"]))
            if p and p["msgs_per_s"]:
                ratio = f"{r['msgs_per_s'] / p['msgs_per_s']:.2f}x"
        print(f"{scenario_name(r):<16} {r['server']:<11} {fmt(r['msgs_per_s'], 0):>9} {fmt(r['p50_ms']):>8} "
              f"{fmt(r['p99_ms']):>8} {fmt(r['p999_ms']):>9} {fmt(r['max_ms'], 1):>8} {r['errors']:>6} {ratio:>12}")
    print()
    print(f"{'scenario':<16} {'server':<11} {'CPU %':>6} {'main thr':>9} {'other thr':>9} "
          f"{'CPU us/msg':>10} {'client CPU %':>12} {'other CPU %':>11} {'peak RSS MB':>11} "
          f"{'MB/s in':>8} {'stored':>9}")
    for r in results:
        stored = ""
        if "stored_accepted" in r:
            stored = f"{r['stored_accepted']:,}"
        print(f"{scenario_name(r):<16} {r['server']:<11} {fmt(r.get('server_cpu_pct'), 0):>6} "
              f"{fmt(r.get('server_main_thread_cpu_pct'), 0):>9} {fmt(r.get('server_other_threads_cpu_pct'), 0):>9} "
              f"{fmt(r.get('server_cpu_us_per_msg'), 0):>10} {fmt(r['client_cpu_pct'], 0):>12} "
              f"{fmt(r.get('other_cpu_pct'), 0):>11} "
              f"{fmt(r.get('server_peak_rss_mb'), 1):>11} {fmt(r['mb_per_s'], 1):>8} {stored:>9}")
    busy = [r for r in results if (r.get("other_cpu_pct") or 0) > 15]
    if busy:
        print("warning: other work used the CPUs during "
              + ", ".join(f"{scenario_name(r)} {r['server']} ({r['other_cpu_pct']:.0f}%)" for r in busy)
              + "; those figures are low; run again on a quiet machine")
    for i in idle:
        print()
        print(f"{i['server']}: {i['opened']:,} idle connections open ({i['alive']:,} still open after 1 s, "
              f"{i['server_fds_opened']:,} new fds in the server): RSS {i['rss_mb']:.1f} MB "
              f"(before {i['rss_before_mb']:.1f} MB, {i['kb_per_connection']:.1f} kB per connection)")


def evaluate_targets(results: list[dict], idle: list[dict]) -> list[dict]:
    by = {(r["server"], r["size"], r["connections"]): r for r in results}
    out = []

    def add(what: str, value, target: str, ok: bool) -> None:
        out.append({"target": what, "value": value, "goal": target, "ok": ok})

    for n, key in ((8, "msgs_8"), (1, "msgs_1")):
        r = by.get(("engine", "1.6KB", n))
        if r:
            add(f"1.6KB, {n} conn: msgs/s", round(r["msgs_per_s"]), f">= {TARGETS[key]:,}",
                r["msgs_per_s"] >= TARGETS[key] and r["errors"] == 0)
    for n in (1, 8):
        r = by.get(("engine", "1.6KB", n))
        if r:
            add(f"1.6KB, {n} conn: p99 ms", round(r["p99_ms"], 2), f"<= {TARGETS['p99_ms']}",
                r["p99_ms"] <= TARGETS["p99_ms"])
    for i in idle:
        if i["server"] == "engine":
            add(f"RSS with {i['connections']:,} idle conns, MB", round(i["rss_mb"], 1),
                f"< {TARGETS['idle_rss_mb']:.0f}",
                i["rss_mb"] < TARGETS["idle_rss_mb"] and i["alive"] == i["connections"])
    return out


# -- main ----------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario (default 5)")
    ap.add_argument("--warmup", type=float, default=None, help="unmeasured seconds first (default 0.5)")
    ap.add_argument("--quick", action="store_true", help="1 s per scenario, 0.2 s warm-up")
    ap.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--connections", default="1,8", help="comma-separated connection counts (default 1,8)")
    ap.add_argument("--idle-connections", type=int, default=1000, help="0 skips the memory test")
    ap.add_argument("--skip-peer", action="store_true", help="do not run python-hl7")
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the run's temp dir (default: $TMPDIR or /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the stores and logs")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each scenario, wait up to SECONDS for other work on the machine to stop "
                         "(for shared machines; default 0: do not wait)")
    ap.add_argument("--profile", action="store_true",
                    help="run the engine under cProfile (reactor thread); numbers are then NOT representative")
    a = ap.parse_args()
    seconds = 1.0 if a.quick else a.seconds
    warmup = a.warmup if a.warmup is not None else (0.2 if a.quick else 0.5)
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r} (known: {', '.join(SIZES)})")
    conns = [int(c) for c in a.connections.split(",") if c.strip()]
    if a.idle_connections > IDLE_CAP:
        ap.error(f"--idle-connections is at most {IDLE_CAP}")

    base = Path(tempfile.mkdtemp(prefix="hl7referral-bench-", dir=a.tmp))
    run_id = os.urandom(3).hex()
    meta = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "tmp_dir": str(base),
        "tmp_fs": fs_type(base),
        "seconds": seconds,
        "warmup": warmup,
        "run_id": run_id,
        "profile": a.profile,
    }
    print(f"hl7referral bench: Python {meta['python']}, {meta['cpus']} CPUs, {seconds:g} s per scenario "
          f"(+{warmup:g} s warm-up); stores in {base} ({meta['tmp_fs']}); run id {run_id}")
    load1 = os.getloadavg()[0]
    meta["loadavg_1min"] = load1
    if load1 > 0.5:
        print(f"warning: load average {load1:.2f} before the run: other work is using the CPUs")
    if a.profile:
        print("profiling the engine with cProfile: throughput and latency below are NOT representative")
    sys.stdout.flush()

    results: list[dict] = []
    idle: list[dict] = []
    failures: list[str] = []
    peer = None
    scenario = 0
    try:
        if not a.skip_peer:
            peer = peer_server(base / "peer").start()

        def quiet() -> None:
            if a.wait_quiet > 0 and wait_quiet(a.wait_quiet) is None:
                print(f"  (machine still busy after waiting {a.wait_quiet:g} s; running anyway)", flush=True)

        for size in sizes:
            for n in conns:
                quiet()
                scenario += 1
                workdir = base / f"engine-{size}-{n}"
                prof = workdir / "engine.prof" if a.profile else None
                engine = engine_server(workdir, profile=prof).start()
                try:
                    r = run_load(engine, size=size, connections=n, seconds=seconds, warmup=warmup,
                                 run_id=run_id, scenario=scenario)
                finally:
                    engine.stop()
                r.update(store_check(workdir / "engine.db"))
                r["store"] = str(workdir / "engine.db")
                # Every AA the client saw must be a committed row (commit, then ACK).
                if r.get("stored_accepted", -1) < r["acked_ok"]:
                    r["errors"] += 1
                    r["error_samples"].append(f"store holds {r.get('stored_accepted')} accepted messages, "
                                              f"{r['acked_ok']} were ACKed AA")
                if prof is not None:
                    r["profile"] = str(prof)
                    r["profile_top"] = str(write_profile_summary(prof))
                results.append(r)
                progress(r)
                if not a.keep and not a.profile:
                    shutil.rmtree(workdir, ignore_errors=True)
                if peer is not None:
                    quiet()
                    scenario += 1
                    r = run_load(peer, size=size, connections=n, seconds=seconds, warmup=warmup,
                                 run_id=run_id, scenario=scenario)
                    results.append(r)
                    progress(r)
        if a.idle_connections:
            quiet()
            workdir = base / "engine-idle"
            engine = engine_server(workdir, caps=IDLE_CAP).start()
            try:
                idle.append(run_idle(engine, a.idle_connections))
            finally:
                engine.stop()
            if not a.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            if peer is not None:
                idle.append(run_idle(peer, a.idle_connections))
    finally:
        if peer is not None:
            peer.stop()

    for r in results:
        if r["errors"]:
            failures.append(f"{scenario_name(r)} {r['server']}: {r['errors']} error(s): "
                            + "; ".join(r["error_samples"][:3]))
    for i in idle:
        if i["alive"] != i["connections"]:
            failures.append(f"idle {i['server']}: only {i['alive']} of {i['connections']} connections stayed open")

    print_tables(results, idle)
    targets = evaluate_targets(results, idle)
    if targets:
        print()
        print("targets (engine, durable commits):")
        for t in targets:
            print(f"  {t['target']:<36} {t['value']:>10,} {t['goal']:>10}  {'PASS' if t['ok'] else 'MISS'}")
    if a.profile:
        print()
        for r in results:
            if "profile_top" in r:
                print(f"profile {scenario_name(r)}: {r['profile_top']}")
    if failures:
        print()
        print("FAILED:")
        for f in failures:
            print(f"  {f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"meta": meta, "scenarios": results, "idle": idle, "targets": targets,
                                     "failed": failures}, indent=2))
        print(f"\nresults written to {a.out}")
    if not a.keep and not a.profile:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"stores, logs and profiles kept in {base}")
    return 1 if failures else 0


def progress(r: dict) -> None:
    print(f"  {scenario_name(r):<16} {r['server']:<11} {r['msgs_per_s']:>9,.0f} msgs/s  "
          f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}", flush=True)


def write_profile_summary(prof: Path, top: int = 40) -> Path:
    """The engine's cProfile (main = reactor thread), top functions by own time and cumulative."""
    import io
    import pstats

    out = prof.with_suffix(".txt")
    buf = io.StringIO()
    st = pstats.Stats(str(prof), stream=buf)
    st.strip_dirs().sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    out.write_text(buf.getvalue())
    return out


if __name__ == "__main__":
    sys.exit(main())
