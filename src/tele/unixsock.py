"""Unix-domain socket plumbing shared by the daemon and the CLI: a private listener (mode 0600),
connecting, the peer's credentials (SO_PEERCRED) and the rule for which peers are trusted.

Paths longer than sun_path allows (108 bytes; test and XDG dirs can be deep) are reached through
`/proc/self/fd/<dir fd>/<name>`, which Linux resolves like the real directory. trio is imported
inside the async functions only: the CLI's blocking calls (tele.cli.quick) use the rest without
paying for it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tele.errors import ConnectionFailed

if TYPE_CHECKING:
    import trio

_SUN_PATH_MAX = 107  # 108 bytes including the terminating NUL


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


@contextlib.contextmanager
def addressable(path: Path) -> Iterator[str]:
    """The address to bind()/connect() for `path` (fits in sun_path), valid inside the block."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


OWNER_ENV = "TELE_DAEMON_OWNER"
"""The uid a daemon running as root serves as its user (`tele connect --docker`: the daemon's
container runs as root for its network namespace, started by a user who is not root). Honoured
by root only: whoever can set a root process's environment is root already."""


def delegated_uid() -> int | None:
    """OWNER_ENV's uid when this process is root and it names another valid uid, else None."""
    value = os.environ.get(OWNER_ENV, "")
    if os.getuid() != 0 or not value.isdigit():
        return None
    uid = int(value)
    return uid if 0 < uid < 2**32 - 1 else None


async def open_private_listener(path: Path, *, backlog: int = 64) -> trio.SocketListener:
    """Bind a stream socket at `path` (replacing what is there) with mode 0600 and listen; a
    root process with a delegated_uid() gives the socket to that uid before it listens.

    The caller must own the right to replace `path` (the daemon holds its lock file); the
    directory is expected to be private (0700) already, so the moment between bind and chmod
    exposes nothing.
    """
    import trio  # here, not at the top: the CLI's blocking fast path must not pay for it

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        with addressable(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)
        if (owner := delegated_uid()) is not None:
            os.chown(path, owner, -1)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def connect(path: Path) -> trio.SocketStream:
    """Connect to the stream socket at `path`; OSError (FileNotFoundError,
    ConnectionRefusedError, …) tells the caller nobody listens there."""
    import trio

    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with addressable(path) as address:
            await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def peer_credentials(sock: trio.socket.SocketType | socket.socket) -> PeerCredentials:
    """The pid, uid and gid of the process that connected (or listened) at the other end.

    The kernel records them when the connection is made, so a peer cannot change them later.
    """
    size = struct.calcsize("3i")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
    except OSError as exc:
        raise ConnectionFailed(f"Cannot read the peer's credentials: {exc.strerror}.") from exc
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def peer_is_trusted(peer_uid: int, own_uid: int | None = None) -> bool:
    """The daemon talks to processes of its own user only, and to root; a root daemon also to
    its delegated_uid() (the user it runs for).

    Root is let in because it can read the user's files and memory anyway (refusing it protects
    nothing) and it lets `sudo -E tele status` work; every other uid is refused.
    """
    own = os.getuid() if own_uid is None else own_uid
    if peer_uid in (own, 0):
        return True
    return own == 0 and peer_uid == delegated_uid()
