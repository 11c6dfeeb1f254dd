"""The trio runtime of one SPDY/3.1 connection (`spdy.Connection` is the sans-IO core): a
reader task that turns frames into streams, and writes that honour the peer's windows. The
transport is either a raw TLS stream (after `Upgrade: SPDY/3.1`) or websocket binary messages
(kubectl's port-forward tunnel); both are a `Transport`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from . import spdy

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 4 * 3600.0
"""A connection with no frame in either direction for this long is closed (the kubelet's
default streaming-connection-idle-timeout): a peer that vanished without closing costs nothing
for ever."""


class TransportClosed(Exception):
    """The peer is gone; raised by `Transport.send`."""


@dataclass
class Transport:
    """Bytes to and from the peer. `receive` returns b"" at the end; `send` raises
    `TransportClosed` when the peer is gone."""

    receive: Callable[[], Awaitable[bytes]]
    send: Callable[[bytes], Awaitable[None]]
    close: Callable[[], Awaitable[None]]


@dataclass(eq=False)
class SpdyStream:
    """One stream the peer opened. `read` returns b"" at its end (FIN, reset or connection
    loss)."""

    session: Session
    stream_id: int
    headers: spdy.Headers
    _inbound: trio.MemorySendChannel[bytes] = field(repr=False)
    _reader: trio.MemoryReceiveChannel[bytes] = field(repr=False)
    reset: bool = False

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k == name), "")

    async def read(self) -> bytes:
        try:
            return await self._reader.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return b""

    def stop_reading(self) -> None:
        """Nobody reads this stream any more: what arrives is dropped (and acknowledged)."""
        self._reader.close()

    async def write(self, data: bytes, *, fin: bool = False) -> None:
        await self.session.write(self.stream_id, data, fin=fin)

    async def end(self) -> None:
        await self.session.write(self.stream_id, b"", fin=True)


class Session:
    """Serve one SPDY connection as the server side: streams the peer opens are replied to at
    once and come out of `incoming`."""

    def __init__(self, transport: Transport, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.transport = transport
        self.idle_timeout = idle_timeout
        self._idle = trio.CancelScope()
        self.conn = spdy.Connection(server=True)
        self._streams: dict[int, SpdyStream] = {}
        self._send_lock = trio.Lock()
        self._window = trio.Event()
        self._new_send, self.incoming = trio.open_memory_channel[SpdyStream](spdy.MAX_STREAMS)
        self.done = trio.Event()

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if not data:
            return
        async with self._send_lock:
            await self.transport.send(data)
        self._idle.deadline = trio.current_time() + self.idle_timeout

    async def run(self) -> None:
        """Read until the peer goes away, breaks the protocol or stays idle too long; then
        every stream ends."""
        try:
            while True:
                self._idle.deadline = trio.current_time() + self.idle_timeout
                with self._idle:
                    data = await self.transport.receive()
                if self._idle.cancelled_caught:
                    log.info("SPDY connection idle for %.0f s: closed", self.idle_timeout)
                    self.conn.goaway()
                    await self._flush()
                    break
                self._idle = trio.CancelScope()
                if not data:
                    break
                self.conn.receive_data(data)
                while (event := self.conn.next_event()) is not None:
                    await self._dispatch(event)
                    await self._flush()
                await self._flush()
        except spdy.SpdyProtocolError as exc:
            log.info("SPDY peer broke the protocol: %s", exc)
            try:
                await self._flush()
            except TransportClosed:
                pass
        except TransportClosed:
            pass
        finally:
            self.done.set()
            self._wake_writers()
            self._new_send.close()
            for stream in self._streams.values():
                stream._inbound.close()
            self._streams.clear()

    async def _dispatch(self, event: spdy.Event) -> None:
        if isinstance(event, spdy.StreamOpened):
            inbound, reader = trio.open_memory_channel[bytes](0)
            stream = SpdyStream(self, event.stream_id, event.headers, inbound, reader)
            self.conn.reply(event.stream_id)
            if event.fin:
                inbound.close()
            else:
                self._streams[event.stream_id] = stream
            try:
                self._new_send.send_nowait(stream)
            except trio.WouldBlock:  # bounded by the connection's stream limit
                self.conn.reset(event.stream_id, spdy.REFUSED_STREAM)
        elif isinstance(event, spdy.DataReceived):
            stream_or_none = self._streams.get(event.stream_id)
            if stream_or_none is not None and event.data:
                try:
                    # Rendezvous: the frame is handed over only when the stream's reader takes
                    # it, and acknowledged then. A slow reader holds the connection up, as
                    # Kubernetes' spdystream does.
                    await self._flush()
                    await stream_or_none._inbound.send(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            self.conn.acknowledge(event.stream_id, len(event.data))
            if event.fin:
                self._end_inbound(event.stream_id)
        elif isinstance(event, spdy.StreamReset):
            stream_or_none = self._streams.get(event.stream_id)
            if stream_or_none is not None:
                stream_or_none.reset = True
            self._end_inbound(event.stream_id)
            self._wake_writers()
        elif isinstance(event, spdy.HeadersReceived | spdy.StreamReplied):
            if event.fin:
                self._end_inbound(event.stream_id)
        elif isinstance(event, spdy.WindowUpdated | spdy.SettingsReceived):
            self._wake_writers()

    def _wake_writers(self) -> None:
        self._window.set()
        self._window = trio.Event()

    def _end_inbound(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream._inbound.close()

    async def write(self, stream_id: int, data: bytes, *, fin: bool = False) -> None:
        """Send on a stream, waiting for window when the peer does flow control. Writes to a
        stream that ended (or a connection that is gone) are dropped."""
        view = memoryview(data)
        while True:
            if self.done.is_set() or not self.conn.is_open(stream_id):
                return
            window = self.conn.send_window(stream_id)
            if window > 0 or (not view and fin):
                chunk = bytes(view[:window])
                taken = self.conn.send_data(stream_id, chunk, fin=fin and len(chunk) == len(view))
                view = view[taken:]
                try:
                    await self._flush()
                except TransportClosed:
                    return
                if not view:
                    return
            await self._window.wait()

    async def reset(self, stream_id: int, status: int = spdy.CANCEL) -> None:
        self.conn.reset(stream_id, status)
        self._end_inbound(stream_id)
        try:
            await self._flush()
        except TransportClosed:
            pass

    async def close(self) -> None:
        """GOAWAY, then the transport closes."""
        self.conn.goaway()
        try:
            await self._flush()
        except TransportClosed:
            pass
        await self.transport.close()
