"""The port-forward dialer: a trio Stream to a pod's port through the API server's
`pods/portforward` websocket (subprotocol v4.channel.k8s.io).

Framing (the Kubernetes `channel.k8s.io` convention): every binary websocket message starts with a
channel byte. For a single forwarded port, channel 0 carries data and channel 1 errors; the
server's first two bytes on each channel are the port number, little-endian; after that, channel 0
is the raw TCP byte stream and channel 1 carries at most an error text, after which the server
closes. The client sends its bytes on channel 0 without a port prefix. v4 has no half-close: EOF
is the websocket closing.

The dialer's end (`open_portforward`, `PortForwardClient`) speaks the websocket itself: the
HTTP/1.1 upgrade with h11, then RFC 6455 frames read and written in the caller's task, so a
message costs no task hand-off (trio-websocket reads in a task of its own and queues messages
for the consumer: two scheduler passes per message, most of this hop's cost per small request).
`PortForwardStream` is the server end over trio-websocket (tests and the sandbox).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import ssl
import struct
import urllib.parse
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, cast

import h11
import trio
import trio_websocket

from tele.k8s.config import ClusterConnection
from tele.k8s.directtls import DirectTLS
from tele.k8s.errors import PortForwardBroken, PortForwardError

log = logging.getLogger(__name__)


SUBPROTOCOL: Final = "v4.channel.k8s.io"
DATA_CHANNEL: Final = 0
ERROR_CHANNEL: Final = 1

RECEIVE_BUFFER_SIZE: Final = 256 * 1024
"""Bytes per socket read in trio-websocket: its 4 KiB default caps a tunnel at ~150 MB/s."""
MAX_SEND_MESSAGE: Final = 1024 * 1024
"""Largest message we send: large messages amortise wsproto's per-message work."""
MAX_RECEIVE_MESSAGE: Final = 4 * 1024 * 1024
"""Largest message the server end (trio-websocket) accepts. The client end takes a message's
payload as it arrives, piece by piece, and reads the socket only as its consumer reads: what it
holds is bounded by one read (RECEIVE_BUFFER_SIZE), whatever the server announces."""
MESSAGE_QUEUE_SIZE: Final = 2
"""Messages a server end (trio-websocket's `serve_websocket`) buffers ahead of its reader: with
the maximum above, a few MiB per port-forward while a slow reader back-pressures the socket."""
MAX_ERROR_TEXT: Final = 4096
CONNECT_TIMEOUT: Final = 20.0
CLOSE_TIMEOUT: Final = 2.0

# DNS-1123 subdomain, the syntax of namespace and pod names: anything else cannot exist and
# must not reach the URL path.
_NAME_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def portforward_path(namespace: str, pod: str, port: int) -> str:
    """The request target (without the server's path prefix)."""
    for kind, name in (("namespace", namespace), ("pod", pod)):
        if not _NAME_RE.fullmatch(name):
            raise PortForwardError(f"{kind} name {name!r} is not a valid Kubernetes name")
    if not 1 <= port <= 65_535:
        raise PortForwardError(f"port {port} is outside 1-65535")
    return f"/api/v1/namespaces/{namespace}/pods/{pod}/portforward?ports={port}"


