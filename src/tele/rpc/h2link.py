"""One HTTP/2 connection ("link") over any trio stream, multiplexing RPC calls and tunnel streams.

The h2 state machine is driven by two tasks: a reader that feeds received bytes to h2 and
dispatches its events without ever blocking, and a single writer that sends whatever h2 has
queued. Each HTTP/2 stream is exposed as an `H2Stream`, a trio `HalfCloseableStream` whose
flow-control credit is returned to the peer only as the consumer reads, so a slow reader slows
its own sender and no one else, and no buffer grows past the windows advertised here.
How bytes get into and out of h2 (gather writes, in-place parsing, the DATA fast path) is
`tele.rpc.h2conn`'s; the writer sends through the socket directly when it can ("write-through"),
and a stream spliced to a local socket may get its DATA written there by the reader itself
(`H2Stream.deliver_to`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from tele.rpc.h2conn import Buffers, Connection, FrameBuffer, send_buffers

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
StreamHandler = Callable[["H2Stream"], Awaitable[None]]
ResponseCheck = Callable[[Headers], BaseException | None]
"""Judges a response that arrives while the opener is already sending and reading (see
`H2Stream.response_check`): None accepts it, an exception refuses the stream with it."""


_CONTROL_BACKLOG = 256 * 1024
"""Bytes of queued answers to the peer (PING and SETTINGS acks, WINDOW_UPDATEs, resets) above
which the link stops reading the peer until they are written: a peer that sends PINGs and
reads nothing cannot make them pile up."""


@dataclass(frozen=True)
class LinkSettings:
    """Tunables of one link; the defaults were chosen by measurement (bench/tunnel.py)."""

    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 32 * 1024 * 1024
    max_frame_size: int = 256 * 1024
    max_concurrent_streams: int = 65_536
    max_header_list_size: int = 64 * 1024
    read_size: int = 256 * 1024
    # A sender parks once this much is queued in h2 and not yet written to the transport.
    write_high_water: int = 1024 * 1024
    # Socket transports: the first frames queued after each read (or write) of the link are
    # written by the task that queued them, without waking the writer task (see `_kick_writer`).
    write_through: bool = True
    # Keepalive: a PING every `keepalive_interval` s; no answer within `keepalive_timeout` s
    # fails the link. None disables it.
    keepalive_interval: float | None = None
    keepalive_timeout: float = 10.0


class LinkBroken(trio.BrokenResourceError):
    """The link's transport failed or the link was closed; every stream on it is broken."""


class StreamReset(trio.BrokenResourceError):
    """The peer reset the stream (RST_STREAM) with an HTTP/2 error code."""

    def __init__(self, error_code: int, message: str = "") -> None:
        self.error_code = error_code
        try:
            name = h2.errors.ErrorCodes(error_code).name
        except ValueError:
            name = f"error code {error_code}"
        super().__init__(message or f"stream reset by peer ({name})")


