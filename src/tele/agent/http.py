"""The `http` mechanism's runtime for one connection: HTTP/1.1 request by request (h11 on both
sides), or HTTP/2 stream by stream (tele.agent.h2c) when the caller opens with the h2 preface.

HTTP/1.1: each request is parsed (h11, server side), routed (tele.agent.matching) and re-sent on
a kept-alive upstream connection to that destination (h11, client side); the response comes back
the same way, bodies streamed event by event (one read in flight per side, so memory is bounded).
An upgrade (101) or a CONNECT passes the rest of the connection through to the upstream that
accepted it. Errors: a malformed request gets a 400 from the agent (it cannot be routed, and the
connection cannot be resynchronised) and the connection closes; an unreachable destination gets
a 502 whose body names it. Other connections are unaffected.

Protocol choice: the connection's first bytes decide, per connection. A caller speaking
prior-knowledge HTTP/2 (h2c) must start with the preface, so sniffing it is exact and free, where
Telepresence's probe (`GET /telepresence-http2-check` to the app) costs a round trip and guesses
for all callers at once; the app then gets the protocol its caller chose. `appProtocol` is only
checked against what the caller sent (a mismatch is logged).
"""

from __future__ import annotations

import logging
from typing import Final

import h11
import trio

from tele.agent import h2c
from tele.agent.errors import UpstreamFailed
from tele.agent.matching import Router
from tele.agent.upstream import READ_SIZE, Upstreams, abort, peer_closed, relay
from tele.rpc.agent_api import Engagement

log = logging.getLogger(__name__)

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_APP_PROTOCOLS: Final = frozenset({"h2c", "kubernetes.io/h2c", "grpc"})
MAX_HEAD: Final = 64 * 1024
"""Largest request or response head accepted (h11's default is 16 KiB)."""


async def serve_connection(
    stream: trio.abc.Stream, upstreams: Upstreams, *, app_protocol: str = ""
) -> None:
    """Serve one caller connection in http mode until it ends (does not close `stream`)."""
    first = b""
    try:
        while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
            data = await stream.receive_some(READ_SIZE)
            if not data:
                break
            first += data
    except (trio.BrokenResourceError, OSError):
        return
    is_h2 = first.startswith(H2_PREFACE)
    if first and is_h2 != (app_protocol.lower() in H2_APP_PROTOCOLS) and app_protocol:
        log.info(
            "appProtocol is %s but a caller spoke %s", app_protocol, "h2c" if is_h2 else "HTTP/1"
        )
    if is_h2:
        await h2c.serve_connection(stream, upstreams, first, Router())
    elif first:
        await Http1Proxy(stream, upstreams, Router()).run(first)


