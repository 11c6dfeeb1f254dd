"""tele.daemon.forward: a local port whose connections and datagrams reach one destination
through a real tunnel (h2 link + TunnelServer over a socket pair), all on loopback."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tele.daemon.forward import Dialer, PortInUse, serve_forward, serve_udp_forward
from tele.net.tunnel import Destination, Protocol
from tele.rpc.h2link import H2Stream, open_link, serve_link
from tele.rpc.tunnel import TunnelServer, dial

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@asynccontextmanager
async def tunnel(nursery: trio.Nursery) -> AsyncIterator[Dialer]:
    """A dialer over one h2 link to a TunnelServer (what the session's `dial` is)."""
    a, b = trio.socket.socketpair()
    server = TunnelServer()
    nursery.start_soon(serve_link, trio.SocketStream(b), server.handle)
    async with open_link(trio.SocketStream(a), client_side=True) as link:

        async def dialer(destination: Destination) -> H2Stream:
            return await dial(link, destination, session="s")

        yield dialer


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(b"echo:" + data)


async def test_tcp_connections_reach_the_destination_and_half_close() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        target = Destination(Protocol.TCP, LOOPBACK, listeners[0].socket.getsockname()[1])
        async with tunnel(nursery) as dialer:
            host, port = await nursery.start(functools.partial(serve_forward, dialer, target))
            assert host == "127.0.0.1" and port > 0
            with trio.fail_after(5):
                first = await trio.open_tcp_stream(host, port)
                second = await trio.open_tcp_stream(host, port)
                async with first, second:
                    await second.send_all(b"two")
                    await first.send_all(b"one")
                    assert await first.receive_some() == b"echo:one"
                    assert await second.receive_some() == b"echo:two"
                    await first.send_eof()  # our FIN reaches the echo server: it closes
                    assert await first.receive_some() == b""
            nursery.cancel_scope.cancel()


async def test_a_refused_destination_resets_only_that_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]  # bound but not listening: connections refused
        async with trio.open_nursery() as nursery:
            target = Destination(Protocol.TCP, LOOPBACK, closed_port)
            async with tunnel(nursery) as dialer:
                host, port = await nursery.start(functools.partial(serve_forward, dialer, target))
                with trio.fail_after(5):
                    for _ in range(2):  # the listener survives the failed one
                        stream = await trio.open_tcp_stream(host, port)
                        async with stream:
                            with pytest.raises(trio.BrokenResourceError):
                                await stream.receive_some()
                nursery.cancel_scope.cancel()


async def test_a_taken_port_is_one_sentence() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        target = Destination(Protocol.TCP, LOOPBACK, 1)
        async with trio.open_nursery() as nursery:
            async with tunnel(nursery) as dialer:
                with pytest.raises(PortInUse, match=f"Local port {port}/TCP .* already in use"):
                    await nursery.start(functools.partial(serve_forward, dialer, target, port=port))
            nursery.cancel_scope.cancel()


async def test_udp_peers_get_their_own_replies() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        await server.bind(("127.0.0.1", 0))

        async def udp_echo() -> None:
            while True:
                data, peer = await server.recvfrom(2048)
                await server.sendto(b"echo:" + data, peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(udp_echo)
            target = Destination(Protocol.UDP, LOOPBACK, server.getsockname()[1])
            async with tunnel(nursery) as dialer:
                address = await nursery.start(functools.partial(serve_udp_forward, dialer, target))
                with (
                    trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as one,
                    trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as two,
                    trio.fail_after(5),
                ):
                    await one.sendto(b"1", address)
                    await two.sendto(b"2", address)
                    assert await two.recv(2048) == b"echo:2"
                    assert await one.recv(2048) == b"echo:1"
                    await one.sendto(b"again", address)
                    assert await one.recv(2048) == b"echo:again"
                nursery.cancel_scope.cancel()
