"""DirectTLS: an established trio SSLStream's TLS connection driven on its SSLObject and socket.
Bytes both ways arrive whole and in order (across records, with what trio had read already),
the end of the connection reads as b"", a corrupted record breaks only that connection, and
what is not a known SSLStream is left alone."""

from __future__ import annotations

import os
import ssl

import pytest
import trio
import trio.testing

from tele.certs import CertificateAuthority, server_context
from tele.k8s.directtls import DirectTLS


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = CertificateAuthority.create("tele-test-directtls")
    pair = ca.issue("server", ["127.0.0.1"])
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    return server_context(pair, ["http/1.1"]), client


async def _pair() -> tuple[trio.SSLStream[trio.SocketStream], trio.SSLStream[trio.SocketStream]]:
    a, b = trio.socket.socketpair()
    server_ctx, client_ctx = _contexts()
    server = trio.SSLStream(trio.SocketStream(a), server_ctx, server_side=True)
    client = trio.SSLStream(trio.SocketStream(b), client_ctx, server_hostname="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return server, client


async def _read_exactly(direct: DirectTLS, size: int) -> bytes:
    got = b""
    while len(got) < size:
        data = await direct.receive_some(256 * 1024)
        assert data, f"EOF after {len(got)} of {size} bytes"
        got += data
    return got


async def test_bytes_cross_both_ways_whole_and_in_order() -> None:
    server, client = await _pair()
    # What the SSLStream took already (a record read through it) is not lost at the switch.
    await client.send_all(b"before the switch")
    assert await server.receive_some(5) == b"befor"
    s, c = DirectTLS.of(server), DirectTLS.of(client)
    assert s is not None and c is not None
    assert await _read_exactly(s, 12) == b"e the switch"
    payload = os.urandom(1_000_003)  # many records, several socket reads

    async with trio.open_nursery() as nursery:

        async def write_pieces() -> None:
            for start in range(0, len(payload), 70_001):
                await c.send_all(payload[start : start + 70_001])

        async def echo_back() -> None:
            await s.send_all(await _read_exactly(s, len(payload)))

        nursery.start_soon(write_pieces)
        nursery.start_soon(echo_back)
        assert await _read_exactly(c, len(payload)) == payload
    # Small messages one after the other (the request/response case).
    for n in range(50):
        await c.send_all(b"q%d" % n)
        assert await s.receive_some(1024) == b"q%d" % n
    await client.aclose()
    assert await s.receive_some(1024) == b""  # close_notify
    await server.aclose()


async def test_a_peer_closing_without_close_notify_is_the_end() -> None:
    server, client = await _pair()
    s = DirectTLS.of(server)
    assert s is not None
    await client.transport_stream.aclose()
    assert await s.receive_some(1024) == b""
    assert await s.receive_some(1024) == b""
    await trio.aclose_forcefully(server)


async def test_a_corrupted_record_breaks_only_this_connection() -> None:
    server, client = await _pair()
    s = DirectTLS.of(server)
    assert s is not None
    record = bytearray(b"\x17\x03\x03\x00\x20" + os.urandom(32))  # application data, garbage
    await client.transport_stream.send_all(record)
    with pytest.raises(trio.BrokenResourceError):
        await s.receive_some(1024)
    # Another connection in the same process works.
    other_server, other_client = await _pair()
    os_, oc = DirectTLS.of(other_server), DirectTLS.of(other_client)
    assert os_ is not None and oc is not None
    await oc.send_all(b"fine")
    assert await os_.receive_some(1024) == b"fine"
    for stream in (server, client, other_server, other_client):
        await trio.aclose_forcefully(stream)


async def test_only_a_trio_ssl_stream_is_taken() -> None:
    a, _ = trio.testing.memory_stream_pair()
    assert DirectTLS.of(a) is None
    sock_a, sock_b = trio.socket.socketpair()
    with sock_a, sock_b:
        assert DirectTLS.of(trio.SocketStream(sock_a)) is None
