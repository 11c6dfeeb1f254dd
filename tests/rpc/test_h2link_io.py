"""tele.net.h2conn and the link's byte handling: frames parsed from reads split anywhere (the
same events and windows as stock h2), gather writes the socket takes only in part, direct
delivery into a slow socket, and the bounds a misbehaving peer meets."""

from __future__ import annotations

import hashlib
import itertools
import socket
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hyperframe.frame
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.net.h2conn import Connection
from tele.net.tunnel import ResetReason
from tele.rpc.h2link import TUNNEL_STREAMS, H2Link, H2Stream, LinkBroken, LinkSettings, open_link
from tele.rpc.tunnel import splice
from tele.testing.streams import open_link_pair


def _client_bytes() -> bytes:
    """What a stock h2 client sends: preamble, SETTINGS, requests, DATA of many sizes (one
    larger than a default frame, so it is several frames), a PING, a WINDOW_UPDATE."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
    client.send_headers(1, headers)
    for size in (0, 1, 1000, 16_384, 5):
        client.send_data(1, bytes([size % 251]) * size)
    client.send_headers(3, headers, end_stream=True)
    client.ping(b"12345678")
    client.increment_flow_control_window(100_000)
    client.send_data(1, b"last", end_stream=True)
    return client.data_to_send()


def _events(conn: h2.connection.H2Connection, chunks: list[bytes]) -> list[tuple[object, ...]]:
    """The events `chunks` give, then the flow-control windows and states they leave."""
    seen: list[tuple[object, ...]] = []
    for chunk in chunks:
        for event in conn.receive_data(chunk):
            seen.append(
                (
                    type(event).__name__,
                    getattr(event, "stream_id", None),
                    getattr(event, "data", None),
                    getattr(event, "headers", None),
                    getattr(event, "flow_controlled_length", None),
                )
            )
    seen.append(("connection", conn.inbound_flow_control_window, conn.state_machine.state))
    for stream_id, stream in sorted(conn.streams.items()):
        seen.append(
            (
                stream_id,
                stream.inbound_flow_control_window,
                stream.state_machine.state,
                stream._actual_content_length,
            )
        )
    return seen


def _server(ours: bool) -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    return Connection(config) if ours else h2.connection.H2Connection(config)


WIRE = _client_bytes()
EXPECTED = _events(_server(ours=False), [WIRE])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(WIRE)), max_size=40))
def test_frames_split_anywhere_give_the_events_of_stock_h2(cuts: list[int]) -> None:
    points = sorted({0, len(WIRE), *cuts})
    chunks = [WIRE[a:b] for a, b in itertools.pairwise(points)]
    assert _events(_server(ours=True), chunks) == EXPECTED


def test_every_single_byte_read_gives_the_same_events() -> None:
    assert _events(_server(ours=True), [WIRE[i : i + 1] for i in range(len(WIRE))]) == EXPECTED


def test_plain_data_takes_the_fast_path_with_h2s_bookkeeping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[int] = []
    plain = Connection._receive_plain_data

    def spy(self: Connection, frame: hyperframe.frame.DataFrame) -> object:
        events = plain(self, frame)
        if events is not None:
            taken.append(len(frame.data))
        return events

    monkeypatch.setattr(Connection, "_receive_plain_data", spy)
    assert _events(_server(ours=True), [WIRE]) == EXPECTED  # same events and windows
    assert taken == [0, 1, 1000, 16_384, 5, 4]  # the unpadded DATA frames, END_STREAM too
    # A flow-control violation is refused on the fast path as h2 refuses it.
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    conn = _server(ours=True)
    conn.receive_data(client.data_to_send())
    conn.max_inbound_frame_size = 1 << 20  # so that the window, not the frame size, is hit
    too_much = (70_000).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    with pytest.raises(h2.exceptions.FlowControlError):
        conn.receive_data(too_much + b"x" * 70_000)


def test_our_output_is_what_stock_h2_sends() -> None:
    def run(conn: h2.connection.H2Connection) -> tuple[object, ...]:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", "a:1")])
        conn.send_data(1, memoryview(b"x" * 20_000)[:16_384])
        conn.send_data(1, bytearray(b"y" * 100))
        conn.send_data(1, b"")
        conn.send_data(1, b"z" * 7, pad_length=3)
        with pytest.raises(h2.exceptions.FlowControlError):
            conn.send_data(1, b"w" * 60_000)  # past the 64 KiB window with what went before
        with pytest.raises(h2.exceptions.FrameTooLargeError):
            conn.send_data(1, b"w" * 16_385)
        window = conn.local_flow_control_window(1)
        conn.send_data(1, b"", end_stream=True)
        with pytest.raises(h2.exceptions.ProtocolError):
            conn.send_data(1, b"late")  # after our END_STREAM
        conn.ping(b"abcdefgh")
        return conn.data_to_send(), window, conn.outbound_flow_control_window

    config = h2.config.H2Configuration(client_side=True)
    assert run(Connection(config)) == run(h2.connection.H2Connection(config))


def test_an_overlong_frame_is_refused_from_its_header() -> None:
    conn = _server(ours=True)
    conn.initiate_connection()
    conn.receive_data(WIRE[:24])  # the preamble
    # A DATA frame header announcing 1 MiB, more than the 16 KiB default, and no body yet.
    header = (1 << 20).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        conn.receive_data(header)


async def test_many_streams_through_partial_socket_writes_arrive_intact() -> None:
    # 32 KiB socket buffers: the link's gather writes are taken a piece at a time.
    payloads = [bytes([i]) * (300_000 + 7919 * i) for i in range(8)]
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery, socket_buffer=32 * 1024)
        digests: dict[int, str] = {}

        async def serve(n: int) -> None:
            stream = await incoming.receive()
            digest = hashlib.sha256()
            while chunk := await stream.receive_some():
                digest.update(chunk)
            digests[int(stream.header(":authority", "")[2:])] = digest.hexdigest()
            await stream.send_all(digest.hexdigest().encode())
            await stream.send_eof()

        async def send(n: int) -> None:
            stream = await link.open_stream([(":method", "CONNECT"), (":authority", f"s:{n}")])
            await stream.send_all(payloads[n])
            await stream.send_eof()
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
            assert answer.decode() == hashlib.sha256(payloads[n]).hexdigest()

        with trio.fail_after(30):
            async with trio.open_nursery() as inner:
                for n in range(8):
                    inner.start_soon(serve, n)
                    inner.start_soon(send, n)
        assert digests == {n: hashlib.sha256(p).hexdigest() for n, p in enumerate(payloads)}
        nursery.cancel_scope.cancel()


async def test_a_reused_send_buffer_does_not_change_what_was_sent() -> None:
    # The far end is a bare socket nobody reads yet, with small buffers: most of what
    # send_all queued is still waiting to be written when the caller changes its buffer.
    left, right = trio.socket.socketpair()
    for sock in (left, right):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    buffer = bytearray(b"A" * 30_000)
    with right:
        await _send_reused_buffer(left, right, buffer)


async def _send_reused_buffer(
    left: trio.socket.SocketType, right: trio.socket.SocketType, buffer: bytearray
) -> None:
    async with trio.open_nursery() as nursery:
        link = await nursery.start(_run_link, trio.SocketStream(left))
        stream = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
        await stream.send_all(buffer)
        buffer[:] = b"B" * 30_000
        await stream.send_all(memoryview(buffer))
        buffer[:] = b"C" * 30_000
        await stream.send_eof()
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        received = b""
        with trio.fail_after(30):
            while not received.endswith(b"B" * 100) or len(received) < 60_000:
                for event in server.receive_data(await right.recv(65536)):
                    if isinstance(event, h2.events.DataReceived):
                        received += event.data
        assert received == b"A" * 30_000 + b"B" * 30_000
        nursery.cancel_scope.cancel()


async def _run_link(
    transport: trio.SocketStream, *, task_status: trio.TaskStatus[H2Link] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_link(transport, client_side=True) as link:
        task_status.started(link)
        await link.wait_closed()


async def test_a_peer_that_closes_mid_write_breaks_the_link() -> None:
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery, socket_buffer=16 * 1024)
        stream = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
        server = await incoming.receive()
        server._link.transport.socket.close()  # type: ignore[attr-defined]
        with trio.fail_after(10), pytest.raises((LinkBroken, trio.BrokenResourceError)):
            while True:
                await stream.send_all(b"x" * 100_000)
        nursery.cancel_scope.cancel()


def _slow_socket_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A local socket pair with 8 KiB buffers: writes to it are often partial."""
    local, app = trio.socket.socketpair()
    for sock in (local, app):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    return local, app


