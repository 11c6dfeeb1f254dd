"""SPDY/3.1 framing (sans-IO): a client and a server `Connection` talking plain bytes; the limits
a hostile peer meets (zlib bomb, long frames, too many streams, data past the window); and
fuzzing that the decoder only ever raises its own protocol error."""

from __future__ import annotations

import hashlib
import struct
import urllib.parse
import zlib
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.sandbox.apiserver import spdy, spdystreaming
from tele.sandbox.apiserver.spdysession import Session


def _pair() -> tuple[spdy.Connection, spdy.Connection]:
    return spdy.Connection(server=False), spdy.Connection(server=True)


def _pump(src: spdy.Connection, dst: spdy.Connection) -> list[spdy.Event]:
    dst.receive_data(src.data_to_send())
    return dst.events()


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8003, kind, (flags << 24) | len(payload)) + payload


def _syn_stream(stream_id: int, block: bytes, flags: int = 0) -> bytes:
    return _control(spdy.SYN_STREAM, flags, struct.pack(">IIBB", stream_id, 0, 0, 0) + block)


def test_dictionary_is_the_specs() -> None:
    # sha256 of the 1423-byte dictionary of SPDY/3 (as Go's spdy package carries it).
    assert len(spdy.DICTIONARY) == 1423
    assert (
        hashlib.sha256(spdy.DICTIONARY).hexdigest()
        == "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
    )


def test_streams_headers_data_and_fin_in_both_directions() -> None:
    client, server = _pair()
    sid = client.open_stream([("streamtype", "data"), ("port", "80"), ("requestid", "0")])
    sid2 = client.open_stream([("streamtype", "error"), ("port", "80"), ("requestid", "0")])
    events = _pump(client, server)
    assert [type(e) for e in events] == [spdy.StreamOpened, spdy.StreamOpened]
    opened = events[0]
    assert isinstance(opened, spdy.StreamOpened)
    assert (opened.stream_id, opened.header("streamtype"), opened.header("port")) == (
        1,
        "data",
        "80",
    )
    assert (sid, sid2) == (1, 3)
    server.reply(1)
    server.reply(3)
    assert [type(e) for e in _pump(server, client)] == [spdy.StreamReplied, spdy.StreamReplied]
    client.send_data(1, b"hello", fin=True)
    (data,) = _pump(client, server)
    assert data == spdy.DataReceived(1, b"hello", True)
    server.send_data(1, b"world")
    server.end_stream(1)
    assert _pump(server, client) == [
        spdy.DataReceived(1, b"world", False),
        spdy.DataReceived(1, b"", True),
    ]
    assert not server.is_open(1) and server.is_open(3)


def test_header_compression_context_spans_the_connection() -> None:
    client, server = _pair()
    for i in range(5):
        client.open_stream([("streamtype", "data"), ("requestid", str(i))])
    events = _pump(client, server)
    assert [e.header("requestid") for e in events if isinstance(e, spdy.StreamOpened)] == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]


def test_pings_from_the_peer_are_echoed_and_ours_come_back() -> None:
    client, server = _pair()
    ping_id = client.ping()
    assert _pump(client, server) == []  # answered without an event
    assert _pump(server, client) == [spdy.PingReceived(ping_id)]


def test_window_is_granted_back_only_when_acknowledged() -> None:
    client, server = _pair()
    client.open_stream([("streamtype", "stdin")])
    _pump(client, server)
    server.reply(1)
    _pump(server, client)
    # The client honours windows once it saw the server do flow control.
    server.settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: spdy.INITIAL_WINDOW})
    _pump(server, client)
    assert client.peer_flow_control
    assert client.send_data(1, b"x" * 100_000) == spdy.INITIAL_WINDOW
    events = _pump(client, server)
    assert sum(len(e.data) for e in events if isinstance(e, spdy.DataReceived)) == 65536
    assert client.send_data(1, b"x") == 0  # window exhausted
    server.acknowledge(1, 65536)
    updates = _pump(server, client)
    assert spdy.WindowUpdated(1, 65536) in updates
    assert client.send_window(1) == 65536