class _Router:
    """The channel.k8s.io routing of one forwarded port, shared by both ends: which bytes of
    the messages are data, the server's 2-byte port prefix on each channel (checked by the
    client end), the error channel's text. The first protocol violation or error is kept in
    `error` (raised by the stream once the data before it was read)."""

    def __init__(self, port: int, description: str, *, client_side: bool) -> None:
        self._port = port
        self._description = description
        # Bytes of the server's 2-byte port prefix still expected on each channel.
        self._prefix_left = {DATA_CHANNEL: 2, ERROR_CHANNEL: 2} if client_side else {}
        self._prefix = {DATA_CHANNEL: bytearray(), ERROR_CHANNEL: bytearray()}
        self._error_text = bytearray()
        self.error: PortForwardError | None = None

    def route(self, channel: int, body: memoryview) -> memoryview | None:
        """The data-channel bytes of a piece of a message on `channel` (None if none)."""
        if channel not in (DATA_CHANNEL, ERROR_CHANNEL):
            self.fail(
                PortForwardBroken(
                    f"the port-forward to {self._description} used unknown channel {channel}"
                )
            )
            return None
        left = self._prefix_left.get(channel, 0)
        if left:
            taken = body[:left]
            self._prefix[channel] += taken
            self._prefix_left[channel] = left - len(taken)
            body = body[len(taken) :]
            if self._prefix_left[channel] == 0:
                announced = int.from_bytes(self._prefix[channel], "little")
                if announced != self._port:
                    self.fail(
                        PortForwardBroken(
                            f"the port-forward to {self._description} announced port {announced}"
                        )
                    )
                    return None
        if not body:
            return None
        if channel == DATA_CHANNEL:
            return body
        room = MAX_ERROR_TEXT - len(self._error_text)
        self._error_text += body[:room]
        text = self._error_text.decode("utf-8", "replace").strip()
        self.fail(PortForwardError(f"the port-forward to {self._description} failed: {text}"))
        return None

    def fail(self, error: PortForwardError) -> None:
        if self.error is None:
            log.info("%s", error)
            self.error = error


def _check_max_bytes(max_bytes: int | None) -> None:
    """receive_some's argument, as trio's streams check it."""
    if max_bytes is not None:
        if not isinstance(max_bytes, int):
            raise TypeError("max_bytes must be an int or None")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")


