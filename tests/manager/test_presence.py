"""A client that vanished (its last connection to the manager closed: a laptop asleep, a daemon
killed) has its engagements suspended at once, so the app serves that traffic again instead of a
black hole for the rest of the lease; calling in again on a new connection resumes them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from tele.daemon.lease import SessionLease
from tele.errors import ConnectionFailed
from tele.k8s.client import KubeClient
from tele.manager.sessions import Presence
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.client import open_client
from tele.rpc.links import LinkPool
from tele.testing.waits import wait_for
from tests.manager.test_engage_kinds import Agent, engage, ready
from tests.manager.test_manager import IDENTITY, start_manager


async def test_a_vanished_clients_engagements_are_suspended_and_resumed(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager, agent_link = await ready(nursery, kube)
    agent = Agent(agent_link, "api-1-b", [])
    await nursery.start(agent.run)
    port = agent_link.link.transport.socket.getpeername()[1]  # type: ignore[attr-defined]

    laptop = await trio.open_tcp_stream("127.0.0.1", port)
    async with open_client(laptop) as client:
        session = (await client.call(api.ARRIVE, IDENTITY)).session_id
        await client.call(aapi.ENGAGE, engage(session, port="web"))
        await wait_for(lambda: len(agent.engagements) == 1)
    # The laptop's only connection is gone; its lease (60 s) is not.
    started = trio.current_time()
    await wait_for(lambda: agent.engagements == [], timeout=5)
    print(f"\nengagement suspended {trio.current_time() - started:.3f} s after the link closed")
    assert manager.sessions.get(session, manager.clock()) is not None

    again = await trio.open_tcp_stream("127.0.0.1", port)
    async with open_client(again) as client:
        await client.call(api.REMAIN, api.SessionRequest(session_id=session))
        await wait_for(lambda: len(agent.engagements) == 1)


async def test_a_live_client_whose_heartbeat_link_drops_calls_in_at_once_on_another(
    nursery: trio.Nursery, kube: KubeClient
) -> None:
    manager, client = await start_manager(nursery, kube)  # a 60 s lease: REMAIN every 20 s
    port = client.link.transport.socket.getpeername()[1]  # type: ignore[attr-defined]
    path_up = True

    @asynccontextmanager
    async def connect() -> AsyncIterator[trio.abc.Stream]:
        if not path_up:
            raise ConnectionFailed("the path to the manager is down")
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            yield stream

    pool = LinkPool(connect, count=2, backoff_initial=0.05, backoff_max=0.1)
    await nursery.start(pool.serve)
    await pool.wait_up(2)
    lease = SessionLease(pool, kube_context="test", mapped_namespaces=[], api_timeout=5)
    await lease.arrive()
    nursery.start_soon(lease.heartbeat)
    assert lease.session is not None
    session = lease.session.session_id
    first = lease.heartbeat_link
    assert first is not None and manager.presence.connections[session]

    # The link the session called in on drops, and no new one can be made: the client still
    # has its other link, and says so at once (not at its next REMAIN, 20 s away).
    path_up = False
    started = trio.current_time()
    first.close("dropped by the test")
    await wait_for(lambda: lease.heartbeat_link is not first, timeout=5)
    await wait_for(lambda: session in manager.presence.connections, timeout=5)
    print(f"\npresent again {trio.current_time() - started:.3f} s after its link dropped")
    assert session not in manager.presence.absent
    assert manager.sessions.get(session, manager.clock()) is not None

    # With no link at all, the manager counts it gone (its lease goes on); back at once
    # when a link comes up again.
    path_up = True
    for link in pool.links:
        link.close("dropped by the test")
    await wait_for(lambda: session in manager.presence.connections, timeout=5)
    assert manager.sessions.get(session, manager.clock()) is not None


class _Conn:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def on_end(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:
        for callback in self.callbacks:
            callback()


def test_presence_counts_connections_per_session() -> None:
    changes: list[str] = []
    presence = Presence(on_change=lambda: changes.append("x"))
    one, two = _Conn(), _Conn()
    presence.seen("s", one)
    presence.seen("s", two)
    presence.seen("s", one)  # the same connection again: one callback only
    assert len(one.callbacks) == 1
    one.end()
    assert presence.absent == set()  # another connection is still open
    two.end()
    assert presence.absent == {"s"} and changes == ["x"]
    presence.seen("s", None)  # a call without a connection (in-process) proves nothing
    assert presence.absent == {"s"}
    presence.seen("s", _Conn())
    assert presence.absent == set() and changes == ["x", "x"]
    presence.forget("s")
    assert presence.connections == {}
