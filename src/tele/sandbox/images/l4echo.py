"""`tele-sandbox/l4-echo`: echoes TCP streams and UDP datagrams on $PORT (default 9000); with
$UDP_SAY_PEER set, a UDP reply starts with the sender's address and a space (who sent it)."""

from __future__ import annotations

import os
import signal
import socket

import trio


async def _tcp(stream: trio.SocketStream) -> None:
    try:
        async with stream:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _udp(port: int, say_peer: bool) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("0.0.0.0", port))
    while True:
        data, peer = await sock.recvfrom(65536)
        if say_peer:
            data = f"{peer[0]} ".encode() + data
        await sock.sendto(data, peer)


async def _main() -> None:
    port = int(os.environ.get("PORT", "9000"))
    print(f"l4-echo listening on tcp and udp port {port}", flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_udp, port, bool(os.environ.get("UDP_SAY_PEER")))
        nursery.start_soon(trio.serve_tcp, _tcp, port)


def main() -> None:
    # As its container's PID 1 the program gets no default action for SIGTERM: without a
    # handler a pod deletion would wait for the whole grace period and SIGKILL.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        trio.run(_main)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
