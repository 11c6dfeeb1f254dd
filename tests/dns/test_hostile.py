"""Hostile DNS clients: a query whose name cannot go back on the wire, a reply that cannot be
packed, a bug in a lookup, idle TCP connections. Each ends at most its own query; the server
keeps answering everyone else."""

from __future__ import annotations

import logging
import shutil
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from dnslib import RCODE, DNSRecord

from tele.dns.names import NameRules
from tele.dns.server import (
    MAX_TCP_CONNECTIONS,
    TCP_MESSAGE_TIMEOUT,
    Resolver,
    serve_tcp,
    serve_udp,
)
from tele.rpc import manager_api as mapi

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
POD = "10.244.0.9"
ECHO = mapi.DnsRecord(name="echo.default", type="A", value=POD, ttl=30)


def query_bytes(name_wire: bytes, qdcount: int = 1, ident: int = 0x1234) -> bytes:
    return struct.pack("!HHHHHH", ident, 0x0100, qdcount, 0, 0, 0) + name_wire


def long_label_query() -> bytes:
    """A query for one 64-byte label (the wire allows 63)."""
    return query_bytes(bytes([64]) + b"a" * 64 + b"\x00" + struct.pack("!HH", 1, 1))


def compression_chain_query() -> bytes:
    """Four questions, each a 63-byte label plus a pointer to the one before: the last name
    is 4 * 64 + 1 = 257 bytes once the pointers are followed."""
    body = b""
    offsets: list[int] = []
    for letter in b"abcd":
        offsets.append(12 + len(body))
        tail = b"\x00" if len(offsets) == 1 else struct.pack("!H", 0xC000 | offsets[-2])
        body += bytes([63]) + bytes([letter]) * 63 + tail + struct.pack("!HH", 1, 1)
    return query_bytes(body, qdcount=4)


@dataclass
class Server:
    resolver: Resolver
    port: int
    lookups: list[str]


def bind_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A TCP listener and a UDP socket on one free loopback port."""
    for _ in range(50):
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp._sock.bind(("127.0.0.1", 0))  # blocking bind of a numeric address
            udp._sock.bind(("127.0.0.1", tcp.getsockname()[1]))
            tcp.listen(256)
            return tcp, udp
        except OSError:
            tcp.close()
            udp.close()
    raise RuntimeError("no free loopback port for both TCP and UDP")


@asynccontextmanager
async def serve(lookup_reply: mapi.LookupReply | Exception) -> AsyncIterator[Server]:
    lookups: list[str] = []

    async def lookup(name: str, qtype: str) -> mapi.LookupReply:
        lookups.append(name)
        if isinstance(lookup_reply, Exception):
            raise lookup_reply
        if name.startswith("echo."):
            return mapi.LookupReply(rcode="NOERROR", records=[ECHO])
        return lookup_reply

    resolver = Resolver(NameRules(namespaces=["default"]), lookup, None, lookup_timeout=5)
    tcp, udp = bind_pair()
    with tcp, udp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_udp, resolver, udp)
            nursery.start_soon(serve_tcp, resolver, trio.SocketListener(tcp))
            try:
                yield Server(resolver, tcp.getsockname()[1], lookups)
            finally:
                nursery.cancel_scope.cancel()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with serve(mapi.LookupReply(rcode="NXDOMAIN", records=[])) as s:
        yield s


async def ask_udp(port: int, message: bytes) -> DNSRecord:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", port))
        with trio.fail_after(5):
            await sock.send(message)
            return DNSRecord.parse(await sock.recv(4096))


def echo_query() -> bytes:
    return bytes(DNSRecord.question("echo.default", "A").pack())


async def assert_still_answers(server: Server) -> None:
    reply = await ask_udp(server.port, echo_query())
    assert str(reply.rr[0].rdata) == POD


SEND_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(bytes.fromhex(sys.argv[2]), ("127.0.0.1", int(sys.argv[1])))
print(s.recv(4096).hex())
"""


