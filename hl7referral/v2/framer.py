"""MLLP framing as a sans-I/O object: bytes in, events out.

A frame is ``<VT> payload <FS> <CR>`` (0x0B ... 0x1C 0x0D). The framer never
touches a socket; the Twisted protocol feeds it whatever a read returned.

Invariants
----------
* Chunking invariance: any split of the same byte stream yields the same events
  (the hypothesis test in ``tests/test_framer.py`` checks this).
* The frame ends at ``<FS>``: FS may not occur in HL7 content, so a frame is
  delivered the moment its FS arrives, never later (an ACK must not wait for a
  timeout or for the next read, connect #1227). The ``<CR>`` that should follow
  is consumed; an ``<LF>`` after that ``<CR>`` is tolerated silently
  (``<FS><CR><LF>`` senders, connect #510); any other byte instead of ``<CR>``
  is reported once as :class:`MissingCR` and processing continues (policy:
  lenient, logged).
* Bytes outside a frame (before ``<VT>``, NULs and blank lines between frames)
  are never merged into a frame; they are reported as :class:`Junk`.
* A ``<VT>`` inside an open frame abandons the partial frame
  (:class:`FrameAbandoned`) and starts a new one.
* Memory is bounded: the buffer never holds more than ``max_frame`` bytes. A
  frame that would exceed it yields :class:`FrameTooLarge` (with the first
  bytes, so the caller can still read MSH and NAK) and the framer stops: every
  later ``feed`` returns nothing, and the caller closes the connection.
* Work is linear in the input: each byte is scanned once (``bytes.find`` from
  the current position; the buffer is never rescanned).
"""

from __future__ import annotations

from dataclasses import dataclass

VT = b"\x0b"
FS = b"\x1c"
CR = b"\r"
LF = b"\n"
_VT, _FS, _CR, _LF = 0x0B, 0x1C, 0x0D, 0x0A

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
PREFIX_KEPT = 4096  # bytes of an oversized frame kept to read its MSH


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame's payload (without VT/FS/CR)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Junk:
    """Bytes seen outside any frame."""

    length: int
    sample: bytes  # at most 32 bytes, for the log (never content of a frame)


@dataclass(frozen=True, slots=True)
class FrameAbandoned:
    """A <VT> arrived inside an open frame; the partial frame was dropped."""

    length: int


@dataclass(frozen=True, slots=True)
class MissingCR:
    """<FS> was not followed by <CR>; the frame was delivered anyway."""


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """The frame grew past ``max_frame``; the framer is now closed."""

    prefix: bytes
    limit: int


Event = Frame | Junk | FrameAbandoned | MissingCR | FrameTooLarge

_OUTSIDE, _IN_FRAME, _AFTER_FS, _AFTER_CR, _CLOSED = range(5)


class MLLPFramer:
    """Turns a byte stream into MLLP events. One instance per connection."""

    __slots__ = ("max_frame", "_state", "_buf")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 16:
            raise ValueError("max_frame must be at least 16 bytes")
        self.max_frame = max_frame
        self._state = _OUTSIDE
        self._buf = bytearray()

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not yet ended."""
        return self._state == _IN_FRAME

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        pos = 0
        n = len(data)
        buf = self._buf
        while pos < n:
            state = self._state
            if state == _IN_FRAME:
                fs = data.find(FS, pos)
                end = fs if fs >= 0 else n
                vt = data.find(VT, pos, end)
                if vt >= 0:
                    events.append(FrameAbandoned(len(buf) + vt - pos))
                    buf.clear()
                    pos = vt + 1
                    continue
                if len(buf) + (end - pos) > self.max_frame:
                    keep = buf[:PREFIX_KEPT] + data[pos : pos + max(0, PREFIX_KEPT - len(buf))]
                    events.append(FrameTooLarge(bytes(keep[:PREFIX_KEPT]), self.max_frame))
                    buf.clear()
                    self._state = _CLOSED
                    return events
                if fs < 0:
                    buf += data[pos:]
                    return events
                if buf:
                    buf += data[pos:fs]
                    payload = bytes(buf)
                    buf.clear()
                else:
                    payload = data[pos:fs]
                events.append(Frame(payload))
                self._state = _AFTER_FS
                pos = fs + 1
            elif state == _OUTSIDE:
                vt = data.find(VT, pos)
                if vt < 0:
                    events.append(Junk(n - pos, data[pos : pos + 32]))
                    return events
                if vt > pos:
                    events.append(Junk(vt - pos, data[pos : min(vt, pos + 32)]))
                self._state = _IN_FRAME
                pos = vt + 1
            elif state == _AFTER_FS:
                if data[pos] == _CR:
                    pos += 1
                    self._state = _AFTER_CR
                else:
                    events.append(MissingCR())
                    self._state = _OUTSIDE
            elif state == _AFTER_CR:
                if data[pos] == _LF:
                    pos += 1
                self._state = _OUTSIDE
            else:  # _CLOSED
                return events
        return events


def encode_frame(payload: bytes) -> bytes:
    """Wrap one message in an MLLP frame."""
    return VT + payload + FS + CR