class PortForwardStream(trio.abc.Stream):
    """The server end of one forwarded port over trio-websocket (tests, the sandbox): announces
    the port on both channels (`start()`) and may report an error with `send_error()`."""

    def __init__(
        self,
        websocket: trio_websocket.WebSocketConnection,
        port: int,
        *,
        description: str,
    ) -> None:
        self._ws = websocket
        self._port = port
        self._description = description
        self._router = _Router(port, description, client_side=False)
        self._pending = memoryview(b"")
        self._closed = False
        self._receiving = False
        self._sending = False

    @property
    def description(self) -> str:
        return self._description

    async def start(self) -> None:
        """Announce the port on both channels, as the kubelet does."""
        prefix = self._port.to_bytes(2, "little")
        await self._send_message(bytes([DATA_CHANNEL]) + prefix)
        await self._send_message(bytes([ERROR_CHANNEL]) + prefix)

    async def send_error(self, text: str) -> None:
        """Report a failure on the error channel and close."""
        payload = text.encode("utf-8", "replace")[:MAX_ERROR_TEXT]
        try:
            await self._send_message(bytes([ERROR_CHANNEL]) + payload)
        finally:
            await self.aclose()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed")
            if self._router.error is not None:
                raise self._router.error
            view = memoryview(data)
            if not view:
                await trio.lowlevel.checkpoint()
                return
            for start in range(0, len(view), MAX_SEND_MESSAGE):
                chunk = view[start : start + MAX_SEND_MESSAGE]
                await self._send_message(b"\x00" + chunk)  # one copy: bytes + buffer
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        # trio-websocket exposes no send readiness; send_all itself applies back-pressure.
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("the port-forward stream was closed")
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        _check_max_bytes(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed")
            waited = False
            while not self._pending:
                waited = True
                if self._router.error is not None:
                    raise self._router.error
                try:
                    message = await self._ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    await trio.lowlevel.checkpoint()  # a closed channel raises without one
                    if self._closed:
                        raise trio.ClosedResourceError(
                            "the port-forward stream was closed"
                        ) from None
                    return self._end_of_stream(exc.reason)
                self._take(message)
            if max_bytes is None or max_bytes >= len(self._pending):
                chunk, self._pending = self._pending, memoryview(b"")
            else:
                chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
            if not waited:
                await trio.lowlevel.checkpoint()  # every receive_some is a checkpoint
            return chunk.tobytes()
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        # The close handshake waits for the peer; a peer that never answers must not hold us.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose()
            await trio.lowlevel.checkpoint()  # aclose of an already closed socket has none

    async def _send_message(self, message: bytes) -> None:
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed") from None
            if self._router.error is not None:
                raise self._router.error from None
            raise PortForwardBroken(
                f"the port-forward to {self._description} closed ({_reason_text(exc.reason)})"
            ) from None

    def _take(self, message: bytes | str) -> None:
        """Route one websocket message from the client."""
        if isinstance(message, str) or not message:
            self._router.fail(
                PortForwardBroken(
                    f"the port-forward to {self._description} sent a text "
                    "or empty message, which the protocol does not allow"
                )
            )
            return
        body = self._router.route(message[0], memoryview(message)[1:])
        if body is not None:
            self._pending = body

    def _end_of_stream(self, reason: trio_websocket.CloseReason | None) -> bytes:
        if self._router.error is not None:
            raise self._router.error
        if reason is not None and reason.code in (1000, 1001):
            return b""
        raise PortForwardBroken(
            f"the port-forward to {self._description} broke off ({_reason_text(reason)})"
        )


def _reason_text(reason: trio_websocket.CloseReason | None) -> str:
    if reason is None:
        return "connection lost"
    text = f"websocket close {reason.code} {reason.name}"
    return f"{text}: {reason.reason}" if reason.reason else text


# -- client end: the websocket spoken directly ----------------------------------------------------

_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONTINUATION: Final = 0x0
_OP_TEXT: Final = 0x1
_OP_BINARY: Final = 0x2
_OP_CLOSE: Final = 0x8
_OP_PING: Final = 0x9
_OP_PONG: Final = 0xA
_MAX_HANDSHAKE: Final = 64 * 1024
"""Bytes of the API server's HTTP answer to the upgrade (headers, or a refusal's body) we read."""
_HEAD = struct.Struct("!BB")
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")


def _mask_python(data: bytes | memoryview, key: bytes) -> bytes:
    """RFC 6455 masking without websockets' C helper (slower, same bytes)."""
    size = len(data)
    if not size:
        return b""
    pad = key * (size // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(pad[:size], "little")).to_bytes(
        size, "little"
    )


try:
    from websockets.speedups import apply_mask as _c_apply_mask

    def _mask(data: bytes | memoryview, key: bytes) -> bytes:
        return _c_apply_mask(data, key)

except ImportError:  # no compiled speedups for this platform
    _mask = _mask_python


class WebSocketProtocolError(Exception):
    """The server broke RFC 6455 framing (a close code and a sentence)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


class _FrameParser:
    """Websocket frames, sans-IO, without buffering payloads: `feed` returns what one read
    holds as (kind, data) items: ("data", payload piece, message start?) for binary message
    payload as it arrives (pieces of one message share its first byte, the channel), ("ping",
    payload), ("close", payload). Memory: at most one frame header and one control frame's 125
    bytes besides the read itself.

    By default it reads a server's frames (the client end): anything RFC 6455 forbids a server
    to send (masked frames, RSV bits, unknown opcodes, fragmented or long control frames, a
    continuation without a start) raises `WebSocketProtocolError`; a text message too (the
    channel protocol has none). With `from_client` it reads a client's frames (the sandbox API
    server's port-forward): every frame must be masked and comes out unmasked, and a text
    message is data as a binary one is (the kubelet reads either kind as bytes)."""

    def __init__(self, *, from_client: bool = False) -> None:
        self._from_client = from_client
        self._key = b""  # the current frame's masking key (client frames)
        self._offset = 0  # payload bytes of the current frame already taken (its mask phase)
        self._head = b""  # an incomplete frame header
        self._left = 0  # payload bytes of the current frame still to come
        self._opcode = -1  # of the current frame; -1: between frames
        self._fin = True
        self._in_message = False  # a binary message's FIN has not come yet
        self._message_start = False  # the next data piece starts a message
        self._control = b""
        self.error: WebSocketProtocolError | None = None

    def feed(self, data: bytes) -> list[tuple[str, bytes | memoryview, bool]]:
        """The items of one read, in order; after a protocol error (`error`), the items
        before it and nothing more, ever."""
        out: list[tuple[str, bytes | memoryview, bool]] = []
        if self.error is None:
            try:
                self._feed(memoryview(data), out)
            except WebSocketProtocolError as exc:
                self.error = exc
        return out

    def _feed(self, view: memoryview, out: list[tuple[str, bytes | memoryview, bool]]) -> None:
        pos = 0
        end = len(view)
        while pos < end:
            if self._opcode < 0:
                head = self._head + bytes(view[pos : pos + 14 - len(self._head)])
                need = self._header_size(head)
                if need is None or len(head) < need:
                    self._head = head
                    return  # everything of this read was taken into the header
                pos += need - len(self._head)
                self._head = b""
                self._start_frame(head[:need])
            if self._opcode >= 0:
                take = min(self._left, end - pos)
                piece: bytes | memoryview = view[pos : pos + take]
                pos += take
                self._left -= take
                if self._key and take:
                    phase = self._offset & 3
                    piece = _mask(piece, self._key[phase:] + self._key[:phase])
                    self._offset += take
                if self._opcode in (_OP_BINARY, _OP_CONTINUATION, _OP_TEXT):
                    if take or (self._left == 0 and self._fin):
                        if take:
                            out.append(("data", piece, self._message_start))
                            self._message_start = False
                        if self._left == 0 and self._fin:
                            if self._message_start and not self._from_client:
                                raise WebSocketProtocolError(1002, "sent an empty message")
                            self._in_message = False
                else:
                    self._control += piece
                    if self._left == 0:
                        kind = (
                            "ping"
                            if self._opcode == _OP_PING
                            else ("close" if self._opcode == _OP_CLOSE else "pong")
                        )
                        out.append((kind, memoryview(self._control), False))
                        self._control = b""
                if self._left == 0:
                    self._opcode = -1

    @staticmethod
    def _header_size(head: bytes) -> int | None:
        if len(head) < 2:
            return None
        size = head[1] & 0x7F
        return 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if head[1] & 0x80 else 0)

    def _start_frame(self, head: bytes) -> None:
        first, second = _HEAD.unpack_from(head)
        if first & 0x70:
            raise WebSocketProtocolError(1002, "used reserved bits no extension was agreed for")
        if self._from_client:
            if not second & 0x80:
                raise WebSocketProtocolError(1002, "sent an unmasked frame (a client must mask)")
            self._key = head[-4:]
            self._offset = 0
        elif second & 0x80:
            raise WebSocketProtocolError(1002, "sent a masked frame (a server must not)")
        opcode, fin = first & 0x0F, bool(first & 0x80)
        size = second & 0x7F
        if size == 126:
            size = _LEN16.unpack_from(head, 2)[0]
        elif size == 127:
            size = _LEN64.unpack_from(head, 2)[0]
            if size >> 63:
                raise WebSocketProtocolError(1002, "announced an impossible frame length")
        if opcode >= 0x8:
            if opcode not in (_OP_CLOSE, _OP_PING, _OP_PONG):
                raise WebSocketProtocolError(1002, f"used unknown opcode {opcode}")
            if not fin or size > 125:
                raise WebSocketProtocolError(1002, "sent a fragmented or long control frame")
        elif opcode == _OP_TEXT and not self._from_client:
            raise WebSocketProtocolError(
                1003, "sent a text message, which the protocol has none of"
            )
        elif opcode in (_OP_BINARY, _OP_TEXT):
            if self._in_message:
                raise WebSocketProtocolError(1002, "started a message inside another")
            self._in_message = True
            self._message_start = True
        elif opcode == _OP_CONTINUATION:
            if not self._in_message:
                raise WebSocketProtocolError(1002, "continued a message it never started")
        else:
            raise WebSocketProtocolError(1002, f"used unknown opcode {opcode}")
        self._opcode, self._fin, self._left = opcode, fin, size


def tls_object(transport: trio.abc.Stream) -> ssl.SSLObject | None:
    """The `ssl.SSLObject` of a trio SSLStream (for `more_decrypted`); None for any other
    transport, or a trio whose SSLStream keeps it elsewhere."""
    if isinstance(transport, trio.SSLStream):
        tls = getattr(transport, "_ssl_object", None)
        return tls if isinstance(tls, ssl.SSLObject) else None
    return None


def more_decrypted(tls: ssl.SSLObject, data: bytes, limit: int) -> bytes:
    """`data` (what a `receive_some` of the SSLStream owning `tls` returned) and whatever else
    the TLS layer can decrypt now without waiting, up to `limit` bytes in all.

    trio's SSLStream returns one TLS record (16 KiB at most) per `receive_some`, though it
    reads the socket 64 KiB at a time: a bulk stream took four passes through a hop (the
    websocket parser, the h2 link's reader, its writer's batch) per socket read. The records
    already received are decrypted here in one go. Only reads are made on the stream's
    `ssl.SSLObject` (anything a read makes it want to send, trio sends with its next
    operation); an error is left for trio's next `receive_some` to meet.
    """
    parts = [data]
    size = len(data)
    while size < limit:
        try:
            more = tls.read(limit - size)
        except ssl.SSLError:  # SSLWantReadError: no whole record left; others: later
            break
        if not more:
            break
        parts.append(more)
        size += len(more)
    return data if len(parts) == 1 else b"".join(parts)


async def receive_plaintext(
    io: trio.abc.Stream | DirectTLS, tls: ssl.SSLObject | None, size: int
) -> bytes:
    """One read of a port-forward's connection (the daemon's client, the sandbox API server's
    `wsdirect`): through `DirectTLS` when it drives the TLS connection, else the stream's
    `receive_some` and what the TLS layer holds already (`more_decrypted`, for `tls`)."""
    if isinstance(io, DirectTLS):
        return await io.receive_some(size)
    data = bytes(await io.receive_some(size))
    if data and tls is not None:
        data = more_decrypted(tls, data, size)
    return data


async def take_lock(lock: trio.StrictFIFOLock) -> None:
    """Acquire `lock`, with no schedule point when it is free (trio's `async with` always adds
    one: a pass of the scheduler per frame written)."""
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()


_KEYS = [b""]  # 4-byte masking keys not used yet, from the OS's random source


def _mask_key() -> bytes:
    """A fresh masking key from the OS's random source (RFC 6455 5.3), taken 256 at a time:
    a getrandom() call per frame was a tenth of a small message's cost."""
    if len(_KEYS) == 1:
        pool = os.urandom(1024)
        _KEYS[:] = [b"", *(pool[i : i + 4] for i in range(0, 1024, 4))]
    return _KEYS.pop()


