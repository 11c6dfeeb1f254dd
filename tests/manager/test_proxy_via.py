"""--proxy-via in the manager and the agent (tele.manager.proxyvia, tele.agent.manager_link): a
client's `via.<route>` stream is spliced to the stream the workload's agent opens after dialling
from its pod. Hostile or mistaken peers: another session's route id, another agent answering a
dial, loopback/metadata destinations, a failed dial, no agent; for UDP flows (sent by the
agent from a socket of its pod) a truncated datagram, too many flows, idle flows."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tele.agent import manager_link
from tele.agent.manager_link import ManagerEngagements
from tele.manager import proxyvia
from tele.manager.proxyvia import ProxyVia
from tele.net.dialpolicy import never_dialed
from tele.net.tunnel import DatagramDecoder, Destination, Protocol, ResetReason, encode_datagram
from tele.rpc import agent_api as aapi
from tele.rpc.h2link import H2Link, H2Stream, open_link, serve_link
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
        (CLIENT, "mine", Protocol.UDP, "169.254.169.254", ResetReason.POLICY, "metadata"),
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


async def test_a_dial_waits_for_an_arrived_agent_to_open_its_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An agent counts for its workload (PROXY_VIA answers) once it arrived; its dial watch
    opens a moment later (and again after the manager restarts). A dial in between is carried
    once the watch opens, not refused; an agent that never opens one: refused after the bound."""
    monkeypatch.setattr(proxyvia, "AGENT_DIAL_TIMEOUT", 1.0)
    routes = ProxyVia(agent_sessions=lambda key: [AGENT], allow_loopback=True)
    route = routes.add(CLIENT, WORKLOAD)
    got: list[bytes] = []
    async with manager(routes) as (link, destination), trio.open_nursery() as nursery:

        async def call() -> None:
            stream = await dial(link, destination, session=CLIENT, dial_id="via." + route)
            await stream.send_all(b"early")
            got.append(await stream.receive_some(100))
            stream.close()

        with trio.fail_after(5):
            with pytest.raises(TunnelError) as refused:
                await call()  # no watch within the bound
            assert refused.value.reason is ResetReason.UNREACHABLE
            assert "no traffic agent of Deployment default/via" in str(refused.value)
            async with trio.open_nursery() as calls:
                calls.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                nursery.start_soon(agent, routes, link)
        assert got == [b"early"]
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


