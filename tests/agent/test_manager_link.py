"""The agent's manager link against a stand-in manager on 127.0.0.1 (real RPC and tunnel)."""

from __future__ import annotations

from pathlib import Path

import trio

from tele.agent.manager_link import ManagerEngagements, identity, tcp_connector
from tele.net.tunnel import Accept, OpenRequest
from tele.rpc import agent_api as aapi
from tele.rpc.h2link import H2Stream
from tele.rpc.manager_api import (
    AUTHENTICATE,
    REMAIN,
    AuthenticateReply,
    AuthenticateRequest,
    SessionRequest,
)
from tele.rpc.method import Empty
from tele.rpc.server import Router, serve_connection
from tele.rpc.tunnel import TunnelServer, splice
from tele.testing.waits import wait_for
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


class TokenCheckingManager(StandInManager):
    """Records the tokens the agent presents, and which one its link held when it arrived."""

    def __init__(self) -> None:
        super().__init__(0)
        self.tokens: list[AuthenticateRequest] = []
        self.arrived_with: list[str] = []

    def router(self) -> Router:
        router = super().router()
        router.unary(AUTHENTICATE, self.authenticate)
        return router

    async def authenticate(self, request: AuthenticateRequest) -> AuthenticateReply:
        self.tokens.append(request)
        return AuthenticateReply(username="system:serviceaccount:default:echo")

    async def arrive(self, agent: aapi.AgentIdentity) -> aapi.AgentSessionInfo:
        self.arrivals.append(agent)
        self.arrived_with.append(self.tokens[-1].token if self.tokens else "")
        return aapi.AgentSessionInfo(session_id="s1", lease_seconds=0.3)


async def test_the_agent_presents_its_pod_token_and_again_when_it_rotates(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    manager = TokenCheckingManager()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            router = manager.router()
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            nursery.start_soon(
                trio.serve_listeners, lambda s: serve_connection(s, router), [listener]
            )
            source = ManagerEngagements(
                identity(settings_for(1), {"HOSTNAME": "echo-abc"}),
                tcp_connector("127.0.0.1", listener.socket.getsockname()[1]),
                retry_initial=0.01,
                token_file=str(token_file),
            )
            await nursery.start(source.serve)
            await manager.watching()
            token_file.write_text("second-token\n")  # the kubelet rotated it
            await wait_for(lambda: len(manager.tokens) == 2)
            nursery.cancel_scope.cancel()
    assert manager.arrived_with == ["first-token"]  # presented before arriving
    assert [(t.token, t.agent) for t in manager.tokens] == [
        ("first-token", True),
        ("second-token", True),
    ]
    assert len(manager.arrivals) == 1  # the session went on with the new token
