"""LinkPool: back-off while the peer is unreachable, replacement of a broken link, streams on
the broken link failing with the reason, new streams on the new link, spreading over links."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tele.errors import ConnectionFailed
from tele.net.tunnel import Destination, Protocol, ResetReason
from tele.rpc.h2link import LinkBroken, serve_link
from tele.rpc.links import LinkPool
from tele.rpc.tunnel import TunnelError, TunnelServer

SESSION = "s"


class FakeManager:
    """Hands out transports served by a TunnelServer; can refuse or cut connections."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.refuse = 0  # refuse this many more connection attempts
        self.attempts: list[float] = []
        self.served: list[trio.CancelScope] = []

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[trio.abc.Stream]:
        self.attempts.append(trio.current_time())
        if self.refuse:
            self.refuse -= 1
            raise ConnectionFailed("the traffic manager is not reachable")
        a, b = trio.socket.socketpair()
        scope = trio.CancelScope()
        self.served.append(scope)

        async def serve() -> None:
            with scope:
                await serve_link(trio.SocketStream(b), TunnelServer().handle)

        self.nursery.start_soon(serve)
        async with trio.SocketStream(a) as stream:
            yield stream

    def cut(self, index: int) -> None:
        """Kill the server side of connection `index`: the link breaks."""
        self.served[index].cancel()


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


@asynccontextmanager
async def environment() -> AsyncIterator[tuple[FakeManager, Destination, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        destination = Destination(Protocol.TCP, ipaddress.ip_address("127.0.0.1"), port)
        yield FakeManager(nursery), destination, nursery
        nursery.cancel_scope.cancel()


async def roundtrip(pool: LinkPool, destination: Destination, data: bytes) -> None:
    async with await pool.dial(destination, session=SESSION) as stream:
        await stream.send_all(data)
        assert await stream.receive_some() == data


async def test_open_now_opens_on_a_live_link_at_once_or_answers_none() -> None:
    """The VIF's early accept: no schedule point, and None (not a wait) while no link is up."""
    async with environment() as (manager, destination, nursery):
        pool = LinkPool(manager.connect, backoff_initial=1.0)
        assert pool.open_now(destination, session=SESSION) is None  # no link yet
        await nursery.start(pool.serve)
        with trio.testing.assert_no_checkpoints():
            stream = pool.open_now(destination, session=SESSION)
        assert stream is not None
        async with stream:
            await stream.send_all(b"before any ACCEPT")  # the far end holds it for the dial
            assert await stream.receive_some() == b"before any ACCEPT"
        manager.refuse = 100
        manager.cut(0)
        await trio.testing.wait_all_tasks_blocked()  # the pool learnt it and backs off
        assert not pool.links
        assert pool.open_now(destination, session=SESSION) is None


async def test_backoff_then_replacement_after_a_break(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with environment() as (manager, destination, nursery):
        manager.refuse = 3
        pool = LinkPool(manager.connect, backoff_initial=1.0, backoff_max=8.0)
        await nursery.start(pool.serve)
        # Attempts at t=0, then after pauses drawn from [d/2, d] for d = 1, 2, 4.
        gaps = [b - a for a, b in zip(manager.attempts, manager.attempts[1:], strict=False)]
        assert len(gaps) == 3
        for gap, delay in zip(gaps, (1.0, 2.0, 4.0), strict=True):
            assert delay / 2 <= gap <= delay
        await roundtrip(pool, destination, b"first link")

        # A stream is open when the link breaks: it fails, saying why.
        stream = await pool.dial(destination, session=SESSION)
        manager.cut(0)
        with pytest.raises(LinkBroken, match="closed"):
            while True:
                await stream.receive_some()
        await stream.aclose()

        # The pool replaces the link after a short back-off; new streams use the new one.
        await roundtrip(pool, destination, b"second link")
        assert pool.replacements == 1
        assert len(manager.attempts) == 5
        assert manager.attempts[-1] - manager.attempts[-2] <= 1.0 + 0.1  # back-off reset


async def test_streams_spread_over_links() -> None:
    async with environment() as (manager, destination, nursery):
        pool = LinkPool(manager.connect, count=2)
        await nursery.start(pool.serve)
        with trio.fail_after(10):
            await pool.wait_up(2)
        streams = [await pool.dial(destination, session=SESSION) for _ in range(4)]
        assert sorted(link.active_streams for link in pool.links) == [2, 2]
        for stream in streams:
            await stream.aclose()


async def test_dial_gives_up_when_no_link_comes_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with environment() as (manager, destination, nursery):
        manager.refuse = 1_000
        pool = LinkPool(manager.connect, backoff_initial=1.0, backoff_max=2.0)
        nursery.start_soon(pool.serve)
        with pytest.raises(TunnelError, match="not reachable") as info:
            await pool.dial(destination, session=SESSION, wait=10)
        assert info.value.reason is ResetReason.UNREACHABLE
        assert trio.current_time() >= 10
        # Back-off is capped: attempts keep coming at most 2 s apart.
        gaps = [b - a for a, b in zip(manager.attempts, manager.attempts[1:], strict=False)]
        assert max(gaps) <= 2.0
