"""The port-forward dialer: a trio Stream to a pod's port through the API server's
`pods/portforward` websocket (subprotocol v4.channel.k8s.io).

Framing (the Kubernetes `channel.k8s.io` convention): every binary websocket message starts with a
channel byte. For a single forwarded port, channel 0 carries data and channel 1 errors; the
server's first two bytes on each channel are the port number, little-endian; after that, channel 0
is the raw TCP byte stream and channel 1 carries at most an error text, after which the server
closes. The client sends its bytes on channel 0 without a port prefix. v4 has no half-close: EOF
is the websocket closing.

`PortForwardStream` implements both ends (the server end serves the tests and the sandbox).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import trio
import trio_websocket

from tele.k8s.config import ClusterConnection
from tele.k8s.errors import PortForwardBroken, PortForwardError

log = logging.getLogger(__name__)


SUBPROTOCOL: Final = "v4.channel.k8s.io"
DATA_CHANNEL: Final = 0
ERROR_CHANNEL: Final = 1

RECEIVE_BUFFER_SIZE: Final = 256 * 1024
"""Bytes per socket read in trio-websocket: its 4 KiB default caps a tunnel at ~150 MB/s."""
MAX_SEND_MESSAGE: Final = 1024 * 1024
"""Largest message we send: large messages amortise wsproto's per-message work."""
MAX_RECEIVE_MESSAGE: Final = 4 * 1024 * 1024
"""Largest message accepted from the server (bigger closes the websocket with 1009)."""
MESSAGE_QUEUE_SIZE: Final = 2
"""Messages trio-websocket buffers ahead of the reader; with the maximum above, memory stays
bounded at a few MiB per port-forward while a slow reader back-pressures the TCP connection."""
MAX_ERROR_TEXT: Final = 4096
CONNECT_TIMEOUT: Final = 20.0
CLOSE_TIMEOUT: Final = 2.0

# DNS-1123 subdomain, the syntax of namespace and pod names: anything else cannot exist and
# must not reach the URL path.
_NAME_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def portforward_path(namespace: str, pod: str, port: int) -> str:
    """The request target (without the server's path prefix)."""
    for kind, name in (("namespace", namespace), ("pod", pod)):
        if not _NAME_RE.fullmatch(name):
            raise PortForwardError(f"{kind} name {name!r} is not a valid Kubernetes name")
    if not 1 <= port <= 65_535:
        raise PortForwardError(f"port {port} is outside 1-65535")
    return f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward?ports={port}"


