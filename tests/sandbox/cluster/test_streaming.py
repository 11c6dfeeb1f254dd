"""exec and port-forward with every transport kubectl uses: SPDY/3.1 upgrades (exec ≤ 1.29,
port-forward ≤ 1.30, or forced with KUBECTL_PORT_FORWARD_WEBSOCKETS=false), websocket v5 (exec
≥ 1.30) and SPDY tunnelled in a websocket (port-forward ≥ 1.31); real bytes through, exit
codes, dial failures, and a zlib bomb that ends only its own connection."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wsproto
import wsproto.events
import yaml

from tele.sandbox.apiserver import spdy
from tests.k8s.test_portforward_frames import frame

from .conftest import NodeSandbox

pytestmark = pytest.mark.netns


def _kubectl_dir() -> Path | None:
    found = shutil.which("kubectl")
    return Path(os.path.realpath(found)).parent if found else None


def _kubectl(minor: int | str) -> Path:
    """kubectl 1.<minor> ("newest": the newest on the machine); skips when it is missing."""
    base = _kubectl_dir()
    if base is None:
        pytest.skip("kubectl is not installed")
    versions = sorted(
        (int(m.group(1)), p)
        for p in base.glob("kubectl.1.*")
        if (m := re.fullmatch(r"kubectl\.1\.(\d+)", p.name))
    )
    if minor == "newest":
        if not versions:
            found = shutil.which("kubectl")
            assert found is not None
            return Path(found)
        return versions[-1][1]
    for have, path in versions:
        if have == minor:
            return path
    pytest.skip(f"kubectl 1.{minor} is not installed (looked in {base})")


@dataclass
class Streams:
    sandbox: NodeSandbox
    namespace: str

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", ""), "HOME": str(self.sandbox.home), **extra}

    def command(self, binary: Path, *args: str) -> list[str]:
        return [
            str(binary),
            "--kubeconfig",
            str(self.sandbox.kubeconfig),
            "--cache-dir",
            str(self.sandbox.home / f"cache-{binary.name}"),
            "-n",
            self.namespace,
            *args,
        ]

    def run(
        self, binary: Path, *args: str, input: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(binary, *args),
            input=input,
            capture_output=True,
            text=True,
            env=self.env(**env),
            timeout=60,
            check=False,
        )


def _pods() -> str:
    return yaml.safe_dump_all(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "shell"},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "c",
                            "image": "tele-sandbox/worker",
                            "command": ["sh", "-c", "echo up; while true; do sleep 0.5; done"],
                        }
                    ],
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "l4"},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "tele-sandbox/l4-echo",
                            "ports": [{"containerPort": 9000}],
                            # Ready once it listens (not only started): the tests dial it.
                            "readinessProbe": {
                                "tcpSocket": {"port": 9000},
                                "periodSeconds": 1,
                            },
                        }
                    ]
                },
            },
        ]
    )


@pytest.fixture(scope="module")
def streams(node_sandbox: NodeSandbox) -> Iterator[Streams]:
    newest = _kubectl("newest")
    s = Streams(node_sandbox, f"s-{uuid.uuid4().hex[:8]}")
    for args, stdin in (
        (("create", "namespace", s.namespace), None),
        (("apply", "-f", "-"), _pods()),
        (("wait", "--for=condition=Ready", "pod/shell", "pod/l4", "--timeout=60s"), None),
    ):
        done = s.run(newest, *args, input=stdin)
        assert done.returncode == 0, done.stderr
    yield s
    s.run(newest, "delete", "namespace", s.namespace, "--wait=false")


@pytest.mark.parametrize("minor", [27, 29, "newest"])
def test_exec_output_exit_code_and_stdin(streams: Streams, minor: int | str) -> None:
    kubectl = _kubectl(minor)
    done = streams.run(kubectl, "exec", "shell", "--", "sh", "-c", "echo hi; echo oops >&2; exit 3")
    assert (done.stdout, done.returncode) == ("hi\n", 3), done.stderr
    assert "oops" in done.stderr
    payload = "".join(f"line {i}\n" for i in range(20000))  # ~200 KB, past every window
    piped = streams.run(kubectl, "exec", "-i", "shell", "--", "tr", "a-z", "A-Z", input=payload)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == payload.upper()


def test_exec_over_spdy_when_websockets_are_off(streams: Streams) -> None:
    done = streams.run(
        _kubectl("newest"),
        "exec",
        "shell",
        "--",
        "sh",
        "-c",
        "echo spdy; exit 4",
        KUBECTL_REMOTE_COMMAND_WEBSOCKETS="false",
    )
    assert (done.stdout, done.returncode) == ("spdy\n", 4), done.stderr


def _start_port_forward(
    streams: Streams, kubectl: Path, port: int, **env: str
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        streams.command(kubectl, "port-forward", "pod/l4", f":{port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=streams.env(**env),
    )
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not selector.select(deadline - time.monotonic()):
            break
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.match(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line):
            return proc, int(m.group(1))
    proc.kill()
    _, err = proc.communicate(timeout=10)
    raise AssertionError(f"port-forward did not start: {err}")


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            data = sock.recv(65536)
            if not data:
                break
            got += data
        return got


@pytest.mark.parametrize(
    "minor,env",
    [
        (27, {}),
        (30, {}),
        (31, {}),
        ("newest", {}),
        ("newest", {"KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}),
    ],
    ids=["1.27-spdy", "1.30-spdy", "1.31-tunnel", "newest-tunnel", "newest-forced-spdy"],
)
def test_port_forward_echoes_bytes(streams: Streams, minor: int | str, env: dict[str, str]) -> None:
    proc, local = _start_port_forward(streams, _kubectl(minor), 9000, **env)
    try:
        for size in (5, 300_000):  # the second is several windows long
            payload = os.urandom(size)
            assert _echo(local, payload) == payload
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_port_forward_dial_failure_is_reported(streams: Streams) -> None:
    proc, local = _start_port_forward(streams, _kubectl("newest"), 9999)
    try:
        assert _echo(local, b"x") == b""
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "error forwarding port 9999" in err and "connection refused" in err


# --- hostile peers -----------------------------------------------------------------------


def _server(streams: Streams) -> tuple[str, int, str]:
    config = yaml.safe_load(streams.sandbox.kubeconfig.read_text())
    url = config["clusters"][0]["cluster"]["server"]
    host, port = url.removeprefix("https://").rsplit(":", 1)
    token = config["users"][0]["user"]["token"]
    return host, int(port), token


def _response_head(sock: ssl.SSLSocket) -> bytes:
    """What the server sent up to the end of its response head (and whatever came with it)."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        assert data, head
        head += data
    return head


