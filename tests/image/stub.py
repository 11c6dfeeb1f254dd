"""A plain-HTTP/1.1 server whose every answer the test writes: for registries that misbehave."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


Handler = Callable[[Request, trio.SocketStream], Awaitable[None]]
StubFactory = Callable[[Handler], Awaitable["Stub"]]


@dataclass
class Stub:
    handler: Handler
    requests: list[Request] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    return
                head += chunk
                if head.startswith(b"\x16"):
                    # A TLS ClientHello (the client tries HTTPS first): answer as HTTP does.
                    await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                    return
            request_line, *lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            parts = request_line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                return
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            request = Request(parts[0], parts[1], headers)
            self.requests.append(request)
            try:
                await self.handler(request, stream)
            except trio.BrokenResourceError:
                pass


def response(
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    content_length: int | None = None,
) -> bytes:
    all_headers = {"Connection": "close", **(headers or {})}
    all_headers.setdefault(
        "Content-Length", str(len(body) if content_length is None else content_length)
    )
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
    return head.encode() + b"\r\n" + body
