"""The laptop side of engaged traffic: answer the manager's "dial back" requests by opening a
DIAL-BACK tunnel stream and relaying it to the local handler (see tele.rpc.agent_api)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable

import trio

from tele.net.tunnel import Destination, Protocol, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc.client import Client
from tele.rpc.errors import RpcError
from tele.rpc.h2link import H2Stream
from tele.rpc.manager_api import SessionRequest
from tele.rpc.tunnel import TunnelError, reset, splice

log = logging.getLogger(__name__)

DialBack = Callable[[Destination, str], Awaitable[H2Stream]]
"""Opens a DIAL-BACK stream for (original destination, dial id)."""
Target = Callable[[str, int], tuple[str, int] | None]
"""Where the local handler of (engagement id, container port) listens (None: not ours, or
gone)."""


async def serve_dial_backs(
    client: Client, session_id: str, dial_back: DialBack, target: Target
) -> None:
    """Follow WATCH_DIALS until it ends; each request is served on its own task.

    The watch's own failure (the manager link broke) is raised as the RpcError it is, not
    wrapped in the nursery's exception group, so that the caller can watch again.
    """
    failure: RpcError | None = None
    async with trio.open_nursery() as nursery:
        try:
            request = SessionRequest(session_id=session_id)
            async with client.stream(aapi.WATCH_DIALS, request) as dials:
                async for dial in dials:
                    nursery.start_soon(_serve_one, dial, dial_back, target)
        except RpcError as exc:
            failure = exc
    if failure is not None:
        raise failure


async def _serve_one(dial: aapi.DialRequest, dial_back: DialBack, target: Target) -> None:
    """One engaged connection; whatever goes wrong with it stays with it."""
    try:
        await _relay(dial, dial_back, target)
    except Exception:
        log.exception("engaged connection for %s failed", dial.engagement_id)


async def _relay(dial: aapi.DialRequest, dial_back: DialBack, target: Target) -> None:
    where = target(dial.engagement_id, dial.original_port)
    destination = Destination(
        Protocol.TCP, ipaddress.ip_address(dial.original_host), dial.original_port
    )
    local: trio.SocketStream | None = None
    if where is not None:
        try:
            local = await trio.open_tcp_stream(*where)
        except OSError as exc:
            log.warning("engaged connection: local handler %s:%d: %s", *where, exc.strerror or exc)
    try:
        stream = await dial_back(destination, dial.dial_id)
    except (TunnelError, RpcError) as exc:
        log.warning("engaged connection: cannot dial back: %s", exc)
        if local is not None:
            await local.aclose()
        return
    if local is None:
        # Nothing listens locally: the cluster-side caller sees a refused connection at once.
        reset(stream, ResetReason.REFUSED)
        return
    async with local:
        try:
            await splice(stream, local)
        finally:
            stream.close()
