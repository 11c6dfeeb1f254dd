"""Tunnel streams on a real h2 link (over a socketpair) to real loopback TCP/UDP destinations:
the stream contract, many concurrent streams, flow control, half-close, resets, refusals, UDP,
keepalive."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from tele.net import tunnel as codec
from tele.net.tunnel import Destination, OpenRequest, Protocol, ResetReason
from tele.rpc.client import open_client
from tele.rpc.h2link import H2Link, H2Stream, LinkSettings, StreamReset, open_link, serve_link
from tele.rpc.method import Unary
from tele.rpc.server import Router, serve_connection
from tele.rpc.tunnel import (
    READ_SIZE,
    TunnelError,
    TunnelServer,
    connect_tcp,
    dial,
    open_now,
    reset,
    reset_reason,
    splice,
)

LOCALHOST = ipaddress.ip_address("127.0.0.1")
SESSION = "test-session"
# Most a loopback TCP connection's send + receive buffers can hold (tcp_wmem/tcp_rmem maxima).
KERNEL_BUFFER_MAX = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + int(
    Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2]
)


@asynccontextmanager
async def tunnel_link(
    server: TunnelServer | None = None,
    *,
    client_settings: LinkSettings | None = None,
    server_settings: LinkSettings | None = None,
) -> AsyncIterator[H2Link]:
    """A client link whose peer serves tunnel OPENs with `server`."""
    server = server or TunnelServer()
    a, b = trio.socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_link(
                trio.SocketStream(b),
                server.handle,
                settings=server_settings,
                prepare=server.prepare,
            )
        )
        async with open_link(
            trio.SocketStream(a), client_side=True, settings=client_settings
        ) as link:
            yield link
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tcp_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[Destination]:
    """A loopback TCP server running `handler` per connection; yields its destination."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1", backlog=2048)
        )
        port = listeners[0].socket.getsockname()[1]
        yield Destination(Protocol.TCP, LOCALHOST, port)
        nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(256 * 1024):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def test_half_closeable_stream_contract() -> None:
    """A tunnel stream behaves as a trio HalfCloseableStream end to end: the pair is the dialed
    tunnel stream and the connection the destination accepted."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    destination = Destination(Protocol.TCP, LOCALHOST, port)
    async with listener, tunnel_link() as link:

        async def make_pair() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
            stream = await dial(link, destination, session=SESSION)
            accepted = await listener.accept()
            return stream, accepted

        with trio.fail_after(30):
            await trio.testing.check_half_closeable_stream(make_pair, None)


async def _echo_streams(count: int, size: int) -> None:
    async with tcp_server(echo) as destination, tunnel_link() as link:

        async def one(index: int) -> None:
            payload = (index.to_bytes(4, "big") + os.urandom(60)) * (size // 64)
            stream = await dial(link, destination, session=SESSION)
            digest = hashlib.sha256()
            received = 0

            async def reader() -> None:
                nonlocal received
                while chunk := await stream.receive_some():
                    digest.update(chunk)
                    received += len(chunk)

            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await stream.send_all(payload)
                await stream.send_eof()
            assert received == len(payload)
            assert digest.digest() == hashlib.sha256(payload).digest()

        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
        assert link.active_streams == 0


async def test_many_concurrent_streams_echo_intact() -> None:
    with trio.fail_after(30):
        await _echo_streams(200, 128 * 1024)


@pytest.mark.slow
async def test_thousand_streams_echo_one_mib_each() -> None:
    with trio.fail_after(120):
        await _echo_streams(1000, 1024 * 1024)


async def test_slow_reader_holds_at_most_a_window_and_slows_only_itself() -> None:
    """The destination writes without end; the client reads nothing. What piles up on the client
    is bounded by the stream window, the server relay stops reading, and another stream on the
    same link still flows."""
    window = 256 * 1024
    settings = LinkSettings(stream_window=window, connection_window=16 * window)
    written = 0

    async def firehose(stream: trio.SocketStream) -> None:
        nonlocal written
        chunk = b"x" * 65536
        async with stream:
            with trio.move_on_after(30), contextlib.suppress(trio.BrokenResourceError):
                while True:  # until the client's reset arrives as a TCP RST
                    await stream.send_all(chunk)
                    written += len(chunk)

    async with (
        tcp_server(firehose) as hose,
        tcp_server(echo) as echoer,
        tunnel_link(client_settings=settings) as link,
    ):
        stalled = await dial(link, hose, session=SESSION)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        before = written
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert written == before, "the destination keeps writing: back-pressure is missing"
        assert stalled._buffered <= window
        # Beyond the window and one relay read, the rest can only sit in the two kernel socket
        # buffers between the destination and the server relay.
        kernel = KERNEL_BUFFER_MAX
        assert written <= window + READ_SIZE + kernel

        async with await dial(link, echoer, session=SESSION) as other:
            await other.send_all(b"still moving" * 10_000)
            await other.send_eof()
            got = bytearray()
            while chunk := await other.receive_some():
                got += chunk
            assert bytes(got) == b"still moving" * 10_000
        # Reading the stalled stream starts the flow again.
        assert len(await stalled.receive_some()) > 0
        reset(stalled, ResetReason.CANCELLED)


async def test_half_close_both_ways() -> None:
    results: list[bytes] = []
    both_read = trio.Event()

    def record(data: bytes) -> None:
        results.append(data)
        if len(results) == 2:
            both_read.set()

    async def half_closer(stream: trio.SocketStream) -> None:
        # Reads the client's whole request to EOF, then answers and half-closes.
        async with stream:
            request = bytearray()
            while chunk := await stream.receive_some():
                request += chunk
            record(bytes(request))
            await stream.send_all(b"reply to " + bytes(request))
            await stream.send_eof()

    async def server_first(stream: trio.SocketStream) -> None:
        # Half-closes first, then keeps reading what the client still sends.
        async with stream:
            await stream.send_all(b"banner")
            await stream.send_eof()
            data = bytearray()
            while chunk := await stream.receive_some():
                data += chunk
            record(bytes(data))

    async with (
        tcp_server(half_closer) as first,
        tcp_server(server_first) as second,
        tunnel_link() as link,
    ):
        stream = await dial(link, first, session=SESSION)
        await stream.send_all(b"request")
        await stream.send_eof()
        reply = bytearray()
        while chunk := await stream.receive_some():
            reply += chunk
        assert bytes(reply) == b"reply to request"
        await stream.aclose()

        stream = await dial(link, second, session=SESSION)
        banner = bytearray()
        while chunk := await stream.receive_some():
            banner += chunk
        assert bytes(banner) == b"banner"
        await stream.send_all(b"after your eof")
        await stream.send_eof()
        await stream.aclose()
        with trio.fail_after(5):
            await both_read.wait()
    assert results == [b"request", b"after your eof"]


async def test_resets_cross_the_tunnel_both_ways() -> None:
    seen: list[str] = []
    waiter_done = trio.Event()

    async def resetter(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    async def waiter(stream: trio.SocketStream) -> None:
        try:
            while await stream.receive_some():
                pass
            seen.append("eof")
        except trio.BrokenResourceError as exc:
            seen.append(type(exc.__cause__).__name__)
        finally:
            waiter_done.set()

    async with tcp_server(resetter) as resets, tcp_server(waiter) as waits, tunnel_link() as link:
        stream = await dial(link, resets, session=SESSION)
        await stream.send_all(b"go")
        with pytest.raises(StreamReset) as info:
            while await stream.receive_some():
                pass
        assert reset_reason(info.value) is ResetReason.RESET

        stream = await dial(link, waits, session=SESSION)
        await stream.send_all(b"data")
        stream.reset(codec.reason_to_code(ResetReason.CANCELLED))
        with trio.fail_after(5):
            await waiter_done.wait()
    assert seen == ["ConnectionResetError"]


async def test_refusals_carry_their_reason() -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()

    def policy(request: OpenRequest) -> ResetReason | None:
        return ResetReason.POLICY if request.destination.port == 1 else None

    async with tunnel_link(TunnelServer(policy=policy)) as link:
        refused = Destination(Protocol.TCP, LOCALHOST, closed_port)
        with pytest.raises(TunnelError, match="refused the connection") as info:
            await dial(link, refused, session=SESSION)
        assert info.value.reason is ResetReason.REFUSED
        with pytest.raises(TunnelError, match="policy") as info:
            await dial(link, Destination(Protocol.TCP, LOCALHOST, 1), session=SESSION)
        assert info.value.reason is ResetReason.POLICY
        with pytest.raises(TunnelError) as info:
            await dial(link, refused, session=SESSION, dial_id="x1")
        assert info.value.reason is ResetReason.POLICY  # no dial-back handler here

        # A malformed OPEN gets REFUSE(protocol) and the link goes on.
        bad = await link.open_stream([(":method", "CONNECT"), (":authority", "example.com:80")])
        response = codec.decode_response(await bad.receive_response())
        assert response == codec.Refuse(ResetReason.PROTOCOL)
        assert link.is_open
        # So does an early OPEN whose tele-early is not "1"; the next OPEN is served.
        async with tcp_server(echo) as destination:
            headers = OpenRequest(destination, SESSION).to_headers()
            bad = await link.open_stream([*headers, ("tele-early", "yes")])
            response = codec.decode_response(await bad.receive_response())
            assert response == codec.Refuse(ResetReason.PROTOCOL)
            async with await dial(link, destination, session=SESSION) as good:
                await good.send_all(b"still served")
                assert await good.receive_some() == b"still served"
        assert link.is_open


async def test_optimistic_open_sends_before_accept_and_refusals_keep_their_reason() -> None:
    """An optimistic OPEN returns before ACCEPT and its first bytes reach the destination; a
    refused one raises the refusal's reason from the next receive (and send), and `splice`
    turns it into a reset of the local connection with that reason."""
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    refused = Destination(Protocol.TCP, LOCALHOST, closed.getsockname()[1])
    closed.close()
    connector_entered = trio.Event()
    release_dial = trio.Event()

    async def gated_connect(destination: Destination) -> trio.SocketStream:
        connector_entered.set()
        await release_dial.wait()  # hold the dial: ACCEPT cannot have been sent before this
        return await connect_tcp(destination)

    server = TunnelServer(connector=gated_connect)
    async with tcp_server(echo) as destination, tunnel_link(server) as link:
        with trio.fail_after(10):
            stream = await dial(link, destination, session=SESSION, optimistic=True)
            await stream.send_all(b"sent before accept")
            await stream.send_eof()
            await connector_entered.wait()
            assert stream.response_headers is None
            release_dial.set()
            received = b""
            while chunk := await stream.receive_some():
                received += chunk
            assert received == b"sent before accept"
            await stream.aclose()

            stream = await dial(link, refused, session=SESSION, optimistic=True)
            await stream.send_all(b"nobody will read this")
            release_dial.set()
            with pytest.raises(TunnelError, match="refused the connection") as info:
                await stream.receive_some()
            assert info.value.reason is ResetReason.REFUSED
            assert reset_reason(info.value) is ResetReason.REFUSED
            with pytest.raises(TunnelError):
                await stream.send_all(b"more")
            await stream.aclose()

            # Through splice, as a local relay uses it: the local peer sees a reset.
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            port = listener.socket.getsockname()[1]
            stream = await dial(link, refused, session=SESSION, optimistic=True)
            async with listener, await trio.open_tcp_stream("127.0.0.1", port) as app:
                async with await listener.accept() as relay_end:
                    outcome = await splice(stream, relay_end)
                assert outcome is ResetReason.REFUSED
                with pytest.raises(trio.BrokenResourceError):
                    await app.receive_some()  # the relay end was closed with a reset
            stream.close()
        assert link.is_open


async def test_early_open_gets_its_accept_with_the_first_data() -> None:
    """An optimistic (early) OPEN waits for nothing, so the server sends no ACCEPT of its own
    once its dial is up: the `:status 200` rides on the destination's first bytes (one write
    and one wake-up of the opener less per connection). A plain OPEN still gets ACCEPT first."""
    accepted = trio.Event()
    speak = trio.Event()

    async def speaks_later(stream: trio.SocketStream) -> None:
        async with stream:
            accepted.set()
            await speak.wait()
            await stream.send_all(b"hello")
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some():
                    pass

    async with tcp_server(speaks_later) as destination, tunnel_link() as link:
        with trio.fail_after(10):
            stream = await dial(link, destination, session=SESSION, optimistic=True)
            await accepted.wait()
            for _ in range(3):  # the server's handler has had its turns since its dial
                await link.ping()
            assert stream.response_headers is None
            speak.set()
            assert await stream.receive_some() == b"hello"
            assert stream.response_headers == codec.Accept().to_headers()
            await stream.aclose()

            accepted, speak = trio.Event(), trio.Event()
            plain = await dial(link, destination, session=SESSION)  # returns on ACCEPT
            assert plain.response_headers == codec.Accept().to_headers()
            await accepted.wait()
            speak.set()
            assert await plain.receive_some() == b"hello"
            await plain.aclose()


async def test_dial_timeout_and_overload(autojump_clock: trio.testing.MockClock) -> None:
    entered = trio.Event()

    async def black_hole(destination: Destination) -> trio.SocketStream:
        entered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = TunnelServer(connector=black_hole, dial_timeout=10, max_streams=1)
    async with tunnel_link(server) as link:
        destination = Destination(Protocol.TCP, LOCALHOST, 9)
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                with pytest.raises(TunnelError) as info:
                    await dial(link, destination, session=SESSION)
                assert info.value.reason is ResetReason.TIMEOUT

            nursery.start_soon(first)
            await entered.wait()
            with pytest.raises(TunnelError) as info:
                await dial(link, destination, session=SESSION)
            assert info.value.reason is ResetReason.OVERLOADED
        assert trio.current_time() >= 10


async def test_dial_back_reaches_its_handler() -> None:
    got: list[OpenRequest] = []

    async def dial_back(request: OpenRequest, stream: H2Stream) -> None:
        got.append(request)
        await stream.send_response(codec.Accept().to_headers())
        await stream.send_all(b"spliced")
        await stream.send_eof()

    async with tunnel_link(TunnelServer(dial_back=dial_back)) as link:
        destination = Destination(Protocol.TCP, LOCALHOST, 8080)
        stream = await dial(link, destination, session=SESSION, dial_id="engagement-7")
        assert await stream.receive_some() == b"spliced"
        await stream.aclose()
    assert got == [OpenRequest(destination, SESSION, "engagement-7")]


async def test_udp_datagrams_round_trip_and_limits() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        await udp.bind(("127.0.0.1", 0))
        destination = Destination(Protocol.UDP, LOCALHOST, udp.getsockname()[1])

        async def udp_echo() -> None:
            while True:
                data, peer = await udp.recvfrom(65535)
                await udp.sendto(data.upper(), peer)

        async with trio.open_nursery() as nursery, tunnel_link() as link:
            nursery.start_soon(udp_echo)
            stream = await dial(link, destination, session=SESSION)
            datagrams = [b"", b"a", b"dns query", b"z" * 60_000]
            await stream.send_all(b"".join(codec.encode_datagram(d) for d in datagrams))
            decoder = codec.DatagramDecoder()
            replies: list[bytes] = []
            with trio.fail_after(5):
                while len(replies) < len(datagrams):
                    replies += decoder.feed(await stream.receive_some())
            # UDP may reorder nothing on loopback, but it may drop the empty datagram's echo
            # ordering relative to others only in theory: compare as multisets.
            assert sorted(replies) == sorted(d.upper() for d in datagrams)

            # Broken framing (a truncated datagram at the end) resets the flow with PROTOCOL.
            await stream.send_all(b"\x00\x10abc")
            await stream.send_eof()
            with pytest.raises(StreamReset) as info:
                while True:
                    await stream.receive_some()
            assert reset_reason(info.value) is ResetReason.PROTOCOL
            nursery.cancel_scope.cancel()


async def test_udp_to_a_closed_port_is_refused() -> None:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with tunnel_link() as link:
        stream = await dial(link, Destination(Protocol.UDP, LOCALHOST, port), session=SESSION)
        await stream.send_all(codec.encode_datagram(b"anyone?"))
        with pytest.raises(StreamReset) as info, trio.fail_after(5):
            while True:
                await stream.receive_some()
        assert reset_reason(info.value) is ResetReason.REFUSED


async def test_keepalive_detects_a_silent_peer(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.socket.socketpair()
    silent = trio.SocketStream(b)
    settings = LinkSettings(keepalive_interval=5, keepalive_timeout=3)

    async def swallow() -> None:
        while await silent.receive_some():
            pass  # reads the client's frames, never answers: a dead path

    async with silent, trio.open_nursery() as nursery:
        nursery.start_soon(swallow)
        async with open_link(trio.SocketStream(a), client_side=True, settings=settings) as link:
            await link.wait_closed()
            assert "keepalive" in (link.failure or "")
            assert trio.current_time() == pytest.approx(8, abs=0.5)
            with pytest.raises(TunnelError, match="no tunnel"):
                await dial(link, Destination(Protocol.TCP, LOCALHOST, 80), session=SESSION)
        nursery.cancel_scope.cancel()


async def test_keepalive_keeps_a_live_link(autojump_clock: trio.testing.MockClock) -> None:
    settings = LinkSettings(keepalive_interval=5, keepalive_timeout=3)
    async with tcp_server(echo) as destination, tunnel_link(client_settings=settings) as link:
        await trio.sleep(60)  # virtual time: a dozen keepalive rounds
        assert link.is_open
        async with await dial(link, destination, session=SESSION) as stream:
            await stream.send_all(b"alive")
            assert await stream.receive_some() == b"alive"


class Note(msgspec.Struct, frozen=True):
    text: str


NOTE = Unary("/test.v1/Note", Note, Note)


async def test_rpc_and_tunnel_share_one_link() -> None:
    """The manager's router serves RPC calls and hands CONNECT streams to the tunnel server:
    both run at once on one h2 connection."""
    router = Router()

    async def note(request: Note) -> Note:
        return Note(request.text.upper())

    router.unary(NOTE, note)
    tunnels = TunnelServer()
    router.raw(TunnelServer.matches, tunnels.handle)
    a, b = trio.socket.socketpair()
    async with tcp_server(echo) as destination, trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, trio.SocketStream(b), router)
        async with open_client(trio.SocketStream(a)) as client:
            stream = await dial(client.link, destination, session=SESSION)
            await stream.send_all(b"bytes")
            assert await client.call(NOTE, Note("rpc"), timeout=5) == Note("RPC")
            assert await stream.receive_some() == b"bytes"
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_optimistic_dial_queues_its_open_without_a_schedule_point() -> None:
    """With room on the link, an optimistic dial queues the OPEN in its caller's step (the VIF's
    new connection parks right after it); at the peer's stream limit it waits for room, and
    `open_now` (no schedule point at all) answers None."""
    settings = LinkSettings(max_concurrent_streams=1)
    async with tcp_server(echo) as destination, tunnel_link(server_settings=settings) as link:
        with trio.fail_after(10):
            await link.ping()  # the peer's SETTINGS (its limit of 1) have arrived
            with trio.testing.assert_no_checkpoints():
                first = await dial(link, destination, session=SESSION, optimistic=True)
            await first.send_all(b"one")
            assert await first.receive_some() == b"one"
            assert open_now(link, destination, session=SESSION) is None  # at the limit
            second_open = trio.Event()

            async def second() -> None:
                stream = await dial(link, destination, session=SESSION, optimistic=True)
                second_open.set()
                await stream.send_all(b"two")
                assert await stream.receive_some() == b"two"
                await stream.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()
                assert not second_open.is_set()  # no room until the first stream ends
                await first.send_eof()
                assert await first.receive_some() == b""
                await first.aclose()


class _Arriving:
    """What `TunnelServer.prepare` sees of a stream as it arrives (the link calls it with the
    H2Stream before its handler task exists)."""

    def __init__(self, request: OpenRequest) -> None:
        self.request_headers = request.to_headers()
        self.prepared: object = None


def _listener() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    return listener


def test_an_open_is_dialed_as_it_arrives() -> None:
    """The SYN leaves in the link reader's step: the destination has the connection to accept
    before any handler runs; a dial no handler takes ends with a reset."""
    with _listener() as listener:
        port = listener.getsockname()[1]
        arriving = _Arriving(OpenRequest(Destination(Protocol.TCP, LOCALHOST, port), SESSION))
        TunnelServer().prepare(arriving)  # type: ignore[arg-type]
        prepared: Any = arriving.prepared
        assert prepared.verdict is None and prepared.dial is not None
        accepted, _ = listener.accept()  # no wait: loopback answered within connect_ex
        with accepted:
            prepared.dial.abort()
            with pytest.raises(ConnectionResetError):
                accepted.recv(1)


def test_an_open_the_policy_refuses_is_not_dialed() -> None:
    with _listener() as listener:
        port = listener.getsockname()[1]
        refused = _Arriving(OpenRequest(Destination(Protocol.TCP, LOCALHOST, port), SESSION))
        server = TunnelServer(policy=lambda request: ResetReason.POLICY)
        server.prepare(refused)  # type: ignore[arg-type]
        prepared: Any = refused.prepared
        assert (prepared.verdict, prepared.dial) == (ResetReason.POLICY, None)
        # A connector of its own (the manager's for agents' file servers) dials in the handler.
        custom = TunnelServer(connector=connect_tcp, plain=lambda d: False)
        other = _Arriving(OpenRequest(Destination(Protocol.TCP, LOCALHOST, port), SESSION))
        custom.prepare(other)  # type: ignore[arg-type]
        assert getattr(other.prepared, "dial", "unset") is None
        with pytest.raises(BlockingIOError):
            listener.accept()


async def test_a_refused_prepared_open_reaches_the_opener_once() -> None:
    """The policy is asked once, as the OPEN arrives; its refusal is what the opener gets."""
    asked: list[Destination] = []

    def policy(request: OpenRequest) -> ResetReason | None:
        asked.append(request.destination)
        return ResetReason.POLICY

    async with tunnel_link(TunnelServer(policy=policy)) as link:
        with pytest.raises(TunnelError, match="policy"):
            await dial(link, Destination(Protocol.TCP, LOCALHOST, 1), session=SESSION)
    assert asked == [Destination(Protocol.TCP, LOCALHOST, 1)]
