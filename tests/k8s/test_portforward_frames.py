"""The port-forward client's own websocket framing against a raw server (plain HTTP on
loopback) that sends exactly the bytes a test gives it: RFC 6455 frames a hostile or broken API
server might send. Each ends at most this port-forward, with one sentence; memory stays bounded
by one read whatever a frame announces; the same bytes split anywhere read the same."""

from __future__ import annotations

import base64
import functools
import hashlib
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tele.k8s import portforward
from tele.k8s.config import ClusterConnection
from tele.k8s.errors import PortForwardBroken, PortForwardError

PORT = 8080
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Serve = Callable[[trio.SocketStream], Awaitable[None]]


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False, key: bytes = bytes(4)
) -> bytes:
    """A frame as a server writes one (unmasked), or with `mask` as a client does, masked with
    `key` (all zeros by default: the payload's bytes unchanged)."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    bit = 0x80 if mask else 0
    if size <= 125:
        header = bytes((first, bit | size))
    elif size <= 0xFFFF:
        header = bytes((first, bit | 126)) + struct.pack("!H", size)
    else:
        header = bytes((first, bit | 127)) + struct.pack("!Q", size)
    if not mask:
        return header + payload
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


PREFIXES = frame(2, b"\x00" + PORT.to_bytes(2, "little")) + frame(
    2, b"\x01" + PORT.to_bytes(2, "little")
)


async def upgrade(stream: trio.SocketStream, *, protocol: bytes = b"v4.channel.k8s.io") -> bytes:
    """Read the client's upgrade request and accept it; the client's frames read with it."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some(65536)
        assert chunk
        request += chunk
    head, _, rest = request.partition(b"\r\n\r\n")
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    )
    accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + GUID).digest())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + accept
        + b"\r\nSec-WebSocket-Protocol: "
        + protocol
        + b"\r\n\r\n"
    )
    return rest


async def read_client_frame(
    stream: trio.SocketStream, buffered: bytes = b""
) -> tuple[int, bytes, bytes]:
    """One masked frame from the client: (opcode, unmasked payload, the bytes after it)."""
    data = buffered
    while True:
        if len(data) >= 2:
            size = data[1] & 0x7F
            at = 2 + (2 if size == 126 else 8 if size == 127 else 0)
            if len(data) >= at:
                if size == 126:
                    size = struct.unpack("!H", data[2:4])[0]
                elif size == 127:
                    size = struct.unpack("!Q", data[2:10])[0]
                assert data[1] & 0x80, "client frames are masked"
                if len(data) >= at + 4 + size:
                    key = data[at : at + 4]
                    body = data[at + 4 : at + 4 + size]
                    payload = bytes(b ^ key[i % 4] for i, b in enumerate(body))
                    return data[0] & 0x0F, payload, data[at + 4 + size :]
        chunk = await stream.receive_some(65536)
        assert chunk, "the client closed"
        data += chunk


async def start_server(nursery: trio.Nursery, serve: Serve) -> ClusterConnection:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    return ClusterConnection(f"http://127.0.0.1:{port}", "test", "default", None)


