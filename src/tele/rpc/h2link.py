"""One HTTP/2 connection ("link") over any trio stream, multiplexing RPC calls and tunnel streams.

The link is the runtime around one sans-IO `tele.net.h2conn.Connection`: a reader task feeds
received bytes to it and dispatches its events without ever blocking (to `H2Stream`s, see
`tele.rpc.h2stream`), and one `tele.rpc.h2writer.Writer` sends whatever it queued. Incoming
streams each get a handler task in the link's nursery (`_on_request`); a stream spliced to a
local socket may get its DATA written there by the reader itself (`H2Stream.deliver_to`).
"""

from __future__ import annotations

import logging
import time
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

from tele import gctune
from tele.net.h2conn import Connection
from tele.rpc.h2state import LinkBroken, StreamReset, error_name
from tele.rpc.h2stream import H2Stream, Headers, ResponseCheck
from tele.rpc.h2writer import Writer

__all__ = [
    "H2Link",
    "H2Stream",
    "Headers",
    "LinkBroken",
    "LinkSettings",
    "ResponseCheck",
    "StreamHandler",
    "StreamReset",
    "open_link",
    "serve_link",
]

log = logging.getLogger(__name__)

StreamHandler = Callable[[H2Stream], Awaitable[None]]
StreamPrepare = Callable[[H2Stream], None]
"""Called with an incoming stream as it arrives, before its handler task (see `H2Link`)."""


_CONTROL_BACKLOG = 256 * 1024
"""Bytes of queued answers to the peer (PING and SETTINGS acks, WINDOW_UPDATEs, resets) above
which the link stops reading the peer until they are written: a peer that sends PINGs and
reads nothing cannot make them pile up."""


class StreamBudget:
    """How many incoming streams may have a handler task at once, across every link that
    shares this budget: a limit per link alone lets many links add up without bound.

    A budget with a `parent` is a share of it (one identity's, see `rpc.server.HandlerShares`):
    a stream must fit both, so one sharer's flood ends at its share, not at the total."""

    def __init__(self, limit: int, parent: StreamBudget | None = None) -> None:
        self.limit = limit
        self.parent = parent
        self.in_use = 0
        self.refused = 0

    def take(self) -> bool:
        if self.in_use >= self.limit or (self.parent is not None and not self.parent.take()):
            self.refused += 1
            return False
        self.in_use += 1
        return True

    def give_back(self) -> None:
        self.in_use -= 1
        if self.parent is not None:
            self.parent.give_back()


MAX_HANDLERS = 16_384
"""Handler tasks in one process at once (every link of it together): an incoming stream past
this is refused (REFUSED_STREAM; the peer may retry). ~9 KiB each while waiting for a body."""
PROCESS_BUDGET = StreamBudget(MAX_HANDLERS)

MAX_STREAMS = 1_024
"""Incoming streams one link may hold open (advertised as SETTINGS_MAX_CONCURRENT_STREAMS and
enforced here too, for a peer that ignores it): RPC links (CLI, agents) never need more."""
TUNNEL_STREAMS = 10_240
"""The same for the links that carry a client's tunnel (one stream per TCP connection)."""


BIG_LINK = 1_000
"""Streams a link must have taken in or refused for its end to be worth a full GC collection
(h2 keeps state for refused ones too)."""
RELEASE_EVERY = 5.0
"""Seconds between two such collections at least (a peer that opens and drops big links
again and again must not make the process spend its time collecting: one costs ~10-20 ms)."""
RELEASE_DELAY = 0.1
"""Wait this long after a big link ends, so links that end together (a flooder's) are released
by one collection."""
_last_release = -RELEASE_EVERY
_release_pending = False


async def _release_after_big_link() -> None:
    """What a big link leaves is mostly cycles (tracebacks of its cancelled handlers, h2's
    self-referring connection): collected soon, and the heap's free pages handed back
    (`gctune.release_memory`), a flood's memory goes back to the OS now, not at the next full
    collection, which a tuned process (tele.gctune) runs rarely. One collection serves every
    big link that ends while it is pending."""
    global _last_release, _release_pending
    if _release_pending:
        return
    _release_pending = True
    try:
        await trio.sleep(max(RELEASE_DELAY, _last_release + RELEASE_EVERY - time.monotonic()))
    finally:
        _release_pending = False
    _last_release = time.monotonic()
    gctune.release_memory()


