"""The http mechanism over HTTP/1.1: request-by-request routing on one keep-alive connection."""

from __future__ import annotations

import trio
import trio.testing

from tele.agent.engagements import StaticEngagements
from tele.rpc.agent_api import Engagement
from tests.agent.servers import AGENT_PORT, HttpClient, running_agent, start_http_server


def http_engagement(**filters: object) -> Engagement:
    return Engagement(
        id="e1",
        container="echo",
        agent_port=AGENT_PORT,
        mechanism="http",
        client="dev@laptop",
        **filters,  # type: ignore[arg-type]
    )


async def test_header_match_splits_one_keep_alive_connection() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            handler = await start_http_server(nursery, "handler")
            engagement = http_engagement(headers=[("x-user", "dev-*")])
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", handler.port)})
            async with running_agent(app.port, source) as agent, HttpClient.connect(agent) as c:
                served = []
                for i, headers in enumerate(
                    [[], [("X-User", "dev-anna")], [("x-user", "ops")], [("x-user", "dev-")], []]
                ):
                    status, response_headers, body = await c.request(
                        f"/r{i}", headers, method="POST", body_chunks=[b"a" * 10, b"b" * 5]
                    )
                    assert status == 200
                    served.append((response_headers["x-served-by"], body.decode()))
            nursery.cancel_scope.cancel()
    assert served == [
        ("app", "app POST /r0 15"),
        ("handler", "handler POST /r1 15"),
        ("app", "app POST /r2 15"),
        ("handler", "handler POST /r3 15"),
        ("app", "app POST /r4 15"),
    ]
    # One caller connection; the agent kept one upstream connection to each destination.
    assert (app.connections, handler.connections) == (1, 1)


async def test_paths_are_ored_and_anded_with_headers() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            handler = await start_http_server(nursery, "handler")
            engagement = http_engagement(
                path_equal=["/exact"], path_prefix=["/api/"], path_regex=[r"^/v\d+/items$"]
            )
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", handler.port)})
            targets = ["/exact", "/exact/no", "/api/x?q=1", "/apix", "/v2/items", "/v2/items/3"]
            async with running_agent(app.port, source) as agent, HttpClient.connect(agent) as c:
                plain = [(await c.request(t))[1]["x-served-by"] for t in targets]
                source.set([http_engagement(path_prefix=["/api/"], headers=[("x-dev", "1")])])
                both = [
                    (await c.request(t, h))[1]["x-served-by"]
                    for t, h in [
                        ("/api/a", []),
                        ("/api/a", [("x-dev", "1")]),
                        ("/b", [("x-dev", "1")]),
                    ]
                ]
            nursery.cancel_scope.cancel()
    assert plain == ["handler", "app", "handler", "app", "handler", "app"]
    assert both == ["app", "handler", "app"]


async def test_malformed_request_gets_400_and_other_connections_go_on() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            source = StaticEngagements([http_engagement(headers=[("x-user", "a")])])
            async with running_agent(app.port, source) as agent, HttpClient.connect(agent) as good:
                assert (await good.request("/before"))[2] == b"app GET /before 0"
                bad = await trio.open_tcp_stream("127.0.0.1", agent)
                async with bad:
                    await bad.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nbad header line\r\n\r\n")
                    answer = b""
                    while data := await bad.receive_some(4096):
                        answer += data
                assert (await good.request("/after"))[2] == b"app GET /after 0"
            nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"tele traffic agent: malformed HTTP request" in answer
    assert app.requests == [("GET", "/before"), ("GET", "/after")]


async def test_unreachable_handler_gets_502_naming_it() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            sock = trio.socket.socket()
            await sock.bind(("127.0.0.1", 0))
            dead = sock.getsockname()[1]
            sock.close()
            source = StaticEngagements([http_engagement()], handlers={"e1": ("127.0.0.1", dead)})
            async with running_agent(app.port, source) as agent, HttpClient.connect(agent) as c:
                status, headers, body = await c.request("/x")
            nursery.cancel_scope.cancel()
    assert status == 502
    assert headers["connection"] == "close"
    assert body.startswith(b"tele traffic agent: the local handler of dev@laptop (engagement e1)")


