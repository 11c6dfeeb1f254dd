"""Small servers and clients on 127.0.0.1 for the agent's tests: the 'app' and the 'handler'."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

from tele.agent.config import AgentSettings
from tele.agent.engagements import EngagementSource
from tele.agent.forward import serve
from tele.contracts.agentconfig import AgentConfig, ContainerConfig, Intercept

AGENT_PORT = 9900


@dataclass
class Server:
    """A listening test server: its port and the connections it accepted."""

    name: str
    port: int = 0
    connections: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)
    """(method, target) of every HTTP request served."""


def settings_for(app_port: int, *, app_protocol: str = "") -> AgentSettings:
    intercept = Intercept(
        service_name="echo",
        service_uid="uid-1",
        service_port=80,
        app_protocol=app_protocol,
        target_port_numeric=False,
        container_port_name="http",
        container_port=app_port,
        agent_port=AGENT_PORT,
    )
    config = AgentConfig(
        agent_name="echo",
        namespace="default",
        workload_name="echo",
        workload_kind="Deployment",
        manager_host="traffic-manager.ambassador",
        manager_port=8081,
        agent_image="tele/traffic-agent",
        containers=[
            ContainerConfig(
                name="echo",
                env_prefix="A_",
                mount_point="/tel_app_mounts/echo",
                intercepts=[intercept],
            )
        ],
    )
    return AgentSettings(name="echo", pod_ip="10.1.2.3", config=config)


@asynccontextmanager
async def running_agent(
    app_port: int, source: EngagementSource, *, app_protocol: str = ""
) -> AsyncIterator[int]:
    """An agent serving one intercept (agent port 9900 -> app_port); yields its real port."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve, listeners={AGENT_PORT: [listener]}),
            settings_for(app_port, app_protocol=app_protocol),
            source,
        )
        yield port
        nursery.cancel_scope.cancel()


async def _listen(
    nursery: trio.Nursery, server: Server, handler: object, tls: ssl.SSLContext | None = None
) -> Server:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    server.port = listener.socket.getsockname()[1]

    async def counted(stream: trio.abc.Stream) -> None:
        server.connections += 1
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_side=True)
        try:
            await handler(stream)  # type: ignore[operator]
        except trio.BrokenResourceError:
            pass  # a caller that went away mid-exchange

    nursery.start_soon(trio.serve_listeners, counted, [listener])
    return server


async def start_tcp_server(nursery: trio.Nursery, name: str) -> Server:
    """Sends `<name>:` at once, then after the caller's half-close `<length>:<sha256>` of all it
    read, then its own half-close: both directions and half-close are visible to the caller."""
    server = Server(name)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(f"{name}:".encode())
            digest = hashlib.sha256()
            total = 0
            while data := await stream.receive_some(65536):
                digest.update(data)
                total += len(data)
            await stream.send_all(f"{total}:{digest.hexdigest()}".encode())
            await stream.send_eof()

    return await _listen(nursery, server, handle)


async def start_http_server(
    nursery: trio.Nursery, name: str, *, tls: ssl.SSLContext | None = None
) -> Server:
    """HTTP/1.1 keep-alive: 200 with body `<name> <method> <target> <body length>` and header
    `x-served-by: <name>`; an `Upgrade: echo` request gets 101 and then an echo of raw bytes."""
    server = Server(name)

    async def handle(stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)

        async def next_event() -> object:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                    continue
                return event

        async with stream:
            while True:
                event = await next_event()
                if not isinstance(event, h11.Request):
                    return
                method, target = event.method.decode(), event.target.decode()
                server.requests.append((method, target))
                if (b"upgrade", b"echo") in list(event.headers):
                    await next_event()  # EndOfMessage
                    await stream.send_all(
                        conn.send(
                            h11.InformationalResponse(
                                status_code=101,
                                headers=[("upgrade", "echo"), ("connection", "upgrade")],
                            )
                        )
                        or b""
                    )
                    rest, _ = conn.trailing_data
                    if rest:
                        await stream.send_all(rest)
                    while data := await stream.receive_some(65536):
                        await stream.send_all(data)
                    return
                length = 0
                while isinstance(body := await next_event(), h11.Data):
                    length += len(body.data)
                text = f"{name} {method} {target} {length}".encode()
                out = conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[("x-served-by", name), ("content-length", str(len(text)))],
                    )
                )
                out = (out or b"") + (conn.send(h11.Data(data=text)) or b"")
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()

    return await _listen(nursery, server, handle, tls)