IDENTITY = aapi.AgentIdentity(
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


class FakePool:
    def __init__(self) -> None:
        self.dial_ids: list[str] = []

    async def dial(
        self, destination: Destination, *, session: str, dial_id: str | None = None, wait: float
    ) -> object:
        self.dial_ids.append(dial_id or "")
        raise TunnelError(ResetReason.CANCELLED, "refused")


@pytest.mark.parametrize(
    ("host", "port", "protocol", "reason"),
    [
        ("169.254.169.254", 80, "tcp", "policy"),
        ("127.0.0.1", 8080, "tcp", "policy"),
        ("fe80::1", 80, "tcp", "policy"),
        ("not-an-ip", 80, "tcp", "protocol"),
        ("10.0.0.1", 0, "tcp", "protocol"),
        ("169.254.169.254", 53, "udp", "policy"),
        ("127.0.0.1", 53, "udp", "policy"),
        ("10.0.0.1", 0, "udp", "protocol"),
        ("10.0.0.1", 53, "sctp", "protocol"),
        ("10.0.0.1", 53, "UDP" * 1000, "protocol"),
    ],
)
async def test_the_agent_never_dials_its_pods_own_or_metadata_addresses(
    host: str, port: int, protocol: str, reason: str
) -> None:
    source = ManagerEngagements(IDENTITY, never)
    source.session_id = AGENT
    pool = FakePool()
    source.pool = pool  # type: ignore[assignment]
    await source._proxy_dial(aapi.ProxyDial(dial_id="abc", host=host, port=port, protocol=protocol))
    assert pool.dial_ids == [f"proxyfail.abc.{reason}"]
    assert source.proxied == source.proxied_udp == 0


async def test_an_agent_at_its_bound_refuses_udp_flows_too() -> None:
    source = ManagerEngagements(IDENTITY, never)
    source.session_id = AGENT
    pool = FakePool()
    source.pool = pool  # type: ignore[assignment]
    source.proxied = manager_link.MAX_PROXIED
    await source._proxy_dial(aapi.ProxyDial(dial_id="b", host="10.0.0.1", port=53, protocol="udp"))
    assert pool.dial_ids == ["proxyfail.b.overloaded"]


class LinkPool:
    """The agent's pool, standing in: its streams go over the test's link to the manager."""

    def __init__(self, link: H2Link) -> None:
        self.link = link

    async def dial(
        self, destination: Destination, *, session: str, dial_id: str | None = None, wait: float
    ) -> H2Stream:
        return await dial(self.link, destination, session=session, dial_id=dial_id)


@asynccontextmanager
async def udp_echo() -> AsyncIterator[tuple[Destination, list[tuple[str, int]]]]:
    """A UDP echo server on loopback, and the peers it answered."""
    peers: list[tuple[str, int]] = []
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))

        async def serve() -> None:
            while True:
                data, peer = await sock.recvfrom(65536)
                peers.append(peer)
                await sock.sendto(data, peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            port = sock.getsockname()[1]
            yield Destination(Protocol.UDP, ipaddress.ip_address("127.0.0.1"), port), peers
            nursery.cancel_scope.cancel()


async def real_agent(routes: ProxyVia, source: ManagerEngagements) -> None:
    async with trio.open_nursery() as nursery:
        async for asked in routes.watch(AGENT):
            nursery.start_soon(source._proxy_dial, asked)


@pytest.fixture
def agent_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's dial policy as the manager's allow_loopback_dials (the test's servers are
    on loopback; the policy's refusals are tested above)."""
    monkeypatch.setattr(
        manager_link, "never_dialed", functools.partial(never_dialed, allow_loopback=True)
    )


async def receive_datagrams(stream: trio.abc.Stream, count: int) -> list[bytes]:
    decoder = DatagramDecoder()
    got: list[bytes] = []
    with trio.fail_after(10):
        while len(got) < count:
            data = await stream.receive_some(65536)
            assert data, f"the stream ended after {got}"
            got += decoder.feed(data)
    return got


async def test_a_route_carries_a_udp_flow_sent_from_the_agents_socket(
    agent_on_loopback: None,
) -> None:
    """Datagrams both ways through the agent's socket (the server answers one peer: the
    agent's), until the flow is idle: then the agent half-closes and lets its socket go."""
    routes = ProxyVia(agent_sessions=lambda key: [AGENT], allow_loopback=True)
    route = routes.add(CLIENT, WORKLOAD)
    async with manager(routes) as (link, _), udp_echo() as (server, peers):
        source = ManagerEngagements(IDENTITY, never)
        source.session_id = AGENT
        source.pool = LinkPool(link)  # type: ignore[assignment]
        source.proxy_udp_idle = 1.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(real_agent, routes, source)
            await trio.testing.wait_all_tasks_blocked()
            stream = await dial(link, server, session=CLIENT, dial_id="via." + route)
            await stream.send_all(encode_datagram(b"query 1") + encode_datagram(b"query 2"))
            assert await receive_datagrams(stream, 2) == [b"query 1", b"query 2"]
            assert source.proxied_udp == 1 and len(set(peers)) == 1
            with trio.fail_after(10):  # idle: the agent ends the flow
                assert await stream.receive_some(65536) == b""
            await trio.testing.wait_all_tasks_blocked()
            assert source.proxied_udp == source.proxied == 0
            stream.close()
            nursery.cancel_scope.cancel()


async def test_a_truncated_datagram_resets_only_its_flow(agent_on_loopback: None) -> None:
    """A client whose stream ends inside a datagram: the agent resets that flow (PROTOCOL) and
    lets its socket go; another flow of the same route goes on."""
    routes = ProxyVia(agent_sessions=lambda key: [AGENT], allow_loopback=True)
    route = routes.add(CLIENT, WORKLOAD)
    async with manager(routes) as (link, _), udp_echo() as (server, _peers):
        source = ManagerEngagements(IDENTITY, never)
        source.session_id = AGENT
        source.pool = LinkPool(link)  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(real_agent, routes, source)
            await trio.testing.wait_all_tasks_blocked()
            good = await dial(link, server, session=CLIENT, dial_id="via." + route)
            bad = await dial(link, server, session=CLIENT, dial_id="via." + route)
            await bad.send_all(b"\x00\x10abc")  # 16 bytes announced, 3 sent
            await bad.send_eof()
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
                while await bad.receive_some(65536):
                    pass
            await good.send_all(encode_datagram(b"still here"))
            assert await receive_datagrams(good, 1) == [b"still here"]
            assert source.proxied_udp == 1
            good.close()
            nursery.cancel_scope.cancel()


async def test_an_agent_answering_a_udp_dial_with_a_connection_is_refused() -> None:
    """An agent older than UDP --proxy-via dials TCP whatever it is asked: its stream is reset
    and the client's refused (PROTOCOL), instead of datagrams spliced to a connection."""
    routes = ProxyVia(agent_sessions=lambda key: [AGENT], allow_loopback=True)
    route = routes.add(CLIENT, WORKLOAD)
    answered: list[ResetReason] = []

    async def old_agent(link: H2Link) -> None:
        async for asked in routes.watch(AGENT):
            tcp = Destination(Protocol.TCP, ipaddress.ip_address(asked.host), asked.port)
            dial_id = aapi.PROXY_DIAL_PREFIX + asked.dial_id
            try:
                await dial(link, tcp, session=AGENT, dial_id=dial_id)
            except TunnelError as exc:
                answered.append(exc.reason)

    async with manager(routes) as (link, _), trio.open_nursery() as nursery:
        nursery.start_soon(old_agent, link)
        await trio.testing.wait_all_tasks_blocked()
        udp = Destination(Protocol.UDP, ipaddress.ip_address("127.0.0.1"), 53)
        with pytest.raises(TunnelError) as refused:
            await dial(link, udp, session=CLIENT, dial_id="via." + route)
        assert refused.value.reason is ResetReason.PROTOCOL
        await trio.testing.wait_all_tasks_blocked()
        assert answered == [ResetReason.PROTOCOL]
        nursery.cancel_scope.cancel()


async def test_one_udp_flow_too_many_ends_the_oldest(
    agent_on_loopback: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At MAX_PROXIED_UDP flows a new one ends the oldest (a resolver's one-query flows would
    otherwise hold the agent until idle and refuse every new query)."""
    monkeypatch.setattr(manager_link, "MAX_PROXIED_UDP", 2)
    routes = ProxyVia(agent_sessions=lambda key: [AGENT], allow_loopback=True)
    route = routes.add(CLIENT, WORKLOAD)
    async with manager(routes) as (link, _), udp_echo() as (server, _peers):
        source = ManagerEngagements(IDENTITY, never)
        source.session_id = AGENT
        source.pool = LinkPool(link)  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(real_agent, routes, source)
            await trio.testing.wait_all_tasks_blocked()
            flows = []
            for n in range(3):
                flow = await dial(link, server, session=CLIENT, dial_id="via." + route)
                await flow.send_all(encode_datagram(b"flow %d" % n))
                assert await receive_datagrams(flow, 1) == [b"flow %d" % n]
                flows.append(flow)
            assert source.proxied_udp == 2
            with trio.fail_after(10):
                try:
                    assert await flows[0].receive_some(65536) == b""
                except trio.BrokenResourceError:
                    pass  # ended either way: the agent let its socket go
            for n, flow in enumerate(flows[1:], 1):
                await flow.send_all(encode_datagram(b"again %d" % n))
                assert await receive_datagrams(flow, 1) == [b"again %d" % n]
                flow.close()
            nursery.cancel_scope.cancel()