class H2Stream(trio.abc.HalfCloseableStream):
    """One HTTP/2 stream as a trio stream: DATA frames in and out, END_STREAM as EOF."""

    def __init__(self, link: H2Link, stream_id: int, request_headers: Headers) -> None:
        self._link = link
        self.stream_id = stream_id
        self.request_headers = request_headers
        self.response_headers: Headers | None = None
        self.trailers: Headers | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._remote_ended = False
        self._local_ended = False
        self._closed = False
        self._reset_code: int | None = None
        self._reset_by_peer = False
        self._send_broken = False  # the peer reset with NO_ERROR after its END_STREAM
        self._receive_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._response_lot = trio.lowlevel.ParkingLot()
        self._receiving = False
        self._sending = False
        # Server side: a response HEADERS must precede DATA; raw streams get a plain 200.
        self._needs_response = not link._is_client_stream(stream_id)
        self.handler_scope: trio.CancelScope | None = None
        # Client side, opened without waiting for the response: the response is judged when
        # it arrives, and a refusal is raised by every later send or receive.
        self.response_check: ResponseCheck | None = None
        self._refusal: BaseException | None = None
        # A descriptor (a non-blocking socket) that DATA may be written to by the link's
        # reader itself while the consumer waits in receive_some: see `deliver_to`.
        self._sink: int | None = None
        self._waiting_in_receive = False

    # --- header helpers -------------------------------------------------------------------

    def header(self, name: str, default: str | None = None) -> str | None:
        """A request header's value by (lower-case) name."""
        for key, value in self.request_headers:
            if key == name:
                return value
        return default

    async def send_response(
        self,
        headers: Headers,
        *,
        body: bytes = b"",
        trailers: Headers | None = None,
        end_stream: bool = False,
    ) -> None:
        """Server side: send the response HEADERS, then optionally a body and trailers.

        Everything that fits in the send window is queued at once, so a small answer leaves in
        one write instead of one per part.
        """
        await trio.lowlevel.checkpoint()
        self._check_sendable()
        self._needs_response = False
        ends_now = end_stream and not body and trailers is None
        self._link._send_headers(self, headers, ends_now)
        if body:
            await self._send_body(body)
        if trailers is not None:
            self._check_sendable()
            self._link._send_headers(self, trailers, True)
        elif end_stream and not ends_now:
            self._link._end_stream(self)

    async def send_trailers(self, headers: Headers) -> None:
        """Send trailing HEADERS, which end our side of the stream."""
        await trio.lowlevel.checkpoint()
        self._check_sendable()
        self._link._send_headers(self, headers, True)

    async def receive_response(self) -> Headers:
        """Client side: wait for the response HEADERS."""
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        try:
            while self.response_headers is None:
                self._raise_if_failed()
                if self._remote_ended:
                    raise trio.BrokenResourceError("stream ended without a response")
                parked = True
                await self._response_lot.park()
            return self.response_headers
        finally:
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    # --- trio stream interface --------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        try:
            self._check_sendable()
            if self._needs_response:
                self._needs_response = False
                self._link._send_headers(self, [(":status", "200")], False)
            parked = await self._send_body(data)
        finally:
            self._sending = False
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def _send_body(self, data: bytes | bytearray | memoryview) -> bool:
        """Queue `data` as DATA as the windows allow; True if it had to wait (a schedule point).

        Immutable bytes that fit in one frame are queued as they are; anything else is copied
        in pieces (h2 copies a memoryview), so a caller may reuse its buffer once we return.
        A wait that is cancelled leaves part of `data` unsent: the stream is then unusable.
        """
        whole = data if type(data) is bytes else None
        view = memoryview(data).cast("B")
        offset = 0
        total = len(view)
        parked = False
        while offset < total:
            self._check_sendable()
            window = self._link._send_window(self.stream_id)
            if window <= 0:
                parked = True
                await self._wait_window()
                continue
            size = min(window, total - offset)
            if size == total and whole is not None:
                self._link._send_data(self, whole)  # no copy: bytes are immutable
            else:
                self._link._send_data(self, view[offset : offset + size])
            offset += size
            if self._link._must_drain():
                parked = True
                await self._link._wait_drained()
        return parked

    async def _wait_window(self) -> None:
        """Wait for send window; listed with the link so that a connection-level
        WINDOW_UPDATE wakes only the streams waiting for one, not every stream."""
        waiting = self._link._window_waiters
        waiting.add(self)
        try:
            await self._send_lot.park()
        finally:
            waiting.discard(self)

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                self._check_sendable()
                if self._link._send_window(self.stream_id) > 0:
                    return
                await self._wait_window()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._local_ended:
            return
        self._raise_if_failed()
        if self._needs_response:
            self._needs_response = False
            self._link._send_headers(self, [(":status", "200")], True)
        else:
            self._link._end_stream(self)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            if not isinstance(max_bytes, int):
                raise TypeError("max_bytes must be an integer or None")
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        # One schedule point per call, as trio's own streams: the wait when there is nothing
        # to read, else a yield after taking the data (not a yield and then a wait as well).
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        try:
            while not self._chunks:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                self._raise_if_failed()
                if self._remote_ended:
                    return b""
                parked = True
                self._waiting_in_receive = True
                try:
                    await self._receive_lot.park()
                finally:
                    self._waiting_in_receive = False
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            return self._take(max_bytes or self._link.settings.read_size)
        finally:
            self._receiving = False
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    def deliver_to(self, fd: int | None) -> None:
        """Let the link's reader write DATA straight to `fd` (None: stop), a non-blocking
        socket the consumer would copy it to anyway (`tele.rpc.tunnel.splice`).

        Only while the consumer is parked in `receive_some` with nothing buffered, so the
        bytes keep their order; whatever the socket does not take at once is buffered and the
        consumer woken as usual. This saves a task switch per DATA frame, most of a relay
        hop's latency. The caller must stop it before `fd` is closed.
        """
        self._sink = fd

    async def receive_all(self, limit: int) -> bytes:
        """Everything up to the peer's END_STREAM (at most `limit` bytes, else ValueError).

        A whole small message already buffered is taken without extra scheduling rounds; that
        is most RPC requests and replies.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        try:
            parts: list[bytes] = []
            size = 0
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._chunks:
                    chunk = self._take(self._buffered)
                    size += len(chunk)
                    if size > limit:
                        raise ValueError(f"more than {limit} bytes")
                    parts.append(chunk)
                    continue
                self._raise_if_failed()
                if self._remote_ended:
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                parked = True
                await self._receive_lot.park()
        finally:
            self._receiving = False
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close without waiting: END_STREAM if all was read, else reset (like TCP's RST)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close_sending()
        except trio.BrokenResourceError:
            pass  # the link failed meanwhile (e.g. a GOAWAY crossed this close): nothing to send
        self._discard_buffer()
        self._wake_all()

    def _close_sending(self) -> None:
        link_usable = self._link._failure is None
        if link_usable and self._reset_code is None and not self._send_broken:
            if self._chunks:
                # Unread data: like TCP's RST, tell the peer its bytes were not taken.
                self.reset(
                    h2.errors.ErrorCodes.NO_ERROR
                    if self._local_ended
                    else h2.errors.ErrorCodes.CANCEL
                )
            elif not self._local_ended:
                # Like TCP's FIN; data that still arrives gets the stream reset (_on_data).
                if self._needs_response:
                    self._needs_response = False
                    self._link._send_headers(self, [(":status", "200")], True)
                else:
                    self._link._end_stream(self)

    def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abort the stream both ways with RST_STREAM."""
        if self._reset_code is not None:
            return
        self._reset_code = error_code
        self._link._reset_stream(self, error_code)
        self._discard_buffer()
        self._wake_all()

    @property
    def remote_ended(self) -> bool:
        """The peer sent END_STREAM (everything it sends is buffered or read)."""
        return self._remote_ended

    @property
    def was_reset(self) -> bool:
        return self._reset_code is not None

    # --- internals --------------------------------------------------------------------------

    def _take(self, limit: int) -> bytes:
        first = self._chunks[0]
        if len(first) >= limit:
            data = first[:limit]
            if len(first) == limit:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[limit:]
        else:
            parts = [self._chunks.popleft()]
            size = len(first)
            while self._chunks and size + len(self._chunks[0]) <= limit:
                chunk = self._chunks.popleft()
                parts.append(chunk)
                size += len(chunk)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._buffered -= len(data)
        self._link._acknowledge(self.stream_id, len(data))
        return data

    def _discard_buffer(self) -> None:
        if self._buffered:
            self._link._acknowledge(self.stream_id, self._buffered)
        self._chunks.clear()
        self._buffered = 0

    def _check_sendable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._refusal is not None:
            raise self._refusal
        if self._local_ended:
            raise trio.ClosedResourceError("cannot send after send_eof()")
        if self._send_broken:
            raise trio.BrokenResourceError("the peer stopped reading this stream")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._refusal is not None:
            raise self._refusal
        if self._reset_code is not None:
            if self._reset_by_peer:
                raise StreamReset(self._reset_code)
            raise trio.BrokenResourceError("stream was reset")
        if self._link._failure is not None:
            raise LinkBroken(self._link._failure)

    def _wake_all(self) -> None:
        self._receive_lot.unpark_all()
        self._send_lot.unpark_all()
        self._response_lot.unpark_all()

    # Called by the link's reader.
    def _on_data(self, data: bytes) -> None:
        if self._closed:
            self._link._acknowledge(self.stream_id, len(data))
            if self._reset_code is None:
                self.reset(h2.errors.ErrorCodes.CANCEL)
            return
        if self._sink is not None and self._waiting_in_receive and not self._chunks:
            try:
                sent = os.write(self._sink, data)
            except OSError:
                sent = 0  # would block, or failed: the consumer's own send meets it
            if sent:
                self._link._acknowledge(self.stream_id, sent)
                if sent == len(data):
                    return
                data = data[sent:]
        self._chunks.append(data)
        self._buffered += len(data)
        self._receive_lot.unpark_all()

    def _on_reset(self, error_code: int) -> None:
        if error_code == h2.errors.ErrorCodes.NO_ERROR and self._remote_ended:
            # RFC 9113 8.1: the peer sent its whole response and wants no more of ours; what
            # it sent stays readable.
            self._send_broken = True
            self._send_lot.unpark_all()
            return
        if self._reset_code is None:
            self._reset_code = error_code
            self._reset_by_peer = True
        self._discard_buffer()
        self._wake_all()
        if self.handler_scope is not None:
            self.handler_scope.cancel()


