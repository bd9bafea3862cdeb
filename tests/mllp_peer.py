"""A misbehaving MLLP receiver on real TCP (127.0.0.1), for the outbound sender's tests.

Plain sockets and threads, no Twisted: the sender under test runs on Twisted, so the
peer is an independent implementation (its own framing by ``VT ... FS CR``, python-hl7
for parsing and for building ACKs with ``create_ack``), and a bug cannot cancel out on
both ends.

Behaviours, chosen per received message (``peer.plan(control_id, "no-ack", "aa")``:
the first arrival of that control id gets "no-ack", the second "aa", later ones
``peer.default``)::

    aa ae ar ca        one ACK with that MSA-1
    late:<seconds>     AA after a delay (the connection thread sleeps: nothing else is read)
    wrong-id           an AA whose MSA-2 is another control id, nothing else
    wrong-then-aa      that, then the right AA (separate writes)
    not-ack-then-aa    a frame that is no ACK (no MSA), then the right AA
    two-acks           the same AA twice, in one write
    dribble            AA written one byte at a time (TCP_NODELAY, 2 ms apart)
    no-ack             nothing
    close              close the connection without an ACK

``Peer(ssl_context=...)`` speaks TLS (a server-side ``ssl.SSLContext``) with the same behaviours.

Every frame is recorded (:class:`Received`) before the peer answers, with the time it
arrived and the time its first answer byte was written, so tests can assert that
nothing was lost, nothing duplicated except documented resends, and that the sender
never had two messages outstanding on one connection.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from typing import NamedTuple

import hl7

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


class Received(NamedTuple):
    connection: int  # 1 for the first connection accepted, 2 for the next...
    payload: bytes  # exactly the bytes between VT and FS CR
    control_id: str  # MSH-10, as python-hl7 reads it ("" when it could not parse)
    behaviour: str
    parse_error: str  # "" when python-hl7 parsed the payload
    arrived: float  # time.monotonic()
    answered: float | None  # when the first answer byte was written (None: no answer)


class Peer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_context=None) -> None:
        self.host = host
        self.ssl_context = ssl_context  # an ssl.SSLContext (server side) to speak TLS
        self.default = "aa"
        self._plans: dict[str, deque[str]] = {}
        self._received: list[Received] = []
        self._cond = threading.Condition()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.connections = 0
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.port = self.listener.getsockname()[1]

    # -- control -------------------------------------------------------------

    def start(self) -> "Peer":
        self.listener.listen(16)
        t = threading.Thread(target=self._accept_loop, name=f"mllp-peer-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            _close(c)
        for t in self._threads:
            t.join(timeout=5)

    def plan(self, control_id: str, *behaviours: str) -> None:
        with self._cond:
            self._plans.setdefault(control_id, deque()).extend(behaviours)

    # -- what was received -----------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def payloads(self) -> list[bytes]:
        return [r.payload for r in self.received]

    def control_ids(self) -> list[str]:
        return [r.control_id for r in self.received]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until ``n`` frames have arrived (or the timeout); return all received."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._received) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self._received)

    # -- serving -------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._cond:
                self.connections += 1
                number = self.connections
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, number), daemon=True,
                                 name=f"mllp-peer-{self.port}-{number}")
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(conn, server_side=True)
                with self._cond:
                    self._conns.append(conn)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while True:
                    start = buf.find(VT)
                    end = buf.find(FS + CR, start + 1) if start >= 0 else -1
                    if end < 0:
                        break
                    payload, buf = buf[start + 1 : end], buf[end + 2 :]
                    if not self._handle(conn, number, payload):
                        return
        except (OSError, ssl.SSLError):
            return
        finally:
            _close(conn)

    def _handle(self, conn: socket.socket, number: int, payload: bytes) -> bool:
        arrived = time.monotonic()
        try:
            message = hl7.parse(payload.decode("utf-8"))
            control_id, parse_error = str(message["MSH.F10"]), ""
        except Exception as exc:  # noqa: BLE001 - record it; the test decides
            message, control_id, parse_error = None, "", f"{type(exc).__name__}: {exc}"
        with self._cond:
            plan = self._plans.get(control_id)
            behaviour = plan.popleft() if plan else self.default
            index = len(self._received)
            self._received.append(Received(number, payload, control_id, behaviour, parse_error, arrived, None))
            self._cond.notify_all()

        def answered() -> None:
            with self._cond:
                self._received[index] = self._received[index]._replace(answered=time.monotonic())

        if message is None:
            return True
        try:
            return self._act(conn, behaviour, message, control_id, answered)
        except OSError:
            return False  # the sender dropped the connection (a late ACK, typically)

    def _act(self, conn, behaviour: str, message, control_id: str, answered) -> bool:
        if behaviour in ("aa", "ae", "ar", "ca"):
            answered()
            conn.sendall(frame(ack(message, behaviour.upper())))
        elif behaviour.startswith("late:"):
            time.sleep(float(behaviour.split(":", 1)[1]))
            answered()
            conn.sendall(frame(ack(message, "AA")))
        elif behaviour == "wrong-id":
            answered()
            conn.sendall(frame(ack(message, "AA", acked="NOT-" + control_id)))
        elif behaviour == "wrong-then-aa":
            answered()
            conn.sendall(frame(ack(message, "AA", acked="NOT-" + control_id)))
            time.sleep(0.02)
            conn.sendall(frame(ack(message, "AA")))
        elif behaviour == "not-ack-then-aa":
            answered()
            conn.sendall(b"junk before a frame" + frame(b"MSH|^~\\&|EHR|CLINIC|||20260101||ADT^A08|X1|P|2.5.1\r"))
            time.sleep(0.02)
            conn.sendall(frame(ack(message, "AA")))
        elif behaviour == "two-acks":
            answered()
            conn.sendall(frame(ack(message, "AA")) * 2)
        elif behaviour == "dribble":
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answered()
            for byte in frame(ack(message, "AA")):
                conn.sendall(bytes([byte]))
                time.sleep(0.002)
        elif behaviour == "no-ack":
            pass
        elif behaviour == "close":
            _close(conn)
            return False
        else:
            raise AssertionError(f"unknown peer behaviour {behaviour!r}")
        return True


def ack(message, code: str, acked: str | None = None) -> bytes:
    """python-hl7's ACK for ``message`` (MSA-2 = its MSH-10 unless ``acked`` is given)."""
    reply = message.create_ack(code)
    if acked is not None:
        reply.segment("MSA")[2] = acked
    return str(reply).encode("utf-8")


def frame(payload: bytes) -> bytes:
    return VT + payload + FS + CR


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def refused_port(host: str = "127.0.0.1") -> int:
    """A port with nothing listening (bound, then released)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port
