"""UDP agent ports: each caller (source address) is a flow, routed when its first datagram
arrives, as a TCP connection is: to the engaging client (a tunnel stream with DATAGRAM framing,
tele.rpc.tunnel.relay_peer_datagrams), else to the app (a socket of the agent's connected to the
app's port in the pod). Replies go back to the caller from the agent port. A flow ends after
UDP_IDLE_TIMEOUT without a datagram either way; at most MAX_FLOWS at once, and each flow holds
at most FLOW_QUEUE datagrams not yet sent on (more are dropped, as a full socket buffer would).
Each wiretap of the port gets a copy flow per caller, fed without waiting (and, a wiretap with a
response port, a second one of the replies the caller was sent): a copy that does not fit its
queue is dropped and counted, the handler's answers are thrown away.
"""

from __future__ import annotations

import logging
import socket
from typing import Final, NoReturn

import trio

from tele.agent.engagements import Address, EngagementSource
from tele.errors import ConnectionFailed, TeleError
from tele.net.tunnel import MAX_DATAGRAM, Protocol
from tele.rpc.agent_api import Engagement
from tele.rpc.tunnel import UDP_IDLE_TIMEOUT, relay_peer_datagrams

log = logging.getLogger(__name__)

MAX_FLOWS: Final = 1024
"""Callers served at once on one UDP port: a flood of source addresses cannot grow the agent."""
FLOW_QUEUE: Final = 64


async def open_udp_sockets(port: int) -> list[trio.socket.SocketType]:
    """UDP sockets on `port` for every address: IPv4, and IPv6 when the pod has it."""
    opened: list[trio.socket.SocketType] = []
    try:
        v4 = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        opened.append(v4)
        await v4.bind(("0.0.0.0", port))
        if socket.has_ipv6:
            try:
                v6 = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            except OSError:
                return opened  # no IPv6 in this pod
            opened.append(v6)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                await v6.bind(("::", port))
            except OSError:
                v6.close()
                opened.remove(v6)
    except OSError as exc:
        for sock in opened:
            sock.close()
        raise ConnectionFailed(
            f"the traffic agent cannot listen on UDP port {port}: {exc.strerror or exc}."
        ) from exc
    return opened


async def serve_udp_port(
    sock: trio.socket.SocketType,
    source: EngagementSource,
    *,
    agent_port: int,
    app: Address,
    original_dst: Address,
    app_replaced: bool = False,
    idle_timeout: float = UDP_IDLE_TIMEOUT,
    max_flows: int = MAX_FLOWS,
) -> NoReturn:
    """Serve one UDP socket of an agent port until cancelled."""
    flows: dict[Address, trio.MemorySendChannel[bytes]] = {}
    route = _Route(source, agent_port, app, original_dst, app_replaced, idle_timeout)
    with sock:
        async with trio.open_nursery() as nursery:
            route.copies = _Copies(nursery, max_flows)
            while True:
                try:
                    datagram, peer = await sock.recvfrom(MAX_DATAGRAM)
                except OSError as exc:  # e.g. an ICMP error for an earlier reply
                    log.debug("UDP port %d: %s", agent_port, exc)
                    continue
                peer = peer[:2]
                flow = flows.get(peer)
                if flow is None:
                    if len(flows) >= max_flows:
                        log.warning(
                            "UDP port %d: %d flows open, dropping a datagram of %s",
                            agent_port,
                            len(flows),
                            peer,
                        )
                        continue
                    flow, queue = trio.open_memory_channel[bytes](FLOW_QUEUE)
                    flows[peer] = flow
                    nursery.start_soon(route.serve_flow, sock, peer, queue, flows)
                try:
                    flow.send_nowait(datagram)
                except trio.WouldBlock:
                    log.debug("UDP port %d: flow of %s is behind, dropping", agent_port, peer)
                except trio.BrokenResourceError:
                    flows.pop(peer, None)  # it just ended; the next datagram starts anew
                route.copy(peer, datagram)
    raise AssertionError("unreachable")  # pragma: no cover


CopyKey = tuple[Address, str, bool]
"""A copy flow: (caller, wiretap id, whether it copies the replies)."""


class _Copies:
    """The copy flows of one UDP socket: at most `max_flows` at once, run in `nursery`."""

    def __init__(self, nursery: trio.Nursery, max_flows: int) -> None:
        self.nursery = nursery
        self.max_flows = max_flows
        self.flows: dict[CopyKey, trio.MemorySendChannel[bytes]] = {}


