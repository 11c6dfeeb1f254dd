"""H2Stream as a trio stream: the generic stream checks, flow control and link failure."""

from __future__ import annotations

import hashlib

import trio
import trio.testing

from tele.rpc.h2link import LinkBroken, LinkSettings, StreamReset
from tele.testing.streams import h2_stream_pair, open_link_pair


async def test_h2_stream_passes_trio_two_way_checks() -> None:
    async with trio.open_nursery() as nursery:

        async def make() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
            return await h2_stream_pair(nursery)

        await trio.testing.check_half_closeable_stream(make, None)
        nursery.cancel_scope.cancel()


async def test_bulk_transfer_both_ways_with_checksums() -> None:
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB, larger than one stream window
    async with trio.open_nursery() as nursery:
        client, server = await h2_stream_pair(nursery)

        async def pump(stream: trio.abc.HalfCloseableStream) -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        async def drain(stream: trio.abc.HalfCloseableStream) -> str:
            digest = hashlib.sha256()
            while chunk := await stream.receive_some():
                digest.update(chunk)
            return digest.hexdigest()

        results: list[str] = []

        async def drain_into(stream: trio.abc.HalfCloseableStream) -> None:
            results.append(await drain(stream))

        async with trio.open_nursery() as inner:
            inner.start_soon(pump, client)
            inner.start_soon(pump, server)
            inner.start_soon(drain_into, client)
            inner.start_soon(drain_into, server)
        assert results == [hashlib.sha256(payload).hexdigest()] * 2
        nursery.cancel_scope.cancel()


async def test_slow_reader_holds_back_its_sender_only() -> None:
    settings = LinkSettings(stream_window=64 * 1024, connection_window=1024 * 1024)
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery, settings=settings)
        slow_client = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
        slow_server = await incoming.receive()
        fast_client = await link.open_stream([(":method", "CONNECT"), (":authority", "b:1")])
        fast_server = await incoming.receive()
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await slow_client.send_all(b"x" * 16384)
                sent += 16384

        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        # The sender stopped at the stream window: nothing read, nothing more accepted.
        assert sent <= settings.stream_window
        assert slow_server._buffered <= settings.stream_window
        # The other stream on the same link is not held back.
        nursery.start_soon(fast_client.send_all, b"y" * 100_000)
        got = 0
        while got < 100_000:
            got += len(await fast_server.receive_some())
        # Reading the slow stream lets its sender go on.
        before = sent
        await slow_server.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert sent > before
        nursery.cancel_scope.cancel()


async def test_reset_reaches_the_peer_with_its_code() -> None:
    async with trio.open_nursery() as nursery:
        client, server = await h2_stream_pair(nursery)
        client.reset(0x8)  # CANCEL
        with trio.fail_after(5):
            try:
                await server.receive_some()
            except StreamReset as exc:
                assert exc.error_code == 0x8
            else:
                raise AssertionError("expected StreamReset")
        nursery.cancel_scope.cancel()


async def test_closed_transport_breaks_every_stream() -> None:
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery)
        stream = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
        await incoming.receive()
        await link.transport.aclose()
        with trio.fail_after(5):
            try:
                await stream.receive_some()
            except LinkBroken:
                pass
            else:
                raise AssertionError("expected LinkBroken")
        assert link.failure is not None
        nursery.cancel_scope.cancel()


async def test_ping_round_trip_and_keepalive_failure() -> None:
    async with trio.open_nursery() as nursery:
        link, _ = await open_link_pair(nursery)
        assert await link.ping() >= 0
        nursery.cancel_scope.cancel()


