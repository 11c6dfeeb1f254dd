"""Where a connection or request goes: the app in the same pod, or an engaging client's handler.

This is the I/O edge for opening those streams: socket and source errors become UpstreamFailed
with a sentence naming the destination. `relay` joins two local streams both ways.
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from typing import Final

import trio

from tele.agent.engagements import Address, EngagementSource
from tele.agent.errors import UpstreamFailed
from tele.errors import TeleError
from tele.rpc.agent_api import Engagement

log = logging.getLogger(__name__)

READ_SIZE: Final = 256 * 1024
"""One read in flight per direction (as tele.rpc.tunnel.splice): memory per relay is bounded."""
CONNECT_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Upstreams:
    """The destinations one agent port's connections can take."""

    source: EngagementSource
    agent_port: int
    app: Address
    """The app's port, in the pod's network namespace (127.0.0.1:containerPort)."""
    original_dst: Address
    """What callers addressed: the pod IP and the container port (passed to the client)."""

    def describe(self, engagement: Engagement | None) -> str:
        if engagement is None:
            return f"the app at {self.app[0]}:{self.app[1]}"
        who = f" of {engagement.client}" if engagement.client else ""
        return f"the local handler{who} (engagement {engagement.id})"

    async def open(self, engagement: Engagement | None) -> trio.abc.HalfCloseableStream:
        """A new stream to the app (None) or to `engagement`'s client; UpstreamFailed if not."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                if engagement is None:
                    return await trio.open_tcp_stream(*self.app)
                return await self.source.open_to_client(engagement, self.original_dst)
        except trio.TooSlowError:
            raise UpstreamFailed(f"{self.describe(engagement)} did not answer in time.") from None
        except (OSError, TeleError, trio.BrokenResourceError, KeyError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UpstreamFailed(
                f"{self.describe(engagement)} is not reachable: {reason or type(exc).__name__}."
            ) from exc


def abort(stream: trio.abc.Stream) -> None:
    """Make closing `stream` a TCP RST, so a failure on one side reaches the other as one."""
    if isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    read_size: int = READ_SIZE,
) -> bool:
    """Copy both ways until both directions ended; EOF is passed on as a half-close.

    A failure either way aborts both streams (RST) and ends the relay. Returns True after a clean
    end. Closes neither stream.
    """
    failed: list[bool] = []

    async def pump(src: trio.abc.Stream, dst: trio.abc.HalfCloseableStream) -> None:
        try:
            while data := await src.receive_some(read_size):
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("relay ended by %r", exc)
            if not failed:
                failed.append(True)
                abort(a)
                abort(b)
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, b, a)
        await pump(a, b)
    return not failed