async def serve_bytes(nursery: trio.Nursery, *chunks: bytes) -> ClusterConnection:
    """A server that accepts the upgrade, sends the port prefixes and then `chunks`, each in
    its own write, and then waits for the client to go away."""

    async def serve(stream: trio.SocketStream) -> None:
        await upgrade(stream)
        await stream.send_all(PREFIXES)
        for chunk in chunks:
            await stream.send_all(chunk)
            await trio.lowlevel.checkpoint()
        while await stream.receive_some(65536):
            pass

    return await start_server(nursery, serve)


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (frame(2, b"\x00x", mask=True), "masked frame"),
        (bytes((0x82 | 0x40, 2)) + b"\x00x", "reserved bits"),
        (frame(1, b"\x00text"), "text message"),
        (frame(3, b"\x00x"), "unknown opcode 3"),
        (frame(0xB, b""), "unknown opcode 11"),
        (frame(9, b"p" * 126), "long control frame"),
        (frame(9, b"p", fin=False), "fragmented"),
        (frame(0, b"x"), "never started"),
        (frame(2, b"\x00a", fin=False) + frame(2, b"\x00b"), "inside another"),
        (frame(2, b""), "empty message"),
        (bytes((0x82, 127)) + struct.pack("!Q", 1 << 63), "impossible frame length"),
        (frame(2, b"\x07junk"), "unknown channel 7"),
    ],
)
async def test_a_broken_frame_ends_this_port_forward_with_a_sentence(
    nursery: trio.Nursery, sent: bytes, message: str
) -> None:
    cluster = await serve_bytes(nursery, frame(2, b"\x00before"), sent, frame(2, b"\x00after"))
    with trio.fail_after(10):
        async with portforward.open_portforward(cluster, "ns", "pod", PORT) as s:
            got = b""
            with pytest.raises(PortForwardBroken, match=message) as info:
                while True:
                    got += await s.receive_some()
            # What came before the broken frame was read; nothing after it.
            assert got in (b"before", b"beforea")
            assert str(info.value).startswith("the port-forward to pod ns/pod port 8080 ")
            with pytest.raises(PortForwardBroken):
                await s.send_all(b"more")


async def test_a_huge_announced_frame_is_read_as_it_arrives(nursery: trio.Nursery) -> None:
    """A frame announcing 2**40 bytes: its payload is handed over piece by piece; nothing
    waits for (or makes room for) the whole frame."""
    header = bytes((0x82, 127)) + struct.pack("!Q", 1 << 40)
    cluster = await serve_bytes(nursery, header + b"\x00" + b"a" * 1000, b"b" * 70_000)
    with trio.fail_after(10):
        async with portforward.open_portforward(cluster, "ns", "pod", PORT) as s:
            got = b""
            while len(got) < 71_000:
                got += await s.receive_some()
            assert got == b"a" * 1000 + b"b" * 70_000


async def test_fragments_pings_and_close(nursery: trio.Nursery) -> None:
    """A message in fragments (the channel byte in the first only), a PING between them
    answered with its payload, and a normal Close read as the end of the stream and answered."""
    seen: list[tuple[int, bytes]] = []

    async def serve(stream: trio.SocketStream) -> None:
        rest = await upgrade(stream)
        await stream.send_all(
            PREFIXES
            + frame(2, b"\x00he", fin=False)
            + frame(9, b"are you there")
            + frame(0, b"ll", fin=False)
            + frame(0, b"o")
        )
        opcode, payload, rest = await read_client_frame(stream, rest)
        seen.append((opcode, payload))
        await stream.send_all(frame(8, (1000).to_bytes(2, "big") + b"bye"))
        opcode, payload, rest = await read_client_frame(stream, rest)
        seen.append((opcode, payload))

    cluster = await start_server(nursery, serve)
    with trio.fail_after(10):
        async with portforward.open_portforward(cluster, "ns", "pod", PORT) as s:
            assert await s.receive_some() == b"hello"
            assert await s.receive_some() == b""
    assert seen == [(0xA, b"are you there"), (0x8, (1000).to_bytes(2, "big"))]


async def test_an_abnormal_close_breaks_the_stream(nursery: trio.Nursery) -> None:
    cluster = await serve_bytes(nursery, frame(8, (1011).to_bytes(2, "big") + b"oops"))
    with trio.fail_after(10):
        async with portforward.open_portforward(cluster, "ns", "pod", PORT) as s:
            with pytest.raises(PortForwardBroken, match="websocket close 1011: oops"):
                await s.receive_some()