def _upgrade(streams: Streams, path: str, protocol: str) -> ssl.SSLSocket:
    host, port, token = _server(streams)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    sock = context.wrap_socket(socket.create_connection((host, port), timeout=10))
    sock.sendall(
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            f"X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    head = _response_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _read_all(sock: ssl.SSLSocket) -> bytes:
    out = b""
    try:
        while data := sock.recv(65536):
            out += data
    except (OSError, ssl.SSLError):
        pass
    return out


def test_zlib_bomb_ends_its_connection_not_the_server(streams: Streams) -> None:
    path = f"/api/v1/namespaces/{streams.namespace}/pods/l4/portforward"
    sock = _upgrade(streams, path, "portforward.k8s.io")
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    bomb = deflate.compress(b"\0" * (48 << 20)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + bomb
    sock.sendall(struct.pack(">HHI", 0x8003, spdy.SYN_STREAM, len(payload)) + payload)
    reply = _read_all(sock)
    sock.close()
    # GOAWAY with PROTOCOL_ERROR, then the connection ends.
    assert reply[:4] == struct.pack(">HH", 0x8003, spdy.GOAWAY)
    assert struct.unpack(">I", reply[-4:])[0] == spdy.GOAWAY_PROTOCOL_ERROR
    done = streams.run(_kubectl("newest"), "get", "pod", "l4", "-o", "json")
    assert json.loads(done.stdout)["status"]["phase"] == "Running"


def test_unpaired_and_malformed_port_forward_streams_are_reset(streams: Streams) -> None:
    path = f"/api/v1/namespaces/{streams.namespace}/pods/l4/portforward"
    sock = _upgrade(streams, path, "portforward.k8s.io")
    client = spdy.Connection(server=False)
    client.open_stream([("streamtype", "data"), ("port", "notaport"), ("requestid", "1")])
    client.open_stream([("streamtype", "error"), ("port", "9000"), ("requestid", "2")])
    client.open_stream([("streamtype", "data"), ("port", "9000"), ("requestid", "2")])
    client.send_data(5, b"still works")
    sock.sendall(client.data_to_send())
    got: list[spdy.Event] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        client.receive_data(sock.recv(65536))
        got += client.events()
        if any(isinstance(e, spdy.DataReceived) and e.data for e in got):
            break
    sock.close()
    assert spdy.StreamReset(1, spdy.PROTOCOL_ERROR) in got
    assert spdy.DataReceived(5, b"still works", False) in got


def _refused(streams: Streams, path: str, protocol: str, token: str | None = None) -> bytes:
    host, port, admin = _server(streams)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection((host, port), timeout=10)) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {admin if token is None else token}\r\n"
                "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                f"X-Stream-Protocol-Version: {protocol}\r\n\r\n"
            ).encode()
        )
        return _read_all(sock)


