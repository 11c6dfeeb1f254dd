"""Serve the API over HTTPS: HTTP/2 through our own h2 driver, HTTP/1.1 (and websocket upgrades)
through hypercorn, chosen per connection by ALPN; an HTTP/1.1 connection whose first request
asks for `Upgrade: SPDY/3.1` (kubectl's exec and port-forward) goes to `spdystreaming`, one
whose first request is a port-forward websocket (tele's daemon, kubectl's channel protocol) to
`wsdirect`.

`serve` follows tele's service shape: it reports the bound address through `task_status` once
the socket listens, and runs until cancelled.
"""

from __future__ import annotations

import logging
import ssl
from functools import partial
from typing import Any, TypedDict

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from . import spdystreaming, wsdirect
from .app import CLIENT_CERTIFICATE_USER, ApiApp
from .auth import User, user_of_certificate
from .certs import KeyPair, server_context
from .h2server import H2ServerConnection

log = logging.getLogger(__name__)

_HANDSHAKE_TIMEOUT = 10.0


def _hypercorn_config() -> Config:
    config = Config()
    config.keep_alive_timeout = 90
    # Clients (watch-heavy controllers) keep one connection for a long time.
    config.keep_alive_max_requests = 1 << 31
    config.graceful_timeout = 0.5
    config.accesslog = None
    config.errorlog = logging.getLogger("tele.sandbox.hypercorn")
    config.max_app_queue_size = 64
    config.h11_max_incomplete_size = 1 << 16
    return config


class _Ends(TypedDict):
    client: tuple[str, int] | None
    server: tuple[str, int] | None


def _ends(stream: trio.SSLStream[trio.SocketStream]) -> _Ends:
    """The connection's `client` and `server` addresses, as the ASGI servers here take them
    (looked up only for the connections served outside hypercorn)."""
    sock = stream.transport_stream.socket
    return {"client": _address(sock, True), "server": _address(sock, False)}


def _address(sock: Any, peer: bool) -> tuple[str, int] | None:
    try:
        addr = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    return (str(addr[0]), int(addr[1]))


async def _handle(
    app: Any,
    config: Config,
    wrapped: Any,
    context: WorkerContext,
    limits: spdystreaming.Limits,
    stream: trio.SSLStream[trio.SocketStream],
) -> None:
    try:
        with trio.fail_after(_HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        await trio.aclose_forcefully(stream)
        return
    try:
        der = stream.getpeercert(binary_form=True)
        user = user_of_certificate(der) if der else None
        if user is not None:  # verified against the cluster CA by the handshake
            app = _AsClient(app, user)
            wrapped = wrap_app(
                spdystreaming.with_tunnel(app, limits),  # type: ignore[arg-type]
                config.wsgi_max_body_size,
                "asgi",
            )
        await _serve_connection(app, config, wrapped, context, limits, stream)
    except Exception:
        # The connection boundary: a failure ends this connection, never the listener (the
        # handlers run in the server's nursery, where an exception would end every client).
        log.exception("connection from %s failed", _address(stream.transport_stream.socket, True))
        await trio.aclose_forcefully(stream)


class _AsClient:
    """The app, with the user of this connection's client certificate in each scope (other
    attributes are the app's: the streaming code looks up its handlers)."""

    def __init__(self, app: Any, user: User) -> None:
        self._app = app
        self._user = user

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._app({**scope, CLIENT_CERTIFICATE_USER: self._user}, receive, send)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)


async def _serve_connection(
    app: Any,
    config: Config,
    wrapped: Any,
    context: WorkerContext,
    limits: spdystreaming.Limits,
    stream: trio.SSLStream[trio.SocketStream],
) -> None:
    if stream.selected_alpn_protocol() == "h2":
        await H2ServerConnection(app, stream, **_ends(stream)).run()
        return
    buffered, end = await spdystreaming.read_head(stream)
    head = spdystreaming.parse_head(buffered[:end]) if end > 0 else None
    if head is not None and spdystreaming.is_spdy_upgrade(head):
        await spdystreaming.serve_upgrade(
            app, stream, head, buffered[end:], **_ends(stream), limits=limits
        )
        return
    if head is not None and wsdirect.takes(head):
        await wsdirect.serve(app, stream, head, buffered[end:], **_ends(stream))
        return
    if not buffered:
        await trio.aclose_forcefully(stream)
        return
    await TCPServer(wrapped, config, context, {}, _Replay(stream, buffered)).run()  # type: ignore[arg-type]


class _Replay:
    """The TLS stream with the bytes read to look at the first request head put back in
    front, for hypercorn."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], buffered: bytes) -> None:
        self._stream = stream
        self._buffered = buffered

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._buffered:
            data, self._buffered = self._buffered, b""
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class ApiServer:
    """The HTTPS serving of one API app: its TLS context, hypercorn's configuration and the
    streaming limits, shared by every listener it serves (the host's, and a socket opened in
    another network namespace: the sandbox laptop's, which so reaches the API server with no
    relay between)."""

    def __init__(self, app: ApiApp, pair: KeyPair, *, client_ca_pem: bytes | None = None) -> None:
        context: ssl.SSLContext = server_context(pair, ["h2", "http/1.1"])
        if client_ca_pem:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cadata=client_ca_pem.decode())
        self._context = context
        config = _hypercorn_config()
        limits = spdystreaming.Limits()
        wrapped = wrap_app(
            spdystreaming.with_tunnel(app, limits),  # type: ignore[arg-type]
            config.wsgi_max_body_size,
            "asgi",
        )
        self._handler = partial(_handle, app, config, wrapped, WorkerContext(None), limits)

    async def serve_listeners(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve TLS connections accepted by `listeners` until cancelled (ready at once)."""
        ssl_listeners = [
            trio.SSLListener(lst, self._context, https_compatible=True) for lst in listeners
        ]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handler, ssl_listeners, handler_nursery=nursery)

    async def serve_tcp(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port (0 = any free port) and report (host, port) when ready."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        log.info("API server listening on %s:%s", bound[0], bound[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve_listeners, listeners)
            task_status.started((str(bound[0]), int(bound[1])))


async def serve(
    app: ApiApp,
    pair: KeyPair,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    client_ca_pem: bytes | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (0 = any free port) and report (host, port) when ready.

    With `client_ca_pem`, clients may present a certificate signed by it (user = CN, groups =
    O); a certificate that does not verify fails the handshake, as in Go's
    VerifyClientCertIfGiven."""
    await ApiServer(app, pair, client_ca_pem=client_ca_pem).serve_tcp(
        host, port, task_status=task_status
    )