def _frame(opcode: int, payload: bytes | memoryview, first_byte: int | None = None) -> bytes:
    """One masked client frame (FIN set); `first_byte` goes before `payload` (the channel)."""
    size = len(payload) + (first_byte is not None)
    if size <= 125:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size <= 0xFFFF:
        header = bytes((0x80 | opcode, 0xFE)) + _LEN16.pack(size)
    else:
        header = bytes((0x80 | opcode, 0xFF)) + _LEN64.pack(size)
    key = _mask_key()
    if first_byte is None:
        return b"".join((header, key, _mask(payload, key)))
    # The channel byte masked with the key's first byte, the payload with the key rotated by
    # one: the payload is copied once (by the mask), not first joined to its channel byte.
    return b"".join((header, key, bytes((first_byte ^ key[0],)), _mask(payload, key[1:] + key[:1])))


class PortForwardClient(trio.abc.Stream):
    """The dialer's end of one forwarded port: a trio Stream whose reads and writes are the
    websocket's own, in the caller's task (no reader task and queue between the socket and the
    consumer: each message costs no task switch). Strips the server's port prefix from both
    channels and raises the error channel's text as `PortForwardError`. No half-close (v4).
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        port: int,
        *,
        description: str,
        received: bytes = b"",
    ) -> None:
        self._transport = transport
        # The TLS object of a trio SSLStream transport, read directly for the records it holds
        # already (`more_decrypted`); None for any other transport or trio version.
        self._tls = tls_object(transport)
        # Reads and writes: the TLS connection driven directly (tele.k8s.directtls) when the
        # transport is a trio SSLStream it knows, else the transport's own calls.
        self._io: trio.abc.Stream | DirectTLS = DirectTLS.of(transport) or transport
        self._router = _Router(port, description, client_side=True)
        self._description = description
        self._parser = _FrameParser()
        self._channel = -1  # of the message being received
        self._pending: deque[memoryview] = deque()
        self._pending_size = 0
        self._early = received  # bytes that came behind the handshake's answer
        self._send_lock = trio.StrictFIFOLock()
        self._close_code: int | None = None  # the server's Close frame, once it came
        self._close_reason = ""
        self._lost = False
        self._closed = False
        self._receiving = False
        self._sending = False

    @property
    def description(self) -> str:
        return self._description

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_usable()
            view = memoryview(data).cast("B")
            if not view:
                await trio.lowlevel.checkpoint()
                return
            for start in range(0, len(view), MAX_SEND_MESSAGE):
                await self._write(_frame(_OP_BINARY, view[start : start + MAX_SEND_MESSAGE], 0))
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("the port-forward stream was closed")
        await self._transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        _check_max_bytes(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed")
            waited = False
            while not self._pending:
                if self._router.error is not None:
                    raise self._router.error
                if self._close_code is not None or self._lost:
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    return self._end_of_stream()
                waited = True
                if self._early:
                    data, self._early = self._early, b""
                else:
                    data = await self._read()
                if data:
                    await self._take_read(data)
                else:
                    self._lost = True
            if not waited:
                await trio.lowlevel.checkpoint()  # every receive_some is a checkpoint
            return self._take_pending(max_bytes or RECEIVE_BUFFER_SIZE)
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            # A Close frame (normal closure) when the connection is still fine; a peer that
            # does not take it within a short wait does not hold us.
            if not self._lost and self._router.error is None:
                with trio.move_on_after(CLOSE_TIMEOUT):
                    try:
                        async with self._send_lock:
                            await self._io.send_all(_frame(_OP_CLOSE, (1000).to_bytes(2, "big")))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        finally:
            self._pending.clear()
            await trio.aclose_forcefully(self._transport)

    # -- internals ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the port-forward stream was closed")
        if self._router.error is not None:
            raise self._router.error
        if self._close_code is not None or self._lost:
            raise PortForwardBroken(
                f"the port-forward to {self._description} closed ({self._reason_text()})"
            )

    async def _write(self, frame: bytes) -> None:
        lock = self._send_lock
        try:
            # The lock orders our frames with the PONG and Close answers the reader writes.
            await take_lock(lock)
            try:
                await self._io.send_all(frame)
            finally:
                lock.release()
        except (trio.BrokenResourceError, OSError) as exc:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed") from None
            self._lost = True
            raise PortForwardBroken(
                f"the port-forward to {self._description} closed (connection lost: {exc})"
            ) from None
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the port-forward stream was closed") from None

    async def _read(self) -> bytes:
        try:
            return await receive_plaintext(self._io, self._tls, RECEIVE_BUFFER_SIZE)
        except (trio.BrokenResourceError, OSError):
            return b""
        except trio.ClosedResourceError:
            if self._closed:
                raise trio.ClosedResourceError("the port-forward stream was closed") from None
            return b""

    async def _take_read(self, data: bytes) -> None:
        """Route one read's frames: data to `_pending`, errors to the router; answer PINGs
        and the server's Close."""
        parser = self._parser
        items = parser.feed(data)
        router = self._router
        answers: list[bytes] = []
        for kind, payload, starts in items:
            if kind == "data":
                if starts:
                    self._channel = payload[0]
                # A server's frames are not masked: the parser gives views of the read.
                view = cast(memoryview, payload)
                body = router.route(self._channel, view[1:] if starts else view)
                if body:
                    self._pending.append(body)
                    self._pending_size += len(body)
            elif kind == "ping":
                answers.append(_frame(_OP_PONG, payload))
            elif kind == "close":
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._close_code = code
                self._close_reason = bytes(payload[2:]).decode("utf-8", "replace")
                answers.append(_frame(_OP_CLOSE, payload[:2]))
                break
            if router.error is not None:
                break
        if parser.error is not None and router.error is None and self._close_code is None:
            router.fail(
                PortForwardBroken(f"the port-forward to {self._description} {parser.error}")
            )
            answers.append(_frame(_OP_CLOSE, parser.error.code.to_bytes(2, "big")))
        if answers:
            with trio.move_on_after(CLOSE_TIMEOUT):
                try:
                    async with self._send_lock:
                        await self._io.send_all(b"".join(answers))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._lost = True

    def _take_pending(self, limit: int) -> bytes:
        pending = self._pending
        first = pending[0]
        if len(first) >= limit:
            if len(first) == limit:
                pending.popleft()
            else:
                pending[0] = first[limit:]
            self._pending_size -= limit
            return first[:limit].tobytes()
        parts = [pending.popleft()]
        size = len(first)
        while pending and size + len(pending[0]) <= limit:
            part = pending.popleft()
            parts.append(part)
            size += len(part)
        self._pending_size -= size
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def _end_of_stream(self) -> bytes:
        if self._router.error is not None:
            raise self._router.error
        if self._close_code in (1000, 1001):
            return b""
        raise PortForwardBroken(
            f"the port-forward to {self._description} broke off ({self._reason_text()})"
        )

    def _reason_text(self) -> str:
        if self._close_code is None:
            return "websocket close 1006 ABNORMAL_CLOSURE: connection lost"
        text = f"websocket close {self._close_code}"
        return f"{text}: {self._close_reason}" if self._close_reason else text


