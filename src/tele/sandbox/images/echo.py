"""`tele-sandbox/echo` (and `echo-tls`): answers every HTTP request with who answered and what came.

HTTP/1.1 (h11) and h2c with prior knowledge (h2) on $PORT (default 8080). The JSON answer holds
the pod name, namespace, method, path, request headers and body; each request is logged on
stdout so `kubectl logs` shows it. `echo-tls` (its image sets ECHO_TLS=1) serves the same over
TLS with `tls.crt`/`tls.key` from $TLS_DIR (default /etc/echo-tls, where a Secret is usually
mounted).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import socketserver
import ssl
from pathlib import Path

import h11

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SA_NS = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _identity() -> tuple[str, str]:
    pod = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", "")
    ns = os.environ.get("POD_NAMESPACE", "")
    if not ns and _SA_NS.exists():
        ns = _SA_NS.read_text().strip()
    return pod, ns


POD, NAMESPACE = _identity()


def answer(
    method: str, path: str, headers: list[tuple[str, str]], body: bytes, proto: str, peer: str = ""
) -> bytes:
    print(f"{proto} {method} {path} {len(body)} bytes", flush=True)
    return json.dumps(
        {
            "pod": POD,
            "namespace": NAMESPACE,
            "protocol": proto,
            "method": method,
            "path": path,
            "headers": [[k, v] for k, v in headers],
            "body": body.decode("utf-8", "replace"),
            "peer": peer,  # the caller's address as this pod sees it
        }
    ).encode()


class _Conn:
    """A blocking byte stream over a socket (plain or TLS)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        try:
            peer = ipaddress.ip_address(sock.getpeername()[0])
        except (OSError, ValueError):
            self.peer = ""
        else:  # an IPv4 caller of the dual-stack listener as IPv4
            mapped = getattr(peer, "ipv4_mapped", None)
            self.peer = str(mapped or peer)

    def recv(self) -> bytes:
        return self.sock.recv(65536)

    def send(self, data: bytes) -> None:
        if data:
            self.sock.sendall(data)


def _http1(conn: _Conn, first: bytes) -> None:
    h1 = h11.Connection(h11.SERVER)
    h1.receive_data(first)
    while True:
        request: h11.Request | None = None
        body = b""
        while True:
            event = h1.next_event()
            if event is h11.NEED_DATA:
                h1.receive_data(conn.recv())
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed or PAUSED
                return
        assert request is not None
        headers = [(k.decode(), v.decode()) for k, v in request.headers]
        method, target = request.method.decode(), request.target.decode()
        out = answer(method, target, headers, body, "HTTP/1.1", conn.peer)
        reply = h11.Response(
            status_code=200,
            headers=[("content-type", "application/json"), ("content-length", str(len(out)))],
        )
        conn.send(h1.send(reply) + h1.send(h11.Data(data=out)) + h1.send(h11.EndOfMessage()))
        if h1.our_state is h11.MUST_CLOSE:
            return
        h1.start_next_cycle()


def _http2(conn: _Conn, first: bytes) -> None:
    # Imported here: h2 costs a third of the start-up time and most clients speak HTTP/1.1.
    import h2.config
    import h2.connection
    import h2.events

    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    h2c.initiate_connection()
    pending: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
    data = first
    while data:
        for event in h2c.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                hdrs = [(_text(k), _text(v)) for k, v in event.headers or []]
                pending[event.stream_id] = (hdrs, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in pending:
                    pending[event.stream_id][1].extend(event.data or b"")
                h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in pending:
                hdrs, body = pending.pop(event.stream_id)
                pseudo = dict(h for h in hdrs if h[0].startswith(":"))
                plain = [h for h in hdrs if not h[0].startswith(":")]
                out = answer(
                    pseudo.get(":method", ""),
                    pseudo.get(":path", ""),
                    plain,
                    bytes(body),
                    "HTTP/2",
                    conn.peer,
                )
                h2c.send_headers(
                    event.stream_id,
                    [
                        (":status", "200"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(out))),
                    ],
                )
                h2c.send_data(event.stream_id, out, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                conn.send(h2c.data_to_send())
                return
        conn.send(h2c.data_to_send())
        data = conn.recv()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Handler(socketserver.BaseRequestHandler):
    tls: ssl.SSLContext | None = None

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            conn = _Conn(sock)
            first = b""
            while len(first) < len(_PREFACE) and _PREFACE.startswith(first):
                chunk = conn.recv()
                if not chunk:
                    return
                first += chunk
            if first.startswith(_PREFACE):
                _http2(conn, first)
            else:
                _http1(conn, first)
        except (OSError, h11.ProtocolError, ValueError):
            pass  # a client that breaks off or speaks garbage only ends its own connection
        except Exception as exc:
            if type(exc).__module__.startswith("h2"):
                return
            raise


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    address_family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _tls_context() -> ssl.SSLContext | None:
    if os.environ.get("ECHO_TLS", "") != "1":  # set by the echo-tls image's config
        return None
    tls_dir = Path(os.environ.get("TLS_DIR", "/etc/echo-tls"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def main() -> None:
    # As its container's PID 1 the program gets no default action for SIGTERM: without a
    # handler a pod deletion would wait for the whole grace period and SIGKILL.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    port = int(os.environ.get("PORT", "8080"))
    _Handler.tls = _tls_context()
    try:
        server = _Server(("::" if socket.has_ipv6 else "0.0.0.0", port), _Handler)
    except OSError:  # no IPv6 in this namespace: IPv4 only
        _Server.address_family = socket.AF_INET
        server = _Server(("0.0.0.0", port), _Handler)
    tls = " (tls)" if _Handler.tls else ""
    print(f"echo {POD} in {NAMESPACE or '-'} listening on port {port}{tls}", flush=True)
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
