"""The comparison peer: python-hl7's asyncio MLLP server (parse + ACK, nothing stored).

Each frame is read with ``HL7StreamReader.readmessage()`` (MLLP unframing and
a full ``hl7.parse``), answered with ``message.create_ack()`` written by
``HL7StreamWriter.writemessage()``. No store, no fsync: this is the cost of
the Python MLLP stack alone, the floor a durable engine is compared against.

``limit`` is raised from asyncio's 64 KiB default, which would refuse the
64 KB referral (the limit counts the frame without its ``<FS><CR>``).

Prints ``peer: listening on 127.0.0.1:PORT`` when ready; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import hl7
import hl7.mllp

LIMIT = 4 * 1024 * 1024


async def handle(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
    try:
        while True:
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away
    except Exception as exc:  # noqa: BLE001 - a bad frame closes this connection only
        print(f"peer: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await hl7.mllp.start_hl7_server(handle, "127.0.0.1", port, limit=LIMIT, backlog=1024)
    host, bound = server.sockets[0].getsockname()[:2]
    print(f"peer: listening on {host}:{bound} (python-hl7 {hl7.__version__})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    asyncio.run(main(ap.parse_args().port))
