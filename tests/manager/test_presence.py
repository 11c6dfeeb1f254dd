"""A client that vanished (its last connection to the manager closed: a laptop asleep, a daemon
killed) has its engagements suspended at once, so the app serves that traffic again instead of a
black hole for the rest of the lease; calling in again on a new connection resumes them."""

from __future__ import annotations

from collections.abc import Callable

import trio

from tele.k8s.client import KubeClient
from tele.manager.sessions import Presence
from tele.rpc import agent_api as aapi
from tele.rpc import manager_api as api
from tele.rpc.client import open_client
from tele.testing.waits import wait_for
from tests.manager.test_engage_kinds import Agent, engage, ready
from tests.manager.test_manager import IDENTITY


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
