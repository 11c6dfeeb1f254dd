"""Stream pairs for tests of h2 links, RPC and tunnels, all in memory."""

from __future__ import annotations

import trio
import trio.testing

from tele.rpc.h2link import H2Link, H2Stream, LinkSettings, open_link


async def open_link_pair(
    nursery: trio.Nursery,
    handler: object = None,
    *,
    settings: LinkSettings | None = None,
) -> tuple[H2Link, trio.MemoryReceiveChannel[H2Stream]]:
    """A client link whose server side sends every incoming stream to the returned channel.

    Both links live in `nursery`; cancel it to tear them down.
    """
    client_transport, server_transport = trio.testing.memory_stream_pair()
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
