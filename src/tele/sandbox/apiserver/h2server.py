"""An HTTP/2 connection driving an ASGI app, built on the sans-IO h2 library.

Why not hypercorn's HTTP/2: it sends every frame with its own write and wakes several tasks per
request, which caps a single connection at a few hundred requests per second. Here the reader
feeds one read's worth of frames to h2, starts one task per request, and each response (headers
and body) is flushed with a single write; writers that find the buffer already flushed by
someone else return at once. Request bodies are acknowledged (flow control) only when the app
has read them, and response data waits for the peer's window, so memory stays bounded both ways.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.events
import h2.exceptions
import h2.settings
import trio

from tele.net.h2conn import Connection
from tele.net.h2credit import ReceiveBuffer

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

_READ_SIZE = 65536
_STREAM_WINDOW = 1 << 20
_CONNECTION_WINDOW = 1 << 24


class _Stream:
    """One request: its body as it arrives, and whether the peer is still there."""

    __slots__ = (
        "closed",
        "complete",
        "ended",
        "event",
        "headers_sent",
        "inbound",
        "response_headers",
        "status",
        "window_open",
    )

    def __init__(self) -> None:
        self.inbound = ReceiveBuffer()  # the request body; credit returned as the app reads
        self.complete = False
        self.closed = False
        self.event = trio.Event()  # new body data, end of body or reset
        self.window_open = trio.Event()  # the peer granted more send window
        self.status = 200
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.headers_sent = False
        self.ended = False  # our END_STREAM went out

    def wake(self) -> None:
        self.event.set()
        self.event = trio.Event()


class H2ServerConnection:
    def __init__(
        self,
        app: ASGIApp,
        stream: trio.abc.Stream,
        *,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        max_streams: int = 1000,
    ) -> None:
        self.app = app
        self.stream = stream
        self.client = client
        self.server = server
        # Header validation and normalization cost more per request than the request itself;
        # our own headers are well-formed and hpack rejects malformed input anyway.
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )
        # tele's connection: among others, it refuses an overlong frame at its header.
        self.conn = Connection(config)
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 16,
            },
        )
        self.streams: dict[int, _Stream] = {}
        self.send_lock = trio.Lock()
        self.closed = False

    # --- I/O -------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write whatever h2 has queued; one write carries every stream's pending frames."""
        async with self.send_lock:
            data = self.conn.data_to_send()
            if not data or self.closed:
                return
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lost()

    def _lost(self) -> None:
        self.closed = True
        for st in self.streams.values():
            st.closed = True
            st.wake()
            st.window_open.set()

    async def run(self) -> None:
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        await self.flush()
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._read_loop(nursery)
                finally:
                    self._lost()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                log.info("HTTP/2 protocol error from %s: %s", self.client, exc)
                await self.flush()
                return
            for event in events:
                if self._handle(event, nursery):
                    await self.flush()
                    return
            await self.flush()

    def _handle(self, event: h2.events.Event, nursery: trio.Nursery) -> bool:
        """Apply one h2 event; True when the connection is over."""
        if isinstance(event, h2.events.RequestReceived):
            fresh = _Stream()
            self.streams[event.stream_id] = fresh
            if event.stream_ended is not None:
                fresh.complete = True
            nursery.start_soon(self._run_app, event.stream_id, fresh, event.headers)
            return False
        if isinstance(event, h2.events.ConnectionTerminated):
            return True
        stream_id = getattr(event, "stream_id", 0)
        st = self.streams.get(stream_id)
        if isinstance(event, h2.events.DataReceived):
            if st is None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                return False
            st.inbound.receive(event.data)
            # Padding is never handed to the app: credit it back now.
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.conn.acknowledge_received_data(padding, stream_id)
            if event.stream_ended is not None:
                st.complete = True
            st.wake()
        elif isinstance(event, h2.events.StreamEnded) and st is not None:
            st.complete = True
            st.wake()
        elif isinstance(event, h2.events.StreamReset) and st is not None:
            st.closed = True
            st.wake()
            st.window_open.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            # A new INITIAL_WINDOW_SIZE grows every stream's window without a WINDOW_UPDATE.
            for target in self.streams.values():
                target.window_open.set()
        elif isinstance(event, h2.events.WindowUpdated):
            targets = list(self.streams.values()) if stream_id == 0 else [st] if st else []
            for target in targets:
                target.window_open.set()
        return False

    # --- one request -----------------------------------------------------------------------

    async def _run_app(
        self, stream_id: int, st: _Stream, raw_headers: list[tuple[bytes, bytes]]
    ) -> None:
        scope = self._scope(raw_headers)

        told_end = False  # the app was told "no more body" (once, then only a disconnect)

        async def receive() -> dict[str, Any]:
            nonlocal told_end
            while True:
                if st.inbound.buffered:
                    chunk = st.inbound.take(_READ_SIZE)
                    if not st.closed and not self.closed:
                        try:
                            self.conn.acknowledge_received_data(len(chunk), stream_id)
                        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                            pass
                        await self.flush()
                    more = bool(st.inbound.buffered) or not st.complete
                    told_end = not more
                    return {"type": "http.request", "body": chunk, "more_body": more}
                if st.closed or self.closed:
                    return {"type": "http.disconnect"}
                if st.complete:
                    if not told_end:
                        # A body-less request, or one whose end came after its last data (an
                        # empty DATA frame or trailers with END_STREAM).
                        told_end = True
                        return {"type": "http.request", "body": b"", "more_body": False}
                    # The body was read; what remains is waiting for the client to go away.
                    await st.event.wait()
                    if st.closed or self.closed:
                        return {"type": "http.disconnect"}
                    continue
                await st.event.wait()

        async def send(message: dict[str, Any]) -> None:
            if st.closed or self.closed:
                return
            kind = message["type"]
            if kind == "http.response.start":
                st.status = int(message["status"])
                st.response_headers = [
                    (bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])
                ]
                return
            if kind != "http.response.body":
                return
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            if st.ended:
                return
            st.ended = not more
            try:
                if not st.headers_sent:
                    st.headers_sent = True
                    headers = [(b":status", str(st.status).encode())]
                    headers += [
                        (k, v)
                        for k, v in st.response_headers
                        if k not in (b"connection", b"transfer-encoding", b"keep-alive")
                    ]
                    ended = not body and not more
                    self.conn.send_headers(stream_id, headers, end_stream=ended)
                    if not ended:
                        await self._send_data(stream_id, st, body, end=not more)
                else:
                    await self._send_data(stream_id, st, body, end=not more)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                st.closed = True
            await self.flush()

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("unhandled error in request handler")
        finally:
            self.streams.pop(stream_id, None)
            if not self.closed:
                try:
                    if not st.closed and not st.headers_sent:
                        self.conn.send_headers(stream_id, [(b":status", b"500")], end_stream=True)
                    elif not st.closed and not st.ended:
                        self.conn.end_stream(stream_id)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                with trio.CancelScope(shield=True):
                    await self.flush()

    async def _send_data(self, stream_id: int, st: _Stream, body: bytes, *, end: bool) -> None:
        view = memoryview(body)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                st.window_open = trio.Event()
                await self.flush()
                await st.window_open.wait()
                if st.closed or self.closed:
                    return
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream_id, chunk.tobytes(), end_stream=end and not view)
        if end and not body:
            self.conn.end_stream(stream_id)

    def _scope(self, raw_headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        method, raw_path, authority = b"GET", b"/", b""
        headers: list[tuple[bytes, bytes]] = []
        for name, value in raw_headers:
            if name.startswith(b":"):
                if name == b":method":
                    method = value
                elif name == b":path":
                    raw_path = value
                elif name == b":authority":
                    authority = value
            else:
                headers.append((name.lower(), value))
        if authority:
            headers.append((b"host", authority))
        path_part, _, query = raw_path.partition(b"?")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "2",
            "method": method.decode("ascii", "replace"),
            "scheme": "https",
            "path": urllib.parse.unquote(path_part.decode("latin-1")),
            "raw_path": path_part,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": self.server,
            "extensions": {},
        }