class PortForwardStream(trio.abc.Stream):
    """One forwarded port as a trio Stream (no half-close: v4 channels have none).

    `client_side=True` is the dialer's end: it strips the server's port prefix from both
    channels and raises the error channel's text as `PortForwardError`. The server end writes
    those prefixes (`start()`) and may report an error with `send_error()`.
    """

    def __init__(
        self,
        websocket: trio_websocket.WebSocketConnection,
        port: int,
        *,
        client_side: bool,
        description: str,
        transport: trio.abc.AsyncResource | None = None,
    ) -> None:
        self._ws = websocket
        self._port = port
        self._client_side = client_side
        self._description = description
        self._transport = transport
        self._pending = memoryview(b"")
        # Bytes of the server's 2-byte port prefix still expected on each channel.
        self._prefix_left = {DATA_CHANNEL: 2, ERROR_CHANNEL: 2} if client_side else {}
        self._prefix = {DATA_CHANNEL: bytearray(), ERROR_CHANNEL: bytearray()}
        self._error_text = bytearray()
        self._error: PortForwardError | None = None
        self._closed = False
        self._receiving = False
        self._sending = False

    @property
    def description(self) -> str:
        return self._description

    # -- server end -------------------------------------------------------------------------

    async def start(self) -> None:
        """Server end: announce the port on both channels, as the kubelet does."""
        prefix = self._port.to_bytes(2, "little")
        await self._send_message(bytes([DATA_CHANNEL]) + prefix)
        await self._send_message(bytes([ERROR_CHANNEL]) + prefix)

    async def send_error(self, text: str) -> None:
        """Server end: report a failure on the error channel and close."""
        payload = text.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
        try:
            await self._send_message(bytes([ERROR_CHANNEL]) + payload)
        finally:
            await self.aclose()

    # -- trio.abc.Stream ---------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed")
            if self._error is not None:
                raise self._error
            view = memoryview(data)
            if not view:
                await trio.lowlevel.checkpoint()
                return
            for start in range(0, len(view), MAX_SEND_MESSAGE):
                chunk = view[start : start + MAX_SEND_MESSAGE]
                await self._send_message(b"\x00" + chunk)  # one copy: bytes + buffer
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        # trio-websocket exposes no send readiness; send_all itself applies back-pressure.
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("the port-forward stream was closed")
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            if not isinstance(max_bytes, int):
                raise TypeError("max_bytes must be an int or None")
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed")
            waited = False
            while not self._pending:
                waited = True
                if self._error is not None:
                    raise self._error
                try:
                    message = await self._ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    await trio.lowlevel.checkpoint()  # a closed channel raises without one
                    if self._closed:
                        raise trio.ClosedResourceError(
                            "the port-forward stream was closed"
                        ) from None
                    return self._end_of_stream(exc.reason)
                self._take(message)
            if max_bytes is None or max_bytes >= len(self._pending):
                chunk, self._pending = self._pending, memoryview(b"")
            else:
                chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            if not waited:
                await trio.lowlevel.checkpoint()  # every receive_some is a checkpoint
            return chunk.tobytes()
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # The close handshake waits for the peer; a peer that never answers must not hold
            # us, so the transport is closed by force after a short wait (or when cancelled).
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._ws.aclose()
                await trio.lowlevel.checkpoint()  # aclose of an already closed socket has none
        finally:
            if self._transport is not None:
                await trio.aclose_forcefully(self._transport)

    # -- internals ---------------------------------------------------------------------------

    async def _send_message(self, message: bytes) -> None:
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed") from None
            if self._error is not None:
                raise self._error from None
            raise PortForwardBroken(
                f"the port-forward to {self._description} closed ({_reason_text(exc.reason)})"
            ) from None

    def _take(self, message: bytes | str) -> None:
        """Route one websocket message to the data or error channel."""
        if isinstance(message, str) or not message:
            self._fail(
                PortForwardBroken(
                    f"the port-forward to {self._description} sent a text "
                    "or empty message, which the protocol does not allow"
                )
            )
            return
        channel = message[0]
        body = memoryview(message)[1:]
        if channel not in (DATA_CHANNEL, ERROR_CHANNEL):
            self._fail(
                PortForwardBroken(
                    f"the port-forward to {self._description} used unknown channel {channel}"
                )
            )
            return
        left = self._prefix_left.get(channel, 0)
        if left:
            taken = body[:left]
            self._prefix[channel] += taken
            self._prefix_left[channel] = left - len(taken)
            body = body[len(taken) :]
            if self._prefix_left[channel] == 0:
                announced = int.from_bytes(self._prefix[channel], "little")
                if announced != self._port:
                    self._fail(
                        PortForwardBroken(
                            f"the port-forward to {self._description} announced port {announced}"
                        )
                    )
                    return
        if not body:
            return
        if channel == DATA_CHANNEL:
            self._pending = body
            return
        room = MAX_ERROR_TEXT - len(self._error_text)
        self._error_text += body[:room]
        text = self._error_text.decode("utf-8", "replace").strip()
        self._fail(PortForwardError(f"the port-forward to {self._description} failed: {text}"))

    def _fail(self, error: PortForwardError) -> None:
        if self._error is None:
            log.info("%s", error)
            self._error = error

    def _end_of_stream(self, reason: trio_websocket.CloseReason | None) -> bytes:
        if self._error is not None:
            raise self._error
        if reason is not None and reason.code in (1000, 1001):
            return b""
        raise PortForwardBroken(
            f"the port-forward to {self._description} broke off ({_reason_text(reason)})"
        )


def _reason_text(reason: trio_websocket.CloseReason | None) -> str:
    if reason is None:
        return "connection lost"
    text = f"websocket close {reason.code} {reason.name}"
    return f"{text}: {reason.reason}" if reason.reason else text


class _GuardedNursery:
    """Runs trio-websocket's reader task so that a handshake rejection is captured (and the
    waiting handshake woken) instead of crashing the nursery; any other error propagates."""

    def __init__(self, nursery: trio.Nursery, handshake: trio.CancelScope) -> None:
        self._nursery = nursery
        self._handshake = handshake
        self.rejected: trio_websocket.ConnectionRejected | None = None

    def start_soon(self, fn: Callable[[], Awaitable[Any]], *args: Any) -> None:
        async def guarded() -> None:
            try:
                await fn(*args)
            except trio_websocket.ConnectionRejected as exc:
                self.rejected = exc
                self._handshake.cancel()

        self._nursery.start_soon(guarded)


