"""The port-forward dialer against a small TLS websocket server speaking the API server's
v4.channel.k8s.io framing; kubeconfig loading (token, exec plugin, client certificate)."""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import json
import ssl
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
import trustme
import yaml

from tele.k8s import portforward
from tele.k8s.config import ClusterConnection, load_connection
from tele.k8s.errors import KubeconfigError, PortForwardBroken, PortForwardError
from tele.net.tunnel import Destination, Protocol
from tele.rpc.h2link import open_link, serve_link
from tele.rpc.links import LinkPool
from tele.rpc.tunnel import TunnelServer, dial

TOKEN = "s3cret"
PORT = 8080


@dataclass
class FakeApiServer:
    """What the test server offers: its URL, CA, and the server ends of `pipe` pods."""

    url: str
    ca: trustme.CA
    piped: trio.MemoryReceiveChannel[portforward.PortForwardStream]
    requests: list[str]

    def client_ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def connection(self, token: str = TOKEN) -> ClusterConnection:
        return ClusterConnection(
            server=self.url,
            context="test",
            namespace="default",
            ssl_context=self.client_ssl(),
            _authorization=lambda: f"Bearer {token}",
        )


async def _handle(
    request: trio_websocket.WebSocketRequest,
    piped: trio.MemorySendChannel[portforward.PortForwardStream],
    log: list[str],
    client_cert_seen: Callable[[], bool] | None = None,
) -> None:
    log.append(request.path)
    headers = dict(request.headers)
    if headers.get(b"authorization") != f"Bearer {TOKEN}".encode():
        body = json.dumps({"kind": "Status", "message": "Unauthorized"}).encode()
        await request.reject(401, body=body)
        return
    target = portforward.parse_portforward_target(request.path)
    if target is None or portforward.SUBPROTOCOL not in request.proposed_subprotocols:
        await request.reject(400)
        return
    _namespace, pod, port = target
    if pod == "missing":
        message = f'pods "{pod}" not found'
        await request.reject(404, body=json.dumps({"kind": "Status", "message": message}).encode())
        return
    stream = await portforward.accept_portforward(request, port, description=pod)
    if pod == "echo":
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.aclose()
    elif pod == "tunnel":
        # A traffic-manager stand-in: an h2 link inside the port-forward, serving tunnel OPENs.
        await serve_link(stream, TunnelServer().handle)
    elif pod == "pipe":
        await piped.send(stream)
        await trio.sleep_forever()  # the test owns the stream now; cancelled at teardown
    elif pod == "refused":
        await stream.send_all(b"partial")
        await stream.send_error(
            f"error forwarding port {port} to pod {pod}: dial tcp4 127.0.0.1:{port}: "
            "connect: connection refused"
        )
    elif pod == "badchannel":
        await stream._ws.send_message(b"\x07junk")
        await trio.sleep_forever()
    elif pod == "midframe":
        # A binary frame header announcing 4,096 bytes, one byte of it, then the TCP
        # connection drops: the websocket closes mid-frame.
        raw = stream._ws._stream
        await raw.send_all(b"\x82\x7e\x10\x00\x00")
        await trio.aclose_forcefully(raw)


@pytest.fixture
async def api_server(nursery: trio.Nursery) -> AsyncIterator[FakeApiServer]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    send, receive = trio.open_memory_channel[portforward.PortForwardStream](10)
    requests: list[str] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await _handle(request, send, requests)

    server = await nursery.start(
        lambda task_status: trio_websocket.serve_websocket(
            handler,
            "127.0.0.1",
            0,
            server_context,
            receive_buffer_size=portforward.RECEIVE_BUFFER_SIZE,
            max_message_size=portforward.MAX_RECEIVE_MESSAGE,
            task_status=task_status,
        )
    )
    yield FakeApiServer(f"https://127.0.0.1:{server.port}", ca, receive, requests)


async def test_two_way_stream_contract(api_server: FakeApiServer) -> None:
    # The port-forwards' nurseries live in the exit stack, inside the deadline's scope.
    with trio.fail_after(30):
        async with AsyncExitStack() as stack:

            async def make_pair() -> tuple[trio.abc.Stream, trio.abc.Stream]:
                client = await stack.enter_async_context(
                    portforward.open_portforward(api_server.connection(), "ns", "pipe", PORT)
                )
                server = await api_server.piped.receive()
                return client, server

            await trio.testing.check_two_way_stream(make_pair, None)
    assert api_server.requests[0] == "/api/v1/namespaces/ns/pods/pipe/portforward?ports=8080"