async def test_keepalive_fails_a_silent_link(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    # A peer that accepts bytes but never answers: the transport's other end is never read.
    left, right = trio.testing.memory_stream_pair()
    from tele.rpc.h2link import open_link

    settings = LinkSettings(keepalive_interval=5, keepalive_timeout=3)
    async with open_link(left, client_side=True, settings=settings) as link:
        with trio.fail_after(60):
            await link.wait_closed()
        assert link.failure is not None and "keepalive" in link.failure
    await right.aclose()


async def test_stream_limit_holds_while_closed_streams_are_swept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Open streams are counted cheaply (the streams h2 holds, closed ones included, bound the
    count), yet the peer's limit is exact: with a limit of 8, hundreds of streams opened and
    finished one after another never trip it, and a 9th concurrent one waits for a free slot."""
    settings = LinkSettings(max_concurrent_streams=8)
    headers = [(":method", "CONNECT"), (":authority", "a:1")]
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery, settings=settings)
        with trio.fail_after(20):
            for _ in range(300):
                client = await link.open_stream(headers)
                server = await incoming.receive()
                await client.send_eof()
                await server.send_eof()
                assert await client.receive_some() == b""
                assert await server.receive_some() == b""
                client.close()
                server.close()
            held = [await link.open_stream(headers) for _ in range(8)]
            servers = [await incoming.receive() for _ in range(8)]
            with trio.move_on_after(0.2) as blocked:
                await link.open_stream(headers)
            assert blocked.cancelled_caught  # the 9th waits for the peer's limit
            held[0].reset()
            ninth = await link.open_stream(headers)
            assert (await incoming.receive()).stream_id == ninth.stream_id
            assert link.is_open
        for stream in [*held, *servers]:
            stream.close()
        nursery.cancel_scope.cancel()


async def test_an_empty_data_frame_is_not_read_as_the_end_of_the_stream() -> None:
    # A zero-length DATA frame is legal (RFC 9113 6.1); to a trio stream's reader an empty
    # read means EOF, which only END_STREAM may say.
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery)
        client = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
        server = await incoming.receive()
        link._conn.send_data(client.stream_id, b"")
        link._kick_writer()
        await link.ping()  # its answer comes after the peer took the empty frame
        got: list[bytes] = []

        async def read() -> None:
            got.append(await server.receive_some())

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # still waiting for data
        await client.send_all(b"after")
        await client.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b"after"]
        assert await server.receive_some() == b""
        nursery.cancel_scope.cancel()


async def test_a_callable_sink_takes_data_while_the_reader_waits_and_the_rest_comes_in_order() -> (
    None
):
    taken: list[bytes] = []

    def sink(data: bytes) -> int:  # takes at most 3 bytes of each DATA frame, as a full buffer
        taken.append(data[:3])
        return min(3, len(data))

    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery)
        stream = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
        server = await incoming.receive()
        await server.send_response([(":status", "200")])
        await stream.receive_response()
        stream.deliver_to(sink)
        got: list[bytes] = []

        async def read() -> None:
            while data := await stream.receive_some():
                got.append(data)

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await server.send_all(b"abcdefgh")  # the reader is parked: the sink gets a first go
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [b"abc"] and b"".join(got) == b"defgh"
        stream.deliver_to(None)
        await server.send_all(b"ijk")
        await server.send_eof()
        with trio.fail_after(5):
            while b"".join(got) != b"defghijk":
                await trio.testing.wait_all_tasks_blocked()
        assert taken == [b"abc"]  # stopped: nothing more went to the sink
        nursery.cancel_scope.cancel()


async def test_send_now_queues_what_the_window_allows_and_nothing_after_eof() -> None:
    window = 64 * 1024
    settings = LinkSettings(stream_window=window, connection_window=1024 * 1024)
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery, settings=settings)
        client = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
        server = await incoming.receive()
        assert client.send_now(b"hello ") == 6
        data = bytes(range(256)) * 512  # 128 KiB: more than the peer's stream window
        taken = client.send_now(data)
        assert taken == window - 6
        assert client.send_now(data[taken:]) == 0  # no window left: the caller's task waits
        received = b""
        with trio.fail_after(5):
            while len(received) < window:
                received += await server.receive_some()
        assert received == b"hello " + data[:taken]
        await client.send_eof()
        assert client.send_now(b"late") == 0  # a send would raise: left to the caller's task
        nursery.cancel_scope.cancel()
