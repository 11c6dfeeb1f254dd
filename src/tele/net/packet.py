"""Whole IP packets: parse one from the TUN, build replies and per-flow TCP segments for it.

`parse_packet` checks the IP header, refuses fragments (`FragmentError`, no reassembly here),
parses the transport header and verifies the transport checksum (skip that when the virtio-net
header says NEEDS_CSUM: the kernel left only the pseudo-header sum in place). The payload is a
`memoryview` into the buffer that was read: no copy until the runtime keeps the bytes.

Builders: `encode` for any single packet, `rst_for`, `icmp_unreachable_for`, `echo_reply_for` for
answers, and `TCPFlowEncoder`, the hot path of the TCP state machine's output: header templates
and pseudo-header sums are computed once per flow, and the checksum can be left to the kernel
(NEEDS_CSUM) with large segments cut by the kernel (GSO_TCPV4/GSO_TCPV6).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from tele.net import checksum
from tele.net.errors import ChecksumError, FragmentError, IntegrityError, UnsupportedError
from tele.net.icmp import (
    ICMP_HEADER_LEN,
    ICMPV4_ADMIN_PROHIBITED,
    ICMPV4_ECHO_REPLY,
    ICMPV4_ECHO_REQUEST,
    ICMPV4_HOST_UNREACHABLE,
    ICMPV4_NET_UNREACHABLE,
    ICMPV4_PORT_UNREACHABLE,
    ICMPV4_UNREACHABLE,
    ICMPV6_ADDRESS_UNREACHABLE,
    ICMPV6_ADMIN_PROHIBITED,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    ICMPV6_NO_ROUTE,
    ICMPV6_PORT_UNREACHABLE,
    ICMPV6_UNREACHABLE,
    ICMPv4Header,
    ICMPv6Header,
)
from tele.net.ip import (
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IPv4Header,
    IPv6Header,
)
from tele.net.tcp import ACK, FIN, RST, SYN, TCP_HEADER_LEN, TCPHeader
from tele.net.udp import UDP_HEADER_LEN, UDPHeader
from tele.net.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HDR_NONE

IPHeader: TypeAlias = IPv4Header | IPv6Header
TransportHeader: TypeAlias = TCPHeader | UDPHeader | ICMPv4Header | ICMPv6Header
Bytes: TypeAlias = bytes | bytearray | memoryview
View: TypeAlias = memoryview  # (a NamedTuple field's type by a name of this module: mypyc)

# Offsets of the checksum field inside each transport header.
_CSUM_OFFSET = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}

# RFC 1812 4.3.2.3: an ICMPv4 error carries as much of the original as fits in 576 bytes;
# RFC 4443 2.4(c): an ICMPv6 error as much as fits in the minimum MTU of 1280.
_ICMPV4_ERROR_MAX = 576
_ICMPV6_ERROR_MAX = 1280

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_VNET = struct.Struct("<BBHHHH")
_IPV4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")  # both headers without options
_IPV6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")
_from_bytes = int.from_bytes


@dataclass(frozen=True, slots=True)
class Packet:
    """A parsed IP packet: IP header, transport header and the transport payload.

    `bytes(packet)` writes the headers as they are, except the transport checksum, which is
    computed; so a packet read off the wire round-trips to the same bytes.
    """

    ip: IPHeader
    transport: TransportHeader
    payload: Bytes = b""

    @property
    def protocol(self) -> int:
        return _protocol_of(self.transport)

    @classmethod
    def from_bytes(cls, buf: Bytes, *, verify_checksum: bool = True) -> Packet:
        return parse_packet(buf, verify_checksum=verify_checksum)

    def __bytes__(self) -> bytes:
        ip = bytes(self.ip)
        header = _with_checksum(self.ip.src, self.ip.dst, self.transport, self.payload)
        return b"".join((ip, header, self.payload))


def parse_packet(buf: Bytes, *, verify_checksum: bool = True) -> Packet:
    """Parse an IPv4 or IPv6 packet carrying TCP, UDP or ICMP; raise a PacketError otherwise.

    Bytes after the IP datagram's stated length (link padding) are ignored.
    """
    if not buf:
        raise IntegrityError("empty packet")
    version = buf[0] >> 4
    ip: IPHeader
    if version == 4:
        ip = IPv4Header.from_bytes(buf)
        if ip.is_fragment:
            raise FragmentError(
                "IPv4 fragment",
                ident=ip.ident,
                offset=ip.fragment_offset * 8,
                more=bool(ip.flags & 1),
            )
        start = ip.header_length
        end = ip.total_length
        protocol = ip.protocol
        if protocol == PROTO_ICMPV6:
            raise UnsupportedError("ICMPv6 inside IPv4")
    elif version == 6:
        ip = IPv6Header.from_bytes(buf)
        start = IPV6_HEADER_LEN + len(ip.extensions)
        end = IPV6_HEADER_LEN + ip.payload_length
        protocol = ip.protocol
        fragment = ip.fragment
        # An atomic fragment (offset 0, no more) is a whole packet (RFC 6946).
        if fragment is not None and (fragment.more or fragment.offset):
            raise FragmentError(
                "IPv6 fragment", ident=fragment.ident, offset=fragment.offset, more=fragment.more
            )
        if protocol == PROTO_ICMP:
            raise UnsupportedError("ICMPv4 inside IPv6")
    else:
        raise IntegrityError(f"IP version {version} is neither 4 nor 6")
    segment = memoryview(buf)[start:end]
    transport: TransportHeader
    if protocol == PROTO_TCP:
        transport = TCPHeader.from_bytes(segment)
        payload = segment[(segment[12] >> 4) * 4 :]
    elif protocol == PROTO_UDP:
        transport = UDPHeader.from_bytes(segment)
        segment = segment[: transport.length]
        payload = segment[UDP_HEADER_LEN:]
        if transport.checksum == 0:
            if version == 6:
                raise IntegrityError("UDP over IPv6 without a checksum")
            return Packet(ip, transport, payload)
    elif protocol == PROTO_ICMP:
        transport = ICMPv4Header.from_bytes(segment)
        payload = segment[ICMP_HEADER_LEN:]
        if verify_checksum and not checksum.verify(segment):
            raise ChecksumError("ICMPv4: bad checksum")
        return Packet(ip, transport, payload)
    elif protocol == PROTO_ICMPV6:
        transport = ICMPv6Header.from_bytes(segment)
        payload = segment[ICMP_HEADER_LEN:]
    else:
        raise UnsupportedError(f"IP protocol {protocol} is not handled")
    if verify_checksum:
        pseudo = checksum.pseudo_header_sum(ip.src, ip.dst, protocol, len(segment))
        if not checksum.verify(segment, pseudo):
            raise ChecksumError(f"IP protocol {protocol}: bad checksum")
    return Packet(ip, transport, payload)


class SegmentView(NamedTuple):
    """The fields of a plain TCP segment, read without building header objects."""

    src: bytes
    sport: int
    dst: bytes
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: View


def fast_tcp(buf: Bytes, *, verify_checksum: bool = True) -> SegmentView | None:
    """The data path's parser: the fields of a segment that `parse_packet` would accept.

    Handles the common case only: IPv4 without options or IPv6 without extension headers,
    not a fragment, TCP without options (tele negotiates no per-segment options) and not a
    SYN. Anything else, malformed packets included, returns None: then call `parse_packet`,
    which handles the rest and reports errors. No header objects are built, which makes it
    2-3x cheaper than `parse_packet` when the checksum is left unverified (bench/netstack.py).
    """
    length = len(buf)
    if length >= 40 and buf[0] == 0x45:
        (_, _, total, _, frag, _, protocol, _, src, dst, sport, dport, seq, ack, off, flags,
         window, _, _) = _IPV4_TCP.unpack_from(buf)  # fmt: skip
        if (
            protocol != PROTO_TCP
            or frag & 0xBFFF  # reserved bit, more-fragments or an offset
            or off & 0xF0 != 0x50
            or flags & SYN
            or not 40 <= total <= length
            or not sport
            or not dport
            or src[0] >= 224
        ):
            return None
        view = memoryview(buf)
        if not checksum.verify(view[:20]):
            return None
        segment = view[20:total]
        tcp_length = total - 20
    elif length >= 60 and buf[0] >> 4 == 6:
        (_, payload_length, next_header, _, src, dst, sport, dport, seq, ack, off, flags,
         window, _, _) = _IPV6_TCP.unpack_from(buf)  # fmt: skip
        if (
            next_header != PROTO_TCP
            or off & 0xF0 != 0x50
            or flags & SYN
            or not 20 <= payload_length <= length - 40
            or not sport
            or not dport
            or src[0] == 0xFF
        ):
            return None
        segment = memoryview(buf)[40 : 40 + payload_length]
        tcp_length = payload_length
    else:
        return None
    if verify_checksum:
        pseudo = checksum.pseudo_header_sum(src, dst, PROTO_TCP, tcp_length)
        if not checksum.verify(segment, pseudo):
            return None
    return SegmentView(src, sport, dst, dport, seq, ack, flags, window, segment[20:])


def _protocol_of(transport: TransportHeader) -> int:
    if isinstance(transport, TCPHeader):
        return PROTO_TCP
    if isinstance(transport, UDPHeader):
        return PROTO_UDP
    if isinstance(transport, ICMPv6Header):
        return PROTO_ICMPV6
    return PROTO_ICMP


def _with_checksum(src: bytes, dst: bytes, transport: TransportHeader, payload: Bytes) -> bytes:
    """The transport header's bytes with the checksum for this payload and these addresses."""
    protocol = _protocol_of(transport)
    header = bytearray(bytes(dataclasses.replace(transport, checksum=0)))
    length = len(header) + len(payload)
    initial = 0 if protocol == PROTO_ICMP else checksum.pseudo_header_sum(src, dst, protocol, 0)
    total = checksum.ones_sum(header, initial + length * (protocol != PROTO_ICMP))
    csum = checksum.internet_checksum(payload, total) if payload else ~total & 0xFFFF
    if protocol == PROTO_UDP and csum == 0:
        csum = 0xFFFF  # RFC 768: a computed zero is sent as all ones; zero means "none"
    offset = _CSUM_OFFSET[protocol]
    header[offset : offset + 2] = csum.to_bytes(2, "big")
    return bytes(header)


