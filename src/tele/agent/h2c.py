"""The `http` mechanism for HTTP/2 with prior knowledge (h2c): routed stream by stream.

The caller's connection is an h2 server endpoint; every request stream is routed on its own
(tele.agent.matching on `:path` and the headers) to an h2 client connection per destination (the
app, or an engaged client's handler), opened on first use and shared by the caller connection's
later streams. Frames are relayed as events: headers, data, trailers, end and reset.

Flow control (purerpc's lesson): data received on one side is acknowledged only once it has been
handed to the other side's h2 state within that side's send window, so a slow reader stalls its
own stream's sender instead of filling the agent's memory. Per-stream event queues are therefore
bounded by the advertised windows even though the channels themselves are unbounded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import trio

from tele.agent.errors import UpstreamFailed
from tele.agent.matching import Router
from tele.agent.upstream import READ_SIZE, Upstreams
from tele.net.h2conn import Connection
from tele.rpc.agent_api import Engagement
from tele.rpc.h2writer import Writer

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
_CLOSED: Final = object()
"""Put on a stream's queue when its connection ended: nothing more will come."""


class _Peer:
    """One HTTP/2 connection: the caller's (server role) or one to a destination (client role)."""

    def __init__(self, stream: trio.abc.Stream, *, client_side: bool, label: str) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_inbound_headers=True
        )
        # tele's connection: among others, it refuses an overlong frame at its header (h2
        # would buffer up to the 16 MiB a frame may declare before checking it).
        self.conn = Connection(config=config)
        self.stream = stream
        self.label = label
        self.queues: dict[int, trio.MemorySendChannel[Any]] = {}
        # Senders wait for the peer's windows (send_data), never for the writer: no high water.
        self.writer = Writer(self.conn, stream, high_water=1 << 62, write_through=False)
        self._window = trio.Event()
        self.closed = False

    async def flush(self) -> None:
        """Have the writer send what h2 has queued. Stream tasks never write to the socket
        themselves: a task cancelled halfway through a write would cut a frame in two and
        break every other stream of the connection."""
        self.writer.kick()
        await trio.lowlevel.checkpoint()

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            await self.writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("%s: write failed: %r", self.label, exc)
            scope.cancel()

    async def run(
        self, on_request: Callable[[int, Headers], None] | None = None, first: bytes = b""
    ) -> None:
        """Read and write until the connection ends (see read_loop)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, nursery.cancel_scope)
            await self.read_loop(on_request, first)
            self.writer.stop()
            with trio.move_on_after(1):  # a last GOAWAY, if the peer still reads
                await self.writer.wait_done()
            nursery.cancel_scope.cancel()

    def open_queue(self, stream_id: int) -> trio.MemoryReceiveChannel[Any]:
        send, receive = trio.open_memory_channel[Any](float("inf"))
        self.queues[stream_id] = send
        return receive

    def close_queue(self, stream_id: int) -> None:
        queue = self.queues.pop(stream_id, None)
        if queue is not None:
            queue.close()

    async def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Send `data` within the peer's windows, waiting for WINDOW_UPDATE when they are shut."""
        view = memoryview(data)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                if self.closed:
                    raise trio.BrokenResourceError(f"{self.label} closed")
                await self._window.wait()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            await self.flush()
        if end:
            self.conn.end_stream(stream_id)
            await self.flush()

    async def read_loop(
        self, on_request: Callable[[int, Headers], None] | None = None, first: bytes = b""
    ) -> None:
        """Receive (`first`, then from the stream) and dispatch until the connection ends; then
        every stream queue is closed."""
        try:
            await self.flush()
            while True:
                data = first or await self.stream.receive_some(READ_SIZE)
                first = b""
                if not data:
                    return
                events = self.conn.receive_data(bytes(data))
                for event in events:
                    if not self._dispatch(event, on_request):
                        return
                await self.flush()
        except h2.exceptions.ProtocolError as exc:
            log.info("%s broke HTTP/2: %s", self.label, exc)
            self.conn.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("%s ended: %r", self.label, exc)
        finally:
            self.closed = True
            self._window.set()
            for queue in self.queues.values():
                queue.close()
            self.queues.clear()

    def _dispatch(
        self, event: h2.events.Event, on_request: Callable[[int, Headers], None] | None
    ) -> bool:
        if isinstance(event, h2.events.RequestReceived) and on_request is not None:
            on_request(event.stream_id, list(event.headers or []))
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window.set()
            self._window = trio.Event()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        elif isinstance(
            event,
            h2.events.ResponseReceived
            | h2.events.InformationalResponseReceived
            | h2.events.DataReceived
            | h2.events.TrailersReceived
            | h2.events.StreamEnded
            | h2.events.StreamReset,
        ):
            queue = self.queues.get(event.stream_id or 0)
            try:
                if queue is None:
                    raise trio.ClosedResourceError
                queue.send_nowait(event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                if isinstance(event, h2.events.DataReceived) and event.stream_id:
                    # Nobody will read it: give the credit back at once.
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id
                    )
        return True