async def test_a_64_byte_label_sent_by_nobody_is_formerr_and_the_server_keeps_serving(
    server: Server,
) -> None:
    for tool in ("setpriv", SYSTEM_PYTHON):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing")
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    command = [*as_nobody, SYSTEM_PYTHON, "-c", SEND_AS_NOBODY, str(server.port)]
    command.append(long_label_query().hex())
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    reply = bytes.fromhex(result.stdout.decode().strip())
    ident, flags, qd, an, _, _ = struct.unpack("!HHHHHH", reply[:12])
    assert (ident, flags & 0x8000, flags & 0xF, qd, an) == (0x1234, 0x8000, RCODE.FORMERR, 0, 0)
    assert flags & 0x0100, "RD is copied from the query"
    await assert_still_answers(server)


async def test_a_compression_chain_longer_than_255_bytes_is_formerr(server: Server) -> None:
    reply = await ask_udp(server.port, compression_chain_query())
    assert reply.header.rcode == RCODE.FORMERR
    await assert_still_answers(server)


async def test_the_same_queries_over_tcp_are_formerr(server: Server) -> None:
    for message in (long_label_query(), compression_chain_query()):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(struct.pack("!H", len(message)) + message)
                data = b""
                while len(data) < 14:
                    data += await stream.receive_some(4096)
        assert DNSRecord.parse(data[2:]).header.rcode == RCODE.FORMERR


async def test_a_pointer_loop_is_dropped_quietly(server: Server) -> None:
    looping = query_bytes(struct.pack("!H", 0xC00C) + struct.pack("!HH", 1, 1))
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.sendto(looping, ("127.0.0.1", server.port))
    await assert_still_answers(server)


async def test_a_record_that_cannot_be_packed_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The manager (or a fake one) answers an SRV whose target has a 64-byte label.
    target = f"{'b' * 64}.x"
    bad = mapi.LookupReply(
        rcode="NOERROR",
        records=[mapi.DnsRecord(name="srv.default", type="SRV", value=f"0 0 80 {target}", ttl=5)],
    )
    async with serve(bad) as server:
        with caplog.at_level(logging.WARNING, logger="tele.dns.server"):
            reply = await ask_udp(
                server.port, bytes(DNSRecord.question("srv.default", "SRV").pack())
            )
        assert (reply.header.rcode, reply.rr) == (RCODE.NOERROR, [])
        assert "ignoring a bad record" in caplog.text
        await assert_still_answers(server)


async def test_a_bug_in_a_lookup_is_servfail_with_its_traceback_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serve(TypeError("a bug")) as server:
        with caplog.at_level(logging.WARNING, logger="tele.dns.server"):
            reply = await ask_udp(server.port, echo_query())
        assert reply.header.rcode == RCODE.SERVFAIL
        logged = [r for r in caplog.records if r.name == "tele.dns.server"]
        assert len(logged) == 1
        assert logged[0].exc_info is not None and logged[0].exc_info[0] is TypeError


async def tcp_query(port: int, message: bytes) -> DNSRecord:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(struct.pack("!H", len(message)) + message)
        data = b""
        while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} bytes")
            data += chunk
        return DNSRecord.parse(data[2:])


async def test_idle_tcp_connections_cannot_lock_out_queries(server: Server) -> None:
    idle = [
        await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(MAX_TCP_CONNECTIONS)
    ]
    try:
        # Let the server accept every idle one before the real client comes.
        await trio.testing.wait_all_tasks_blocked(0.05)
        with trio.fail_after(5):  # the lock-out held for 30 s
            for _ in range(3):
                reply = await tcp_query(server.port, echo_query())
                assert str(reply.rr[0].rdata) == POD
        # The longest idle connections made room: the server closed them.
        with trio.fail_after(5):
            assert await idle[0].receive_some(1) == b""
    finally:
        for stream in idle:
            await trio.aclose_forcefully(stream)


async def test_a_query_trickled_over_tcp_is_cut_off(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    del autojump_clock
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"\x00")  # a length byte, and then nothing
        with trio.fail_after(TCP_MESSAGE_TIMEOUT + 1):  # (virtual time)
            assert await stream.receive_some(1) == b""