class HttpClient:
    """One HTTP/1.1 connection; `request` sends one and returns (status, headers, body)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, port: int, *, tls: ssl.SSLContext | None = None, server_hostname: str = ""
    ) -> AsyncIterator[HttpClient]:
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_hostname=server_hostname)
        async with stream:
            yield cls(stream)

    async def next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            return event

    async def request(
        self,
        target: str,
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        *,
        method: str = "GET",
        body_chunks: list[bytes] = (),  # type: ignore[assignment]
    ) -> tuple[int, dict[str, str], bytes]:
        all_headers = [("host", "echo"), *headers]
        if body_chunks:
            all_headers.append(("transfer-encoding", "chunked"))
        out = self.conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        for chunk in body_chunks:
            out += self.conn.send(h11.Data(data=chunk)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)
        response = await self.next_event()
        assert isinstance(response, h11.Response), response
        body = b""
        while isinstance(event := await self.next_event(), h11.Data):
            body += event.data
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        headers_out = {k.decode(): v.decode() for k, v in response.headers}
        return response.status_code, headers_out, body


async def start_h2c_server(nursery: trio.Nursery, name: str) -> Server:
    """HTTP/2 prior knowledge: each stream gets 200, `x-served-by: <name>` and the body
    `<name> <method> <path> <body length>` once its request has ended."""
    import h2.config
    import h2.connection
    import h2.events

    server = Server(name)

    async def handle(stream: trio.SocketStream) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        await stream.send_all(conn.data_to_send())
        requests: dict[int, tuple[str, str, int]] = {}
        async with stream:
            while data := await stream.receive_some(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        fields = dict(event.headers)
                        requests[event.stream_id] = (fields[":method"], fields[":path"], 0)
                        server.requests.append((fields[":method"], fields[":path"]))
                    elif isinstance(event, h2.events.DataReceived):
                        method, path, length = requests[event.stream_id]
                        requests[event.stream_id] = (method, path, length + len(event.data))
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        method, path, length = requests.pop(event.stream_id)
                        text = f"{name} {method} {path} {length}".encode()
                        conn.send_headers(
                            event.stream_id, [(":status", "200"), ("x-served-by", name)]
                        )
                        conn.send_data(event.stream_id, text, end_stream=True)
                await stream.send_all(conn.data_to_send())

    return await _listen(nursery, server, handle)


async def h2c_requests(
    port: int, requests: list[tuple[str, list[tuple[str, str]], bytes]]
) -> list[tuple[int, str]]:
    """Send all (path, headers, body) at once on ONE h2c connection, each on its own stream;
    returns (status, body) in request order."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    ids = []
    pending: dict[int, bytes] = {}
    for path, headers, body in requests:
        stream_id = conn.get_next_available_stream_id()
        ids.append(stream_id)
        conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "echo"),
                (":path", path),
                *headers,
            ],
        )
        pending[stream_id] = body

    def pump() -> None:
        """Send what the windows allow; end each stream once its body is out."""
        for stream_id, unsent in list(pending.items()):
            body = unsent
            while body:
                window = min(
                    conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                conn.send_data(stream_id, body[:window])
                body = body[window:]
            pending[stream_id] = body
            if not body:
                conn.end_stream(stream_id)
                del pending[stream_id]

    pump()
    results: dict[int, list[object]] = {i: [0, b""] for i in ids}
    done: set[int] = set()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(conn.data_to_send())
        while len(done) < len(ids):
            data = await stream.receive_some(65536)
            assert data, "the agent closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    results[event.stream_id][0] = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    results[event.stream_id][1] += event.data  # type: ignore[operator]
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done.add(event.stream_id)
            pump()
            await stream.send_all(conn.data_to_send())
    return [(int(results[i][0]), bytes(results[i][1]).decode()) for i in ids]  # type: ignore[call-overload]
