"""The `http` mechanism for HTTP/2 with prior knowledge (h2c): routed stream by stream."""

from __future__ import annotations

import trio

from tele.agent.matching import Router
from tele.agent.upstream import Upstreams


async def serve_connection(
    stream: trio.SocketStream, upstreams: Upstreams, first: bytes, router: Router
) -> None:
    raise NotImplementedError