async def test_echo_large_messages_arrive_intact(api_server: FakeApiServer) -> None:
    payload = bytes(range(256)) * (4 * 4096 + 7)  # ~4 MiB: several 1 MiB messages each way
    received = bytearray()
    with trio.fail_after(10):
        async with portforward.open_portforward(api_server.connection(), "ns", "echo", PORT) as s:

            async def reader() -> None:
                while len(received) < len(payload):
                    chunk = await s.receive_some(portforward.RECEIVE_BUFFER_SIZE)
                    assert chunk
                    received.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await s.send_all(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_error_channel_text_is_raised_after_the_data(api_server: FakeApiServer) -> None:
    async with portforward.open_portforward(api_server.connection(), "ns", "refused", PORT) as s:
        assert await s.receive_some() == b"partial"
        with pytest.raises(PortForwardError, match="connection refused") as info:
            await s.receive_some()
        assert str(info.value).startswith("the port-forward to pod ns/refused port 8080 failed")
        assert not isinstance(info.value, PortForwardBroken)
        with pytest.raises(PortForwardError, match="connection refused"):
            await s.send_all(b"more")


@pytest.mark.parametrize(
    ("pod", "token", "message"),
    [
        ("missing", TOKEN, r"HTTP 404: pods \"missing\" not found; the pod does not exist"),
        ("echo", "wrong", r"HTTP 401: Unauthorized; the cluster did not accept"),
        ("Bad_Name", TOKEN, "not a valid Kubernetes name"),
    ],
)
async def test_refusals_are_one_sentence(
    api_server: FakeApiServer, pod: str, token: str, message: str
) -> None:
    with pytest.raises(PortForwardError, match=message):
        async with portforward.open_portforward(api_server.connection(token), "ns", pod, PORT):
            pytest.fail("the port-forward should not open")


async def test_protocol_violations_break_the_stream(api_server: FakeApiServer) -> None:
    async with portforward.open_portforward(api_server.connection(), "ns", "badchannel", PORT) as s:
        with pytest.raises(PortForwardBroken, match="unknown channel 7"):
            await s.receive_some()
    async with portforward.open_portforward(api_server.connection(), "ns", "midframe", PORT) as s:
        with pytest.raises(PortForwardBroken, match="1006"), trio.fail_after(5):
            await s.receive_some()


async def test_unreachable_and_untrusted_servers(api_server: FakeApiServer) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    closed_port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    unreachable = ClusterConnection(
        f"https://127.0.0.1:{closed_port}", "test", "default", ssl.create_default_context()
    )
    with pytest.raises(PortForwardError, match="cannot reach the Kubernetes API server"):
        async with portforward.open_portforward(unreachable, "ns", "echo", PORT):
            pass
    untrusted = ClusterConnection(api_server.url, "test", "default", ssl.create_default_context())
    with pytest.raises(PortForwardError, match=r"TLS handshake .* failed"):
        async with portforward.open_portforward(untrusted, "ns", "echo", PORT):
            pass


def _kubeconfig(path: Path, server: FakeApiServer, user: dict[str, Any]) -> Path:
    ca_pem = server.ca.cert_pem.bytes()
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sandbox",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": server.url,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "sandbox", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}
        ],
    }
    path.write_text(yaml.safe_dump(document))
    return path


async def test_kubeconfig_token(api_server: FakeApiServer, tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path / "config", api_server, {"token": TOKEN})
    cluster = await load_connection(str(config))
    assert (cluster.server, cluster.context, cluster.namespace) == (api_server.url, "sandbox", "ns")
    async with portforward.open_portforward(cluster, "ns", "echo", PORT) as s:
        await s.send_all(b"ping")
        assert await s.receive_some() == b"ping"


async def test_kubeconfig_exec_plugin(api_server: FakeApiServer, tmp_path: Path) -> None:
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": TOKEN},
    }
    plugin = tmp_path / "plugin.py"
    plugin.write_text(f"print({json.dumps(json.dumps(credential))})\n")
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": [str(plugin)],
            "interactiveMode": "Never",
        }
    }
    cluster = await load_connection(str(_kubeconfig(tmp_path / "config", api_server, user)))
    assert await cluster.auth_headers() == [(b"Authorization", f"Bearer {TOKEN}".encode())]
    async with portforward.open_portforward(cluster, "ns", "echo", PORT) as s:
        await s.send_all(b"exec")
        assert await s.receive_some() == b"exec"


