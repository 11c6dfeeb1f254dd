"""IPv4 and IPv6 header codecs.

Addresses are kept packed (4 or 16 `bytes`): they are compared and hashed per packet, and an
`ipaddress` object costs a microsecond to build; `src_address`/`dst_address` give one on demand.
IPv4 options are kept as raw bytes and otherwise ignored; IPv6 extension headers are kept raw
and walked to find the upper-layer protocol and a fragment header.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from tele.net import checksum
from tele.net.errors import ChecksumError, IntegrityError, SanityError, UnsupportedError

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# IPv4 flag bits (the 3 high bits of the flags/fragment-offset word, shifted down).
IPV4_DF = 0x2
IPV4_MF = 0x1

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")

# IPv6 extension headers that are skipped on the way to the upper layer (RFC 8200 4.1, RFC 7045).
_EXT_HOP_BY_HOP = 0
_EXT_ROUTING = 43
_EXT_FRAGMENT = 44
_EXT_AH = 51
_EXT_DEST_OPTS = 60
_EXT_NO_NEXT = 59
_SKIPPED_EXTENSIONS = frozenset({_EXT_HOP_BY_HOP, _EXT_ROUTING, _EXT_DEST_OPTS, 135, 139, 140})


@dataclass(frozen=True, slots=True)
class IPv4Header:
    """An IPv4 header (RFC 791). `fragment_offset` is in 8-byte units, as on the wire."""

    src: bytes
    dst: bytes
    protocol: int
    total_length: int
    ttl: int = 64
    tos: int = 0
    ident: int = 0
    flags: int = IPV4_DF
    fragment_offset: int = 0
    options: bytes = b""

    version = 4

    @property
    def header_length(self) -> int:
        return IPV4_HEADER_LEN + len(self.options)

    @property
    def payload_length(self) -> int:
        return self.total_length - IPV4_HEADER_LEN - len(self.options)

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags & IPV4_MF) or self.fragment_offset != 0

    @property
    def src_address(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.src)

    @property
    def dst_address(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.dst)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview, *, verify: bool = True) -> IPv4Header:
        """Parse the header at the start of `buf` (which may hold more than the datagram)."""
        # Integrity: lengths consistent with the buffer, version, header checksum.
        if len(buf) < IPV4_HEADER_LEN:
            raise IntegrityError(f"IPv4: {len(buf)} bytes is shorter than a header")
        (vihl, tos, total_length, ident, frag, ttl, protocol, _csum, src, dst) = _IPV4.unpack_from(
            buf
        )
        if vihl >> 4 != 4:
            raise IntegrityError(f"IPv4: version field is {vihl >> 4}")
        header_length = (vihl & 0xF) * 4
        if header_length < IPV4_HEADER_LEN:
            raise IntegrityError(f"IPv4: header length {header_length} is below 20")
        if not header_length <= total_length <= len(buf):
            raise IntegrityError(
                f"IPv4: total length {total_length} does not fit header {header_length} "
                f"and buffer {len(buf)}"
            )
        if verify and not checksum.verify(memoryview(buf)[:header_length]):
            raise ChecksumError("IPv4: bad header checksum")
        options = bytes(buf[IPV4_HEADER_LEN:header_length]) if header_length > 20 else b""
        # Sanity: a multicast or broadcast source is never a legitimate sender of ours.
        if src[0] >= 224 or src == b"\xff\xff\xff\xff":
            raise SanityError(f"IPv4: source {ipaddress.IPv4Address(src)} is multicast/broadcast")
        if frag & 0x8000:
            raise SanityError("IPv4: reserved flag bit is set")
        return cls(
            src, dst, protocol, total_length, ttl, tos, ident, frag >> 13, frag & 0x1FFF, options
        )

    def __bytes__(self) -> bytes:
        """The header with its checksum computed (options padded to 4 bytes with zeros)."""
        options = self.options
        if len(options) & 3:
            options += b"\x00" * (4 - (len(options) & 3))
        vihl = 0x40 | ((IPV4_HEADER_LEN + len(options)) >> 2)
        frag = (self.flags << 13) | self.fragment_offset
        fields = (self.tos, self.total_length, self.ident, frag, self.ttl, self.protocol)
        header = _IPV4.pack(vihl, *fields, 0, self.src, self.dst) + options
        csum = checksum.internet_checksum(header)
        return header[:10] + csum.to_bytes(2, "big") + header[12:]


@dataclass(frozen=True, slots=True)
class IPv6Fragment:
    """What an IPv6 fragment header says (offset in bytes)."""

    ident: int
    offset: int
    more: bool


@dataclass(frozen=True, slots=True)
class IPv6Header:
    """An IPv6 header (RFC 8200) with its raw extension-header chain.

    `next_header` is the field of the fixed header; `protocol` is the upper-layer protocol found
    after the extensions; `payload_length` counts the extensions too, as on the wire.
    """

    src: bytes
    dst: bytes
    next_header: int
    payload_length: int
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0
    extensions: bytes = b""

    version = 6

    @property
    def header_length(self) -> int:
        return IPV6_HEADER_LEN + len(self.extensions)

    @property
    def total_length(self) -> int:
        return IPV6_HEADER_LEN + self.payload_length

    @property
    def protocol(self) -> int:
        if not self.extensions:
            return self.next_header
        return walk_extensions(self.extensions, 0, self.next_header, len(self.extensions))[0]

    @property
    def fragment(self) -> IPv6Fragment | None:
        if not self.extensions:
            return None
        return walk_extensions(self.extensions, 0, self.next_header, len(self.extensions))[2]

    @property
    def is_fragment(self) -> bool:
        frag = self.fragment
        return frag is not None and (frag.more or frag.offset != 0)

    @property
    def src_address(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.src)

    @property
    def dst_address(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(self.dst)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> IPv6Header:
        """Parse the fixed header and the extension chain at the start of `buf`."""
        if len(buf) < IPV6_HEADER_LEN:
            raise IntegrityError(f"IPv6: {len(buf)} bytes is shorter than a header")
        word, payload_length, next_header, hop_limit, src, dst = _IPV6.unpack_from(buf)
        if word >> 28 != 6:
            raise IntegrityError(f"IPv6: version field is {word >> 28}")
        if payload_length == 0 and next_header == _EXT_HOP_BY_HOP:
            raise UnsupportedError("IPv6: jumbograms are not supported")
        end = IPV6_HEADER_LEN + payload_length
        if end > len(buf):
            raise IntegrityError(
                f"IPv6: payload length {payload_length} exceeds buffer {len(buf) - 40}"
            )
        extensions = b""
        if next_header in _SKIPPED_EXTENSIONS or next_header in (_EXT_FRAGMENT, _EXT_AH):
            _protocol, offset, _frag = walk_extensions(buf, IPV6_HEADER_LEN, next_header, end)
            extensions = bytes(buf[IPV6_HEADER_LEN:offset])
        if src[0] == 0xFF:
            raise SanityError(f"IPv6: source {ipaddress.IPv6Address(src)} is multicast")
        return cls(
            src,
            dst,
            next_header,
            payload_length,
            hop_limit,
            (word >> 20) & 0xFF,
            word & 0xFFFFF,
            extensions,
        )

    def __bytes__(self) -> bytes:
        word = 0x60000000 | (self.traffic_class << 20) | self.flow_label
        fixed = _IPV6.pack(
            word, self.payload_length, self.next_header, self.hop_limit, self.src, self.dst
        )
        return fixed + self.extensions


def walk_extensions(
    buf: bytes | bytearray | memoryview, offset: int, next_header: int, end: int
) -> tuple[int, int, IPv6Fragment | None]:
    """Skip IPv6 extension headers from `offset`; return (protocol, upper offset, fragment).

    Raises IntegrityError when a header runs past `end` and SanityError for a hop-by-hop header
    that is not first (RFC 8200 4.1).
    """
    fragment: IPv6Fragment | None = None
    first = offset
    while True:
        if next_header in _SKIPPED_EXTENSIONS:
            if next_header == _EXT_HOP_BY_HOP and offset != first:
                raise SanityError("IPv6: hop-by-hop options header not first")
            if offset + 8 > end:
                raise IntegrityError("IPv6: truncated extension header")
            length = (buf[offset + 1] + 1) * 8
        elif next_header == _EXT_AH:
            if offset + 8 > end:
                raise IntegrityError("IPv6: truncated authentication header")
            length = (buf[offset + 1] + 2) * 4
        elif next_header == _EXT_FRAGMENT:
            if offset + 8 > end:
                raise IntegrityError("IPv6: truncated fragment header")
            frag_word = int.from_bytes(buf[offset + 2 : offset + 4], "big")
            fragment = IPv6Fragment(
                int.from_bytes(buf[offset + 4 : offset + 8], "big"),
                frag_word & 0xFFF8,
                bool(frag_word & 1),
            )
            length = 8
        else:
            return next_header, offset, fragment
        if offset + length > end:
            raise IntegrityError("IPv6: extension header runs past the payload")
        next_header = buf[offset]
        offset += length
        if next_header == _EXT_NO_NEXT:
            return next_header, offset, fragment
