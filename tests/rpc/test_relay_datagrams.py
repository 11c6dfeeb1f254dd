"""tele.rpc.tunnel.relay_datagrams, the one UDP-over-tunnel relay (the tunnel server, the
daemon's UDP forwarders and the VIF use it), driven over an in-memory tunnel with a mock clock;
and relay_peer_datagrams, its form for one peer of an unconnected UDP socket."""

from __future__ import annotations

import errno
import socket

import pytest
import trio
import trio.testing

from tele.net.tunnel import MAX_DATAGRAM, DatagramDecoder, ResetReason, encode_datagram
from tele.rpc.tunnel import relay_datagrams, relay_peer_datagrams


class Local:
    """The local side of a flow: datagrams to send into the tunnel, and those delivered."""

    def __init__(self) -> None:
        self.send, self.queue = trio.open_memory_channel[bytes](8)
        self.delivered: list[bytes] = []

    async def receive(self) -> bytes | None:
        try:
            return await self.queue.receive()
        except trio.EndOfChannel:
            return None

    async def deliver(self, datagram: bytes) -> None:
        self.delivered.append(datagram)


async def read_datagrams(stream: trio.abc.ReceiveStream, count: int) -> list[bytes]:
    decoder = DatagramDecoder(MAX_DATAGRAM)
    got: list[bytes] = []
    while len(got) < count:
        data = await stream.receive_some()
        assert data, "the tunnel ended early"
        got += decoder.feed(data)
    return got


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def run_relay(
    nursery: trio.Nursery,
    tunnel: trio.abc.HalfCloseableStream,
    local: Local,
    result: list[ResetReason | None],
    *,
    idle_timeout: float,
    serving: bool = False,
) -> trio.Event:
    done = trio.Event()

    async def run() -> None:
        reason = await relay_datagrams(
            tunnel,
            local.receive,
            local.deliver,
            name="test",
            idle_timeout=idle_timeout,
            serving=serving,
        )
        result.append(reason)
        done.set()

    nursery.start_soon(run)
    return done


async def test_the_dialing_side_relays_both_ways_and_ends_when_the_tunnel_half_closes() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    local, result = Local(), []
    async with trio.open_nursery() as nursery:
        done = await run_relay(nursery, ours, local, result, idle_timeout=60.0)
        await local.send.send(b"ping")
        await local.send.send(b"")
        assert await read_datagrams(theirs, 2) == [b"ping", b""]
        await theirs.send_all(encode_datagram(b"pong") + encode_datagram(b"x" * 1000))
        await theirs.send_eof()
        await done.wait()
    assert local.delivered == [b"pong", b"x" * 1000]
    assert result == [None]


async def test_the_dialing_side_ends_an_idle_flow(mock_clock: trio.testing.MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    local, result = Local(), []
    async with trio.open_nursery() as nursery:
        done = await run_relay(nursery, ours, local, result, idle_timeout=30.0)
        await local.send.send(b"one")
        assert await read_datagrams(theirs, 1) == [b"one"]
        start = trio.current_time()
        await done.wait()
    assert trio.current_time() - start == pytest.approx(30.0)
    assert result == [None]


async def test_the_serving_side_answers_after_the_half_close_then_half_closes_when_idle(
    mock_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    local, result = Local(), []
    async with trio.open_nursery() as nursery:
        done = await run_relay(nursery, ours, local, result, idle_timeout=30.0, serving=True)
        await theirs.send_all(encode_datagram(b"query"))
        await theirs.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        assert local.delivered == [b"query"]
        await local.send.send(b"answer")  # after the dialer's half-close: still relayed
        assert await read_datagrams(theirs, 1) == [b"answer"]
        await done.wait()
        assert await theirs.receive_some() == b""  # idle: the server half-closed
    assert result == [None]


async def test_a_malformed_datagram_stream_ends_the_flow_as_a_protocol_error() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    local, result = Local(), []
    async with trio.open_nursery() as nursery:
        done = await run_relay(nursery, ours, local, result, idle_timeout=60.0, serving=True)
        await theirs.send_all(encode_datagram(b"fine") + b"\xff\xff\xff")  # cut short
        await theirs.send_eof()
        await done.wait()
    assert local.delivered == [b"fine"]
    assert result == [ResetReason.PROTOCOL]


async def test_an_oserror_on_the_local_side_ends_the_flow_with_its_reason() -> None:
    ours, _theirs = trio.testing.memory_stream_pair()

    async def refused() -> bytes | None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")  # ICMP port unreachable

    async def deliver(datagram: bytes) -> None:
        raise AssertionError

    reason = await relay_datagrams(ours, refused, deliver, name="test", idle_timeout=60.0)
    assert reason is ResetReason.REFUSED


async def test_a_peer_flow_relays_the_queue_into_the_tunnel_and_the_replies_to_the_peer() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    send, queue = trio.open_memory_channel[bytes](8)
    with (
        trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as agent,
        trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
    ):
        await agent.bind(("127.0.0.1", 0))
        await peer.bind(("127.0.0.1", 0))
        result: list[ResetReason | None] = []
        replied: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                result.append(
                    await relay_peer_datagrams(
                        ours,
                        agent,
                        peer.getsockname(),
                        queue,
                        name="test",
                        idle_timeout=60.0,
                        sent=replied.append,
                    )
                )

            nursery.start_soon(run)
            await send.send(b"ping")
            assert await read_datagrams(theirs, 1) == [b"ping"]
            await theirs.send_all(encode_datagram(b"pong"))
            with trio.fail_after(10):
                reply, source = await peer.recvfrom(MAX_DATAGRAM)
            assert (reply, source) == (b"pong", agent.getsockname())
            await send.aclose()  # the peer's flow ends: so does the relay
    assert replied == [b"pong"]  # once the peer has it (a wiretap copies it then)
    assert result == [None]


async def test_a_peer_flow_without_a_socket_drops_the_replies() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    send, queue = trio.open_memory_channel[bytes](8)
    result: list[ResetReason | None] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            result.append(
                await relay_peer_datagrams(
                    ours, None, ("127.0.0.1", 9), queue, name="test", idle_timeout=60.0
                )
            )

        nursery.start_soon(run)
        await send.send(b"copy")
        assert await read_datagrams(theirs, 1) == [b"copy"]
        await theirs.send_all(encode_datagram(b"answer nobody wants"))
        await theirs.send_eof()
    assert result == [None]
