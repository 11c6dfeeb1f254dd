"""`tele-sandbox/echo` (and `echo-tls`): answers every HTTP request with who answered and what came.

HTTP/1.1 (h11) and h2c with prior knowledge (h2) on $PORT (default 8080). The JSON answer holds
the pod name, namespace, method, path, request headers and body; each request is logged on
stdout so `kubectl logs` shows it. `echo-tls` serves the same over TLS with `tls.crt`/`tls.key`
from $TLS_DIR (default /etc/echo-tls, where a Secret is usually mounted).
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11
import trio

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
    method: str, path: str, headers: list[tuple[str, str]], body: bytes, proto: str
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
        }
    ).encode()


async def _http1(stream: trio.abc.Stream, first: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    while True:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(65536))
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    return
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
        assert request is not None
        headers = [(k.decode(), v.decode()) for k, v in request.headers]
        out = answer(request.method.decode(), request.target.decode(), headers, body, "HTTP/1.1")
        reply = h11.Response(
            status_code=200,
            headers=[("content-type", "application/json"), ("content-length", str(len(out)))],
        )
        await stream.send_all(conn.send(reply) + conn.send(h11.Data(data=out)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


async def _http2(stream: trio.abc.Stream, first: bytes) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    pending: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
    data = first
    while True:
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                hdrs = [
                    (
                        k.decode() if isinstance(k, bytes) else k,
                        v.decode() if isinstance(v, bytes) else v,
                    )
                    for k, v in event.headers or []
                ]
                pending[event.stream_id] = (hdrs, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in pending:
                    pending[event.stream_id][1].extend(event.data or b"")
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in pending:
                hdrs, body = pending.pop(event.stream_id)
                pseudo = dict(h for h in hdrs if h[0].startswith(":"))
                plain = [h for h in hdrs if not h[0].startswith(":")]
                out = answer(
                    pseudo.get(":method", ""), pseudo.get(":path", ""), plain, bytes(body), "HTTP/2"
                )
                conn.send_headers(
                    event.stream_id,
                    [
                        (":status", "200"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(out))),
                    ],
                )
                conn.send_data(event.stream_id, out, end_stream=True)
            elif isinstance(event, h2.events.ConnectionTerminated):
                await stream.send_all(conn.data_to_send())
                return
        await stream.send_all(conn.data_to_send())
        data = bytes(await stream.receive_some(65536))
        if not data:
            return


async def _serve(stream: trio.abc.Stream) -> None:
    try:
        first = b""
        while len(first) < len(_PREFACE) and _PREFACE.startswith(first):
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            first += chunk
        if first.startswith(_PREFACE):
            await _http2(stream, first)
        else:
            await _http1(stream, first)
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        h11.ProtocolError,
        h2.exceptions.ProtocolError,
    ):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _tls_context() -> ssl.SSLContext | None:
    if os.environ.get("TELE_SANDBOX_IMAGE", "").rsplit("/", 1)[-1].split(":")[0] != "echo-tls":
        return None
    tls_dir = Path(os.environ.get("TLS_DIR", "/etc/echo-tls"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


async def _main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    tls = _tls_context()
    listeners: Any = await trio.open_tcp_listeners(port)
    if tls is not None:
        listeners = [trio.SSLListener(lst, tls, https_compatible=True) for lst in listeners]
    print(
        f"echo {POD} in {NAMESPACE or '-'} listening on port {port}{' (tls)' if tls else ''}",
        flush=True,
    )
    await trio.serve_listeners(_serve, listeners)


def main() -> None:
    try:
        trio.run(_main)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
