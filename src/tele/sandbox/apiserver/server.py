"""Serve the API over HTTPS (HTTP/2 and HTTP/1.1) with hypercorn under trio.

`serve` follows tele's service shape: it reports the bound address through `task_status` once
the socket listens and runs until cancelled.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from .app import ApiApp
from .certs import KeyPair, server_context

log = logging.getLogger(__name__)


class _TlsConfig(Config):
    """hypercorn wants certificate files; we hand it a ready context instead."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._context


async def serve(
    app: ApiApp,
    pair: KeyPair,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (0 = any free port) and report (host, port) when ready."""
    context = server_context(pair, ["h2", "http/1.1"])
    config = _TlsConfig(context)
    config.bind = [f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"]
    config.alpn_protocols = ["h2", "http/1.1"]
    config.h2_max_concurrent_streams = 1000
    config.keep_alive_timeout = 90
    config.graceful_timeout = 0.5
    config.accesslog = None
    config.errorlog = logging.getLogger("tele.sandbox.hypercorn")
    config.max_app_queue_size = 64

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: Any = await nursery.start(run)
        address = binds[0].removeprefix("https://")
        bound_host, _, bound_port = address.rpartition(":")
        log.info("API server listening on %s", address)
        task_status.started((bound_host.strip("[]"), int(bound_port)))
