"""The messages between the daemon and the privileged helper, and how they travel.

Transport: a unix SOCK_SEQPACKET connection (one message per packet, so no framing), from the
helper to the daemon's `helper.sock`. Each message is msgspec JSON with a `type` tag; a reply
that hands over descriptors carries them as SCM_RIGHTS in the same packet. The daemon asks, the
helper answers each request with exactly one reply, in order:

```
helper -> daemon   Hello(pid, uid)          after connecting (the daemon checks the peer's uid)
daemon -> helper   Welcome()                the helper may detach from the terminal now
daemon -> helper   OpenDevice(...)          -> DeviceOpened + [tun fd]       | Failed
daemon -> helper   ChangeRoutes(...)        -> RoutesChanged                 | Failed
daemon -> helper   BindDns(address, port)   -> DnsBound + [udp, tcp, upstream fds] | Failed
daemon -> helper   SetResolver(...)         -> Done                          | Failed
daemon -> helper   RestoreResolver()        -> Done
daemon -> helper   Finish()                 -> Done, after everything was undone; then EOF
```
An end of file (the daemon closed the connection or died) makes the helper undo all it did
and exit, exactly as after Finish.
"""

from __future__ import annotations

import array
import socket
from typing import Final

import msgspec

from tele import jsonlimits

MAX_MESSAGE: Final = 64 * 1024
MAX_FDS: Final = 4
ANCILLARY_SPACE: Final = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
SOCKET_NAME: Final = "helper.sock"


class _Message(msgspec.Struct, tag=True, kw_only=True):
    pass


class Hello(_Message):
    pid: int
    uid: int
    version: str


class Welcome(_Message):
    pass


class OpenDevice(_Message):
    name: str
    offload: bool
    address: str
    address6: str
    mtu: int
    subnets: list[str]
    allow_conflicting: list[str] = []
    netns: str | None = None
    """Create the device there (a name under /run/netns); None: the helper's own."""


class DeviceOpened(_Message):
    name: str
    vnet_header: bool
    routes: list[str]


class ChangeRoutes(_Message):
    add: list[str]
    remove: list[str]
    allow_conflicting: list[str] = []


class RoutesChanged(_Message):
    added: list[str]


class BindDns(_Message):
    address: str
    port: int = 53


class DnsBound(_Message):
    pass


class SetResolver(_Message):
    """Point the resolver of the device's namespace at `server`; the helper picks the file
    (/etc/resolv.conf, or /etc/netns/<name>/resolv.conf), never the daemon."""

    resolved: bool
    server: str
    search: list[str]
    domains: list[str]


class RestoreResolver(_Message):
    pass


class Finish(_Message):
    pass


class Done(_Message):
    pass


class Failed(_Message):
    message: str
    conflict: bool = False
    """The failure is a route conflict (the user's to resolve), not a broken helper."""


Message = (
    Hello
    | Welcome
    | OpenDevice
    | DeviceOpened
    | ChangeRoutes
    | RoutesChanged
    | BindDns
    | DnsBound
    | SetResolver
    | RestoreResolver
    | Finish
    | Done
    | Failed
)

_decoder = msgspec.json.Decoder(Message)


class ProtocolError(Exception):
    """A packet that is not one of the messages above."""


def encode(message: Message) -> bytes:
    return msgspec.json.encode(message)


def decode(data: bytes) -> Message:
    try:
        jsonlimits.check_depth(data)
        message: Message = _decoder.decode(data)
        return message
    except (msgspec.DecodeError, jsonlimits.TooDeep) as exc:
        raise ProtocolError(f"not a helper message: {exc}") from exc


def fds_ancillary(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that passes `fds` (SCM_RIGHTS); empty for none."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def fds_received(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in received ancillary data (they are ours to close)."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % fds.itemsize
            fds.frombytes(data[:usable])
    return list(fds)
