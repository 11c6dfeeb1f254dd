"""The agent's manager link against a stand-in manager on 127.0.0.1 (real RPC and tunnel)."""

from __future__ import annotations

import trio

from tele.agent.manager_link import ManagerEngagements, identity, tcp_connector
from tele.net.tunnel import Accept, OpenRequest
from tele.rpc import agent_api as aapi
from tele.rpc.h2link import H2Stream
from tele.rpc.manager_api import REMAIN, SessionRequest
from tele.rpc.method import Empty
from tele.rpc.server import Router, serve_connection
from tele.rpc.tunnel import TunnelServer, splice
from tests.agent.servers import AGENT_PORT, running_agent, settings_for, start_tcp_server
from tests.agent.test_forward import exchange, expected


class StandInManager:
    """ArriveAsAgent, Remain, WatchEngagements (fed by `publish`) and engagement OPENs, which it
    splices to `handler_port` as the real manager splices them to a client's DIAL-BACK."""

    def __init__(self, handler_port: int) -> None:
        self.handler_port = handler_port
        self.arrivals: list[aapi.AgentIdentity] = []
        self.opens: list[OpenRequest] = []
        self.watch: trio.MemorySendChannel[aapi.EngagementList] | None = None
        self._watching = trio.Event()

    def router(self) -> Router:
        router = Router()
        router.unary(aapi.ARRIVE_AS_AGENT, self.arrive)
        router.unary(REMAIN, self.remain)
        router.stream(aapi.WATCH_ENGAGEMENTS, self.watch_engagements)
        router.raw(TunnelServer.matches, self.tunnel)
        return router

    async def arrive(self, agent: aapi.AgentIdentity) -> aapi.AgentSessionInfo:
        self.arrivals.append(agent)
        return aapi.AgentSessionInfo(session_id=f"s{len(self.arrivals)}", lease_seconds=15)

    async def remain(self, request: SessionRequest) -> Empty:
        return Empty()

    async def watch_engagements(self, request: SessionRequest):  # type: ignore[no-untyped-def]
        send, receive = trio.open_memory_channel[aapi.EngagementList](10)
        self.watch = send
        self._watching.set()
        async with receive:
            async for item in receive:
                yield item

    async def watching(self) -> trio.MemorySendChannel[aapi.EngagementList]:
        await self._watching.wait()
        self._watching = trio.Event()
        assert self.watch is not None
        return self.watch

    async def tunnel(self, stream: H2Stream) -> None:
        self.opens.append(OpenRequest.from_headers(stream.request_headers))
        handler = await trio.open_tcp_stream("127.0.0.1", self.handler_port)
        async with handler:
            await stream.send_response(Accept().to_headers())
            await splice(stream, handler)


async def test_engagements_from_the_manager_route_through_its_tunnel() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_tcp_server(nursery, "app")
            handler = await start_tcp_server(nursery, "handler")
            manager = StandInManager(handler.port)
            router = manager.router()
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            nursery.start_soon(
                trio.serve_listeners,
                lambda s: serve_connection(s, router),
                [listener],
            )
            settings = settings_for(app.port)
            environ = {"HOSTNAME": "echo-abc", "_TEL_APP_A_GREETING": "hi"}
            source = ManagerEngagements(
                identity(settings, environ),
                tcp_connector("127.0.0.1", listener.socket.getsockname()[1]),
                retry_initial=0.01,
            )
            await nursery.start(source.serve)
            async with running_agent(app.port, source) as agent:
                watch = await manager.watching()
                before = await exchange(agent, b"one")
                seen = source.updates
                engagement = aapi.Engagement(id="e1", container="echo", agent_port=AGENT_PORT)
                await watch.send(aapi.EngagementList(engagements=[engagement]))
                await source.wait_updated(seen)
                engaged = await exchange(agent, b"two")
                await watch.aclose()  # the manager ends the watch: the agent arrives again
                watch = await manager.watching()
                after = await exchange(agent, b"three")
            nursery.cancel_scope.cancel()
    assert before == expected("app", b"one")
    assert engaged == expected("handler", b"two")
    assert after == expected("app", b"three")
    [first, _again] = manager.arrivals  # arrived twice: the ended watch made it re-arrive
    assert (first.pod_name, first.pod_ip, first.workload_name) == ("echo-abc", "10.1.2.3", "echo")
    assert first.environment == {"echo": {"GREETING": "hi"}}
    [opened] = manager.opens
    assert (opened.dial_id, opened.session) == ("engage.e1", "s1")
    assert (str(opened.destination.ip), opened.destination.port) == ("10.1.2.3", app.port)
