"""The client's side of a wiretap's copy stream (records: tele.net.tapcopies): each copied
connection becomes a connection to the local handler, fed from a bounded buffer, and each is
answered DONE or FAILED so that the agent counts it.

The stream is read as fast as it comes, never waiting on a handler: a handler that does not
keep up loses its copy (FAILED) once the copy holds PER_COPY bytes here, or all copies together
hold TOTAL; at most MAX_COPIES copies are open at once (more are FAILED at once). Everything
here comes from a peer (the agent, through the manager): a malformed record ends this stream
(every copy on it), a record about a copy that is not open is ignored, a second OPEN of an open
copy ends that copy.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from tele.net.tapcopies import FROM_AGENT, HEADER, Kind, RecordReader, TapFrameError, record

log = logging.getLogger(__name__)

PER_COPY: Final = 1024 * 1024
"""Bytes one copy may hold here for a handler that does not keep up."""
TOTAL: Final = 16 * 1024 * 1024
"""Bytes all copies of one copy stream may hold here together."""
MAX_COPIES: Final = 1024
"""Copies open at once on one copy stream."""
PROCESS_BYTES: Final = 64 * 1024 * 1024
PROCESS_COPIES: Final = 4096
"""Bytes held and copies open at once by all copy streams of a process together."""
DRAIN_SECONDS: Final = 10.0
"""After a copy's end was given to the handler, how long its answers are still read (then
the connection is closed)."""
READ_SIZE: Final = 256 * 1024
VERDICT_GATHER_SECONDS: Final = 0.05
"""Verdicts go to the agent this long after the first of them is ready, together (the agent
waits for none of them: they only count)."""
MAX_VERDICTS: Final = 4 * MAX_COPIES * HEADER.size
"""Bytes of verdicts waiting for the agent to read them; more: the stream ends."""

ConnectLocal = Callable[[], Awaitable[trio.abc.HalfCloseableStream | None]]
"""A new connection to the local handler, or None (absent: the reason is logged)."""

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Copy:
    """One copied connection: the bytes not yet given to the handler."""

    def __init__(self, copy_id: int, copies: _Copies) -> None:
        self.id = copy_id
        self._copies = copies
        self.chunks: deque[bytes] = deque()
        self.held = 0
        self.ended = False
        self.over = False
        """Failed or dropped: nothing more is taken."""
        self.wake = trio.Event()
        self.cancel = trio.CancelScope()

    def feed(self, data: bytes) -> None:
        copies = self._copies
        shared = copies.shared
        if (
            self.held + len(data) > copies.per_copy
            or copies.held + len(data) > copies.total
            or shared.held + len(data) > shared.bytes_limit
        ):
            self.fail("the local handler does not keep up")
            return
        self.chunks.append(data)
        self.held += len(data)
        copies.held += len(data)
        shared.held += len(data)
        self.wake.set()

    def end(self) -> None:
        self.ended = True
        self.wake.set()

    def fail(self, why: str) -> None:
        """The handler does not get this copy whole: FAILED to the agent, connection reset."""
        if not self.over:
            log.debug("wiretap copy %d failed: %s", self.id, why)
            self._copies.verdict(Kind.FAILED, self.id)
        self.abort()

    def abort(self) -> None:
        """Ends this copy without a verdict (the agent dropped it, or already heard)."""
        self.over = True
        self._copies.forget(self)
        self.cancel.cancel()

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.held -= len(chunk)
        self._copies.held -= len(chunk)
        self._copies.shared.held -= len(chunk)
        return chunk

    async def deliver(self, connect: ConnectLocal) -> None:
        """Open the handler's connection, give it the copy and its end, read its answers; a
        copy that does not pass whole leaves the handler a reset connection."""
        local: trio.abc.HalfCloseableStream | None = None
        delivered = False
        try:
            with self.cancel:
                local = await connect()
                if local is None:
                    self.fail("the local handler is not there")
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_discard, local)
                    try:
                        await self._write(local)
                    except _BROKEN as exc:
                        self.fail(f"the local handler broke it off: {exc}")
                        return
                    delivered = True
                    self._copies.verdict(Kind.DONE, self.id)
                    self.over = True
                    self._copies.forget(self)
                    nursery.cancel_scope.deadline = trio.current_time() + DRAIN_SECONDS
        finally:
            self.over = True
            self._copies.forget(self)
            if local is not None:
                if not delivered:
                    _reset(local)
                await trio.aclose_forcefully(local)

    async def _write(self, local: trio.abc.HalfCloseableStream) -> None:
        while True:
            while self.chunks:
                await local.send_all(self.take())
            if self.ended:
                await local.send_eof()
                return
            self.wake = trio.Event()
            await self.wake.wait()


def _release(copy: _Copy) -> None:
    while copy.chunks:
        copy.take()


async def _discard(local: trio.abc.Stream) -> None:
    """The handler's answers are read and forgotten (a wiretap is read-only, and an unread
    answer would block the handler)."""
    try:
        while await local.receive_some(READ_SIZE):
            pass
    except _BROKEN:
        pass


def _reset(stream: trio.abc.Stream) -> None:
    """Close with a reset where it can (the handler sees a broken copy, not a whole one)."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