@dataclass(frozen=True)
class LinkSettings:
    """Tunables of one link; the defaults were chosen by measurement (bench/tunnel.py)."""

    # Flow-control credit, returned as the consumer reads (h2 sends a WINDOW_UPDATE once half a
    # window was read). A stream's window bounds its rate to ~window / round trip, and the
    # round trip a credit makes includes the queues of the path back (an echoed stream's
    # credit waits behind the other direction's data): at 40 ms RTT through the port-forward
    # (bench/wholepath.py) one stream made 26-30 MB/s with 4 MiB, 48-50 MB/s with 16 MiB.
    # The link's window is 4 streams' worth, so a few streams whose readers stall (each holds
    # its window's credit) leave the others room; it bounds what a link buffers for readers.
    stream_window: int = 16 * 1024 * 1024
    connection_window: int = 64 * 1024 * 1024
    max_frame_size: int = 256 * 1024
    max_concurrent_streams: int = MAX_STREAMS
    max_header_list_size: int = 64 * 1024
    read_size: int = 256 * 1024
    # A sender parks once this much is queued in h2 and not yet written to the transport.
    write_high_water: int = 1024 * 1024
    # Socket transports: the first frames queued after each read (or write) of the link are
    # written by the task that queued them, without waking the writer task (see `Writer`).
    write_through: bool = True
    # Keepalive: a PING every `keepalive_interval` s; no answer within `keepalive_timeout` s
    # fails the link. None disables it.
    keepalive_interval: float | None = None
    keepalive_timeout: float = 10.0
    # Shared by the links of a process (see StreamBudget): bounds handler tasks in total.
    budget: StreamBudget = PROCESS_BUDGET


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
        prepare: StreamPrepare | None = None,
    ) -> None:
        self.transport = transport
        self.client_side = client_side
        self.settings = settings
        self.name = name
        self.read_size = settings.read_size
        self._handler = handler
        self._prepare = prepare
        """Called with each incoming stream as it arrives, in the reader's step, before its
        handler task is started (what it finds goes to the handler in `H2Stream.prepared`)."""
        self.budget = settings.budget
        """What this link's incoming streams take a handler from; a server may move the link to
        another (its peer's share, once it knows who the peer is): streams already handled give
        back to the budget they took from."""
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
        self._refused = 0
        self._taken_in = 0  # incoming streams accepted over the link's life
        self._failure: str | None = None
        self._goaway_received = False
        self._closing = False
        self._capacity_lot = trio.lowlevel.ParkingLot()
        self._writer = Writer(
            self._conn,
            transport,
            high_water=settings.write_high_water,
            write_through=settings.write_through,
        )
        self._kick_writer = self._writer.kick
        self._pings: dict[bytes, trio.Event] = {}
        self._ping_counter = 0
        self._closed_event = trio.Event()
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
        stream = self._start_stream(headers, end_stream=end_stream and not body)
        if body:
            try:
                await stream._send_body(body)
                if end_stream:
                    self._end_stream(stream)
            except BaseException:
                stream.reset()
                raise
        return stream

    def open_stream_now(self, headers: Headers) -> H2Stream:
        """`open_stream` without its schedule point (`tele.rpc.tunnel.dial`'s optimistic OPEN:
        the VIF's new connection queues it and parks in the same task step). Raises
        `trio.WouldBlock` at the peer's concurrency limit (then wait in `open_stream`),
        `LinkBroken` when the link is unusable."""
        self._raise_if_unusable()
        if self._open_local >= self._conn.remote_settings.max_concurrent_streams:
            raise trio.WouldBlock
        return self._start_stream(headers, end_stream=False)

    def _start_stream(self, headers: Headers, *, end_stream: bool) -> H2Stream:
        stream_id = self._conn.get_next_available_stream_id()
        stream = H2Stream(self, stream_id, headers)
        self._streams[stream_id] = stream
        self._open_local += 1
        try:
            self._conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            self._forget(stream)
            raise LinkBroken(f"cannot open a stream: {exc}") from exc
        if end_stream:
            stream._local_ended = True
        self._kick_writer()
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
        self._writer.open()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write)
                nursery.start_soon(self._reader)
                if s.keepalive_interval is not None:
                    nursery.start_soon(self._keepalive, s.keepalive_interval, s.keepalive_timeout)
                task_status.started()
                await self._closed_event.wait()
                # Give the writer a moment to flush a GOAWAY, then stop everything.
                with trio.move_on_after(1):
                    await self._writer.wait_done()
                nursery.cancel_scope.cancel()
        finally:
            self._fail("link closed")
            self._writer.close()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.transport.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            # h2's connection refers to itself (its frame dispatch table of bound methods), so
            # it and every stream it holds wait for a full GC collection, which a tuned
            # process runs rarely: a flooded link's streams (10,000 of them: ~80 MiB) would
            # stay. Let them go now.
            self._conn.streams.clear()
            self._streams.clear()
            self._window_waiters.clear()
            self._nursery = None

    async def _reader(self) -> None:
        read_size = self.settings.read_size
        try:
            while self._failure is None:
                while self._conn.control_size > _CONTROL_BACKLOG and self._failure is None:
                    # Our answers to the peer are not being taken: read no more of it (never
                    # for DATA: both sides waiting to write while not reading would deadlock).
                    self._kick_writer()
                    await self._writer.drain_lot.park()
                data = await self.transport.receive_some(read_size)
                if not data:
                    self._fail("the peer closed the connection")
                    return
                self._writer.through_ok = True
                try:
                    events = self._conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    # Frames that cross our own GOAWAY are expected, not the peer's fault.
                    level = logging.DEBUG if self._closing else logging.WARNING
                    log.log(level, "%s: protocol error from peer, closing: %s", self.name, exc)
                    self._closing = True  # lets the writer flush h2's GOAWAY
                    self._kick_writer()
                    self._fail(f"protocol error: {exc}")
                    return
                # Frames queued while dispatching (window updates, resets) leave in one write.
                self._writer.batching = True
                try:
                    for event in events:
                        self._dispatch(event)
                finally:
                    self._writer.batching = False
                self._kick_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(f"connection lost: {exc or type(exc).__name__}")

    async def _write(self) -> None:
        try:
            await self._writer.run()
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
                stream._on_response(_headers(event.headers))
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
                stream._on_remote_end()
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
        """The one place an incoming stream becomes a handler task: a limit on streams per
        link, or on handler tasks across links, refuses here (REFUSED_STREAM, as below)."""
        stream_id = event.stream_id
        headers = _headers(event.headers)
        if self._handler is None or self._nursery is None or self._closing:
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        settings = self.settings
        incoming = len(self._streams) - self._open_local
        budget = self.budget
        if incoming >= settings.max_concurrent_streams or not budget.take():
            self._refuse(stream_id)
            return
        self._taken_in += 1
        stream = H2Stream(self, stream_id, headers)
        self._streams[stream_id] = stream
        if event.stream_ended is not None:
            stream._remote_ended = True
        if self._prepare is not None:
            try:
                self._prepare(stream)
            except Exception:  # the handler meets the same problem and answers it
                log.exception("%s: preparing stream %d failed", self.name, stream_id)
        self._nursery.start_soon(self._run_handler, stream, self._handler, budget)

    def _refuse(self, stream_id: int) -> None:
        """Too many streams (this link's or the process's): the peer may retry this one."""
        self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self._refused += 1
        if self._refused in (1, 1000) or self._refused % 100_000 == 0:
            total = self.budget
            while total.parent is not None:
                total = total.parent
            log.warning(
                "%s: refused %d streams so far: %d of this link's %d open, %d of its budget's "
                "%d handlers (%d of the process's %d)",
                self.name,
                self._refused,
                len(self._streams) - self._open_local,
                self.settings.max_concurrent_streams,
                self.budget.in_use,
                self.budget.limit,
                total.in_use,
                total.limit,
            )

    async def _run_handler(
        self, stream: H2Stream, handler: StreamHandler, budget: StreamBudget
    ) -> None:
        try:
            await self._handle(stream, handler)
        finally:
            budget.give_back()

    async def _handle(self, stream: H2Stream, handler: StreamHandler) -> None:
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
            self._fail(f"peer closed the connection with {error_name(event.error_code)}")
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
        self._writer.queued(len(data))

    def _must_drain(self) -> bool:
        return self._writer.must_drain()

    async def _wait_drained(self) -> None:
        await self._writer.wait_drained()

    def _send_headers(
        self, stream: H2Stream, headers: Headers, end_stream: bool, *, kick: bool = True
    ) -> None:
        """Queue HEADERS; `kick=False` when DATA follows at once (it kicks the writer: the two
        leave in one write)."""
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
        if kick:
            self._kick_writer()

    def _end_stream(self, stream: H2Stream, *, lazy: bool = False) -> None:
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
        self._kick_writer(through=not lazy)

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
        self._writer.stop()
        self._closed_event.set()


