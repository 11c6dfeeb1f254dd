"""UDP header codec (RFC 768). The checksum needs the pseudo-header: see `tele.net.packet`."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tele.net.errors import IntegrityError, SanityError

UDP_HEADER_LEN = 8

_UDP = struct.Struct("!HHHH")


@dataclass(frozen=True, slots=True)
class UDPHeader:
    """A UDP header; `length` counts header and payload, as on the wire."""

    sport: int
    dport: int
    length: int
    checksum: int = 0

    header_length = UDP_HEADER_LEN

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> UDPHeader:
        if len(buf) < UDP_HEADER_LEN:
            raise IntegrityError(f"UDP: {len(buf)} bytes is shorter than a header")
        sport, dport, length, csum = _UDP.unpack_from(buf)
        if not UDP_HEADER_LEN <= length <= len(buf):
            raise IntegrityError(f"UDP: length {length} outside 8..{len(buf)}")
        if dport == 0:
            raise SanityError("UDP: destination port 0")
        return cls(sport, dport, length, csum)

    def __bytes__(self) -> bytes:
        return _UDP.pack(self.sport, self.dport, self.length, self.checksum)