async def test_upgrade_passes_the_rest_of_the_connection_through() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            handler = await start_http_server(nursery, "handler")
            source = StaticEngagements(
                [http_engagement(headers=[("x-user", "me")])],
                handlers={"e1": ("127.0.0.1", handler.port)},
            )
            async with running_agent(app.port, source) as agent:
                stream = await trio.open_tcp_stream("127.0.0.1", agent)
                async with stream:
                    await stream.send_all(
                        b"GET /ws HTTP/1.1\r\nHost: a\r\nX-User: me\r\nUpgrade: echo\r\n"
                        b"Connection: upgrade\r\n\r\nearly"
                    )
                    received = b""
                    while not received.endswith(b"early"):
                        received += await stream.receive_some(4096)
                    await stream.send_all(b" and late")
                    await stream.send_eof()
                    while data := await stream.receive_some(4096):
                        received += data
            nursery.cancel_scope.cancel()
    assert received.startswith(b"HTTP/1.1 101 ")
    assert received.endswith(b"\r\n\r\nearly and late")
    assert handler.requests == [("GET", "/ws")] and app.requests == []


async def test_an_app_connection_closed_between_requests_is_replaced_not_502() -> None:
    async def one_request_per_connection(stream: trio.SocketStream) -> None:
        # Answers one request, keep-alive headers and all, then closes (an app's idle timeout).
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            nursery.start_soon(trio.serve_listeners, one_request_per_connection, [listener])
            app_port = listener.socket.getsockname()[1]
            source = StaticEngagements([http_engagement(headers=[("x-user", "nobody")])])
            async with running_agent(app_port, source) as agent, HttpClient.connect(agent) as c:
                first = await c.request("/1")
                # Let the app's close reach the agent's pooled connection before the next one.
                await trio.testing.wait_all_tasks_blocked()
                second = await c.request("/2")
            nursery.cancel_scope.cancel()
    assert (first[0], first[2]) == (200, b"ok")
    assert (second[0], second[2]) == (200, b"ok")


async def test_malformed_body_gets_400_and_the_app_connection_is_not_reused() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            source = StaticEngagements([http_engagement(headers=[("x-user", "a")])])
            async with running_agent(app.port, source) as agent:
                bad = await trio.open_tcp_stream("127.0.0.1", agent)
                async with bad:
                    await bad.send_all(
                        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"
                    )
                    answer = b""
                    while data := await bad.receive_some(4096):
                        answer += data
                async with HttpClient.connect(agent) as good:
                    after = await good.request("/after")
            nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"malformed HTTP request body" in answer
    assert after[2] == b"app GET /after 0"


async def test_many_callers_at_once_each_reach_the_right_side() -> None:
    # 40 concurrent keep-alive callers, every other one a "developer": each of their requests
    # is answered by the handler, the others' by the app, whatever the interleaving.
    answers: dict[int, list[str]] = {}

    async def caller(agent: int, index: int) -> None:
        headers = [("x-user", f"dev-{index}")] if index % 2 else []
        async with HttpClient.connect(agent) as c:
            for round_ in range(5):
                _, response_headers, _ = await c.request(f"/c{index}/{round_}", headers)
                answers.setdefault(index, []).append(response_headers["x-served-by"])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            app = await start_http_server(nursery, "app")
            handler = await start_http_server(nursery, "handler")
            engagement = http_engagement(headers=[("x-user", "dev-*")])
            source = StaticEngagements([engagement], handlers={"e1": ("127.0.0.1", handler.port)})
            async with running_agent(app.port, source) as agent, trio.open_nursery() as callers:
                for index in range(40):
                    callers.start_soon(caller, agent, index)
            nursery.cancel_scope.cancel()
    assert answers == {i: ["handler" if i % 2 else "app"] * 5 for i in range(40)}