def test_exec_refuses_protocols_it_does_not_speak(streams: Streams) -> None:
    path = f"/api/v1/namespaces/{streams.namespace}/pods/shell/exec?command=true&stdout=true"
    reply = _refused(streams, path, "v2.channel.k8s.io")
    assert reply.startswith(b"HTTP/1.1 403")
    assert b"unable to negotiate protocol" in reply


def test_spdy_upgrade_needs_a_user_allowed_to_create_the_subresource(streams: Streams) -> None:
    path = f"/api/v1/namespaces/{streams.namespace}/pods/l4/portforward"
    reply = _refused(streams, path, "portforward.k8s.io", token="not-a-token")
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert b'"kind": "Status"' in reply or b'"kind":"Status"' in reply


def _attach_pod(name: str, script: str, **spec: object) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "c",
                        "image": "tele-sandbox/worker",
                        "command": ["sh", "-c", script],
                        **spec,
                    }
                ],
            },
        }
    )


def _phase(streams: Streams, name: str) -> str:
    newest = _kubectl("newest")
    deadline = time.monotonic() + 30
    while True:
        phase = streams.run(newest, "get", "pod", name, "-o", "jsonpath={.status.phase}").stdout
        if phase in ("Succeeded", "Failed") or time.monotonic() > deadline:
            return phase
        time.sleep(0.1)


