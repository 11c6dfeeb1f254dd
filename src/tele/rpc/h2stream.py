"""One HTTP/2 stream of a link as a trio `HalfCloseableStream`: DATA in and out, END_STREAM as EOF.

The stream's state and credit are `tele.rpc.h2state.StreamCore`'s (sans-IO); this module adds
the waiting (parking lots woken by the link's reader) and what it asks of its link
(`StreamOwner`, implemented by `tele.rpc.h2link.H2Link`). Flow-control credit goes back to the
peer only as the consumer reads, so a slow reader slows its own sender and no one else.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Protocol

import h2.errors
import trio

from tele.rpc.h2state import CloseAction, StreamCore

Headers = list[tuple[str, str]]
ResponseCheck = Callable[[Headers], BaseException | None]
"""Judges a response that arrives while the opener is already sending and reading (see
`H2Stream.response_check`): None accepts it, an exception refuses the stream with it."""


class StreamOwner(Protocol):
    """What a stream needs of its link (tele.rpc.h2link.H2Link)."""

    _failure: str | None
    _window_waiters: set[H2Stream]
    read_size: int

    def _is_client_stream(self, stream_id: int) -> bool: ...
    def _send_window(self, stream_id: int) -> int: ...
    def _send_data(self, stream: H2Stream, data: bytes | memoryview) -> None: ...
    def _send_headers(
        self, stream: H2Stream, headers: Headers, end_stream: bool, *, kick: bool = True
    ) -> None: ...
    def _end_stream(self, stream: H2Stream, *, lazy: bool = False) -> None: ...
    def _reset_stream(self, stream: H2Stream, error_code: int) -> None: ...
    def _acknowledge(self, stream_id: int, size: int) -> None: ...
    def _must_drain(self) -> bool: ...
    async def _wait_drained(self) -> None: ...


class H2Stream(StreamCore, trio.abc.HalfCloseableStream):
    """One HTTP/2 stream as a trio stream: DATA frames in and out, END_STREAM as EOF."""

    def __init__(self, link: StreamOwner, stream_id: int, request_headers: Headers) -> None:
        super().__init__(stream_id, needs_response=not link._is_client_stream(stream_id))
        self._link = link
        self.request_headers = request_headers
        self.response_headers: Headers | None = None
        self.trailers: Headers | None = None
        self._receive_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._response_lot = trio.lowlevel.ParkingLot()
        self._receiving = False
        self._sending = False
        self.handler_scope: trio.CancelScope | None = None
        self.prepared: object = None
        """Server side: what the link's `prepare` hook found as the stream arrived, for its
        handler (e.g. the tunnel server's dial under way)."""
        # Client side, opened without waiting for the response: the response is judged when
        # it arrives, and a refusal is raised by every later send or receive.
        self.response_check: ResponseCheck | None = None
        # Where DATA may be handed by the link's reader itself while the consumer waits in
        # receive_some (a write to a non-blocking socket, or a callable): see `deliver_to`.
        self._sink: Callable[[bytes], int] | None = None
        self._waiting_in_receive = False
        # Push mode (`push_to`): the sink is used with no consumer parked in receive_some.
        self._push_wake: Callable[[], None] | None = None
        self._push_end: Callable[[], bool] | None = None

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

    def send_response_now(self, headers: Headers, *, end_stream: bool = False) -> None:
        """`send_response(headers)` (no body) without its schedule point, for a handler that
        answers between its own waits (the tunnel server's ACCEPT or REFUSE of an OPEN)."""
        self._check_sendable()
        self._needs_response = False
        self._link._send_headers(self, headers, end_stream)

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
                # Not written on its own when DATA can follow at once: they leave together.
                alone = not data or self._link._send_window(self.stream_id) <= 0
                self._link._send_headers(self, [(":status", "200")], False, kick=alone)
            parked = await self._send_body(data)
        finally:
            self._sending = False
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    def send_now(self, data: bytes) -> int:
        """Queue as much of `data` as DATA as the windows allow now, without waiting: for a
        producer that is not a task (the VIF's packet reader); how many bytes were queued.

        0 when the stream takes nothing now (a send in progress, no window, the link must
        drain first, or the stream cannot send at all): the caller then hands the bytes to its
        task's `send_all`, which waits or raises as usual, after anything queued here. A server
        stream that still owes its response sends `:status 200` with the DATA, as `send_all`.
        """
        if self._sending or self._link._must_drain():
            return 0
        try:
            self._check_sendable()
            size = min(self._link._send_window(self.stream_id), len(data))
            if size <= 0:
                return 0
            if self._needs_response:  # a server stream's implicit answer, in the same write
                self._needs_response = False
                self._link._send_headers(self, [(":status", "200")], False, kick=False)
            self._link._send_data(self, data if size == len(data) else memoryview(data)[:size])
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # the link's too
            return 0
        return size

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
        link = self._link
        while offset < total:
            self._check_sendable()
            window = link._send_window(self.stream_id)
            if window <= 0:
                parked = True
                await self._wait_window()
                continue
            size = min(window, total - offset)
            if size == total and whole is not None:
                link._send_data(self, whole)  # no copy: bytes are immutable
            else:
                link._send_data(self, view[offset : offset + size])
            offset += size
            if link._must_drain():
                parked = True
                await link._wait_drained()
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
        if self.take_response_duty():
            self._link._send_headers(self, [(":status", "200")], True)
        else:
            self._link._end_stream(self)

    def send_eof_now(self, *, lazy: bool = False) -> bool:
        """`send_eof` without waiting, for a producer that is not a task (the VIF's packet
        reader): True once END_STREAM is queued (or our side had ended already). False when it
        cannot be done now (a send in progress, a response owed, the stream unusable): the
        caller then leaves it to a task's `send_eof`, which waits or raises as usual.

        `lazy`: the END_STREAM leaves with the link writer's next pass instead of a write of
        its own now (the VIF's app EOFs: in a loop of short connections it then shares a
        write with the next connection's OPEN, and the far end's teardown does not compete
        with the new connection's set-up; bench/vif.py --rows c --conn-only, 8 A/B pairs:
        sequential connections/s +5 %, first byte ~25 µs sooner, the tunnel server's CPU per
        connection -6 %)."""
        if self._sending or self._needs_response or self._closed:
            return False
        if self._local_ended:
            return True
        try:
            self._raise_if_failed()
            self._link._end_stream(self, lazy=lazy)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

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
            return self._take(max_bytes or self._link.read_size)
        finally:
            self._receiving = False
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()

    def receive_now(self, max_bytes: int | None = None) -> bytes | None:
        """What `receive_some` would return without waiting (buffered bytes, or b"" at the
        end), or None when it would wait: no schedule point. Raises as `receive_some`."""
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._chunks:
            return self._take(max_bytes or self._link.read_size)
        self._raise_if_failed()
        return b"" if self._remote_ended else None

    def push_to(
        self,
        sink: int | Callable[[bytes], int],
        *,
        wake: Callable[[], None],
        end: Callable[[], bool],
    ) -> None:
        """`deliver_to(sink)` for a consumer that is not parked in `receive_some` but busy
        elsewhere (`tele.rpc.tunnel`'s socket relay reads the socket meanwhile), or that has
        no task at all (the VIF's task-less connections): the link's reader hands DATA to
        `sink` (as `deliver_to`), and at the peer's END_STREAM with nothing buffered calls
        `end()` (True: handled, e.g. the socket was half-closed).

        Whatever else would wake a reader (bytes the sink did not take, an end `end` did not
        handle, a reset, the link's failure) ends push mode and calls `wake()` once: the
        consumer then reads the stream as usual, in order. `deliver_to` (or None) ends it too.
        """
        self.deliver_to(sink)
        self._push_wake = wake
        self._push_end = end

    def deliver_to(self, sink: int | Callable[[bytes], int] | None) -> None:
        """Let the link's reader hand DATA straight to `sink` (None: stop): a non-blocking
        socket's descriptor the consumer would copy it to anyway (`tele.rpc.tunnel.splice`),
        or a callable that takes what it can without blocking and returns how many bytes it
        took (the VIF's TCP connection: `tele.vif.runtime`).

        Only while the consumer is parked in `receive_some` with nothing buffered, so the
        bytes keep their order; whatever the sink does not take at once is buffered and the
        consumer woken as usual. This saves a task switch per DATA frame, most of a relay
        hop's latency. The caller must stop it before the sink goes away.
        """
        self._sink = functools.partial(os.write, sink) if isinstance(sink, int) else sink
        self._push_wake = self._push_end = None

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
        action = self.close_action(self._link._failure is None)
        if action is CloseAction.RESET_CANCEL:
            self.reset(h2.errors.ErrorCodes.CANCEL)
        elif action is CloseAction.RESET_NO_ERROR:
            self.reset(h2.errors.ErrorCodes.NO_ERROR)
        elif action is CloseAction.RESPOND_AND_END:
            self._link._send_headers(self, [(":status", "200")], True)
        elif action is CloseAction.END:
            self._link._end_stream(self)

    def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abort the stream both ways with RST_STREAM."""
        if self._reset_code is not None:
            return
        self._reset_code = error_code
        self._link._reset_stream(self, error_code)
        self._discard_buffer()
        self._wake_all()

    # --- internals --------------------------------------------------------------------------

    def _take(self, limit: int) -> bytes:
        data = self.take(limit)
        self._link._acknowledge(self.stream_id, len(data))
        return data

    def _discard_buffer(self) -> None:
        credit = self.discard()
        if credit:
            self._link._acknowledge(self.stream_id, credit)

    def _check_sendable(self) -> None:
        self.check_sendable(self._link._failure)

    def _raise_if_failed(self) -> None:
        self.raise_if_failed(self._link._failure)

    def _wake_all(self) -> None:
        self._receive_lot.unpark_all()
        self._send_lot.unpark_all()
        self._response_lot.unpark_all()
        self._wake_pusher()

    def _wake_pusher(self) -> None:
        wake = self._push_wake
        if wake is not None:
            self._push_wake = self._push_end = None
            wake()

    # Called by the link's reader.
    def _on_data(self, data: bytes) -> None:
        if self._closed:
            self._link._acknowledge(self.stream_id, len(data))
            if self._reset_code is None:
                self.reset(h2.errors.ErrorCodes.CANCEL)
            return
        if not data:
            return  # (the empty DATA frame of an END_STREAM): nothing to hand over or wake for
        if (
            self._sink is not None
            and (self._waiting_in_receive or self._push_wake is not None)
            and not self._chunks
        ):
            try:
                sent = self._sink(data)
            except OSError:
                sent = 0  # would block, or failed: the consumer's own send meets it
            if sent:
                self._link._acknowledge(self.stream_id, sent)
                if sent == len(data):
                    return
                data = data[sent:]
        self.receive(data)
        self._receive_lot.unpark_all()
        self._wake_pusher()

    def _on_response(self, headers: Headers) -> None:
        self.response_headers = headers
        if self.response_check is not None:
            self._refusal = self.response_check(headers)
            if self._refusal is not None:
                self._discard_buffer()
                self._wake_all()
        self._response_lot.unpark_all()

    def _on_remote_end(self) -> None:
        self._remote_ended = True
        end = self._push_end
        if end is not None and not self._chunks and end():
            self._push_wake = self._push_end = None  # handled: nothing more will come
        self._wake_all()

    def _on_reset(self, error_code: int) -> None:
        if not self.peer_reset(error_code):
            self._send_lot.unpark_all()
            return
        self._discard_buffer()
        self._wake_all()
        if self.handler_scope is not None:
            self.handler_scope.cancel()