def _rejection_error(description: str, status: int, body: bytes) -> PortForwardError:
    message = ""
    if body:
        try:
            document = json.loads(body)
            message = str(document.get("message", "")) if isinstance(document, dict) else ""
        except ValueError:
            message = body[:200].decode("utf-8", "replace").strip()
    hint = {
        401: "the cluster did not accept tele's credentials; check the kubeconfig",
        403: "the user may not create pods/portforward here",
        404: "the pod does not exist",
    }.get(status, "")
    detail = "; ".join(part for part in (message, hint) if part)
    return PortForwardError(
        f"the API server refused the port-forward to {description} "
        f"(HTTP {status}{': ' + detail if detail else ''})"
    )


@asynccontextmanager
async def open_portforward(
    cluster: ClusterConnection,
    namespace: str,
    pod: str,
    port: int,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> AsyncIterator[PortForwardClient]:
    """Open a port-forward to `pod`'s `port`; yields a Stream, closes it on exit.

    Raises `PortForwardError` (a `ConnectionFailed`) when the API server cannot be reached or
    refuses, and from stream operations when the cluster reports an error for the port.
    """
    description = f"pod {namespace}/{pod} port {port}"
    resource = cluster.path_prefix + portforward_path(namespace, pod, port)
    headers = await cluster.auth_headers()
    stream: PortForwardClient | None = None
    with trio.move_on_after(connect_timeout):
        transport = await _connect(cluster, description)
        try:
            received = await _upgrade(transport, cluster, resource, headers, description)
        except BaseException:
            await trio.aclose_forcefully(transport)
            raise
        stream = PortForwardClient(transport, port, description=description, received=received)
    if stream is None:
        raise PortForwardError(
            f"the port-forward to {description} was not set up within {connect_timeout:g} s"
        )
    try:
        yield stream
    finally:
        await stream.aclose()


async def _upgrade(
    transport: trio.abc.Stream,
    cluster: ClusterConnection,
    resource: str,
    headers: list[tuple[bytes, bytes]],
    description: str,
) -> bytes:
    """The websocket upgrade (RFC 6455 section 4) for `resource`; returns the bytes that came
    behind the server's 101 answer (its first frames). A refusal, or an answer that is no
    websocket of our subprotocol, raises PortForwardError; at most `_MAX_HANDSHAKE` bytes of
    the answer are read."""
    key = base64.b64encode(os.urandom(16))
    host = cluster.host if ":" not in cluster.host else f"[{cluster.host}]"
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HANDSHAKE)
    request = h11.Request(
        method="GET",
        target=resource,
        headers=[
            (b"Host", f"{host}:{cluster.port}".encode()),
            (b"Upgrade", b"websocket"),
            (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Key", key),
            (b"Sec-WebSocket-Version", b"13"),
            (b"Sec-WebSocket-Protocol", SUBPROTOCOL.encode()),
            *headers,
        ],
    )
    try:
        await transport.send_all(client.send(request) + client.send(h11.EndOfMessage()))
        body = bytearray()
        status = 0
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await transport.receive_some(RECEIVE_BUFFER_SIZE))
                if not data and not status:
                    raise PortForwardError(
                        f"the API server closed the connection for the port-forward to "
                        f"{description} without answering"
                    )
                client.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                break
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data) and status:
                body += event.data[: _MAX_HANDSHAKE - len(body)]
                if len(body) < _MAX_HANDSHAKE:
                    continue
            if status and isinstance(event, (h11.Data, h11.EndOfMessage, h11.ConnectionClosed)):
                raise _rejection_error(description, status, bytes(body))
            if isinstance(event, h11.ConnectionClosed):
                raise PortForwardError(
                    f"the API server closed the connection for the port-forward to "
                    f"{description} without answering"
                )
    except h11.ProtocolError as exc:
        if status:  # a refusal whose body broke off: the status says enough
            raise _rejection_error(description, status, bytes(body)) from None
        raise PortForwardError(
            f"the API server's answer to the port-forward to {description} is not valid HTTP: {exc}"
        ) from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise PortForwardError(
            f"the connection to the API server broke while setting up the port-forward to "
            f"{description}: {exc}"
        ) from None
    answer = {name.lower(): value for name, value in event.headers}
    expected = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    if (
        answer.get(b"upgrade", b"").lower() != b"websocket"
        or answer.get(b"sec-websocket-accept") != expected
        or b"sec-websocket-extensions" in answer
    ):
        raise PortForwardError(
            f"the API server's answer to the port-forward to {description} is not a "
            "websocket upgrade"
        )
    if answer.get(b"sec-websocket-protocol") != SUBPROTOCOL.encode():
        raise PortForwardError(f"the API server does not speak {SUBPROTOCOL} for {description}")
    return bytes(client.trailing_data[0])