async def test_what_the_client_sends_is_masked_binary_on_channel_0(nursery: trio.Nursery) -> None:
    got: list[tuple[int, bytes]] = []
    big = bytes(range(256)) * 300

    async def serve(stream: trio.SocketStream) -> None:
        rest = await upgrade(stream)
        await stream.send_all(PREFIXES)
        for _ in range(2):  # the two may come in one read
            opcode, payload, rest = await read_client_frame(stream, rest)
            got.append((opcode, payload))
        await stream.send_all(frame(8, (1000).to_bytes(2, "big")))
        while await stream.receive_some(65536):
            pass

    cluster = await start_server(nursery, serve)
    with trio.fail_after(10):
        async with portforward.open_portforward(cluster, "ns", "pod", PORT) as s:
            await s.send_all(b"hi")
            await s.send_all(big)
            assert await s.receive_some() == b""
    assert got == [(2, b"\x00hi"), (2, b"\x00" + big)]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 41\r\n\r\n"
            b'{"message": "pods/portforward is denied"}',
            r"HTTP 403: .*may not create",
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: wrong\r\n\r\n",
            "not a websocket upgrade",
        ),
        (b"garbage\r\n\r\n", "not valid HTTP"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000, "not valid HTTP"),
        (b"", "without answering"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 99\r\n\r\n{", "HTTP 404"),
    ],
)
async def test_bad_upgrade_answers_are_one_sentence(
    nursery: trio.Nursery, answer: bytes, message: str
) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(65536)
        await stream.send_all(answer)
        await stream.aclose()

    cluster = await start_server(nursery, serve)
    with trio.fail_after(10), pytest.raises(PortForwardError, match=message):
        async with portforward.open_portforward(cluster, "ns", "pod", PORT):
            pytest.fail("the port-forward should not open")


async def test_another_subprotocol_is_refused(nursery: trio.Nursery) -> None:
    async def serve(stream: trio.SocketStream) -> None:
        await upgrade(stream, protocol=b"v5.channel.k8s.io")
        await stream.receive_some(65536)

    cluster = await start_server(nursery, serve)
    with trio.fail_after(10), pytest.raises(PortForwardError, match="does not speak v4"):
        async with portforward.open_portforward(cluster, "ns", "pod", PORT):
            pytest.fail("the port-forward should not open")


pieces = st.one_of(
    st.binary(max_size=30),
    st.builds(
        frame,
        st.sampled_from([0, 1, 2, 8, 9, 10, 3]),
        st.one_of(st.binary(max_size=20), st.just(b"\x00data"), st.just(b"\x01err")),
        fin=st.booleans(),
        mask=st.booleans(),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(pieces, max_size=10), st.lists(st.integers(1, 40), min_size=1, max_size=20))
def test_any_bytes_split_anywhere_parse_the_same(chunks: list[bytes], cuts: list[int]) -> None:
    """Whatever bytes a server sends, the parser returns items or stops with a protocol
    error (nothing else raises), and the same bytes in other pieces give the same result."""
    data = PREFIXES + b"".join(chunks)

    def parse(parts: list[bytes]) -> tuple[list[tuple[str, bytes, bool]], str | None]:
        parser = portforward._FrameParser()
        items: list[tuple[str, bytes, bool]] = []
        for part in parts:
            items += [(kind, bytes(payload), start) for kind, payload, start in parser.feed(part)]
        return items, str(parser.error) if parser.error else None

    def merged(result: tuple[list[tuple[str, bytes, bool]], str | None]) -> tuple[object, ...]:
        # Data pieces of one message may split differently: compare messages' bytes.
        out: list[tuple[str, bytes]] = []
        for kind, payload, start in result[0]:
            if kind == "data" and not start and out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + payload)
            else:
                out.append((kind, payload))
        return tuple(out), result[1]

    whole = parse([data])
    parts, at = [], 0
    for cut in cuts * (len(data) // max(sum(cuts), 1) + 1):
        if at >= len(data):
            break
        parts.append(data[at : at + cut])
        at += cut
    parts.append(data[at:])
    assert merged(parse(parts)) == merged(whole)
