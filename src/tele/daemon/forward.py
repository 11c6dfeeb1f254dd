"""Local forwarders of the daemon: a port on this machine whose connections (or datagrams) go
through the session's tunnel to one cluster address — `--to-pod`, and the agent's file server
for mounts.

```
serve_forward(dial, destination, port=P)         one listener on 127.0.0.1:P (0 = pick one)
 '- per accepted connection: dial(destination) -> splice (tele.rpc.tunnel)
serve_udp_forward(dial, destination, port=P)     one UDP socket on 127.0.0.1:P
 '- per local peer (address): a tunnel stream with DATAGRAM framing, ended when idle
```
Both are services: `await nursery.start(...)` returns the bound `(host, port)` once listening
(or raises `PortInUse`), and they live until their scope is cancelled. Whatever goes wrong with
one connection or flow stays with it: the listener keeps serving.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import trio

from tele.errors import ConnectionFailed, UserError
from tele.net.tunnel import (
    MAX_DATAGRAM,
    Destination,
    Protocol,
)
from tele.rpc.h2link import H2Stream
from tele.rpc.tunnel import UDP_IDLE_TIMEOUT, relay_peer_datagrams, splice

log = logging.getLogger(__name__)

Dialer = Callable[[Destination], Awaitable[H2Stream]]
"""Opens a tunnel stream to a destination (the session's `dial`); raises ConnectionFailed."""

MAX_UDP_FLOWS: Final = 256
"""Local UDP peers served at once; a datagram from one more peer is dropped (and logged)."""
UDP_QUEUE: Final = 64
"""Datagrams waiting per flow for the tunnel; beyond that they are dropped, as UDP may."""

Address = tuple[str, int]


class PortInUse(UserError):
    """The local port a forwarder should listen on is taken (or not allowed)."""


def _bind_error(protocol: Protocol, host: str, port: int, exc: OSError) -> UserError:
    if exc.errno == errno.EADDRINUSE:
        return PortInUse(
            f"Local port {port}/{protocol.value.upper()} on {host} is already in use; "
            "stop what listens there or pick another port."
        )
    return PortInUse(f"Cannot listen on {host}:{port}/{protocol.value.upper()}: {exc.strerror}.")


async def serve_forward(
    dial: Dialer,
    destination: Destination,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen on `host:port` (TCP) and splice every accepted connection to `destination`."""
    if destination.protocol is not Protocol.TCP:
        raise ValueError("serve_forward forwards TCP; use serve_udp_forward for UDP")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise _bind_error(Protocol.TCP, host, port, exc) from None
    bound: Address = listeners[0].socket.getsockname()[:2]
    log.info("forwarding %s:%d to %s", *bound, destination)

    async def handle(local: trio.SocketStream) -> None:
        await _relay_tcp(dial, destination, local)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(bound)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _relay_tcp(dial: Dialer, destination: Destination, local: trio.SocketStream) -> None:
    async with local:
        try:
            tunnel = await dial(destination)
        except ConnectionFailed as exc:
            # The local client sees its connection reset: the closest a TCP peer can say "no".
            log.warning("forward to %s: %s", destination, exc)
            local.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        try:
            outcome = await splice(tunnel, local)
        finally:
            tunnel.close()
        if outcome is not None:
            log.debug("forward to %s ended with a reset (%s)", destination, outcome.value)


async def serve_udp_forward(
    dial: Dialer,
    destination: Destination,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    idle_timeout: float = UDP_IDLE_TIMEOUT,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Receive datagrams on `host:port`; each local peer gets its own tunnel flow to
    `destination`, and the replies go back to that peer. A flow ends after `idle_timeout`."""
    if destination.protocol is not Protocol.UDP:
        raise ValueError("serve_udp_forward forwards UDP; use serve_forward for TCP")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        try:
            await sock.bind((host, port))
        except OSError as exc:
            raise _bind_error(Protocol.UDP, host, port, exc) from None
        bound: Address = sock.getsockname()[:2]
        log.info("forwarding %s:%d/UDP to %s", *bound, destination)
        flows: dict[Address, trio.MemorySendChannel[bytes]] = {}
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            while True:
                datagram, peer = await sock.recvfrom(MAX_DATAGRAM)
                peer = peer[:2]
                flow = flows.get(peer)
                if flow is None:
                    if len(flows) >= MAX_UDP_FLOWS:
                        log.warning(
                            "forward: %d UDP flows open, dropping one from %s", len(flows), peer
                        )
                        continue
                    flow, queue = trio.open_memory_channel[bytes](UDP_QUEUE)
                    flows[peer] = flow
                    nursery.start_soon(
                        _udp_flow, dial, destination, sock, peer, queue, flows, idle_timeout
                    )
                try:
                    flow.send_nowait(datagram)
                except trio.WouldBlock:
                    log.debug("forward: UDP flow from %s is behind, dropping a datagram", peer)
                except trio.BrokenResourceError:
                    flows.pop(peer, None)  # the flow just ended; the next datagram starts anew
    raise AssertionError("unreachable")  # pragma: no cover


async def _udp_flow(
    dial: Dialer,
    destination: Destination,
    sock: trio.socket.SocketType,
    peer: Address,
    queue: trio.MemoryReceiveChannel[bytes],
    flows: dict[Address, trio.MemorySendChannel[bytes]],
    idle_timeout: float,
) -> None:
    try:
        with queue:
            try:
                tunnel = await dial(destination)
            except ConnectionFailed as exc:
                log.warning("forward to %s: %s", destination, exc)
                return
            try:
                await relay_peer_datagrams(
                    tunnel,
                    sock,
                    peer,
                    queue,
                    name=f"forward: UDP flow of {peer}",
                    idle_timeout=idle_timeout,
                )
            finally:
                tunnel.close()
    finally:
        flows.pop(peer, None)
