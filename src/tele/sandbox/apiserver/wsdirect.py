"""The port-forward websocket (channel.k8s.io) served without hypercorn: when a connection's
first request is such an upgrade, its ASGI websocket call gets a `receive` that reads and
parses the client's frames in the calling task, and a `send` that writes frames at once.

Through hypercorn, each message crossed wsproto's event machinery, its app queue (a task
hand-off each way) and a 16 KiB TLS record per socket read: most of this hop's CPU per small
request and per MB. Here a read takes every TLS record already received (up to 256 KiB), the
frames are unmasked by the C helper, and a message's payload reaches the handler as it arrives:
a long message comes in pieces, each with its channel byte (on a port-forward channel the
messages are one byte stream, as the kubelet reads them). Authentication, authorization and the
handler are the app's own, as for any websocket. A request this module does not take whole
(any other path or subprotocol, an extension offered, a head it finds odd) goes to hypercorn as
before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Final

import trio

from tele.k8s.directtls import DirectTLS
from tele.k8s.portforward import _FrameParser, receive_plaintext, take_lock, tls_object

from .spdystreaming import TUNNEL_PROTOCOL, RequestHead, websocket_scope

log = logging.getLogger(__name__)

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Any]],
    Awaitable[None],
]

CHANNEL_PROTOCOLS: Final = ("v4.channel.k8s.io", "channel.k8s.io")
READ_SIZE: Final = 256 * 1024
"""Bytes of decrypted frames taken per read: what one read holds is all this end buffers."""
CLOSE_TIMEOUT: Final = 2.0
"""How long a Close we sent waits for the client's, or a Close or PONG for the socket."""
_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CLOSE: Final = 0x8
_OP_PONG: Final = 0xA
_WIRE_CLOSE_CODES: Final = range(1000, 5000)
_RESERVED_CLOSE_CODES: Final = (1004, 1005, 1006, 1015)


_ODD: Final = re.compile(r"[\x00-\x1f\x7f]")
"""Control characters in a request line or header value: h11 refuses them (a 400 answer from
hypercorn), so such a head is left to it."""


def takes(head: RequestHead) -> bool:
    """Whether `head` is a port-forward websocket upgrade this module serves whole."""
    path = head.target.partition("?")[0]
    if head.method != "GET" or not path.startswith("/"):
        return False
    if not path.rstrip("/").endswith("/portforward"):
        return False
    if _ODD.search(head.target) or any(_ODD.search(v) for _, v in head.headers):
        return False
    if not any(v.lower() == "websocket" for v in head.values("upgrade")):
        return False
    if not any(v.lower() == "upgrade" for v in head.values("connection")):
        return False
    if head.values("sec-websocket-version") != ["13"] or not head.values("host"):
        return False
    if any(
        head.values(name)
        for name in ("sec-websocket-extensions", "content-length", "transfer-encoding")
    ):
        return False
    keys = head.values("sec-websocket-key")
    if len(keys) != 1:
        return False
    try:
        if len(base64.b64decode(keys[0], validate=True)) != 16:
            return False
    except (binascii.Error, ValueError):
        return False
    offered = head.values("sec-websocket-protocol")
    return TUNNEL_PROTOCOL not in offered and any(p in offered for p in CHANNEL_PROTOCOLS)


def _scope(
    head: RequestHead, client: tuple[str, int] | None, server: tuple[str, int] | None
) -> dict[str, Any]:
    """The ASGI websocket scope hypercorn would give for `head`."""
    return websocket_scope(
        head,
        client,
        server,
        asgi={"spec_version": "2.3", "version": "3.0"},
        subprotocols=head.values("sec-websocket-protocol"),
        extensions={"websocket.http.response": {}},
        state={},
    )


