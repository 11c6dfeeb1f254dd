"""The floor of tele's design for a new connection: the least a trio process behind a TUN device
can do to carry a short connection to a trio relay in the cluster, for bench/timeline.py's row
`floor` (run there, in the same run as tele and sshuttle).

The laptop side (`serve`; this script as a process in the laptop namespace, as tele's daemon
is: `python bench/tunfloor.py DEVICE RELAY_HOST RELAY_PORT` opens the TUN device, prints
"ready", and serves until killed) speaks just enough TCP on the TUN for the sequential loop:
the SYN gets a SYN-ACK and a dial of the relay at once (as tele's early accept and optimistic
OPEN), the app's bytes go to the relay with their ACK left to ride on the answer, the answer
goes back as one segment, the app's FIN half-closes the relay socket and the relay's EOF is
answered with one FIN. IPv4 without options, no retransmission, no windows, no vnet header
(packets built by tele.net's own encoder, checksums included), a TCP connection per app
connection instead of one multiplexed link (the kernel does the multiplexing), no HTTP/2, no
TLS, no policy. The cluster side (`RELAY`) is a bare trio relay: accept, dial the echo, pump.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct

import trio

from tele.net.packet import TCPFlowEncoder
from tele.net.tcp import ACK, FIN, PSH, RST, SYN

RELAY = """
import socket, sys, trio
host, port, target, target_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
async def pump(src, dst):
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
async def handle(client):
    sock = trio.socket.socket()
    await sock.connect((target, target_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    async with client, trio.SocketStream(sock) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server)
            await pump(server, client)
trio.run(lambda: trio.serve_tcp(handle, port, host=host))  # floor-relay
"""


class _Conn:
    __slots__ = ("encoder", "fin", "key", "pending", "rcv_nxt", "snd_nxt", "sock")

    def __init__(self, key: tuple[bytes, int, bytes, int], rcv_nxt: int, snd_nxt: int) -> None:
        self.key, self.rcv_nxt, self.snd_nxt = key, rcv_nxt, snd_nxt
        src, sport, dst, dport = key
        self.encoder = TCPFlowEncoder(dst, src, dport, sport)  # our packets: to the app
        self.sock: socket.socket | None = None
        self.pending: list[bytes] = []
        self.fin = False


async def serve(fd: int, relay: tuple[str, int]) -> None:
    """Run the laptop side on TUN descriptor `fd` (non-blocking, no packet info) until
    cancelled."""
    conns: dict[tuple[bytes, int, bytes, int], _Conn] = {}

    def reply(conn: _Conn, flags: int, payload: bytes = b"") -> None:
        os.write(fd, conn.encoder.segment(conn.snd_nxt, conn.rcv_nxt, flags, 65535, payload))
        used = len(payload) + (1 if flags & (SYN | FIN) else 0)  # SYN and FIN take a number
        conn.snd_nxt = (conn.snd_nxt + used) & 0xFFFFFFFF

    async def dial(conn: _Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if sock.connect_ex(relay) not in (0, errno.EINPROGRESS):
                raise OSError("connect failed")
            await trio.lowlevel.wait_writable(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError("connect failed")
            conn.sock = sock
            for data in conn.pending:
                sock.send(data)
            if conn.fin:
                sock.shutdown(socket.SHUT_WR)
            while True:
                await trio.lowlevel.wait_readable(sock)
                data = sock.recv(65536)
                if not data:
                    break
                reply(conn, PSH | ACK, data)
            reply(conn, FIN | ACK)
        except OSError:
            reply(conn, RST | ACK)
            conns.pop(conn.key, None)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    def packet(buf: bytes, nursery: trio.Nursery) -> None:
        if len(buf) < 40 or buf[0] != 0x45 or buf[9] != 6:
            return
        total = struct.unpack_from("!H", buf, 2)[0]
        sport, dport, seq, _ack, off, flags = struct.unpack_from("!HHIIBB", buf, 20)
        payload = buf[20 + (off >> 4) * 4 : total]
        key = (buf[12:16], sport, buf[16:20], dport)
        conn = conns.get(key)
        if flags & RST:
            conns.pop(key, None)
            return
        if flags & SYN:
            if conn is None:
                conn = conns[key] = _Conn(key, (seq + 1) & 0xFFFFFFFF, random.getrandbits(32))
                reply(conn, SYN | ACK)
                nursery.start_soon(dial, conn)
            return
        if conn is None:
            return
        if payload and seq == conn.rcv_nxt:
            conn.rcv_nxt = (conn.rcv_nxt + len(payload)) & 0xFFFFFFFF
            if conn.sock is not None:
                conn.sock.send(payload)
            else:
                conn.pending.append(bytes(payload))
        if flags & FIN:
            conn.rcv_nxt = (conn.rcv_nxt + 1) & 0xFFFFFFFF
            conn.fin = True
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_WR)
        elif not payload and conn.fin:
            conns.pop(key, None)  # the ACK of our FIN: done

    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(fd)
            while True:
                try:
                    buf = os.read(fd, 65536)
                except BlockingIOError:
                    break
                packet(buf, nursery)


def main() -> None:
    import sys

    from tele.vif.tun import open_tun

    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tun = open_tun(name, offload=False)
    print("ready", flush=True)
    trio.run(serve, tun.fd, (host, port))


if __name__ == "__main__":
    main()
