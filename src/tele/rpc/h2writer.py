"""The one writer of an h2 connection: gets what `tele.net.h2conn.Connection` queued onto the wire.

A single task writes (a task cancelled halfway through a write would cut a frame in two and
break every stream of the connection); on socket transports the task that queued frames may
write them itself with one non-blocking gather write ("write-through") when the writer is idle.
This is the I/O half of `h2conn`, which does none; `tele.rpc.h2link` runs it.
"""

from __future__ import annotations

import os
import socket

import trio

from tele.net.h2conn import Buffers, Connection

_IOV_MAX = 1024  # buffers per sendmsg (Linux's IOV_MAX)


def send_buffers(sock: socket.socket, buffers: Buffers) -> Buffers:
    """Write `buffers` with gather writes (no joining) until the socket would block; returns
    what is left unsent (empty when all went). Raises BrokenResourceError if the socket fails."""
    while buffers:
        batch = buffers[:_IOV_MAX] if len(buffers) > _IOV_MAX else buffers
        try:
            sent = sock.sendmsg(batch, (), socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return buffers
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
        taken = 0
        for buffer in batch:
            size = len(buffer)
            if sent < size:
                break
            sent -= size
            taken += 1
        if taken < len(batch):
            # A partial write: keep the unsent tail of the buffer it stopped in.
            buffers = [memoryview(buffers[taken])[sent:], *buffers[taken + 1 :]]
            continue
        buffers = buffers[taken:]
    return buffers


class Writer:
    """Writes a `Connection`'s output to `transport`: `kick()` after queueing, `run()` as a task.

    Senders that queued more than `high_water` bytes not yet written wait in `wait_drained()`.

    Write-through (socket transports only, `write_through`): the task that queued frames writes
    them itself with one non-blocking send when the writer task is idle, instead of waking the
    writer, which costs two scheduler passes per write (measured on a 1 KiB round trip: 2 of
    ~10 passes and ~20% of the Python calls). Only the first write after each read or write of
    the connection goes through (`through_ok`, set again by the reader after each read); the
    rest of a burst is left to the writer task, which sends it in one go. Bytes the kernel did
    not take wait in `_backlog` for the writer, ahead of anything queued later: byte order is
    kept. While `batching` (the reader dispatching one read's events) nothing is written
    through: the reader kicks once after the batch.
    """

    def __init__(
        self,
        conn: Connection,
        transport: trio.abc.Stream,
        *,
        high_water: int,
        write_through: bool,
    ) -> None:
        self._conn = conn
        self.transport = transport
        self._high_water = high_water
        self.pending = 0  # bytes queued since the last write began
        self._wakeup = trio.Event()
        self.drain_lot = trio.lowlevel.ParkingLot()
        self._stopped = False
        self._done = trio.Event()
        self._direct: socket.socket | None = None
        self._busy = False
        self._backlog: Buffers = []
        self.batching = False
        self.through_ok = True
        self._write_through = write_through

    def open(self) -> None:
        """Set up write-through on a socket transport; `close()` undoes it."""
        if self._write_through and isinstance(self.transport, trio.SocketStream):
            # A duplicate descriptor of our own: it stays valid (never a reused number) until
            # `close()`, which the owner calls just before closing the transport itself.
            fd = self.transport.socket.fileno()
            if fd >= 0:
                self._direct = socket.socket(fileno=os.dup(fd))

    def kick(self, *, through: bool = True) -> None:
        """Get what the connection queued onto the wire: write it through, or wake the writer
        (always, with `through=False`: for what no one waits on, see `H2Stream.send_eof_now`)."""
        if not through:
            self._wakeup.set()
            return
        direct = self._direct
        if direct is not None and self.batching:
            return  # the reader writes once after the whole batch
        if direct is not None and not self._busy and not self._backlog and not self._stopped:
            if not self.through_ok:
                self._wakeup.set()  # a burst: the writer sends it all in one go
                return
            buffers = self._conn.take_output()
            if not buffers:
                return
            self.through_ok = False
            try:
                rest = send_buffers(direct, buffers)
            except trio.BrokenResourceError:
                rest = buffers  # the writer task meets the same error and fails the link
            if not rest:
                self.pending = 0
                return
            self._backlog = rest
            self.pending = sum(len(b) for b in rest)
        self._wakeup.set()

    def queued(self, size: int) -> None:
        """`size` bytes of DATA were queued: counts toward `must_drain`; kicks the writer."""
        self.pending += size
        self.kick()

    def must_drain(self) -> bool:
        return self.pending > self._high_water and not self._stopped

    async def wait_drained(self) -> None:
        if self.must_drain():
            await self.drain_lot.park()

    def stop(self) -> None:
        """The connection failed or closed: write what is queued (a GOAWAY), then end `run`;
        drained waiters are released."""
        self._stopped = True
        self.drain_lot.unpark_all()
        self._wakeup.set()

    async def wait_done(self) -> None:
        await self._done.wait()

    def close(self) -> None:
        """Release the write-through descriptor (before the owner closes the transport)."""
        if self._direct is not None:
            self._direct.close()

    async def run(self) -> None:
        """The writer task. Returns once stopped and flushed; raises the transport's error
        (BrokenResourceError, ClosedResourceError, OSError) if a write fails."""
        try:
            await self._write_loop()
        finally:
            self._done.set()

    async def _write_loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            buffers = self._conn.take_output()
            if self._backlog:
                buffers = self._backlog + buffers
                self._backlog = []
            if buffers:
                self.pending = 0
                self._busy = True
                try:
                    if self._direct is not None:
                        while buffers := send_buffers(self._direct, buffers):
                            await self.transport.wait_send_all_might_not_block()
                    else:
                        await self.transport.send_all(b"".join(buffers))
                finally:
                    self._busy = False
                self.through_ok = True
                if self.drain_lot:
                    self.drain_lot.unpark_all()
                continue
            self.pending = 0
            if self.drain_lot:
                self.drain_lot.unpark_all()
            if self._stopped:
                return
            await self._wakeup.wait()