def _headers(raw: Any) -> Headers:
    return [(_text(k), _text(v)) for k, v in (raw or [])]


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@asynccontextmanager
async def open_link(
    transport: trio.abc.Stream,
    *,
    client_side: bool,
    handler: StreamHandler | None = None,
    settings: LinkSettings | None = None,
    name: str | None = None,
    prepare: StreamPrepare | None = None,
) -> AsyncIterator[H2Link]:
    """Run an h2 link over `transport` for the duration of the block; closes it on exit.
    `prepare`: see `H2Link`."""
    link = H2Link(
        transport,
        client_side=client_side,
        handler=handler,
        settings=settings or LinkSettings(),
        name=name or ("h2-client" if client_side else "h2-server"),
        prepare=prepare,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(link._run)
        try:
            yield link
        finally:
            link.close()
    # Every task of the link has ended here (their frames and tracebacks are garbage now).
    if link._taken_in + link._refused >= BIG_LINK:
        await _release_after_big_link()


async def serve_link(
    transport: trio.abc.Stream,
    handler: StreamHandler,
    *,
    settings: LinkSettings | None = None,
    name: str | None = None,
    prepare: StreamPrepare | None = None,
) -> None:
    """Server side: serve one connection until it closes or fails (`prepare`: `H2Link`'s)."""
    async with open_link(
        transport,
        client_side=False,
        handler=handler,
        settings=settings,
        name=name,
        prepare=prepare,
    ) as link:
        await link.wait_closed()