def _frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked server frame, FIN set."""
    size = len(payload)
    if size <= 125:
        header = bytes((0x80 | opcode, size))
    elif size <= 0xFFFF:
        header = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return header + payload


class _Websocket:
    """One upgraded connection's ASGI websocket: `receive` and `send` as hypercorn offers
    them, on the TLS stream directly."""

    def __init__(self, stream: trio.abc.Stream, head: RequestHead, rest: bytes) -> None:
        self._key = head.values("sec-websocket-key")[0].encode("latin-1")
        # The TLS connection driven directly (tele.k8s.directtls), else the stream's own calls.
        self._io: trio.abc.Stream | DirectTLS = DirectTLS.of(stream) or stream
        self._tls = tls_object(stream)
        self._early = rest  # the client's first frames, read with the head
        self._parser = _FrameParser(from_client=True)
        self._messages: deque[dict[str, Any]] = deque()
        self._channel = b""  # the channel byte of the message being received
        self._send_lock = trio.StrictFIFOLock()
        self._connected = False
        self._accepted = False
        self._answered = False  # an HTTP answer (101 or a refusal) went out
        self._close_sent = False
        self._close_received = False
        self._lost = False
        self._refusal: tuple[int, list[Any]] | None = None  # websocket.http.response.start

    async def receive(self) -> dict[str, Any]:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        while not self._messages:
            if self._lost or self._close_received or self._parser.error is not None:
                await trio.lowlevel.checkpoint()
                return {"type": "websocket.disconnect", "code": 1006}
            data = await self._read()
            if not data:
                self._lost = True
                return {"type": "websocket.disconnect", "code": 1006}
            await self._take(data)
        return self._messages.popleft()

    async def send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.send":
            if not self._accepted or self._close_sent:
                return  # as hypercorn: nothing goes out on a socket not open for messages
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            await self._write(_frame(0x2 if message.get("bytes") is not None else 0x1, data))
        elif kind == "websocket.accept":
            if self._answered:
                return
            self._answered = self._accepted = True
            accept = base64.b64encode(hashlib.sha1(self._key + _WS_GUID).digest())
            lines = [
                b"HTTP/1.1 101 Switching Protocols",
                b"Upgrade: websocket",
                b"Connection: Upgrade",
                b"Sec-WebSocket-Accept: " + accept,
            ]
            if message.get("subprotocol"):
                lines.append(b"Sec-WebSocket-Protocol: " + message["subprotocol"].encode())
            for name, value in message.get("headers") or []:
                lines.append(bytes(name) + b": " + bytes(value))
            await self._write(b"\r\n".join(lines) + b"\r\n\r\n")
        elif kind == "websocket.close":
            if not self._answered:
                await self._refuse(403, [], b"")
            elif not self._close_sent:
                self._close_sent = True
                code = int(message.get("code") or 1000)
                reason = str(message.get("reason") or "").encode()[:123]
                await self._write(_frame(_OP_CLOSE, code.to_bytes(2, "big") + reason))
        elif kind == "websocket.http.response.start":
            if not self._answered:
                self._refusal = (int(message["status"]), list(message.get("headers") or []))
        elif kind == "websocket.http.response.body":
            refusal = self._refusal
            if refusal is not None and not self._answered:
                await self._refuse(refusal[0], refusal[1], bytes(message.get("body") or b""))

    async def finish(self) -> None:
        """After the app, as hypercorn does: a request it never answered gets a 500, an open
        websocket it did not close a Close 1011. Then the client's Close is waited for (a
        little): closing with its frames unread would reset the connection under our Close."""
        if not self._answered:
            await self._refuse(500, [], b"")
            return
        if not self._accepted or self._lost:
            return
        if not self._close_sent:
            await self.send({"type": "websocket.close", "code": 1011})
        with trio.move_on_after(CLOSE_TIMEOUT):
            while not (self._close_received or self._lost or self._parser.error):
                data = await self._read()
                if not data:
                    break
                self._messages.clear()
                await self._take(data)

    async def _refuse(self, status: int, headers: list[Any], body: bytes) -> None:
        self._answered = True
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b""
        lines = [b"HTTP/1.1 %d %s" % (status, phrase)]
        named = set()
        for name, value in headers:
            named.add(bytes(name).lower())
            lines.append(bytes(name) + b": " + bytes(value))
        if b"content-length" not in named:
            lines.append(b"Content-Length: %d" % len(body))
        lines.append(b"Connection: close")
        await self._write(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    async def _read(self) -> bytes:
        if self._early:
            data, self._early = self._early, b""
            return data
        try:
            return await receive_plaintext(self._io, self._tls, READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    async def _write(self, data: bytes) -> None:
        """Write `data`; a connection that broke is only noted (receive then reports it)."""
        if self._lost:
            await trio.lowlevel.checkpoint()
            return
        lock = self._send_lock
        try:
            await take_lock(lock)
            try:
                await self._io.send_all(data)
            finally:
                lock.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._lost = True

    async def _take(self, data: bytes) -> None:
        """One read's frames: data pieces become messages (each with its channel byte), a
        PING is answered, a Close answered and reported, a protocol error closed with its
        code."""
        items = self._parser.feed(data)
        answers: list[bytes] = []
        messages = self._messages
        for kind, payload, starts in items:
            if kind == "data":
                if starts:
                    self._channel = bytes(payload[:1])
                    piece = bytes(payload)
                else:
                    piece = self._channel + payload
                if len(piece) > 1:
                    messages.append({"type": "websocket.receive", "bytes": piece})
            elif kind == "ping":
                answers.append(_frame(_OP_PONG, bytes(payload)))
            elif kind == "close":
                self._close_received = True
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if len(payload) == 1 or (
                    len(payload) >= 2
                    and (code not in _WIRE_CLOSE_CODES or code in _RESERVED_CLOSE_CODES)
                ):
                    code = 1002
                if not self._close_sent:
                    self._close_sent = True
                    echo = b"" if code == 1005 else code.to_bytes(2, "big")
                    answers.append(_frame(_OP_CLOSE, echo))
                messages.append({"type": "websocket.disconnect", "code": code})
                break
        error = self._parser.error
        if error is not None and not self._close_received:
            log.info("port-forward websocket client %s: closed with %d", error, error.code)
            if not self._close_sent:
                self._close_sent = True
                answers.append(_frame(_OP_CLOSE, error.code.to_bytes(2, "big")))
            messages.append({"type": "websocket.disconnect", "code": error.code})
        if answers:
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._write(b"".join(answers))


async def serve(
    app: ASGIApp,
    stream: trio.abc.Stream,
    head: RequestHead,
    rest: bytes,
    *,
    client: tuple[str, int] | None = None,
    server: tuple[str, int] | None = None,
) -> None:
    """Serve a connection whose first request `head` (`takes(head)`) was read with `rest`
    behind it; closes the stream at the end."""
    websocket = _Websocket(stream, head, rest)
    try:
        await app(_scope(head, client, server), websocket.receive, websocket.send)
        await websocket.finish()
    finally:
        await trio.aclose_forcefully(stream)
