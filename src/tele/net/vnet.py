"""The virtio-net header (`struct virtio_net_hdr`) that prefixes every packet on an
IFF_VNET_HDR TUN device.

Reading, it says whether the kernel left the transport checksum to us (NEEDS_CSUM: the packet
carries only the pseudo-header sum) and whether the packet is a GSO super-segment. Writing, it
lets the kernel checksum (NEEDS_CSUM) and segment (GSO_TCPV4/GSO_TCPV6 with gso_size = MSS) our
large segments, which is what makes writing fast (see shared/reference/dependencies.md).
Byte order is little-endian: the virtio 1.0 order, and the native one on x86 and arm64 where
legacy TUN uses host order (TUNSETVNETLE makes it explicit on big-endian hosts).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tele.net.errors import IntegrityError, SanityError

VNET_HDR_LEN = 10
VNET_HDR_MRG_LEN = 12  # with num_buffers, when TUNSETVNETHDRSZ set 12

F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02
F_RSC_INFO = 0x04

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_KNOWN_GSO = frozenset({GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4})
_VNET = struct.Struct("<BBHHHH")
_NUM_BUFFERS = struct.Struct("<H")

VNET_HDR_NONE = bytes(VNET_HDR_LEN)
"""The header of a plain packet: no checksum offload, no GSO."""


@dataclass(frozen=True, slots=True)
class VirtioNetHeader:
    """`struct virtio_net_hdr` (10 bytes), or the 12-byte `_mrg_rxbuf` form with num_buffers."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int | None = None

    @property
    def size(self) -> int:
        return VNET_HDR_LEN if self.num_buffers is None else VNET_HDR_MRG_LEN

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)

    @property
    def is_gso(self) -> bool:
        return self.gso_type & ~GSO_ECN != GSO_NONE

    @classmethod
    def from_bytes(
        cls, buf: bytes | bytearray | memoryview, size: int = VNET_HDR_LEN
    ) -> VirtioNetHeader:
        """Parse the header at the start of `buf`; `size` is the device's TUNSETVNETHDRSZ."""
        if size not in (VNET_HDR_LEN, VNET_HDR_MRG_LEN):
            raise ValueError(f"virtio-net header size {size} is neither 10 nor 12")
        if len(buf) < size:
            raise IntegrityError(f"virtio-net: {len(buf)} bytes is shorter than its header")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _VNET.unpack_from(buf)
        num_buffers = _NUM_BUFFERS.unpack_from(buf, 10)[0] if size == VNET_HDR_MRG_LEN else None
        if gso_type & ~GSO_ECN not in _KNOWN_GSO:
            raise SanityError(f"virtio-net: unknown gso_type {gso_type:#x}")
        if gso_type & ~GSO_ECN != GSO_NONE and gso_size == 0:
            raise SanityError("virtio-net: GSO packet with gso_size 0")
        return cls(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)

    def __bytes__(self) -> bytes:
        fixed = _VNET.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )
        if self.num_buffers is None:
            return fixed
        return fixed + _NUM_BUFFERS.pack(self.num_buffers)


def checksum_settled(buf: bytes | bytearray | memoryview) -> bool:
    """True when the header at the start of `buf` says the transport checksum needs no check.

    NEEDS_CSUM: the kernel left only the pseudo-header sum in place (its own packet, never
    corrupted on the way); DATA_VALID: the kernel verified it already. A one-byte test for the
    data path, cheaper than parsing the header.
    """
    return bool(buf[0] & (F_NEEDS_CSUM | F_DATA_VALID))
