"""Local EHR stand-ins for the harness: an MLLP receiver that ACKs and records, and an MLLP sender.

Both are python-hl7's asyncio MLLP streams (``hl7.mllp``), not the engine's own code, so a
framing bug in the engine cannot cancel out against the same bug on the other end.

Invariants
----------
* :class:`EhrReceiver` records every frame before it answers it, in arrival order, with the
  exact bytes between VT and FS CR; a frame python-hl7 cannot parse is recorded with the
  error and gets no ACK (there is no MSH to answer).
* Every parsed message gets one AA whose MSA-2 is its MSH-10 (python-hl7's ``create_ack``).
* :func:`send_mllp` reads a whole ACK frame (however TCP splits it) and refuses one whose
  MSA-2 is not the MSH-10 it sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection, start_hl7_server

from .config import LOOPBACK

FRAME_LIMIT = 16 * 2 ** 20   # a consult note with an embedded document is far over asyncio's 64 KiB default


class MllpError(RuntimeError):
    pass


@dataclass(frozen=True)
class Received:
    connection: int        # 1 for the first connection accepted, 2 for the next...
    payload: bytes         # the bytes between VT and FS CR
    message_type: str      # MSH-9, e.g. "MDM^T02" ("" when it could not be parsed)
    control_id: str        # MSH-10
    parse_error: str       # "" when python-hl7 parsed it
    arrived: float         # time.time()


@dataclass(frozen=True)
class Ack:
    code: str              # MSA-1
    control_id: str        # MSA-2: the MSH-10 acknowledged
    text: str              # MSA-3
    raw: bytes


def _parse(payload: bytes):
    # MSH-18 is not consulted: these stand-ins read ids and types, which are ASCII in practice.
    return hl7.parse(payload.decode("utf-8", errors="replace"))


class EhrReceiver:
    """An EHR's inbound MLLP port on its own thread and event loop: ``start()``, ``stop()``, ``port``."""

    def __init__(self, name: str, *, host: str = LOOPBACK, port: int = 0) -> None:
        self.name = name
        self.host = host
        self.port = port
        self._received: list[Received] = []
        self._cond = threading.Condition()
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> "EhrReceiver":
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(
                    start_hl7_server(self._client, self.host, self.port, limit=FRAME_LIMIT))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                failure.append(exc)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"ehr-{self.name}", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        loop = self._loop

        def shutdown() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.stop()

        loop.call_soon_threadsafe(shutdown)
        self._thread.join(10)
        self._thread = None

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def wait_for(self, n: int, timeout: float = 30.0) -> list[Received]:
        """Block until *n* frames have arrived (or the timeout); return all received."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._received) < n and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return list(self._received)

    async def _client(self, reader, writer) -> None:
        with self._cond:
            self._connections += 1
            number = self._connections
        try:
            while True:
                try:
                    block = await reader.readblock()
                except (asyncio.IncompleteReadError, InvalidBlockError, ValueError, ConnectionError):
                    return   # closed, junk outside a frame, or a frame over FRAME_LIMIT: close too
                ack = self._record(number, bytes(block))
                if ack is not None:
                    writer.writeblock(ack)
                    await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    def _record(self, connection: int, payload: bytes) -> bytes | None:
        try:
            message = _parse(payload)
            msh = message.segment("MSH")
            kind, control_id, error = str(msh(9)), str(msh(10)), ""
        except Exception as exc:  # noqa: BLE001 - kept with the reason; the sender's problem
            message, kind, control_id, error = None, "", "", f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._received.append(Received(connection, payload, kind, control_id, error, time.time()))
            self._cond.notify_all()
        return None if message is None else str(message.create_ack("AA")).encode("utf-8")


def send_mllp(host: str, port: int, payload: bytes, *, timeout: float = 10.0) -> Ack:
    """Send one message over MLLP, read its whole ACK, check MSA-2; for a caller without an event loop."""
    return asyncio.run(_exchange(host, port, payload, timeout))


async def _exchange(host: str, port: int, payload: bytes, timeout: float) -> Ack:
    control_id = str(_parse(payload).segment("MSH")(10))
    reader, writer = await asyncio.wait_for(open_hl7_connection(host, port, limit=FRAME_LIMIT), timeout)
    try:
        writer.writeblock(payload)
        await writer.drain()
        try:
            raw = bytes(await asyncio.wait_for(reader.readblock(), timeout))
        except asyncio.TimeoutError:
            raise MllpError(f"no ACK for {control_id} from {host}:{port} within {timeout} s") from None
        except asyncio.IncompleteReadError:
            raise MllpError(f"{host}:{port} closed the connection without an ACK for {control_id}") from None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    msa = _parse(raw).segment("MSA")
    ack = Ack(code=str(msa(1)), control_id=str(msa(2)), text=str(msa(3)) if len(msa) > 3 else "", raw=raw)
    if ack.control_id != control_id:
        raise MllpError(f"ACK for {ack.control_id!r}, not for the {control_id!r} sent")
    return ack
