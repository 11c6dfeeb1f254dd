"""The tunnel protocol carried on HTTP/2 streams: message kinds, the open/accept/refuse header
codec with its limits, reset reasons <-> HTTP/2 error codes, and the UDP datagram framing.

Sans-IO: pure functions and small objects over bytes and header lists; the trio runtime that
drives them is `tele.rpc.tunnel`. Decoders raise only `TunnelProtocolError` (or a subclass).

Message kinds. One tunnel stream is one HTTP/2 stream on the link that also carries RPC; every
kind below maps onto an HTTP/2 frame, so flow control, PING and GOAWAY stay the h2 runtime's.

=============  =====================================  ==========================================
kind           who sends it, when                     on the wire
=============  =====================================  ==========================================
OPEN           the dialing side (laptop daemon for    HEADERS `:method CONNECT`,
               connect; agent/manager relays too),    `:authority <ip>:<port>` (IPv6 in
               once, to start a stream towards a      brackets), `tele-protocol: tcp|udp`,
               destination                            `tele-session: <id>` (see OpenRequest)
DIAL-BACK      the laptop, after the manager told it  OPEN plus `tele-dial-id: <id>`; the
               over an RPC server stream "dial back   authority names the destination the
               for id X" (engagements: traffic flows  engaged connection was headed for; the
               cluster -> laptop, but the laptop      manager splices the stream to the one
               always opens streams)                  waiting under that id
ACCEPT         the serving side, once, when the       HEADERS `:status 200`
               destination connection is up; for an
               early OPEN (`tele-early: 1`: the
               opener sends DATA without waiting for
               it) it may ride on the first DATA or
               END_STREAM instead
REFUSE         the serving side, instead of ACCEPT:   HEADERS `:status 4xx|5xx` with
               refused, unreachable, timeout, policy  `tele-reason: <reason>` and END_STREAM
DATA           either side, after ACCEPT              DATA frames: raw TCP bytes, or UDP
                                                      datagrams framed by `encode_datagram`
HALF-CLOSE     either side, when its source has no    END_STREAM on the last DATA (or an empty
               more bytes (TCP FIN)                   DATA frame); the other direction goes on
RESET          either side, on any failure after      RST_STREAM with `reason_to_code(reason)`
               OPEN (destination reset, protocol
               error, cancellation, idle timeout)
KEEPALIVE      the link (h2 runtime), periodically    PING; no ACK in time fails the whole link
=============  =====================================  ==========================================

Limits on everything a peer controls: header count and sizes (`MAX_HEADERS`,
`MAX_HEADER_VALUE`), identifier syntax, datagram length (`MAX_DATAGRAM`), tunnel streams served
at once (`MAX_TUNNEL_STREAMS`, beyond which OPENs get REFUSE(overloaded)); frame sizes, header
list size and concurrent streams per link are HTTP/2 settings the h2 runtime enforces.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Final

# -- limits -------------------------------------------------------------------------------------

MAX_HEADERS: Final = 32
"""Most header fields an OPEN or a response may carry (pseudo-headers included)."""
MAX_HEADER_VALUE: Final = 256
"""Longest header value tele accepts in a tunnel message; every legitimate one is far shorter."""
MAX_ID_LENGTH: Final = 64
"""Longest session or dial-back id."""
MAX_TUNNEL_STREAMS: Final = 16_384
"""Tunnel streams one server serves at once (all links together): above the 10,000 a link must
carry; each costs two file descriptors at most, which bounds what a peer can make us hold."""
MAX_DATAGRAM: Final = 65_535
"""Largest UDP payload the 2-byte length prefix can describe (IPv6 payload max without jumbo)."""
DATAGRAM_HEADER: Final = 2

# -- header names -------------------------------------------------------------------------------

CONNECT: Final = "CONNECT"
HEADER_PROTOCOL: Final = "tele-protocol"
HEADER_SESSION: Final = "tele-session"
HEADER_DIAL_ID: Final = "tele-dial-id"
HEADER_EARLY: Final = "tele-early"
HEADER_REASON: Final = "tele-reason"
HEADER_DETAIL: Final = "tele-detail"
MAX_DETAIL: Final = 200
"""A REFUSE's detail (one sentence for the opener's log) is cut to this many characters."""

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TunnelProtocolError(ValueError):
    """A peer sent a tunnel message tele does not accept (malformed, oversized, unknown)."""


class DatagramTooLarge(TunnelProtocolError):
    """A UDP datagram (sent or announced by a length prefix) is above the maximum."""


class Protocol(enum.Enum):
    """Transport protocol of the destination a tunnel stream leads to."""

    TCP = "tcp"
    UDP = "udp"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a tunnel stream leads: protocol, IP literal (names are resolved before), port."""

    protocol: Protocol
    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65_535:
            raise TunnelProtocolError(f"port {self.port} is outside 1-65535")

    @property
    def authority(self) -> str:
        """`:authority` form: `ip:port`, IPv6 in brackets (RFC 3986 host syntax)."""
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    def __str__(self) -> str:
        return f"{self.protocol.value}/{self.authority}"

    @classmethod
    def parse(cls, protocol: str, authority: str) -> Destination:
        """Decode `tele-protocol` and `:authority` values; only IP literals are accepted."""
        try:
            proto = Protocol(protocol)
        except ValueError:
            raise TunnelProtocolError(f"unknown tunnel protocol {protocol[:16]!r}") from None
        host, sep, port_text = authority.rpartition(":")
        if not sep or not port_text.isdigit() or len(port_text) > 5:
            raise TunnelProtocolError(f"authority {authority[:64]!r} is not ip:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            if ":" not in host:
                raise TunnelProtocolError(f"bracketed host {host[:64]!r} is not IPv6")
        elif ":" in host:
            raise TunnelProtocolError(f"IPv6 host in {authority[:64]!r} must be bracketed")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise TunnelProtocolError(f"host {host[:64]!r} is not an IP address") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise TunnelProtocolError("IPv6 zone ids are not accepted")
        return cls(proto, ip, int(port_text))


def _check_id(kind: str, value: str) -> str:
    if len(value) > MAX_ID_LENGTH or not _ID_RE.fullmatch(value):
        raise TunnelProtocolError(
            f"{kind} must be 1-{MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ -"
        )
    return value


def _header_map(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Headers as a dict after the limits every tunnel message shares; duplicates refused."""
    if len(headers) > MAX_HEADERS:
        raise TunnelProtocolError(f"{len(headers)} header fields, at most {MAX_HEADERS} allowed")
    result: dict[str, str] = {}
    for name, value in headers:
        if len(value) > MAX_HEADER_VALUE or len(name) > MAX_HEADER_VALUE:
            raise TunnelProtocolError(f"header {name[:32]!r} is longer than {MAX_HEADER_VALUE}")
        if name in result:
            raise TunnelProtocolError(f"header {name[:32]!r} appears twice")
        result[name] = value
    return result


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """OPEN (and DIAL-BACK when `dial_id` is set): the HEADERS that start a tunnel stream.

    `session` names the tele session the stream belongs to (the manager's policy and accounting
    key). `dial_id` answers the manager's "dial back for id X": the manager pairs this stream
    with the one it holds under that id instead of dialing `destination` itself.
    """

    destination: Destination
    session: str
    dial_id: str | None = None
    early: bool = False
    """The opener sends DATA without waiting for ACCEPT (`tele.rpc.tunnel.dial`'s optimistic
    open), so nothing waits for ACCEPT on its own: the server may let it ride on its first
    DATA (or END_STREAM), one write and one wake-up of the opener less per connection."""

    def __post_init__(self) -> None:
        _check_id("session id", self.session)
        if self.dial_id is not None:
            _check_id("dial-back id", self.dial_id)

    def to_headers(self) -> list[tuple[str, str]]:
        headers = [
            (":method", CONNECT),
            (":authority", self.destination.authority),
            (HEADER_PROTOCOL, self.destination.protocol.value),
            (HEADER_SESSION, self.session),
        ]
        if self.dial_id is not None:
            headers.append((HEADER_DIAL_ID, self.dial_id))
        if self.early:
            headers.append((HEADER_EARLY, "1"))
        return headers

    @classmethod
    def from_headers(cls, headers: list[tuple[str, str]]) -> OpenRequest:
        fields = _header_map(headers)
        if fields.get(":method") != CONNECT:
            raise TunnelProtocolError("a tunnel stream must open with :method CONNECT")
        # Plain CONNECT (RFC 9113 8.5) carries neither :scheme nor :path; extended CONNECT
        # (:protocol) is not part of the tunnel protocol.
        for forbidden in (":scheme", ":path", ":protocol"):
            if forbidden in fields:
                raise TunnelProtocolError(f"a tunnel OPEN must not carry {forbidden}")
        try:
            authority = fields[":authority"]
            protocol = fields[HEADER_PROTOCOL]
            session = fields[HEADER_SESSION]
        except KeyError as missing:
            raise TunnelProtocolError(f"tunnel OPEN lacks header {missing.args[0]}") from None
        early = fields.get(HEADER_EARLY)
        if early not in (None, "1"):
            raise TunnelProtocolError(f"{HEADER_EARLY} must be 1, not {early[:16]!r}")
        return cls(
            Destination.parse(protocol, authority),
            _check_id("session id", session),
            fields.get(HEADER_DIAL_ID),
            early is not None,
        )


class ResetReason(enum.Enum):
    """Why a tunnel stream was refused or reset; the value is the `tele-reason` token."""

    REFUSED = "refused"  # the destination actively refused (TCP RST to our SYN, ICMP port unr.)
    UNREACHABLE = "unreachable"  # no route / host unreachable / network down
    TIMEOUT = "timeout"  # the dial or an idle timer ran out
    POLICY = "policy"  # tele's policy forbids this destination or session
    RESET = "reset"  # the destination connection was reset after it was up
    CANCELLED = "cancelled"  # the other side no longer wants the stream
    OVERLOADED = "overloaded"  # too many streams / dials in progress; retry later
    PROTOCOL = "protocol"  # malformed tunnel message on this stream
    INTERNAL = "internal"  # anything else; the log on the side that reset says what


# HTTP status for a REFUSE response per reason. The `tele-reason` header is what tele reads;
# the status keeps the response meaningful to generic HTTP/2 tooling.
_STATUS: Final[dict[ResetReason, int]] = {
    ResetReason.REFUSED: 502,
    ResetReason.UNREACHABLE: 502,
    ResetReason.RESET: 502,
    ResetReason.TIMEOUT: 504,
    ResetReason.POLICY: 403,
    ResetReason.CANCELLED: 499,
    ResetReason.OVERLOADED: 503,
    ResetReason.PROTOCOL: 400,
    ResetReason.INTERNAL: 500,
}
_REASON_BY_STATUS: Final[dict[int, ResetReason]] = {
    400: ResetReason.PROTOCOL,
    403: ResetReason.POLICY,
    429: ResetReason.OVERLOADED,
    503: ResetReason.OVERLOADED,
    504: ResetReason.TIMEOUT,
}

# RST_STREAM error codes. Standard HTTP/2 codes where one fits (RFC 9113 7; CONNECT_ERROR is
# what RFC 9113 8.5 prescribes for a reset TCP connection); the reasons HTTP/2 has no code for
# use private codes (0x7e1e00xx: RFC 9113 says unknown codes get no special treatment, and
# peers that do not know them read them as INTERNAL_ERROR).
H2_NO_ERROR: Final = 0x0
H2_PROTOCOL_ERROR: Final = 0x1
H2_INTERNAL_ERROR: Final = 0x2
H2_REFUSED_STREAM: Final = 0x7
H2_CANCEL: Final = 0x8
H2_CONNECT_ERROR: Final = 0xA
_PRIVATE: Final = 0x7E1E0000

_CODE: Final[dict[ResetReason, int]] = {
    ResetReason.RESET: H2_CONNECT_ERROR,
    ResetReason.CANCELLED: H2_CANCEL,
    ResetReason.PROTOCOL: H2_PROTOCOL_ERROR,
    ResetReason.INTERNAL: H2_INTERNAL_ERROR,
    ResetReason.OVERLOADED: H2_REFUSED_STREAM,
    ResetReason.REFUSED: _PRIVATE | 0x01,
    ResetReason.UNREACHABLE: _PRIVATE | 0x02,
    ResetReason.TIMEOUT: _PRIVATE | 0x03,
    ResetReason.POLICY: _PRIVATE | 0x04,
}
_REASON_BY_CODE: Final[dict[int, ResetReason]] = {code: r for r, code in _CODE.items()}
_REASON_BY_CODE[H2_NO_ERROR] = ResetReason.CANCELLED  # a peer's NO_ERROR reset = "stop"


def reason_to_code(reason: ResetReason) -> int:
    """RST_STREAM error code announcing `reason`."""
    return _CODE[reason]


def reason_from_code(code: int) -> ResetReason:
    """Reason for a received RST_STREAM code; unknown codes are INTERNAL (RFC 9113 7)."""
    return _REASON_BY_CODE.get(code, ResetReason.INTERNAL)


@dataclass(frozen=True, slots=True)
class Accept:
    """ACCEPT: the destination connection is up; DATA may flow both ways."""

    def to_headers(self) -> list[tuple[str, str]]:
        return [(":status", "200")]


@dataclass(frozen=True, slots=True)
class Refuse:
    """REFUSE: the stream will carry no data; `reason` says why (sent with END_STREAM)."""

    reason: ResetReason
    detail: str = ""
    """Why, in one sentence the opener can log (printable ASCII, at most MAX_DETAIL)."""

    @property
    def status(self) -> int:
        return _STATUS[self.reason]

    def to_headers(self) -> list[tuple[str, str]]:
        headers = [(":status", str(self.status)), (HEADER_REASON, self.reason.value)]
        detail = printable_detail(self.detail)
        if detail:
            headers.append((HEADER_DETAIL, detail))
        return headers


def printable_detail(text: str) -> str:
    """A detail as tele sends and shows it: printable ASCII only, bounded, and without blanks
    at either end (h2 refuses such a header value as a protocol error of the whole link: a
    detail cut at a space would end every stream of the link)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_DETAIL]).strip(" ")


