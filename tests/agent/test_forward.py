"""The agent's ports with real sockets on 127.0.0.1: transparent when idle, tcp engagements."""

from __future__ import annotations

import hashlib
import os

import trio

from tele.agent.engagements import StaticEngagements
from tele.rpc.agent_api import Engagement
from tests.agent.servers import AGENT_PORT, running_agent, start_tcp_server

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


async def exchange(port: int, payload: bytes) -> bytes:
    """Send `payload`, half-close, and read everything until the far side's EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        while data := await stream.receive_some(65536):
            received += data
    return bytes(received)


def expected(name: str, payload: bytes) -> bytes:
    return f"{name}:{len(payload)}:{hashlib.sha256(payload).hexdigest()}".encode()


async def test_idle_agent_is_transparent_both_ways_with_half_close() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            async with running_agent(app.port, StaticEngagements()) as agent:
                results = [b""] * 3

                async def one(i: int) -> None:
                    results[i] = await exchange(agent, PAYLOAD[: len(PAYLOAD) - i])

                async with trio.open_nursery() as clients:
                    for i in range(3):
                        clients.start_soon(one, i)
            nursery.cancel_scope.cancel()
    assert results == [expected("app", PAYLOAD[: len(PAYLOAD) - i]) for i in range(3)]
    assert app.connections == 3


async def test_tcp_engagement_takes_whole_connections_and_leaving_restores_the_app() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            handler = await start_tcp_server(nursery, "handler")
            engagement = Engagement(id="e1", container="echo", agent_port=AGENT_PORT)
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", handler.port)})
            async with running_agent(app.port, source) as agent:
                engaged = await exchange(agent, PAYLOAD)
                source.set([])
                after = await exchange(agent, b"plain")
            nursery.cancel_scope.cancel()
    assert engaged == expected("handler", PAYLOAD)
    assert after == expected("app", b"plain")
    assert (handler.connections, app.connections) == (1, 1)
    # The client learns what the caller addressed: the pod IP and the app's container port.
    assert source.opened == [("e1", ("10.1.2.3", app.port))]


async def test_an_engagement_on_another_port_leaves_this_one_alone() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            other = Engagement(id="e2", container="echo", agent_port=AGENT_PORT + 1)
            source = StaticEngagements([other], handlers={"e2": ("127.0.0.1", 1)})
            async with running_agent(app.port, source) as agent:
                result = await exchange(agent, b"x" * 1000)
            nursery.cancel_scope.cancel()
    assert result == expected("app", b"x" * 1000)


async def test_unreachable_handler_resets_the_caller_and_other_connections_go_on() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            # A port nobody listens on: bind, note it, close.
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            dead_port = sock.getsockname()[1]
            sock.close()
            engagement = Engagement(id="e1", container="echo", agent_port=AGENT_PORT)
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", dead_port)})
            async with running_agent(app.port, source) as agent:
                stream = await trio.open_tcp_stream("127.0.0.1", agent)
                async with stream:
                    try:
                        data = await stream.receive_some(100)
                    except trio.BrokenResourceError:
                        data = b"reset"
                source.set([])
                after = await exchange(agent, b"ok")
            nursery.cancel_scope.cancel()
    assert data in (b"", b"reset")
    assert after == expected("app", b"ok")


async def test_an_http_caller_of_an_unreachable_handler_gets_a_502_that_says_why() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            dead_port = sock.getsockname()[1]
            sock.close()
            engagement = Engagement(
                id="e1", container="echo", agent_port=AGENT_PORT, client="dev@laptop"
            )
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", dead_port)})
            async with running_agent(app.port, source) as agent:
                answer = await exchange(agent, b"GET /x HTTP/1.1\r\nHost: echo\r\n\r\n")
            nursery.cancel_scope.cancel()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 502 Bad Gateway"
    assert body.startswith(
        b"tele: the local handler of dev@laptop (engagement e1) is not reachable: "
    )
    assert body.endswith(b".\n") and body.count(b"\n") == 1
