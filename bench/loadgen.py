"""The load generator: a separate process that drives one MLLP server.

``load`` mode opens N connections and keeps exactly one message in flight on
each (send a frame, read until ``<FS><CR>``, check the ACK, send the next).
Everything is prepared before the clock starts: the frame template (cut
around MSH-10, see :mod:`messages`) and every control id it may use. A frame
goes out with one ``sendmsg`` of three buffers, so nothing is copied or built
on the hot path. One thread, raw non-blocking sockets and ``epoll``; the
garbage collector is off while it runs.

Timeline: ``warmup`` seconds (not counted), then ``seconds`` of measurement.
A message counts when it was sent at or after the start of the measurement and
its ACK (a correct AA echoing its MSH-10) arrived before its end; messages still in flight at the end are
drained and checked, not counted. Latency is from the first byte sent to the
last ACK byte received.

The process prints ``measure-start`` and ``measure-end`` lines on stdout as it
crosses those instants (the parent samples the server's CPU there), then one
JSON line with the results.

``idle`` mode opens N connections, prints a JSON line, waits for a line on
stdin, reports how many are still open (not closed by the server), closes
them and prints a second JSON line.

Usage (run.py does this for you):
  python bench/loadgen.py load --port P --connections 8 --size 1.6KB --seconds 5
  python bench/loadgen.py idle --port P --connections 1000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from messages import CONTROL_ID_WIDTH, SIZES, build_template, control_id  # noqa: E402

MAX_RATE = 40_000  # msgs/s across all connections; control ids are pre-built for this
STALL_SECONDS = 10.0  # no progress at all for this long: give up (bounded run)
FS_CR = b"\x1c\r"


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + 64
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def emit(obj) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


def percentile(sorted_values: list[int], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


class Conn:
    __slots__ = ("i", "sock", "fd", "ids", "seq", "cid", "t0", "rbuf", "out", "done")

    def __init__(self, i: int, sock: socket.socket, ids: list[bytes]) -> None:
        self.i = i
        self.sock = sock
        self.fd = sock.fileno()
        self.ids = ids
        self.seq = 0
        self.cid = b""
        self.t0 = 0
        self.rbuf = b""
        self.out = None
        self.done = False


def connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def run_load(host: str, port: int, nconn: int, size: str, seconds: float, warmup: float,
             run: str, scenario: int) -> dict:
    raise_nofile(nconn)
    tmpl = build_template(SIZES[size])
    head, tail, flen = tmpl.head, tmpl.tail, tmpl.frame_bytes
    per_conn = int((seconds + warmup) * MAX_RATE / nconn) + 16
    ids = [[control_id(run, scenario, c, n) for n in range(per_conn)] for c in range(nconn)]
    conns = []
    for c in range(nconn):
        s = connect(host, port)
        s.setblocking(False)
        conns.append(Conn(c, s, ids[c]))
    by_fd = {c.fd: c for c in conns}
    ep = select.epoll()
    EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
    for c in conns:
        ep.register(c.fd, EPOLLIN)

    check_at = 8 + CONTROL_ID_WIDTH  # len(b"\rMSA|AA|") + len(cid)
    ok_after = (13, 124, 28)  # \r, |, <FS>: MSA-2 ends right after the control id
    lat: list[int] = []
    errors = 0
    error_samples: list[str] = []
    warm = 0
    drained = 0
    exhausted = 0
    active = nconn
    clock = time.perf_counter_ns

    gc.collect()
    gc.disable()
    t_start = clock()
    t_measure = t_start + int(warmup * 1e9)
    t_end = t_measure + int(seconds * 1e9)
    measuring = ended = False
    cpu0 = cpu1 = None

    def fail(c: Conn, why: str) -> None:
        nonlocal errors
        errors += 1
        if len(error_samples) < 5:
            error_samples.append(f"conn {c.i} msg {c.cid.decode()}: {why}")

    def send_next(c: Conn, now: int) -> None:
        nonlocal active, exhausted
        if now >= t_end or c.seq >= per_conn:
            if c.seq >= per_conn:
                exhausted += 1
            c.done = True
            active -= 1
            return
        cid = c.ids[c.seq]
        c.seq += 1
        c.cid = cid
        c.t0 = now
        try:
            n = c.sock.sendmsg((head, cid, tail))
        except BlockingIOError:
            n = 0
        if n < flen:
            c.out = memoryview(head + cid + tail)[n:]
            ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    for c in conns:
        send_next(c, clock())
    last_progress = clock()
    stall = int(STALL_SECONDS * 1e9)
    while active > 0:
        events = ep.poll(0.5)
        now = clock()
        if not events:
            if now - last_progress > stall:
                for c in conns:
                    if not c.done:
                        fail(c, f"no ACK within {STALL_SECONDS:.0f}s (stalled)")
                break
            continue
        last_progress = now
        if not measuring and now >= t_measure:
            measuring = True
            cpu0 = os.times()
            emit("measure-start")
        if not ended and now >= t_end:
            ended = True
            cpu1 = os.times()
            emit("measure-end")
        for fd, ev in events:
            c = by_fd[fd]
            if c.done:
                continue
            if ev & EPOLLOUT and c.out is not None:
                try:
                    n = c.sock.send(c.out)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    fail(c, f"send failed: {exc}")
                    c.done = True
                    active -= 1
                    ep.unregister(fd)
                    continue
                c.out = c.out[n:] if n < len(c.out) else None
                if c.out is None:
                    ep.modify(fd, EPOLLIN)
            if ev & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                try:
                    data = c.sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data = b""
                    why = f"recv failed: {exc}"
                else:
                    why = "connection closed by the server"
                if not data:
                    fail(c, why)
                    c.done = True
                    active -= 1
                    ep.unregister(fd)
                    continue
                if c.rbuf:
                    data = c.rbuf + data
                if data[-2:] != FS_CR:
                    c.rbuf = data
                    continue
                c.rbuf = b""
                now = clock()
                i = data.find(b"\rMSA|AA|" + c.cid)
                if i < 0 or data[i + check_at] not in ok_after or data[0] != 11:
                    fail(c, "bad ACK " + repr(data[:240]))  # not counted, not timed
                elif c.t0 >= t_measure:
                    if now <= t_end:
                        lat.append(now - c.t0)
                    else:
                        drained += 1
                else:
                    warm += 1
                send_next(c, now)
    t_done = clock()
    gc.enable()
    if cpu1 is None:
        cpu1 = os.times()
        if not ended:
            emit("measure-end")
    if cpu0 is None:
        cpu0 = cpu1
    for c in conns:
        c.sock.close()
    ep.close()

    lat.sort()
    ms = 1e-6
    client_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {
        "connections": nconn,
        "size": size,
        "frame_bytes": flen,
        "seconds": seconds,
        "warmup": warmup,
        "count": len(lat),
        "msgs_per_s": len(lat) / seconds,
        "mb_per_s": len(lat) * flen / seconds / 1e6,
        "p50_ms": percentile(lat, 50) * ms,
        "p90_ms": percentile(lat, 90) * ms,
        "p99_ms": percentile(lat, 99) * ms,
        "p999_ms": percentile(lat, 99.9) * ms,
        "max_ms": (lat[-1] * ms) if lat else float("nan"),
        "mean_ms": (sum(lat) / len(lat) * ms) if lat else float("nan"),
        "warmup_count": warm,
        "drained": drained,
        "sent": sum(c.seq for c in conns),
        "acked_ok": len(lat) + warm + drained,
        "errors": errors,
        "error_samples": error_samples,
        "exhausted_connections": exhausted,
        "client_cpu_pct": 100.0 * client_cpu / seconds,
        "wall_s": (t_done - t_start) / 1e9,
    }


def run_idle(host: str, port: int, nconn: int) -> None:
    raise_nofile(nconn)
    t0 = time.monotonic()
    socks = []
    failed = 0
    for _ in range(nconn):
        try:
            socks.append(connect(host, port, timeout=5.0))
        except OSError:
            failed += 1
    emit({"opened": len(socks), "connect_failed": failed, "open_s": time.monotonic() - t0})
    sys.stdin.readline()  # the parent reads the server's memory now
    alive = closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            alive += 1
        except OSError:
            closed += 1
    for s in socks:
        s.close()
    emit({"alive": alive, "closed_by_server": closed})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("load", "idle"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.6KB")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--run", default=os.urandom(3).hex(), help="6 hex digits, part of every MSH-10")
    ap.add_argument("--scenario", type=int, default=0)
    a = ap.parse_args()
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("the benchmark only talks to loopback")
    if a.mode == "idle":
        run_idle(a.host, a.port, a.connections)
    else:
        emit(run_load(a.host, a.port, a.connections, a.size, a.seconds, a.warmup, a.run, a.scenario))


if __name__ == "__main__":
    main()