async def serve_connection(
    stream: trio.abc.Stream, upstreams: Upstreams, first: bytes, router: Router
) -> None:
    """Serve one h2c caller connection (its first bytes already read) until it ends."""
    down = _Peer(stream, client_side=False, label="the caller")
    down.conn.initiate_connection()
    peers: dict[str | None, _Peer] = {}
    connecting: dict[str | None, trio.Lock] = {}

    async with trio.open_nursery() as nursery:

        async def upstream_for(engagement: Engagement | None) -> _Peer:
            key = engagement.id if engagement else None
            async with connecting.setdefault(key, trio.Lock()):
                peer = peers.get(key)
                if peer is None or peer.closed:
                    target = await upstreams.open(engagement)
                    peer = _Peer(target, client_side=True, label=upstreams.describe(engagement))
                    peer.conn.initiate_connection()
                    peers[key] = peer
                    nursery.start_soon(_run_upstream, peer)
                return peer

        def on_request(stream_id: int, headers: Headers) -> None:
            queue = down.open_queue(stream_id)
            nursery.start_soon(
                _proxy_stream, down, stream_id, headers, queue, upstreams, router, upstream_for
            )

        await down.run(on_request, first)
        nursery.cancel_scope.cancel()  # the caller is gone: its streams and upstreams too


async def _run_upstream(peer: _Peer) -> None:
    async with peer.stream:
        await peer.run()


def _header(headers: Headers, name: bytes) -> str:
    return next((v.decode("latin-1") for n, v in headers if n == name), "")


async def _proxy_stream(
    down: _Peer,
    stream_id: int,
    headers: Headers,
    down_events: trio.MemoryReceiveChannel[Any],
    upstreams: Upstreams,
    router: Router,
    upstream_for: Callable[[Engagement | None], Awaitable[_Peer]],
) -> None:
    """Carry one request stream to its destination and the response back."""
    engaged = upstreams.source.current(upstreams.agent_port)
    plain = [(n, v) for n, v in headers if not n.startswith(b":")]
    engagement = router.route(engaged, _header(headers, b":path"), plain)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("h2 %s -> %s", _header(headers, b":path"), upstreams.describe(engagement))
    try:
        up = await upstream_for(engagement)
        up_id = up.conn.get_next_available_stream_id()
        up_events = up.open_queue(up_id)
        up.conn.send_headers(up_id, headers)
        await up.flush()
    except UpstreamFailed as exc:
        log.warning("%s", exc)
        await _answer_502(down, stream_id, str(exc))
        down.close_queue(stream_id)
        return
    except (h2.exceptions.ProtocolError, trio.BrokenResourceError, OSError) as exc:
        log.info("stream %d not forwarded: %r", stream_id, exc)
        _reset(down, stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        await _flush_quietly(down)
        down.close_queue(stream_id)
        return

    async def forward(
        source: _Peer,
        source_id: int,
        events: trio.MemoryReceiveChannel[Any],
        sink: _Peer,
        sink_id: int,
    ) -> None:
        """Events of one direction, until its end; a reset or a lost peer resets both."""
        try:
            async for event in events:
                if isinstance(event, h2.events.DataReceived):
                    await sink.send_data(sink_id, event.data or b"")
                    source.conn.acknowledge_received_data(
                        event.flow_controlled_length or 0, source_id
                    )
                    await source.flush()
                elif isinstance(
                    event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived
                ):
                    sink.conn.send_headers(sink_id, list(event.headers or []))
                    await sink.flush()
                elif isinstance(event, h2.events.TrailersReceived):
                    sink.conn.send_headers(sink_id, list(event.headers or []), end_stream=True)
                    await sink.flush()
                    return
                elif isinstance(event, h2.events.StreamEnded):
                    sink.conn.end_stream(sink_id)
                    await sink.flush()
                    return
                elif isinstance(event, h2.events.StreamReset):
                    _reset(sink, sink_id, event.error_code or h2.errors.ErrorCodes.CANCEL)
                    await _flush_quietly(sink)
                    nursery.cancel_scope.cancel()
                    return
            # The queue closed without an end: the source's connection is gone.
            _reset(sink, sink_id, h2.errors.ErrorCodes.CANCEL)
        except (h2.exceptions.ProtocolError, trio.BrokenResourceError, OSError) as exc:
            log.debug("stream %d: %r", stream_id, exc)
            _reset(sink, sink_id, h2.errors.ErrorCodes.CANCEL)
            _reset(source, source_id, h2.errors.ErrorCodes.CANCEL)
            await _flush_quietly(source)
        await _flush_quietly(sink)
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward, down, stream_id, down_events, up, up_id)
            # When the response is complete the request may still be sending: it may finish
            # (HTTP/2 lets a server answer early); a reset from the server ends it.
            await forward(up, up_id, up_events, down, stream_id)
    finally:
        down.close_queue(stream_id)
        up.close_queue(up_id)


def _reset(peer: _Peer, stream_id: int, code: int) -> None:
    try:
        peer.conn.reset_stream(stream_id, code)
    except h2.exceptions.ProtocolError:
        pass  # already closed


async def _flush_quietly(peer: _Peer) -> None:
    try:
        await peer.flush()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _answer_502(down: _Peer, stream_id: int, sentence: str) -> None:
    body = f"tele traffic agent: {sentence}\n".encode()
    try:
        down.conn.send_headers(
            stream_id,
            [
                (b":status", b"502"),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        await down.send_data(stream_id, body, end=True)
    except (h2.exceptions.ProtocolError, trio.BrokenResourceError, OSError):
        _reset(down, stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        await _flush_quietly(down)
