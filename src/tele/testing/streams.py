"""Stream pairs for tests of h2 links, RPC and tunnels: in memory, or over a socket pair (which
takes the links' socket write path: write-through and gather writes)."""

from __future__ import annotations

import socket

import trio
import trio.testing

from tele.rpc.h2link import H2Link, H2Stream, LinkSettings, open_link


async def open_link_pair(
    nursery: trio.Nursery,
    handler: object = None,
    *,
    settings: LinkSettings | None = None,
    socket_buffer: int | None = None,
) -> tuple[H2Link, trio.MemoryReceiveChannel[H2Stream]]:
    """A client link whose server side sends every incoming stream to the returned channel.

    With `socket_buffer` (bytes), the links run over a socket pair with send and receive
    buffers that small, so writes are often partial. Both links live in `nursery`; cancel it
    to tear them down.
    """
    client_transport: trio.abc.Stream
    server_transport: trio.abc.Stream
    if socket_buffer is None:
        client_transport, server_transport = trio.testing.memory_stream_pair()
    else:
        left, right = trio.socket.socketpair()
        for sock in (left, right):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)
        client_transport, server_transport = trio.SocketStream(left), trio.SocketStream(right)
    send, receive = trio.open_memory_channel[H2Stream](1000)
    ready = trio.Event()

    async def accept(stream: H2Stream) -> None:
        await send.send(stream)
        # Keep the handler (and so the stream) alive until the test is done with it.
        await trio.sleep_forever()

    async def run_server() -> None:
        async with open_link(
            server_transport, client_side=False, handler=accept, settings=settings
        ) as link:
            ready.set()
            await link.wait_closed()

    nursery.start_soon(run_server)
    client_link: list[H2Link] = []

    async def run_client(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_link(client_transport, client_side=True, settings=settings) as link:
            client_link.append(link)
            task_status.started()
            await link.wait_closed()

    await nursery.start(run_client)
    await ready.wait()
    return client_link[0], receive


async def h2_stream_pair(
    nursery: trio.Nursery, *, settings: LinkSettings | None = None
) -> tuple[H2Stream, H2Stream]:
    """(client stream, server stream) of one fresh h2 stream on a fresh link pair."""
    link, incoming = await open_link_pair(nursery, settings=settings)
    client = await link.open_stream(
        [(":method", "CONNECT"), (":authority", "test:1")],
    )
    server = await incoming.receive()
    return client, server