def _rejection_error(description: str, exc: trio_websocket.ConnectionRejected) -> PortForwardError:
    message = ""
    if exc.body:
        try:
            status = json.loads(exc.body)
            message = str(status.get("message", "")) if isinstance(status, dict) else ""
        except ValueError:
            message = exc.body[:200].decode("utf-8", "replace").strip()
    hint = {
        401: "the cluster did not accept tele's credentials; check the kubeconfig",
        403: "the user may not create pods/portforward here",
        404: "the pod does not exist",
    }.get(exc.status_code, "")
    detail = "; ".join(part for part in (message, hint) if part)
    return PortForwardError(
        f"the API server refused the port-forward to {description} "
        f"(HTTP {exc.status_code}{': ' + detail if detail else ''})"
    )


@asynccontextmanager
async def open_portforward(
    cluster: ClusterConnection,
    namespace: str,
    pod: str,
    port: int,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[PortForwardStream]:
    """Open a port-forward to `pod`'s `port`; yields a Stream, closes it on exit.

    Raises `PortForwardError` (a `ConnectionFailed`) when the API server cannot be reached or
    refuses, and from stream operations when the cluster reports an error for the port.
    """
    description = f"pod {namespace}/{pod} port {port}"
    resource = cluster.path_prefix + portforward_path(namespace, pod, port)
    headers = await cluster.auth_headers()
    host, server_port = cluster.host, cluster.port
    stream: PortForwardStream | None = None
    try:
        async with trio.open_nursery() as nursery:
            transport: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
            websocket: trio_websocket.WebSocketConnection | None = None
            try:
                with trio.move_on_after(connect_timeout) as handshake:
                    guard = _GuardedNursery(nursery, handshake)
                    transport = await _connect(cluster, description)
                    websocket = await trio_websocket.wrap_client_stream(
                        guard,  # type: ignore[arg-type]
                        transport,
                        f"{host}:{server_port}",
                        resource,
                        subprotocols=[SUBPROTOCOL],
                        extra_headers=headers,
                        message_queue_size=MESSAGE_QUEUE_SIZE,
                        max_message_size=MAX_RECEIVE_MESSAGE,
                        receive_buffer_size=RECEIVE_BUFFER_SIZE,
                    )
            except BaseException:
                if transport is not None:
                    await trio.aclose_forcefully(transport)
                raise
            if websocket is None:
                if transport is not None:
                    await trio.aclose_forcefully(transport)
                if guard.rejected is not None:
                    raise _rejection_error(description, guard.rejected)
                raise PortForwardError(
                    f"the port-forward to {description} was not set up within {connect_timeout:g} s"
                )
            stream = PortForwardStream(
                websocket, port, client_side=True, description=description, transport=transport
            )
            if websocket.subprotocol != SUBPROTOCOL:
                await stream.aclose()
                raise PortForwardError(
                    f"the API server does not speak {SUBPROTOCOL} for {description}"
                )
            try:
                yield stream
            finally:
                await stream.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Only our own body and the reader run in the nursery: give callers the single error
        # they would get from a plain stream instead of a group of one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


async def _connect(
    cluster: ClusterConnection, description: str
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """TCP (+TLS) to the API server; OS and TLS failures become PortForwardError."""
    where = f"{cluster.host}:{cluster.port}"
    try:
        tcp = await trio.open_tcp_stream(cluster.host, cluster.port)
    except OSError as exc:
        raise PortForwardError(
            f"cannot reach the Kubernetes API server at {where} for {description}: "
            f"{exc.strerror or exc}"
        ) from exc
    context = cluster.new_ssl_context(alpn=["http/1.1"])  # a websocket upgrade is HTTP/1.1
    if context is None:
        return tcp
    tls = trio.SSLStream(
        tcp,
        context,
        server_hostname=cluster.tls_server_name or cluster.host,
        https_compatible=True,
    )
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__ or exc
        raise PortForwardError(
            f"the TLS handshake with the API server at {where} failed: {cause}"
        ) from exc
    return tls


async def accept_portforward(
    request: trio_websocket.WebSocketRequest, port: int, *, description: str = "client"
) -> PortForwardStream:
    """Server end (tests, sandbox): accept a port-forward request and announce `port`."""
    websocket = await request.accept(subprotocol=SUBPROTOCOL)
    stream = PortForwardStream(websocket, port, client_side=False, description=description)
    await stream.start()
    return stream


def parse_portforward_target(target: str) -> tuple[str, str, int] | None:
    """Server end: (namespace, pod, port) from a request target, or None if it is not one."""
    parts = urllib.parse.urlsplit(target)
    match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward", parts.path)
    ports = urllib.parse.parse_qs(parts.query).get("ports", [])
    if match is None or len(ports) != 1 or not ports[0].isdigit():
        return None
    return match.group(1), match.group(2), int(ports[0])