@pytest.mark.parametrize("minor", [27, "newest"])
def test_attach_reaches_the_containers_own_stdin_and_stdout(
    streams: Streams, minor: int | str
) -> None:
    """`kubectl attach -i` talks to PID 1: lines typed arrive on its stdin and its answers come
    back; with stdinOnce the container's stdin closes when the session ends, so it exits."""
    binary, newest = _kubectl(minor), _kubectl("newest")
    name = f"reader-{minor}"
    script = 'while read l; do echo "got $l"; done; echo "stdin closed"'
    pod = _attach_pod(name, script, stdin=True, stdinOnce=True)
    streams.run(newest, "apply", "-f", "-", input=pod)
    ready = streams.run(newest, "wait", "--for=condition=Ready", f"pod/{name}", "--timeout=60s")
    assert ready.returncode == 0, ready.stderr
    done = streams.run(binary, "attach", "-i", name, input="hello\nworld\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["got hello", "got world", "stdin closed"]
    assert _phase(streams, name) == "Succeeded"
    assert streams.run(newest, "logs", name).stdout.splitlines()[-1] == "stdin closed"


def test_attach_to_a_tty_container(streams: Streams) -> None:
    """A `tty: true` container's stdio is a terminal of its own; attach reaches it (kubectl
    without a terminal of its own says it cannot use one, as with a real cluster)."""
    newest = _kubectl("newest")
    script = (
        'read l; echo "got $l"; test -t 0 && echo "tty $(stty size 2>&1)"; ls -l /proc/self/fd/0'
    )
    pod = _attach_pod("tty", script, stdin=True, stdinOnce=True, tty=True)
    streams.run(newest, "apply", "-f", "-", input=pod)
    ready = streams.run(newest, "wait", "--for=condition=Ready", "pod/tty", "--timeout=60s")
    assert ready.returncode == 0, ready.stderr
    done = streams.run(newest, "attach", "-i", "tty", input="typed\n")
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    # The terminal echoes what was typed, then the answers (a pty ends lines with \r\n).
    assert lines[:2] == ["typed", "got typed"], done.stdout
    assert lines[2].startswith("tty "), done.stdout
    assert lines[3].endswith("/proc/self/fd/0 -> /dev/pts/0"), done.stdout
    assert "Unable to use a TTY - input is not a terminal" in done.stderr


def test_attach_without_stdin_streams_output_and_refuses_a_finished_container(
    streams: Streams,
) -> None:
    newest = _kubectl("newest")
    script = "trap 'exit 0' TERM; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"
    streams.run(newest, "apply", "-f", "-", input=_attach_pod("ticker", script))
    ready = streams.run(newest, "wait", "--for=condition=Ready", "pod/ticker", "--timeout=60s")
    assert ready.returncode == 0, ready.stderr
    with subprocess.Popen(
        streams.command(newest, "attach", "ticker"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=streams.env(),
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            assert re.fullmatch(r"tick \d+\n", line), line
        finally:
            proc.kill()
    streams.run(newest, "delete", "pod", "ticker", "--wait=true", "--timeout=60s")
    finished = _phase(streams, "reader-newest")
    if finished == "Succeeded":
        refused = streams.run(newest, "attach", "reader-newest")
        assert refused.returncode != 0
        assert "cannot attach a container in a completed pod" in refused.stderr


def _websocket(streams: Streams, path: str) -> Iterator[tuple[Any, ssl.SSLSocket]]:
    host, port, admin = _server(streams)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection((host, port), timeout=10)) as sock:
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        request = wsproto.events.Request(
            host=host,
            target=path,
            subprotocols=["v5.channel.k8s.io"],
            extra_headers=[(b"authorization", f"Bearer {admin}".encode())],
        )
        sock.sendall(ws.send(request))
        yield ws, sock


def test_attach_resizes_a_tty_and_survives_garbage_resizes(streams: Streams) -> None:
    """The resize channel is the client's to fill: what is not a terminal size (not JSON, a
    list, a string, out of a winsize's range, 1e400) is skipped; a real one reaches the
    container's terminal."""
    newest = _kubectl("newest")
    pod = _attach_pod("resized", "while read l; do stty size; done", stdin=True, tty=True)
    streams.run(newest, "apply", "-f", "-", input=pod)
    ready = streams.run(newest, "wait", "--for=condition=Ready", "pod/resized", "--timeout=60s")
    assert ready.returncode == 0, ready.stderr
    path = (
        f"/api/v1/namespaces/{streams.namespace}/pods/resized/attach"
        "?container=c&stdin=true&stdout=true&tty=true"
    )
    connection = _websocket(streams, path)
    ws, sock = next(connection)
    output = b""
    garbage = [b"not json", b"[]", b'{"Width": "x", "Height": 3}', b'{"Width": 1e400, "Height": 1}']
    garbage.append(b'{"Width": 99999999, "Height": -1}')
    try:
        accepted = False
        while not accepted:
            data = sock.recv(65536)
            assert data, "the upgrade was refused"
            ws.receive_data(data)
            accepted = any(isinstance(e, wsproto.events.AcceptConnection) for e in ws.events())
        for message in [*garbage, b'{"Width": 100, "Height": 40}']:
            sock.sendall(ws.send(wsproto.events.BytesMessage(b"\x04" + message)))
        sock.settimeout(0.5)
        deadline = time.monotonic() + 30
        while b"40 100" not in output:
            assert time.monotonic() < deadline, output
            sock.sendall(ws.send(wsproto.events.BytesMessage(b"\x00\n")))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            assert data, output
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, wsproto.events.BytesMessage) and event.data[:1] == b"\x01":
                    output += bytes(event.data[1:])
    finally:
        connection.close()
        streams.run(newest, "delete", "pod", "resized", "--wait=false")


# --- the port-forward websocket of the channel protocol (tele's daemon, kubectl's v4) -----


def _client_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    """A frame as a client writes one: masked (with a key that changes bytes) unless told."""
    return frame(opcode, payload, fin=fin, mask=mask, key=os.urandom(4))


class _ServerFrames:
    """Reads a server's (unmasked) frames from a socket: (opcode, fin, payload)."""

    def __init__(self, sock: ssl.SSLSocket, rest: bytes) -> None:
        self.sock = sock
        self.buffer = rest

    def _need(self, size: int) -> None:
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data

    def next(self) -> tuple[int, bool, bytes]:
        self._need(2)
        first, second = self.buffer[0], self.buffer[1]
        assert not second & 0x80, "a server's frame is not masked"
        size, at = second & 0x7F, 2
        if size == 126:
            self._need(4)
            size, at = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif size == 127:
            self._need(10)
            size, at = struct.unpack("!Q", self.buffer[2:10])[0], 10
        self._need(at + size)
        payload, self.buffer = self.buffer[at : at + size], self.buffer[at + size :]
        return first & 0x0F, bool(first & 0x80), payload


def _ws_port_forward(streams: Streams, port: int) -> tuple[ssl.SSLSocket, _ServerFrames]:
    """A websocket port-forward to pod l4's `port` (v4.channel.k8s.io), upgraded and checked
    as RFC 6455 says; its two port announcements read."""
    host, api_port, token = _server(streams)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    sock = context.wrap_socket(socket.create_connection((host, api_port), timeout=20))
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        (
            f"GET /api/v1/namespaces/{streams.namespace}/pods/l4/portforward?ports={port} "
            f"HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
        ).encode()
    )
    head, _, rest = _response_head(sock).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 101"), head
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines[1:])}
    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    assert headers[b"sec-websocket-accept"] == base64.b64encode(hashlib.sha1(key + guid).digest())
    assert headers[b"sec-websocket-protocol"] == b"v4.channel.k8s.io"
    frames = _ServerFrames(sock, rest)
    prefix = port.to_bytes(2, "little")
    assert [frames.next() for _ in range(2)] == [
        (2, True, b"\0" + prefix),
        (2, True, b"\1" + prefix),
    ]
    return sock, frames


