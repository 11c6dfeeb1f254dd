"""SPDY/3.1 framing, sans-IO: bytes in, events out, bytes to send. What Kubernetes' streaming
subresources (exec, attach, port-forward) speak after `Upgrade: SPDY/3.1`, and inside a
websocket when kubectl ≥ 1.31 tunnels port-forward (spec: "SPDY Protocol - Draft 3.1").

Frames (8-byte header; control frames have the high bit set and version 3):

| frame | type | who sends it here | what it carries |
|---|---|---|---|
| SYN_STREAM | 1 | client | opens a stream: odd id, header block, FIN / UNIDIRECTIONAL |
| SYN_REPLY | 2 | server | accepts a stream: header block |
| RST_STREAM | 3 | both | ends one stream abnormally with a status |
| SETTINGS | 4 | either | INITIAL_WINDOW_SIZE (7) changes every stream's send window |
| PING | 6 | both | echoed when the id's parity is the peer's |
| GOAWAY | 7 | both | no new streams; the last stream id the sender accepted |
| HEADERS | 8 | either | more headers for a stream (ignored by Kubernetes) |
| WINDOW_UPDATE | 9 | both | the receiver has consumed data: stream (id > 0) or session (id 0) |
| data | - | both | a stream's bytes; FIN half-closes the sender's side |

Header blocks are zlib streams with the SPDY/3 dictionary, one context per direction for the
whole connection. Everything a peer controls is bounded: frame length, header block size after
decompression (a zlib bomb ends the connection), the number of open streams, and data beyond
the receive window (RST_STREAM FLOW_CONTROL_ERROR). Errors of the whole connection raise
`SpdyProtocolError` after queueing a GOAWAY; errors of one stream queue a RST_STREAM.

Flow control: 64 KiB initial windows for every stream and the session. Receiving, windows are
granted back (WINDOW_UPDATE) only when the application says it consumed the data
(`acknowledge`). Sending, the peer's windows are honoured once the peer shows it does flow
control (it sent a WINDOW_UPDATE or an INITIAL_WINDOW_SIZE setting): Go's moby/spdystream, the
SPDY of kubectl and of the real API server, neither sends WINDOW_UPDATE nor honours windows, so
throttling it to 64 KiB would stall every stream for good.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import NoReturn

VERSION = 3
# The SPDY/3 header dictionary (spec section 2.6.10.1): length-prefixed common header names
# and values, then a run of common text.
_DICTIONARY_WORDS = (  # noqa: SIM905 (the spec's list, kept readable)
    "options head post put delete trace accept accept-charset accept-encoding accept-language "
    "accept-ranges age allow authorization cache-control connection content-base "
    "content-encoding content-language content-length content-location content-md5 "
    "content-range content-type date etag expect expires from host if-match if-modified-since "
    "if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status "
    "200_OK version HTTP/1.1 url public set-cookie keep-alive origin"
).split()
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 "
    "Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 "
    "Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, "
    "Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(
    struct.pack(">I", len(w)) + w.replace("_", " ").encode("ascii") for w in _DICTIONARY_WORDS
) + _DICTIONARY_TAIL.encode("ascii")

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
)
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9
FRAME_TOO_LARGE = 11
# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

SETTINGS_MAX_CONCURRENT_STREAMS = 4
SETTINGS_INITIAL_WINDOW_SIZE = 7

INITIAL_WINDOW = 65536
MAX_WINDOW = (1 << 31) - 1
MAX_DATA_FRAME = 1 << 20
"""The longest data frame accepted (Go writes at most 32 KiB at a time); bounds what one frame
makes us buffer before it is whole."""
MAX_CONTROL_FRAME = 1 << 16
"""The longest control frame accepted (compressed header blocks of a few hundred bytes in
practice)."""
MAX_HEADER_BLOCK = 1 << 16
"""Decompressed header block limit: a few KiB of zlib input can expand to gigabytes."""
MAX_HEADERS = 256
MAX_STREAMS = 512
"""Open streams per connection (port-forward opens two per local connection); more are
refused with RST_STREAM REFUSED_STREAM."""
MAX_SEND_FRAME = 1 << 15


class SpdyProtocolError(Exception):
    """The peer broke the protocol; the connection must end (a GOAWAY is already queued)."""


Headers = list[tuple[str, str]]


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """SYN_STREAM from the peer; reply with `reply` (or `reset`) before its data matters."""

    stream_id: int
    headers: Headers
    fin: bool
    unidirectional: bool
    associated_id: int
    priority: int

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k == name), "")


@dataclass(frozen=True, slots=True)
class StreamReplied:
    stream_id: int
    headers: Headers
    fin: bool


@dataclass(frozen=True, slots=True)
class HeadersReceived:
    stream_id: int
    headers: Headers
    fin: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes of a stream; `acknowledge(stream_id, len(data))` once consumed."""

    stream_id: int
    data: bytes
    fin: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class SettingsReceived:
    values: dict[int, int]


