"""What the agent routes by: the engagements on each agent port and how to reach their clients.

The runtime depends only on `EngagementSource`; the manager link implements it in production,
`StaticEngagements` (engagements given directly, clients at fixed local addresses) in tests and
for running an agent without a manager.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import trio

from tele.agent.wiretap import RESPONSE_SUFFIX, Wiretaps
from tele.errors import TeleError
from tele.net.tunnel import Protocol as L4
from tele.rpc.agent_api import WIRETAP, Engagement
from tele.rpc.tapcopies import serve_copies

Address = tuple[str, int]


class EngagementSource(Protocol):
    wiretaps: Wiretaps
    """The wiretaps' counters and buffer budget."""

    def current(self, agent_port: int) -> Sequence[Engagement]:
        """The engagements that route `agent_port`'s traffic now (not its wiretaps; cheap:
        called per connection and per request)."""
        ...

    def taps(self, agent_port: int) -> Sequence[Engagement]:
        """The wiretaps of `agent_port` now (tele.agent.wiretap)."""
        ...

    async def open_to_client(
        self,
        engagement: Engagement,
        original_dst: Address,
        *,
        protocol: L4 = L4.TCP,
        response: bool = False,
    ) -> trio.abc.HalfCloseableStream:
        """A stream to the engaging client's local handler (for UDP: DATAGRAM framed; with
        `response`, a wiretap's response handler); raises on failure."""
        ...

    def tap_channel(
        self, engagement: Engagement, original_dst: Address, response: bool
    ) -> AbstractAsyncContextManager[trio.abc.HalfCloseableStream]:
        """A wiretap's copy channel to its client (records: tele.net.tapcopies; with
        `response`, for its response handler); raises on failure."""
        ...


RESPONSE_KEY = RESPONSE_SUFFIX


class StaticEngagements:
    """Engagements set directly; each client handler is a TCP address on this host."""

    def __init__(
        self,
        engagements: Iterable[Engagement] = (),
        *,
        handlers: Mapping[str, Address] | None = None,
    ) -> None:
        self._engagements = list(engagements)
        self.handlers: dict[str, Address] = dict(handlers or {})
        self.opened: list[tuple[str, Address]] = []
        """(engagement id, original destination) of every stream opened to a client."""
        self.wiretaps = Wiretaps()

    def set(self, engagements: Iterable[Engagement]) -> None:
        self._engagements = list(engagements)

    def current(self, agent_port: int) -> Sequence[Engagement]:
        return [e for e in self._engagements if agent_port in e.ports() and e.kind != WIRETAP]

    def taps(self, agent_port: int) -> Sequence[Engagement]:
        return [e for e in self._engagements if agent_port in e.ports() and e.kind == WIRETAP]

    async def open_to_client(
        self,
        engagement: Engagement,
        original_dst: Address,
        *,
        protocol: L4 = L4.TCP,
        response: bool = False,
    ) -> trio.abc.HalfCloseableStream:
        """A TCP connection to the handler (for UDP, it gets the DATAGRAM framed stream); a
        wiretap's response handler is `handlers[id + RESPONSE_KEY]`."""
        host, port = self.handlers[engagement.id + (RESPONSE_KEY if response else "")]
        self.opened.append((engagement.id, original_dst))
        return await trio.open_tcp_stream(host, port)

    @asynccontextmanager
    async def tap_channel(
        self, engagement: Engagement, original_dst: Address, response: bool
    ) -> AsyncIterator[trio.abc.HalfCloseableStream]:
        """The client's side of the channel runs here (tele.rpc.tapcopies), giving each copy
        to `handlers[id]` (or `handlers[id + RESPONSE_KEY]`) on a connection of its own."""
        where = self.handlers.get(engagement.id + (RESPONSE_KEY if response else ""))
        if where is None:
            raise TeleError(f"no handler for wiretap {engagement.id}")
        self.opened.append((engagement.id, original_dst))
        ours, theirs = trio.socket.socketpair()
        agent_end = trio.SocketStream(ours)
        client_end = trio.SocketStream(theirs)

        async def connect() -> trio.abc.HalfCloseableStream | None:
            try:
                return await trio.open_tcp_stream(*where)
            except OSError:
                return None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_copies, client_end, connect)
            async with agent_end, client_end:
                yield agent_end
            nursery.cancel_scope.cancel()
