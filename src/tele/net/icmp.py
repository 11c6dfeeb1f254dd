"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) message headers.

Only the fixed 8 bytes are the header: type, code, checksum and the 32-bit "rest" word (echo
identifier and sequence, next-hop MTU, or unused); the message body is the packet payload. The
ICMPv6 checksum covers a pseudo-header and is checked in `tele.net.packet`, like TCP's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tele.net.errors import IntegrityError

ICMP_HEADER_LEN = 8

ICMPV4_ECHO_REPLY = 0
ICMPV4_UNREACHABLE = 3
ICMPV4_ECHO_REQUEST = 8
ICMPV4_TIME_EXCEEDED = 11
# Destination-unreachable codes (RFC 792, RFC 1812).
ICMPV4_NET_UNREACHABLE = 0
ICMPV4_HOST_UNREACHABLE = 1
ICMPV4_PORT_UNREACHABLE = 3
ICMPV4_FRAGMENTATION_NEEDED = 4
ICMPV4_ADMIN_PROHIBITED = 13

ICMPV6_UNREACHABLE = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
# Destination-unreachable codes (RFC 4443 3.1).
ICMPV6_NO_ROUTE = 0
ICMPV6_ADMIN_PROHIBITED = 1
ICMPV6_ADDRESS_UNREACHABLE = 3
ICMPV6_PORT_UNREACHABLE = 4

_ICMP = struct.Struct("!BBHI")


@dataclass(frozen=True, slots=True)
class _ICMPHeader:
    type: int
    code: int
    checksum: int = 0
    rest: int = 0

    header_length = ICMP_HEADER_LEN

    @property
    def ident(self) -> int:
        """Echo identifier (echo request/reply only)."""
        return self.rest >> 16

    @property
    def sequence(self) -> int:
        """Echo sequence number (echo request/reply only)."""
        return self.rest & 0xFFFF

    def __bytes__(self) -> bytes:
        return _ICMP.pack(self.type, self.code, self.checksum, self.rest)


def _parse(buf: bytes | bytearray | memoryview, family: str) -> tuple[int, int, int, int]:
    if len(buf) < ICMP_HEADER_LEN:
        raise IntegrityError(f"{family}: {len(buf)} bytes is shorter than a header")
    fields: tuple[int, int, int, int] = _ICMP.unpack_from(buf)
    return fields


@dataclass(frozen=True, slots=True)
class ICMPv4Header(_ICMPHeader):
    """An ICMPv4 message header."""

    @property
    def is_error(self) -> bool:
        return self.type in (ICMPV4_UNREACHABLE, ICMPV4_TIME_EXCEEDED, 4, 5, 12)

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> ICMPv4Header:
        return cls(*_parse(buf, "ICMPv4"))


@dataclass(frozen=True, slots=True)
class ICMPv6Header(_ICMPHeader):
    """An ICMPv6 message header."""

    @property
    def is_error(self) -> bool:
        return self.type < 128

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> ICMPv6Header:
        return cls(*_parse(buf, "ICMPv6"))