async def _connect(
    cluster: ClusterConnection, description: str
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """TCP (+TLS) to the API server; OS and TLS failures become PortForwardError."""
    where = f"{cluster.host}:{cluster.port}"
    try:
        tcp = await trio.open_tcp_stream(cluster.host, cluster.port)
    except OSError as exc:
        raise PortForwardError(
            f"cannot reach the Kubernetes API server at {where} for {description}: "
            f"{exc.strerror or exc}"
        ) from exc
    context = cluster.new_ssl_context(alpn=["http/1.1"])  # a websocket upgrade is HTTP/1.1
    if context is None:
        return tcp
    tls = trio.SSLStream(
        tcp,
        context,
        server_hostname=cluster.tls_server_name or cluster.host,
        https_compatible=True,
    )
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__ or exc
        raise PortForwardError(
            f"the TLS handshake with the API server at {where} failed: {cause}"
        ) from exc
    return tls


async def accept_portforward(
    request: trio_websocket.WebSocketRequest, port: int, *, description: str = "client"
) -> PortForwardStream:
    """Server end (tests, sandbox): accept a port-forward request and announce `port`."""
    websocket = await request.accept(subprotocol=SUBPROTOCOL)
    stream = PortForwardStream(websocket, port, description=description)
    await stream.start()
    return stream


def parse_portforward_target(target: str) -> tuple[str, str, int] | None:
    """Server end: (namespace, pod, port) from a request target, or None if it is not one."""
    parts = urllib.parse.urlsplit(target)
    match = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward", parts.path)
    ports = urllib.parse.parse_qs(parts.query).get("ports", [])
    if match is None or len(ports) != 1 or not ports[0].isdigit():
        return None
    return match.group(1), match.group(2), int(ports[0])