def _channel_data(frames: _ServerFrames, size: int) -> bytes:
    got = b""
    while len(got) < size:
        opcode, _, payload = frames.next()
        assert opcode == 2 and payload[:1] == b"\0", (opcode, payload[:20])
        got += payload[1:]
    return got


def test_channel_websocket_port_forward_carries_fragmented_masked_messages(
    streams: Streams,
) -> None:
    """A message in masked fragments (binary start, continuations) and a text one reach the
    pod as the bytes sent; a PING is answered with its payload, a Close with its code."""
    sock, frames = _ws_port_forward(streams, 9000)
    with sock:
        payload = os.urandom(300_000)  # several TLS records and socket reads
        cut = [0, 7, 70_000, 300_000]
        for i, (start, end) in enumerate(itertools.pairwise(cut)):
            body = (b"\0" if i == 0 else b"") + payload[start:end]
            sock.sendall(_client_frame(2 if i == 0 else 0, body, fin=end == len(payload)))
        assert _channel_data(frames, len(payload)) == payload
        sock.sendall(_client_frame(1, b"\0text"))  # the kubelet reads text as bytes too
        assert _channel_data(frames, 4) == b"text"
        sock.sendall(_client_frame(9, b"ping!"))
        assert frames.next() == (0xA, True, b"ping!")
        sock.sendall(_client_frame(8, (1000).to_bytes(2, "big")))
        assert frames.next() == (8, True, (1000).to_bytes(2, "big"))


@pytest.mark.parametrize(
    "bad,code",
    [
        (_client_frame(2, b"\0x", mask=False), 1002),  # a client must mask
        (bytes((0xC2, 0x80)) + b"\0\0\0\0", 1002),  # RSV1 with no extension agreed
        (_client_frame(0, b"x"), 1002),  # a continuation of nothing
        (_client_frame(9, b"p" * 126), 1002),  # a control frame over 125 bytes
        (bytes((0x82, 0xFF)) + b"\xff" * 8 + b"\0\0\0\0", 1002),  # a 2^64-1 byte length
    ],
    ids=["unmasked", "rsv1", "lone-continuation", "long-ping", "impossible-length"],
)
def test_a_malformed_frame_closes_only_its_port_forward(
    streams: Streams, bad: bytes, code: int
) -> None:
    sock, frames = _ws_port_forward(streams, 9000)
    with sock:
        sock.sendall(bad)
        assert frames.next() == (8, True, code.to_bytes(2, "big"))
        with pytest.raises(EOFError):
            frames.next()
    other, other_frames = _ws_port_forward(streams, 9000)
    with other:
        other.sendall(_client_frame(2, b"\0still here"))
        assert _channel_data(other_frames, 10) == b"still here"