class _Route:
    def __init__(
        self,
        source: EngagementSource,
        agent_port: int,
        app: Address,
        original_dst: Address,
        app_replaced: bool,
        idle_timeout: float,
    ) -> None:
        self.source = source
        self.agent_port = agent_port
        self.app = app
        self.original_dst = original_dst
        self.app_replaced = app_replaced
        self.idle_timeout = idle_timeout
        self.copies: _Copies | None = None

    def copy(self, peer: Address, datagram: bytes, *, reply: bool = False) -> None:
        """The wiretaps' copies of a datagram of `peer`'s flow (with `reply`: one it was
        sent, for the wiretaps that copy responses)."""
        for tap in self.source.taps(self.agent_port):
            if not reply or tap.copy_responses:
                self._copy(peer, tap, datagram, reply)

    def _copy(self, peer: Address, tap: Engagement, datagram: bytes, reply: bool) -> None:
        """A wiretap's copy of one datagram, on the copy flow of (caller, wiretap, direction);
        never waits: a full queue (a slow handler) or too many flows drops the copy, counted."""
        copies = self.copies
        assert copies is not None
        counters = self.source.wiretaps.counters(tap.id, reply)
        key = (peer, tap.id, reply)
        copy = copies.flows.get(key)
        if copy is None:
            if len(copies.flows) >= copies.max_flows:
                counters.dropped_bytes += len(datagram)
                return
            copy, queue = trio.open_memory_channel[bytes](FLOW_QUEUE)
            copies.flows[key] = copy
            if not reply:
                counters.connections += 1
            copies.nursery.start_soon(self.serve_copy, tap, peer, queue, reply)
        try:
            copy.send_nowait(datagram)
            counters.copied_bytes += len(datagram)
        except (trio.WouldBlock, trio.BrokenResourceError):
            counters.dropped_bytes += len(datagram)
        self.source.wiretaps.version += 1

    async def serve_flow(
        self,
        sock: trio.socket.SocketType,
        peer: Address,
        queue: trio.MemoryReceiveChannel[bytes],
        flows: dict[Address, trio.MemorySendChannel[bytes]],
    ) -> None:
        """One caller's flow, whatever happens to it (a failure ends this flow only)."""
        try:
            with queue:
                # Only whole-flow engagements take UDP (there are no HTTP requests in it).
                engaged = self.source.current(self.agent_port)
                engagement = next((e for e in engaged if e.mechanism == "tcp"), None)
                if engagement is not None:
                    await self._to_client(engagement, sock, peer, queue)
                elif self.app_replaced:
                    log.info(
                        "UDP port %d: the container is replaced and no client serves it",
                        self.agent_port,
                    )
                else:
                    await self._to_app(sock, peer, queue)
        except (OSError, TeleError, trio.BrokenResourceError) as exc:
            log.info("UDP flow of %s on port %d ended: %s", peer, self.agent_port, exc)
        except Exception:
            log.exception("UDP flow of %s on port %d failed", peer, self.agent_port)
        finally:
            flows.pop(peer, None)

    async def serve_copy(
        self, tap: Engagement, peer: Address, queue: trio.MemoryReceiveChannel[bytes], reply: bool
    ) -> None:
        """A wiretap's copy of one caller's flow (with `reply`: of what it was sent, to the
        wiretap's response handler): its datagrams to the client; the handler's answers are
        read and dropped. Ends when idle, or dropped (counted) when it fails."""
        counters = self.source.wiretaps.counters(tap.id, reply)
        try:
            with queue:
                tunnel = await self.source.open_to_client(
                    tap, self.original_dst, protocol=Protocol.UDP, response=reply
                )
                async with tunnel:
                    failed = await relay_peer_datagrams(
                        tunnel,
                        None,  # the handler's answers are dropped
                        peer,
                        queue,
                        name=f"UDP copy of {peer} for wiretap {tap.id}",
                        idle_timeout=self.idle_timeout,
                    )
                if failed is not None:
                    raise trio.BrokenResourceError(failed.value)
        except (OSError, TeleError, trio.BrokenResourceError) as exc:
            log.debug("UDP copy of %s for wiretap %s dropped: %s", peer, tap.id, exc)
            counters.dropped_connections += 1
            self.source.wiretaps.version += 1
        except Exception:
            log.exception("UDP copy of %s for wiretap %s failed", peer, tap.id)
            counters.dropped_connections += 1
        finally:
            if self.copies is not None:
                self.copies.flows.pop((peer, tap.id, reply), None)

    async def _to_client(
        self,
        engagement: Engagement,
        sock: trio.socket.SocketType,
        peer: Address,
        queue: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        tunnel = await self.source.open_to_client(
            engagement, self.original_dst, protocol=Protocol.UDP
        )
        async with tunnel:
            await relay_peer_datagrams(
                tunnel,
                sock,
                peer,
                queue,
                name=f"UDP flow of {peer} to {engagement.client or engagement.id}",
                idle_timeout=self.idle_timeout,
                sent=lambda reply: self.copy(peer, reply, reply=True),
            )

    async def _to_app(
        self,
        sock: trio.socket.SocketType,
        peer: Address,
        queue: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        family = socket.AF_INET6 if ":" in self.app[0] else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as upstream:
            await upstream.connect(self.app)
            with trio.CancelScope(deadline=trio.current_time() + self.idle_timeout) as idle:

                def refresh() -> None:
                    idle.deadline = trio.current_time() + self.idle_timeout

                async def replies() -> None:
                    while True:
                        try:
                            reply = await upstream.recv(MAX_DATAGRAM)
                        except ConnectionRefusedError:  # nothing listens (yet): ICMP
                            log.info("UDP port %d: the app does not listen on it", self.app[1])
                            continue
                        refresh()
                        try:
                            await sock.sendto(reply, peer)
                        except OSError as exc:
                            log.debug("UDP reply to %s failed: %s", peer, exc)
                            continue
                        self.copy(peer, reply, reply=True)  # once the caller has it

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(replies)
                    async for datagram in queue:
                        refresh()
                        try:
                            await upstream.send(datagram)
                        except ConnectionRefusedError:
                            log.info("UDP port %d: the app does not listen on it", self.app[1])
                    nursery.cancel_scope.cancel()
            if idle.cancelled_caught:
                log.debug("UDP flow of %s on port %d idle: ended", peer, self.agent_port)