async def _splice_first(
    incoming: trio.MemoryReceiveChannel[H2Stream],
    local: trio.socket.SocketType,
    *tasks: Callable[[], Awaitable[None]],
) -> None:
    """Run `tasks` (the tunnel's opener, the app) while the first incoming stream is spliced to
    `local`, within 60 s; the relay must end without a reset."""
    with trio.fail_after(60):
        async with trio.open_nursery() as inner:
            for task in tasks:
                inner.start_soon(task)
            server = await incoming.receive()
            async with trio.SocketStream(local) as local_stream:
                assert await splice(server, local_stream) is None


async def test_data_written_straight_to_a_slow_socket_keeps_its_order() -> None:
    # splice lets the link's reader write DATA to the local socket itself; a socket that
    # takes only part of it (small buffers, a reader taking 1 KiB at a time) must get the
    # rest through the consumer, in order.
    payload = b"".join(i.to_bytes(4, "big") for i in range(500_000))  # 2 MB, no repeats
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery, socket_buffer=64 * 1024)
        local, app = _slow_socket_pair()
        received = bytearray()

        async def client() -> None:
            stream = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])
            for start in range(0, len(payload), 100_000):
                await stream.send_all(payload[start : start + 100_000])
            await stream.send_eof()
            assert await stream.receive_some() == b""

        async def read_app() -> None:
            async with trio.SocketStream(app) as app_stream:
                while chunk := await app_stream.receive_some(1024):
                    received.extend(chunk)

        await _splice_first(incoming, local, client, read_app)
        assert bytes(received) == payload
        nursery.cancel_scope.cancel()