def encode(
    src: bytes, dst: bytes, transport: TransportHeader, payload: Bytes = b"", *, ttl: int = 64
) -> bytes:
    """One packet from `src` to `dst` (both 4 or both 16 bytes) with lengths and checksums set.

    The transport's checksum (and a UDP header's length) are replaced by the right values.
    """
    if isinstance(transport, UDPHeader):
        transport = dataclasses.replace(transport, length=UDP_HEADER_LEN + len(payload))
    protocol = _protocol_of(transport)
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("addresses must be both IPv4 (4 bytes) or both IPv6 (16 bytes)")
    if protocol == (PROTO_ICMPV6 if len(src) == 4 else PROTO_ICMP):
        raise ValueError("ICMPv4 goes in IPv4 packets and ICMPv6 in IPv6 packets")
    header = _with_checksum(src, dst, transport, payload)
    ip: IPHeader
    if len(src) == 4:
        ip = IPv4Header(src, dst, protocol, IPV4_HEADER_LEN + len(header) + len(payload), ttl)
    else:
        ip = IPv6Header(src, dst, protocol, len(header) + len(payload), ttl)
    return b"".join((bytes(ip), header, payload))


def rst_for(packet: Packet) -> bytes | None:
    """The RST answering a TCP segment that no connection takes (RFC 9293 3.10.7.1).

    None for a segment that is itself a RST (never answer a reset).
    """
    tcp = packet.transport
    if not isinstance(tcp, TCPHeader):
        raise TypeError("rst_for needs a TCP packet")
    if tcp.flags & RST:
        return None
    if tcp.flags & ACK:
        reply = TCPHeader(tcp.dport, tcp.sport, tcp.ack, 0, RST, 0)
    else:
        length = len(packet.payload) + bool(tcp.flags & SYN) + bool(tcp.flags & FIN)
        reply = TCPHeader(tcp.dport, tcp.sport, 0, (tcp.seq + length) & 0xFFFFFFFF, RST | ACK, 0)
    return encode(packet.ip.dst, packet.ip.src, reply)