def test_peer_without_flow_control_is_not_throttled() -> None:
    # Go's spdystream never sends WINDOW_UPDATE: 64 KiB would stall it for good.
    client, server = _pair()
    client.open_stream([("streamtype", "stdout")])
    _pump(client, server)
    server.reply(1)
    assert server.send_data(1, b"y" * 300_000) == 300_000


def test_data_beyond_the_window_resets_only_that_stream() -> None:
    client, server = _pair()
    client.open_stream([("a", "1")])
    client.open_stream([("a", "2")])
    _pump(client, server)
    frame = struct.pack(">II", 1, 65537) + b"z" * 65537
    server.receive_data(frame + struct.pack(">II", 3, 2) + b"ok")
    assert server.events() == [spdy.DataReceived(3, b"ok", False)]
    assert not server.is_open(1)
    assert _pump(server, client) == [spdy.StreamReset(1, spdy.FLOW_CONTROL_ERROR)]


def test_zlib_bomb_ends_the_connection() -> None:
    server = spdy.Connection(server=True)
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    bomb = deflate.compress(b"\0" * (64 << 20)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < spdy.MAX_CONTROL_FRAME
    server.receive_data(_syn_stream(1, bomb))
    with pytest.raises(spdy.SpdyProtocolError, match="larger than"):
        server.events()
    out = server.data_to_send()
    assert out[2:4] == struct.pack(">H", spdy.GOAWAY)
    assert struct.unpack(">I", out[-4:])[0] == spdy.GOAWAY_PROTOCOL_ERROR
    server.receive_data(b"more")
    assert server.events() == []


def test_a_frame_longer_than_the_limit_ends_the_connection_before_it_is_buffered() -> None:
    server = spdy.Connection(server=True)
    server.receive_data(struct.pack(">II", 1, spdy.MAX_DATA_FRAME + 1))
    with pytest.raises(spdy.SpdyProtocolError, match="limit"):
        server.events()


def test_streams_beyond_the_limit_are_refused() -> None:
    client = spdy.Connection(server=False)
    server = spdy.Connection(server=True, max_streams=3)
    for _ in range(5):
        client.open_stream([("x", "y")])
    events = _pump(client, server)
    assert len([e for e in events if isinstance(e, spdy.StreamOpened)]) == 3
    resets = _pump(server, client)
    assert resets == [
        spdy.StreamReset(7, spdy.REFUSED_STREAM),
        spdy.StreamReset(9, spdy.REFUSED_STREAM),
    ]


def test_stream_ids_must_grow_and_be_the_clients() -> None:
    client = spdy.Connection(server=False)
    client.open_stream([("x", "y")])
    client._next_stream = 1  # the same id again, in the same compression context
    client.open_stream([("x", "y")])
    server = spdy.Connection(server=True)
    server.receive_data(client.data_to_send())
    with pytest.raises(spdy.SpdyProtocolError, match="not above"):
        server.events()
    even = spdy.Connection(server=True)
    even.receive_data(_syn_stream(2, zlib.compress(b"")))
    with pytest.raises(spdy.SpdyProtocolError):
        even.events()


def test_data_on_unknown_stream_is_reset_not_fatal() -> None:
    server = spdy.Connection(server=True)
    server.receive_data(struct.pack(">II", 5, 3) + b"abc")
    assert server.events() == []
    client = spdy.Connection(server=False)
    client.receive_data(server.data_to_send())
    assert client.events() == [spdy.StreamReset(5, spdy.INVALID_STREAM)]


def test_wrong_version_and_malformed_control_frames_end_the_connection() -> None:
    for frame in (
        struct.pack(">HHI", 0x8002, 1, 0),  # SPDY/2
        _control(spdy.PING, 0, b"\0\0\0"),  # short ping
        _control(spdy.WINDOW_UPDATE, 0, struct.pack(">II", 1, 0)),  # zero delta
        _control(spdy.SETTINGS, 0, struct.pack(">I", 9)),  # count past the end
    ):
        server = spdy.Connection(server=True)
        server.receive_data(frame)
        with pytest.raises(spdy.SpdyProtocolError):
            server.events()


def test_unknown_control_frames_are_ignored() -> None:
    server = spdy.Connection(server=True)
    server.receive_data(_control(10, 0, b"credential") + _control(spdy.PING, 0, b"\0\0\0\1"))
    assert server.events() == []
    assert server.data_to_send() == _control(spdy.PING, 0, b"\0\0\0\1")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_decoder_only_raises_its_protocol_error(chunks: list[bytes]) -> None:
    server = spdy.Connection(server=True)
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            server.events()
    except spdy.SpdyProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 2, 3, 4, 6, 7, 8, 9, 10]),
            st.integers(0, 255),
            st.binary(max_size=40),
        ),
        max_size=6,
    ),
    st.binary(max_size=30),
)
def test_control_frames_with_random_payloads_only_raise_protocol_errors(
    frames: list[tuple[int, int, bytes]], block: bytes
) -> None:
    # Well-framed control frames with random bodies, plus a valid SYN_STREAM carrying a
    # random (compressed) header block: deeper than random bytes get.
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    data = _syn_stream(1, deflate.compress(block) + deflate.flush(zlib.Z_SYNC_FLUSH))
    for kind, flags, payload in frames:
        data += _control(kind, flags, payload)
    server = spdy.Connection(server=True)
    server.receive_data(data)
    try:
        server.events()
    except spdy.SpdyProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_request_head_parser_takes_any_bytes(raw: bytes) -> None:
    head = spdystreaming.parse_head(raw)
    if head is not None:
        spdystreaming.is_spdy_upgrade(head)