class _ProtocolBroken(Exception):
    """A peer broke HTTP or the connection mid-exchange; the message says which, `status` what
    the caller is answered if its response has not begun (400: the caller's fault)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class _Upstream:
    """A kept-alive HTTP/1.1 connection to one destination, for one caller connection."""

    def __init__(self, stream: trio.abc.Stream, label: str) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.label = label

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
                continue
            return event  # type: ignore[return-value]

    def reusable(self) -> bool:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False


class Http1Proxy:
    """One caller connection in http mode, HTTP/1.1."""

    def __init__(self, stream: trio.abc.Stream, upstreams: Upstreams, router: Router) -> None:
        self.stream = stream
        self.upstreams = upstreams
        self.router = router
        self.down = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.pool: dict[str | None, _Upstream] = {}

    async def _send_down(self, event: h11.Event) -> None:
        data = self.down.send(event)
        if data:
            await self.stream.send_all(data)

    async def _next_down(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.down.next_event()
            if event is h11.NEED_DATA:
                self.down.receive_data(bytes(await self.stream.receive_some(READ_SIZE)))
                continue
            return event  # type: ignore[return-value]

    async def run(self, first: bytes) -> None:
        self.down.receive_data(first)
        try:
            while await self._one_exchange():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("caller connection ended: %r", exc)
        finally:
            # Shielded: under cancellation the first aclose would raise and skip the rest; bounded:
            # a TLS close_notify to a peer that no longer reads must not hold the task.
            with trio.move_on_after(2, shield=True):
                for upstream in self.pool.values():
                    await upstream.stream.aclose()

    async def _error(self, status: int, sentence: str) -> None:
        """Answer with `status` and the sentence as the body, then the connection closes."""
        if self.down.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            abort(self.stream)
            return
        body = f"tele traffic agent: {sentence}\n".encode()
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        try:
            await self._send_down(h11.Response(status_code=status, headers=headers))
            await self._send_down(h11.Data(data=body))
            await self._send_down(h11.EndOfMessage())
        except h11.LocalProtocolError:
            abort(self.stream)

    async def _one_exchange(self) -> bool:
        """Forward one request and its response; True if the connection may carry another."""
        try:
            event = await self._next_down()
        except h11.RemoteProtocolError as exc:
            await self._error(exc.error_status_hint, f"malformed HTTP request: {exc}.")
            return False
        if not isinstance(event, h11.Request):
            return False  # ConnectionClosed, or PAUSED on a connection we must close
        target = event.target.decode("latin-1")
        engaged = self.upstreams.source.current(self.upstreams.agent_port)
        engagement = self.router.route(engaged, target, list(event.headers))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s -> %s", event.method.decode(), target, self.upstreams.describe(engagement)
            )
        try:
            upstream = await self._upstream(engagement)
        except UpstreamFailed as exc:
            log.warning("%s", exc)
            await self._error(502, str(exc))
            return False
        headers = event.headers.raw_items()
        if not any(name.lower() == b"host" for name, _ in headers):
            headers = [(b"host", f"{self.upstreams.app[0]}".encode()), *headers]
        try:
            request = h11.Request(method=event.method, target=event.target, headers=headers)
            await self._exchange(upstream, request)
        except _ProtocolBroken as exc:
            log.info("%s", exc)
            self.pool.pop(engagement.id if engagement else None, None)
            await upstream.stream.aclose()
            if self.down.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._error(exc.status, f"{exc}.")
            else:
                abort(self.stream)
            return False
        if self.down.our_state is h11.SWITCHED_PROTOCOL:
            await self._switch(upstream, engagement)
            return False
        key = engagement.id if engagement else None
        if not upstream.reusable():
            self.pool.pop(key, None)
            await upstream.stream.aclose()
        if self.down.our_state is h11.DONE and self.down.their_state is h11.DONE:
            self.down.start_next_cycle()
            return True
        return False

    async def _upstream(self, engagement: Engagement | None) -> _Upstream:
        key = engagement.id if engagement else None
        upstream = self.pool.get(key)
        if upstream is not None and peer_closed(upstream.stream):
            # The app (or handler) closed it while idle, e.g. its keep-alive timeout.
            del self.pool[key]
            await upstream.stream.aclose()
            upstream = None
        if upstream is None:
            stream = await self.upstreams.open(engagement)
            upstream = self.pool[key] = _Upstream(stream, self.upstreams.describe(engagement))
        return upstream

    async def _exchange(self, upstream: _Upstream, request: h11.Request) -> None:
        """The request up and the response down; a request body is sent concurrently with the
        response (a server may answer early)."""
        out = upstream.conn.send(request) or b""
        try:
            ready = self.down.next_event()  # what is already buffered, without I/O
        except h11.RemoteProtocolError as exc:
            raise _ProtocolBroken(f"malformed HTTP request body: {exc}", 400) from None
        if isinstance(ready, h11.Data | h11.EndOfMessage):
            out += upstream.conn.send(ready) or b""
        try:
            await upstream.stream.send_all(out)
        except (trio.BrokenResourceError, OSError) as exc:
            raise _broke(upstream.label, exc) from None
        if isinstance(ready, h11.EndOfMessage):
            # The common case (no body, or a body that came with the head): no second task.
            await self._response(upstream)
            return
        response_done = trio.Event()

        async def request_body() -> None:
            try:
                while True:
                    event = await self._next_down()
                    if not isinstance(event, h11.Data | h11.EndOfMessage):
                        raise _ProtocolBroken("the caller closed before its request ended", 400)
                    await upstream.send(event)
                    if isinstance(event, h11.EndOfMessage):
                        return
            except h11.RemoteProtocolError as exc:
                raise _ProtocolBroken(f"malformed HTTP request body: {exc}", 400) from None
            except (trio.BrokenResourceError, OSError, h11.LocalProtocolError) as exc:
                if response_done.is_set():
                    return  # the server answered and closed without reading the whole body
                raise _broke(upstream.label, exc) from None

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(request_body)
                try:
                    await self._response(upstream)
                finally:
                    response_done.set()
                if self.down.their_state not in (h11.DONE, h11.SWITCHED_PROTOCOL):
                    # Answered before the request ended: the rest of the body has nowhere to go.
                    nursery.cancel_scope.cancel()
        except* _ProtocolBroken as group:
            raise group.exceptions[0] from None

    async def _response(self, upstream: _Upstream) -> None:
        """Relay the response's events; what one read yields goes down in one write."""
        out = bytearray()
        try:
            while True:
                event = upstream.conn.next_event()
                if event is h11.NEED_DATA:
                    if out:
                        await self.stream.send_all(out)
                        out.clear()
                    data = await upstream.stream.receive_some(READ_SIZE)
                    upstream.conn.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    out += self.down.send(_informational(event)) or b""
                    if event.status_code == 101:
                        break
                elif isinstance(event, h11.Response):
                    out += self.down.send(_response(event)) or b""
                elif isinstance(event, h11.Data):
                    out += self.down.send(event) or b""
                elif isinstance(event, h11.EndOfMessage):
                    out += self.down.send(event) or b""
                    break
                elif event is h11.PAUSED and upstream.conn.our_state is h11.SWITCHED_PROTOCOL:
                    break  # a CONNECT accepted
                else:
                    raise _ProtocolBroken(f"{upstream.label} closed before it answered")
                if len(out) >= READ_SIZE:
                    await self.stream.send_all(out)
                    out.clear()
            if out:
                await self.stream.send_all(out)
        except h11.RemoteProtocolError as exc:
            raise _ProtocolBroken(f"{upstream.label} sent a bad response: {exc}") from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise _broke(upstream.label, exc) from None

    async def _switch(self, upstream: _Upstream, engagement: Engagement | None) -> None:
        """After a 101 or an accepted CONNECT: the rest of the connection is raw bytes."""
        key = engagement.id if engagement else None
        self.pool.pop(key, None)
        async with upstream.stream:
            try:
                down_rest, _ = self.down.trailing_data
                up_rest, _ = upstream.conn.trailing_data
                if down_rest:
                    await upstream.stream.send_all(down_rest)
                if up_rest:
                    await self.stream.send_all(up_rest)
            except (trio.BrokenResourceError, OSError):
                abort(self.stream)
                return
            await relay(self.stream, upstream.stream)


def _broke(label: str, exc: BaseException) -> _ProtocolBroken:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the connection ended"
    return _ProtocolBroken(f"{label} broke off ({reason})")


def _informational(event: h11.InformationalResponse) -> h11.InformationalResponse:
    return h11.InformationalResponse(
        status_code=event.status_code, headers=event.headers.raw_items(), reason=event.reason
    )


def _response(event: h11.Response) -> h11.Response:
    return h11.Response(
        status_code=event.status_code, headers=event.headers.raw_items(), reason=event.reason
    )
