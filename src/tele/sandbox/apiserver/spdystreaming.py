"""Kubernetes' streaming subresources over SPDY/3.1, as the API server serves them:

- `Upgrade: SPDY/3.1` on a fresh HTTP/1.1 connection (POST for exec/attach, negotiated by
  `X-Stream-Protocol-Version`), what kubectl ≤ 1.29 sends for exec and ≤ 1.30 for port-forward;
- SPDY frames inside websocket binary messages (subprotocol `SPDY/3.1+portforward.k8s.io`),
  what kubectl ≥ 1.31 sends for port-forward.

The node's handlers speak the websocket channel protocol (v4/v5.channel.k8s.io), so each
SPDY exchange is bridged onto one ASGI websocket call of the API app, which authenticates,
authorizes and finds the handler as for any websocket: exec streams by `streamType` (stdin 0,
stdout 1, stderr 2, error 3, resize 4; stdin's FIN becomes v5's CLOSE signal); port-forward one
call per stream pair (`requestID`), its data stream on channel 0 and its error stream on 1.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import spdy
from .spdysession import Session, SpdyStream, Transport, TransportClosed

log = logging.getLogger(__name__)

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Any]],
    Awaitable[None],
]

TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
PORTFORWARD_PROTOCOL = "portforward.k8s.io"
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STREAM_CREATION_TIMEOUT = 30.0
"""How long the client has to open the streams of an exec, or the second stream of a
port-forward pair (Kubernetes' default), before they are given up."""
MAX_HEAD = 1 << 16
HEAD_TIMEOUT = 90.0

MAX_CONNECTIONS = 256
MAX_FORWARDS = 1024


@dataclass
class Limits:
    """One server's bounds on SPDY streaming, across its connections: upgraded connections
    (past them an upgrade gets 429) and port-forward stream pairs being served (past them a
    new pair is refused with RST_STREAM REFUSED_STREAM); per connection, `spdy.MAX_STREAMS`."""

    max_connections: int = MAX_CONNECTIONS
    max_forwards: int = MAX_FORWARDS
    connections: int = 0
    forwards: int = 0


_HANDLER_PROTOCOL = {"exec": "v5.channel.k8s.io", "attach": "v5.channel.k8s.io"}


# --- the first request of an HTTP/1.1 connection ----------------------------------------


@dataclass
class RequestHead:
    method: str
    target: str
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        out: list[str] = []
        for key, value in self.headers:
            if key == name:
                out += [v.strip() for v in value.split(",") if v.strip()]
        return out


def parse_head(raw: bytes) -> RequestHead | None:
    """The request line and headers of an HTTP/1.1 request head (ending in CRLF CRLF)."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers.append((name.lower(), value.strip()))
    return RequestHead(parts[0], parts[1], headers)


def is_spdy_upgrade(head: RequestHead) -> bool:
    return any(v.lower() == "spdy/3.1" for v in head.values("upgrade")) and any(
        v.lower() == "upgrade" for v in head.values("connection")
    )


async def read_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, int]:
    """Read until the end of the first request head: (bytes read, end of the head or -1 when
    the head is longer than `MAX_HEAD` or the peer stopped first)."""
    buffered = bytearray()
    with trio.move_on_after(HEAD_TIMEOUT):
        while len(buffered) <= MAX_HEAD:
            end = buffered.find(b"\r\n\r\n")
            if end >= 0:
                return bytes(buffered), end + 4
            try:
                data = await stream.receive_some(MAX_HEAD)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            if not data:
                break
            buffered += data
    return bytes(buffered), -1


# --- bridging a handler's websocket ------------------------------------------------------


@dataclass(eq=False)
class _Bridge:
    """The websocket a node handler talks to. What the handler sends goes to `on_message`
    (channel, payload), in order; what `push` queues it receives."""

    on_message: Callable[[int, bytes], Awaitable[None]]
    accepted: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)
    subprotocol: str = ""
    _connected: bool = False
    _send: trio.MemorySendChannel[dict[str, Any]] | None = None
    _recv: trio.MemoryReceiveChannel[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](0)

    async def receive(self) -> dict[str, Any]:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        assert self._recv is not None
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return {"type": "websocket.disconnect", "code": 1000}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.accept":
            self.subprotocol = message.get("subprotocol") or ""
            self.accepted.set()
        elif kind == "websocket.send":
            data = message.get("bytes") or (message.get("text") or "").encode()
            if data and not self.closed.is_set():
                await self.on_message(data[0], bytes(data[1:]))
        elif kind == "websocket.close":
            self.closed.set()

    async def push(self, channel: int, data: bytes) -> None:
        assert self._send is not None
        try:
            await self._send.send({"type": "websocket.receive", "bytes": bytes([channel]) + data})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def disconnect(self) -> None:
        assert self._send is not None
        self._send.close()


async def _run_app(app: ASGIApp, scope: dict[str, Any], bridge: _Bridge) -> None:
    try:
        await app(scope, bridge.receive, bridge.send)
    except Exception:
        log.exception("streaming handler failed for %s", scope.get("path"))
    finally:
        bridge.closed.set()


def _handler_scope(scope: dict[str, Any], query: bytes, subprotocol: str) -> dict[str, Any]:
    return {
        **scope,
        "type": "websocket",
        "query_string": query,
        "subprotocols": [subprotocol] if subprotocol else [],
    }


async def _authorized(app: ASGIApp, scope: dict[str, Any]) -> bool:
    """Whether the app hands this websocket to a node handler (authenticated, allowed to
    create the subresource, handler present): the handler is reached when it asks for the
    first message, and told at once that the peer left."""
    reached = False

    async def receive() -> dict[str, Any]:
        nonlocal reached
        reached = True
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        return None

    try:
        await app(_handler_scope(scope, b"", ""), receive, send)
    except Exception:
        log.exception("authorizing %s", scope.get("path"))
        return False
    return reached


# --- exec and attach -------------------------------------------------------------------


def _exit_failure(message: str) -> bytes:
    return json.dumps({"metadata": {}, "status": "Failure", "message": message}).encode()


@dataclass(eq=False)
class _ExecOutput:
    """Where an exec handler's channels go once the client's streams exist."""

    ready: trio.Event = field(default_factory=trio.Event)
    streams: dict[str, SpdyStream] = field(default_factory=dict)
    tty: bool = False

    async def write(self, channel: int, data: bytes) -> None:
        await self.ready.wait()
        kind = {1: "stdout", 2: "stdout" if self.tty else "stderr", 3: "error"}.get(channel)
        stream = self.streams.get(kind or "")
        if stream is not None:
            await stream.write(data)

    async def end(self) -> None:
        for stream in self.streams.values():
            await stream.end()


async def _exec_streams(
    session: Session, query: dict[str, list[str]], output: _ExecOutput
) -> dict[str, SpdyStream] | None:
    def flag(name: str) -> bool:
        return (query.get(name) or ["false"])[-1].lower() in ("true", "1")

    expected = {"error"}
    for name in ("stdin", "stdout"):
        if flag(name):
            expected.add(name)
    if flag("stderr") and not output.tty:
        expected.add("stderr")
    if output.tty:
        expected.add("resize")
    streams: dict[str, SpdyStream] = {}
    with trio.move_on_after(STREAM_CREATION_TIMEOUT):
        async for stream in session.incoming:
            kind = stream.header("streamtype")
            if kind not in expected or kind in streams:
                await session.reset(stream.stream_id, spdy.PROTOCOL_ERROR)
                continue
            streams[kind] = stream
            if set(streams) == expected:
                return streams
    log.info("exec: the client opened %s of %s streams", sorted(streams), sorted(expected))
    return None


async def _exec_over_spdy(
    app: ASGIApp,
    scope: dict[str, Any],
    head: RequestHead,
    transport: Transport,
    protocol: str,
) -> None:
    query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"))
    output = _ExecOutput(tty=(query.get("tty") or ["false"])[-1].lower() in ("true", "1"))
    bridge = _Bridge(output.write)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            _run_app,
            app,
            _handler_scope(scope, scope["query_string"], _HANDLER_PROTOCOL["exec"]),
            bridge,
        )
        accepted_or_closed = trio.Event()

        async def watch(event: trio.Event) -> None:
            await event.wait()
            accepted_or_closed.set()

        nursery.start_soon(watch, bridge.accepted)
        nursery.start_soon(watch, bridge.closed)
        await accepted_or_closed.wait()
        if not bridge.accepted.is_set():
            await _http_error(
                transport,
                400,
                "BadRequest",
                f"unable to start {scope['path'].rsplit('/', 1)[-1]}: the container is not "
                "running, or you may not do this",
            )
            return
        await transport.send(_switching(protocol))
        session = Session(transport)
        nursery.start_soon(session.run)
        streams = await _exec_streams(session, query, output)
        if streams is None:
            bridge.disconnect()
            output.ready.set()
            await bridge.closed.wait()
            await session.close()
            nursery.cancel_scope.cancel()
            return
        output.streams = streams

        async def pump(stream: SpdyStream, channel: int, close_signal: bool) -> None:
            while data := await stream.read():
                await bridge.push(channel, data)
            if close_signal:
                await bridge.push(255, bytes([channel]))

        if "stdin" in streams:
            nursery.start_soon(pump, streams["stdin"], 0, True)
        if "resize" in streams:
            nursery.start_soon(pump, streams["resize"], 4, False)
        for kind in ("stdout", "stderr", "error"):
            if kind in streams:
                streams[kind].stop_reading()
        output.ready.set()

        async def disconnect_when_gone() -> None:
            await session.done.wait()
            bridge.disconnect()

        nursery.start_soon(disconnect_when_gone)
        await bridge.closed.wait()
        await output.end()
        await session.close()
        nursery.cancel_scope.cancel()


# --- port-forward ------------------------------------------------------------------------


@dataclass(eq=False)
class _Pair:
    port: str
    error: SpdyStream | None = None
    data: SpdyStream | None = None
    waiting: trio.CancelScope = field(default_factory=trio.CancelScope)


async def _forward_pair(app: ASGIApp, scope: dict[str, Any], pair: _Pair) -> None:
    """One local connection: a handler call for one port, its data stream on channel 0 and
    its error stream on channel 1 (the first message of each channel names the port)."""
    assert pair.error is not None and pair.data is not None
    error, data = pair.error, pair.data
    error.stop_reading()
    port_prefix_seen: set[int] = set()

    async def on_message(channel: int, payload: bytes) -> None:
        if channel not in port_prefix_seen:
            port_prefix_seen.add(channel)
            return
        if channel == 0:
            await data.write(payload)
        elif channel == 1:
            await error.write(payload)

    bridge = _Bridge(on_message)
    query = urllib.parse.urlencode({"ports": pair.port}).encode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_app, app, _handler_scope(scope, query, "v4.channel.k8s.io"), bridge)

        async def client_to_pod() -> None:
            await bridge.accepted.wait()
            while chunk := await data.read():
                await bridge.push(0, chunk)
            bridge.disconnect()

        nursery.start_soon(client_to_pod)
        await bridge.closed.wait()
        if not bridge.accepted.is_set():
            path = scope.get("path", "").split("/")
            pod = f"{path[4]}/{path[6]}" if len(path) > 6 else "?"
            await error.write(
                f"error forwarding port {pair.port} to pod {pod}: the pod is not running".encode()
            )
        await data.end()
        await error.end()
        nursery.cancel_scope.cancel()


async def _serve_portforward(
    app: ASGIApp, scope: dict[str, Any], session: Session, limits: Limits
) -> None:
    pairs: dict[str, _Pair] = {}

    async def forward(pair: _Pair) -> None:
        try:
            await _forward_pair(app, scope, pair)
        finally:
            limits.forwards -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)

        async def expire(request_id: str, pair: _Pair) -> None:
            with pair.waiting:
                await trio.sleep(STREAM_CREATION_TIMEOUT)
            if pairs.get(request_id) is pair:
                del pairs[request_id]
                for stream in (pair.error, pair.data):
                    if stream is not None:
                        await session.reset(stream.stream_id, spdy.CANCEL)

        async for stream in session.incoming:
            kind = stream.header("streamtype")
            port = stream.header("port")
            request_id = stream.header("requestid")
            if not request_id:
                # Clients before requestID: the data stream follows its error stream.
                request_id = str(stream.stream_id if kind == "error" else stream.stream_id - 2)
            if kind not in ("error", "data") or not port.isdigit() or not 0 < int(port) < 65536:
                await session.reset(stream.stream_id, spdy.PROTOCOL_ERROR)
                continue
            pair = pairs.get(request_id)
            if pair is None:
                pair = pairs[request_id] = _Pair(port)
                nursery.start_soon(expire, request_id, pair)
            if getattr(pair, kind) is not None or pair.port != port:
                await session.reset(stream.stream_id, spdy.PROTOCOL_ERROR)
                continue
            setattr(pair, kind, stream)
            if pair.error is not None and pair.data is not None:
                del pairs[request_id]
                pair.waiting.cancel()
                if limits.forwards >= limits.max_forwards:
                    log.warning("port-forward refused: %d pairs served", limits.forwards)
                    await session.reset(pair.error.stream_id, spdy.REFUSED_STREAM)
                    await session.reset(pair.data.stream_id, spdy.REFUSED_STREAM)
                    continue
                limits.forwards += 1
                nursery.start_soon(forward, pair)
        nursery.cancel_scope.cancel()
    await session.close()


# --- entry points ------------------------------------------------------------------------


def _switching(protocol: str) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Connection: Upgrade", "Upgrade: SPDY/3.1"]
    if protocol:
        lines.append(f"X-Stream-Protocol-Version: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _http_error(transport: Transport, code: int, reason: str, message: str) -> None:
    body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
    ).encode()
    phrase = {
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        429: "Too Many Requests",
    }.get(code, reason)
    head = (
        f"HTTP/1.1 {code} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        await transport.send(head.encode() + body)
    except TransportClosed:
        pass


def websocket_scope(
    head: RequestHead,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    **more: Any,
) -> dict[str, Any]:
    """The ASGI websocket scope of an upgrade whose head was read here, not by hypercorn (the
    SPDY upgrade, `wsdirect`); `more` adds keys or replaces them."""
    path, _, query = head.target.partition("?")
    return {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "wss",
        "path": urllib.parse.unquote(path),
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in head.headers],
        "client": client,
        "server": server,
        **more,
    }


def stream_transport(stream: trio.abc.Stream, rest: bytes) -> Transport:
    pending = [rest] if rest else []

    async def receive() -> bytes:
        if pending:
            return pending.pop()
        try:
            return bytes(await stream.receive_some(1 << 16))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def send(data: bytes) -> None:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            raise TransportClosed() from exc

    async def close() -> None:
        await trio.aclose_forcefully(stream)

    return Transport(receive, send, close)


async def serve_upgrade(
    app: ASGIApp,
    stream: trio.abc.Stream,
    head: RequestHead,
    rest: bytes,
    *,
    client: tuple[str, int] | None = None,
    server: tuple[str, int] | None = None,
    limits: Limits,
) -> None:
    """Serve a connection whose first request asks for `Upgrade: SPDY/3.1`."""
    transport = stream_transport(stream, rest)
    if limits.connections >= limits.max_connections:
        await _http_error(
            transport,
            429,
            "TooManyRequests",
            f"too many streaming connections ({limits.connections}), try again later",
        )
        await transport.close()
        return
    limits.connections += 1
    try:
        await _serve_upgrade(app, transport, head, client, server, limits)
    except Exception:
        log.exception("SPDY connection failed")
    finally:
        limits.connections -= 1
        await transport.close()


async def _serve_upgrade(
    app: ASGIApp,
    transport: Transport,
    head: RequestHead,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
    limits: Limits,
) -> None:
    scope = websocket_scope(
        head, client, server, method=head.method, subprotocols=[], extensions={}
    )
    parts = scope["path"].strip("/").split("/")
    sub = parts[-1] if len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] else ""
    offered = head.values("x-stream-protocol-version")
    served = getattr(app, "subresource_handlers", None)
    if sub and isinstance(served, dict) and ("pods", sub) not in served:
        await _http_error(
            transport,
            400,
            "BadRequest",
            f"{sub} is not available for pod {parts[5]}: the sandbox's node does not serve it",
        )
        return
    if sub == "portforward":
        if offered and PORTFORWARD_PROTOCOL not in offered:
            await _unnegotiable(transport, offered, [PORTFORWARD_PROTOCOL])
            return
        if not await _authorized(app, scope):
            await _forbidden(transport, sub)
            return
        await transport.send(_switching(PORTFORWARD_PROTOCOL if offered else ""))
        await _serve_portforward(app, scope, Session(transport), limits)
    elif sub in ("exec", "attach"):
        protocol = next((p for p in offered if p in EXEC_PROTOCOLS), None)
        if protocol is None:
            await _unnegotiable(transport, offered, list(EXEC_PROTOCOLS))
            return
        if not await _authorized(app, scope):
            await _forbidden(transport, sub)
            return
        await _exec_over_spdy(app, scope, head, transport, protocol)
    else:
        await _http_error(
            transport, 400, "BadRequest", f"{scope['path']} cannot be upgraded to SPDY/3.1"
        )


async def _unnegotiable(transport: Transport, offered: list[str], supported: list[str]) -> None:
    await _http_error(
        transport,
        403,
        "Forbidden",
        f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
        f"server supports {supported}",
    )


async def _forbidden(transport: Transport, sub: str) -> None:
    await _http_error(
        transport,
        403,
        "Forbidden",
        f"unable to upgrade: not allowed to create pods/{sub} for this pod",
    )


def with_tunnel(app: ASGIApp, limits: Limits) -> ASGIApp:
    """The API app, with port-forward's websocket tunnel of SPDY served here."""

    async def wrapped(
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Any],
    ) -> None:
        if (
            scope.get("type") == "websocket"
            and TUNNEL_PROTOCOL in (scope.get("subprotocols") or [])
            and scope.get("path", "").rstrip("/").endswith("/portforward")
        ):
            if limits.connections >= limits.max_connections:
                await receive()
                await send({"type": "websocket.close", "code": 1013})  # try again later
                return
            limits.connections += 1
            try:
                await _serve_tunnel(app, scope, receive, send, limits)
            finally:
                limits.connections -= 1
            return
        await app(scope, receive, send)

    return wrapped


async def _serve_tunnel(
    app: ASGIApp,
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Any],
    limits: Limits,
) -> None:
    message = await receive()
    if message.get("type") != "websocket.connect":
        return
    if not await _authorized(app, scope):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept", "subprotocol": TUNNEL_PROTOCOL})
    gone = False

    async def tunnel_receive() -> bytes:
        nonlocal gone
        while not gone:
            msg = await receive()
            if msg.get("type") == "websocket.disconnect":
                gone = True
                break
            data = msg.get("bytes")
            if data:
                return bytes(data)
        return b""

    async def tunnel_send(data: bytes) -> None:
        if gone:
            raise TransportClosed()
        try:
            await send({"type": "websocket.send", "bytes": data})
        except Exception as exc:  # hypercorn raises its own errors for a closed socket
            raise TransportClosed() from exc

    async def tunnel_close() -> None:
        if not gone:
            try:
                await send({"type": "websocket.close", "code": 1000})
            except Exception:
                log.debug("tunnel close after the client left", exc_info=True)

    try:
        await _serve_portforward(
            app, scope, Session(Transport(tunnel_receive, tunnel_send, tunnel_close)), limits
        )
    except Exception:
        log.exception("SPDY tunnel failed")