async def test_session_writes_wait_for_the_window_of_a_peer_doing_flow_control(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server_end, client_end = trio.testing.memory_stream_pair()
    session = Session(spdystreaming.stream_transport(server_end, b""))
    client = spdy.Connection(server=False)
    client.settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    client.open_stream([("streamtype", "stdout")])
    await client_end.send_all(client.data_to_send())

    async def received(until: int) -> list[spdy.Event]:
        events: list[spdy.Event] = []
        total = 0
        while total < until:
            client.receive_data(await client_end.receive_some())
            for event in client.events():
                events.append(event)
                if isinstance(event, spdy.DataReceived):
                    total += len(event.data)
        return events

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        stream = await session.incoming.receive()
        nursery.start_soon(stream.write, b"a" * 2500)
        first = await received(1000)
        assert sum(len(e.data) for e in first if isinstance(e, spdy.DataReceived)) == 1000
        with trio.move_on_after(10):  # nothing more without a window (virtual time)
            assert await client_end.receive_some() == b"unreachable"
        await client_end.send_all(_control(spdy.WINDOW_UPDATE, 0, struct.pack(">II", 1, 1500)))
        rest = await received(1500)
        assert sum(len(e.data) for e in rest if isinstance(e, spdy.DataReceived)) == 1500
        nursery.cancel_scope.cancel()


async def _echo_handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A node handler's stand-in: port-forward by the websocket channel protocol, echoing."""
    assert (await receive())["type"] == "websocket.connect"
    port = int(dict(urllib.parse.parse_qsl(scope["query_string"].decode()))["ports"])
    await send({"type": "websocket.accept", "subprotocol": "v4.channel.k8s.io"})
    for channel in (0, 1):
        await send(
            {"type": "websocket.send", "bytes": bytes([channel]) + port.to_bytes(2, "little")}
        )
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "bytes": message["bytes"]})
    await send({"type": "websocket.close", "code": 1000})