class H2Link:
    """One h2 connection. Use `open_link()`; streams come from `open_stream()` or the handler."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        handler: StreamHandler | None,
        settings: LinkSettings,
        name: str,
    ) -> None:
        self.transport = transport
        self.client_side = client_side
        self.settings = settings
        self.name = name
        self._handler = handler
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="utf-8",
            validate_inbound_headers=True,
            normalize_inbound_headers=False,
            # Our own headers are well-formed; checking them again costs ~15% of a call.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._conn = Connection(config=config)
        self._streams: dict[int, H2Stream] = {}
        self._window_waiters: set[H2Stream] = set()  # streams parked for send window
        self._open_local = 0  # streams we opened that are not closed yet
        self._failure: str | None = None
        self._goaway_received = False
        self._closing = False
        self._writer_wakeup = trio.Event()
        self._drain_lot = trio.lowlevel.ParkingLot()
        self._capacity_lot = trio.lowlevel.ParkingLot()
        self._pending_write = 0
        # Write-through (socket transports only): the task that queued frames writes them
        # itself with one non-blocking send when the writer task is idle, instead of waking the
        # writer, which costs two scheduler passes per write (measured on a 1 KiB round trip:
        # 2 of ~10 passes and ~20% of the Python calls). Only the first write after each read
        # or write of the link goes through (`_through_ok`); the rest of a burst is left to
        # the writer, which sends it in one go. Bytes the kernel did not take wait in
        # `_backlog` for the writer, ahead of anything h2 queues later: byte order is kept.
        self._direct: socket.socket | None = None  # set up by `_run`
        self._write_busy = False
        self._backlog: Buffers = []
        self._batching = False
        self._through_ok = True
        self._pings: dict[bytes, trio.Event] = {}
        self._ping_counter = 0
        self._closed_event = trio.Event()
        self._writer_done = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- public ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._failure is None and not self._goaway_received and not self._closing

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    async def open_stream(
        self, headers: Headers, *, body: bytes = b"", end_stream: bool = False
    ) -> H2Stream:
        """Client side: start a request; waits while the peer's concurrency limit is reached.

        `body` (and END_STREAM) are queued together with the HEADERS when they fit the window.
        """
        await trio.lowlevel.checkpoint()
        while True:
            self._raise_if_unusable()
            if self._open_local < self._conn.remote_settings.max_concurrent_streams:
                break
            await self._capacity_lot.park()
        stream_id = self._conn.get_next_available_stream_id()
        stream = H2Stream(self, stream_id, headers)
        self._streams[stream_id] = stream
        self._open_local += 1
        try:
            self._conn.send_headers(stream_id, headers, end_stream=end_stream and not body)
        except h2.exceptions.ProtocolError as exc:
            self._forget(stream)
            raise LinkBroken(f"cannot open a stream: {exc}") from exc
        if end_stream and not body:
            stream._local_ended = True
        self._kick_writer()
        if body:
            try:
                await stream._send_body(body)
                if end_stream:
                    self._end_stream(stream)
            except BaseException:
                stream.reset()
                raise
        return stream

    async def ping(self) -> float:
        """Send a PING and return the round trip in seconds."""
        self._raise_if_unusable()
        self._ping_counter += 1
        opaque = self._ping_counter.to_bytes(8, "big")
        event = trio.Event()
        self._pings[opaque] = event
        started = trio.current_time()
        try:
            self._conn.ping(opaque)
            self._kick_writer()
            await event.wait()
        finally:
            self._pings.pop(opaque, None)
        if self._failure is not None:
            raise LinkBroken(self._failure)
        return trio.current_time() - started

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def close(self, reason: str = "link closed") -> None:
        """Send GOAWAY and stop: every stream on the link fails."""
        if self._failure is None and not self._closing:
            self._closing = True
            try:
                self._conn.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            self._kick_writer()
        self._fail(reason)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Graceful: refuse new streams, let open ones finish (up to `grace` s), then GOAWAY.

        h2 sends nothing at all once a GOAWAY has gone either way, so the GOAWAY comes last.
        """
        if self._failure is None and not self._closing:
            self._closing = True  # incoming streams are refused from now on
            with trio.move_on_after(grace):
                while self._streams and self._failure is None:
                    await self._capacity_lot.park()
        self.close("link shut down")

    # --- run ---------------------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        self._conn.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self._conn.initiate_connection()
        # Accept large frames at once: the peer may send one right behind its SETTINGS ack,
        # in the same read, before h2 would apply our own new limit.
        self._conn.max_inbound_frame_size = s.max_frame_size
        self._conn.decoder.max_header_list_size = s.max_header_list_size
        self._conn.max_outbound_frame_size = self._conn.remote_settings.max_frame_size
        extra = s.connection_window - self._conn.inbound_flow_control_window
        if extra > 0:
            self._conn.increment_flow_control_window(extra)
        if isinstance(self.transport, trio.SocketStream) and s.write_through:
            # A duplicate descriptor of our own for write-through: it stays valid (never a
            # reused number) until closed below, just before the transport itself.
            fd = self.transport.socket.fileno()
            if fd >= 0:
                self._direct = socket.socket(fileno=os.dup(fd))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                if s.keepalive_interval is not None:
                    nursery.start_soon(self._keepalive, s.keepalive_interval, s.keepalive_timeout)
                task_status.started()
                await self._closed_event.wait()
                # Give the writer a moment to flush a GOAWAY, then stop everything.
                with trio.move_on_after(1):
                    await self._writer_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._fail("link closed")
            if self._direct is not None:
                self._direct.close()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _reader(self) -> None:
        read_size = self.settings.read_size
        try:
            while self._failure is None:
                while self._conn.control_size > _CONTROL_BACKLOG and self._failure is None:
                    # Our answers to the peer are not being taken: read no more of it (never
                    # for DATA: both sides waiting to write while not reading would deadlock).
                    self._kick_writer()
                    await self._drain_lot.park()
                data = await self.transport.receive_some(read_size)
                if not data:
                    self._fail("the peer closed the connection")
                    return
                self._through_ok = True
                try:
                    events = self._conn.receive_data(data)
                    self._check_pending_frame()
                except h2.exceptions.ProtocolError as exc:
                    # Frames that cross our own GOAWAY are expected, not the peer's fault.
                    level = logging.DEBUG if self._closing else logging.WARNING
                    log.log(level, "%s: protocol error from peer, closing: %s", self.name, exc)
                    self._closing = True  # lets the writer flush h2's GOAWAY
                    self._kick_writer()
                    self._fail(f"protocol error: {exc}")
                    return
                # Frames queued while dispatching (window updates, resets) leave in one write.
                self._batching = True
                try:
                    for event in events:
                        self._dispatch(event)
                finally:
                    self._batching = False
                self._kick_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"connection lost: {exc or type(exc).__name__}")

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        finally:
            self._writer_done.set()

    def _check_pending_frame(self) -> None:
        """Refuse an overlong frame as soon as its header arrives.

        h2 checks a frame's length only once the whole frame is buffered, so a peer announcing
        a 16 MiB frame could make us hold 16 MiB. After `receive_data` the unparsed bytes start
        at a frame header (`FrameBuffer` checks complete headers itself; this catches a
        header of which only the length has arrived).
        """
        buffer = self._conn.incoming_buffer
        assert isinstance(buffer, FrameBuffer)
        length = buffer.announced_length()
        if length is not None and length > self.settings.max_frame_size:
            self._conn._terminate_connection(h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
            limit = self.settings.max_frame_size
            raise h2.exceptions.FrameTooLargeError(
                f"frame of {length} bytes announced, the maximum is {limit}"
            )

    async def _write_loop(self) -> None:
        try:
            while True:
                self._writer_wakeup = trio.Event()
                buffers = self._conn.take_output()
                if self._backlog:
                    buffers = self._backlog + buffers
                    self._backlog = []
                if buffers:
                    self._pending_write = 0
                    self._write_busy = True
                    try:
                        if self._direct is not None:
                            while buffers := send_buffers(self._direct, buffers):
                                await self.transport.wait_send_all_might_not_block()
                        else:
                            await self.transport.send_all(b"".join(buffers))
                    finally:
                        self._write_busy = False
                    self._through_ok = True
                    if self._drain_lot:
                        self._drain_lot.unpark_all()
                    continue
                self._pending_write = 0
                if self._drain_lot:
                    self._drain_lot.unpark_all()
                if self._failure is not None:
                    return
                await self._writer_wakeup.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"connection lost: {exc or type(exc).__name__}")

    async def _keepalive(self, interval: float, timeout: float) -> None:
        while self._failure is None:
            await trio.sleep(interval)
            with trio.move_on_after(timeout) as scope:
                try:
                    await self.ping()
                except LinkBroken:
                    return
            if scope.cancelled_caught:
                log.warning("%s: no PING answer within %.1fs, link is dead", self.name, timeout)
                self._fail(f"keepalive: no answer from the peer within {timeout:g}s")
                return

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            data = event.data or b""
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding > 0:
                self._acknowledge(event.stream_id, padding)
            if stream is None:
                self._acknowledge(event.stream_id, len(data))
            else:
                stream._on_data(bytes(data))
            if event.stream_ended is not None:
                self._dispatch(event.stream_ended)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.response_headers = _headers(event.headers)
                if stream.response_check is not None:
                    stream._refusal = stream.response_check(stream.response_headers)
                    if stream._refusal is not None:
                        stream._discard_buffer()
                        stream._wake_all()
                stream._response_lot.unpark_all()
            if event.stream_ended is not None:
                self._dispatch(event.stream_ended)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = _headers(event.headers)
            if event.stream_ended is not None:
                self._dispatch(event.stream_ended)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._remote_ended = True
                stream._wake_all()
                if stream._local_ended:
                    self._forget(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._on_reset(event.error_code or 0)
                self._forget(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in list(self._window_waiters):
                    stream._send_lot.unpark_all()
            else:
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._send_lot.unpark_all()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._conn.max_outbound_frame_size = self._conn.remote_settings.max_frame_size
            for stream in self._streams.values():
                stream._send_lot.unpark_all()
            self._capacity_lot.unpark_all()
        elif isinstance(event, h2.events.PingAckReceived):
            waiter = self._pings.get(bytes(event.ping_data or b""))
            if waiter is not None:
                waiter.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        headers = _headers(event.headers)
        if self._handler is None or self._nursery is None or self._closing:
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, stream_id, headers)
        self._streams[stream_id] = stream
        if event.stream_ended is not None:
            stream._remote_ended = True
        self._nursery.start_soon(self._run_handler, stream, self._handler)

    async def _run_handler(self, stream: H2Stream, handler: StreamHandler) -> None:
        with trio.CancelScope() as scope:
            stream.handler_scope = scope
            if stream._reset_code is not None:
                scope.cancel()
            try:
                await handler(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("%s: stream %d ended: %s", self.name, stream.stream_id, exc)
            except Exception:
                log.exception("%s: handler for stream %d failed", self.name, stream.stream_id)
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        stream.handler_scope = None
        if stream._reset_code is None:
            stream.close()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._goaway_received = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream in list(self._streams.values()):
            if self._is_client_stream(stream.stream_id) and stream.stream_id > last:
                stream._on_reset(h2.errors.ErrorCodes.REFUSED_STREAM)
                self._forget(stream)
        # h2 refuses to send anything after a GOAWAY (its connection state is CLOSED), so the
        # streams still open cannot finish: the link is over.
        if event.error_code:
            self._fail(f"peer closed the connection with {_error_name(event.error_code)}")
        else:
            self._fail("peer closed the connection (GOAWAY)")

    # --- used by streams -----------------------------------------------------------------------

    def _is_client_stream(self, stream_id: int) -> bool:
        # Client-initiated stream ids are odd; "client" means the side that opened it.
        return (stream_id % 2 == 1) == self.client_side

    def _send_window(self, stream_id: int) -> int:
        try:
            window = self._conn.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0
        return min(window, self._conn.max_outbound_frame_size * 4)

    def _send_data(self, stream: H2Stream, data: bytes | memoryview) -> None:
        max_frame = self._conn.max_outbound_frame_size
        try:
            if len(data) <= max_frame:
                self._conn.send_data(stream.stream_id, data)
            else:
                for offset in range(0, len(data), max_frame):
                    self._conn.send_data(stream.stream_id, data[offset : offset + max_frame])
        except h2.exceptions.StreamClosedError as exc:
            raise trio.BrokenResourceError("stream is closed") from exc
        except h2.exceptions.ProtocolError as exc:
            raise LinkBroken(f"cannot send: {exc}") from exc
        self._pending_write += len(data)
        self._kick_writer()

    def _must_drain(self) -> bool:
        return self._pending_write > self.settings.write_high_water and self._failure is None

    async def _wait_drained(self) -> None:
        if self._must_drain():
            await self._drain_lot.park()

    def _send_headers(self, stream: H2Stream, headers: Headers, end_stream: bool) -> None:
        if self._failure is not None:
            raise LinkBroken(self._failure)
        try:
            self._conn.send_headers(stream.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError as exc:
            raise trio.BrokenResourceError("stream is closed") from exc
        except h2.exceptions.ProtocolError as exc:
            raise LinkBroken(f"cannot send headers: {exc}") from exc
        if end_stream:
            self._mark_local_end(stream)
        self._kick_writer()

    def _end_stream(self, stream: H2Stream) -> None:
        if self._failure is not None:
            stream._local_ended = True
            return
        try:
            self._conn.end_stream(stream.stream_id)
        except h2.exceptions.StreamClosedError:
            pass
        except h2.exceptions.ProtocolError as exc:
            raise LinkBroken(f"cannot end the stream: {exc}") from exc
        self._mark_local_end(stream)
        self._kick_writer()

    def _mark_local_end(self, stream: H2Stream) -> None:
        stream._local_ended = True
        if stream._remote_ended:
            self._forget(stream)

    def _reset_stream(self, stream: H2Stream, error_code: int) -> None:
        if self._failure is None:
            try:
                self._conn.reset_stream(stream.stream_id, error_code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self._kick_writer()
        self._forget(stream)

    def _acknowledge(self, stream_id: int, size: int) -> None:
        if size <= 0 or self._failure is not None:
            return
        try:
            self._conn.acknowledge_received_data(size, stream_id)
        except h2.exceptions.ProtocolError:
            return
        self._kick_writer()

    def _forget(self, stream: H2Stream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None:
            if self._is_client_stream(stream.stream_id):
                self._open_local -= 1
            self._capacity_lot.unpark_all()
            if self._goaway_received and not self._streams:
                self._fail("peer closed the connection (GOAWAY)")

    def _kick_writer(self) -> None:
        """Get what h2 queued onto the wire: write it through, or wake the writer task."""
        if self._direct is not None and self._batching:
            return  # the reader writes once after the whole batch
        if (
            self._direct is not None
            and not self._write_busy
            and not self._backlog
            and self._failure is None
        ):
            if not self._through_ok:
                self._writer_wakeup.set()  # a burst: the writer sends it all in one go
                return
            buffers = self._conn.take_output()
            if not buffers:
                return
            self._through_ok = False
            try:
                rest = send_buffers(self._direct, buffers)
            except trio.BrokenResourceError:
                rest = buffers  # the writer task meets the same error and fails the link
            if not rest:
                self._pending_write = 0
                return
            self._backlog = rest
            self._pending_write = sum(len(b) for b in rest)
        self._writer_wakeup.set()

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise LinkBroken(self._failure)
        if self._goaway_received or self._closing:
            raise LinkBroken("the link is shutting down (GOAWAY)")

    def _fail(self, reason: str) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        for stream in list(self._streams.values()):
            stream._discard_buffer()
            stream._wake_all()
            if stream.handler_scope is not None:
                stream.handler_scope.cancel()
        self._streams.clear()
        for waiter in self._pings.values():
            waiter.set()
        self._capacity_lot.unpark_all()
        self._drain_lot.unpark_all()
        self._writer_wakeup.set()
        self._closed_event.set()


def _headers(raw: Any) -> Headers:
    return [(_text(k), _text(v)) for k, v in (raw or [])]


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"


@asynccontextmanager
async def open_link(
    transport: trio.abc.Stream,
    *,
    client_side: bool,
    handler: StreamHandler | None = None,
    settings: LinkSettings | None = None,
    name: str | None = None,
) -> AsyncIterator[H2Link]:
    """Run an h2 link over `transport` for the duration of the block; closes it on exit."""
    link = H2Link(
        transport,
        client_side=client_side,
        handler=handler,
        settings=settings or LinkSettings(),
        name=name or ("h2-client" if client_side else "h2-server"),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(link._run)
        try:
            yield link
        finally:
            link.close()


async def serve_link(
    transport: trio.abc.Stream,
    handler: StreamHandler,
    *,
    settings: LinkSettings | None = None,
    name: str | None = None,
) -> None:
    """Server side: serve one connection until it closes or fails."""
    async with open_link(
        transport, client_side=False, handler=handler, settings=settings, name=name
    ) as link:
        await link.wait_closed()
