"""Where a connection or request goes: the app in the same pod, or an engaging client's handler.

This is the I/O edge for opening those streams: socket and source errors become UpstreamFailed
with a sentence naming the destination. `relay` joins two local streams both ways.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

import trio

from tele.agent.engagements import Address, EngagementSource
from tele.agent.errors import UpstreamFailed
from tele.agent.tls import TlsTermination
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
    tls: TlsTermination | None = None
    """Set when the agent terminates callers' TLS in http mode (tele.agent.tls)."""
    alpn: str | None = None
    """The protocol a TLS caller negotiated: offered to the app on this connection's behalf."""
    app_replaced: bool = False
    """The app container is replaced (not in the pod): only an engagement can serve."""

    def describe(self, engagement: Engagement | None) -> str:
        if engagement is None:
            return f"the app at {self.app[0]}:{self.app[1]}"
        who = f" of {engagement.client}" if engagement.client else ""
        return f"the local handler{who} (engagement {engagement.id})"

    async def open(self, engagement: Engagement | None) -> trio.abc.Stream:
        """A new stream to the app (None) or to `engagement`'s client; UpstreamFailed if not.
        With TLS termination the app's stream is TLS again; the client's is plaintext."""
        if engagement is None and self.app_replaced:
            raise UpstreamFailed(
                f"port {self.app[1]} belongs to a replaced container and no client serves it now."
            )
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                if engagement is not None:
                    return await self.source.open_to_client(engagement, self.original_dst)
                stream = await trio.open_tcp_stream(*self.app)
                if self.tls is None:
                    return stream
                return await self.tls.to_app_stream(stream, self.alpn)
        except trio.TooSlowError:
            raise UpstreamFailed(f"{self.describe(engagement)} did not answer in time.") from None
        except UpstreamFailed:
            raise
        except (OSError, TeleError, trio.BrokenResourceError, KeyError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UpstreamFailed(
                f"{self.describe(engagement)} is not reachable: {reason or type(exc).__name__}."
            ) from exc


def abort(stream: trio.abc.Stream) -> None:
    """Make closing `stream` a TCP RST, so a failure on one side reaches the other as one."""
    # Through the wrappers (TLS, a wiretap's copy) to the socket.
    for _ in range(3):
        if isinstance(stream, trio.SocketStream):
            break
        stream = getattr(stream, "transport_stream", stream)
    if isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass


def peer_closed(stream: trio.abc.Stream) -> bool:
    """Whether the peer of an idle kept-alive connection has closed it (or sent something an
    idle HTTP connection must not carry), so that it is not reused. Streams that are not
    sockets (tunnel streams) tell by failing, and are reported open."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return False
    # trio's socket has no synchronous recv: peek through a duplicate of the descriptor.
    with socket.socket(fileno=os.dup(stream.socket.fileno())) as peek:
        try:
            peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
    return True


async def relay(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    read_size: int = READ_SIZE,
) -> bool:
    """Copy both ways until both directions ended; EOF is passed on as a half-close (a TLS
    stream cannot half-close: its direction just ends there).

    A failure either way aborts both streams (RST) and ends the relay. Returns True after a clean
    end. Closes neither stream.
    """
    failed: list[bool] = []

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(read_size):
                await dst.send_all(data)
            if isinstance(dst, trio.abc.HalfCloseableStream):
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
