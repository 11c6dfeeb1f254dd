"""The TUN device: open `/dev/net/tun` with TUNSETIFF, the virtio-net header and offloads.

pyroute2's tuntap creates persistent devices and ignores `no_pi`, so the device is opened here
with the ioctls themselves. With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6) the kernel hands
over GSO super-segments of up to ~64 KiB at MTU 1500 and takes ours the same way: reads of
~3 GB/s instead of ~0.75 GB/s and writes that the kernel checksums and cuts (measured numbers in
shared/reference/dependencies.md and bench/vif.py). The device is not persistent: it disappears
when the last descriptor closes, so a crashed daemon leaves no device behind.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from tele.net.vnet import VNET_HDR_LEN
from tele.vif.errors import VifError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

TUN_PATH = "/dev/net/tun"


@dataclass(slots=True)
class TunDevice:
    """An open TUN device: its descriptor (non-blocking) and name."""

    fd: int
    name: str
    vnet_header: bool
    """Every packet read or written starts with a `struct virtio_net_hdr` (10 bytes)."""

    @property
    def header_length(self) -> int:
        return VNET_HDR_LEN if self.vnet_header else 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tun(name: str, *, offload: bool = True) -> TunDevice:
    """Create (or attach to) TUN device `name` in the calling thread's network namespace.

    `offload`: IFF_VNET_HDR plus checksum and TSO offload, the fast configuration. Raises
    VifError with the reason (no /dev/net/tun, no CAP_NET_ADMIN, name in use).
    """
    if len(name.encode()) > 15:
        raise VifError(f"device name {name!r} is longer than 15 bytes")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except PermissionError as exc:
        raise VifError(
            f"cannot open {TUN_PATH}: creating the virtual network interface needs root "
            "(CAP_NET_ADMIN)"
        ) from exc
    except OSError as exc:
        raise VifError(f"cannot open {TUN_PATH}: {exc.strerror}") from exc
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        try:
            result = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        except PermissionError as exc:
            raise VifError(
                f"cannot create TUN device {name}: that needs root (CAP_NET_ADMIN)"
            ) from exc
        except OSError as exc:
            raise VifError(f"cannot create TUN device {name}: {exc.strerror}") from exc
        actual = result[:16].rstrip(b"\0").decode()
        if offload:
            try:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
            except OSError as exc:
                raise VifError(f"cannot enable offloads on {actual}: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
    return TunDevice(fd, actual, offload)
