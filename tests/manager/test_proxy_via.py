"""--proxy-via in the manager and the agent (tele.manager.proxyvia, tele.agent.manager_link): a
client's `via.<route>` stream is spliced to the stream the workload's agent opens after dialling
from its pod. Hostile or mistaken peers: another session's route id, another agent answering a
dial, UDP, loopback/metadata destinations, a failed dial, no agent."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tele.agent.manager_link import ManagerEngagements
from tele.manager import proxyvia
from tele.manager.proxyvia import ProxyVia
from tele.net.tunnel import Destination, Protocol, ResetReason
from tele.rpc import agent_api as aapi
from tele.rpc.h2link import H2Link, open_link, serve_link
from tele.rpc.tunnel import TunnelError, TunnelServer, connect_tcp, dial, splice

WORKLOAD = ("Deployment", "default", "via")
AGENT = "agent-session"
CLIENT = "client-session"


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


@asynccontextmanager
async def manager(routes: ProxyVia) -> AsyncIterator[tuple[H2Link, Destination]]:
    """A link to a tunnel server that hands dial-id streams to `routes`, and an echo server."""
    server = TunnelServer(dial_back=routes.handle)
    a, b = trio.socket.socketpair()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(lambda: serve_link(trio.SocketStream(b), server.handle))
        async with open_link(trio.SocketStream(a), client_side=True) as link:
            yield link, Destination(Protocol.TCP, ipaddress.ip_address("127.0.0.1"), port)
        nursery.cancel_scope.cancel()


async def agent(
    routes: ProxyVia, link: H2Link, *, session: str = AGENT, fail: ResetReason | None = None
) -> None:
    """A stand-in agent: dials what it is asked (loopback here) and opens `proxy.<id>`."""
    async with trio.open_nursery() as nursery:
        async for asked in routes.watch(AGENT):

            async def answer(asked: aapi.ProxyDial = asked) -> None:
                destination = Destination(
                    Protocol.TCP, ipaddress.ip_address(asked.host), asked.port
                )
                if fail is not None:
                    dial_id = f"{aapi.PROXY_FAIL_PREFIX}{asked.dial_id}.{fail.value}"
                    with pytest.raises(TunnelError):
                        await dial(link, destination, session=session, dial_id=dial_id)
                    return
                local = await connect_tcp(destination)
                async with local:
                    dial_id = aapi.PROXY_DIAL_PREFIX + asked.dial_id
                    try:
                        tunnel = await dial(link, destination, session=session, dial_id=dial_id)
                    except TunnelError as exc:
                        assert exc.reason is ResetReason.POLICY
                        return
                    await splice(tunnel, local)

            nursery.start_soon(answer)


async def test_a_route_carries_bytes_through_the_agent() -> None:
    routes = ProxyVia(
        agent_sessions=lambda key: [AGENT] if key == WORKLOAD else [], allow_loopback=True
    )
    route = routes.add(CLIENT, WORKLOAD)
    async with manager(routes) as (link, destination), trio.open_nursery() as nursery:
        nursery.start_soon(agent, routes, link)
        await trio.testing.wait_all_tasks_blocked()
        stream = await dial(link, destination, session=CLIENT, dial_id="via." + route)
        await stream.send_all(b"through the pod")
        got = b""
        while len(got) < len(b"through the pod"):
            got += await stream.receive_some(100)
        assert got == b"through the pod"
        stream.close()
        nursery.cancel_scope.cancel()
    routes.end_session(CLIENT)
    assert routes.routes == {}


@pytest.mark.parametrize(
    ("session", "route", "protocol", "ip", "reason", "detail"),
    [
        (CLIENT + "-other", "mine", Protocol.TCP, "127.0.0.1", ResetReason.POLICY, "no such"),
        (CLIENT, "guessed", Protocol.TCP, "127.0.0.1", ResetReason.POLICY, "no such"),
        (CLIENT, "mine", Protocol.UDP, "127.0.0.1", ResetReason.POLICY, "TCP only"),
        (CLIENT, "mine", Protocol.TCP, "169.254.169.254", ResetReason.POLICY, "metadata"),
        (CLIENT, "mine", Protocol.TCP, "::ffff:127.0.0.1", ResetReason.POLICY, "loopback"),
    ],
)
async def test_what_a_route_does_not_carry(
    session: str, route: str, protocol: Protocol, ip: str, reason: ResetReason, detail: str
) -> None:
    routes = ProxyVia(agent_sessions=lambda key: [AGENT])
    mine = routes.add(CLIENT, WORKLOAD)
    async with manager(routes) as (link, _), trio.open_nursery() as nursery:
        nursery.start_soon(agent, routes, link)
        await trio.testing.wait_all_tasks_blocked()
        destination = Destination(protocol, ipaddress.ip_address(ip), 80)
        dial_id = "via." + (mine if route == "mine" else "0" * 24)
        with pytest.raises(TunnelError) as refused:
            await dial(link, destination, session=session, dial_id=dial_id)
        assert refused.value.reason is reason and detail in str(refused.value)
        nursery.cancel_scope.cancel()


async def test_no_agent_is_unreachable_and_a_failed_dial_says_why() -> None:
    sessions: list[str] = []
    routes = ProxyVia(agent_sessions=lambda key: sessions, allow_loopback=True)
    route = routes.add(CLIENT, WORKLOAD)
    async with manager(routes) as (link, destination):
        with pytest.raises(TunnelError) as refused:
            await dial(link, destination, session=CLIENT, dial_id="via." + route)
        assert refused.value.reason is ResetReason.UNREACHABLE
        assert "no traffic agent of Deployment default/via" in str(refused.value)
        sessions.append(AGENT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(agent, routes, link, fail=ResetReason.REFUSED))
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(TunnelError) as refused:
                await dial(link, destination, session=CLIENT, dial_id="via." + route)
            assert refused.value.reason is ResetReason.REFUSED
            nursery.cancel_scope.cancel()


async def test_another_agent_cannot_answer_a_dial(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dial id reaches only the agent asked; another session's stream for it is reset and
    the client's stream ends when the real agent does not answer."""
    monkeypatch.setattr(proxyvia, "AGENT_DIAL_TIMEOUT", 1.0)
    routes = ProxyVia(agent_sessions=lambda key: [AGENT], allow_loopback=True)
    route = routes.add(CLIENT, WORKLOAD)
    async with manager(routes) as (link, destination), trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(agent, routes, link, session="intruder"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(TunnelError) as refused:
            await dial(link, destination, session=CLIENT, dial_id="via." + route)
        assert refused.value.reason is ResetReason.TIMEOUT
        nursery.cancel_scope.cancel()


def test_routes_per_session_are_bounded() -> None:
    routes = ProxyVia(agent_sessions=lambda key: [])
    for n in range(proxyvia.MAX_ROUTES_PER_SESSION):
        routes.add(CLIENT, ("Deployment", "default", f"w{n}"))
    assert routes.add(CLIENT, ("Deployment", "default", "w0")) in routes.routes  # the same
    with pytest.raises(ValueError, match="64 workloads"):
        routes.add(CLIENT, ("Deployment", "default", "one-more"))


class FakePool:
    def __init__(self) -> None:
        self.dial_ids: list[str] = []

    async def dial(
        self, destination: Destination, *, session: str, dial_id: str | None = None, wait: float
    ) -> object:
        self.dial_ids.append(dial_id or "")
        raise TunnelError(ResetReason.CANCELLED, "refused")


@pytest.mark.parametrize(
    ("host", "port", "reason"),
    [
        ("169.254.169.254", 80, "policy"),
        ("127.0.0.1", 8080, "policy"),
        ("fe80::1", 80, "policy"),
        ("not-an-ip", 80, "protocol"),
        ("10.0.0.1", 0, "protocol"),
    ],
)
async def test_the_agent_never_dials_its_pods_own_or_metadata_addresses(
    host: str, port: int, reason: str
) -> None:
    identity = aapi.AgentIdentity(
        pod_name="via-1",
        namespace="default",
        pod_ip="10.244.0.9",
        workload_name="via",
        workload_kind="Deployment",
        version="test",
    )

    @asynccontextmanager
    async def never() -> AsyncIterator[trio.abc.Stream]:
        raise AssertionError("no link in this test")
        yield  # pragma: no cover

    source = ManagerEngagements(identity, never)
    source.session_id = AGENT
    pool = FakePool()
    source.pool = pool  # type: ignore[assignment]
    await source._proxy_dial(aapi.ProxyDial(dial_id="abc", host=host, port=port))
    assert pool.dial_ids == [f"proxyfail.abc.{reason}"]
