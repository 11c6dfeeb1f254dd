"""Serve the API over HTTPS: HTTP/2 through our own h2 driver, HTTP/1.1 (and websocket upgrades)
through hypercorn, chosen per connection by ALPN.

`serve` follows tele's service shape: it reports the bound address through `task_status` once
the socket listens, and runs until cancelled.
"""

from __future__ import annotations

import logging
import ssl
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app

from .app import ApiApp
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


def _address(sock: Any, peer: bool) -> tuple[str, int] | None:
    try:
        addr = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    return (str(addr[0]), int(addr[1]))


async def _handle(
    app: ApiApp,
    config: Config,
    wrapped: Any,
    context: WorkerContext,
    stream: trio.SSLStream[trio.SocketStream],
) -> None:
    try:
        with trio.fail_after(_HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        await trio.aclose_forcefully(stream)
        return
    if stream.selected_alpn_protocol() == "h2":
        sock = stream.transport_stream.socket
        conn = H2ServerConnection(
            app, stream, client=_address(sock, True), server=_address(sock, False)
        )
        await conn.run()
        return
    await TCPServer(wrapped, config, context, {}, stream).run()


async def serve(
    app: ApiApp,
    pair: KeyPair,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (0 = any free port) and report (host, port) when ready."""
    context: ssl.SSLContext = server_context(pair, ["h2", "http/1.1"])
    config = _hypercorn_config()
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    worker = WorkerContext(None)
    listeners = await trio.open_tcp_listeners(port, host=host)
    ssl_listeners = [trio.SSLListener(lst, context, https_compatible=True) for lst in listeners]
    bound = listeners[0].socket.getsockname()
    log.info("API server listening on %s:%s", bound[0], bound[1])
    async with trio.open_nursery() as nursery:
        task_status.started((str(bound[0]), int(bound[1])))
        await trio.serve_listeners(
            partial(_handle, app, config, wrapped, worker), ssl_listeners, handler_nursery=nursery
        )
