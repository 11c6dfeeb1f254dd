"""TCP relays from inside a namespace to a server in the host namespace (the API server).

Pods reach the API server at 10.96.0.1:443 in the node namespace, and the laptop namespace has
it at the kubeconfig's own 127.0.0.1:<port>: in both cases a listener opened inside the
namespace splices each connection to the real server, so no route or address is ever added to
the host namespace.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Awaitable, Callable

import trio

from . import netns


async def splice(a: trio.SocketStream, b: trio.SocketStream) -> None:
    """Copy both ways until both directions end (EOF forwarded); a failure ends both."""
    async with trio.open_nursery() as nursery:

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                # 256 KiB reads: a port-forward's bulk stream passes here (laptop -> API
                # server), and each read is a wake-up of this Python hop.
                while data := await src.receive_some(262144):
                    await dst.send_all(data)
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                nursery.cancel_scope.cancel()

        nursery.start_soon(pump, a, b)
        nursery.start_soon(pump, b, a)


async def _relay(stream: trio.SocketStream, host: str, port: int) -> None:
    async with stream:
        try:
            upstream = await trio.open_tcp_stream(host, port)
        except OSError:
            return
        async with upstream:
            await splice(stream, upstream)


async def serve_relay(
    namespace: str,
    listen: tuple[str, int],
    target: tuple[str, int],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `listen` inside `namespace`; relay every connection to `target` (host side)."""
    sock = await netns.socket_in(namespace)
    with sock:
        await sock.bind(listen)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, lambda s: _relay(s, *target), [listener])
            task_status.started()


def relaying_to(target: tuple[str, int]) -> Callable[..., Awaitable[None]]:
    """A `serve_api` for `laptop.serve_laptop` that relays each connection to `target`: for an
    API server that this trio run cannot serve itself (a test's cluster in another thread)."""

    async def handle(stream: trio.SocketStream) -> None:
        await _relay(stream, *target)

    return functools.partial(trio.serve_listeners, handle)


def cleanup_sync(cluster: str) -> list[str]:
    """Delete every namespace of sandbox `cluster` (after a crash); returns their names."""
    gone = [
        n
        for n in netns.list_netns()
        if n in (f"{cluster}-node", f"{cluster}-laptop") or n.startswith(f"{cluster}-pod-")
    ]
    for n in sorted(gone, key=lambda n: n.endswith("-node")):
        netns.delete_sync(n)
    # The laptop's own resolv.conf and mount namespace (tele.sandbox.network.laptop), left when
    # the process was killed.
    shutil.rmtree(netns.ETC_NETNS / f"{cluster}-laptop", ignore_errors=True)
    netns.unpin_mount_namespace_sync(f"{cluster}-laptop")
    return gone
