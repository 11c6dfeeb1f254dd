"""The cluster's side of the VIF tests, run inside the test's "cluster" network namespace.

`python cluster_side.py <fd> <address>`: serves tunnel OPENs (the real `TunnelServer`) and a
small LOOKUP_DNS table on the h2 link whose socket is `fd`, plus a TCP and a UDP echo server on
`<address>` port 7000, a server that resets (7001), one that speaks and half-closes first (7002)
and one that tells what 7002 last received (7003). Exits when the link closes.
"""

from __future__ import annotations

import functools
import socket
import struct
import sys

import trio

from tele.rpc import manager_api as mapi
from tele.rpc.server import Router, serve_connection
from tele.rpc.tunnel import TunnelServer

ECHO_PORT = 7000
RESET_PORT = 7001
FIRST_PORT = 7002
REPORT_PORT = 7003
POD_ADDRESS6 = "fd00:244::5"


def dns_table(address: str) -> dict[str, str]:
    return {"echo.default": address, "echo.default.svc.cluster.local": address}


async def tcp_echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(256 * 1024):
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def reset_at_once(stream: trio.SocketStream) -> None:
    """Take the first bytes, then abort the connection (RST) as a crashing server would."""
    await stream.receive_some(100)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


_first_received: list[bytes] = []
_first_changed = trio.Condition()


async def speaks_and_closes_first(stream: trio.SocketStream) -> None:
    """Greet, half-close, then read until the client's EOF (kept for `report`)."""
    async with stream:
        await stream.send_all(b"ready")
        await stream.send_eof()
        got = b""
        while data := await stream.receive_some(65536):
            got += data
        async with _first_changed:
            _first_received.append(got)
            _first_changed.notify_all()


async def report(stream: trio.SocketStream) -> None:
    """What 7002's connection number N (the client sends N) received, once it has ended
    (within 5 s: bytes on one connection may arrive after another connection is set up)."""
    async with stream:
        wanted = int(await stream.receive_some(10) or b"0")
        with trio.move_on_after(5):
            async with _first_changed:
                while len(_first_received) <= wanted:
                    await _first_changed.wait()
        got = _first_received[wanted] if len(_first_received) > wanted else b"nothing"
        await stream.send_all(got)


async def udp_echo(address: str) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((address, ECHO_PORT))
    while True:
        data, peer = await sock.recvfrom(65535)
        await sock.sendto(data, peer)


async def main(fd: int, address: str) -> None:
    table = dns_table(address)
    router = Router()

    async def lookup(request: mapi.LookupRequest) -> mapi.LookupReply:
        name = request.name.rstrip(".").lower()
        value = table.get(name)
        if value is None:
            return mapi.LookupReply(rcode="NXDOMAIN")
        if request.qtype != "A":
            return mapi.LookupReply(rcode="NOERROR")
        return mapi.LookupReply(
            rcode="NOERROR", records=[mapi.DnsRecord(name=name, type="A", value=value, ttl=5)]
        )

    router.unary(mapi.LOOKUP_DNS, lookup)
    tunnels = TunnelServer(dial_timeout=3)
    router.raw(TunnelServer.matches, tunnels.handle, prepare=tunnels.prepare)
    sock = socket.socket(fileno=fd)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_tcp, tcp_echo, ECHO_PORT, host=address))
        await nursery.start(
            functools.partial(trio.serve_tcp, tcp_echo, ECHO_PORT, host=POD_ADDRESS6)
        )
        await nursery.start(
            functools.partial(trio.serve_tcp, reset_at_once, RESET_PORT, host=address)
        )
        for handler, port in ((speaks_and_closes_first, FIRST_PORT), (report, REPORT_PORT)):
            await nursery.start(functools.partial(trio.serve_tcp, handler, port, host=address))
        nursery.start_soon(udp_echo, address)
        await serve_connection(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), router)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), sys.argv[2])