class Unreachable(enum.Enum):
    """Why a destination cannot be reached, in terms both ICMP versions can say."""

    NETWORK = (ICMPV4_NET_UNREACHABLE, ICMPV6_NO_ROUTE)
    HOST = (ICMPV4_HOST_UNREACHABLE, ICMPV6_ADDRESS_UNREACHABLE)
    PORT = (ICMPV4_PORT_UNREACHABLE, ICMPV6_PORT_UNREACHABLE)
    PROHIBITED = (ICMPV4_ADMIN_PROHIBITED, ICMPV6_ADMIN_PROHIBITED)


def icmp_unreachable_for(original: Bytes, ip: IPHeader, reason: Unreachable) -> bytes:
    """A destination-unreachable error quoting `original` (the raw packet, IP header first).

    It comes from the original destination, so the kernel matches it to the socket by the
    quoted addresses and ports and fails the connect() or send() with the matching errno.
    """
    code_v4, code_v6 = reason.value
    if ip.version == 4:
        limit = _ICMPV4_ERROR_MAX - IPV4_HEADER_LEN - ICMP_HEADER_LEN
        header: TransportHeader = ICMPv4Header(ICMPV4_UNREACHABLE, code_v4)
    else:
        limit = _ICMPV6_ERROR_MAX - IPV6_HEADER_LEN - ICMP_HEADER_LEN
        header = ICMPv6Header(ICMPV6_UNREACHABLE, code_v6)
    quoted = bytes(memoryview(original)[: min(limit, ip.total_length)])
    return encode(ip.dst, ip.src, header, quoted)


def echo_reply_for(packet: Packet) -> bytes | None:
    """The echo reply to an ICMP or ICMPv6 echo request, None for any other packet."""
    message = packet.transport
    reply: TransportHeader
    if isinstance(message, ICMPv4Header) and message.type == ICMPV4_ECHO_REQUEST:
        reply = ICMPv4Header(ICMPV4_ECHO_REPLY, 0, 0, message.rest)
    elif isinstance(message, ICMPv6Header) and message.type == ICMPV6_ECHO_REQUEST:
        reply = ICMPv6Header(ICMPV6_ECHO_REPLY, 0, 0, message.rest)
    else:
        return None
    return encode(packet.ip.dst, packet.ip.src, reply, packet.payload)