async def test_kubeconfig_client_certificate(api_server: FakeApiServer, tmp_path: Path) -> None:
    leaf = api_server.ca.issue_cert("tele-user")
    user = {
        "client-certificate-data": base64.b64encode(leaf.cert_chain_pems[0].bytes()).decode(),
        "client-key-data": base64.b64encode(leaf.private_key_pem.bytes()).decode(),
    }
    cluster = await load_connection(str(_kubeconfig(tmp_path / "config", api_server, user)))
    assert await cluster.auth_headers() == []
    assert cluster.ssl_context is not None
    # The context presents the certificate: a TLS server that requires one accepts it.
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    api_server.ca.issue_cert("127.0.0.1").configure_cert(server_context)
    api_server.ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0], trio.open_nursery() as nursery:

        async def serve_one() -> None:
            conn = await listeners[0].accept()
            tls = trio.SSLStream(conn, server_context, server_side=True)
            await tls.do_handshake()
            # CERT_REQUIRED: the handshake only completes with a certificate the CA signed.
            await tls.send_all(b"ok" if tls.getpeercert() else b"none")
            await tls.aclose()

        nursery.start_soon(serve_one)
        client = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=cluster.ssl_context
        )
        async with client:
            assert await client.receive_some() == b"ok"


async def test_kubeconfig_errors(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="Cannot read the kubeconfig"):
        await load_connection(str(tmp_path / "absent"))
    bad = tmp_path / "bad"
    bad.write_text("apiVersion: v1\nkind: Config\ncontexts: []\nclusters: []\nusers: []\n")
    with pytest.raises(KubeconfigError):
        await load_connection(str(bad), "nope")


async def test_tunnel_link_inside_the_port_forward(api_server: FakeApiServer) -> None:
    """The whole transport: h2 link in the websocket, a tunnel stream to a loopback echo server,
    2 MiB each way with the digest checked."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)
            await stream.send_eof()

    payload = bytes(range(256)) * 8192
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        destination = Destination(Protocol.TCP, ipaddress.ip_address("127.0.0.1"), port)
        with trio.fail_after(20):
            async with (
                portforward.open_portforward(api_server.connection(), "ns", "tunnel", 1) as pf,
                open_link(pf, client_side=True) as link,
                await dial(link, destination, session="test") as stream,
            ):
                received = bytearray()

                async def reader() -> None:
                    while chunk := await stream.receive_some():
                        received.extend(chunk)

                async with trio.open_nursery() as inner:
                    inner.start_soon(reader)
                    await stream.send_all(payload)
                    await stream.send_eof()
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        nursery.cancel_scope.cancel()


async def test_link_pool_over_port_forwards(api_server: FakeApiServer) -> None:
    """A LinkPool whose links are port-forwards to the manager pod: two links come up and
    carry tunnel streams."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    pool = LinkPool(
        functools.partial(
            portforward.open_portforward, api_server.connection(), "ambassador", "tunnel", 8081
        ),
        count=2,
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        destination = Destination(Protocol.TCP, ipaddress.ip_address("127.0.0.1"), port)
        with trio.fail_after(20):
            await nursery.start(pool.serve)
            await pool.wait_up(2)
            for text in (b"one", b"two", b"three"):
                async with await pool.dial(destination, session="test") as stream:
                    await stream.send_all(text)
                    assert await stream.receive_some() == text
        assert (
            api_server.requests.count(
                "/api/v1/namespaces/ambassador/pods/tunnel/portforward?ports=8081"
            )
            == 2
        )
        nursery.cancel_scope.cancel()


async def test_records_already_received_are_read_at_once(api_server: FakeApiServer) -> None:
    """trio's SSLStream hands over one TLS record (16 KiB) per read; the dialer takes every
    record that already arrived in one read, so a bulk stream costs a quarter of the passes."""
    payload = bytes(range(256)) * 192  # 48 KiB: three TLS records in one write
    with trio.fail_after(10):
        async with portforward.open_portforward(api_server.connection(), "ns", "pipe", PORT) as s:
            server = await api_server.piped.receive()
            await server.send_all(payload)  # on loopback: in our socket's buffer once it returns
            first = await s.receive_some(portforward.RECEIVE_BUFFER_SIZE)
            assert len(first) > 16384
            rest = b""
            while len(first) + len(rest) < len(payload):
                rest += await s.receive_some()
            assert first + rest == payload