async def test_both_ways_at_once_through_a_socket_that_takes_the_tunnel_slowly() -> None:
    # The relay starts as one task (the link's reader writes the tunnel's bytes to the socket);
    # once the socket would not take them, that direction gets its own task, also while the
    # app keeps the relay's task busy sending the other way. Both arrive whole, in order.
    down = b"".join(i.to_bytes(4, "big") for i in range(250_000))  # 1 MB, no repeats
    up = b"".join((i * 7).to_bytes(4, "big") for i in range(250_000))
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery, socket_buffer=64 * 1024)
        local, app = _slow_socket_pair()
        from_tunnel = bytearray()
        from_app = bytearray()

        async def client() -> None:
            stream = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])

            async def send() -> None:
                for start in range(0, len(down), 100_000):
                    await stream.send_all(down[start : start + 100_000])
                await stream.send_eof()

            async with trio.open_nursery() as both:
                both.start_soon(send)
                while chunk := await stream.receive_some():
                    from_app.extend(chunk)

        async def app_side() -> None:
            async with trio.SocketStream(app) as app_stream, trio.open_nursery() as both:

                async def send() -> None:
                    await app_stream.send_all(up)
                    await app_stream.send_eof()

                both.start_soon(send)
                while chunk := await app_stream.receive_some(1024):
                    from_tunnel.extend(chunk)

        await _splice_first(incoming, local, client, app_side)
        assert bytes(from_tunnel) == down
        assert bytes(from_app) == up
        nursery.cancel_scope.cancel()


async def test_a_reset_reaches_the_opening_sides_relay_while_it_waits_for_its_socket() -> None:
    # The opening side's stream has no handler to cancel: the reset itself must wake the
    # relay's one task (waiting for the app's next bytes), which resets the app's connection.
    async with trio.open_nursery() as nursery:
        link, incoming = await open_link_pair(nursery)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        async with (
            listener,
            await trio.open_tcp_stream("127.0.0.1", port) as app,
            await listener.accept() as relay_end,
        ):
            stream = await link.open_stream([(":method", "CONNECT"), (":authority", "a:1")])

            async def peer() -> None:
                server = await incoming.receive()
                await server.send_all(b"hello")
                assert await server.receive_some() == b"hi"
                server.reset(h2.errors.ErrorCodes.CONNECT_ERROR)

            async def app_side() -> None:
                assert await app.receive_some() == b"hello"
                await app.send_all(b"hi")
                with pytest.raises(trio.BrokenResourceError):
                    await app.receive_some()  # a TCP RST

            async def relay() -> None:
                assert await splice(stream, relay_end) is ResetReason.RESET
                relay_end.socket.close()  # as the tunnel server closes it: an RST

            with trio.fail_after(10):
                async with trio.open_nursery() as inner:
                    inner.start_soon(peer)
                    inner.start_soon(app_side)
                    inner.start_soon(relay)
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_ten_thousand_streams_open_at_once_on_one_link() -> None:
    count = 10_000
    async with trio.open_nursery() as nursery:
        tunnel = LinkSettings(max_concurrent_streams=TUNNEL_STREAMS)
        link, incoming = await open_link_pair(nursery, settings=tunnel, socket_buffer=256 * 1024)
        headers = [(":method", "CONNECT"), (":authority", "a:1")]
        with trio.fail_after(120):
            streams = [await link.open_stream(headers) for _ in range(count)]
            served = [await incoming.receive() for _ in range(count)]
            assert link.active_streams == count  # all open together

            async def echo(stream: H2Stream) -> None:
                data = await stream.receive_some()
                await stream.send_all(data)
                await stream.send_eof()

            async def call(n: int, stream: H2Stream) -> None:
                await stream.send_all(n.to_bytes(4, "big"))
                await stream.send_eof()
                assert await stream.receive_some() == n.to_bytes(4, "big")
                assert await stream.receive_some() == b""
                stream.close()

            async with trio.open_nursery() as inner:
                for n, (mine, theirs) in enumerate(zip(streams, served, strict=True)):
                    inner.start_soon(echo, theirs)
                    inner.start_soon(call, n, mine)
        assert link.active_streams == 0
        nursery.cancel_scope.cancel()