class TCPFlowEncoder:
    """Builds the packets of one TCP flow, from `src`:`sport` to `dst`:`dport`, for the TUN.

    `vnet_header`: the device was opened with IFF_VNET_HDR, so every packet starts with one.
    `offload_checksum` (needs vnet_header): the kernel computes the TCP checksum (NEEDS_CSUM);
    only then can `segment(..., gso_size=mss)` hand over a payload larger than one MSS, which
    the kernel cuts into MSS-sized segments (GSO_TCPV4/GSO_TCPV6).
    """

    __slots__ = (
        "_dst",
        "_gso_type",
        "_ip_base_sum",
        "_ip_template",
        "_offload",
        "_ports",
        "_pseudo",
        "_src",
        "_ttl",
        "_v4",
        "_vnet",
        "ip_header_length",
    )

    def __init__(
        self,
        src: bytes,
        dst: bytes,
        sport: int,
        dport: int,
        *,
        vnet_header: bool = False,
        offload_checksum: bool = False,
        ttl: int = 64,
    ) -> None:
        if offload_checksum and not vnet_header:
            raise ValueError("checksum offload needs the virtio-net header")
        self._src = src
        self._dst = dst
        self._ports = (sport, dport)
        self._ttl = ttl
        self._v4 = len(src) == 4
        self._vnet = vnet_header
        self._offload = offload_checksum
        self._pseudo = checksum.fold(_from_bytes(src, "big") + _from_bytes(dst, "big") + PROTO_TCP)
        if self._v4:
            self.ip_header_length = IPV4_HEADER_LEN
            self._ip_template = _IPV4.pack(0x45, 0, 0, 0, 0x4000, ttl, PROTO_TCP, 0, src, dst)
            self._ip_base_sum = checksum.ones_sum(self._ip_template)
            self._gso_type = GSO_TCPV4
        else:
            self.ip_header_length = IPV6_HEADER_LEN
            self._ip_template = b""
            self._ip_base_sum = 0
            self._gso_type = GSO_TCPV6

    @property
    def supports_gso(self) -> bool:
        return self._offload

    def segment(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: Bytes = b"",
        options: bytes = b"",
        gso_size: int = 0,
    ) -> bytes:
        """One packet (virtio-net header first when the device has one).

        `options` must already be padded to a multiple of 4 bytes (`TCPHeader.options_bytes`).
        With `gso_size` and a payload longer than it, the packet is a GSO super-segment.
        """
        header_length = TCP_HEADER_LEN + len(options)
        tcp_length = header_length + len(payload)
        sport, dport = self._ports
        off = header_length << 2
        if self._v4:
            total = IPV4_HEADER_LEN + tcp_length
            ip_csum = ~checksum.add(self._ip_base_sum, total) & 0xFFFF
            ip = _IPV4.pack(
                0x45, 0, total, 0, 0x4000, self._ttl, PROTO_TCP, ip_csum, self._src, self._dst
            )
        else:
            ip = _IPV6.pack(0x60000000, tcp_length, PROTO_TCP, self._ttl, self._src, self._dst)
        if self._offload:
            # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not inverted;
            # the kernel adds the sum of the segment from csum_start and stores the result.
            partial = checksum.fold(self._pseudo + tcp_length)
            tcp = _TCP.pack(sport, dport, seq, ack, off, flags, window, partial, 0)
            if gso_size and len(payload) > gso_size:
                gso_type = self._gso_type
                hdr_len = len(ip) + header_length
            else:
                gso_type, hdr_len, gso_size = GSO_NONE, 0, 0
            vnet = _VNET.pack(F_NEEDS_CSUM, gso_type, hdr_len, gso_size, len(ip), 16)
            return b"".join((vnet, ip, tcp, options, payload))
        if gso_size and len(payload) > gso_size:
            raise ValueError("GSO segments need checksum offload")
        tcp = _TCP.pack(sport, dport, seq, ack, off, flags, window, 0, 0)
        total_sum = self._pseudo + tcp_length + _from_bytes(tcp, "big") % 0xFFFF
        if options:
            total_sum += _from_bytes(options, "big")
        csum = (
            checksum.internet_checksum(payload, total_sum)
            if payload
            else ~checksum.fold(total_sum) & 0xFFFF
        )
        tcp = _TCP.pack(sport, dport, seq, ack, off, flags, window, csum, 0)
        if self._vnet:
            return b"".join((VNET_HDR_NONE, ip, tcp, options, payload))
        return b"".join((ip, tcp, options, payload))