def decode_response(headers: list[tuple[str, str]]) -> Accept | Refuse:
    """Read the serving side's answer to an OPEN."""
    fields = _header_map(headers)
    status_text = fields.get(":status", "")
    if len(status_text) != 3 or not status_text.isdigit():
        raise TunnelProtocolError(f"tunnel response has no valid :status ({status_text[:8]!r})")
    status = int(status_text)
    if status == 200:
        return Accept()
    if not 400 <= status <= 599:
        raise TunnelProtocolError(f"tunnel response status {status} is neither 200 nor an error")
    detail = printable_detail(fields.get(HEADER_DETAIL, ""))
    token = fields.get(HEADER_REASON)
    if token is not None:
        try:
            return Refuse(ResetReason(token), detail)
        except ValueError:
            pass  # a newer peer's reason: fall back on the status
    return Refuse(_REASON_BY_STATUS.get(status, ResetReason.INTERNAL), detail)


# -- UDP datagrams --------------------------------------------------------------------------------


def encode_datagram(
    payload: bytes | bytearray | memoryview, *, maximum: int = MAX_DATAGRAM
) -> bytes:
    """One UDP datagram as DATA bytes: a 2-byte big-endian length, then the payload."""
    if len(payload) > maximum:
        raise DatagramTooLarge(f"UDP datagram of {len(payload)} bytes exceeds {maximum}")
    return len(payload).to_bytes(DATAGRAM_HEADER, "big") + bytes(payload)