async def test_a_peer_that_pings_and_never_reads_cannot_pile_up_our_answers() -> None:
    # The peer floods PINGs and reads nothing: each PING wants a PING ACK. Once our answers
    # back up, the link stops reading the peer, whose sends then block; what we hold stays
    # bounded (control frames queued, not the peer's 17 bytes times everything it can send).
    left, right = trio.socket.socketpair()
    for sock in (left, right):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    peer.initiate_connection()
    preamble = peer.data_to_send()
    for n in range(1000):
        peer.ping(n.to_bytes(8, "big"))
    burst = peer.data_to_send()  # 1,000 PING frames, sent again and again
    with right:
        async with trio.open_nursery() as nursery:
            link = await nursery.start(_run_server_link, trio.SocketStream(left))
            await right.send(preamble)
            sent = 0
            with trio.fail_after(30):
                while True:
                    try:
                        sent += right._sock.send(burst)  # type: ignore[attr-defined]
                        continue
                    except BlockingIOError:
                        pass
                    await trio.testing.wait_all_tasks_blocked()
                    try:
                        sent += right._sock.send(burst)  # type: ignore[attr-defined]
                    except BlockingIOError:
                        break  # the link stopped reading: the peer is blocked for good
            # Without the bound the link reads on and answers for ever (the loop never ends).
            # With it: at most the bound plus the answers to one read (256 KiB) are held.
            assert link._conn.control_size <= 2 * 256 * 1024 + 17 * 1000
            assert sent < 4 * 1024 * 1024
            nursery.cancel_scope.cancel()


async def _run_server_link(
    transport: trio.SocketStream, *, task_status: trio.TaskStatus[H2Link] = trio.TASK_STATUS_IGNORED
) -> None:
    async def refuse(stream: H2Stream) -> None:
        stream.reset()

    async with open_link(transport, client_side=False, handler=refuse) as link:
        task_status.started(link)
        await link.wait_closed()


async def test_a_lazy_end_stream_leaves_with_the_writers_next_pass() -> None:
    """`send_eof_now(lazy=True)` (the VIF's app EOFs) queues END_STREAM without writing it in
    the caller's step, where a plain `send_eof_now` writes it through; it still arrives."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()

    def peer_reads() -> list[h2.events.Event]:
        events = []
        while True:
            try:
                data = theirs.recv(65536)
            except BlockingIOError:
                return events
            events.extend(peer.receive_data(data))

    async def peer_sends(stream_id: int) -> None:
        """DATA the link reads (a write after a read may go through) and need not answer."""
        peer.send_data(stream_id, b"x")
        theirs.send(peer.data_to_send())
        await trio.testing.wait_all_tasks_blocked()
        peer_reads()

    def ended(events: list[h2.events.Event]) -> list[int]:
        return [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)]

    with theirs:
        async with (
            trio.open_nursery() as nursery,
            open_link(
                trio.SocketStream(trio.socket.from_stdlib_socket(ours)), client_side=True
            ) as link,
        ):
            headers = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
            first, second = [await link.open_stream(headers) for _ in range(2)]
            await trio.testing.wait_all_tasks_blocked()
            peer_reads()
            for stream in (first, second):
                peer.send_headers(stream.stream_id, [(":status", "200")])
            theirs.send(peer.data_to_send())
            await trio.testing.wait_all_tasks_blocked()
            peer_reads()

            await peer_sends(first.stream_id)
            assert first.send_eof_now(lazy=True)
            assert peer_reads() == []  # queued, not written in this step
            await trio.testing.wait_all_tasks_blocked()
            assert ended(peer_reads()) == [first.stream_id]

            await peer_sends(second.stream_id)
            assert second.send_eof_now()
            assert ended(peer_reads()) == [second.stream_id]  # written in this step
            nursery.cancel_scope.cancel()
