"""`tele connect --proxy-via CIDR=WORKLOAD`: connections dialled from a workload's pod.

A client that may engage the workload (PROXY_VIA: the same RBAC as an intercept) gets a route
id; its OPENs for a destination behind the route carry the dial id `via.<route id>`. The manager
picks a connected agent of the workload and sends it ProxyDial{X} on the agent's
WATCH_PROXY_DIALS stream; the agent dials the destination from its pod (refusing loopback,
link-local and metadata addresses, as the manager's tunnel does) and opens `proxy.X` (or
`proxyfail.X.<reason>`) to the manager, which splices it to the client's stream. Every stream
is opened towards the manager, as for engagements (tele.manager.dialback). A UDP flow goes the
same way: the agent sends it from a socket of its pod, with DATAGRAM framing on the stream,
until the flow is idle (the splice here carries the frames as bytes).

Bounded: routes per session, dials queued per agent, dials waiting for their agent stream.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from tele.manager.table import WorkloadKey
from tele.net.dialpolicy import never_dialed
from tele.net.tunnel import Accept, OpenRequest, Protocol, Refuse, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc.h2stream import H2Stream
from tele.rpc.tunnel import reset, splice

log = logging.getLogger(__name__)

AGENT_DIAL_TIMEOUT = 10.0
"""How long a client's stream waits for the agent's answer (its dial and its stream)."""
MAX_ROUTES_PER_SESSION = 64
MAX_QUEUED_PER_AGENT = 256
MAX_PENDING = 4096


@dataclass(frozen=True)
class Route:
    session_id: str
    workload: WorkloadKey


Paired = tuple[H2Stream, trio.Event] | ResetReason


@dataclass(frozen=True)
class _Pending:
    """A dial asked of an agent: which one, where its stream goes, the protocol asked."""

    agent: str
    send: trio.MemorySendChannel[Paired]
    protocol: Protocol


class ProxyVia:
    """Routes of client sessions through workloads, and the dials waiting for agents."""

    def __init__(
        self, *, agent_sessions: Callable[[WorkloadKey], list[str]], allow_loopback: bool = False
    ) -> None:
        self._agent_sessions = agent_sessions
        self._allow_loopback = allow_loopback
        """(tests: the manager's allow_loopback_dials; agents refuse loopback whatever this)"""
        """Live agent session ids of a workload."""
        self.routes: dict[str, Route] = {}
        self._agents: dict[str, trio.MemorySendChannel[aapi.ProxyDial]] = {}
        self._pending: dict[str, _Pending] = {}
        self._next = 0
        self._watched = trio.Event()
        """Set (and replaced) whenever an agent opens its dial watch."""

    def add(self, session_id: str, workload: WorkloadKey) -> str:
        for route_id, route in self.routes.items():
            if route == Route(session_id, workload):
                return route_id
        if sum(1 for r in self.routes.values() if r.session_id == session_id) >= (
            MAX_ROUTES_PER_SESSION
        ):
            raise ValueError(f"a session may proxy through {MAX_ROUTES_PER_SESSION} workloads")
        route_id = secrets.token_hex(12)
        self.routes[route_id] = Route(session_id, workload)
        return route_id

    def end_session(self, session_id: str) -> None:
        for route_id in [k for k, r in self.routes.items() if r.session_id == session_id]:
            del self.routes[route_id]

    async def watch(self, agent_session: str) -> AsyncIterator[aapi.ProxyDial]:
        """An agent's stream of dials (a newer watch of the same session replaces this one)."""
        send, receive = trio.open_memory_channel[aapi.ProxyDial](MAX_QUEUED_PER_AGENT)
        old = self._agents.get(agent_session)
        if old is not None:
            old.close()
        self._agents[agent_session] = send
        self._watched.set()
        self._watched = trio.Event()
        try:
            async with receive:
                async for dial in receive:
                    yield dial
        finally:
            if self._agents.get(agent_session) is send:
                del self._agents[agent_session]

    @staticmethod
    def is_agent_stream(dial_id: str) -> bool:
        return dial_id.startswith((aapi.PROXY_DIAL_PREFIX, aapi.PROXY_FAIL_PREFIX))

    async def handle(self, request: OpenRequest, stream: H2Stream) -> None:
        """A `via.` stream of a client, or a `proxy.`/`proxyfail.` stream of an agent."""
        dial_id = request.dial_id or ""
        if dial_id.startswith(aapi.VIA_DIAL_PREFIX):
            await self._from_client(request, stream, dial_id[len(aapi.VIA_DIAL_PREFIX) :])
        else:
            await self._from_agent(request, stream, dial_id)

    async def _refuse(self, stream: H2Stream, reason: ResetReason, detail: str) -> None:
        try:
            await stream.send_response(Refuse(reason, detail).to_headers(), end_stream=True)
        except trio.BrokenResourceError:
            pass

    async def _from_client(self, request: OpenRequest, stream: H2Stream, route_id: str) -> None:
        route = self.routes.get(route_id)
        destination = request.destination
        if route is None or route.session_id != request.session:
            await self._refuse(stream, ResetReason.POLICY, "no such --proxy-via route")
            return
        kind, namespace, name = route.workload
        why = never_dialed(destination.ip, allow_loopback=self._allow_loopback)
        if why:
            await self._refuse(
                stream, ResetReason.POLICY, f"--proxy-via does not dial {destination.ip}: {why}"
            )
            return
        agents = await self._watching_agents(route.workload)
        if not agents or len(self._pending) >= MAX_PENDING:
            await self._refuse(
                stream,
                ResetReason.UNREACHABLE if not agents else ResetReason.OVERLOADED,
                f"no traffic agent of {kind} {namespace}/{name} is connected"
                if not agents
                else "too many --proxy-via dials waiting",
            )
            return
        self._next += 1
        agent = agents[self._next % len(agents)]
        dial_id = secrets.token_hex(12)
        send, receive = trio.open_memory_channel[Paired](1)
        self._pending[dial_id] = _Pending(agent, send, destination.protocol)
        try:
            self._agents[agent].send_nowait(
                aapi.ProxyDial(
                    dial_id=dial_id,
                    host=str(destination.ip),
                    port=destination.port,
                    protocol=destination.protocol.value,
                )
            )
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._pending.pop(dial_id, None)
            await self._refuse(stream, ResetReason.OVERLOADED, "the agent has too many dials")
            return
        paired: Paired | None = None
        with trio.move_on_after(AGENT_DIAL_TIMEOUT):
            paired = await receive.receive()
        self._pending.pop(dial_id, None)
        if paired is None or isinstance(paired, ResetReason):
            reason = paired if paired is not None else ResetReason.TIMEOUT
            await self._refuse(
                stream,
                reason,
                f"{destination} dialled from {kind} {namespace}/{name}: {reason.value}",
            )
            return
        agent_stream, done = paired
        try:
            accept = Accept().to_headers()
            await agent_stream.send_response(accept)
            await stream.send_response(accept)
            await splice(stream, agent_stream)
        except trio.BrokenResourceError:
            reset(agent_stream, ResetReason.RESET)
        finally:
            done.set()

    async def _watching_agents(self, workload: WorkloadKey) -> list[str]:
        """The workload's agent sessions that watch for dials. An agent counts for the
        workload (PROXY_VIA answers) as soon as it arrived, and opens its watch a moment later:
        a dial in between waits for that (at most AGENT_DIAL_TIMEOUT) rather than being
        refused; with no agent session at all it is refused at once."""
        with trio.move_on_after(AGENT_DIAL_TIMEOUT):
            while True:
                watched = self._watched
                sessions = self._agent_sessions(workload)
                agents = [s for s in sessions if s in self._agents]
                if agents or not sessions:
                    return agents
                await watched.wait()
        return []

    async def _from_agent(self, request: OpenRequest, stream: H2Stream, dial_id: str) -> None:
        failed = dial_id.startswith(aapi.PROXY_FAIL_PREFIX)
        rest = dial_id[len(aapi.PROXY_FAIL_PREFIX if failed else aapi.PROXY_DIAL_PREFIX) :]
        token, _, why = rest.partition(".")
        pending = self._pending.get(token)
        if pending is None or pending.agent != request.session:  # only the agent that was asked
            reset(stream, ResetReason.POLICY)
            return
        del self._pending[token]
        send = pending.send
        if not failed and request.destination.protocol is not pending.protocol:
            # An agent older than UDP --proxy-via dials TCP whatever it is asked: its stream
            # would carry a connection where the client expects datagrams.
            log.warning(
                "proxy-via: an agent answered a %s dial with %s (an older agent?)",
                pending.protocol.value,
                request.destination.protocol.value,
            )
            send.send_nowait(ResetReason.PROTOCOL)
            reset(stream, ResetReason.PROTOCOL)
            return
        if failed:
            try:
                reason = ResetReason(why)
            except ValueError:
                reason = ResetReason.UNREACHABLE
            send.send_nowait(reason)  # (capacity 1, one send per token)
            await self._refuse(stream, ResetReason.CANCELLED, "")
            return
        done = trio.Event()
        try:
            send.send_nowait((stream, done))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            reset(stream, ResetReason.TIMEOUT)
            return
        await done.wait()  # the client side's task splices; this handler owns the stream