class Budget:
    """What all copy channels of a process hold together: bytes and open copies (a peer may
    open many channels)."""

    def __init__(self, bytes_limit: int = PROCESS_BYTES, copies_limit: int = PROCESS_COPIES):
        self.bytes_limit = bytes_limit
        self.copies_limit = copies_limit
        self.held = 0
        self.copies = 0


PROCESS_BUDGET: Final = Budget()
"""The budget of this process's copy channels (serve_copies' default)."""


class _Copies:
    """The open copies of one copy stream, their bytes held, the verdicts to send."""

    def __init__(self, per_copy: int, total: int, max_copies: int, shared: Budget) -> None:
        self.shared = shared
        self.per_copy = per_copy
        self.total = total
        self.max_copies = max_copies
        self.open: dict[int, _Copy] = {}
        self.held = 0
        self.verdicts = bytearray()
        self.verdicts_ready = trio.Event()
        self.stalled = False

    def verdict(self, kind: Kind, copy_id: int) -> None:
        if len(self.verdicts) >= MAX_VERDICTS:  # the agent does not read them: end the stream
            self.stalled = True
            return
        self.verdicts += record(kind, copy_id)
        self.verdicts_ready.set()

    def forget(self, copy: _Copy) -> None:
        if self.open.get(copy.id) is copy:
            del self.open[copy.id]
            self.shared.copies -= 1
        if copy.over:
            _release(copy)


async def serve_copies(
    stream: trio.abc.HalfCloseableStream,
    connect: ConnectLocal,
    *,
    per_copy: int = PER_COPY,
    total: int = TOTAL,
    max_copies: int = MAX_COPIES,
    budget: Budget = PROCESS_BUDGET,
) -> None:
    """Serve one copy stream until it ends: every copied connection to the local handler
    (`connect` opens a connection to it), verdicts back. Raises nothing a peer can cause."""
    copies = _Copies(per_copy, total, max_copies, budget)
    reader = RecordReader(FROM_AGENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_verdicts, stream, copies)
        try:
            while data := await stream.receive_some(READ_SIZE):
                for kind, copy_id, payload in reader.feed(data):
                    _apply(kind, copy_id, payload, copies, connect, nursery)
                if copies.stalled:
                    raise TapFrameError("the agent does not read the copies' verdicts")
            if reader.partial:
                raise TapFrameError("the copy stream ended inside a record")
        except TapFrameError as exc:
            log.warning("a wiretap copy stream ended: %s", exc)
        except _BROKEN as exc:
            log.debug("a wiretap copy stream ended: %s", exc)
        for copy in list(copies.open.values()):  # never finished: the handler gets a reset
            copy.abort()
        nursery.cancel_scope.cancel()


def _apply(
    kind: Kind,
    copy_id: int,
    payload: bytes,
    copies: _Copies,
    connect: ConnectLocal,
    nursery: trio.Nursery,
) -> None:
    copy = copies.open.get(copy_id)
    if kind is Kind.OPEN:
        if copy is not None:
            copy.fail("opened twice")
            return
        if len(copies.open) >= copies.max_copies or (
            copies.shared.copies >= copies.shared.copies_limit
        ):
            copies.verdict(Kind.FAILED, copy_id)
            return
        copy = copies.open[copy_id] = _Copy(copy_id, copies)
        copies.shared.copies += 1
        nursery.start_soon(copy.deliver, connect)
        return
    if copy is None or copy.over:
        return  # already failed here (or never opened): nothing to do
    if kind is Kind.DATA:
        if copy.ended:
            copy.fail("data after its end")
        else:
            copy.feed(payload)
    elif kind is Kind.END:
        copy.end()
    else:  # DROP: the agent dropped it and counted so
        copy.abort()


async def _send_verdicts(stream: trio.abc.HalfCloseableStream, copies: _Copies) -> None:
    try:
        while True:
            await copies.verdicts_ready.wait()
            await trio.sleep(VERDICT_GATHER_SECONDS)  # many copies' verdicts in one send
            copies.verdicts_ready = trio.Event()
            out = bytes(copies.verdicts)
            copies.verdicts.clear()
            await stream.send_all(out)
    except _BROKEN as exc:
        log.debug("wiretap verdicts not sent: %s", exc)
