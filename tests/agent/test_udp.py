"""UDP agent ports with real sockets on 127.0.0.1: each caller's datagrams reach the app and its
replies come back from the agent port; an engaged port sends whole flows to the client
(DATAGRAM framing); a flood of callers is bounded."""

from __future__ import annotations

import socket
from functools import partial

import trio

from tele.agent.engagements import RESPONSE_KEY, StaticEngagements
from tele.agent.udp import serve_udp_port
from tele.net.tunnel import DatagramDecoder, encode_datagram
from tele.rpc.agent_api import WIRETAP, Engagement
from tele.testing.waits import wait_for


async def udp_echo(nursery: trio.Nursery, prefix: bytes) -> int:
    """A UDP echo on 127.0.0.1 answering `prefix + datagram`; its port."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def serve() -> None:
        with sock:
            while True:
                data, peer = await sock.recvfrom(65535)
                await sock.sendto(prefix + data, peer)

    nursery.start_soon(serve)
    return int(sock.getsockname()[1])


async def agent_port(
    nursery: trio.Nursery, source: StaticEngagements, app_port: int, **options: int
) -> int:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    nursery.start_soon(
        partial(
            serve_udp_port,
            sock,
            source,
            agent_port=9900,
            app=("127.0.0.1", app_port),
            original_dst=("10.1.2.3", app_port),
            **options,  # type: ignore[arg-type]
        )
    )
    return port


async def ask(port: int, payload: bytes, *, timeout: float = 5) -> bytes | None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(payload)
        with trio.move_on_after(timeout):
            return bytes(await sock.recv(65535))
    return None


async def test_callers_reach_the_app_and_get_its_replies_from_the_agent_port() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await udp_echo(nursery, b"app:")
            port = await agent_port(nursery, StaticEngagements(), app)
            answers = [await ask(port, f"ping {i}".encode()) for i in range(3)]
            big = await ask(port, b"x" * 60000)
            nursery.cancel_scope.cancel()
    assert answers == [b"app:ping 0", b"app:ping 1", b"app:ping 2"]
    assert big == b"app:" + b"x" * 60000


async def test_an_engaged_udp_port_sends_each_flow_to_the_client() -> None:
    received: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        decoder = DatagramDecoder(65535)
        async with stream:
            while data := await stream.receive_some(65536):
                for datagram in decoder.feed(data):
                    received.append(datagram)
                    await stream.send_all(encode_datagram(b"laptop:" + datagram))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await udp_echo(nursery, b"app:")
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            nursery.start_soon(trio.serve_listeners, handler, [listener])
            engagement = Engagement(id="u1", container="dns", agent_port=9900)
            source = StaticEngagements(
                [engagement], handlers={"u1": ("127.0.0.1", listener.socket.getsockname()[1])}
            )
            port = await agent_port(nursery, source, app)
            answer = await ask(port, b"query")
            source.set([])  # left: the next caller's flow reaches the app again
            after = await ask(port, b"again")
            nursery.cancel_scope.cancel()
    assert (answer, received, after) == (b"laptop:query", [b"query"], b"app:again")
    assert source.opened == [("u1", ("10.1.2.3", app))]


async def test_a_flood_of_callers_is_bounded_and_the_ones_served_still_are() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await udp_echo(nursery, b"app:")
            port = await agent_port(nursery, StaticEngagements(), app, max_flows=2)
            socks = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
            for sock in socks:
                await sock.connect(("127.0.0.1", port))
            answers: list[bytes | None] = []
            for index, sock in enumerate(socks[:2]):
                await sock.send(b"first %d" % index)
                answers.append(bytes(await sock.recv(100)))
            await socks[2].send(b"third")  # a third caller while two flows are open: dropped
            with trio.move_on_after(0.5):
                answers.append(bytes(await socks[2].recv(100)))
            await socks[0].send(b"still")
            answers.append(bytes(await socks[0].recv(100)))
            for sock in socks:
                sock.close()
            nursery.cancel_scope.cancel()
    assert answers == [b"app:first 0", b"app:first 1", b"app:still"]


async def test_a_wiretap_gets_a_copy_of_each_datagram_while_the_app_answers() -> None:
    copies: list[bytes] = []
    got_copy = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        decoder = DatagramDecoder(65535)
        async with stream:
            while data := await stream.receive_some(65536):
                for datagram in decoder.feed(data):
                    copies.append(datagram)
                    got_copy.set()
                    # An answer: the agent must throw it away, never to the caller.
                    await stream.send_all(encode_datagram(b"from the wiretap"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await udp_echo(nursery, b"app:")
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            nursery.start_soon(trio.serve_listeners, handler, [listener])
            wiretap = Engagement(id="w1", container="dns", agent_port=9900, kind=WIRETAP)
            source = StaticEngagements(
                [wiretap], handlers={"w1": ("127.0.0.1", listener.socket.getsockname()[1])}
            )
            port = await agent_port(nursery, source, app)
            answer = await ask(port, b"query")
            await got_copy.wait()
            nursery.cancel_scope.cancel()
    assert (answer, copies) == (b"app:query", [b"query"])
    counters = source.wiretaps.snapshot()["w1"]
    assert (counters.connections, counters.copied_bytes) == (1, len(b"query"))


async def test_a_wiretap_with_a_response_port_gets_the_apps_replies_too() -> None:
    received: dict[int, list[bytes]] = {}

    async def recorder(nursery: trio.Nursery) -> int:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = int(listener.socket.getsockname()[1])
        got = received.setdefault(port, [])

        async def handle(stream: trio.SocketStream) -> None:
            decoder = DatagramDecoder(65535)
            async with stream:
                while data := await stream.receive_some(65536):
                    got.extend(decoder.feed(data))

        nursery.start_soon(trio.serve_listeners, handle, [listener])
        return port

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await udp_echo(nursery, b"app:")
            requests, replies = await recorder(nursery), await recorder(nursery)
            with trio.socket.socket() as closed:
                await closed.bind(("127.0.0.1", 0))
                nothing = closed.getsockname()[1]  # nothing listens there once closed
            both = Engagement(
                id="w1", container="dns", agent_port=9900, kind=WIRETAP, copy_responses=True
            )
            absent = Engagement(
                id="w2", container="dns", agent_port=9900, kind=WIRETAP, copy_responses=True
            )
            source = StaticEngagements(
                [both, absent],
                handlers={
                    "w1": ("127.0.0.1", requests),
                    "w1" + RESPONSE_KEY: ("127.0.0.1", replies),
                    "w2": ("127.0.0.1", requests),
                    "w2" + RESPONSE_KEY: ("127.0.0.1", nothing),
                },
            )
            port = await agent_port(nursery, source, app)
            answers = [await ask(port, b"query %d" % i) for i in range(2)]
            await wait_for(
                lambda: (
                    len(received[replies]) == 2
                    and len(received[requests]) == 4
                    and source.wiretaps.snapshot()["w2"].response_dropped == 2
                ),
                timeout=5,
            )
            nursery.cancel_scope.cancel()
    assert answers == [b"app:query 0", b"app:query 1"]  # the caller got the app's replies
    assert received[replies] == [b"app:query 0", b"app:query 1"]  # and w1's handler a copy
    assert sorted(received[requests]) == sorted([b"query 0", b"query 1"] * 2)
    w1, w2 = source.wiretaps.snapshot()["w1"], source.wiretaps.snapshot()["w2"]
    assert w1.response_copied_bytes == len(b"app:query 0") * 2 and w1.response_dropped == 0
    assert w2.dropped_connections == 0  # its requests were copied; only its replies failed
