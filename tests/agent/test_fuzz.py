"""Property: whatever a caller sends to an engaged port (HTTP/1 or h2c, well-formed or not),
the agent answers or drops that connection and keeps serving every other one: nothing leaves
the connection's own task (a failure there ended the port's listener, and with it the agent)."""

from __future__ import annotations

import h2.config
import h2.connection
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tele.agent.engagements import StaticEngagements
from tele.agent.http import H2_PREFACE
from tele.rpc.agent_api import Engagement
from tests.agent.servers import AGENT_PORT, HttpClient, running_agent, start_http_server

ENGAGED = Engagement(
    id="e1",
    container="echo",
    agent_port=AGENT_PORT,
    mechanism="http",
    client="dev@laptop",
    headers=[("x-user", "dev")],
)

tokens = st.sampled_from(
    [b"GET", b"POST", b"CONNECT", b" ", b"/", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\r\n\r\n",
     b"Host: a", b"Content-Length: 5", b"Content-Length: -1", b"Transfer-Encoding: chunked",
     b"0\r\n\r\n", b"ffffffff\r\n", b"Upgrade: websocket", b"Connection: upgrade", b"x-user: dev",
     b":", b"\x00", b"\xff", b"Expect: 100-continue", b"Host: a\r\nHost: b"]
)  # fmt: skip
http1 = st.lists(st.one_of(tokens, st.binary(max_size=20)), max_size=30).map(b"".join)


def h2_frames(payload: list[tuple[int, int, int, bytes]]) -> bytes:
    frames = b""
    for kind, flags, stream_id, body in payload:
        frames += len(body).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")
        frames += body
    return frames


def h2_request() -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    client.send_headers(1, [*headers, ("x-user", "dev")], end_stream=True)
    return client.data_to_send()


frame = st.tuples(
    st.integers(0, 12), st.integers(0, 255), st.integers(0, 9), st.binary(max_size=40)
)
h2c = st.one_of(
    st.lists(frame, max_size=8).map(lambda fs: H2_PREFACE + h2_frames(fs)),
    st.tuples(st.integers(0, 200), st.binary(max_size=40)).map(
        lambda cut: h2_request()[: cut[0]] + cut[1]
    ),
)
callers = st.lists(st.one_of(http1, h2c), min_size=10, max_size=10)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(callers)
def test_any_caller_bytes_end_at_most_their_own_connection(payloads: list[bytes]) -> None:
    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                app = await start_http_server(nursery, "app")
                handler = await start_http_server(nursery, "handler")
                source = StaticEngagements([ENGAGED], handlers={"e1": ("127.0.0.1", handler.port)})
                async with running_agent(app.port, source) as agent:
                    for payload in payloads:
                        stream = await trio.open_tcp_stream("127.0.0.1", agent)
                        async with stream:
                            try:
                                await stream.send_all(payload)
                                await stream.send_eof()
                                with trio.move_on_after(2):
                                    while await stream.receive_some(65536):
                                        pass
                            except trio.BrokenResourceError:
                                pass  # the agent reset the connection: a drop
                    async with HttpClient.connect(agent) as good:
                        status, headers, _ = await good.request("/after", [("x-user", "dev")])
                        assert (status, headers["x-served-by"]) == (200, "handler")
                nursery.cancel_scope.cancel()

    trio.run(main)