@dataclass(frozen=True, slots=True)
class PingReceived:
    """A ping of ours came back (the peer's own pings are answered without an event)."""

    ping_id: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    last_good_stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted more send window (stream 0: the session's)."""

    stream_id: int
    delta: int


Event = (
    StreamOpened
    | StreamReplied
    | HeadersReceived
    | DataReceived
    | StreamReset
    | SettingsReceived
    | PingReceived
    | GoAwayReceived
    | WindowUpdated
)


# --- header blocks -------------------------------------------------------------------------


def encode_header_block(headers: Headers) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for name, value in headers:
        n, v = name.lower().encode(), value.encode()
        out.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    """Parse a decompressed name/value block; raises ValueError when malformed."""
    if len(block) < 4:
        raise ValueError("header block too short")
    (count,) = struct.unpack_from(">I", block)
    if count > MAX_HEADERS:
        raise ValueError(f"{count} headers in one block")
    pos = 4
    headers: Headers = []
    seen: set[str] = set()

    def take() -> bytes:
        nonlocal pos
        if pos + 4 > len(block):
            raise ValueError("header block truncated")
        (n,) = struct.unpack_from(">I", block, pos)
        pos += 4
        if pos + n > len(block):
            raise ValueError("header block truncated")
        pos += n
        return block[pos - n : pos]

    for _ in range(count):
        raw_name = take()
        raw_value = take()
        if not raw_name:
            raise ValueError("empty header name")
        try:
            name, value = raw_name.decode("ascii"), raw_value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError("header not text") from exc
        if name in seen:
            raise ValueError(f"duplicate header {name}")
        seen.add(name)
        # A NUL separates several values of one header.
        for part in value.split("\0"):
            headers.append((name.lower(), part))
    if pos != len(block):
        raise ValueError("bytes after the header block")
    return headers


class _Inflater:
    """One direction's header decompression context, bounded per block."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(zdict=DICTIONARY)

    def inflate(self, block: bytes) -> bytes:
        try:
            out = self._z.decompress(block, MAX_HEADER_BLOCK + 1)
        except zlib.error as exc:
            raise ValueError(f"header block does not decompress: {exc}") from exc
        if len(out) > MAX_HEADER_BLOCK or self._z.unconsumed_tail:
            raise ValueError(f"header block larger than {MAX_HEADER_BLOCK} bytes")
        return out


class _Deflater:
    def __init__(self) -> None:
        self._z = zlib.compressobj(zdict=DICTIONARY)

    def deflate(self, block: bytes) -> bytes:
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)


# --- frames --------------------------------------------------------------------------------


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def _data(stream_id: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(payload)) + payload


@dataclass(slots=True)
class _Stream:
    send_window: int
    recv_window: int
    local_closed: bool = False
    remote_closed: bool = False
    replied: bool = False
    unacked: int = 0


@dataclass
class Connection:
    """One side of a SPDY/3.1 connection. `server` decides stream and ping id parity."""

    server: bool = True
    max_streams: int = MAX_STREAMS
    _buffer: bytearray = field(default_factory=bytearray)
    _out: bytearray = field(default_factory=bytearray)
    _streams: dict[int, _Stream] = field(default_factory=dict)
    _inflater: _Inflater = field(default_factory=_Inflater)
    _deflater: _Deflater = field(default_factory=_Deflater)
    _last_peer_stream: int = 0
    _next_stream: int = 0
    _next_ping: int = 0
    _peer_initial_window: int = INITIAL_WINDOW
    _session_send_window: int = INITIAL_WINDOW
    _session_recv_window: int = INITIAL_WINDOW
    _session_unacked: int = 0
    peer_flow_control: bool = False
    """True once the peer sent a WINDOW_UPDATE or an INITIAL_WINDOW_SIZE setting."""
    goaway_sent: bool = False
    goaway_received: bool = False
    closed: bool = False

    def __post_init__(self) -> None:
        self._next_stream = 2 if self.server else 1
        self._next_ping = 2 if self.server else 1

    # --- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; `next_event` parses them one frame at a time."""
        if self.closed:
            return
        self._buffer += data

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes arrive. One frame at a time, so that a
        consumer acknowledging as it goes keeps a window-honouring peer within its window."""
        while not self.closed and len(self._buffer) >= 8:
            word, flags_length = struct.unpack_from(">II", self._buffer)
            flags, length = flags_length >> 24, flags_length & 0xFFFFFF
            control = bool(word & 0x80000000)
            limit = MAX_CONTROL_FRAME if control else MAX_DATA_FRAME
            if length > limit:
                self._fail(f"frame of {length} bytes (limit {limit})")
            if len(self._buffer) < 8 + length:
                return None
            payload = bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            if control:
                version, kind = (word >> 16) & 0x7FFF, word & 0xFFFF
                if version != VERSION:
                    self._fail(f"SPDY version {version}")
                event = self._control_frame(kind, flags, payload)
            else:
                event = self._data_frame(word & 0x7FFFFFFF, flags, payload)
            if event is not None:
                return event
        return None

    def events(self) -> list[Event]:
        out: list[Event] = []
        while (event := self.next_event()) is not None:
            out.append(event)
        return out

    def _fail(self, why: str) -> NoReturn:
        if not self.goaway_sent:
            self.goaway(GOAWAY_PROTOCOL_ERROR)
        self.closed = True
        self._buffer.clear()
        raise SpdyProtocolError(why)

    def _headers(self, block: bytes) -> Headers:
        try:
            return decode_header_block(self._inflater.inflate(block))
        except ValueError as exc:
            # The shared decompression context is now unusable: the connection ends.
            self._fail(str(exc))

    def _control_frame(self, kind: int, flags: int, p: bytes) -> Event | None:
        if kind == SYN_STREAM:
            if len(p) < 10:
                self._fail("short SYN_STREAM")
            stream_id, associated = struct.unpack_from(">II", p)
            stream_id &= 0x7FFFFFFF
            associated &= 0x7FFFFFFF
            priority = p[8] >> 5
            headers = self._headers(p[10:])
            peer_parity = 0 if self.server else 1
            if stream_id == 0 or stream_id % 2 == peer_parity:
                self._fail(f"SYN_STREAM with stream id {stream_id}")
            if stream_id <= self._last_peer_stream:
                self._fail(f"SYN_STREAM id {stream_id} not above {self._last_peer_stream}")
            self._last_peer_stream = stream_id
            if self.goaway_sent:
                self.reset(stream_id, REFUSED_STREAM)
                return None
            if len(self._streams) >= self.max_streams:
                self.reset(stream_id, REFUSED_STREAM)
                return None
            stream = _Stream(self._peer_initial_window, INITIAL_WINDOW)
            stream.remote_closed = bool(flags & FLAG_FIN)
            stream.local_closed = bool(flags & FLAG_UNIDIRECTIONAL)
            self._streams[stream_id] = stream
            return StreamOpened(
                stream_id,
                headers,
                bool(flags & FLAG_FIN),
                bool(flags & FLAG_UNIDIRECTIONAL),
                associated,
                priority,
            )
        if kind in (SYN_REPLY, HEADERS):
            if len(p) < 4:
                self._fail("short SYN_REPLY/HEADERS")
            stream_id = struct.unpack_from(">I", p)[0] & 0x7FFFFFFF
            headers = self._headers(p[4:])
            stream_or_none = self._streams.get(stream_id)
            if stream_or_none is None:
                self.reset(stream_id, INVALID_STREAM)
                return None
            fin = bool(flags & FLAG_FIN)
            if fin:
                self._remote_fin(stream_id)
            if kind == SYN_REPLY:
                if stream_or_none.replied:
                    self.reset(stream_id, STREAM_IN_USE)
                    return None
                stream_or_none.replied = True
                return StreamReplied(stream_id, headers, fin)
            return HeadersReceived(stream_id, headers, fin)
        if kind == RST_STREAM:
            if len(p) != 8:
                self._fail("RST_STREAM of the wrong length")
            stream_id, status = struct.unpack(">II", p)
            stream_id &= 0x7FFFFFFF
            if stream_id == 0:
                self._fail("RST_STREAM of stream 0")
            self._streams.pop(stream_id, None)
            return StreamReset(stream_id, status)
        if kind == SETTINGS:
            if len(p) < 4:
                self._fail("short SETTINGS")
            (count,) = struct.unpack_from(">I", p)
            if len(p) != 4 + 8 * count:
                self._fail("SETTINGS of the wrong length")
            values: dict[int, int] = {}
            for i in range(count):
                flags_id, value = struct.unpack_from(">II", p, 4 + 8 * i)
                values[flags_id & 0xFFFFFF] = value
            window = values.get(SETTINGS_INITIAL_WINDOW_SIZE)
            if window is not None:
                if window > MAX_WINDOW:
                    self._fail("INITIAL_WINDOW_SIZE above 2^31-1")
                delta = window - self._peer_initial_window
                self._peer_initial_window = window
                self.peer_flow_control = True
                for stream in self._streams.values():
                    stream.send_window += delta
            return SettingsReceived(values)
        if kind == PING:
            if len(p) != 4:
                self._fail("PING of the wrong length")
            (ping_id,) = struct.unpack(">I", p)
            ours = ping_id % 2 == (0 if self.server else 1)
            if ours:
                return PingReceived(ping_id)
            self._out += _control(PING, 0, p)
            return None
        if kind == GOAWAY:
            if len(p) != 8:
                self._fail("GOAWAY of the wrong length")
            last, status = struct.unpack(">II", p)
            self.goaway_received = True
            return GoAwayReceived(last & 0x7FFFFFFF, status)
        if kind == WINDOW_UPDATE:
            if len(p) != 8:
                self._fail("WINDOW_UPDATE of the wrong length")
            stream_id, delta = struct.unpack(">II", p)
            stream_id &= 0x7FFFFFFF
            delta &= 0x7FFFFFFF
            if delta == 0:
                self._fail("WINDOW_UPDATE of 0")
            self.peer_flow_control = True
            if stream_id == 0:
                self._session_send_window += delta
                if self._session_send_window > MAX_WINDOW:
                    self._fail("session window above 2^31-1")
                return WindowUpdated(0, delta)
            target = self._streams.get(stream_id)
            if target is None:
                return None  # a window for a stream that just ended: harmless
            target.send_window += delta
            if target.send_window > MAX_WINDOW:
                self.reset(stream_id, FLOW_CONTROL_ERROR)
                return None
            return WindowUpdated(stream_id, delta)
        # Unknown control frames (CREDENTIAL, NOOP, future types) are ignored, as the spec says.
        return None

    def _data_frame(self, stream_id: int, flags: int, payload: bytes) -> Event | None:
        if stream_id == 0:
            self._fail("data frame on stream 0")
        stream = self._streams.get(stream_id)
        if stream is None:
            self.reset(stream_id, INVALID_STREAM)
            return None
        if stream.remote_closed:
            self.reset(stream_id, STREAM_ALREADY_CLOSED)
            return None
        size = len(payload)
        if size > stream.recv_window or size > self._session_recv_window:
            self.reset(stream_id, FLOW_CONTROL_ERROR)
            return None
        stream.recv_window -= size
        self._session_recv_window -= size
        fin = bool(flags & FLAG_FIN)
        if fin:
            self._remote_fin(stream_id)
        return DataReceived(stream_id, payload, fin)

    def _remote_fin(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.remote_closed = True
        if stream.local_closed:
            del self._streams[stream_id]

    # --- output --------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def open_stream(self, headers: Headers, *, fin: bool = False) -> int:
        """SYN_STREAM of our own (the client's side; servers here never open streams)."""
        stream_id = self._next_stream
        self._next_stream += 2
        stream = _Stream(self._peer_initial_window, INITIAL_WINDOW, local_closed=fin)
        self._streams[stream_id] = stream
        block = self._deflater.deflate(encode_header_block(headers))
        payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
        self._out += _control(SYN_STREAM, FLAG_FIN if fin else 0, payload)
        return stream_id

    def reply(self, stream_id: int, headers: Headers | None = None, *, fin: bool = False) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.replied = True
        block = self._deflater.deflate(encode_header_block(headers or []))
        self._out += _control(
            SYN_REPLY, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + block
        )
        if fin:
            self._local_fin(stream_id)

    def send_window(self, stream_id: int) -> int:
        """How many bytes `send_data` takes now on this stream (unlimited for a peer that does
        no flow control, as long as the stream is open)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        if not self.peer_flow_control:
            return MAX_WINDOW
        return max(0, min(stream.send_window, self._session_send_window))

    def send_data(self, stream_id: int, data: bytes, *, fin: bool = False) -> int:
        """Queue up to the send window of `data`; returns how many bytes were taken. FIN is
        sent only when all of `data` was taken."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        allowed = min(len(data), self.send_window(stream_id))
        taken = 0
        while taken < allowed:
            chunk = data[taken : taken + min(MAX_SEND_FRAME, allowed - taken)]
            taken += len(chunk)
            last = fin and taken == len(data)
            self._out += _data(stream_id, FLAG_FIN if last else 0, chunk)
        if self.peer_flow_control:
            stream.send_window -= taken
            self._session_send_window -= taken
        if fin and taken == len(data):
            if not data:
                self._out += _data(stream_id, FLAG_FIN, b"")
            self._local_fin(stream_id)
        return taken

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (an empty data frame with FIN)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return
        self._out += _data(stream_id, FLAG_FIN, b"")
        self._local_fin(stream_id)

    def _local_fin(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream.local_closed = True
        if stream.remote_closed:
            del self._streams[stream_id]

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application consumed `size` bytes of this stream: grant them back once a
        quarter of the window has been consumed."""
        if size <= 0:
            return
        self._session_unacked += size
        if self._session_unacked >= INITIAL_WINDOW // 4:
            self._session_recv_window += self._session_unacked
            self._out += _control(WINDOW_UPDATE, 0, struct.pack(">II", 0, self._session_unacked))
            self._session_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.unacked += size
        if stream.unacked >= INITIAL_WINDOW // 4:
            stream.recv_window += stream.unacked
            self._out += _control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, stream.unacked))
            stream.unacked = 0

    def reset(self, stream_id: int, status: int = CANCEL) -> None:
        self._streams.pop(stream_id, None)
        self._out += _control(RST_STREAM, 0, struct.pack(">II", stream_id & 0x7FFFFFFF, status))

    def ping(self) -> int:
        ping_id = self._next_ping
        self._next_ping += 2
        self._out += _control(PING, 0, struct.pack(">I", ping_id))
        return ping_id

    def goaway(self, status: int = GOAWAY_OK) -> None:
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._out += _control(GOAWAY, 0, struct.pack(">II", self._last_peer_stream, status))

    def settings(self, values: dict[int, int]) -> None:
        payload = struct.pack(">I", len(values)) + b"".join(
            struct.pack(">II", key & 0xFFFFFF, value) for key, value in values.items()
        )
        self._out += _control(SETTINGS, 0, payload)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)
