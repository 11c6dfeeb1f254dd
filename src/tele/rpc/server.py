"""The RPC server side: a router of typed handlers, and serving one connection with it.

Each call runs in its own task inside the connection's nursery, under the caller's deadline; a
caller that resets its stream cancels the handler, and a connection that closes cancels all of
them. Streams that are not RPC calls (the tunnel's CONNECT streams) go to raw handlers.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from tele import jsonlimits
from tele.rpc import wire
from tele.rpc.errors import Code, RpcError
from tele.rpc.h2link import (
    MAX_HANDLERS,
    PROCESS_BUDGET,
    H2Link,
    H2Stream,
    LinkBroken,
    LinkSettings,
    StreamBudget,
    StreamPrepare,
    StreamReset,
    open_link,
)
from tele.rpc.method import Req, Resp, ServerStream, Unary

log = logging.getLogger(__name__)

REQUEST_BODY_TIMEOUT = 15.0
"""A request's body must arrive within this, whatever deadline the caller named: a stream that
sends headers and then nothing holds a handler (and its memory) no longer."""
MAX_LINKS_PER_PEER = 256
"""Connections one peer address may hold open to a server (`PeerConnections`)."""


class CallerConnection:
    """The connection an RPC arrived on, for a service that must know when it ends (a client
    whose last connection closed has gone, whatever its lease says)."""

    def __init__(self) -> None:
        self.ended = False
        self._on_end: list[Callable[[], None]] = []
        self._on_principal: list[Callable[[Any], None]] = []
        self._principal: Any = None
        self.auth_failure = ""
        """Why the peer's last attempt to authenticate failed ("" if none did)."""
        self.active_calls = 0
        """Streams being handled on this connection now."""
        self.close: Callable[[str], None] = lambda reason: None
        """End the connection now (its handlers end with it): for a service whose caller's
        credential stopped being valid (set by serve_connection)."""

    @property
    def principal(self) -> Any:
        """Who the peer proved to be on this connection (set by the service's authenticator;
        None: nobody yet)."""
        return self._principal

    @principal.setter
    def principal(self, value: Any) -> None:
        self._principal = value
        for callback in self._on_principal:
            callback(value)

    def on_principal(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(principal)` whenever the authenticator sets who the peer is."""
        self._on_principal.append(callback)

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the connection ends (at once if it has)."""
        if self.ended:
            callback()
        else:
            self._on_end.append(callback)

    def end(self) -> None:
        self.ended = True
        callbacks, self._on_end = self._on_end, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("a connection-end callback failed")


CALLER: contextvars.ContextVar[CallerConnection | None] = contextvars.ContextVar(
    "tele_rpc_caller", default=None
)
"""The connection of the call being handled (set in each handler's task by serve_connection)."""

RawHandler = Callable[[H2Stream], Awaitable[None]]
RawMatcher = Callable[[H2Stream], bool]


@dataclass(frozen=True)
class _Route:
    request: type[Any]
    handler: Callable[[Any], Any]
    streaming: bool


class Router:
    """Maps method paths to handlers. Handlers raise RpcError to answer with an error."""

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}
        self._raw: list[tuple[RawMatcher, RawHandler, StreamPrepare | None]] = []
        self._gate: Callable[[str], None] | None = None

    def gate(self, check: Callable[[str], None]) -> None:
        """Ask `check(path)` before serving any RPC; it raises RpcError to refuse (the caller
        is `CALLER`: e.g. not authenticated yet). Raw streams' handlers ask it themselves."""
        self._gate = check

    def unary(self, method: Unary[Req, Resp], handler: Callable[[Req], Awaitable[Resp]]) -> None:
        self._add(method.path, _Route(method.request, handler, streaming=False))

    def stream(
        self, method: ServerStream[Req, Resp], handler: Callable[[Req], AsyncIterator[Resp]]
    ) -> None:
        self._add(method.path, _Route(method.request, handler, streaming=True))

    def raw(
        self, matcher: RawMatcher, handler: RawHandler, *, prepare: StreamPrepare | None = None
    ) -> None:
        """Hand streams for which `matcher(stream)` is true to `handler` (e.g. CONNECT);
        `prepare(stream)` first, as the stream arrives (`H2Link`'s hook), if given."""
        self._raw.append((matcher, handler, prepare))

    def prepare(self, stream: H2Stream) -> None:
        """The link's `prepare` hook: the matching raw route's, if it has one."""
        for matcher, _, prepare in self._raw:
            if matcher(stream):
                if prepare is not None:
                    prepare(stream)
                return

    def _add(self, path: str, route: _Route) -> None:
        if path in self._routes:
            raise ValueError(f"a handler for {path} is already registered")
        self._routes[path] = route

    async def handle(self, stream: H2Stream, *, max_message_size: int) -> None:
        """Serve one incoming stream."""
        for matcher, raw_handler, _ in self._raw:
            if matcher(stream):
                await raw_handler(stream)  # its own policy asks the gate (a tunnel's)
                return
        if self._gate is not None:
            try:
                self._gate(stream.header(":path") or "")
            except RpcError as exc:
                await _answer_error(stream, exc.code, exc.message)
                return
        path = stream.header(":path") or ""
        route = self._routes.get(path)
        if route is None or stream.header(":method") != "POST":
            await _answer_error(stream, Code.UNIMPLEMENTED, f"unknown method {path}")
            return
        timeout = wire.parse_timeout(stream.header(wire.TIMEOUT_HEADER))
        started = False
        try:
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                request = await _read_request(stream, route.request, max_message_size)
                if route.streaming:
                    await stream.send_response(wire.RESPONSE_HEADERS)
                    started = True
                    # aclosing: a call cancelled mid-stream closes its generator now, not
                    # whenever the garbage collector finds it
                    async with contextlib.aclosing(route.handler(request)) as items:
                        async for item in items:
                            await _send_message(stream, item, max_message_size)
                else:
                    reply = await route.handler(request)
                    data = _encode(reply, max_message_size)
                    started = True
                    await stream.send_response(
                        wire.RESPONSE_HEADERS, body=data, trailers=wire.status_trailers(Code.OK)
                    )
                    return
            await stream.send_trailers(wire.status_trailers(Code.OK))
        except RpcError as exc:
            await _answer_error(stream, exc.code, exc.message, started=started)
        except trio.TooSlowError:
            await _answer_error(
                stream, Code.DEADLINE_EXCEEDED, f"{path} did not finish in time", started=started
            )


async def _read_request(stream: H2Stream, request_type: type[Any], max_size: int) -> Any:
    try:
        with trio.fail_after(REQUEST_BODY_TIMEOUT):
            body = await stream.receive_all(max_size)
    except trio.TooSlowError:
        raise RpcError(
            Code.DEADLINE_EXCEEDED,
            f"the request body did not arrive within {REQUEST_BODY_TIMEOUT:g}s",
        ) from None
    except ValueError:
        raise RpcError(
            Code.RESOURCE_EXHAUSTED, f"request larger than the maximum of {max_size} bytes"
        ) from None
    try:
        jsonlimits.check_depth(body)
        return msgspec.json.decode(body, type=request_type)
    except jsonlimits.TooDeep as exc:
        raise RpcError(Code.INVALID_ARGUMENT, f"malformed request: {exc}") from None
    except msgspec.ValidationError as exc:
        raise RpcError(Code.INVALID_ARGUMENT, f"invalid request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RpcError(Code.INVALID_ARGUMENT, f"malformed request: {exc}") from None


def _encode(message: Any, max_size: int) -> bytes:
    data = msgspec.json.encode(message) + b"\n"
    if len(data) > max_size + 1:
        raise RpcError(
            Code.RESOURCE_EXHAUSTED, f"response larger than the maximum of {max_size} bytes"
        )
    return data


async def _send_message(stream: H2Stream, message: Any, max_size: int) -> None:
    await stream.send_all(_encode(message, max_size))


async def _answer_error(
    stream: H2Stream, code: Code, message: str, *, started: bool = False
) -> None:
    trailers = wire.status_trailers(code, message)
    try:
        if started:
            await stream.send_trailers(trailers)
        else:
            await stream.send_response(wire.RESPONSE_HEADERS + trailers, end_stream=True)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_connection(
    stream: trio.abc.Stream,
    router: Router,
    *,
    max_message_size: int = wire.DEFAULT_MAX_MESSAGE,
    settings: LinkSettings | None = None,
    name: str = "rpc-server",
    shares: HandlerShares | None = None,
    principal: Any = None,
) -> None:
    """Serve RPC on one connection until the peer closes it; its handlers end with it.

    With `shares`, the connection's handlers come from its caller's share of the budget.
    `principal`: who the transport already proved the peer to be (a TLS client certificate)."""
    caller = CallerConnection()
    CALLER.set(caller)  # also the link's reader's: a route's `prepare` asks who calls too
    settings = settings or LinkSettings()

    async def handle(h2_stream: H2Stream) -> None:
        CALLER.set(caller)
        caller.active_calls += 1
        try:
            await router.handle(h2_stream, max_message_size=max_message_size)
        except (LinkBroken, StreamReset) as exc:  # the caller or its link went away
            log.debug("%s: %s ended: %s", name, h2_stream.header(":path"), exc)
        except Exception:
            log.exception("%s: %s failed", name, h2_stream.header(":path"))
            await _answer_error(h2_stream, Code.INTERNAL, "internal error in the server")
        finally:
            caller.active_calls -= 1

    try:
        async with open_link(
            stream,
            client_side=False,
            handler=handle,
            settings=settings,
            name=name,
            prepare=router.prepare,
        ) as link:
            caller.close = link.close
            if shares is not None:
                shares.assign(link, caller)
            if principal is not None:
                caller.principal = principal
            await link.wait_closed()
    finally:
        caller.end()


IDENTITY_SHARE = MAX_HANDLERS // 2
"""Handler tasks one identity (every connection it authenticated, or every connection that has
not authenticated, together) may hold at once: one user's flood of streams ends at its share,
and other users' calls and tunnels are still served from the rest."""


class HandlerShares:
    """Each identity's share of a process's handler budget (`StreamBudget` with a parent).

    A connection takes its handlers from the share of nobody (not authenticated yet) until its
    authenticator sets `CallerConnection.principal`, then from that identity's share (the key
    `key(principal)`), which all of the identity's connections use together. A share is
    forgotten when the last connection using it ends."""

    def __init__(
        self,
        total: StreamBudget = PROCESS_BUDGET,
        *,
        share: int = IDENTITY_SHARE,
        key: Callable[[Any], Hashable] = lambda principal: principal,
    ) -> None:
        self.total = total
        self.share = share
        self._key = key
        self._shares: dict[Hashable, tuple[StreamBudget, int]] = {}

    def of(self, key: Hashable) -> StreamBudget | None:
        """The share of `key` (None for nobody), if a connection uses it now."""
        held = self._shares.get(key)
        return held[0] if held is not None else None

    def assign(self, link: H2Link, caller: CallerConnection) -> None:
        """`link`'s handlers come from its caller's share from now on, whoever it proves to be."""
        held: list[Hashable] = [None]
        link.budget = self._acquire(None)

        def authenticated(principal: Any) -> None:
            key = None if principal is None else self._key(principal)
            if key != held[0]:
                link.budget = self._acquire(key)
                self._release(held[0])
                held[0] = key

        caller.on_principal(authenticated)
        caller.on_end(lambda: self._release(held[0]))

    def _acquire(self, key: Hashable) -> StreamBudget:
        budget, users = self._shares.get(key) or (StreamBudget(self.share, self.total), 0)
        self._shares[key] = (budget, users + 1)
        return budget

    def _release(self, key: Hashable) -> None:
        budget, users = self._shares[key]
        if users > 1:
            self._shares[key] = (budget, users - 1)
        else:
            del self._shares[key]


class PeerConnections:
    """Serves each connection unless its peer address already holds `limit` of them: one
    peer (an agent, a program on a client's port-forward) cannot take every descriptor and
    handler of the server by itself."""

    def __init__(self, limit: int = MAX_LINKS_PER_PEER) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    async def serve(
        self, stream: trio.SocketStream, serve: Callable[[trio.SocketStream], Awaitable[None]]
    ) -> None:
        try:
            peer = str(stream.socket.getpeername()[0])
        except (OSError, IndexError, TypeError):
            peer = "?"
        if self.open.get(peer, 0) >= self.limit:
            log.warning("refused a connection from %s: it holds %d already", peer, self.limit)
            await trio.aclose_forcefully(stream)
            return
        self.open[peer] = self.open.get(peer, 0) + 1
        try:
            await serve(stream)
        finally:
            self.open[peer] -= 1
            if not self.open[peer]:
                del self.open[peer]
