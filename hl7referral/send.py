"""``hl7referral send``: a blocking MLLP client that reads whole ACKs.

It reads until a complete frame or the deadline (python-hl7's client reads once
and misses a split ACK, #44), checks MSA-2 against the MSH-10 it sent (a late
ACK for another message must not count, Mirth #1441), and reports one line per
message.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from .v2.framer import Frame, FrameTooLarge, MLLPFramer, encode_frame
from .v2.header import BOM, BrokenHeader, NotHL7, read_header, split_segments

POSITIVE = {"AA", "CA"}


class SendError(RuntimeError):
    pass


@dataclass(frozen=True)
class Result:
    control_id: str
    code: str  # MSA-1, or "-" when no ACK was expected / received
    text: str
    ok: bool

    def line(self) -> str:
        return f"{self.control_id or '(no MSH-10)'}\t{self.code}\t{self.text}".rstrip()


def read_messages(path: str | Path) -> list[bytes]:
    """Messages in a file: MLLP-framed, or plain text with each message starting at MSH.

    File-loaded text is normalised to CR segment separators (never done to
    MLLP traffic) and a UTF-8 BOM is dropped.
    """
    data = Path(path).read_bytes()
    if b"\x0b" in data and b"\x1c" in data:
        return [e.payload for e in MLLPFramer(64 * 1024 * 1024).feed(data) if isinstance(e, Frame)]
    data = data.replace(BOM, b"")
    data = data.replace(b"\r\n", b"\r") if b"\r" in data else data.replace(b"\n", b"\r")
    messages: list[list[bytes]] = []
    for segment in data.split(b"\r"):
        if not segment.strip():
            continue
        if segment.startswith(b"MSH") or not messages:
            messages.append([])
        messages[-1].append(segment)
    return [b"\r".join(segs) + b"\r" for segs in messages]


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.load_default_certs()
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class MLLPClient:
    def __init__(self, host: str, port: int, *, timeout: float = 10.0,
                 context: ssl.SSLContext | None = None, server_name: str | None = None) -> None:
        self.timeout = timeout
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=server_name or host)
        except ssl.SSLError as exc:
            raise SendError(f"TLS with {host}:{port} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise SendError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        self.sock = sock
        self.framer = MLLPFramer(64 * 1024 * 1024)
        self._frames: list[bytes] = []

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "MLLPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, payload: bytes) -> None:
        try:
            self.sock.sendall(encode_frame(payload))
        except OSError as exc:
            raise SendError(f"send failed: {exc.strerror or exc}") from None

    def read_frame(self, timeout: float | None = None) -> bytes | None:
        """The next whole frame, or None at the deadline or when the peer closes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._frames:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            except OSError as exc:
                raise SendError(f"receive failed: {exc.strerror or exc}") from None
            if not data:
                return None
            for event in self.framer.feed(data):
                if isinstance(event, Frame):
                    self._frames.append(event.payload)
                elif isinstance(event, FrameTooLarge):
                    raise SendError("ACK larger than 64 MiB")
        return self._frames.pop(0)

    def exchange(self, payload: bytes) -> Result:
        try:
            header = read_header(payload)
            control_id = header.control_id
            no_ack = header.accept_ack_type == "NE"
        except (NotHL7, BrokenHeader):
            control_id, no_ack = "", False
        self.send(payload)
        if no_ack:
            return Result(control_id, "-", "sent; no accept ACK requested (MSH-15=NE)", True)
        ack = self.read_frame()
        if ack is None:
            return Result(control_id, "-", f"no ACK within {self.timeout:g}s", False)
        return interpret_ack(ack, control_id)


def interpret_ack(ack: bytes, control_id: str) -> Result:
    try:
        h = read_header(ack)
    except (NotHL7, BrokenHeader) as exc:
        return Result(control_id, "-", f"unreadable ACK: {exc}", False)
    text = ack.decode("utf-8", errors="replace")
    f, c = h.delimiters.field, h.delimiters.component
    msa = err_text = ""
    code = "-"
    for seg in split_segments(text):
        fields = seg.split(f)
        if fields[0] == "MSA":
            code = fields[1] if len(fields) > 1 else "-"
            msa = fields[2] if len(fields) > 2 else ""
            err_text = fields[3] if len(fields) > 3 else ""
        elif fields[0] == "ERR" and not err_text:
            if len(fields) > 8 and fields[8]:
                err_text = fields[8]
            elif len(fields) > 3:
                err_text = fields[3].split(c)[1] if c in fields[3] else fields[3]
            elif len(fields) > 1:
                err_text = fields[1]
    if msa != control_id:
        return Result(control_id, code, f"ACK is for control id {msa!r}, not this message", False)
    return Result(control_id, code, err_text, code in POSITIVE)