class DatagramDecoder:
    """Splits a UDP flow's DATA bytes back into datagrams.

    Holds at most one incomplete datagram (<= 2 + `maximum` bytes) between calls, so a peer
    cannot make it buffer more; a length above `maximum` raises `DatagramTooLarge` and the
    decoder stays failed (the stream must be reset: framing is lost).
    """

    __slots__ = ("_buffer", "_failed", "maximum")

    def __init__(self, maximum: int = MAX_DATAGRAM) -> None:
        if not 0 <= maximum <= MAX_DATAGRAM:
            raise ValueError(f"maximum must be within 0-{MAX_DATAGRAM}")
        self.maximum = maximum
        self._buffer = bytearray()
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes of an incomplete datagram held back."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return every datagram they complete, in order."""
        if self._failed:
            raise TunnelProtocolError("UDP framing was lost earlier on this stream")
        buffer = self._buffer
        buffer += data
        datagrams: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= DATAGRAM_HEADER:
            length = (buffer[offset] << 8) | buffer[offset + 1]
            if length > self.maximum:
                self._failed = True
                self._buffer = bytearray()
                raise DatagramTooLarge(
                    f"peer announced a {length}-byte UDP datagram (max {self.maximum})"
                )
            stop = offset + DATAGRAM_HEADER + length
            if stop > end:
                break
            datagrams.append(bytes(buffer[offset + DATAGRAM_HEADER : stop]))
            offset = stop
        del buffer[:offset]
        return datagrams

    def end(self) -> None:
        """The peer half-closed: anything still held is a truncated datagram."""
        if self._buffer:
            self._failed = True
            raise TunnelProtocolError(
                f"UDP stream ended inside a datagram ({len(self._buffer)} bytes pending)"
            )