async def test_port_forward_pairs_streams_by_request_id_and_expires_lone_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server_end, client_end = trio.testing.memory_stream_pair()
    session = Session(spdystreaming.stream_transport(server_end, b""))
    scope = {"type": "websocket", "path": "/api/v1/namespaces/ns/pods/p/portforward"}
    client = spdy.Connection(server=False)
    lone = client.open_stream([("streamtype", "error"), ("port", "80"), ("requestid", "7")])
    error = client.open_stream([("streamtype", "error"), ("port", "80"), ("requestid", "8")])
    data = client.open_stream([("streamtype", "data"), ("port", "80"), ("requestid", "8")])
    client.send_data(data, b"echo me")
    await client_end.send_all(client.data_to_send())
    events: list[spdy.Event] = []

    async def until(predicate: Any) -> None:
        while not any(predicate(e) for e in events):
            client.receive_data(await client_end.receive_some())
            events.extend(client.events())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            spdystreaming._serve_portforward, _echo_handler, scope, session, spdystreaming.Limits()
        )
        await until(lambda e: e == spdy.DataReceived(data, b"echo me", False))
        assert not any(isinstance(e, spdy.StreamReset) for e in events)
        start = trio.current_time()
        await until(lambda e: e == spdy.StreamReset(lone, spdy.CANCEL))
        assert trio.current_time() - start >= spdystreaming.STREAM_CREATION_TIMEOUT - 1
        client.end_stream(data)  # the local connection closed: the handler is told
        await client_end.send_all(client.data_to_send())
        await until(lambda e: e == spdy.DataReceived(error, b"", True))
        nursery.cancel_scope.cancel()


async def test_an_idle_session_is_closed_after_its_timeout_and_traffic_defers_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server_end, client_end = trio.testing.memory_stream_pair()
    session = Session(spdystreaming.stream_transport(server_end, b""), idle_timeout=100)
    client = spdy.Connection(server=False)
    client.open_stream([("streamtype", "stdout")])
    await client_end.send_all(client.data_to_send())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        stream = await session.incoming.receive()
        start = trio.current_time()
        await trio.sleep(60)
        await stream.write(b"output keeps it alive")  # outbound traffic counts
        await session.done.wait()
        assert trio.current_time() - start == pytest.approx(160)
        nursery.cancel_scope.cancel()
    client.receive_data(await client_end.receive_some())
    events = client.events()
    assert spdy.DataReceived(1, b"output keeps it alive", False) in events
    assert any(isinstance(e, spdy.GoAwayReceived) for e in events)


async def test_port_forward_pairs_past_the_servers_limit_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server_end, client_end = trio.testing.memory_stream_pair()
    session = Session(spdystreaming.stream_transport(server_end, b""))
    scope = {"type": "websocket", "path": "/api/v1/namespaces/ns/pods/p/portforward"}
    limits = spdystreaming.Limits(max_forwards=1)
    client = spdy.Connection(server=False)
    ids = [
        client.open_stream([("streamtype", kind), ("port", "80"), ("requestid", request)])
        for request in ("1", "2")
        for kind in ("error", "data")
    ]
    await client_end.send_all(client.data_to_send())
    events: list[spdy.Event] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spdystreaming._serve_portforward, _echo_handler, scope, session, limits)
        while not any(e == spdy.StreamReset(ids[3], spdy.REFUSED_STREAM) for e in events):
            client.receive_data(await client_end.receive_some())
            events.extend(client.events())
        assert spdy.StreamReset(ids[2], spdy.REFUSED_STREAM) in events
        assert limits.forwards == 1
        client.end_stream(ids[1])
        await client_end.send_all(client.data_to_send())
        while not any(e == spdy.DataReceived(ids[0], b"", True) for e in events):
            client.receive_data(await client_end.receive_some())
            events.extend(client.events())
        await trio.testing.wait_all_tasks_blocked()
        assert limits.forwards == 0
        nursery.cancel_scope.cancel()


async def test_upgrades_past_the_servers_connection_limit_get_429() -> None:
    server_end, client_end = trio.testing.memory_stream_pair()
    head = spdystreaming.parse_head(
        b"POST /api/v1/namespaces/ns/pods/p/portforward HTTP/1.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: SPDY/3.1\r\n\r\n"
    )
    assert head is not None and spdystreaming.is_spdy_upgrade(head)

    async def never_called(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app was reached")

    limits = spdystreaming.Limits(max_connections=0)
    await spdystreaming.serve_upgrade(never_called, server_end, head, b"", limits=limits)
    reply = b""
    while data := await client_end.receive_some():
        reply += data
    assert reply.startswith(b"HTTP/1.1 429 Too Many Requests")
    assert b"too many streaming connections" in reply
