"""The http mechanism over HTTP/2 with prior knowledge: routed stream by stream."""

from __future__ import annotations

import trio

from tele.agent.engagements import StaticEngagements
from tele.rpc.agent_api import Engagement
from tests.agent.servers import AGENT_PORT, h2c_requests, running_agent, start_h2c_server


async def test_streams_of_one_connection_are_routed_each_on_its_own() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_h2c_server(nursery, "app")
            handler = await start_h2c_server(nursery, "handler")
            engagement = Engagement(
                id="e1",
                container="echo",
                agent_port=AGENT_PORT,
                mechanism="http",
                headers=[("x-user", "dev")],
                path_prefix=["/api/"],
            )
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", handler.port)})
            big = b"z" * 300_000  # beyond the default 64 KiB windows: flow control must work
            async with running_agent(app.port, source) as agent:
                results = await h2c_requests(
                    agent,
                    [
                        ("/api/a", [("x-user", "dev")], b"12345"),
                        ("/api/b", [], b""),
                        ("/other", [("x-user", "dev")], b"1"),
                        ("/api/big", [("x-user", "dev")], big),
                        ("/big", [], big),
                    ],
                )
            nursery.cancel_scope.cancel()
    assert results == [
        (200, "handler POST /api/a 5"),
        (200, "app POST /api/b 0"),
        (200, "app POST /other 1"),
        (200, f"handler POST /api/big {len(big)}"),
        (200, f"app POST /big {len(big)}"),
    ]
    assert (app.connections, handler.connections) == (1, 1)


async def test_unreachable_handler_gets_a_502_stream_and_others_still_reach_the_app() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_h2c_server(nursery, "app")
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            dead = sock.getsockname()[1]
            sock.close()
            engagement = Engagement(
                id="e1",
                container="echo",
                agent_port=AGENT_PORT,
                mechanism="http",
                path_equal=["/mine"],
            )
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", dead)})
            async with running_agent(app.port, source) as agent:
                results = await h2c_requests(agent, [("/mine", [], b""), ("/yours", [], b"ab")])
            nursery.cancel_scope.cancel()
    (status, body), second = results
    assert status == 502 and body.startswith("tele traffic agent: the local handler")
    assert second == (200, "app POST /yours 2")


async def test_broken_http2_gets_goaway_and_other_connections_go_on() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_h2c_server(nursery, "app")
            engagement = Engagement(
                id="e1",
                container="echo",
                agent_port=AGENT_PORT,
                mechanism="http",
                path_equal=["/mine"],
            )
            async with running_agent(app.port, StaticEngagements([engagement])) as agent:
                bad = await trio.open_tcp_stream("127.0.0.1", agent)
                async with bad:
                    # The preface, then a DATA frame on stream 0 (a connection error).
                    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                    await bad.send_all(preface + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
                    answer = b""
                    while data := await bad.receive_some(4096):
                        answer += data
                results = await h2c_requests(agent, [("/yours", [], b"x")])
            nursery.cancel_scope.cancel()
    # The agent's SETTINGS, then GOAWAY (frame type 7), then it closed the connection.
    assert b"\x07\x00\x00\x00\x00\x00" in answer
    assert results == [(200, "app POST /yours 1")]
